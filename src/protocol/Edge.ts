/**
 * The client app's protocol, v1: the frames a client and a gateway exchange over the
 * WebSocket at `/v1/ws`, the error codes, the close codes, and the shapes the REST
 * compatibility endpoints answer with. Schemas only: this module imports nothing but
 * `effect`. `docs/PROTOCOL.md` shows an example of each; `docs/protocol.schema.json` is
 * generated from here (`npm run protocol:schema`).
 */
import { Schema } from "effect"
import {
  DeregisterRequest,
  DeregisterResult,
  Job,
  JobState,
  Resolution,
  SubmitJobStruct,
  WorkerState
} from "./Jobs.ts"

/** The protocol version every frame carries as `v`. */
export const version = 1 as const

/** The largest frame a gateway accepts (1 MiB); a larger one closes the socket with 1009. */
export const maxFrameBytes = 1024 * 1024

/** WebSocket close codes a gateway uses. */
export const CloseCode = {
  /** The server is shutting down. */
  goingAway: 1001,
  /** A frame over `maxFrameBytes`. */
  tooBig: 1009,
  /** The client read too slowly: its send buffer stayed over the limit past the grace period. */
  tryAgainLater: 1013,
  /** No valid authentication within 5 s, or a wrong secret. */
  unauthorized: 4401
} as const

/** The codes an error reply carries. */
export const ErrorCode = Schema.Literal(
  "INVALID_FRAME",
  "UNAUTHORIZED",
  "NOT_FOUND",
  "WORKER_UNAVAILABLE",
  "CONFLICT",
  "TIMEOUT",
  "OVERLOADED",
  "INTERNAL"
)
export type ErrorCode = typeof ErrorCode.Type

const V = Schema.Literal(version)
const RequestId = Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200))
const Uuid = Schema.String.pipe(Schema.maxLength(200))
/** An event id; `"0"` (in `since_event_id`) is the start of the stream. */
export const EventId = Schema.String.pipe(Schema.pattern(/^[0-9]{1,19}$/))
const Name = Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200))

const request = <Type extends string, Fields extends Schema.Struct.Fields>(type: Type, fields: Fields) =>
  Schema.Struct({ v: V, type: Schema.Literal(type), id: RequestId, ...fields })

// --- client → server ---

/** Authenticate with the shared service secret (for clients that cannot set `Authorization`). */
export const Auth = request("auth", { token: Schema.String.pipe(Schema.maxLength(4096)) })
/** Submit a job (`SubmitJob`); the reply carries the stored `Job`. */
export const JobSubmit = request("job.submit", { job: SubmitJobStruct })
/** Cancel a job; the reply carries the job's state after it (`JobState`). */
export const JobCancel = request("job.cancel", { job_id: Uuid, reason: Schema.optional(Name) })
/** Resume a `needs_human` job with a human's resolution; the reply carries its `JobState`. */
export const JobResume = request("job.resume", { job_id: Uuid, ...Resolution.fields })
/** Read a job; the reply carries the `Job`. */
export const JobGet = request("job.get", { job_id: Uuid })
/** A job's event history, oldest first, after `since_event_id` when given; the reply carries `{events}`. */
export const JobEvents = request("job.events", { job_id: Uuid, since_event_id: Schema.optional(EventId) })

const subscribeBase = { since_event_id: Schema.optional(EventId) }
/**
 * Subscribe to events: of one job, of the jobs of one `valet_task_id`, of one worker (its
 * lifecycle events and the events of jobs it runs), or all. With `since_event_id` the
 * gateway first replays what came after that event, then goes live, with no gap and no
 * duplicate. The subscription is named by the request's `id`; events carry it as
 * `subscription`.
 */
export const Subscribe = Schema.Union(
  request("subscribe", { job_id: Uuid, ...subscribeBase }),
  request("subscribe", { valet_task_id: Name, ...subscribeBase }),
  request("subscribe", { worker_id: Name, ...subscribeBase }),
  request("subscribe", { all: Schema.Literal(true), ...subscribeBase })
)
/** End a subscription (by the `id` of its `subscribe`). */
export const Unsubscribe = request("unsubscribe", { subscription: RequestId })
/** List the workers; the reply carries `{workers: MonitoredWorker[]}`. */
export const WorkersList = request("workers.list", {})
/** Drain a worker: it finishes its jobs and claims no more; the reply carries its `WorkerState`. */
export const WorkerDrain = request("worker.drain", { worker_id: Name, reason: Schema.optional(Name) })
/** Take a worker (or every worker of a `target_worker_id`) out of service; the reply carries `DeregisterResult`. */
export const WorkerDeregister = request("worker.deregister", DeregisterRequest.fields)
/** Keepalive: answered with `pong`. */
export const Ping = request("ping", {})

/** Every frame a client may send. */
export const ClientFrame = Schema.Union(
  Auth,
  JobSubmit,
  JobCancel,
  JobResume,
  JobGet,
  JobEvents,
  Subscribe,
  Unsubscribe,
  WorkersList,
  WorkerDrain,
  WorkerDeregister,
  Ping
)
export type ClientFrame = typeof ClientFrame.Type

/** The `type` a request schema of `ClientFrame` fixes (of its first variant, for a union such as `Subscribe`). */
export const typeOf = (member: (typeof ClientFrame.members)[number]): RequestType =>
  "members" in member ? member.members[0].fields.type.literals[0] : member.fields.type.literals[0]

/** The request types, in the order of `ClientFrame` (read from its members, not written again). */
export const requestTypes: ReadonlyArray<RequestType> = ClientFrame.members.map((member) => typeOf(member))
export type RequestType = ClientFrame["type"]

// --- results ---

/** A worker as `GET /api/v1/monitoring/workers` and `workers.list` report it (the requirements' shape). */
export const MonitoredWorker = Schema.Struct({
  worker_id: Schema.String,
  status: Schema.Literal("idle", "busy", "draining", "offline"),
  target_worker_id: Schema.NullOr(Schema.String),
  ec2_instance_id: Schema.NullOr(Schema.String),
  ec2_ip: Schema.NullOr(Schema.String),
  current_job_id: Schema.NullOr(Schema.String),
  current_task_url: Schema.NullOr(Schema.String),
  browser_session_id: Schema.NullOr(Schema.String),
  registered_at: Schema.String,
  last_heartbeat: Schema.String,
  jobs_completed: Schema.Number,
  jobs_failed: Schema.Number,
  uptime_seconds: Schema.Number
})
export type MonitoredWorker = typeof MonitoredWorker.Type

/** An event as it is stored and streamed: a row of `gh_job_events` or of `gh_worker_events`. */
export const EventRecord = Schema.Struct({
  /** Unique across both tables. A stream is ordered by writing transaction, then id: ids are not always increasing. */
  event_id: EventId,
  /** `job` for a `gh_job_events` row, `worker` for a `gh_worker_events` row. */
  source: Schema.Literal("job", "worker"),
  job_id: Schema.NullOr(Schema.String),
  /** The worker the event is about: the job's worker, or the worker of a lifecycle event. */
  worker_id: Schema.NullOr(Schema.String),
  valet_task_id: Schema.NullOr(Schema.String),
  event_type: Schema.String,
  message: Schema.NullOr(Schema.String),
  actor: Schema.NullOr(Schema.String),
  metadata: Schema.Unknown,
  created_at: Schema.String
})
export type EventRecord = typeof EventRecord.Type

/** What each request's successful reply carries as `result`. */
export const Results = {
  auth: Schema.Struct({ authenticated: Schema.Literal(true) }),
  "job.submit": Job,
  "job.cancel": JobState,
  "job.resume": JobState,
  "job.get": Job,
  "job.events": Schema.Struct({ events: Schema.Array(EventRecord) }),
  subscribe: Schema.Struct({
    subscription: Schema.String,
    replayed: Schema.Number,
    /** Resume from here (`since_event_id`) if no event arrives before a reconnect; "0" is the start. */
    position: EventId
  }),
  unsubscribe: Schema.Struct({ subscription: Schema.String }),
  "workers.list": Schema.Struct({ workers: Schema.Array(MonitoredWorker) }),
  "worker.drain": WorkerState,
  "worker.deregister": DeregisterResult,
  ping: Schema.Struct({})
} as const satisfies Record<RequestType, Schema.Schema.Any>

// --- server → client ---

/** A typed error. `details` is present where there is more to say (e.g. the failing field). */
export const ErrorBody = Schema.Struct({
  code: ErrorCode,
  message: Schema.String,
  details: Schema.optional(Schema.Unknown)
})
export type ErrorBody = typeof ErrorBody.Type

/** The answer to a request. `id` is null only when the frame was too broken to carry one. */
export const Reply = Schema.Union(
  Schema.Struct({
    v: V,
    type: Schema.Literal("reply"),
    id: Schema.NullOr(Schema.String),
    ok: Schema.Literal(true),
    result: Schema.Unknown
  }),
  Schema.Struct({
    v: V,
    type: Schema.Literal("reply"),
    id: Schema.NullOr(Schema.String),
    ok: Schema.Literal(false),
    error: ErrorBody
  })
)
export type Reply = typeof Reply.Type

/** An event of a subscription. */
export const Event = Schema.Struct({
  v: V,
  type: Schema.Literal("event"),
  subscription: Schema.String,
  ...EventRecord.fields
})
export type Event = typeof Event.Type

/** The answer to `ping`. */
export const Pong = Schema.Struct({ v: V, type: Schema.Literal("pong"), id: Schema.String })
export type Pong = typeof Pong.Type

/** Every frame a gateway may send. */
export const ServerFrame = Schema.Union(Reply, Event, Pong)
export type ServerFrame = typeof ServerFrame.Type

// --- REST ---

/** `GET /health` on a gateway (and on a worker node's port). */
export const Health = Schema.Struct({
  status: Schema.Literal("ok", "degraded"),
  service: Schema.String,
  version: Schema.String,
  environment: Schema.String,
  commit_sha: Schema.String,
  api_healthy: Schema.Boolean,
  timestamp: Schema.String
})
export type Health = typeof Health.Type

/** `GET /worker/health` on a worker node. */
export const WorkerHealth = Schema.Struct({
  status: Schema.Literal("idle", "busy", "draining"),
  active_jobs: Schema.Number,
  deploy_safe: Schema.Boolean
})
export type WorkerHealth = typeof WorkerHealth.Type

/** `GET /worker/status` on a worker node. */
export const WorkerStatus = Schema.Struct({
  worker_id: Schema.String,
  ec2_instance_id: Schema.NullOr(Schema.String),
  ec2_ip: Schema.NullOr(Schema.String),
  active_jobs: Schema.Number,
  max_concurrent: Schema.Number,
  is_running: Schema.Boolean,
  is_draining: Schema.Boolean,
  uptime_ms: Schema.Number,
  /** The node's browser (null on a worker that has none): Chromium's version once launched, its open contexts, launches, and resident memory. */
  browser: Schema.NullOr(
    Schema.Struct({
      version: Schema.NullOr(Schema.String),
      open_contexts: Schema.Number,
      launches: Schema.Number,
      chromium_rss_mb: Schema.Number
    })
  )
})
export type WorkerStatus = typeof WorkerStatus.Type

/** The body of an error response on the REST routes (the same codes as the socket). */
export const RestError = Schema.Struct({ error: ErrorBody })

/** Everything `docs/protocol.schema.json` describes. */
export const documented = {
  ClientFrame,
  ServerFrame,
  EventRecord,
  MonitoredWorker,
  JobState,
  WorkerState,
  DeregisterResult,
  Job,
  SubmitJob: SubmitJobStruct,
  Health,
  WorkerHealth,
  WorkerStatus,
  RestError
} as const
