/**
 * No leaked Chromium: SIGKILL a worker node while a browser job holds its page, and none of
 * the node's Chromium processes is alive 5 s later (Playwright talks to Chromium over a
 * pipe; Chromium ends when the pipe does).
 */
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import { startGateway, statusIs } from "../fixtures/Jobs.ts"
import * as Processes from "../fixtures/Processes.ts"
import * as Site from "../fixtures/Site.ts"

/** Every process below `root` (children, their children …) whose command names Chromium. */
const chromiumBelow = (root: number): Array<number> => {
  const parent = new Map<number, number>()
  const command = new Map<number, string>()
  for (const entry of Fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = Fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      parent.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]))
      command.set(Number(entry), Fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0")[0] ?? "")
    } catch {
      // gone meanwhile
    }
  }
  const below = (pid: number): boolean => {
    for (let p = parent.get(pid); p !== undefined && p > 1; p = parent.get(p)) if (p === root) return true
    return false
  }
  return [...command.entries()]
    .filter(([pid, cmd]) => cmd.includes("chrom") && below(pid))
    .map(([pid]) => pid)
}

/** A page that never finishes loading. */
const hangingSite = Site.serve(() => {
  // never answered
})

describe("no leaked Chromium", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "SIGKILL of a worker node holding a page leaves none of its Chromium processes alive within 5 s",
      () =>
        Effect.gen(function* () {
          const urls = yield* Database.DatabaseUrls
          const { base } = yield* hangingSite
          const { jobs } = yield* startGateway("gw-leak")
          const proc = yield* Processes.start(
            process.execPath,
            ["--import", "tsx", Path.join(Processes.root, "test/fixtures/handlers/worker-layer.ts")],
            {
              env: Processes.cleanEnv({
                DATABASE_URL: Redacted.value(urls.url),
                TROUPE_NODE_ID: "node-leak",
                GH_WORKER_ID: "worker-leak",
                GH_WORKER_PORT: "0"
              })
            }
          )
          yield* proc.waitFor("troupe worker worker-leak is up", { within: "90 seconds" })
          const job = yield* jobs.submit({
            job_type: "recipe",
            payload: { steps: [{ action: "goto", url: `${base}/hang`, timeout_ms: 600_000 }] }
          })
          yield* statusIs(job.id, "running")
          const chromium = yield* Processes.eventually(
            Effect.sync(() => chromiumBelow(proc.pid)),
            (pids) => pids.length > 0,
            "the worker's Chromium to start"
          )
          process.kill(proc.pid, "SIGKILL")
          const left = yield* Processes.eventually(
            Effect.sync(() => chromium.filter(Processes.isAlive)),
            (pids) => pids.length === 0,
            "the worker's Chromium processes to end",
            "5 seconds"
          )
          expect(left).toEqual([])
        }),
      180_000
    )
  })
})
