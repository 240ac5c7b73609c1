import { describe, expect, it } from "@effect/vitest"
import { Duration } from "effect"
import { defaultRestartPolicy, type RestartPolicy } from "../../src/runtime/core/Actor.ts"
import { decide } from "../../src/runtime/core/Supervisor.ts"

const policy: RestartPolicy = {
  maxRestarts: 3,
  window: Duration.seconds(10),
  minBackoff: Duration.millis(100),
  maxBackoff: Duration.millis(300)
}

/** Crash at each of these times (ms), in turn, and return the verdicts. */
const crashes = (p: RestartPolicy, times: ReadonlyArray<number>) => {
  let restarts: Array<number> | undefined
  return times.map((now) => {
    const decided = decide(p, restarts, now)
    restarts = decided.restarts
    return decided.verdict
  })
}

describe("restart policy", () => {
  it("restarts with a doubling backoff up to the cap, and fails one crash past the limit", () => {
    expect(crashes(policy, [0, 1, 2, 3])).toEqual([
      { _tag: "Restart", n: 1, backoffMs: 100 },
      { _tag: "Restart", n: 2, backoffMs: 200 },
      { _tag: "Restart", n: 3, backoffMs: 300 },
      { _tag: "Fail", n: 4 }
    ])
  })

  it("forgets crashes older than the window", () => {
    expect(crashes(policy, [0, 1, 9_000, 10_500, 12_000, 20_000])).toEqual([
      { _tag: "Restart", n: 1, backoffMs: 100 },
      { _tag: "Restart", n: 2, backoffMs: 200 },
      { _tag: "Restart", n: 3, backoffMs: 300 },
      { _tag: "Restart", n: 2, backoffMs: 200 },
      { _tag: "Restart", n: 3, backoffMs: 300 },
      { _tag: "Restart", n: 3, backoffMs: 300 }
    ])
  })

  it("the default policy allows 5 restarts a minute, from 100 ms doubling", () => {
    const verdicts = crashes(defaultRestartPolicy, [0, 1, 2, 3, 4, 5])
    expect(verdicts.map((v) => (v._tag === "Restart" ? v.backoffMs : "failed"))).toEqual([
      100,
      200,
      400,
      800,
      1600,
      "failed"
    ])
  })
})
