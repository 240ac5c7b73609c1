/**
 * Job handlers every worker has, for trying the system out and for health checks:
 * `noop` (returns at once), `sleep` (`{ms}`), `echo` (returns its payload), `ask_human`
 * (`{message?, timeout_seconds?}`: raises `needs_human` and returns the resolution).
 * Browser recipes come with `src/browser/`.
 */
import { Duration, Effect, Schema } from "effect"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"

/** The built-in handlers. */
export const builtinHandlers = JobHandler.handlers({
  noop: Effect.succeed({ ok: true }),
  sleep: Effect.gen(function* () {
    const { ms } = yield* JobHandler.payload(
      Schema.Struct({ ms: Schema.Number.pipe(Schema.between(0, 3_600_000)) })
    )
    yield* JobHandler.step(`Sleeping ${ms} ms`, Effect.sleep(Duration.millis(ms)), { index: 1, total: 1 })
    return { slept_ms: ms }
  }),
  echo: Effect.map(JobHandler.JobContext, (ctx) => ctx.payload),
  ask_human: Effect.gen(function* () {
    const { message, timeout_seconds } = yield* JobHandler.payload(
      Schema.Struct({
        message: Schema.optionalWith(Schema.String, { default: () => "A human is needed to continue" }),
        timeout_seconds: Schema.optionalWith(Schema.Int.pipe(Schema.between(1, 7 * 24 * 3600)), {
          default: () => 300
        })
      })
    )
    const resolution = yield* JobHandler.needsHuman({ type: "manual", message, timeout_seconds })
    return { resolved_by: resolution.resolved_by, resolution_data: resolution.resolution_data ?? null }
  })
})
