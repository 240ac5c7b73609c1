/**
 * JobActor (`job:<uuid>`): lives on the node of the worker that claimed the job — the claim
 * statement itself places it there — so `cancel` and `resume` reach the machine holding the
 * job's handler (and its browser). Its state is the worker's in-memory run of the job and
 * the job's row; the actor itself keeps nothing and can be passivated freely.
 */
import { Effect, Schema } from "effect"
import { Conflict, NotFound, Resolution } from "../protocol/Jobs.ts"
import * as Actor from "../runtime/core/Actor.ts"

/** Re-exported from the protocol. */
import { JobState } from "../protocol/Jobs.ts"

export { JobState }

/** Stop the job now: interrupt its handler and record `cancelled`. */
export class Cancel extends Schema.TaggedRequest<Cancel>()("Cancel", {
  failure: Schema.Union(Conflict, NotFound),
  success: JobState,
  payload: { reason: Schema.String }
}) {}

/** Continue a `needs_human` job with a human's resolution. */
export class Resume extends Schema.TaggedRequest<Resume>()("Resume", {
  failure: Schema.Union(Conflict, NotFound),
  success: JobState,
  payload: { resolution: Resolution }
}) {}

/** The messages of a JobActor. */
export const Message = Schema.Union(Cancel, Resume)
export type Message = typeof Message.Type

/** What the worker that runs jobs on this node offers its JobActors. */
export interface Runs {
  readonly cancel: (jobId: string, reason: string) => Effect.Effect<JobState, Conflict | NotFound>
  readonly resume: (jobId: string, resolution: Resolution) => Effect.Effect<JobState, Conflict | NotFound>
}

/** The JobActor kind, over the worker of this node. */
export const kind = (runs: Runs) =>
  Actor.make("job", {
    schema: Message,
    idleTimeout: "1 minute",
    capacity: 1000,
    behavior: (address) =>
      Effect.succeed({
        Cancel: ({ reason }) => runs.cancel(address.key, reason),
        Resume: ({ resolution }) => runs.resume(address.key, resolution)
      })
  })
