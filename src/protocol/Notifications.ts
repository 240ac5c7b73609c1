/**
 * The NOTIFY channels and what their payloads say. A payload is only ever a wake-up or a
 * small copy of what a table already holds (Postgres refuses 8,000 bytes and more), so a
 * listener that misses one catches up from the table. Structured payloads carry a version
 * (`v`) and are decoded with these Schemas; anything that does not decode is a plain wake-up.
 *
 * Channels: `node:<id>` (a mailbox wake-up, `Wakeup`) and `registry:changed` (an actor id;
 * both named in `Ids.ts`),
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

/** A mailbox row as a wake-up on `node:<id>` carries it (and as a claim reads it). */
export interface MailboxMessage {
  readonly id: string
  readonly message_id: string
  readonly actor_id: string | null
  readonly kind: "tell" | "ask" | "reply"
  readonly sender: string
  readonly reply_to: string | null
  readonly correlation_id: string | null
  readonly body: unknown
}

/** Rows carried in a wake-up NOTIFY on `node:<id>` at most (more: ids only). */
export const wakeupMaxRows = 32

/** Bytes of a wake-up payload at most (Postgres refuses 8,000 and more). */
export const wakeupMaxBytes = 7_000

/**
 * What a NOTIFY on `node:<id>` says: the rows that were inserted (`Rows`, in commit order, at
 * most `wakeupMaxRows` and `wakeupMaxBytes`), their ids (`Ids`), or only that something is
 * pending (`Scan`: also the answer for anything that does not decode).
 */
export type Wakeup =
  | { readonly _tag: "Rows"; readonly rows: ReadonlyArray<MailboxMessage> }
  | { readonly _tag: "Ids"; readonly ids: ReadonlyArray<string> }
  | { readonly _tag: "Scan" }

/** A mailbox row in a wake-up: a tuple, in the column order of `MailboxMessage`, to keep the payload small. */
export const NotifiedRow = Schema.Tuple(
  Schema.String,
  Schema.String,
  Schema.NullOr(Schema.String),
  Schema.Literal("tell", "ask", "reply"),
  Schema.String,
  Schema.NullOr(Schema.String),
  Schema.NullOr(Schema.String),
  Schema.Unknown
)

/** The structured payload of a `node:<id>` wake-up (version 1). */
export const WakeupPayload = Schema.Union(
  Schema.Struct({ v: Schema.Literal(1), rows: Schema.Array(NotifiedRow) }),
  Schema.Struct({ v: Schema.Literal(1), ids: Schema.Array(Schema.String) })
)

/** Decode the payload of a NOTIFY on a node's channel. */
export const decodeWakeup = (payload: string): Wakeup => {
  if (payload === "m" || payload.length === 0) return scan
  const decoded = decodeWakeupPayload(payload)
  if (Either.isLeft(decoded)) return scan
  const p = decoded.right
  if ("ids" in p) return { _tag: "Ids", ids: p.ids }
  return {
    _tag: "Rows",
    rows: p.rows.map(([id, message_id, actor_id, kind, sender, reply_to, correlation_id, body]) => ({
      id,
      message_id,
      actor_id,
      kind,
      sender,
      reply_to,
      correlation_id,
      body
    }))
  }
}

// --- internal ---

const scan: Wakeup = { _tag: "Scan" }

const decodeWakeupPayload = Schema.decodeUnknownEither(Schema.parseJson(WakeupPayload))

const decodeJobs = Schema.decodeUnknownEither(Schema.parseJson(JobsPayload))
