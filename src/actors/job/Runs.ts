/**
 * The runs of jobs on this node: one `Run` per attempt this worker holds, from its start
 * (`launch`) through its handler, its reports, its timeout and its pauses for a human, to the
 * one write of how it ended (`conclude`), batched with the endings of other runs.
 *
 * Every write about a job names the attempt it holds, so when the reaper has given the job
 * to someone else, these late writes change nothing and the handler is stopped (`Lost`).
 * Both actors use it: the JobActor to cancel and resume a run, the WorkerActor to start runs
 * and count them.
 */
import {
  Cause,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  FiberId,
  FiberSet,
  Option,
  Queue,
  Schedule,
  type Scope
} from "effect"
import type { PersistenceError } from "../../protocol/Errors.ts"
import type { Claimed } from "../../protocol/Notifications.ts"
import { Conflict, type Interaction, JobErrorCode, type JobState, type Resolution } from "../../protocol/Jobs.ts"
import { retrySchedule } from "../../runtime/core/internal/loop.ts"
import * as JobHandler from "../../runtime/jobs/JobHandler.ts"
import * as JobStorage from "../../runtime/jobs/JobStorage.ts"
import type { WorkerRegistration } from "../../runtime/jobs/WorkerStorage.ts"
import type { Slots } from "./Slots.ts"

/** Why a run's handler is stopped. */
export type Stop =
  | { readonly _tag: "Cancel"; readonly reason: string }
  | { readonly _tag: "Timeout" }
  | { readonly _tag: "Lost" }

/** One attempt of a job, running here. */
export interface Run {
  readonly id: string
  readonly epoch: number
  readonly row: Claimed
  readonly startedAt: number
  readonly lock: Effect.Semaphore
  /** How the attempt ended, once it has; `outcome` is made only when someone waits for it. */
  final: JobState | undefined
  outcome: Deferred.Deferred<JobState> | undefined
  /** Resolved once `job_started` is written: the attempt's own writes wait for it, so events stay in order. */
  readonly ready: Deferred.Deferred<void>
  fiber: Fiber.RuntimeFiber<void> | undefined
  /** Its fiber has begun `program` (see `stop`). */
  begun: boolean
  timer: Fiber.RuntimeFiber<void> | undefined
  status: "running" | "needs_human" | "deciding"
  resume: Deferred.Deferred<Resolution> | undefined
  stop: Stop | undefined
  cost: JobHandler.Cost
  costDirty: boolean
  progress: JobHandler.Progress | undefined
  /** It recorded a browser session (`browserAt`): cleared from the registry when it ends. */
  browser: boolean
}

/** The runs on this node. */
export interface Service {
  readonly workerId: string
  readonly nodeId: string
  readonly storage: JobStorage.JobStorage
  readonly slots: Slots
  /** The fibers of this worker: the runs' handlers, and the worker's own loops. */
  readonly fibers: FiberSet.FiberSet<void, never>
  /** The run of this job, if it runs here. */
  readonly get: (jobId: string) => Run | undefined
  readonly jobIds: () => ReadonlyArray<string>
  readonly size: () => number
  /** Resolves whenever no run is left. */
  readonly idle: Effect.Effect<void>
  /**
   * Start jobs this worker now holds, each attempt once whichever path (claim, NOTIFY,
   * catch-up, deregister) brings it; their `job_started` events and callbacks are written
   * meanwhile. Returns how many it started.
   */
  readonly launch: (rows: ReadonlyArray<Claimed>) => Effect.Effect<number>
  /**
   * Stop a run's handler for this reason (the first reason given stands). A fiber
   * interrupted before it begins ends without running its program, so the run would stay
   * busy and unanswered for good (a cancel push can come in the same read as its job's
   * NOTIFY): before it begins, the program sees the stop and skips the handler instead.
   */
  readonly stop: (run: Run, stop: Stop) => void
  /** Stop this attempt's handler, if it runs here. */
  readonly stopAttempt: (jobId: string, epoch: number, stop: Stop) => void
  /** How the attempt ended: at once when it has, else when it does. */
  readonly endOf: (run: Run) => Effect.Effect<JobState>
  /**
   * Cancel the job's run on this node: stop its handler and wait for its end (which may be
   * another than `cancelled`, if it ended first). Undefined when it does not run here.
   */
  readonly cancel: (jobId: string, reason: string) => Effect.Effect<JobState | undefined>
  /** Hand a human's resolution to a run waiting for it. */
  readonly resume: (run: Run, resolution: Resolution) => Effect.Effect<JobState, Conflict | PersistenceError>
  readonly stateOf: (jobId: string, status: string, worker?: string | null) => JobState
}

/** The runs of this node's worker. */
export class Runs extends Context.Tag("troupe/actors/Runs")<Runs, Service>() {}

/** What the runs need from their worker. */
export interface Options {
  readonly registration: WorkerRegistration
  readonly storage: JobStorage.JobStorage
  readonly slots: Slots
  readonly handlers: JobHandler.Handlers
  readonly prices: JobHandler.PriceTable
  /** How long writes about a job retry while the database is unreachable. */
  readonly retryWritesFor: Duration.Duration
  /** The worker is stopping: runs that end now are abandoned, not written. */
  readonly stopping: () => boolean
  /** Record the browser session and page of a job in the worker's registry row (null, null: none). */
  readonly browserAt: (sessionId: string | null, url: string | null) => Effect.Effect<void, PersistenceError>
}

/** Make the runs of a worker, for the lifetime of the scope. */
export const make = (options: Options): Effect.Effect<Service, never, Scope.Scope> =>
  Effect.gen(function* () {
    const { registration, storage, slots, handlers, prices } = options
    const { workerId, nodeId } = registration
    const counters = slots.counters
    const retryWrites = retryWritesSchedule(options.retryWritesFor)
    const runs = new Map<string, Run>()
    // Made before `fibers`, so it stops after them: a job concluding during a stop still gets its answer.
    const writers = yield* FiberSet.make<void, never>()
    const fibers = yield* FiberSet.make<void, never>()
    const idle = yield* Effect.makeLatch(true)

    const stop = (run: Run, why: Stop) => {
      if (run.stop === undefined) run.stop = why
      if (run.begun) run.fiber?.unsafeInterruptAsFork(FiberId.none)
    }
    const stopAttempt = (jobId: string, epoch: number, why: Stop) => {
      const run = runs.get(jobId)
      if (run !== undefined && run.epoch === epoch && run.fiber !== undefined) stop(run, why)
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
                      Effect.logError(`could not record the end of job ${item.jobId}`, cause),
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
      Effect.annotateLogs({ module: "Runs", fiber: "endings" }),
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

    const endOf = (run: Run) =>
      Effect.suspend(() => {
        if (run.final !== undefined) return Effect.succeed(run.final)
        run.outcome ??= Deferred.unsafeMake<JobState>(FiberId.none)
        return Deferred.await(run.outcome)
      })

    const stateOf = (jobId: string, status: string, worker: string | null = workerId): JobState => ({
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

    // --- Running ---

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
              return Effect.sync(() => stop(run, { _tag: "Timeout" }))
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
      needsHuman: (interaction) => needsHuman(run, interaction),
      browserAt: (sessionId, url) =>
        Effect.suspend(() => {
          run.browser = true
          return options.browserAt(sessionId, url).pipe(
            Effect.catchAll((e) => Effect.logWarning(`job ${run.id}: its page ${url} not recorded`, e))
          )
        })
    })

    // --- Waiting for a human ---

    const needsHuman = (run: Run, interaction: Interaction) =>
      Effect.gen(function* () {
        const resume = yield* Deferred.make<Resolution>()
        yield* Deferred.await(run.ready)
        const paused = yield* run.lock.withPermits(1)(
          Effect.gen(function* () {
            const ok = yield* storage
              .pauseForHuman(run.id, run.epoch, interaction, metadataOf(run, { interaction }))
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

    const resume = (run: Run, resolution: Resolution) =>
      run.lock.withPermits(1)(
        Effect.gen(function* () {
          if (run.status !== "needs_human" || run.resume === undefined) {
            return yield* new Conflict({
              job_id: run.id,
              status: run.status,
              reason: "it is not waiting for a human"
            })
          }
          const ok = yield* storage.resumeFromHuman(
            run.id,
            run.epoch,
            `Resolved by ${resolution.resolved_by}`,
            metadataOf(run, { resolved_by: resolution.resolved_by })
          )
          if (!ok) return yield* new Conflict({ job_id: run.id, status: "changed", reason: "it changed meanwhile" })
          run.status = "running"
          yield* Deferred.succeed(run.resume, resolution)
          run.resume = undefined
          yield* arm(run)
          return stateOf(run.id, "running")
        })
      )

    // --- Ending ---

    /** Record how the attempt ended (the one place that writes a run's final state). */
    const conclude = (run: Run, exit: Exit.Exit<unknown, JobHandler.JobError | JobHandler.HitlTimeout>) =>
      Effect.gen(function* () {
        if (options.stopping() || run.stop?._tag === "Lost") {
          counters.abandoned++
          return stateOf(run.id, "abandoned")
        }
        // A timeout, or a failure worth retrying: back to the queue while attempts are left.
        const timedOut = run.stop?._tag === "Timeout" && Exit.isFailure(exit) && Cause.isInterruptedOnly(exit.cause)
        const retryable = run.stop === undefined ? retryableError(exit) : undefined
        if (timedOut || retryable !== undefined) {
          if (retryable !== undefined) yield* Deferred.await(run.ready)
          const reaped = yield* storage
            .reap({
              staleSeconds: 0,
              graceSeconds: 0,
              backoffBaseMs: 250,
              backoffMaxMs: 30_000,
              only: { jobId: run.id, epoch: run.epoch, ...(retryable === undefined ? {} : { error: retryable }) }
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

    // --- Starting ---

    const start = (row: Claimed, ready: Deferred.Deferred<void>) =>
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
          progress: undefined,
          browser: false
        }
        runs.set(run.id, run)
        slots.busy++
        if (runs.size === 1) yield* idle.close
        counters.claimed++
        const handler: JobHandler.Handler =
          handlers[row.job_type] ??
          Effect.fail(
            new JobHandler.JobError({
              code: JobErrorCode.unknownJobType,
              message: `worker ${workerId} has no handler for job type "${row.job_type}"`
            })
          )
        const program = Effect.uninterruptibleMask((restore) =>
          Effect.gen(function* () {
            run.begun = true
            // Stopped before it began (`stop`): as if interrupted at once.
            const exit =
              run.stop === undefined
                ? yield* Effect.exit(
                    restore(Effect.provideService(handler, JobHandler.JobContext, contextOf(run)))
                  )
                : Exit.interrupt(FiberId.none)
            slots.busy--
            slots.wake()
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
              slots.wake()
              // Not awaited: the end of the run is not held up by the registry's page.
              const clear = run.browser
                ? FiberSet.run(writers, Effect.ignore(options.browserAt(null, null)))
                : Effect.void
              return Effect.zipRight(clear, runs.size === 0 ? idle.open : Effect.void)
            })
          )
        )
        run.fiber = yield* FiberSet.run(fibers, program)
        if (row.timeout_seconds !== null) yield* arm(run)
      })

    const launch = (rows: ReadonlyArray<Claimed>) =>
      Effect.gen(function* () {
        const fresh = rows.filter((r) => {
          if (slots.isSeen(r.id, r.attempts) || runs.get(r.id)?.epoch === r.attempts) return false
          slots.markSeen(r.id, r.attempts)
          return true
        })
        if (fresh.length === 0) return 0
        const ready = yield* Deferred.make<void>()
        for (const row of fresh) yield* start(row, ready)
        yield* storage.recordStarted(registration, fresh).pipe(
          Effect.retry(retryWrites),
          // An attempt that ended before it started here (a cancel or the reaper got to its
          // row first): its handler must not go on.
          Effect.flatMap((live) =>
            Effect.sync(() => {
              for (const row of fresh) if (!live.has(row.id)) stopAttempt(row.id, row.attempts, { _tag: "Lost" })
            })
          ),
          Effect.catchAll((e) => Effect.logWarning(`job_started of ${fresh.length} job(s) not written`, e)),
          Effect.ensuring(Deferred.succeed(ready, undefined)),
          FiberSet.run(writers)
        )
        return fresh.length
      })

    return {
      workerId,
      nodeId,
      storage,
      slots,
      fibers,
      get: (jobId) => runs.get(jobId),
      jobIds: () => [...runs.keys()],
      size: () => runs.size,
      idle: idle.await,
      launch,
      stop,
      stopAttempt,
      endOf,
      cancel: (jobId, reason) =>
        Effect.suspend(() => {
          const run = runs.get(jobId)
          if (run === undefined || run.fiber === undefined) return Effect.succeed(undefined)
          stop(run, { _tag: "Cancel", reason })
          return endOf(run)
        }),
      resume,
      stateOf
    } satisfies Service
  }).pipe(Effect.annotateLogs({ module: "Runs", worker: options.registration.workerId }))

/** The handler's failure, when it is a `retryable` JobError. */
const retryableError = (
  exit: Exit.Exit<unknown, JobHandler.JobError | JobHandler.HitlTimeout>
): { readonly code: string; readonly message: string } | undefined => {
  if (Exit.isSuccess(exit)) return undefined
  const failure = Cause.failureOption(exit.cause)
  if (Option.isNone(failure) || failure.value._tag !== "JobError" || failure.value.retryable !== true) return undefined
  return { code: failure.value.code, message: failure.value.message }
}

/** Writes about a job retry while the database is unreachable: 20 ms doubling, at most 2 s apart. */
export const retryWritesSchedule = (retryFor: Duration.DurationInput) =>
  retrySchedule({ every: "2 seconds", upTo: retryFor })

// --- internal ---

const firstLine = (text: string) => text.split("\n")[0]!.slice(0, 500)
