/**
 * One client connection on the gateway's WebSocket (`/v1/ws`): its authentication and auth
 * deadline, the bounded send buffer, the decoding of each frame (checked once, decoded once
 * with the `Edge.ClientFrame` member its `type` names), the dispatch onto the job service,
 * the event stream and the monitoring queries, and its subscriptions. Its timers are fibers
 * of one scope, run in the gateway's and closed when the socket is gone. See
 * `docs/PROTOCOL.md`.
 */
import type { SqlClient } from "@effect/sql"
import {
  Deferred,
  Duration,
  Effect,
  Either,
  type Fiber,
  FiberId,
  ParseResult,
  Predicate,
  type Redacted,
  Schema
} from "effect"
import type { WebSocket } from "ws"
import * as Edge from "../protocol/Edge.ts"
import { Resolution } from "../protocol/Jobs.ts"
import type * as EventStream from "../runtime/jobs/EventStream.ts"
import type * as Monitoring from "../runtime/jobs/Monitoring.ts"
import * as Auth from "./Auth.ts"
import * as EdgeError from "./EdgeError.ts"
import type { JobService } from "./Jobs.ts"

/** What one connection may hold, and for how long. */
export interface Limits {
  /** How long a socket may stay unauthenticated. */
  readonly authTimeout: Duration.Duration
  /** Unsent bytes the socket may hold before the connection counts as slow. */
  readonly sendBufferLimit: number
  /** Bytes of frames a slow connection may hold back on top of that; past it, 1013 at once. */
  readonly maxHeldBytes: number
  /** How long a connection may stay slow before it is closed with 1013. */
  readonly graceMs: number
  readonly maxInflight: number
  readonly maxSubscriptions: number
}

/** What the connections of one gateway serve from. */
export interface Services {
  readonly jobs: JobService
  readonly events: EventStream.EventStream
  readonly monitoring: Monitoring.Monitoring
  readonly secret: Redacted.Redacted<string>
  readonly limits: Limits
  /** Run an effect in the gateway's scope (interrupted when the gateway stops). */
  readonly run: <A, E>(effect: Effect.Effect<A, E, SqlClient.SqlClient>) => Fiber.RuntimeFiber<A, E>
}

/** One client connection, from its upgrade until its socket is gone. */
export class Connection {
  private authenticated: boolean
  private inflight = 0
  private readonly subscriptions = new Map<string, LiveSubscription>()
  private alive = true
  private closed = false
  /** Frames held back while the socket's buffer is over its limit. */
  private held: Array<string> = []
  private heldBytes = 0
  private slowSince: number | undefined
  /** Open while frames are held back: the flusher runs only then. */
  private readonly slow = Effect.unsafeMakeLatch(false)
  /** Done once `close` was called or the socket closed. */
  private readonly closing = Deferred.unsafeMake<void>(FiberId.none)
  /** Done once the socket closed. */
  private readonly ended = Deferred.unsafeMake<void>(FiberId.none)

  constructor(
    private readonly ws: WebSocket,
    authenticated: boolean,
    private readonly services: Services,
    private readonly onClose: () => void
  ) {
    this.authenticated = authenticated
    ws.on("message", (data, isBinary) => {
      try {
        this.onMessage(data as Buffer, isBinary)
      } catch (e) {
        // A bug costs one frame its answer, never the process (an exception here is uncaught).
        this.fail(null, EdgeError.internal())
        this.services.run(
          Effect.logError("a frame could not be handled", e instanceof Error ? String(e.stack) : String(e))
        )
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
      this.held = []
      for (const sub of this.subscriptions.values()) this.endSubscription(sub)
      this.subscriptions.clear()
      this.onClose()
      Deferred.unsafeDone(this.ended, Effect.void)
      Deferred.unsafeDone(this.closing, Effect.void)
    })
    services.run(this.live())
  }

  /** Ping the peer; one that did not answer the previous ping is cut. */
  keepalive() {
    if (!this.alive) {
      this.ws.terminate()
      return
    }
    this.alive = false
    this.ws.ping()
  }

  /** Close with a code and reason; the connection no longer counts as open. */
  close(code: number, reason: string) {
    if (this.closed) return
    this.closed = true
    this.slow.unsafeClose()
    this.onClose()
    this.ws.close(code, reason)
    Deferred.unsafeDone(this.closing, Effect.void)
  }

  /** The connection's timers, in one scope that closes when the socket is gone (or the gateway stops). */
  private live(): Effect.Effect<void> {
    const { authTimeout } = this.services.limits
    const authDeadline = Effect.sleep(authTimeout).pipe(
      Effect.zipRight(
        Effect.sync(() => {
          if (!this.authenticated)
            this.close(Edge.CloseCode.unauthorized, "no valid auth within the time allowed")
        })
      )
    )
    const flusher = this.slow.await.pipe(
      Effect.zipRight(Effect.sleep(flushInterval)),
      Effect.zipRight(Effect.sync(() => this.flushHeld())),
      Effect.forever
    )
    return Effect.gen(this, function* () {
      if (!this.authenticated) yield* Effect.forkScoped(authDeadline)
      yield* Effect.forkScoped(flusher)
      yield* Deferred.await(this.closing)
      // A peer that does not answer the close handshake (or reads nothing) is cut after 2 s.
      yield* Effect.timeoutOption(Deferred.await(this.ended), closeHandshake)
    }).pipe(Effect.scoped, Effect.ensuring(Effect.sync(() => this.ws.terminate())))
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
      this.slow.unsafeOpen()
    } else if (Date.now() - this.slowSince > graceMs) {
      this.close(Edge.CloseCode.tryAgainLater, "slow consumer: send buffer stayed full")
    }
  }

  private flushHeld() {
    if (this.closed) return
    const { sendBufferLimit, graceMs } = this.services.limits
    while (this.held.length > 0 && this.ws.bufferedAmount <= sendBufferLimit) {
      const text = this.held.shift()!
      this.heldBytes -= text.length
      this.ws.send(text)
    }
    if (this.held.length === 0) {
      this.slow.unsafeClose()
      this.slowSince = undefined
    } else if (this.slowSince !== undefined && Date.now() - this.slowSince > graceMs) {
      this.close(Edge.CloseCode.tryAgainLater, "slow consumer: send buffer stayed full")
    }
  }

  private reply(id: string | null, result: unknown) {
    this.send(JSON.stringify({ v: 1, type: "reply", id, ok: true, result }))
  }

  private fail(id: string | null, failure: EdgeError.EdgeFailure) {
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
    const decoded = decodeFrame(data, isBinary)
    if (Either.isLeft(decoded)) return this.fail(decoded.left.id, decoded.left.failure)
    const { request, frame } = decoded.right
    if (request.type === "auth") return this.onAuth(request.id, request.token)
    if (!this.authenticated) {
      return this.fail(
        request.id,
        EdgeError.refuse(
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
        EdgeError.refuse(
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
            const failure = EdgeError.fromCause(cause)
            this.fail(request.id, failure)
            if (failure.code === "INTERNAL")
              this.services.run(Effect.logError(`${request.type} failed`, EdgeError.redactCause(cause)))
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
    if (Auth.sameSecret(token, this.services.secret)) {
      this.authenticated = true
      return this.reply(id, { authenticated: true })
    }
    this.fail(
      id,
      EdgeError.refuse("UNAUTHORIZED", "wrong secret: the token does not match GH_SERVICE_SECRET; closing")
    )
    this.close(Edge.CloseCode.unauthorized, "unauthorized")
  }

  private handle(request: Edge.ClientFrame, frame: Frame): Effect.Effect<unknown, EdgeError.DoorError> {
    const { jobs, events, monitoring } = this.services
    switch (request.type) {
      case "job.submit":
        // The raw job, decoded again by the service, which reports unknown fields (the frame's
        // decoder drops them).
        return jobs.submit(frame.job)
      case "job.cancel":
        return jobs.cancel(request.job_id, request.reason)
      case "job.resume":
        // Its fields are `Resolution`'s, decoded with the frame already.
        return jobs.resumeWith(
          request.job_id,
          new Resolution(
            { resolved_by: request.resolved_by, resolution_data: request.resolution_data },
            { disableValidation: true }
          )
        )
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
            EdgeError.refuse("NOT_FOUND", `no subscription "${request.subscription}" on this connection`)
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
        // As for job.submit: the raw fields, so unknown ones are reported, not dropped.
        const { v: _v, type: _type, id: _id, ...input } = frame
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
        EdgeError.refuse(
          "CONFLICT",
          `subscription "${name}" already exists on this connection: use a new request id`
        )
      )
    }
    if (this.subscriptions.size >= this.services.limits.maxSubscriptions) {
      return Effect.fail(
        EdgeError.refuse(
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

// --- internal ---

/** How often held frames are tried again while the socket's buffer is over its limit. */
const flushInterval = Duration.millis(25)

/** How long a closed connection waits for the peer's half of the close handshake. */
const closeHandshake = Duration.seconds(2)

/** A frame that parsed as a JSON object. */
type Frame = { readonly [key: string]: unknown }

/** A frame that cannot be handled: the id to answer (when it carries a usable one) and why. */
interface Refused {
  readonly id: string | null
  readonly failure: EdgeError.EdgeFailure
}

/** A request decoded with the `ClientFrame` member its `type` names, and the object it came from. */
interface Decoded {
  readonly request: Edge.ClientFrame
  readonly frame: Frame
}

/** Each request type's decoder, taken from `Edge.ClientFrame`'s members. */
const decoders: ReadonlyMap<string, (u: unknown) => Either.Either<Edge.ClientFrame, ParseResult.ParseError>> =
  new Map(
    Edge.ClientFrame.members.map(
      (member) => [Edge.typeOf(member), Schema.decodeUnknownEither(Schema.asSchema(member))] as const
    )
  )

/**
 * A text frame as a request: JSON, one object (checked once), well-formed text no deeper
 * than `EdgeError.maxDepth`, version 1, a known type, then decoded once with that type's
 * schema. Each refusal says what to send instead.
 */
const decodeFrame = (data: Buffer, isBinary: boolean): Either.Either<Decoded, Refused> => {
  const invalid = (id: string | null, message: string, details?: unknown) =>
    Either.left({ id, failure: EdgeError.refuse("INVALID_FRAME", message, details) })
  if (isBinary)
    return invalid(null, "invalid frame: binary frames are not accepted; send JSON as a text frame")
  let json: unknown
  try {
    json = JSON.parse(data.toString("utf8"))
  } catch (e) {
    const reason = e instanceof Error ? e.message : String(e)
    return invalid(
      null,
      `invalid frame: not JSON (${reason.slice(0, 200)}); send one JSON object per text frame`
    )
  }
  if (!Predicate.isRecord(json)) {
    return invalid(null, "invalid frame: not a JSON object; send one JSON object per text frame")
  }
  const id = typeof json.id === "string" && json.id.length > 0 && json.id.length <= 200 ? json.id : null
  const malformed = EdgeError.malformedValue(json)
  if (malformed !== undefined) return invalid(id, `invalid frame: ${malformed}`)
  if (json.v !== Edge.version) {
    return invalid(
      id,
      `invalid frame: unsupported version ${String(JSON.stringify(json.v)).slice(0, 100)}; this gateway speaks v 1`
    )
  }
  const type = json.type
  const decode = typeof type === "string" ? decoders.get(type) : undefined
  if (decode === undefined) {
    return invalid(
      id,
      `invalid frame: unknown type ${JSON.stringify(type)?.slice(0, 100)}; expected one of ${Edge.requestTypes.join(", ")}`
    )
  }
  const decoded = decode(json)
  if (Either.isLeft(decoded)) {
    const issues = ParseResult.ArrayFormatter.formatErrorSync(decoded.left)
      .slice(0, 20)
      .map((issue) => ({ path: issue.path, message: clip(issue.message, 500) }))
    return invalid(
      id,
      `invalid request: ${issues.map((i) => `${i.path.join(".") || type}: ${i.message}`).join("; ")}`.slice(
        0,
        2000
      ),
      { issues }
    )
  }
  return Either.right({ request: decoded.right, frame: json })
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

/** A subscription of this connection; `unsubscribe` is set once the stream has it. */
interface LiveSubscription {
  unsubscribe: Effect.Effect<void> | undefined
  closed: boolean
}

/** What a request that answers by itself (auth, ping, subscribe) returns instead of a result. */
const noReply = Symbol.for("troupe/Gateway/noReply")

const clip = (text: string, max: number) => (text.length > max ? `${text.slice(0, max)}…` : text)
