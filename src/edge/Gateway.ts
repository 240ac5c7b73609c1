/**
 * The gateway's edge: one HTTP server (`TROUPE_HTTP_PORT`, default 3100) that serves the
 * client app's WebSocket protocol v1 at `/v1/ws` (with `ws`) and the REST compatibility
 * routes, health and metrics (with `@effect/platform`, see `Rest.ts`). Every request is a
 * thin translation onto the job service, the event stream and the monitoring queries: the
 * gateway keeps no job state of its own. See `docs/PROTOCOL.md`.
 */
import { NodeHttpServer } from "@effect/platform-node"
import type { SqlClient } from "@effect/sql"
import {
  type Cause,
  Config,
  Duration,
  Effect,
  FiberSet,
  Option,
  ParseResult,
  Redacted,
  Schema,
  type Scope
} from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Http from "node:http"
import type { Duplex } from "node:stream"
import { type WebSocket, WebSocketServer } from "ws"
import * as Edge from "../protocol/Edge.ts"
import { DeploymentConfig, listenHost, listenPort, secretFile } from "../runtime/Config.ts"
import type * as EventStream from "../runtime/jobs/EventStream.ts"
import type { JobService } from "./Jobs.ts"
import * as Monitoring from "../runtime/jobs/Monitoring.ts"
import * as Rest from "./Rest.ts"

/** How a gateway listens and protects itself. */
export interface Options {
  /** TCP port (default 3100; 0 picks a free one). */
  readonly port?: number
  /** Interface to bind (default `0.0.0.0`). */
  readonly host?: string
  /** The shared service secret (`GH_SERVICE_SECRET`). */
  readonly secret: Redacted.Redacted<string>
  /** How long a socket may stay unauthenticated (default 5 s). */
  readonly authTimeout?: Duration.DurationInput
  /** Unsent bytes a connection may hold before it counts as slow (default 8 MiB). */
  readonly sendBufferLimit?: number
  /** Frames a slow connection may have held back on top of that (default 8 MiB); past it, 1013 at once. */
  readonly maxHeldBytes?: number
  /** How long a slow connection may stay over its limit before it is closed with 1013 (default 5 s). */
  readonly slowConsumerGrace?: Duration.DurationInput
  /** WebSocket ping interval; a peer that misses a pong is dropped (default 30 s). */
  readonly keepalive?: Duration.DurationInput
  /** Requests one connection may have in flight (default 256). */
  readonly maxInflight?: number
  /** Subscriptions one connection may hold (default 1,000). */
  readonly maxSubscriptions?: number
  readonly version?: string
  readonly commitSha?: string
  readonly environment?: string
}

/** A running gateway. */
export interface Gateway {
  /** The bound port. */
  readonly port: number
  /** Open WebSocket connections (one the gateway is closing no longer counts). */
  readonly connections: () => number
}

/**
 * `TROUPE_HTTP_PORT` (default 3100), `TROUPE_HTTP_HOST` (default 0.0.0.0), `GH_SERVICE_SECRET`,
 * and the deployment `/health` reports (`DeploymentConfig`).
 */
export const GatewayConfig = Config.all({
  port: listenPort("TROUPE_HTTP_PORT", 3100),
  host: listenHost,
  secret: Config.option(Config.redacted("GH_SERVICE_SECRET")),
  deployment: DeploymentConfig
})

/** Start a gateway on a node; it serves until the scope closes. */
export const make = (
  jobs: JobService,
  events: EventStream.EventStream,
  options: Options
): Effect.Effect<Gateway, Error, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const monitoring = yield* Monitoring.make
    const connections = new Set<Connection>()
    const app = Rest.makeApp({
      secret: options.secret,
      jobs,
      events,
      monitoring,
      openConnections: () => connections.size,
      version: options.version,
      commitSha: options.commitSha,
      environment: options.environment
    })
    const httpHandler = yield* NodeHttpServer.makeHandler(app)
    const run = yield* FiberSet.makeRuntime<SqlClient.SqlClient>()
    const limits: Limits = {
      authTimeoutMs: Duration.toMillis(options.authTimeout ?? "5 seconds"),
      sendBufferLimit: options.sendBufferLimit ?? 8 * 1024 * 1024,
      maxHeldBytes: options.maxHeldBytes ?? 8 * 1024 * 1024,
      graceMs: Duration.toMillis(options.slowConsumerGrace ?? "5 seconds"),
      maxInflight: options.maxInflight ?? 256,
      maxSubscriptions: options.maxSubscriptions ?? 1000
    }
    const services: Services = { jobs, events, monitoring, secret: options.secret, limits, run }

    const wss = new WebSocketServer({
      noServer: true,
      maxPayload: Edge.maxFrameBytes,
      perMessageDeflate: false
    })
    const server = Http.createServer(httpHandler)
    server.on("upgrade", (req: Http.IncomingMessage, socket: Duplex, head: Buffer) => {
      const path = (req.url ?? "/").split("?")[0]
      if (path !== "/v1/ws") return refuseUpgrade(socket, 404, "Not Found")
      const header = req.headers.authorization
      // A wrong secret on the upgrade is refused outright; no header means "auth frame follows".
      if (header !== undefined && !Rest.authorized(header, options.secret)) {
        return refuseUpgrade(socket, 401, "Unauthorized")
      }
      wss.handleUpgrade(req, socket, head, (ws) => {
        const connection = new Connection(ws, header !== undefined, services, () =>
          connections.delete(connection)
        )
        connections.add(connection)
      })
    })

    const keepaliveMs = Duration.toMillis(options.keepalive ?? "30 seconds")
    const keepalive = setInterval(() => {
      for (const c of connections) c.keepalive()
    }, keepaliveMs)
    keepalive.unref()

    yield* Effect.async<void, Error>((resume) => {
      const onError = (e: Error) => resume(Effect.fail(e))
      server.once("error", onError)
      server.listen(options.port ?? 3100, options.host ?? "0.0.0.0", () => {
        server.off("error", onError)
        resume(Effect.void)
      })
    })
    yield* Effect.addFinalizer(() =>
      Effect.async<void>((resume) => {
        clearInterval(keepalive)
        for (const c of connections) c.close(Edge.CloseCode.goingAway, "server shutting down")
        wss.close()
        server.close(() => resume(Effect.void))
        server.closeAllConnections()
      })
    )
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : (options.port ?? 3100)
    return { port, connections: () => connections.size }
  })

/**
 * The service secret: `GH_SERVICE_SECRET`, or else one generated once and kept in
 * `secretFile(dataDir)` (mode 600), so a laptop needs no set-up. Never printed.
 */
export const resolveSecret = (
  fromEnv: Option.Option<Redacted.Redacted<string>>,
  dataDir: string
): Effect.Effect<{ readonly secret: Redacted.Redacted<string>; readonly source: string }, Error> =>
  Option.match(fromEnv, {
    onSome: (secret) => Effect.succeed({ secret, source: "GH_SERVICE_SECRET" }),
    onNone: () =>
      Effect.try({
        try: () => {
          const file = secretFile(dataDir)
          if (!Fs.existsSync(file)) {
            Fs.mkdirSync(dataDir, { recursive: true })
            Fs.writeFileSync(file, `${Crypto.randomBytes(32).toString("base64url")}\n`, {
              mode: 0o600,
              flag: "wx"
            })
          }
          return { secret: Redacted.make(Fs.readFileSync(file, "utf8").trim()), source: file }
        },
        catch: (e) => new Error(`cannot read or create the service secret file in ${dataDir}: ${String(e)}`)
      })
  })

// --- internal ---

interface Limits {
  readonly authTimeoutMs: number
  readonly sendBufferLimit: number
  readonly maxHeldBytes: number
  readonly graceMs: number
  readonly maxInflight: number
  readonly maxSubscriptions: number
}

interface Services {
  readonly jobs: JobService
  readonly events: EventStream.EventStream
  readonly monitoring: Monitoring.Monitoring
  readonly secret: Redacted.Redacted<string>
  readonly limits: Limits
  readonly run: <A, E>(effect: Effect.Effect<A, E, SqlClient.SqlClient>) => unknown
}

const refuseUpgrade = (socket: Duplex, status: number, text: string) => {
  socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`)
}

/** A request that failed: what the reply's `error` carries. */
class Failure {
  constructor(
    readonly code: Edge.ErrorCode,
    readonly message: string,
    readonly details?: unknown
  ) {}
}

const frameSchemas: Record<Edge.RequestType, Schema.Schema<any, any>> = {
  auth: Edge.Auth,
  "job.submit": Edge.JobSubmit,
  "job.cancel": Edge.JobCancel,
  "job.resume": Edge.JobResume,
  "job.get": Edge.JobGet,
  "job.events": Edge.JobEvents,
  subscribe: Edge.Subscribe,
  unsubscribe: Edge.Unsubscribe,
  "workers.list": Edge.WorkersList,
  "worker.drain": Edge.WorkerDrain,
  "worker.deregister": Edge.WorkerDeregister,
  ping: Edge.Ping
}
const decoders = Object.fromEntries(
  Object.entries(frameSchemas).map(([type, schema]) => [type, Schema.decodeUnknownEither(schema)])
) as Record<Edge.RequestType, (u: unknown) => ReturnType<ReturnType<typeof Schema.decodeUnknownEither>>>

/** Map a service error (or a defect) onto a protocol error: the same codes and messages as the REST routes. */
const toFailure = (error: unknown): Failure => {
  if (error instanceof Failure) return error
  const { error: body } = Rest.errorResponse(error).body
  return new Failure(body.code, body.message, body.details)
}

const eventCache = new WeakMap<Edge.EventRecord, string>()

/** `{"v":1,"type":"event","subscription":…,<record>}` with the record serialised once for all subscribers. */
const eventFrame = (subscription: string, record: Edge.EventRecord): string => {
  let body = eventCache.get(record)
  if (body === undefined) {
    body = JSON.stringify(record).slice(1)
    eventCache.set(record, body)
  }
  return `{"v":1,"type":"event","subscription":${JSON.stringify(subscription)},${body}`
}

interface LiveSubscription {
  unsubscribe: Effect.Effect<void> | undefined
  closed: boolean
}

/** One client connection. */
class Connection {
  private authenticated: boolean
  private authTimer: NodeJS.Timeout | undefined
  private inflight = 0
  private readonly subscriptions = new Map<string, LiveSubscription>()
  private alive = true
  private closed = false
  /** Frames held back while the socket's buffer is over its limit. */
  private held: Array<string> = []
  private heldBytes = 0
  private slowSince: number | undefined
  private slowTimer: NodeJS.Timeout | undefined

  constructor(
    private readonly ws: WebSocket,
    authenticated: boolean,
    private readonly services: Services,
    private readonly onClose: () => void
  ) {
    this.authenticated = authenticated
    if (!authenticated) {
      this.authTimer = setTimeout(
        () => this.close(Edge.CloseCode.unauthorized, "no valid auth within the time allowed"),
        services.limits.authTimeoutMs
      )
    }
    ws.on("message", (data, isBinary) => {
      try {
        this.onMessage(data as Buffer, isBinary)
      } catch (e) {
        // A bug costs one frame its answer, never the process (an exception here is uncaught).
        this.fail(null, new Failure("INTERNAL", "internal error; the gateway's log has the details"))
        this.services.run(Effect.logError("a frame could not be handled", String((e as Error)?.stack ?? e)))
      }
    })
    ws.on("pong", () => {
      this.alive = true
    })
    ws.on("error", () => {
      // ws closes the socket itself (1009 for an oversized frame, 1002 for a protocol error).
    })
    ws.on("close", () => {
      this.closed = true
      clearTimeout(this.authTimer)
      clearTimeout(this.slowTimer)
      this.held = []
      for (const sub of this.subscriptions.values()) this.endSubscription(sub)
      this.subscriptions.clear()
      this.onClose()
    })
  }

  keepalive() {
    if (!this.alive) {
      this.ws.terminate()
      return
    }
    this.alive = false
    this.ws.ping()
  }

  close(code: number, reason: string) {
    if (this.closed) return
    this.closed = true
    this.onClose()
    this.ws.close(code, reason)
    // A peer that does not answer the close handshake (or reads nothing) is cut after 2 s.
    setTimeout(() => this.ws.terminate(), 2000).unref()
  }

  private endSubscription(sub: LiveSubscription) {
    sub.closed = true
    if (sub.unsubscribe !== undefined) this.services.run(sub.unsubscribe)
  }

  // --- sending, with a bounded buffer ---

  private send(text: string) {
    if (this.closed) return
    if (this.held.length > 0 || this.ws.bufferedAmount > this.services.limits.sendBufferLimit) {
      this.hold(text)
      return
    }
    this.ws.send(text)
  }

  private hold(text: string) {
    const { graceMs } = this.services.limits
    this.held.push(text)
    this.heldBytes += text.length
    if (this.heldBytes > this.services.limits.maxHeldBytes) {
      // Past both the socket's buffer and our own: the peer cannot keep up. It resumes by
      // event id after reconnecting, so nothing is lost by closing.
      this.close(Edge.CloseCode.tryAgainLater, "slow consumer: send buffer overflowed")
      this.held = []
      this.heldBytes = 0
      return
    }
    if (this.slowSince === undefined) {
      this.slowSince = Date.now()
      this.slowTimer = setInterval(() => this.flushHeld(), 25)
    } else if (Date.now() - this.slowSince > graceMs) {
      this.close(Edge.CloseCode.tryAgainLater, "slow consumer: send buffer stayed full")
    }
  }

  private flushHeld() {
    const { sendBufferLimit, graceMs } = this.services.limits
    if (this.closed) {
      clearInterval(this.slowTimer)
      return
    }
    while (this.held.length > 0 && this.ws.bufferedAmount <= sendBufferLimit) {
      const text = this.held.shift()!
      this.heldBytes -= text.length
      this.ws.send(text)
    }
    if (this.held.length === 0) {
      clearInterval(this.slowTimer)
      this.slowTimer = undefined
      this.slowSince = undefined
    } else if (this.slowSince !== undefined && Date.now() - this.slowSince > graceMs) {
      clearInterval(this.slowTimer)
      this.close(Edge.CloseCode.tryAgainLater, "slow consumer: send buffer stayed full")
    }
  }

  private reply(id: string | null, result: unknown) {
    this.send(JSON.stringify({ v: 1, type: "reply", id, ok: true, result }))
  }

  private fail(id: string | null, failure: Failure) {
    // Bounded whatever the frame: messages and details may quote what the client sent.
    const message = clip(failure.message, 2000)
    const details =
      failure.details === undefined || JSON.stringify(failure.details).length > 16_384
        ? undefined
        : failure.details
    const error =
      details === undefined ? { code: failure.code, message } : { code: failure.code, message, details }
    this.send(JSON.stringify({ v: 1, type: "reply", id, ok: false, error }))
  }

  // --- receiving ---

  private onMessage(data: Buffer, isBinary: boolean) {
    if (this.closed) return
    if (isBinary) {
      return this.fail(
        null,
        new Failure(
          "INVALID_FRAME",
          "invalid frame: binary frames are not accepted; send JSON as a text frame"
        )
      )
    }
    let json: unknown
    try {
      json = JSON.parse(data.toString("utf8"))
    } catch (e) {
      return this.fail(
        null,
        new Failure(
          "INVALID_FRAME",
          `invalid frame: not JSON (${String((e as Error).message).slice(0, 200)}); send one JSON object per text frame`
        )
      )
    }
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return this.fail(
        null,
        new Failure("INVALID_FRAME", "invalid frame: not a JSON object; send one JSON object per text frame")
      )
    }
    const frame = json as Record<string, unknown>
    const id = typeof frame.id === "string" && frame.id.length > 0 && frame.id.length <= 200 ? frame.id : null
    const malformed = Rest.malformedValue(json)
    if (malformed !== undefined)
      return this.fail(id, new Failure("INVALID_FRAME", `invalid frame: ${malformed}`))
    if (frame.v !== Edge.version) {
      return this.fail(
        id,
        new Failure(
          "INVALID_FRAME",
          `invalid frame: unsupported version ${String(JSON.stringify(frame.v)).slice(0, 100)}; this gateway speaks v 1`
        )
      )
    }
    const type = frame.type
    if (typeof type !== "string" || !Object.hasOwn(decoders, type)) {
      return this.fail(
        id,
        new Failure(
          "INVALID_FRAME",
          `invalid frame: unknown type ${JSON.stringify(type)?.slice(0, 100)}; expected one of ${Edge.requestTypes.join(", ")}`
        )
      )
    }
    const decoded = decoders[type as Edge.RequestType](json)
    if (decoded._tag === "Left") {
      const issues = ParseResult.ArrayFormatter.formatErrorSync(decoded.left)
        .slice(0, 20)
        .map((issue) => ({ path: issue.path, message: clip(issue.message, 500) }))
      return this.fail(
        id,
        new Failure(
          "INVALID_FRAME",
          `invalid request: ${issues.map((i) => `${i.path.join(".") || type}: ${i.message}`).join("; ")}`.slice(
            0,
            2000
          ),
          { issues }
        )
      )
    }
    const request = decoded.right as Edge.ClientFrame
    if (request.type === "auth") return this.onAuth(request.id, request.token)
    if (!this.authenticated) {
      return this.fail(
        id,
        new Failure(
          "UNAUTHORIZED",
          "not authenticated: send an auth frame with the service secret first, or connect with Authorization: Bearer <secret>"
        )
      )
    }
    if (request.type === "ping") {
      return this.send(JSON.stringify({ v: 1, type: "pong", id: request.id }))
    }
    if (this.inflight >= this.services.limits.maxInflight) {
      return this.fail(
        request.id,
        new Failure(
          "OVERLOADED",
          `too many requests in flight on this connection (${this.services.limits.maxInflight}): wait for replies`
        )
      )
    }
    this.inflight++
    this.services.run(
      this.handle(request, frame).pipe(
        Effect.matchCause({
          onFailure: (cause) => {
            const failure = toFailure(findFailure(cause))
            this.fail(request.id, failure)
            if (failure.code === "INTERNAL")
              this.services.run(Effect.logError(`${request.type} failed`, cause))
          },
          onSuccess: (result) => {
            if (result !== noReply) this.reply(request.id, result)
          }
        }),
        Effect.ensuring(
          Effect.sync(() => {
            this.inflight--
          })
        )
      )
    )
  }

  private onAuth(id: string, token: string) {
    if (Rest.sameSecret(token, this.services.secret)) {
      this.authenticated = true
      clearTimeout(this.authTimer)
      return this.reply(id, { authenticated: true })
    }
    this.fail(
      id,
      new Failure("UNAUTHORIZED", "wrong secret: the token does not match GH_SERVICE_SECRET; closing")
    )
    this.close(Edge.CloseCode.unauthorized, "unauthorized")
  }

  private handle(
    request: Edge.ClientFrame,
    raw: Record<string, unknown>
  ): Effect.Effect<unknown, unknown, never> {
    const { jobs, events, monitoring } = this.services
    switch (request.type) {
      case "job.submit":
        // The raw job, so the service reports unknown fields instead of dropping them.
        return jobs.submit(raw.job)
      case "job.cancel":
        return jobs.cancel(request.job_id, request.reason)
      case "job.resume":
        return jobs.resume(request.job_id, {
          resolved_by: request.resolved_by,
          resolution_data: request.resolution_data
        })
      case "job.get":
        return jobs.get(request.job_id)
      case "job.events":
        return Effect.map(
          events.history(request.job_id, { sinceEventId: request.since_event_id }),
          (list) => ({
            events: list
          })
        )
      case "subscribe":
        return this.subscribe(request)
      case "unsubscribe": {
        const sub = this.subscriptions.get(request.subscription)
        if (sub === undefined) {
          return Effect.fail(
            new Failure("NOT_FOUND", `no subscription "${request.subscription}" on this connection`)
          )
        }
        this.subscriptions.delete(request.subscription)
        this.endSubscription(sub)
        return Effect.succeed({ subscription: request.subscription })
      }
      case "workers.list":
        return Effect.map(monitoring.workers, (workers) => ({ workers }))
      case "worker.drain":
        return jobs.drain(request.worker_id, request.reason)
      case "worker.deregister": {
        const { v: _v, type: _type, id: _id, ...input } = raw
        return jobs.deregister(input)
      }
      case "auth":
      case "ping":
        return Effect.succeed(noReply)
    }
  }

  private subscribe(request: Extract<Edge.ClientFrame, { type: "subscribe" }>) {
    const name = request.id
    if (this.subscriptions.has(name)) {
      return Effect.fail(
        new Failure(
          "CONFLICT",
          `subscription "${name}" already exists on this connection: use a new request id`
        )
      )
    }
    if (this.subscriptions.size >= this.services.limits.maxSubscriptions) {
      return Effect.fail(
        new Failure(
          "OVERLOADED",
          `too many subscriptions on this connection (${this.services.limits.maxSubscriptions}): unsubscribe some first`
        )
      )
    }
    const filter: EventStream.EventFilter =
      "job_id" in request
        ? { job_id: request.job_id }
        : "valet_task_id" in request
          ? { valet_task_id: request.valet_task_id }
          : "worker_id" in request
            ? { worker_id: request.worker_id }
            : { all: true }
    const sub: LiveSubscription = { unsubscribe: undefined, closed: false }
    this.subscriptions.set(name, sub)
    return this.services.events
      .subscribe(filter, {
        sinceEventId: request.since_event_id,
        // Straight to the socket, replay included: its bounded buffer (1013) is the only
        // place events wait, however long the replay.
        onEvent: (event) => {
          if (!sub.closed) this.send(eventFrame(name, event))
        }
      })
      .pipe(
        Effect.tapError(() =>
          Effect.sync(() => {
            // Only its own entry: an unsubscribe and a new subscribe of the same name may have come meanwhile.
            if (this.subscriptions.get(name) === sub) this.subscriptions.delete(name)
          })
        ),
        Effect.map((subscription) => {
          sub.unsubscribe = subscription.unsubscribe
          // Ended meanwhile (an unsubscribe, or the socket closed): stopped, but still answered once.
          if (sub.closed || this.closed) this.services.run(subscription.unsubscribe)
          // After the replayed events (and any live ones that came meanwhile).
          this.reply(name, {
            subscription: name,
            replayed: subscription.replayed,
            position: subscription.position
          })
          return noReply
        })
      )
  }
}

const noReply = Symbol.for("troupe/Gateway/noReply")

const clip = (text: string, max: number) => (text.length > max ? `${text.slice(0, max)}…` : text)

const findFailure = (cause: Cause.Cause<unknown>): unknown => {
  switch (cause._tag) {
    case "Fail":
      return cause.error
    case "Die":
      return cause.defect instanceof Failure ? cause.defect : undefined
    case "Sequential":
    case "Parallel":
      return findFailure(cause.left) ?? findFailure(cause.right)
    default:
      return undefined
  }
}
