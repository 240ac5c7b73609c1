/**
 * The gateway's REST compatibility routes, health and metrics (`@effect/platform`), served by
 * the gateway's HTTP server beside the WebSocket (`Gateway.ts`). A thin translation onto the
 * job service and the monitoring queries:
 *
 * - `GET /health` (no auth): `Health`, with `api_healthy` from a `SELECT 1` (2 s at most);
 *   200 when ok, 503 when degraded.
 * - `GET /metrics` (no auth): Prometheus text format 0.0.4.
 * - `GET /api/v1/monitoring/workers`, `POST /api/v1/workers/deregister`, `POST /api/v1/jobs`,
 *   `GET /api/v1/jobs/:id`, `POST /api/v1/jobs/:id/cancel`, `POST /api/v1/jobs/:id/resume`,
 *   `GET /api/v1/jobs/:id/events?since_event_id=`: everything under `/api/` needs
 *   `Authorization: Bearer <GH_SERVICE_SECRET>` (reads too: job payloads are private).
 *
 * Errors answer with `RestError` (`{error: {code, message, details?}}`), the codes of the
 * socket: 400 `INVALID_FRAME`, 401 `UNAUTHORIZED`, 404 `NOT_FOUND`, 409 `CONFLICT` and
 * `WORKER_UNAVAILABLE`, 413 `INVALID_FRAME` (body over 1 MiB), 504 `TIMEOUT`, 500 `INTERNAL`.
 */
import { type HttpApp, HttpRouter, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeHttpServerRequest } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { Cause, Effect, Either, ParseResult, type Redacted, Schema } from "effect"
import packageJson from "../../package.json" with { type: "json" }
import * as Edge from "../protocol/Edge.ts"
import {
  DeregisterRequest,
  DeregisterResult,
  isJobId,
  Job,
  JobState,
  Resolution,
  SubmitJob
} from "../protocol/Jobs.ts"
import type { EventStream } from "../runtime/jobs/EventStream.ts"
import type { JobService } from "./Jobs.ts"
import type { Monitoring } from "../runtime/jobs/Monitoring.ts"
import { gauge } from "../runtime/jobs/Monitoring.ts"
import { authorized } from "./Auth.ts"
import * as EdgeError from "./EdgeError.ts"

/** What the REST routes need. */
export interface RestOptions {
  /** The shared service secret (`GH_SERVICE_SECRET`). */
  readonly secret: Redacted.Redacted<string>
  readonly jobs: JobService
  /** Job events come from the event stream, exactly as the socket's `job.events` gives them. */
  readonly events: EventStream
  readonly monitoring: Monitoring
  /** The gateway's open WebSocket connections, for `/metrics`. */
  readonly openConnections: () => number
  /** Default: `version` of package.json. */
  readonly version?: string
  /** Default `unknown` (a node reads `DeploymentConfig` once and passes it). */
  readonly commitSha?: string
  /** Default `development` (as `commitSha`). */
  readonly environment?: string
}

/** The largest request body accepted (1 MiB, as a socket frame); a larger one gets 413. */
export const maxBodyBytes = Edge.maxFrameBytes

/** The `service` that `GET /health` reports. */
export const serviceName = "troupe-gateway"

/** The REST routes, health and metrics as one HTTP app (serve it with `NodeHttpServer.makeHandler`). */
export const makeApp = (options: RestOptions): HttpApp.Default<never, SqlClient.SqlClient> => {
  const { jobs, monitoring, secret } = options

  // --- Health ---

  const health = Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const apiHealthy = yield* sql`SELECT 1`.pipe(
      Effect.disconnect,
      Effect.timeout("2 seconds"),
      Effect.as(true),
      Effect.catchAllCause(() => Effect.succeed(false))
    )
    const body: Edge.Health = {
      status: apiHealthy ? "ok" : "degraded",
      service: serviceName,
      version: options.version ?? packageJson.version,
      environment: options.environment ?? "development",
      commit_sha: options.commitSha ?? "unknown",
      api_healthy: apiHealthy,
      timestamp: new Date().toISOString()
    }
    return HttpServerResponse.unsafeJson(body, { status: apiHealthy ? 200 : 503 })
  })

  // --- Metrics ---

  const metrics = Effect.map(monitoring.metrics, (text) =>
    HttpServerResponse.text(
      text +
        gauge("troupe_websocket_connections", "Open WebSocket connections on this gateway.", [
          [{}, options.openConnections()]
        ]),
      { contentType: "text/plain; version=0.0.4; charset=utf-8" }
    )
  )

  // --- Workers ---

  const workers = Effect.map(monitoring.workers, (list) =>
    respond(Edge.Results["workers.list"], { workers: list })
  )

  const deregister = Effect.gen(function* () {
    const input = yield* jsonBody(false)
    const request = yield* validate(DeregisterRequest, input)
    return respond(DeregisterResult, yield* jobs.deregisterWith(request))
  })

  // --- Jobs ---

  const submit = Effect.gen(function* () {
    const input = yield* jsonBody(false)
    const job = yield* jobs.submitJob(yield* validate(SubmitJob, input))
    return respond(Job, job, { status: 201, headers: { location: `/api/v1/jobs/${job.id}` } })
  })

  const get = Effect.gen(function* () {
    const id = yield* jobId
    return respond(Job, yield* jobs.get(id))
  })

  const cancel = Effect.gen(function* () {
    const id = yield* jobId
    const input = yield* jsonBody(true)
    const { reason } = yield* validate(CancelBody, input ?? {})
    return respond(JobState, yield* jobs.cancel(id, reason))
  })

  const resume = Effect.gen(function* () {
    const id = yield* jobId
    const input = yield* jsonBody(false)
    const resolution = yield* validate(Resolution, input)
    return respond(JobState, yield* jobs.resumeWith(id, resolution))
  })

  const events = Effect.gen(function* () {
    const id = yield* jobId
    const search = yield* HttpServerRequest.ParsedSearchParams
    const since = search.since_event_id
    if (since !== undefined && (typeof since !== "string" || !/^[0-9]{1,18}$/.test(since))) {
      return yield* EdgeError.refuse("INVALID_FRAME", "since_event_id must be one event id (a number)", {
        since_event_id: since
      })
    }
    const list = yield* options.events.history(id, { sinceEventId: since })
    return respond(Edge.Results["job.events"], { events: list })
  })

  const router = HttpRouter.empty.pipe(
    HttpRouter.get("/health", health),
    HttpRouter.get("/metrics", metrics),
    HttpRouter.get("/api/v1/monitoring/workers", workers),
    HttpRouter.post("/api/v1/workers/deregister", deregister),
    HttpRouter.post("/api/v1/jobs", submit),
    HttpRouter.get("/api/v1/jobs/:id", get),
    HttpRouter.post("/api/v1/jobs/:id/cancel", cancel),
    HttpRouter.post("/api/v1/jobs/:id/resume", resume),
    HttpRouter.get("/api/v1/jobs/:id/events", events)
  )

  return Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    // Before routing: an unauthenticated caller learns nothing, not even which routes exist.
    // Everything but the two public paths, spelled exactly, needs the secret: the router
    // ignores case, merges slashes and decodes `%xx`, so `//API/v1/…` must not slip past.
    if (!publicPaths.has(request.url.split("?")[0]!) && !authorized(request.headers.authorization, secret)) {
      return yield* EdgeError.refuse(
        "UNAUTHORIZED",
        "missing or wrong service secret: send Authorization: Bearer <GH_SERVICE_SECRET>"
      )
    }
    return yield* router
  }).pipe(
    Effect.catchAllCause((cause) =>
      Effect.gen(function* () {
        if (Cause.isInterruptedOnly(cause)) return yield* Effect.interrupt
        const failure = EdgeError.fromCause(cause)
        const { status } = failure
        if (status === 500) {
          const request = yield* HttpServerRequest.HttpServerRequest
          yield* Effect.logWarning(
            `${request.method} ${request.url.split("?")[0]} failed`,
            EdgeError.redactCause(cause)
          )
        }
        const body: typeof Edge.RestError.Type = { error: EdgeError.errorBody(failure) }
        const response = HttpServerResponse.unsafeJson(body, { status })
        return status === 401
          ? HttpServerResponse.setHeader(response, "www-authenticate", "Bearer")
          : response
      })
    )
  )
}

// --- internal ---

/** The paths anyone may read (load balancers, Prometheus): everything else needs the secret. */
const publicPaths = new Set(["/health", "/metrics"])

/**
 * A JSON response of exactly the protocol's shape: encoded with its Schema, which drops any
 * field outside the contract (a service's internal column, say).
 */
const respond = <A, I>(
  schema: Schema.Schema<A, I, never>,
  value: A,
  options?: { readonly status?: number; readonly headers?: Record<string, string> }
) => HttpServerResponse.unsafeJson(Schema.encodeSync(schema)(value), options)

/** The `:id` of a job route; an id that is not a uuid names no job (404). */
const jobId = Effect.flatMap(HttpRouter.params, (params) => {
  const id = params.id ?? ""
  return isJobId(id)
    ? Effect.succeed(id)
    : Effect.fail(
        EdgeError.refuse("NOT_FOUND", `no job "${id.slice(0, 80)}": job ids are uuids`, {
          what: "job",
          id: id.slice(0, 200)
        })
      )
})

const tooLarge = () =>
  EdgeError.refuse(
    "INVALID_FRAME",
    `the body is larger than ${maxBodyBytes} bytes`,
    { max_bytes: maxBodyBytes },
    413
  )

/**
 * The request body as JSON (at most `maxBodyBytes`; `undefined` for an empty body when
 * `optional`). Read from the Node request directly: past the limit it stops collecting and
 * lets Node discard the rest, so the 413 still reaches the client (the platform's limit
 * destroys the socket instead).
 */
const jsonBody = (optional: boolean) =>
  Effect.gen(function* () {
    const request = yield* HttpServerRequest.HttpServerRequest
    const declared = Number(request.headers["content-length"] ?? "0")
    if (declared > maxBodyBytes) return yield* tooLarge()
    const source = NodeHttpServerRequest.toIncomingMessage(request)
    const text = yield* Effect.async<string, EdgeError.EdgeFailure>((resume) => {
      const chunks: Array<Buffer> = []
      let bytes = 0
      const cleanup = () => {
        source.off("data", onData)
        source.off("end", onEnd)
        source.off("error", onError)
      }
      const onData = (chunk: Buffer) => {
        bytes += chunk.length
        if (bytes > maxBodyBytes) {
          cleanup()
          source.resume()
          resume(Effect.fail(tooLarge()))
        } else chunks.push(chunk)
      }
      const onEnd = () => {
        cleanup()
        resume(Effect.succeed(Buffer.concat(chunks).toString("utf8")))
      }
      const onError = () => {
        cleanup()
        resume(Effect.fail(EdgeError.refuse("INVALID_FRAME", "the request body could not be read")))
      }
      source.on("data", onData)
      source.on("end", onEnd)
      source.on("error", onError)
      return Effect.sync(cleanup)
    })
    if (text.trim().length === 0) {
      if (optional) return undefined
      return yield* EdgeError.refuse("INVALID_FRAME", "the body is empty: send a JSON object")
    }
    const parsed = decodeJson(text)
    if (Either.isLeft(parsed)) {
      return yield* EdgeError.refuse("INVALID_FRAME", "the body is not valid JSON")
    }
    const malformed = EdgeError.malformedValue(parsed.right)
    if (malformed !== undefined) {
      return yield* EdgeError.refuse("INVALID_FRAME", `invalid request: ${malformed}`)
    }
    return parsed.right
  })
const decodeJson = Schema.decodeUnknownEither(Schema.parseJson())

/** Decode a body with its Schema (unknown fields are errors), with the issues as `details`: the value the service gets. */
const validate = <A, I>(schema: Schema.Schema<A, I, never>, input: unknown) =>
  Effect.suspend(() => {
    const decoded = Schema.decodeUnknownEither(schema)(input, { onExcessProperty: "error", errors: "all" })
    if (Either.isRight(decoded)) return Effect.succeed(decoded.right)
    return Effect.fail(
      EdgeError.refuse("INVALID_FRAME", "the body does not match its schema", {
        issues: ParseResult.ArrayFormatter.formatErrorSync(decoded.left).slice(0, 20)
      })
    )
  })

const CancelBody = Schema.Struct({
  reason: Schema.optional(Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200)))
})
