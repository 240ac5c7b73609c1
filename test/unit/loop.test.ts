import { describe, expect, it } from "@effect/vitest"
import { Duration, Effect, Fiber, Logger, LogLevel, Option, TestClock } from "effect"
import { backoffMillis, makeFailures, makeWake, retrySchedule } from "../../src/runtime/core/internal/loop.ts"

/** Run `effect` with a logger that keeps the messages it is given. */
const capturingLogs = <A, E>(effect: Effect.Effect<A, E>) => {
  const messages: Array<string> = []
  const logger = Logger.make(({ message }) => {
    messages.push(Array.isArray(message) ? String(message[0]) : String(message))
  })
  return effect.pipe(
    Effect.provide(Logger.replace(Logger.defaultLogger, logger)),
    Logger.withMinimumLogLevel(LogLevel.All),
    Effect.map((a) => ({ result: a, messages }))
  )
}

describe("wake latch", () => {
  it.effect("signals before a wait count as one; a wait without a signal blocks", () =>
    Effect.gen(function* () {
      const wake = yield* makeWake
      wake.signal()
      wake.signal()
      wake.signal()
      yield* wake.await
      const second = yield* Effect.fork(wake.await)
      yield* TestClock.adjust("1 minute")
      expect(Option.isNone(yield* Fiber.poll(second))).toBe(true)
      wake.signal()
      yield* Fiber.join(second)
    })
  )

  it.effect("awaitAtMost returns at the deadline without a signal", () =>
    Effect.gen(function* () {
      const wake = yield* makeWake
      const waiting = yield* Effect.fork(wake.awaitAtMost("100 millis"))
      yield* TestClock.adjust("99 millis")
      expect(Option.isNone(yield* Fiber.poll(waiting))).toBe(true)
      yield* TestClock.adjust("1 millis")
      yield* Fiber.join(waiting)
    })
  )
})

describe("failure count of a loop", () => {
  it("backs off 25 ms · 2^n, at most 2 s", () => {
    expect([1, 2, 3, 4, 5, 6, 7, 50].map((n) => backoffMillis(n, 25, 2000))).toEqual([
      50, 100, 200, 400, 800, 1600, 2000, 2000
    ])
  })

  it.effect("logs the first and every 20th failure, sleeps the backoff, and logs the recovery once", () =>
    Effect.gen(function* () {
      const failures = makeFailures("claiming messages")
      const { messages } = yield* capturingLogs(
        Effect.gen(function* () {
          for (let i = 0; i < 40; i++) {
            const slept = yield* Effect.fork(failures.failed(new Error("connection refused")))
            yield* TestClock.adjust(Duration.seconds(2))
            yield* Fiber.join(slept)
          }
          yield* failures.succeeded
          yield* failures.succeeded
        })
      )
      expect(messages).toEqual([
        "claiming messages failed (1x), retrying: connection refused",
        "claiming messages failed (20x), retrying: connection refused",
        "claiming messages failed (40x), retrying: connection refused",
        "claiming messages works again after 40 failed attempts"
      ])
      expect(failures.count()).toBe(0)
    })
  )

  it.effect("a failure waits out its backoff before it returns", () =>
    Effect.gen(function* () {
      const failures = makeFailures("x", { base: "10 millis", max: "1 second" })
      const { result } = yield* capturingLogs(
        Effect.gen(function* () {
          const first = yield* Effect.fork(failures.failed("down"))
          yield* TestClock.adjust("19 millis")
          const early = yield* Fiber.poll(first)
          yield* TestClock.adjust("1 millis")
          yield* Fiber.join(first)
          return Option.isNone(early)
        })
      )
      expect(result).toBe(true)
    })
  )
})

describe("retry schedule of a statement", () => {
  it.effect("retries from 20 ms doubling, then every `every`, and gives up after `upTo`", () =>
    Effect.gen(function* () {
      let attempts = 0
      const statement = Effect.suspend(() => {
        attempts++
        return Effect.fail("unreachable")
      })
      const fiber = yield* Effect.fork(
        Effect.either(Effect.retry(statement, retrySchedule({ every: "1 second", upTo: "5 seconds" })))
      )
      // 20, 40, 80, 160, 320, 640 ms, then every second.
      yield* TestClock.adjust("1260 millis")
      expect(attempts).toBe(7)
      yield* TestClock.adjust("10 seconds")
      const result = yield* Fiber.join(fiber)
      expect(result._tag).toBe("Left")
      expect(attempts).toBeGreaterThanOrEqual(10)
      expect(attempts).toBeLessThanOrEqual(12)
    })
  )
})
