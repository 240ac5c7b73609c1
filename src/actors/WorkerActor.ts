/**
 * WorkerActor (`worker:<worker_id>`): one per worker process, on its own node, and the
 * worker itself. It registers in `gh_worker_registry`, claims jobs when woken (NOTIFY on
 * `jobs:<node>` for jobs aimed at it, `jobs:any` for the rest, a slow poll as a fallback),
 * starts them as runs of this node (`job/Runs`), heartbeats, and answers the operator's and
 * client app's requests to drain or deregister it, and its status.
 *
 * Stopping the worker (closing its scope) abandons running jobs without a write: the reaper
 * sees the node gone and requeues or fails them, as after a crash.
 */
import type { SqlClient } from "@effect/sql"
import { Cause, Context, Duration, Effect, FiberSet, Layer, Queue, Runtime, Schema, type Scope } from "effect"
import { PersistenceError } from "../protocol/Errors.ts"
import * as Notifications from "../protocol/Notifications.ts"
import { DeregisterResult, WorkerState } from "../protocol/Jobs.ts"
import * as Actor from "../runtime/core/Actor.ts"
import { Node, type TroupeNode } from "../runtime/core/Node.ts"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"
import { makeFailures } from "../runtime/core/internal/loop.ts"
import * as JobStorage from "../runtime/jobs/JobStorage.ts"
import * as WorkerStorage from "../runtime/jobs/WorkerStorage.ts"
import * as JobActor from "./JobActor.ts"
import * as Runs from "./job/Runs.ts"
import * as Slots from "./job/Slots.ts"

export { WorkerState } from "../protocol/Jobs.ts"

/** Finish the current jobs, claim no more. */
export class Drain extends Schema.TaggedRequest<Drain>()("Drain", {
  failure: PersistenceError,
  success: WorkerState,
  payload: { reason: Schema.String }
}) {}

/** Take the worker out of service (see `DeregisterRequest`). */
export class Deregister extends Schema.TaggedRequest<Deregister>()("Deregister", {
  failure: PersistenceError,
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

/** The WorkerActor protocol: address a worker with `node.ref(WorkerActor, workerId)`. */
export const WorkerActor = Actor.make<Message>("worker", { schema: Message, idleTimeout: "10 minutes" })

/** How a worker is set up. */
export interface Options {
  /** `GH_WORKER_ID`; default `worker-<node id>`. */
  readonly workerId?: string
  /** The sandbox id the client app knows this worker by (`target_worker_id`). */
  readonly targetWorkerId?: string | null
  readonly ec2InstanceId?: string | null
  readonly ec2Ip?: string | null
  /** `MAX_CONCURRENT_JOBS` (default 1). */
  readonly maxConcurrent?: number
  readonly handlers: JobHandler.Handlers
  readonly prices?: JobHandler.PriceTable
  /** Heartbeat period (default 10 s). */
  readonly heartbeat?: Duration.DurationInput
  /** Fallback poll when no NOTIFY arrives (default 5 s). */
  readonly pollInterval?: Duration.DurationInput
  /** How long writes about a job retry while the database is unreachable (default 60 s). */
  readonly retryWritesFor?: Duration.DurationInput
}

/** Counters of a worker. */
export interface Stats extends Slots.Counters {
  readonly running: number
}

/** A running worker. */
export interface Worker {
  readonly workerId: string
  readonly nodeId: string
  /** Where it runs (`EC2_INSTANCE_ID`, `EC2_IP`), as registered. */
  readonly ec2InstanceId: string | null
  readonly ec2Ip: string | null
  /** When it registered (ms since the epoch). */
  readonly startedAt: number
  readonly drain: (reason: string) => Effect.Effect<WorkerState, PersistenceError>
  readonly deregister: (request: Omit<Deregister, "_tag">) => Effect.Effect<DeregisterResult, PersistenceError>
  readonly status: Effect.Effect<WorkerState>
  readonly stats: () => Stats
  readonly runningJobIds: () => ReadonlyArray<string>
  /** Claim now (tests; NOTIFY does this in production). */
  readonly wake: () => void
}

/** Start a worker on a node for the lifetime of the scope; it hosts the node's JobActors. */
export const make = (
  node: TroupeNode,
  options: Options
): Effect.Effect<Worker, PersistenceError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const storage = yield* JobStorage.make({ prepared: node.prepared })
    const workers = yield* WorkerStorage.make
    const nodeId = node.id
    const workerId = options.workerId ?? `worker-${nodeId}`
    const registration: WorkerStorage.WorkerRegistration = {
      workerId,
      nodeId,
      targetWorkerId: options.targetWorkerId ?? null,
      ec2InstanceId: options.ec2InstanceId ?? null,
      ec2Ip: options.ec2Ip ?? null,
      maxConcurrent: Math.max(1, options.maxConcurrent ?? 1)
    }
    const retryWritesFor = Duration.decode(options.retryWritesFor ?? "60 seconds")
    const retryWrites = Runs.retryWritesSchedule(retryWritesFor)
    const pollInterval = Duration.decode(options.pollInterval ?? "5 seconds")
    const pollMillis = Duration.toMillis(pollInterval)
    let state: "active" | "draining" | "offline" = "active"
    // The drain is in memory at once (no claim after it); its writes are done again by the
    // next drain or deregister until they have succeeded.
    let drainWritten = false
    let stopping = false

    const slots = yield* Slots.make(registration.maxConcurrent)
    const counters = slots.counters
    const runs = yield* Runs.make({
      registration,
      storage,
      slots,
      handlers: options.handlers,
      prices: options.prices ?? JobHandler.defaultPrices,
      retryWritesFor,
      stopping: () => stopping,
      browserAt: (sessionId, url) => workers.setBrowser(workerId, sessionId, url)
    })

    // --- Hand-off: jobs a submit gave this worker directly ---

    // Jobs handed to this worker by a submit (the NOTIFY on `jobs:<node>`), to start.
    const handed = yield* Queue.unbounded<Notifications.Pushed>()
    // A handed job that travels whole is started from its NOTIFY callback, not through the
    // claim loop (measured in 45cc638: notify → handler p50 0.70–0.80 → 0.56–0.65 ms).
    const startNow = Runtime.runFork(yield* Effect.runtime<never>())
    const onNodeJobs = (payload: string) => {
      const pushed = Notifications.decodeJobsPayload(payload)
      if (pushed === undefined) return slots.wake()
      if (pushed.worker_id !== workerId) return
      // A cancel pushed ahead of its routed request (`JobStorage.cancelOrLocate`): interrupt
      // the attempt now. The routed request that follows gets the answer: a `Conflict` naming
      // `cancelled` once the run has ended, which the front desk answers as done.
      if ("cancel" in pushed) return runs.stopAttempt(pushed.id, pushed.attempts, { _tag: "Cancel", reason: pushed.reason })
      if (pushed.fetch === true) {
        // Sent by id only (too large for a NOTIFY): the claim loop reads it.
        handed.unsafeOffer(pushed)
        slots.signal()
        return
      }
      // The whole job is here: start it now (the accounting is synchronous, so this and the
      // claim loop cannot start one attempt twice).
      startNow(
        adopt([pushed], true).pipe(
          Effect.catchAllCause((cause) => Effect.logError(`handed job ${pushed.id} not started`, cause))
        )
      )
    }

    /** Start jobs handed over by submits, each attempt once (`direct`: from its NOTIFY). */
    const adopt = (items: ReadonlyArray<Notifications.Pushed>, direct = false) =>
      Effect.gen(function* () {
        const rows: Array<Notifications.Claimed> = []
        for (const item of items) {
          // Seen: started already (a catch-up came first), or cancelled here before it arrived;
          // either way a catch-up is due or done, and it recounts the offers.
          if (slots.isSeen(item.id, item.attempts)) continue
          if (direct) {
            slots.spent++
            slots.signal()
          } else slots.offered = Math.max(0, slots.offered - 1)
          counters.handed++
          if (stopping) continue
          if (item.fetch === true) {
            const row = yield* storage.readHanded(registration, item.id, item.attempts)
            if (row !== undefined) rows.push(row)
          } else rows.push(item)
        }
        yield* runs.launch(rows)
      })
    const startHanded = Effect.flatMap(Queue.takeAll(handed), (items) => adopt([...items]))

    // --- Claiming ---

    const lending = () => state === "active" && !stopping

    // Claim while the queue fills the free slots; lend the slots it cannot fill.
    const claimAll = Effect.gen(function* () {
      while (state === "active" && !stopping) {
        const free = slots.free()
        if (free <= 0 && slots.offered === 0) break
        const claimed = yield* storage.claim(registration, Math.max(0, free), {
          withdraw: slots.offered > 0,
          lend: lending()
        })
        counters.claims++
        slots.offered += claimed.lent - claimed.withdrawn
        yield* runs.launch(claimed.rows)
        // Again only while the queue filled every slot asked for (none asked: the offers
        // were all taken, and their jobs are on the way here).
        const asked = Math.max(0, free) + claimed.withdrawn
        if (asked === 0 || claimed.rows.length < asked) break
      }
    })

    // After a reconnect or a quiet poll period (a NOTIFY may have been missed): take back
    // every offer, then start what was handed here and never started. Once the offers are
    // gone no submit can take one, and every one taken is committed, so the count is exact.
    let lastReconcile = Date.now()
    const reconcile = Effect.gen(function* () {
      lastReconcile = Date.now()
      yield* storage.withdraw(registration)
      const rows = yield* storage.handedNotStarted(registration, runs.jobIds())
      // Exact now: the offers spent meanwhile were taken before the withdraw.
      slots.offered = 0
      slots.spent = 0
      if (!stopping && state !== "offline") counters.handed += yield* runs.launch(rows)
      slots.claimWanted = true
    })

    const claimFailures = makeFailures("claiming jobs")
    const claimStep = Effect.gen(function* () {
      slots.settleSpent()
      yield* startHanded
      // At least every poll interval, also under a steady stream of wake-ups.
      if (slots.reconcileWanted || Date.now() - lastReconcile >= pollMillis) {
        slots.reconcileWanted = false
        yield* reconcile
      }
      if (slots.claimWanted) {
        slots.claimWanted = false
        yield* claimAll
      }
      yield* claimFailures.succeeded
    }).pipe(
      Effect.catchAll((e) =>
        Effect.zipRight(
          claimFailures.failed(e),
          // What failed is done again in full: the offers may be off by the failed statement.
          Effect.sync(() => slots.reconcile())
        )
      )
    )

    // --- Control (the WorkerActor's requests) ---

    const status = Effect.sync(
      (): WorkerState => ({
        worker_id: workerId,
        node_id: nodeId,
        status: state,
        active_job_ids: runs.jobIds(),
        max_concurrent: registration.maxConcurrent
      })
    )

    const drain = (reason: string) =>
      Effect.gen(function* () {
        if (state === "active") state = "draining"
        if (state === "draining" && !drainWritten) {
          yield* workers
            .setStatus(workerId, "draining", "worker_draining", `Draining: ${reason}`, { reason })
            .pipe(Effect.retry(retryWrites))
          yield* storage.closeTarget([workerId], "is draining").pipe(Effect.retry(retryWrites))
          // Jobs handed over before this still arrive and run, as a claim just before would.
          const withdrawn = yield* storage.withdraw(registration).pipe(Effect.retry(retryWrites))
          slots.offered = Math.max(0, slots.offered - withdrawn)
          drainWritten = true
        }
        return yield* status
      })

    const deregister = (request: Omit<Deregister, "_tag">) =>
      Effect.gen(function* () {
        yield* drain(request.reason)
        // Jobs handed here whose NOTIFY is still on its way count as active: start them now
        // (the drain took the offers back, so this is all of them), then wait or cancel.
        const pending = yield* storage.handedNotStarted(registration, runs.jobIds()).pipe(Effect.retry(retryWrites))
        const started = yield* runs.launch(pending)
        slots.offered = Math.max(0, slots.offered - started)
        counters.handed += started
        const cancelled: Array<string> = []
        const cancelAll = Effect.forEach(
          runs.jobIds(),
          (id) =>
            Effect.map(runs.cancel(id, `worker ${workerId} deregistered: ${request.reason}`), (final) => {
              if (final?.status === "cancelled") cancelled.push(id)
            }),
          { concurrency: "unbounded", discard: true }
        )
        if (!request.cancel_active_jobs) {
          yield* runs.idle.pipe(Effect.timeout(Duration.seconds(request.drain_timeout_seconds)), Effect.ignore)
        }
        yield* cancelAll
        state = "offline"
        yield* workers
          .setStatus(workerId, "offline", "worker_deregistered", `Deregistered: ${request.reason}`, {
            reason: request.reason,
            cancelled_job_ids: cancelled
          })
          .pipe(Effect.retry(retryWrites))
        return { worker_ids: [workerId], cancelled_job_ids: cancelled } satisfies DeregisterResult
      })

    // --- Start ---

    // Jobs an earlier process with this node id left live (it crashed and came back before
    // any reaper saw it dead): settle them now, as the reaper would have.
    const leftovers = yield* storage.reap({
      staleSeconds: 30,
      graceSeconds: 5,
      backoffBaseMs: 250,
      backoffMaxMs: 30_000,
      deadNode: nodeId
    })
    for (const r of leftovers) if (r.status === "queued") yield* JobStorage.wakeLater(storage, r.run_in_ms)
    yield* workers.register(registration)
    const worker: Worker = {
      workerId,
      nodeId,
      ec2InstanceId: registration.ec2InstanceId,
      ec2Ip: registration.ec2Ip,
      startedAt: Date.now(),
      drain,
      deregister,
      status,
      wake: () => slots.wake(),
      stats: () => ({ running: runs.size(), ...counters }),
      runningJobIds: runs.jobIds
    }
    yield* node.register(JobActor.host(runs))
    yield* node.spawn(host(worker), workerId)

    yield* node.listen(Notifications.nodeJobsChannel(nodeId), onNodeJobs)
    yield* node.listen(Notifications.anyJobsChannel, () => slots.wake())
    yield* node.onReconnect(() => slots.reconcile())
    // A quiet poll interval ends the wait: `claimStep` then catches up (a poll interval has passed).
    yield* slots.signalled(pollInterval).pipe(
      Effect.zipRight(claimStep),
      Effect.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause) ? Effect.failCause(cause) : Effect.logError("claim loop", cause)
      ),
      Effect.forever,
      Effect.interruptible,
      Effect.annotateLogs({ fiber: "claim" }),
      FiberSet.run(runs.fibers)
    )
    const heartbeatEvery = Duration.decode(options.heartbeat ?? "10 seconds")
    yield* Effect.gen(function* () {
      const alive = yield* workers.heartbeat(workerId, {
        status: state === "active" ? (runs.size() > 0 ? "busy" : "idle") : state,
        current_job_id: runs.jobIds()[0] ?? null,
        active_jobs: runs.size(),
        memory_usage: process.memoryUsage().rss
      })
      if (!alive && state !== "offline" && !stopping) {
        // Taken for dead during a blip (its lock session dropped): register again.
        yield* Effect.logWarning("marked offline while running: registering again")
        yield* workers.register(registration)
        if (state === "draining") {
          yield* workers.setStatus(workerId, "draining", "worker_draining", "Draining (registered again)", {})
        }
        slots.reconcile()
      }
    }).pipe(
      Effect.catchAllCause((c) => Effect.logWarning("heartbeat failed", c)),
      Effect.delay(heartbeatEvery),
      Effect.forever,
      Effect.interruptible,
      Effect.annotateLogs({ fiber: "heartbeat" }),
      FiberSet.run(runs.fibers)
    )
    slots.wake()

    // Stopping (runs first: added last): abandon running jobs without a write, leave the
    // registry. The reaper requeues or fails what was running, as after a crash.
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        stopping = true
        yield* storage.withdraw(registration).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        yield* FiberSet.clear(runs.fibers)
        if (state !== "offline") {
          yield* workers
            .setStatus(workerId, "offline", "worker_deregistered", "Worker stopped", { reason: "shutdown" })
            .pipe(Effect.timeout("5 seconds"), Effect.ignore)
          yield* storage.closeTarget([workerId], "stopped").pipe(Effect.timeout("5 seconds"), Effect.ignore)
        }
      })
    )
    return worker
  }).pipe(Effect.annotateLogs({ module: "WorkerActor", worker: options.workerId ?? `worker-${node.id}` }))

/** The WorkerActor with its behaviour over this process's worker. */
export const host = (worker: Worker) =>
  Actor.host(WorkerActor, () =>
    Effect.succeed({
      Drain: ({ reason }) => worker.drain(reason),
      Deregister: (request) => worker.deregister(request),
      Status: () => worker.status
    })
  )

/** The worker of this process (provided by `layer`). */
export class WorkerTag extends Context.Tag("troupe/actors/Worker")<WorkerTag, Worker>() {}

/** Run a worker on the process's node for the layer's lifetime. */
export const layer = (options: Options): Layer.Layer<WorkerTag, PersistenceError, Node | SqlClient.SqlClient> =>
  Layer.scoped(WorkerTag, Effect.flatMap(Node, (node) => make(node, options)))
