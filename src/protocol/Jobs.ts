/**
 * Jobs and workers on the wire: what a client submits, what it gets back, and the errors
 * it can get. Schemas only: this module imports nothing but `effect`.
 */
import { Either, type ParseResult, Schema } from "effect"

/** Where a job may run. */
export const WorkerAffinity = Schema.Literal("strict", "preferred", "any")
export type WorkerAffinity = typeof WorkerAffinity.Type

/** A job's lifecycle: `queued → running → (needs_human ⇄ running) → completed | failed | cancelled`. */
export const JobStatus = Schema.Literal(
  "queued",
  "running",
  "needs_human",
  "completed",
  "failed",
  "cancelled"
)
export type JobStatus = typeof JobStatus.Type

/** The states a job never leaves. */
export const terminalStatuses: ReadonlyArray<JobStatus> = ["completed", "failed", "cancelled"]

/** Whether a string is a job id (a uuid, any case). */
export const isJobId = (id: string): boolean =>
  /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(id)

/** True when a job in this status is finished for good. */
export const isTerminal = (status: string): boolean => terminalStatuses.includes(status as JobStatus)

const idMaxLength = 200
const Id = Schema.String.pipe(Schema.minLength(1), Schema.maxLength(idMaxLength))

/** The bounds and defaults of a submission: `SubmitJob` and `decodeSubmitJobFast` both hold to these. */
const submit = {
  jobType: /^[A-Za-z0-9._:-]{1,100}$/,
  callbackUrl: /^https?:\/\/\S+$/,
  callbackUrlMaxLength: 2000,
  priority: { min: -1000, max: 1000, default: 0 },
  maxAttempts: { min: 1, max: 100, default: 3 },
  timeoutSeconds: { min: 1, max: 7 * 24 * 3600 }
} as const

const IntIn = (range: { readonly min: number; readonly max: number }) =>
  Schema.Int.pipe(Schema.between(range.min, range.max))

/** A job submission. */
export class SubmitJob extends Schema.Class<SubmitJob>("SubmitJob")({
  valet_task_id: Schema.optionalWith(Schema.NullOr(Id), { default: () => null }),
  job_type: Schema.String.pipe(Schema.pattern(submit.jobType)),
  payload: Schema.optionalWith(Schema.Unknown, { default: () => ({}) }),
  target_worker_id: Schema.optionalWith(Schema.NullOr(Id), { default: () => null }),
  worker_affinity: Schema.optionalWith(WorkerAffinity, { default: () => "any" as const }),
  callback_url: Schema.optionalWith(
    Schema.NullOr(
      Schema.String.pipe(Schema.pattern(submit.callbackUrl), Schema.maxLength(submit.callbackUrlMaxLength))
    ),
    { default: () => null }
  ),
  priority: Schema.optionalWith(IntIn(submit.priority), { default: () => submit.priority.default }),
  max_attempts: Schema.optionalWith(IntIn(submit.maxAttempts), { default: () => submit.maxAttempts.default }),
  timeout_seconds: Schema.optionalWith(Schema.NullOr(IntIn(submit.timeoutSeconds)), { default: () => null })
}) {}

/** A job submission as `SubmitJob` decodes it, as a plain object. */
export type SubmitJobFields = Schema.Schema.Type<typeof SubmitJobStruct>

/** `SubmitJob`'s fields as a plain struct (a third of the class decode's cost). */
export const SubmitJobStruct = Schema.Struct(SubmitJob.fields)

const submitKeys: ReadonlySet<string | symbol> = new Set(Object.keys(SubmitJob.fields))
const isId = (v: unknown): v is string => typeof v === "string" && v.length >= 1 && v.length <= idMaxLength
const isIntIn = (v: unknown, range: { readonly min: number; readonly max: number }): v is number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= range.min && v <= range.max
const isAffinity = (v: unknown): v is WorkerAffinity => v === "strict" || v === "preferred" || v === "any"
const isCallbackUrl = (v: unknown): v is string =>
  typeof v === "string" && v.length <= submit.callbackUrlMaxLength && submit.callbackUrl.test(v)

/**
 * The common submission, checked by hand: a plain object with only `SubmitJob`'s fields,
 * each absent (its default), or of its type within its bounds. Returns what `SubmitJob`'s
 * decode returns for it, or `undefined` for anything else, for that decode to accept or
 * explain. Schema's decode costs about 26 KB of garbage per job, a quarter of a no-op job's
 * CPU in a batch; a property test holds the two to the same answers.
 */
export const decodeSubmitJobFast = (input: unknown): SubmitJobFields | undefined => {
  if (typeof input !== "object" || input === null) return undefined
  const proto = Object.getPrototypeOf(input)
  if (proto !== Object.prototype && proto !== null) return undefined
  for (const k of Reflect.ownKeys(input)) if (!submitKeys.has(k)) return undefined
  const i = input as Record<string, unknown>
  const has = (k: string) => Object.hasOwn(i, k)
  const { valet_task_id, job_type, payload, target_worker_id, worker_affinity, callback_url } = i
  const { priority, max_attempts, timeout_seconds } = i
  if (has("valet_task_id") && valet_task_id !== null && !isId(valet_task_id)) return undefined
  if (typeof job_type !== "string" || !submit.jobType.test(job_type)) return undefined
  if (has("payload") && payload === undefined) return undefined
  if (has("target_worker_id") && target_worker_id !== null && !isId(target_worker_id)) return undefined
  if (has("worker_affinity") && !isAffinity(worker_affinity)) return undefined
  if (has("callback_url") && callback_url !== null && !isCallbackUrl(callback_url)) return undefined
  if (has("priority") && !isIntIn(priority, submit.priority)) return undefined
  if (has("max_attempts") && !isIntIn(max_attempts, submit.maxAttempts)) return undefined
  if (has("timeout_seconds") && timeout_seconds !== null && !isIntIn(timeout_seconds, submit.timeoutSeconds))
    return undefined
  return {
    valet_task_id: has("valet_task_id") ? (valet_task_id as string | null) : null,
    job_type,
    payload: has("payload") ? payload : {},
    target_worker_id: has("target_worker_id") ? (target_worker_id as string | null) : null,
    worker_affinity: has("worker_affinity") ? (worker_affinity as WorkerAffinity) : "any",
    callback_url: has("callback_url") ? (callback_url as string | null) : null,
    priority: has("priority") ? (priority as number) : submit.priority.default,
    max_attempts: has("max_attempts") ? (max_attempts as number) : submit.maxAttempts.default,
    timeout_seconds: has("timeout_seconds") ? (timeout_seconds as number | null) : null
  }
}

const decodeSubmitJobStruct = Schema.decodeUnknownEither(SubmitJobStruct)

/**
 * Decode a submission as `SubmitJob` does, excess properties refused: the common shape by
 * hand (`decodeSubmitJobFast`), anything else by the schema, which also explains a refusal.
 */
export const decodeSubmitJob = (input: unknown): Either.Either<SubmitJobFields, ParseResult.ParseError> => {
  const fast = decodeSubmitJobFast(input)
  return fast !== undefined ? Either.right(fast) : decodeSubmitJobStruct(input, { onExcessProperty: "error" })
}

/** What a handler raises to ask for a human (`needs_human`). */
export class Interaction extends Schema.Class<Interaction>("Interaction")({
  type: Schema.String,
  captcha_type: Schema.optional(
    Schema.Literal("recaptcha_v2", "recaptcha_v3", "hcaptcha", "cloudflare_turnstile", "custom")
  ),
  difficulty: Schema.optional(Schema.Literal("easy", "medium", "hard")),
  screenshot_url: Schema.optional(Schema.String),
  page_url: Schema.optional(Schema.String),
  element_selector: Schema.optional(Schema.String),
  timeout_seconds: Schema.Int.pipe(Schema.between(1, 7 * 24 * 3600)),
  message: Schema.String
}) {}

/** A human's answer to a `needs_human` job. */
export class Resolution extends Schema.Class<Resolution>("Resolution")({
  resolved_by: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200)),
  resolution_data: Schema.optional(Schema.Unknown)
}) {}

/** How to take a worker out of service. */
export class DeregisterRequest extends Schema.Class<DeregisterRequest>("DeregisterRequest")({
  worker_id: Schema.optional(Id),
  target_worker_id: Schema.optional(Id),
  reason: Schema.optionalWith(Schema.String, { default: () => "deregistered" }),
  cancel_active_jobs: Schema.optionalWith(Schema.Boolean, { default: () => false }),
  drain_timeout_seconds: Schema.optionalWith(Schema.Number.pipe(Schema.between(0, 24 * 3600)), {
    default: () => 30
  })
}) {}

/** The outcome of a deregistration. */
export const DeregisterResult = Schema.Struct({
  worker_ids: Schema.Array(Schema.String),
  cancelled_job_ids: Schema.Array(Schema.String)
})
export type DeregisterResult = typeof DeregisterResult.Type

/** A job as the system reports it (a row of `gh_automation_jobs`). */
export const Job = Schema.Struct({
  id: Schema.String,
  valet_task_id: Schema.NullOr(Schema.String),
  job_type: Schema.String,
  payload: Schema.Unknown,
  status: JobStatus,
  target_worker_id: Schema.NullOr(Schema.String),
  worker_affinity: WorkerAffinity,
  worker_id: Schema.NullOr(Schema.String),
  node_id: Schema.NullOr(Schema.String),
  priority: Schema.Number,
  attempts: Schema.Number,
  max_attempts: Schema.Number,
  timeout_seconds: Schema.NullOr(Schema.Number),
  callback_url: Schema.NullOr(Schema.String),
  interaction: Schema.NullOr(Schema.Unknown),
  result: Schema.NullOr(Schema.Unknown),
  error_code: Schema.NullOr(Schema.String),
  error_message: Schema.NullOr(Schema.String),
  cost: Schema.Unknown,
  created_at: Schema.String,
  started_at: Schema.NullOr(Schema.String),
  finished_at: Schema.NullOr(Schema.String)
})
export type Job = typeof Job.Type

/** A job's state after a cancel or resume: `worker_id` is the worker that ran it. */
export const JobState = Schema.Struct({
  job_id: Schema.String,
  status: Schema.String,
  worker_id: Schema.NullOr(Schema.String),
  node_id: Schema.String
})
export type JobState = typeof JobState.Type

/** A worker's state after a drain. */
export const WorkerState = Schema.Struct({
  worker_id: Schema.String,
  node_id: Schema.String,
  status: Schema.Literal("active", "draining", "offline"),
  active_job_ids: Schema.Array(Schema.String),
  max_concurrent: Schema.Number
})
export type WorkerState = typeof WorkerState.Type

// --- Errors ---

/** The target worker cannot take the job (offline, draining, full), or died holding a strict job. */
export class WorkerUnavailable extends Schema.TaggedError<WorkerUnavailable>()("WorkerUnavailable", {
  target_worker_id: Schema.String,
  reason: Schema.String
}) {
  readonly code = "WORKER_UNAVAILABLE"
  override get message() {
    return `worker "${this.target_worker_id}" cannot take the job: ${this.reason} (submit with worker_affinity "preferred" or "any" to let another worker run it)`
  }
}

/** No job (or worker) with this id. */
export class NotFound extends Schema.TaggedError<NotFound>()("NotFound", {
  what: Schema.String,
  id: Schema.String
}) {
  readonly code = "NOT_FOUND"
  override get message() {
    return `no ${this.what} "${this.id}"`
  }
}

/** The request does not fit the job's current state (resume of a job that is not waiting, cancel of a finished one). */
export class Conflict extends Schema.TaggedError<Conflict>()("Conflict", {
  job_id: Schema.String,
  status: Schema.String,
  reason: Schema.String
}) {
  readonly code = "CONFLICT"
  override get message() {
    return `job ${this.job_id} is ${this.status}: ${this.reason}`
  }
}

/** The input does not match its Schema. */
export class InvalidRequest extends Schema.TaggedError<InvalidRequest>()("InvalidRequest", {
  reason: Schema.String
}) {
  readonly code = "INVALID_FRAME"
  override get message() {
    return `invalid request: ${this.reason}`
  }
}

/** The node holding the job or worker did not answer in time; the request may still take effect. */
export class RequestTimeout extends Schema.TaggedError<RequestTimeout>()("RequestTimeout", {
  target: Schema.String,
  timeout_ms: Schema.Number
}) {
  readonly code = "TIMEOUT"
  override get message() {
    return `${this.target} did not answer within ${this.timeout_ms} ms; check its state with \`troupe inspect\` before retrying`
  }
}

/** Error codes a job can finish with (besides a handler's own `code`). */
export const JobErrorCode = {
  workerUnavailable: "WORKER_UNAVAILABLE",
  maxAttempts: "MAX_ATTEMPTS",
  timeout: "TIMEOUT",
  hitlTimeout: "HITL_TIMEOUT",
  unknownJobType: "UNKNOWN_JOB_TYPE",
  handlerCrashed: "HANDLER_CRASHED",
  cancelled: "CANCELLED"
} as const
