/**
 * The `troupe` command.
 */
import { Command, ValidationError } from "@effect/cli"
import { NodeContext, NodeRuntime } from "@effect/platform-node"
import { Cause, Console, Effect, Exit } from "effect"
import * as Inspect from "./Inspect.ts"
import * as Start from "./Start.ts"

const troupe = Command.make("troupe").pipe(
  Command.withDescription("troupe: an actor runtime on Postgres for a fleet of browser-automation workers"),
  Command.withSubcommands([Start.command, Inspect.command])
)

const cli = Command.run(troupe, { name: "troupe", version: "0.1.0" })

/** Print what went wrong as one readable line, and exit non-zero. */
const report = <A, E, R>(self: Effect.Effect<A, E, R>) =>
  Effect.onExit(self, (exit) => {
    if (Exit.isSuccess(exit) || Cause.isInterruptedOnly(exit.cause)) return Effect.void
    const failure = Cause.failureOption(exit.cause)
    const error = failure._tag === "Some" ? failure.value : Cause.squash(exit.cause)
    const tag = (error as { _tag?: string })?._tag
    // @effect/cli has printed what was wrong with the arguments already.
    if (ValidationError.isValidationError(error) || tag === "HelpDoc")
      return Effect.sync(() => (process.exitCode = 2))
    const message =
      error instanceof Error || (error && typeof (error as Error).message === "string")
        ? (error as Error).message
        : String(error)
    return Console.error(`troupe: ${message}`).pipe(
      Effect.zipRight(Effect.sync(() => (process.exitCode = 1)))
    )
  })

// runMain handles the first SIGINT/SIGTERM (a graceful stop) and then drops its handlers,
// so a second signal would kill us outright and strand the embedded Postgres. A second
// signal a while after the first (not the duplicate a terminal plus npm deliver together)
// forces the stop through `process.exit`, whose hook still stops the embedded server.
let firstSignalAt = 0
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    const now = Date.now()
    if (firstSignalAt === 0) firstSignalAt = now
    else if (now - firstSignalAt > 500) {
      process.stderr.write("troupe: forced stop\n")
      process.exit(130)
    }
  })
}

cli(process.argv).pipe(
  report,
  Effect.catchAllCause(() => Effect.void),
  Effect.provide(NodeContext.layer),
  (effect) => NodeRuntime.runMain(effect, { disableErrorReporting: true })
)
