/**
 * Actor kinds of the benchmarks: small on purpose, so that what is measured is the runtime.
 */
import { Effect, Schema } from "effect"
import * as Actor from "../../src/runtime/core/Actor.ts"

/** A numbered message carrying the sender's `performance.now()` at the call of `tell`. */
export class Ping extends Schema.TaggedRequest<Ping>()("Ping", {
  failure: Schema.Never,
  success: Schema.Void,
  payload: { seq: Schema.Number, t: Schema.Number }
}) {}

/** What the sink does with a message; the benchmark swaps it per phase (same process as the sender). */
export const sink = {
  onPing: (_seq: number, _sentAt: number, _startedAt: number): void => {}
}

/** Hands every Ping to `sink.onPing` with the time the handler started. */
export const Sink = Actor.make("sink", {
  schema: Ping,
  idleTimeout: "1 hour",
  capacity: 1_000_000,
  behavior: () =>
    Effect.succeed({
      Ping: (m: Ping) =>
        Effect.sync(() => {
          sink.onPing(m.seq, m.t, performance.now())
        })
    })
})

/** One message, nothing kept: the smallest actor, for the memory measurement. */
export class Touch extends Schema.TaggedRequest<Touch>()("Touch", {
  failure: Schema.Never,
  success: Schema.Void,
  payload: {}
}) {}

export const Tiny = Actor.make("tiny", {
  schema: Touch,
  idleTimeout: "1 hour",
  behavior: () => Effect.succeed({ Touch: () => Effect.void })
})
