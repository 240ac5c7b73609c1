/**
 * WorkerActor (`worker:<worker_id>`): one per worker process, on its own node. It answers
 * the operator's and client app's requests to drain or deregister the worker, and reports
 * its status. The worker's loop (claiming, running, heartbeats) is `runtime/Worker.ts`.
 */
import { Effect, Schema } from "effect"
import { DeregisterResult } from "../protocol/Jobs.ts"
import * as Actor from "../runtime/core/Actor.ts"

/** Re-exported from the protocol. */
import { WorkerState } from "../protocol/Jobs.ts"

export { WorkerState }

/** Finish the current jobs, claim no more. */
export class Drain extends Schema.TaggedRequest<Drain>()("Drain", {
  failure: Schema.Never,
  success: WorkerState,
  payload: { reason: Schema.String }
}) {}

/** Take the worker out of service (see `DeregisterRequest`). */
export class Deregister extends Schema.TaggedRequest<Deregister>()("Deregister", {
  failure: Schema.Never,
  success: DeregisterResult,
  payload: {
    reason: Schema.String,
    cancel_active_jobs: Schema.Boolean,
    drain_timeout_seconds: Schema.Number
  }
}) {}

/** Report the worker's state. */
export class Status extends Schema.TaggedRequest<Status>()("Status", {
  failure: Schema.Never,
  success: WorkerState,
  payload: {}
}) {}

/** The messages of a WorkerActor. */
export const Message = Schema.Union(Drain, Deregister, Status)
export type Message = typeof Message.Type

/** What the worker offers its actor. */
export interface Control {
  readonly drain: (reason: string) => Effect.Effect<WorkerState>
  readonly deregister: (request: Omit<Deregister, "_tag">) => Effect.Effect<DeregisterResult>
  readonly status: Effect.Effect<WorkerState>
}

/** The WorkerActor kind, over this process's worker. */
export const kind = (control: Control) =>
  Actor.make<Message>("worker", {
    schema: Message,
    idleTimeout: "10 minutes",
    behavior: () =>
      Effect.succeed({
        Drain: ({ reason }) => control.drain(reason),
        Deregister: (request) => control.deregister(request),
        Status: () => control.status
      })
  })
