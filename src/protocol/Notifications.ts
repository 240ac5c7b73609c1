/**
 * The NOTIFY channels and what their payloads say. A payload is only ever a wake-up or a
 * small copy of what a table already holds (Postgres refuses 8,000 bytes and more), so a
 * listener that misses one catches up from the table. Structured payloads carry a version
 * (`v`) and are decoded with these Schemas; anything that does not decode is a plain wake-up.
 *
 * Channels: `node:<id>` and `registry:changed` (see `Ids.ts`: the actor system's own),
 * `jobs:<node>` (jobs handed to or cancelled on a node's worker), `jobs:any` (a job anyone may
 * claim), `callbacks:new`, `job_events:new`, `events:new`.
 */
import { Either, Schema } from "effect"

/** The prefix of `nodeJobsChannel` (SQL appends the node id). */
export const nodeJobsPrefix = "jobs:"

/** The channel the worker of a node listens on for jobs aimed at it, handed to it, or cancelled on it. */
export const nodeJobsChannel = (nodeId: string): string => `${nodeJobsPrefix}${nodeId}`

/** The channel every worker listens on: a job anyone may claim (the payload is a job id or a word). */
export const anyJobsChannel = "jobs:any"

/** A callback row was written (`callback_outbox`); the payload is its id. */
export const callbacksChannel = "callbacks:new"

/** A job event row was written (`gh_job_events`). */
export const jobEventsChannel = "job_events:new"

/** Something the event stream serves was written. */
export const eventsChannel = "events:new"

/**
 * A NOTIFY payload is at most 8,000 bytes: a job handed to a worker travels in it when it
 * fits in this many, else only its id does (`PushedRef`).
 */
export const maxPushBytes = 7_900

/** A claimed job, as the worker runs it. */
export const Claimed = Schema.Struct({
  id: Schema.String,
  job_type: Schema.String,
  payload: Schema.Unknown,
  attempts: Schema.Number,
  timeout_seconds: Schema.NullOr(Schema.Number),
  worker_affinity: Schema.String,
  target_worker_id: Schema.NullOr(Schema.String),
  valet_task_id: Schema.NullOr(Schema.String),
  cost: Schema.Unknown
})
export type Claimed = typeof Claimed.Type

/** `jobs:<node>`: a job a submit handed to this worker, whole. */
export const PushedJob = Schema.Struct({
  v: Schema.Literal(1),
  ...Claimed.fields,
  worker_id: Schema.String,
  fetch: Schema.optional(Schema.Undefined)
})

/** `jobs:<node>`: a job a submit handed to this worker, by id only (too large to travel whole). */
export const PushedRef = Schema.Struct({
  v: Schema.Literal(1),
  id: Schema.String,
  worker_id: Schema.String,
  attempts: Schema.Number,
  fetch: Schema.Literal(true)
})

/** A job handed to a worker by a submit: whole, or by id. */
export const Pushed = Schema.Union(PushedRef, PushedJob)
export type Pushed = typeof Pushed.Type

/** `jobs:<node>`: stop this attempt now, for this reason (sent with a cancel's owner lookup). */
export const CancelPush = Schema.Struct({
  v: Schema.Literal(1),
  cancel: Schema.Literal(true),
  id: Schema.String,
  worker_id: Schema.String,
  attempts: Schema.Number,
  reason: Schema.String
})
export type CancelPush = typeof CancelPush.Type

/** What a `jobs:<node>` payload may say (other payloads, a job id, are wake-ups). */
export const JobsPayload = Schema.Union(CancelPush, PushedRef, PushedJob)
export type JobsPayload = typeof JobsPayload.Type

/** Read a `jobs:<node>` payload: a handed job, a cancel, or undefined for a wake-up. */
export const decodeJobsPayload = (payload: string): JobsPayload | undefined => {
  if (!payload.startsWith("{")) return undefined
  return Either.getOrUndefined(decodeJobs(payload))
}

// --- internal ---

const decodeJobs = Schema.decodeUnknownEither(Schema.parseJson(JobsPayload))
