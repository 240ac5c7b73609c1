/**
 * Job handlers every worker has, for trying the system out and for health checks:
 * `noop` (returns at once), `sleep` (`{ms}`), `echo` (returns its payload).
 * Browser recipes come with `src/browser/`.
 */
import { Duration, Effect, Schema } from "effect"
import * as JobHandler from "../runtime/JobHandler.ts"

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
  echo: Effect.map(JobHandler.JobContext, (ctx) => ctx.payload)
})
