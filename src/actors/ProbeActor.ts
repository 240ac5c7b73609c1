/**
 * The probe: one per node (`probe:<node id>`), answering `Ping` with where it ran. Operators
 * use it to check routing end to end (`troupe inspect send probe:<node> '{"_tag":"Ping","text":"hi"}' --ask`).
 */
import { Effect, Schema } from "effect"
import * as Actor from "../runtime/core/Actor.ts"

/** Answer with the text, the node that handled it and when. */
export class Ping extends Schema.TaggedRequest<Ping>()("Ping", {
  failure: Schema.Never,
  success: Schema.Struct({ text: Schema.String, node: Schema.String, at: Schema.String }),
  payload: { text: Schema.String }
}) {}

/** The probe kind. */
export const Probe = Actor.make("probe", {
  schema: Ping,
  behavior: (address) =>
    Effect.succeed({
      Ping: ({ text }) => Effect.sync(() => ({ text, node: address.nodeId, at: new Date().toISOString() }))
    })
})
