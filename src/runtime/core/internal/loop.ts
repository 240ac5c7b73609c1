/**
 * The pieces every long-running loop of the runtime is built from, written once: a wake
 * latch (signals coalesce while the loop is busy), a timer that signals it as the fallback
 * poll, the count of a loop's consecutive failures (logged on the first and every 20th,
 * with a capped exponential backoff), and the retry schedule of a database statement.
 * Exported for `runtime/jobs` and `actors/` as well as `core/`.
 */
import { Cause, Duration, Effect, Queue, Schedule, type Scope } from "effect"
import { describe } from "../../db/Database.ts"

/** A wake-up signal for one loop: any number of signals before the loop waits count as one. */
export interface Wake {
  /** Signal the loop; synchronous, callable from any callback (a NOTIFY, a finished handler). */
  readonly signal: () => void
  /** Wait for a signal and consume it (at once if one came while the loop was busy). */
  readonly await: Effect.Effect<void>
  /** Wait for a signal at most this long. */
  readonly awaitAtMost: (duration: Duration.DurationInput) => Effect.Effect<void>
}

/** Make a wake latch (a sliding queue of one: `signal` allocates nothing and never blocks). */
export const makeWake: Effect.Effect<Wake> = Effect.map(Queue.sliding<void>(1), (queue) => {
  const take = Queue.take(queue)
  return {
    signal: () => void queue.unsafeOffer(undefined),
    await: take,
    awaitAtMost: (duration) => Effect.asVoid(Effect.timeoutOption(take, duration))
  }
})

/**
 * Signal `wake` every `interval` for the lifetime of the scope: the fallback poll, a timer
 * of its own (a timeout around each wait would start and cancel a timer and two fibers per
 * wake-up, that is per message at a moderate load).
 */
export const pollEvery = (
  wake: Wake,
  interval: Duration.DurationInput
): Effect.Effect<void, never, Scope.Scope> =>
  Effect.sync(wake.signal).pipe(
    Effect.delay(interval),
    Effect.forever,
    Effect.interruptible,
    Effect.forkScoped,
    Effect.asVoid
  )

/** Options of a failure count. */
export interface FailuresOptions {
  /** The backoff after the n-th consecutive failure is `base · 2^n`, at most `max` (25 ms, 2 s). */
  readonly base?: Duration.DurationInput
  readonly max?: Duration.DurationInput
  /** Log the first failure and every `logEvery`-th (default 20). */
  readonly logEvery?: number
}

/** The consecutive failures of one loop's step. */
export interface Failures {
  /** Count a failure; log it if it is the first or a `logEvery`-th in a row; then sleep the backoff. */
  readonly failed: (error: unknown) => Effect.Effect<void>
  /** Count a success: after failures, log that it works again and start over. */
  readonly succeeded: Effect.Effect<void>
  /** Failures in a row so far. */
  readonly count: () => number
}

/** The backoff after the n-th failure in a row: `base · 2^n`, at most `max` (milliseconds). */
export const backoffMillis = (n: number, baseMs: number, maxMs: number): number =>
  Math.min(maxMs, baseMs * 2 ** Math.min(n, 30))

/** Start counting the failures of `what` (e.g. "claiming messages"), as it appears in the logs. */
export const makeFailures = (what: string, options: FailuresOptions = {}): Failures => {
  const baseMs = Duration.toMillis(options.base ?? "25 millis")
  const maxMs = Duration.toMillis(options.max ?? "2 seconds")
  const logEvery = options.logEvery ?? 20
  let n = 0
  return {
    failed: (error) =>
      Effect.suspend(() => {
        n++
        const sleep = Effect.sleep(Duration.millis(backoffMillis(n, baseMs, maxMs)))
        if (n !== 1 && n % logEvery !== 0) return sleep
        const reason = describe(Cause.isCause(error) ? Cause.squash(error) : error)
        return Effect.zipRight(Effect.logWarning(`${what} failed (${n}x), retrying: ${reason}`), sleep)
      }),
    succeeded: Effect.suspend(() => {
      if (n === 0) return Effect.void
      const failures = n
      n = 0
      return Effect.logInfo(`${what} works again after ${failures} failed attempts`)
    }),
    count: () => n
  }
}

/**
 * The retry schedule of a database statement: from `base` (20 ms) doubling, then every
 * `every`, and (with `upTo`) given up after that long.
 */
export const retrySchedule = (options: {
  readonly base?: Duration.DurationInput
  readonly every: Duration.DurationInput
  readonly upTo?: Duration.DurationInput
}): Schedule.Schedule<unknown> => {
  const schedule = Schedule.exponential(options.base ?? "20 millis").pipe(
    Schedule.union(Schedule.spaced(options.every))
  )
  return options.upTo === undefined ? schedule : schedule.pipe(Schedule.upTo(options.upTo))
}
