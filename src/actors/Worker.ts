/**
 * A worker: registers in `gh_worker_registry`, claims jobs when woken (NOTIFY on
 * `jobs:<node>` for jobs aimed at it, `jobs:any` for the rest, a slow poll as a fallback),
 * runs each job's handler on a fiber of this node, and answers its JobActors (cancel,
 * resume) and its WorkerActor (drain, deregister, status).
 *
 * Every write about a job names the attempt this worker holds, so when the reaper has
 * given the job to someone else, this worker's late writes change nothing and its handler
 * is stopped. Stopping the worker (closing its scope) abandons running jobs without a
 * write: the reaper sees the node gone and requeues or fails them, as after a crash.
 */
import type { SqlClient } from "@effect/sql"
import {
  Cause,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  FiberId,
  FiberSet,
  Option,
  Queue,
  Runtime,
  Schedule,
  type Scope
} from "effect"
import * as JobActor from "./JobActor.ts"
import * as WorkerActor from "./WorkerActor.ts"
import {
  Conflict,
  type DeregisterResult,
  type Interaction,
  isTerminal,
  JobErrorCode,
  NotFound,
  type Resolution
} from "../protocol/Jobs.ts"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"
import * as JobStorage from "../runtime/jobs/JobStorage.ts"
import type { TroupeNode } from "../runtime/core/Node.ts"

/** Options of a worker. */
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
export interface Stats {
  readonly running: number
  /** Claim statements sent (each claims up to the free slots). */
  readonly claims: number
  readonly claimed: number
  /** Jobs a submit handed to this worker directly (a slot it had on offer), no claim. */
  readonly handed: number
  readonly completed: number
  readonly failed: number
  readonly cancelled: number
  readonly abandoned: number
}

/** A running worker. */
export interface Worker extends WorkerActor.Control, JobActor.Runs {
  readonly workerId: string
  readonly nodeId: string
  /** Where it runs (`EC2_INSTANCE_ID`, `EC2_IP`), as registered. */
  readonly ec2InstanceId: string | null
  readonly ec2Ip: string | null
  /** When it registered (ms since the epoch). */
  readonly startedAt: number
  readonly stats: () => Stats
  readonly runningJobIds: () => ReadonlyArray<string>
  /** Claim now (tests; NOTIFY does this in production). */
  readonly wake: () => void
}

/** Start a worker on a node for the lifetime of the scope. */
export const make = (
  node: TroupeNode,
  options: Options
): Effect.Effect<Worker, unknown, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const storage = yield* JobStorage.makeWith({ prepared: node.prepared })
    const nodeId = node.id
    const workerId = options.workerId ?? `worker-${nodeId}`
    const maxConcurrent = Math.max(1, options.maxConcurrent ?? 1)
    const prices = options.prices ?? JobHandler.defaultPrices
    const registration: JobStorage.WorkerRegistration = {
      workerId,
      nodeId,
      targetWorkerId: options.targetWorkerId ?? null,
      ec2InstanceId: options.ec2InstanceId ?? null,
      ec2Ip: options.ec2Ip ?? null,
      maxConcurrent
    }
    const retryWrites = Schedule.exponential("20 millis").pipe(
      Schedule.union(Schedule.spaced("2 seconds")),
      Schedule.upTo(Duration.decode(options.retryWritesFor ?? "60 seconds"))
    )
    const pollInterval = Duration.decode(options.pollInterval ?? "5 seconds")
    const pollMillis = Duration.toMillis(pollInterval)
    const counters = { claims: 0, claimed: 0, handed: 0, completed: 0, failed: 0, cancelled: 0, abandoned: 0 }
    let state: "active" | "draining" | "offline" = "active"
    let stopping = false

    // --- Runs ---

    type Stop =
      | { readonly _tag: "Cancel"; readonly reason: string }
      | { readonly _tag: "Timeout" }
      | { readonly _tag: "Lost" }

    interface Run {
      readonly id: string
      readonly epoch: number
      readonly row: JobStorage.Claimed
      readonly startedAt: number
      readonly lock: Effect.Semaphore
      /** How the attempt ended, once it has; `outcome` is made only when someone waits for it. */
      final: JobActor.JobState | undefined
      outcome: Deferred.Deferred<JobActor.JobState> | undefined
      /** Resolved once `job_started` is written: the attempt's own writes wait for it, so events stay in order. */
      readonly ready: Deferred.Deferred<void>
      fiber: Fiber.RuntimeFiber<void> | undefined
      /** Its fiber has begun `program` (see `stopRun`). */
      begun: boolean
      timer: Fiber.RuntimeFiber<void> | undefined
      status: "running" | "needs_human" | "deciding"
      resume: Deferred.Deferred<Resolution> | undefined
      stop: Stop | undefined
      cost: JobHandler.Cost
      costDirty: boolean
      progress: JobHandler.Progress | undefined
    }

    const runs = new Map<string, Run>()
    // Handlers running now: a slot frees when the handler returns, before its end is recorded,
    // so claiming overlaps with recording (measured: claim → run → record in series capped
    // no-op throughput at ~3.8k jobs/s).
    let busy = 0
    // Made before `fibers`, so it stops after them: a job concluding during a stop still gets its answer.
    const writers = yield* FiberSet.make<void, never>()
    const fibers = yield* FiberSet.make<void, never>()
    const idle = yield* Effect.makeLatch(true)
    // The claim loop is the one fiber that claims, lends and starts handed jobs; it runs
    // when signalled, doing what the flags ask.
    const signals = yield* Queue.sliding<void>(1)
    let claimWanted = false
    let reconcileWanted = false
    const wake = () => {
      claimWanted = true
      signals.unsafeOffer(undefined)
    }
    // Slots on offer (`job_offers`) and not yet withdrawn, or taken by a submit whose job has
    // not arrived here yet: busy + offered never exceeds maxConcurrent.
    let offered = 0
    // Jobs handed to this worker by a submit (the NOTIFY on `jobs:<node>`), to start.
    const handed = yield* Queue.unbounded<JobStorage.Pushed>()
    // Attempts started here (or cancelled here before they started), newest last: a handed
    // job is started once, whether its NOTIFY or a catch-up (`reconcile`) brings it first.
    const seen = new Set<string>()
    const seenLimit = 10_000
    const isSeen = (id: string, epoch: number) => seen.has(`${id}:${epoch}`)
    const markSeen = (id: string, epoch: number) => {
      seen.add(`${id}:${epoch}`)
      if (seen.size > seenLimit) seen.delete(seen.values().next().value!)
    }
    const startNow = Runtime.runFork(yield* Effect.runtime<never>())
    const onNodeJobs = (payload: string) => {
      const pushed = JobStorage.parsePushed(payload)
      if (pushed === undefined) return wake()
      if (pushed.worker_id !== workerId) return
      if ("cancel" in pushed) return cancelNow(pushed)
      if (pushed.fetch === true) {
        // Sent by id only (too large for a NOTIFY): the claim loop reads it.
        handed.unsafeOffer(pushed)
        signals.unsafeOffer(undefined)
        return
      }
      // The whole job is here: start it now, without a hop through the claim loop (its
      // accounting is synchronous, so the two cannot start one attempt twice).
      startNow(
        adopt([pushed], true).pipe(
          Effect.catchAllCause((cause) =>
            Effect.logError(`worker ${workerId}: handed job ${pushed.id} not started`, cause)
          )
        )
      )
    }
    /**
     * A cancel pushed ahead of its routed request (`JobStorage.cancelOrLocate`): interrupt
     * the attempt now, as `cancel` would. The routed request that follows gets the answer: a
     * `Conflict` naming `cancelled` once the run has ended, which `Jobs.cancel` answers as done.
     */
    const cancelNow = (push: JobStorage.CancelPush) =>
      stopAttempt(push.id, push.attempts, { _tag: "Cancel", reason: push.reason })
    /** Stop this attempt's handler, if it runs here (`stopRun`). */
    const stopAttempt = (jobId: string, epoch: number, stop: Stop) => {
      const run = runs.get(jobId)
      if (run !== undefined && run.epoch === epoch && run.fiber !== undefined) stopRun(run, stop)
    }
    /**
     * Stop a run's handler for this reason (the first reason given stands). A fiber
     * interrupted before it begins ends without running `program`, so the run would stay
     * busy and unanswered for good (a cancel push can come in the same read as its job's
     * NOTIFY): before it begins, `program` sees the stop and skips the handler instead.
     */
    const stopRun = (run: Run, stop: Stop) => {
      if (run.stop === undefined) run.stop = stop
      if (run.begun) run.fiber?.unsafeInterruptAsFork(FiberId.none)
    }

    // --- Ending attempts, batched ---

    // Handlers that return together end in one statement (measured: one statement per job
    // capped no-op throughput at the database round trip).
    interface Ending {
      readonly jobId: string
      readonly epoch: number
      readonly outcome: JobStorage.Outcome
      readonly cost: JobHandler.Cost
      readonly done: (ended: boolean) => void
    }
    const endings = yield* Queue.unbounded<Ending>()
    const writeEnds = (items: ReadonlyArray<Ending>) => Effect.suspend(() => storage.finishMany(items))
    const answer = (items: ReadonlyArray<Ending>, ended: (i: Ending) => boolean) =>
      Effect.sync(() => {
        for (const i of items) i.done(ended(i))
      })
    yield* Queue.takeBetween(endings, 1, 500).pipe(
      Effect.flatMap((chunk) => {
        const items = [...chunk]
        return writeEnds(items).pipe(
          Effect.retry(Schedule.exponential("20 millis").pipe(Schedule.intersect(Schedule.recurs(3)))),
          Effect.flatMap((ended) => answer(items, (i) => ended.has(i.jobId))),
          // One bad item must not sink the batch: write them one by one, each with the full retry.
          Effect.catchAllCause(() =>
            Effect.forEach(
              items,
              (item) =>
                writeEnds([item]).pipe(
                  Effect.retry(retryWrites),
                  Effect.flatMap((ended) => answer([item], () => ended.has(item.jobId))),
                  Effect.catchAllCause((cause) =>
                    Effect.zipRight(
                      Effect.logError(
                        `worker ${workerId}: could not record the end of job ${item.jobId}`,
                        cause
                      ),
                      answer([item], () => false)
                    )
                  )
                ),
              { discard: true }
            )
          )
        )
      }),
      Effect.forever,
      Effect.interruptible,
      FiberSet.run(writers)
    )
    const finish = (run: Run, outcome: JobStorage.Outcome) =>
      Effect.async<boolean>((resume) => {
        endings.unsafeOffer({
          jobId: run.id,
          epoch: run.epoch,
          outcome,
          cost: run.cost,
          done: (ended) => resume(Effect.succeed(ended))
        })
      })

    /** How the attempt ended: at once when it has, else when it does. */
    const endOf = (run: Run) =>
      Effect.suspend(() => {
        if (run.final !== undefined) return Effect.succeed(run.final)
        run.outcome ??= Deferred.unsafeMake<JobActor.JobState>(FiberId.none)
        return Deferred.await(run.outcome)
      })

    const stateOf = (jobId: string, status: string, worker: string | null = workerId): JobActor.JobState => ({
      job_id: jobId,
      status,
      worker_id: worker,
      node_id: nodeId
    })

    const metadataOf = (run: Run, extra?: Record<string, unknown>) => ({
      worker_id: workerId,
      node_id: nodeId,
      attempt: run.epoch,
      elapsed_ms: Date.now() - run.startedAt,
      ...(run.progress ? { step_index: run.progress.index, total_steps: run.progress.total ?? null } : {}),
      ...extra
    })

    /** The attempt is no longer ours: stop the handler without writing. */
    const lose = (run: Run) =>
      Effect.suspend(() => {
        if (run.stop === undefined) run.stop = { _tag: "Lost" }
        return Effect.interrupt
      })

    const report = (run: Run, eventType: string, message: string, extra?: Record<string, unknown>) =>
      Effect.gen(function* () {
        yield* Deferred.await(run.ready)
        const cost = run.costDirty ? run.cost : undefined
        run.costDirty = false
        const live = yield* storage
          .report(run.id, run.epoch, eventType, message, workerId, metadataOf(run, extra), cost)
          .pipe(
            Effect.retry(Schedule.exponential("20 millis").pipe(Schedule.intersect(Schedule.recurs(5)))),
            Effect.catchAll((e) =>
              Effect.as(Effect.logWarning(`job ${run.id}: event ${eventType} not written`, e), true)
            )
          )
        if (!live) yield* lose(run)
      })

    const disarm = (run: Run) =>
      Effect.suspend(() => {
        const timer = run.timer
        run.timer = undefined
        // Not awaited: the timer may be the fiber interrupting this job right now.
        return timer ? Fiber.interruptFork(timer) : Effect.void
      })

    /** Enforce `timeout_seconds` while the job runs (paused while it waits for a human). */
    const arm = (run: Run) =>
      Effect.gen(function* () {
        yield* disarm(run)
        const seconds = run.row.timeout_seconds
        if (seconds === null) return
        run.timer = yield* Effect.sleep(Duration.seconds(seconds)).pipe(
          Effect.zipRight(
            Effect.suspend(() => {
              if (run.status !== "running" || run.stop !== undefined || run.fiber === undefined)
                return Effect.void
              return Effect.sync(() => stopRun(run, { _tag: "Timeout" }))
            })
          ),
          Effect.asVoid,
          FiberSet.run(fibers)
        )
      })

    const contextOf = (run: Run): JobHandler.JobContextShape => ({
      jobId: run.id,
      jobType: run.row.job_type,
      valetTaskId: run.row.valet_task_id,
      payload: run.row.payload,
      attempt: run.epoch,
      workerId,
      nodeId,
      report: (eventType, message, metadata) => report(run, eventType, message, metadata),
      tokensUsed: (usage) =>
        Effect.suspend(() => {
          const priced = JobHandler.priceUsage(usage, prices)
          run.cost = JobHandler.addUsage(run.cost, usage, prices)
          run.costDirty = true
          return report(run, "tokens_used", `${priced.tokens} tokens on ${usage.model}`, {
            model: usage.model,
            tokens: priced.tokens,
            cost_usd: priced.cost_usd
          })
        }),
      countAction: Effect.sync(() => {
        run.cost = { ...run.cost, action_count: run.cost.action_count + 1 }
        run.costDirty = true
      }),
      setProgress: (progress) => Effect.sync(() => (run.progress = progress)),
      needsHuman: (interaction) => needsHuman(run, interaction)
    })

    const needsHuman = (run: Run, interaction: Interaction) =>
      Effect.gen(function* () {
        const resume = yield* Deferred.make<Resolution>()
        yield* Deferred.await(run.ready)
        const paused = yield* run.lock.withPermits(1)(
          Effect.gen(function* () {
            const ok = yield* storage
              .needsHuman(run.id, run.epoch, interaction, metadataOf(run, { interaction }))
              .pipe(
                Effect.retry(retryWrites),
                Effect.orElseSucceed(() => false)
              )
            if (ok) {
              run.status = "needs_human"
              run.resume = resume
              yield* disarm(run)
            }
            return ok
          })
        )
        if (!paused) return yield* lose(run)
        const answered = yield* Deferred.await(resume).pipe(
          Effect.timeout(Duration.seconds(interaction.timeout_seconds)),
          Effect.option
        )
        if (Option.isSome(answered)) return answered.value
        const timedOut = yield* run.lock.withPermits(1)(
          Effect.sync(() => {
            if (run.status !== "needs_human") return false
            run.status = "deciding"
            return true
          })
        )
        if (!timedOut) return yield* Deferred.await(resume)
        return yield* Effect.fail(new JobHandler.HitlTimeout({ timeoutSeconds: interaction.timeout_seconds }))
      })

    /** Record how the attempt ended (the one place that writes a run's final state). */
    const conclude = (run: Run, exit: Exit.Exit<unknown, JobHandler.JobError | JobHandler.HitlTimeout>) =>
      Effect.gen(function* () {
        if (stopping || run.stop?._tag === "Lost") {
          counters.abandoned++
          return stateOf(run.id, "abandoned")
        }
        if (run.stop?._tag === "Timeout" && Exit.isFailure(exit) && Cause.isInterruptedOnly(exit.cause)) {
          const reaped = yield* storage
            .reap({
              staleSeconds: 0,
              graceSeconds: 0,
              backoffBaseMs: 250,
              backoffMaxMs: 30_000,
              only: { jobId: run.id, epoch: run.epoch }
            })
            .pipe(
              Effect.retry(retryWrites),
              Effect.orElseSucceed(() => [])
            )
          const done = reaped[0]
          if (done?.status === "failed") counters.failed++
          if (done?.status === "queued") yield* JobStorage.wakeLater(storage, done.run_in_ms)
          return stateOf(run.id, done?.status ?? "unknown")
        }
        const outcome = outcomeOf(run, exit)
        yield* Deferred.await(run.ready)
        const written = yield* finish(run, outcome)
        if (!written) {
          // Someone else ended this attempt first (the reaper, or a cancel of an orphan).
          const now = yield* storage.owner(run.id).pipe(Effect.orElseSucceed(() => undefined))
          return stateOf(run.id, now?.status ?? "unknown", now?.worker_id ?? null)
        }
        counters[outcome.status]++
        return stateOf(run.id, outcome.status)
      })

    const outcomeOf = (
      run: Run,
      exit: Exit.Exit<unknown, JobHandler.JobError | JobHandler.HitlTimeout>
    ): JobStorage.Outcome => {
      const metadata = metadataOf(run, { cost: run.cost })
      if (Exit.isSuccess(exit) && !JobStorage.serializable(exit.value)) {
        return {
          status: "failed",
          errorCode: "RESULT_NOT_SERIALIZABLE",
          errorMessage: "the handler returned a value JSON cannot hold (a BigInt or a cycle)",
          eventType: "job_failed",
          message: "Failed: the handler's result cannot be stored",
          metadata: { ...metadata, error_code: "RESULT_NOT_SERIALIZABLE" }
        }
      }
      if (Exit.isSuccess(exit)) {
        return {
          status: "completed",
          result: exit.value === undefined ? null : exit.value,
          eventType: "job_completed",
          message: `Job completed on ${workerId}`,
          metadata
        }
      }
      if (run.stop?._tag === "Cancel" && Cause.isInterruptedOnly(exit.cause)) {
        return {
          status: "cancelled",
          errorCode: JobErrorCode.cancelled,
          errorMessage: run.stop.reason,
          eventType: "job_cancelled",
          message: `Cancelled on ${workerId}: ${run.stop.reason}`,
          metadata: { ...metadata, reason: run.stop.reason }
        }
      }
      const failure = Cause.failureOption(exit.cause)
      const [code, message] =
        failure._tag === "Some"
          ? failure.value._tag === "HitlTimeout"
            ? [JobErrorCode.hitlTimeout, failure.value.message]
            : [failure.value.code, failure.value.message]
          : [JobErrorCode.handlerCrashed, firstLine(Cause.pretty(exit.cause))]
      return {
        status: "failed",
        errorCode: code,
        errorMessage: message,
        eventType: "job_failed",
        message: `Failed: ${message}`,
        metadata: { ...metadata, error_code: code }
      }
    }

    const start = (row: JobStorage.Claimed, ready: Deferred.Deferred<void>) =>
      Effect.gen(function* () {
        const run: Run = {
          id: row.id,
          epoch: row.attempts,
          row,
          startedAt: Date.now(),
          lock: Effect.unsafeMakeSemaphore(1),
          final: undefined,
          outcome: undefined,
          ready,
          fiber: undefined,
          begun: false,
          timer: undefined,
          status: "running",
          resume: undefined,
          stop: undefined,
          cost: JobHandler.decodeCost(row.cost),
          costDirty: false,
          progress: undefined
        }
        runs.set(run.id, run)
        busy++
        if (runs.size === 1) yield* idle.close
        counters.claimed++
        const handler: JobHandler.Handler =
          options.handlers[row.job_type] ??
          Effect.fail(
            new JobHandler.JobError({
              code: JobErrorCode.unknownJobType,
              message: `worker ${workerId} has no handler for job type "${row.job_type}"`
            })
          )
        const program = Effect.uninterruptibleMask((restore) =>
          Effect.gen(function* () {
            run.begun = true
            // Stopped before it began (`stopRun`): as if interrupted at once.
            const exit =
              run.stop === undefined
                ? yield* Effect.exit(
                    restore(Effect.provideService(handler, JobHandler.JobContext, contextOf(run)))
                  )
                : Exit.interrupt(FiberId.none)
            busy--
            wake()
            if (run.timer !== undefined) yield* disarm(run)
            const final = yield* conclude(run, exit)
            run.final = final
            if (run.outcome !== undefined) yield* Deferred.succeed(run.outcome, final)
          })
        ).pipe(
          Effect.catchAllCause((cause) => Effect.logError(`job ${run.id}: could not record its end`, cause)),
          Effect.ensuring(
            Effect.suspend(() => {
              // A newer attempt of the same job may have taken this id's place meanwhile.
              if (runs.get(run.id) === run) runs.delete(run.id)
              wake()
              return runs.size === 0 ? idle.open : Effect.void
            })
          )
        )
        run.fiber = yield* FiberSet.run(fibers, program)
        if (row.timeout_seconds !== null) yield* arm(run)
      })

    // --- Claiming ---

    /**
     * Start jobs this worker now holds, each attempt once whichever path (claim, NOTIFY,
     * catch-up, deregister) brings it; their `job_started` events and callbacks are written
     * meanwhile. Returns how many it started.
     */
    const launch = (rows: ReadonlyArray<JobStorage.Claimed>) =>
      Effect.gen(function* () {
        const fresh = rows.filter((r) => {
          if (isSeen(r.id, r.attempts) || runs.get(r.id)?.epoch === r.attempts) return false
          markSeen(r.id, r.attempts)
          return true
        })
        if (fresh.length === 0) return 0
        const ready = yield* Deferred.make<void>()
        for (const row of fresh) yield* start(row, ready)
        yield* storage.started(registration, fresh).pipe(
          Effect.retry(retryWrites),
          // An attempt that ended before it started here (a cancel or the reaper got to its
          // row first): its handler must not go on.
          Effect.flatMap((live) =>
            Effect.forEach(fresh, (row) => (live.has(row.id) ? Effect.void : loseRun(row.id, row.attempts)), {
              discard: true
            })
          ),
          Effect.catchAll((e) =>
            Effect.logWarning(`worker ${workerId}: job_started of ${fresh.length} job(s) not written`, e)
          ),
          Effect.ensuring(Deferred.succeed(ready, undefined)),
          FiberSet.run(writers)
        )
        return fresh.length
      })

    /** Stop the handler of this attempt, if it runs here, without writing: the row is not ours. */
    const loseRun = (jobId: string, epoch: number) =>
      Effect.sync(() => stopAttempt(jobId, epoch, { _tag: "Lost" }))

    const lending = () => state === "active" && !stopping

    // Claim while the queue fills the free slots; lend the slots it cannot fill.
    const claimAll = Effect.gen(function* () {
      while (state === "active" && !stopping) {
        const free = maxConcurrent - busy - offered
        if (free <= 0 && offered === 0) break
        const claimed = yield* storage.claim(registration, Math.max(0, free), {
          withdraw: offered > 0,
          lend: lending()
        })
        counters.claims++
        offered += claimed.lent - claimed.withdrawn
        yield* launch(claimed.rows)
        // Again only while the queue filled every slot asked for (none asked: the offers
        // were all taken, and their jobs are on the way here).
        const asked = Math.max(0, free) + claimed.withdrawn
        if (asked === 0 || claimed.rows.length < asked) break
      }
    })

    // Offers spent by jobs started from their NOTIFY, not yet taken off `offered`: the claim
    // loop does that (`step`), after the bookkeeping of the claim that lent them, which its
    // reply may bring after the NOTIFY. Until then the slot counts twice (busy and offered),
    // so a claim asks for less, never more.
    let spent = 0
    /** Start jobs handed over by submits, each attempt once (`direct`: from its NOTIFY). */
    const adopt = (items: ReadonlyArray<JobStorage.Pushed>, direct = false) =>
      Effect.gen(function* () {
        const rows: Array<JobStorage.Claimed> = []
        for (const item of items) {
          // Seen: started already (a catch-up came first), or cancelled here before it arrived;
          // either way a catch-up is due or done, and it recounts the offers.
          if (isSeen(item.id, item.attempts)) continue
          if (direct) {
            spent++
            signals.unsafeOffer(undefined)
          } else offered = Math.max(0, offered - 1)
          counters.handed++
          if (stopping) continue
          if (item.fetch === true) {
            const row = yield* storage.handedOne(registration, item.id, item.attempts)
            if (row !== undefined) rows.push(row)
          } else rows.push(item)
        }
        yield* launch(rows)
      })
    const startHanded = Effect.flatMap(Queue.takeAll(handed), (items) => adopt([...items]))

    // After a reconnect or a quiet poll period (a NOTIFY may have been missed): take back
    // every offer, then start what was handed here and never started. Once the offers are
    // gone no submit can take one, and every one taken is committed, so the count is exact.
    let lastReconcile = Date.now()
    const reconcile = Effect.gen(function* () {
      lastReconcile = Date.now()
      yield* storage.withdraw(registration)
      const rows = yield* storage.handed(registration, [...runs.keys()])
      // Exact now: the offers spent meanwhile were taken before the withdraw.
      offered = 0
      spent = 0
      if (!stopping && state !== "offline") counters.handed += yield* launch(rows)
      claimWanted = true
    })

    let claimFailures = 0
    const step = Effect.gen(function* () {
      offered = Math.max(0, offered - spent)
      spent = 0
      yield* startHanded
      // At least every poll interval, also under a steady stream of wake-ups.
      if (reconcileWanted || Date.now() - lastReconcile >= pollMillis) {
        reconcileWanted = false
        yield* reconcile
      }
      if (claimWanted) {
        claimWanted = false
        yield* claimAll
      }
      claimFailures = 0
    }).pipe(
      Effect.catchAll((e) =>
        Effect.gen(function* () {
          claimFailures++
          if (claimFailures === 1 || claimFailures % 20 === 0) {
            yield* Effect.logWarning(`worker ${workerId}: claiming failed (${claimFailures}x), retrying`, e)
          }
          yield* Effect.sleep(Duration.millis(Math.min(2000, 25 * 2 ** Math.min(claimFailures, 7))))
          // What failed is done again in full: the offers may be off by the failed statement.
          reconcileWanted = true
          wake()
        })
      )
    )

    // --- Control (the WorkerActor's requests) ---

    const status = Effect.sync(
      (): WorkerActor.WorkerState => ({
        worker_id: workerId,
        node_id: nodeId,
        status: state,
        active_job_ids: [...runs.keys()],
        max_concurrent: maxConcurrent
      })
    )

    const drain = (reason: string) =>
      Effect.gen(function* () {
        if (state === "active") {
          state = "draining"
          yield* storage
            .setWorkerStatus(workerId, "draining", "worker_draining", `Draining: ${reason}`, { reason })
            .pipe(Effect.retry(retryWrites), Effect.orDie)
          yield* storage.closeTarget([workerId], "is draining").pipe(Effect.retry(retryWrites), Effect.orDie)
          // Jobs handed over before this still arrive and run, as a claim just before would.
          const withdrawn = yield* storage
            .withdraw(registration)
            .pipe(Effect.retry(retryWrites), Effect.orDie)
          offered = Math.max(0, offered - withdrawn)
        }
        return yield* status
      })

    const cancel = (jobId: string, reason: string): Effect.Effect<JobActor.JobState, Conflict | NotFound> =>
      Effect.gen(function* () {
        const run = runs.get(jobId)
        if (run === undefined || run.fiber === undefined) return yield* cancelOrphan(jobId, reason)
        stopRun(run, { _tag: "Cancel", reason })
        const final = yield* endOf(run)
        if (final.status !== "cancelled") {
          return yield* new Conflict({
            job_id: jobId,
            status: final.status,
            reason: "it ended before the cancel reached it"
          })
        }
        return final
      })

    /** A cancel for a job this worker does not run in memory: settle it from its row. */
    const cancelOrphan = (
      jobId: string,
      reason: string
    ): Effect.Effect<JobActor.JobState, Conflict | NotFound> =>
      Effect.gen(function* () {
        const owner = yield* storage.owner(jobId).pipe(Effect.orDie)
        if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
        if (owner.status === "queued" || isTerminal(owner.status)) {
          return yield* new Conflict({ job_id: jobId, status: owner.status, reason: "it is not running" })
        }
        // Handed here and started meanwhile (its NOTIFY arrived during the read): cancel the run.
        const started = runs.get(jobId)
        if (started?.epoch === owner.attempts && started.fiber !== undefined)
          return yield* cancel(jobId, reason)
        // Not started: it must not start when its NOTIFY comes, and its offer is spent.
        markSeen(jobId, owner.attempts)
        const written = yield* storage
          .finish(jobId, owner.attempts, {
            status: "cancelled",
            errorCode: JobErrorCode.cancelled,
            errorMessage: reason,
            eventType: "job_cancelled",
            message: `Cancelled (no handler was running it on ${workerId}): ${reason}`,
            metadata: { worker_id: owner.worker_id, node_id: nodeId, reason }
          })
          .pipe(Effect.orDie)
        if (!written) {
          return yield* new Conflict({
            job_id: jobId,
            status: "changed",
            reason: "it changed while cancelling"
          })
        }
        // Started during the write after all: stop it (the row says cancelled already).
        yield* loseRun(jobId, owner.attempts)
        reconcileWanted = true
        wake()
        return stateOf(jobId, "cancelled", owner.worker_id)
      })

    const resume = (
      jobId: string,
      resolution: Resolution
    ): Effect.Effect<JobActor.JobState, Conflict | NotFound> =>
      Effect.gen(function* () {
        const run = runs.get(jobId)
        if (run === undefined) {
          const owner = yield* storage.owner(jobId).pipe(Effect.orDie)
          if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
          return yield* new Conflict({
            job_id: jobId,
            status: owner.status,
            reason:
              owner.status === "needs_human"
                ? "no handler is waiting for it any more"
                : "it is not waiting for a human"
          })
        }
        return yield* run.lock.withPermits(1)(
          Effect.gen(function* () {
            if (run.status !== "needs_human" || run.resume === undefined) {
              return yield* new Conflict({
                job_id: jobId,
                status: run.status,
                reason: "it is not waiting for a human"
              })
            }
            const ok = yield* storage
              .resumed(
                jobId,
                run.epoch,
                `Resolved by ${resolution.resolved_by}`,
                metadataOf(run, { resolved_by: resolution.resolved_by })
              )
              .pipe(Effect.orDie)
            if (!ok)
              return yield* new Conflict({ job_id: jobId, status: "changed", reason: "it changed meanwhile" })
            run.status = "running"
            yield* Deferred.succeed(run.resume, resolution)
            run.resume = undefined
            yield* arm(run)
            return stateOf(jobId, "running")
          })
        )
      })

    const deregister = (request: Omit<WorkerActor.Deregister, "_tag">) =>
      Effect.gen(function* () {
        yield* drain(request.reason)
        // Jobs handed here whose NOTIFY is still on its way count as active: start them now
        // (the drain took the offers back, so this is all of them), then wait or cancel.
        const pending = yield* storage.handed(registration, [...runs.keys()]).pipe(Effect.orDie)
        const started = yield* launch(pending)
        offered = Math.max(0, offered - started)
        counters.handed += started
        const cancelled: Array<string> = []
        const cancelAll = Effect.forEach(
          [...runs.keys()],
          (id) =>
            cancel(id, `worker ${workerId} deregistered: ${request.reason}`).pipe(
              Effect.tap(() => Effect.sync(() => cancelled.push(id))),
              Effect.ignore
            ),
          { concurrency: "unbounded", discard: true }
        )
        if (request.cancel_active_jobs) yield* cancelAll
        else {
          yield* idle.await.pipe(
            Effect.timeout(Duration.seconds(request.drain_timeout_seconds)),
            Effect.ignore
          )
          yield* cancelAll
        }
        state = "offline"
        yield* storage
          .setWorkerStatus(workerId, "offline", "worker_deregistered", `Deregistered: ${request.reason}`, {
            reason: request.reason,
            cancelled_job_ids: cancelled
          })
          .pipe(Effect.retry(retryWrites), Effect.orDie)
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
    yield* storage.registerWorker(registration)
    const control: Worker = {
      workerId,
      nodeId,
      ec2InstanceId: registration.ec2InstanceId,
      ec2Ip: registration.ec2Ip,
      startedAt: Date.now(),
      drain,
      deregister,
      status,
      cancel,
      resume,
      wake,
      stats: () => ({ running: runs.size, ...counters }),
      runningJobIds: () => [...runs.keys()]
    }
    yield* node.register(JobActor.kind(control))
    yield* node.spawn(WorkerActor.kind(control), workerId)

    yield* node.listen(JobStorage.nodeJobsChannel(nodeId), onNodeJobs)
    yield* node.listen(JobStorage.anyJobsChannel, wake)
    yield* node.onReconnect(() => {
      reconcileWanted = true
      wake()
    })
    // A quiet poll interval ends the wait: `step` then catches up (a poll interval has passed).
    yield* Queue.take(signals).pipe(
      Effect.timeoutOption(pollInterval),
      Effect.zipRight(step),
      Effect.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause)
          ? Effect.failCause(cause)
          : Effect.logError(`worker ${workerId}: claim loop`, cause)
      ),
      Effect.forever,
      Effect.interruptible,
      FiberSet.run(fibers)
    )
    const heartbeatEvery = Duration.decode(options.heartbeat ?? "10 seconds")
    yield* Effect.gen(function* () {
      const alive = yield* storage.heartbeat(workerId, {
        status: state === "active" ? (runs.size > 0 ? "busy" : "idle") : state,
        current_job_id: runs.keys().next().value ?? null,
        active_jobs: runs.size,
        memory_usage: process.memoryUsage().rss
      })
      if (!alive && state !== "offline" && !stopping) {
        // Taken for dead during a blip (its lock session dropped): register again.
        yield* Effect.logWarning(`worker ${workerId} was marked offline while running: registering again`)
        yield* storage.registerWorker(registration)
        if (state === "draining") {
          yield* storage.setWorkerStatus(
            workerId,
            "draining",
            "worker_draining",
            "Draining (registered again)",
            {}
          )
        }
        reconcileWanted = true
        wake()
      }
    }).pipe(
      Effect.catchAllCause((c) => Effect.logWarning("worker heartbeat failed", c)),
      Effect.delay(heartbeatEvery),
      Effect.forever,
      Effect.interruptible,
      FiberSet.run(fibers)
    )
    wake()

    // Stopping (runs first: added last): abandon running jobs without a write, leave the
    // registry. The reaper requeues or fails what was running, as after a crash.
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        stopping = true
        yield* storage.withdraw(registration).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        yield* FiberSet.clear(fibers)
        if (state !== "offline") {
          yield* storage
            .setWorkerStatus(workerId, "offline", "worker_deregistered", "Worker stopped", {
              reason: "shutdown"
            })
            .pipe(Effect.timeout("5 seconds"), Effect.ignore)
          yield* storage.closeTarget([workerId], "stopped").pipe(Effect.timeout("5 seconds"), Effect.ignore)
        }
      })
    )
    return control
  })

// --- internal ---

const firstLine = (text: string) => text.split("\n")[0]!.slice(0, 500)
