/**
 * The job service: what the edge (and the inspector, and tests) call to submit, cancel,
 * resume and look at jobs, and to drain or deregister workers. It runs on any node; a
 * request about a running job or a live worker is an `ask` to that job's or worker's actor,
 * routed to the node that holds it. A request about a job nobody holds is settled in its
 * row (`UPDATE … WHERE status = 'queued'`), so it never needs a live owner.
 */
import { SqlClient } from "@effect/sql"
import { Config, type ConfigError, Context, Duration, Effect, Either, Layer, ParseResult, Schema, type Scope } from "effect"
import * as JobActor from "../actors/JobActor.ts"
import * as WorkerActor from "../actors/WorkerActor.ts"
import * as Recipe from "../browser/Recipe.ts"
import { PersistenceError, type RuntimeError } from "../protocol/Errors.ts"
import {
  Conflict,
  DeregisterRequest,
  type DeregisterResult,
  decodeSubmitJob,
  InvalidRequest,
  isJobId,
  isTerminal,
  type Job,
  NotFound,
  RequestTimeout,
  Resolution,
  type SubmitJobFields,
  WorkerUnavailable
} from "../protocol/Jobs.ts"
import { anyJobsChannel } from "../protocol/Notifications.ts"
import { refail } from "../runtime/db/Persistence.ts"
import * as JobStorage from "../runtime/jobs/JobStorage.ts"
import * as WorkerStorage from "../runtime/jobs/WorkerStorage.ts"
import { Node, type TroupeNode } from "../runtime/core/Node.ts"

/** Options of the job service. */
export interface Options {
  /** How long a `preferred` job waits for its busy target before anyone may take it (default 2 s). */
  readonly preferredWait?: Duration.DurationInput
  /** How long a request waits for the node that holds a job or worker (default 10 s). */
  readonly askTimeout?: Duration.DurationInput
}

/** `TROUPE_PREFERRED_WAIT_MS` (default 2000). */
export const OptionsConfig = Config.all({
  preferredWait: Config.integer("TROUPE_PREFERRED_WAIT_MS").pipe(
    Config.withDefault(2000),
    Config.map((ms) => Duration.millis(ms))
  )
})

/** A job's state after a cancel or resume. */
export type JobState = JobActor.JobState

/** Errors of a request about a job. */
export type JobRequestError = NotFound | Conflict | InvalidRequest | RequestTimeout | PersistenceError

/** The job service. */
export interface JobService {
  /** Check a submission (unknown fields are errors) and store it; `strict` needs its target free. */
  readonly submit: (input: unknown) => Effect.Effect<Job, InvalidRequest | WorkerUnavailable | PersistenceError>
  /** Store a submission a door has decoded already (`SubmitJob`). */
  readonly submitJob: (
    job: SubmitJobFields
  ) => Effect.Effect<Job, InvalidRequest | WorkerUnavailable | PersistenceError>
  /**
   * Submit many jobs: all are validated first (one bad input stores nothing); `strict` ones
   * go first, one by one (each needs its target; a refusal fails the call there), then the
   * `any` and `preferred` ones in one statement.
   */
  readonly submitMany: (
    inputs: ReadonlyArray<unknown>
  ) => Effect.Effect<ReadonlyArray<Job>, InvalidRequest | WorkerUnavailable | PersistenceError>
  /** Cancel a job: in its row when queued or when its node is gone, else on the node running it. */
  readonly cancel: (jobId: string, reason?: string) => Effect.Effect<JobState, JobRequestError>
  /** Check a resolution and hand it to the `needs_human` job's handler, on the node holding it. */
  readonly resume: (jobId: string, input: unknown) => Effect.Effect<JobState, JobRequestError>
  /** Hand a decoded resolution to the `needs_human` job's handler. */
  readonly resumeWith: (jobId: string, resolution: Resolution) => Effect.Effect<JobState, JobRequestError>
  /** A job as stored. */
  readonly get: (jobId: string) => Effect.Effect<Job, NotFound | InvalidRequest | PersistenceError>
  /** Let a worker finish its jobs and claim no more (an offline worker answers `offline`). */
  readonly drain: (
    workerId: string,
    reason?: string
  ) => Effect.Effect<WorkerActor.WorkerState, NotFound | RequestTimeout | PersistenceError>
  /** Check a `DeregisterRequest` and take the workers it names out of service. */
  readonly deregister: (
    input: unknown
  ) => Effect.Effect<DeregisterResult, NotFound | InvalidRequest | RequestTimeout | PersistenceError>
  /** Take the workers a decoded `DeregisterRequest` names out of service. */
  readonly deregisterWith: (
    request: DeregisterRequest
  ) => Effect.Effect<DeregisterResult, NotFound | InvalidRequest | RequestTimeout | PersistenceError>
}

/** The job service of this process. */
export class Jobs extends Context.Tag("troupe/edge/Jobs")<Jobs, JobService>() {}

/** The job service on this process's node. */
export const layer = (options: Options = {}): Layer.Layer<Jobs, never, Node | SqlClient.SqlClient> =>
  Layer.scoped(Jobs, Effect.flatMap(Node, (node) => make(node, options)))

/** The job service on this process's node, configured from the environment (`OptionsConfig`). */
export const layerConfig: Layer.Layer<Jobs, ConfigError.ConfigError, Node | SqlClient.SqlClient> =
  Layer.unwrapEffect(Effect.map(OptionsConfig, layer))

/** Create the job service on a node. */
export const make = (
  node: TroupeNode,
  options: Options = {}
): Effect.Effect<JobService, never, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const storage = yield* JobStorage.make({ prepared: node.prepared })
    const workers = yield* WorkerStorage.make
    const sql = yield* SqlClient.SqlClient
    const preferredWaitMs = Duration.toMillis(options.preferredWait ?? "2 seconds")
    const askTimeout = Duration.decode(options.askTimeout ?? "10 seconds")
    const scope = yield* Effect.scope

    const invalid = (e: ParseResult.ParseError) =>
      new InvalidRequest({ reason: ParseResult.TreeFormatter.formatErrorSync(e) })
    const decode = <A, I>(schema: Schema.Schema<A, I, never>, input: unknown) =>
      Schema.decodeUnknown(schema)(input, { onExcessProperty: "error" }).pipe(Effect.mapError(invalid))
    const decodeSubmit = (input: unknown) => Either.mapLeft(decodeSubmitJob(input), invalid)

    const checkId = (jobId: string) =>
      isJobId(jobId)
        ? Effect.void
        : Effect.fail(new InvalidRequest({ reason: `job id "${jobId.slice(0, 80)}" is not a uuid` }))

    /** What the runtime may fail an ask with, as the service's errors. */
    const fromRuntime = (
      target: string,
      e: Exclude<RuntimeError, PersistenceError>,
      jobId?: string
    ): Effect.Effect<never, NotFound | Conflict | RequestTimeout | PersistenceError> => {
      switch (e._tag) {
        case "AskTimeout":
          return Effect.fail(new RequestTimeout({ target, timeout_ms: e.timeoutMs }))
        case "ActorNotFound":
          if (jobId === undefined) return Effect.fail(new NotFound({ what: "actor", id: e.actorId }))
          // The job ended (its actor left the registry) between our read and our ask.
          return Effect.flatMap(
            Effect.orElseSucceed(storage.owner(jobId), () => undefined),
            (now) =>
              Effect.fail(
                now === undefined
                  ? new NotFound({ what: "job", id: jobId })
                  : new Conflict({ job_id: jobId, status: now.status, reason: "it ended meanwhile" })
              )
          )
        default:
          // MailboxFull, MalformedMessage, ActorFailed: the runtime could not run the request.
          return Effect.fail(new PersistenceError({ reason: e.message }))
      }
    }

    /** An ask to a job's actor, its failures as the service's errors. */
    const askJob = <A>(
      jobId: string,
      self: Effect.Effect<A, Conflict | NotFound | PersistenceError | RuntimeError>
    ): Effect.Effect<A, Conflict | NotFound | RequestTimeout | PersistenceError> =>
      Effect.catchIf(self, isRuntimeOnly, (e) => fromRuntime(`the node holding job ${jobId}`, e, jobId))

    /** An ask to a worker's actor, its failures as the service's errors. */
    const askWorker = <A>(
      workerId: string,
      self: Effect.Effect<A, PersistenceError | RuntimeError>
    ): Effect.Effect<A, NotFound | RequestTimeout | PersistenceError> =>
      Effect.catchIf(self, isRuntimeOnly, (e) =>
        Effect.catchTag(fromRuntime(`worker ${workerId}`, e), "Conflict", () =>
          Effect.fail(new NotFound({ what: "worker", id: workerId }))
        )
      )

    const submit = (input: unknown) => Effect.flatMap(decodeSubmit(input), submitJob)

    const submitJob = (job: SubmitJobFields) =>
      Effect.gen(function* () {
        if (job.worker_affinity !== "any" && job.target_worker_id === null) {
          return yield* new InvalidRequest({
            reason: `worker_affinity "${job.worker_affinity}" needs a target_worker_id`
          })
        }
        const problem = payloadProblem(job)
        if (problem !== undefined) return yield* new InvalidRequest({ reason: problem })
        const row = yield* storage.insert(job, preferredWaitMs)
        if (row === undefined) {
          const t = yield* storage.targetState(job.target_worker_id!)
          return yield* new WorkerUnavailable({
            target_worker_id: job.target_worker_id!,
            reason: !t.exists
              ? "no such worker is registered"
              : t.status === "draining"
                ? "it is draining"
                : t.status === "offline" || !t.alive
                  ? "it is offline"
                  : `it is full (${t.load} of ${t.maxConcurrent} job slots taken)`
          })
        }
        if (job.worker_affinity === "preferred" && preferredWaitMs > 0 && row.status === "queued") {
          // When the target does not take it in time, everyone is woken to.
          yield* storage
            .notify(anyJobsChannel, row.id)
            .pipe(Effect.delay(Duration.millis(preferredWaitMs + 5)), Effect.ignore, Effect.forkIn(scope))
        }
        return row
      })

    const submitMany = (inputs: ReadonlyArray<unknown>) =>
      Effect.gen(function* () {
        const decoded = new Array<SubmitJobFields>(inputs.length)
        for (const [i, input] of inputs.entries()) {
          const job = decodeSubmit(input)
          if (Either.isLeft(job)) return yield* new InvalidRequest({ reason: `job ${i}: ${job.left.reason}` })
          decoded[i] = job.right
        }
        for (const [i, j] of decoded.entries()) {
          const problem = payloadProblem(j)
          if (problem !== undefined) return yield* new InvalidRequest({ reason: `job ${i}: ${problem}` })
        }
        const bad = decoded.findIndex((j) => j.worker_affinity !== "any" && j.target_worker_id === null)
        if (bad >= 0) {
          return yield* new InvalidRequest({
            reason: `job ${bad}: worker_affinity "${decoded[bad]!.worker_affinity}" needs a target_worker_id`
          })
        }
        // One transaction: a refused strict job (or a failed statement) stores nothing, so a
        // client can retry the whole batch. Strict jobs go first, one by one (each needs its
        // target); results come back in input order.
        const out = new Array<Job>(decoded.length)
        const loose = decoded.flatMap((j, i) => (j.worker_affinity === "strict" ? [] : [i]))
        yield* sql
          .withTransaction(
            Effect.gen(function* () {
              for (const [i, j] of decoded.entries())
                if (j.worker_affinity === "strict") out[i] = yield* submitJob(j)
              for (let k = 0; k < loose.length; k += 5000) {
                const slice = loose.slice(k, k + 5000)
                const rows = yield* storage
                  .insertMany(
                    slice.map((i) => decoded[i]!),
                    preferredWaitMs
                  )
                  
                rows.forEach((row, n) => {
                  out[slice[n]!] = row
                })
              }
            })
          )
          .pipe(refail)
        if (loose.some((i) => decoded[i]!.worker_affinity === "preferred") && preferredWaitMs > 0) {
          yield* storage
            .notify(anyJobsChannel, "opened")
            .pipe(Effect.delay(Duration.millis(preferredWaitMs + 5)), Effect.ignore, Effect.forkIn(scope))
        }
        return out
      })

    const cancel: JobService["cancel"] = (jobId, reason = "cancelled by request") =>
      Effect.gen(function* () {
        yield* checkId(jobId)
        const owner = yield* storage.cancelOrLocate(jobId, reason)
        if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
        if (owner.cancelled) return { job_id: jobId, status: "cancelled", worker_id: null, node_id: node.id }
        if ((owner.status === "running" || owner.status === "needs_human") && !owner.alive) {
          // Its node is gone: nobody runs its handler; settle it in its row.
          const written = yield* storage
            .finish(jobId, owner.attempts, {
              status: "cancelled",
              errorCode: "CANCELLED",
              errorMessage: reason,
              eventType: "job_cancelled",
              message: `Cancelled (its worker ${owner.worker_id ?? "?"} is gone): ${reason}`,
              metadata: { worker_id: owner.worker_id, node_id: owner.node_id, reason }
            })
            
          if (written) {
            return {
              job_id: jobId,
              status: "cancelled",
              worker_id: owner.worker_id,
              node_id: owner.node_id ?? node.id
            }
          }
          return yield* cancel(jobId, reason)
        }
        if (isTerminal(owner.status)) {
          return yield* new Conflict({ job_id: jobId, status: owner.status, reason: "it has already ended" })
        }
        if (owner.status === "queued") return yield* cancel(jobId, reason)
        return yield* node
          .ref(JobActor.JobActor, jobId)
          .ask(new JobActor.Cancel({ reason }), { timeout: askTimeout })
          .pipe(
            (ask) => askJob(jobId, ask),
            // The cancel pushed with the lookup ended the run before this request reached it.
            Effect.catchIf(
              (e) => e._tag === "Conflict" && e.status === "cancelled",
              (): Effect.Effect<JobState> =>
                Effect.succeed({
                  job_id: jobId,
                  status: "cancelled",
                  worker_id: owner.worker_id,
                  node_id: owner.node_id ?? node.id
                })
            )
          )
      })

    const resume = (jobId: string, input: unknown) =>
      Effect.flatMap(decode(Resolution, input), (resolution) => resumeWith(jobId, resolution))

    const resumeWith = (jobId: string, resolution: Resolution) =>
      Effect.gen(function* () {
        yield* checkId(jobId)
        const owner = yield* storage.owner(jobId)
        if (owner === undefined) return yield* new NotFound({ what: "job", id: jobId })
        if (owner.status !== "needs_human") {
          return yield* new Conflict({
            job_id: jobId,
            status: owner.status,
            reason: "it is not waiting for a human"
          })
        }
        if (!owner.alive) {
          return yield* new Conflict({
            job_id: jobId,
            status: owner.status,
            reason: `the worker holding it (${owner.worker_id}) is gone; it will be requeued or failed`
          })
        }
        return yield* node
          .ref(JobActor.JobActor, jobId)
          .ask(new JobActor.Resume({ resolution }), { timeout: askTimeout })
          .pipe((ask) => askJob(jobId, ask))
      })

    const get = (jobId: string) =>
      Effect.gen(function* () {
        yield* checkId(jobId)
        const job = yield* storage.get(jobId)
        if (job === undefined) return yield* new NotFound({ what: "job", id: jobId })
        return job
      })

    const drain = (workerId: string, reason = "drain requested") =>
      Effect.gen(function* () {
        const found = yield* workers.find({ workerId })
        const w = found[0]
        if (w === undefined) return yield* new NotFound({ what: "worker", id: workerId })
        if (!w.alive) {
          return {
            worker_id: w.worker_id,
            node_id: w.node_id ?? "",
            status: "offline" as const,
            active_job_ids: [],
            max_concurrent: 0
          }
        }
        return yield* node
          .ref(WorkerActor.WorkerActor, workerId)
          .ask(new WorkerActor.Drain({ reason }), { timeout: askTimeout })
          .pipe((ask) => askWorker(workerId, ask))
      })

    const deregister = (input: unknown) => Effect.flatMap(decode(DeregisterRequest, input), deregisterWith)

    const deregisterWith = (request: DeregisterRequest) =>
      Effect.gen(function* () {
        if (request.worker_id === undefined && request.target_worker_id === undefined) {
          return yield* new InvalidRequest({ reason: "name the worker: worker_id or target_worker_id" })
        }
        const found = yield* workers
          .find({ workerId: request.worker_id, targetWorkerId: request.target_worker_id })
          
        if (found.length === 0) {
          return yield* new NotFound({
            what: "worker",
            id: request.worker_id ?? request.target_worker_id ?? ""
          })
        }
        const results = yield* Effect.forEach(
          found,
          (w) =>
            w.alive && w.status !== "offline"
              ? node
                  .ref(WorkerActor.WorkerActor, w.worker_id)
                  .ask(
                    new WorkerActor.Deregister({
                      reason: request.reason,
                      cancel_active_jobs: request.cancel_active_jobs,
                      drain_timeout_seconds: request.drain_timeout_seconds
                    }),
                    { timeout: Duration.sum(askTimeout, Duration.seconds(request.drain_timeout_seconds)) }
                  )
                  .pipe((ask) => askWorker(w.worker_id, ask))
              : offlineDeregister(w.worker_id, request.reason),
          { concurrency: "unbounded" }
        )
        return {
          worker_ids: results.flatMap((r) => r.worker_ids),
          cancelled_job_ids: results.flatMap((r) => r.cancelled_job_ids)
        }
      })

    /** A worker whose node is gone: settle it in its rows (its running jobs are the reaper's). */
    const offlineDeregister = (workerId: string, reason: string) =>
      Effect.gen(function* () {
        yield* workers.setStatus(
          workerId,
          "offline",
          "worker_deregistered",
          `Deregistered: ${reason}`,
          {
            reason
          }
        )
        yield* storage.closeTarget([workerId], "was deregistered")
        return { worker_ids: [workerId], cancelled_job_ids: [] } satisfies DeregisterResult
      })

    // Each operation is a span (`Jobs.<name>`), so a trace shows where a request spent its time.
    return {
      submit: (input) => submit(input).pipe(Effect.withSpan("Jobs.submit")),
      submitJob: (job) => submitJob(job).pipe(Effect.withSpan("Jobs.submit")),
      submitMany: (inputs) => submitMany(inputs).pipe(Effect.withSpan("Jobs.submitMany")),
      cancel: (jobId, reason) => cancel(jobId, reason).pipe(Effect.withSpan("Jobs.cancel", { attributes: { jobId } })),
      resume: (jobId, input) => resume(jobId, input).pipe(Effect.withSpan("Jobs.resume", { attributes: { jobId } })),
      resumeWith: (jobId, resolution) =>
        resumeWith(jobId, resolution).pipe(Effect.withSpan("Jobs.resume", { attributes: { jobId } })),
      get: (jobId) => get(jobId).pipe(Effect.withSpan("Jobs.get", { attributes: { jobId } })),
      drain: (workerId, reason) =>
        drain(workerId, reason).pipe(Effect.withSpan("Jobs.drain", { attributes: { workerId } })),
      deregister: (input) => deregister(input).pipe(Effect.withSpan("Jobs.deregister")),
      deregisterWith: (request) => deregisterWith(request).pipe(Effect.withSpan("Jobs.deregister"))
    } satisfies JobService
  })

// --- internal ---

/** Job types whose payload the front desk checks at submit (a bad one is refused, not run). */
const payloadProblem = (job: SubmitJobFields): string | undefined => {
  if (job.job_type !== "recipe") return undefined
  const problem = Recipe.problemOf(job.payload)
  return problem === undefined ? undefined : `the payload is not a valid recipe: ${problem}`
}

const runtimeOnly = new Set(["ActorNotFound", "AskTimeout", "MailboxFull", "MalformedMessage", "ActorFailed"])

/** A failure of the runtime (not of the request itself, and not the database). */
const isRuntimeOnly = <E extends { readonly _tag: string }>(
  e: E
): e is Extract<E, Exclude<RuntimeError, PersistenceError>> => runtimeOnly.has(e._tag)
