/**
 * JobActor (`job:<uuid>`): lives on the node of the worker that claimed the job — the claim
 * statement itself places it there — so `cancel` and `resume` reach the machine holding the
 * job's handler (and its browser). Its state is the run of the job on that node (`job/Runs`)
 * and the job's row; the actor itself keeps nothing and can be passivated freely.
 *
 * `JobActor` is the protocol anyone can address (the front desk does, without a worker);
 * `host(runs)` and `layer` give it its behaviour on a node that runs jobs.
 */
import { Effect, Layer, Schema } from "effect"
import { PersistenceError } from "../protocol/Errors.ts"
import { Conflict, isTerminal, JobErrorCode, JobState, NotFound, Resolution } from "../protocol/Jobs.ts"
import * as Actor from "../runtime/core/Actor.ts"
import { Node } from "../runtime/core/Node.ts"
import { Runs, type Service as RunsService } from "./job/Runs.ts"

export { JobState } from "../protocol/Jobs.ts"

/** Stop the job now: interrupt its handler and record `cancelled`. */
export class Cancel extends Schema.TaggedRequest<Cancel>()("Cancel", {
  failure: Schema.Union(Conflict, NotFound, PersistenceError),
  success: JobState,
  payload: { reason: Schema.String }
}) {}

/** Continue a `needs_human` job with a human's resolution. */
export class Resume extends Schema.TaggedRequest<Resume>()("Resume", {
  failure: Schema.Union(Conflict, NotFound, PersistenceError),
  success: JobState,
  payload: { resolution: Resolution }
}) {}

/** The messages of a JobActor. */
export const Message = Schema.Union(Cancel, Resume)
export type Message = typeof Message.Type

/** The JobActor protocol: address a job's actor with `node.ref(JobActor, jobId)`. */
export const JobActor = Actor.make("job", { schema: Message, idleTimeout: "1 minute", capacity: 1000 })

/** The JobActor with its behaviour over the runs of this node. */
export const host = (runs: RunsService) =>
  Actor.host(JobActor, (address) =>
    Effect.succeed({
      Cancel: ({ reason }) => cancel(runs, address.key, reason),
      Resume: ({ resolution }) => resume(runs, address.key, resolution)
    })
  )

/** Host JobActors on the node, over its runs. */
export const layer: Layer.Layer<never, never, Node | Runs> = Layer.effectDiscard(
  Effect.flatMap(Effect.all([Node, Runs]), ([node, runs]) => node.register(host(runs)))
)

// --- Behaviour ---

type Answer = Effect.Effect<JobState, Conflict | NotFound | PersistenceError>

/** Interrupt the job's handler; answered once its end is recorded. */
const cancel = (runs: RunsService, jobId: string, reason: string): Answer =>
  Effect.gen(function* () {
    const final = yield* runs.cancel(jobId, reason)
    if (final === undefined) return yield* cancelOrphan(runs, jobId, reason)
    if (final.status !== "cancelled") {
      return yield* new Conflict({
        job_id: jobId,
        status: final.status,
        reason: "it ended before the cancel reached it"
      })
    }
    return final
  })

/** A cancel for a job this node does not run in memory: settle it from its row. */
const cancelOrphan = (runs: RunsService, jobId: string, reason: string): Answer =>
  Effect.gen(function* () {
    const owner = yield* runs.storage.owner(jobId)
    if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
    if (owner.status === "queued" || isTerminal(owner.status)) {
      return yield* new Conflict({ job_id: jobId, status: owner.status, reason: "it is not running" })
    }
    // Handed here and started meanwhile (its NOTIFY arrived during the read): cancel the run.
    const started = runs.get(jobId)
    if (started?.epoch === owner.attempts && started.fiber !== undefined) return yield* cancel(runs, jobId, reason)
    // Not started: it must not start when its NOTIFY comes, and its offer is spent.
    runs.slots.markSeen(jobId, owner.attempts)
    const written = yield* runs.storage.finish(jobId, owner.attempts, {
      status: "cancelled",
      errorCode: JobErrorCode.cancelled,
      errorMessage: reason,
      eventType: "job_cancelled",
      message: `Cancelled (no handler was running it on ${runs.workerId}): ${reason}`,
      metadata: { worker_id: owner.worker_id, node_id: runs.nodeId, reason }
    })
    if (!written) {
      return yield* new Conflict({ job_id: jobId, status: "changed", reason: "it changed while cancelling" })
    }
    // Started during the write after all: stop it (the row says cancelled already).
    runs.stopAttempt(jobId, owner.attempts, { _tag: "Lost" })
    runs.slots.reconcile()
    return runs.stateOf(jobId, "cancelled", owner.worker_id)
  })

/** Hand a human's resolution to the handler waiting for it. */
const resume = (runs: RunsService, jobId: string, resolution: Resolution): Answer =>
  Effect.gen(function* () {
    const run = runs.get(jobId)
    if (run === undefined) {
      const owner = yield* runs.storage.owner(jobId)
      if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
      return yield* new Conflict({
        job_id: jobId,
        status: owner.status,
        reason:
          owner.status === "needs_human" ? "no handler is waiting for it any more" : "it is not waiting for a human"
      })
    }
    return yield* runs.resume(run, resolution)
  })
