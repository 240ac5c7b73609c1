/**
 * The typed client of the gateway's WebSocket protocol v1 (`src/protocol/Edge.ts`), as an
 * Effect API. One connection per client: it authenticates (`Authorization: Bearer` on the
 * upgrade, or an `auth` frame), reconnects with backoff after a drop, resumes every live
 * subscription from the last event it delivered, and times out requests. See
 * `docs/CLIENT.md`; the Promise facade is `Promise.ts`.
 */
import {
  Clock,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  FiberId,
  Layer,
  Mailbox,
  Queue,
  Redacted,
  Schedule,
  Schema,
  type Scope,
  Stream
} from "effect"
import WebSocket from "ws"
import * as Edge from "../protocol/Edge.ts"
import type {
  DeregisterRequest,
  DeregisterResult,
  Job,
  JobState,
  SubmitJob,
  WorkerState
} from "../protocol/Jobs.ts"

// --- Errors ---

/** The codes a client error carries: the protocol's, plus `DISCONNECTED`. */
export const ClientErrorCode = Schema.Union(Edge.ErrorCode, Schema.Literal("DISCONNECTED"))
export type ClientErrorCode = typeof ClientErrorCode.Type

/**
 * A request that failed. `code` is the gateway's error code, or `TIMEOUT` when no reply
 * came within the request timeout (the request may still take effect), or `DISCONNECTED`
 * when the request could not be sent, or its reply could not arrive, because the
 * connection was down or dropped (a mutation may or may not have taken effect: read the
 * job before retrying).
 */
export class TroupeClientError extends Schema.TaggedError<TroupeClientError>()("TroupeClientError", {
  code: ClientErrorCode,
  message: Schema.String,
  details: Schema.optional(Schema.Unknown)
}) {}

// --- API ---

/** What `subscribe` follows: one job, the jobs of one `valet_task_id`, one worker, or everything. */
export type Filter =
  | { readonly job_id: string }
  | { readonly valet_task_id: string }
  | { readonly worker_id: string }
  | { readonly all: true }

/** A job submission as sent (the fields `SubmitJob` defaults may be left out). */
export type SubmitInput = Schema.Schema.Encoded<typeof SubmitJob>

/** A deregistration as sent (`worker_id` or `target_worker_id`; the rest defaults). */
export type DeregisterInput = Schema.Schema.Encoded<typeof DeregisterRequest>

/** A human's answer to a `needs_human` job. */
export interface ResumeInput {
  readonly resolved_by: string
  readonly resolution_data?: unknown
}

/** A live subscription (see `TroupeClient.subscription`). */
export interface Subscription {
  /** Every event of the subscription, exactly once and in order, across reconnects. */
  readonly events: Stream.Stream<Edge.EventRecord, TroupeClientError>
  /** How many stored events the gateway replayed when the subscription was first made. */
  readonly replayed: number
}

/** A connected client. Every request fails with a `TroupeClientError`. */
export interface TroupeClient {
  /** Submit a job; the stored `Job`. */
  readonly submit: (job: SubmitInput) => Effect.Effect<Job, TroupeClientError>
  /** Cancel a job; its state after the cancel (`worker_id` is the worker that ran it). */
  readonly cancel: (jobId: string, reason?: string) => Effect.Effect<JobState, TroupeClientError>
  /** Resume a `needs_human` job with a human's resolution. */
  readonly resume: (jobId: string, resolution: ResumeInput) => Effect.Effect<JobState, TroupeClientError>
  /** Read a job. */
  readonly get: (jobId: string) => Effect.Effect<Job, TroupeClientError>
  /** A job's stored events, oldest first, after `sinceEventId` when given. */
  readonly events: (
    jobId: string,
    sinceEventId?: string
  ) => Effect.Effect<ReadonlyArray<Edge.EventRecord>, TroupeClientError>
  /**
   * Subscribe for the lifetime of the scope: resolves once the gateway has confirmed it
   * (after replaying what came after `sinceEventId`, when given).
   */
  readonly subscription: (
    filter: Filter,
    options?: { readonly sinceEventId?: string }
  ) => Effect.Effect<Subscription, TroupeClientError, Scope.Scope>
  /** The events of a subscription made when the stream starts and ended when it stops. */
  readonly subscribe: (
    filter: Filter,
    options?: { readonly sinceEventId?: string }
  ) => Stream.Stream<Edge.EventRecord, TroupeClientError>
  /** The workers as monitoring reports them. */
  readonly workers: () => Effect.Effect<ReadonlyArray<Edge.MonitoredWorker>, TroupeClientError>
  /** Drain a worker: it finishes its jobs and claims no more. */
  readonly drain: (workerId: string, reason?: string) => Effect.Effect<WorkerState, TroupeClientError>
  /** Take a worker (or every worker of a `target_worker_id`) out of service. */
  readonly deregister: (request: DeregisterInput) => Effect.Effect<DeregisterResult, TroupeClientError>
  /** A round trip to the gateway. */
  readonly ping: () => Effect.Effect<void, TroupeClientError>
  /** How many connections were established (and authenticated) so far. */
  readonly connections: () => number
}

/** The client as a service. */
export const TroupeClient = Context.GenericTag<TroupeClient>("troupe/client/TroupeClient")

/** The `WebSocket` the client drives: `ws`, or a browser's (with `authFrame: true`). */
export interface WebSocketLike {
  readonly readyState: number
  send(data: string): void
  close(code?: number, reason?: string): void
  terminate?: () => void
  onopen: ((event: unknown) => void) | null
  onmessage: ((event: { readonly data: unknown }) => void) | null
  onerror: ((event: { readonly message?: string }) => void) | null
  onclose: ((event: { readonly code: number; readonly reason: string }) => void) | null
}

/** A `WebSocket` constructor (`ws` passes `options.headers` on the upgrade; a browser's takes two arguments). */
export type WebSocketConstructor = new (
  url: string,
  protocols?: string | Array<string>,
  options?: { readonly headers?: Record<string, string> }
) => WebSocketLike

/** How a client connects. */
export interface Options {
  /** The gateway: `ws://host:3100/v1/ws` (`ws://host:3100` or `http://host:3100` get `/v1/ws` added). */
  readonly url: string
  /** The shared service secret (`GH_SERVICE_SECRET`). */
  readonly secret: Redacted.Redacted<string> | string
  /** How long a request may wait for a connection and its reply together (default 10 s). */
  readonly requestTimeout?: Duration.DurationInput
  /** The delays between reconnection attempts (default exponential from 100 ms, jittered, capped at 5 s); when it ends, the client gives up. */
  readonly reconnect?: Schedule.Schedule<unknown, unknown>
  /** How often an idle-or-not connection is checked with a `ping` (default 30 s); no answer in `requestTimeout` drops it. */
  readonly keepalive?: Duration.DurationInput
  /** Authenticate with an `auth` frame instead of the `Authorization` header (browsers cannot set headers). */
  readonly authFrame?: boolean
  /** The `WebSocket` constructor (default `ws`). */
  readonly WebSocket?: WebSocketConstructor
}

/** The default reconnection backoff: 100 ms, 200 ms, 400 ms … (each ±20 %), at most 5 s apart, forever. */
export const defaultReconnect: Schedule.Schedule<unknown, unknown> = Schedule.exponential("100 millis").pipe(
  Schedule.jittered,
  Schedule.union(Schedule.spaced("5 seconds"))
)

/** A client for the lifetime of the scope. It connects in the background; requests wait for the connection. */
export const make = (options: Options): Effect.Effect<TroupeClient, never, Scope.Scope> =>
  Effect.gen(function* () {
    const Ctor = options.WebSocket ?? (WebSocket as unknown as WebSocketConstructor)
    const url = socketUrl(options.url)
    const secret = typeof options.secret === "string" ? Redacted.make(options.secret) : options.secret
    const timeout = Duration.decode(options.requestTimeout ?? "10 seconds")
    const keepalive = Duration.decode(options.keepalive ?? "30 seconds")
    const authFrame = options.authFrame ?? false

    // --- State ---

    /** Resolves with the session requests go to; replaced by a pending one at every drop. */
    let ready = Deferred.unsafeMake<Session, TroupeClientError>(FiberId.none)
    let current: Session | undefined
    let fatal: TroupeClientError | undefined
    let lastProblem: string | undefined
    let counter = 0
    let connections = 0
    const subs = new Set<Sub>()
    const nextId = () => `c${(++counter).toString(36)}`

    const awaitSession = (): Effect.Effect<Session, TroupeClientError> =>
      Effect.suspend(() =>
        fatal !== undefined
          ? Effect.fail(fatal)
          : Effect.flatMap(Deferred.await(ready), (s) => (s.closed ? awaitSession() : Effect.succeed(s)))
      )

    const send = (s: Session, text: string) => {
      try {
        s.socket.send(text)
      } catch (e) {
        forceClose(s, `send failed: ${String(e)}`)
      }
    }

    /** Cut a session now (its close event may be late or never come on a dead link). */
    const forceClose = (s: Session, reason: string) => {
      if (s.closed) return
      markClosed(s)
      if (s.socket.terminate !== undefined) s.socket.terminate()
      else s.socket.close(4000, "client: connection lost")
      s.inbox.unsafeOffer({ _tag: "close", code: 1006, reason })
    }

    const markClosed = (s: Session) => {
      s.closed = true
      if (current === s) {
        current = undefined
        if (fatal === undefined) ready = Deferred.unsafeMake(FiberId.none)
      }
    }

    // --- Requests ---

    /** Send a request on a session and wait up to `within` for its reply. */
    const exchange = <T extends Edge.RequestType>(
      s: Session,
      type: T,
      fields: Record<string, unknown>,
      within: Duration.Duration
    ): Effect.Effect<ResultOf<T>, TroupeClientError> =>
      Effect.gen(function* () {
        const id = nextId()
        const text = yield* encode({ v: Edge.version, type, id, ...fields })
        const reply = yield* Deferred.make<unknown, TroupeClientError>()
        s.pending.set(id, { type, resolve: (exit) => Deferred.unsafeDone(reply, exit) })
        send(s, text)
        const raw = yield* Deferred.await(reply).pipe(
          Effect.timeoutFail({
            duration: within,
            onTimeout: () =>
              new TroupeClientError({
                code: "TIMEOUT",
                message: `no reply to ${type} within ${Duration.format(timeout)}; it may still take effect: check (e.g. read the job) before retrying`
              })
          }),
          Effect.ensuring(Effect.sync(() => s.pending.delete(id)))
        )
        return yield* decodeResult(type, raw)
      })

    /** Wait for the connection, then send; both within the request timeout. */
    const request = <T extends Edge.RequestType>(
      type: T,
      fields: Record<string, unknown>
    ): Effect.Effect<ResultOf<T>, TroupeClientError> =>
      Effect.gen(function* () {
        const started = yield* Clock.currentTimeMillis
        const s = yield* awaitSession().pipe(
          Effect.timeoutFail({ duration: timeout, onTimeout: () => notConnected(type) })
        )
        const waited = (yield* Clock.currentTimeMillis) - started
        const left = Duration.millis(Math.max(0, Duration.toMillis(timeout) - waited))
        return yield* exchange(s, type, fields, left)
      })

    const notConnected = (what: string) =>
      new TroupeClientError({
        code: "DISCONNECTED",
        message: `not connected to the gateway at ${url} within ${Duration.format(timeout)}, so ${what} was not sent${lastProblem === undefined ? "" : ` (last problem: ${lastProblem})`}; check that the gateway runs and is reachable`,
        details: { last_problem: lastProblem ?? null }
      })

    // --- Subscriptions ---

    const sendSubscribe = (s: Session, sub: Sub) => {
      const id = nextId()
      const since = sub.lastEventId === undefined ? {} : { since_event_id: sub.lastEventId }
      s.subs.set(id, sub)
      s.pending.set(id, {
        type: "subscribe",
        subscription: sub,
        resolve: (exit) => {
          if (Exit.isFailure(exit)) {
            s.subs.delete(id)
            return endSub(sub, Exit.failCause(exit.cause))
          }
          const decoded = decodeSubscribed(exit.value)
          // A subscription that has seen nothing yet resumes from where the gateway started it.
          if (decoded._tag === "Right" && sub.lastEventId === undefined)
            sub.lastEventId = decoded.right.position
          Deferred.unsafeDone(
            sub.confirmed,
            decoded._tag === "Right" ? Exit.succeed(decoded.right.replayed) : Exit.succeed(0)
          )
        }
      })
      send(s, JSON.stringify({ v: Edge.version, type: "subscribe", id, ...sub.filter, ...since }))
    }

    const endSub = (sub: Sub, exit: Exit.Exit<void, TroupeClientError>) => {
      if (sub.done) return
      sub.done = true
      subs.delete(sub)
      sub.mailbox.unsafeDone(exit)
      Deferred.unsafeDone(
        sub.confirmed,
        Exit.isFailure(exit)
          ? Exit.failCause(exit.cause)
          : Exit.fail(new TroupeClientError({ code: "DISCONNECTED", message: "unsubscribed" }))
      )
    }

    const unsubscribe = (sub: Sub) =>
      Effect.sync(() => {
        endSub(sub, Exit.void)
        const s = current
        if (s === undefined || s.closed) return
        for (const [id, other] of s.subs) {
          if (other !== sub) continue
          s.subs.delete(id)
          const unsubscribeId = nextId()
          s.pending.set(unsubscribeId, { type: "unsubscribe", resolve: () => undefined })
          send(
            s,
            JSON.stringify({ v: Edge.version, type: "unsubscribe", id: unsubscribeId, subscription: id })
          )
        }
      })

    const subscription = (
      filter: Filter,
      subscribeOptions: { readonly sinceEventId?: string } = {}
    ): Effect.Effect<Subscription, TroupeClientError, Scope.Scope> =>
      Effect.gen(function* () {
        const mailbox = yield* Mailbox.make<Edge.EventRecord, TroupeClientError>()
        const sub = yield* Effect.acquireRelease(
          Effect.suspend(() => {
            if (fatal !== undefined) return Effect.fail(fatal)
            const sub: Sub = {
              filter,
              mailbox,
              confirmed: Deferred.unsafeMake(FiberId.none),
              seen: new Set(),
              lastEventId: subscribeOptions.sinceEventId,
              done: false
            }
            subs.add(sub)
            if (current !== undefined && !current.closed) sendSubscribe(current, sub)
            return Effect.succeed(sub)
          }),
          unsubscribe
        )
        const replayed = yield* Deferred.await(sub.confirmed).pipe(
          Effect.timeoutFail({
            duration: timeout,
            onTimeout: () =>
              current === undefined
                ? notConnected("subscribe")
                : new TroupeClientError({
                    code: "TIMEOUT",
                    message: `the gateway did not confirm the subscription within ${Duration.format(timeout)}`
                  })
          }),
          Effect.tapError(() => unsubscribe(sub))
        )
        return { events: Mailbox.toStream(sub.mailbox), replayed }
      })

    const deliver = (sub: Sub, record: Edge.EventRecord) => {
      if (sub.done || sub.seen.has(record.event_id)) return
      sub.seen.add(record.event_id)
      if (sub.seen.size > seenLimit) sub.seen.delete(sub.seen.values().next().value!)
      sub.lastEventId = record.event_id
      sub.mailbox.unsafeOffer(record)
    }

    // --- Sessions ---

    const onFrame = (s: Session, data: unknown) =>
      Effect.suspend(() => {
        const text = typeof data === "string" ? data : textOf(data)
        const decoded = text === undefined ? undefined : decodeFrame(text)
        if (decoded === undefined || decoded._tag === "Left") {
          return Effect.logDebug("troupe client: ignored a frame that does not match the protocol").pipe(
            Effect.annotateLogs({ frame: text?.slice(0, 200) })
          )
        }
        const frame = decoded.right
        if (frame.type === "event") {
          const sub = s.subs.get(frame.subscription)
          if (sub !== undefined) deliver(sub, recordOf(frame))
          return Effect.void
        }
        if (frame.id === null) {
          return Effect.logDebug("troupe client: the gateway rejected a frame it could not read").pipe(
            Effect.annotateLogs({
              error: frame.type === "reply" && !frame.ok ? frame.error.message : undefined
            })
          )
        }
        const pending = s.pending.get(frame.id)
        if (pending === undefined) return Effect.void
        s.pending.delete(frame.id)
        if (frame.type === "pong") pending.resolve(Exit.succeed({}))
        else if (frame.ok) pending.resolve(Exit.succeed(frame.result))
        else pending.resolve(Exit.fail(new TroupeClientError(frame.error)))
        return Effect.void
      })

    const becomeReady = (s: Session) =>
      Effect.gen(function* () {
        s.ready = true
        current = s
        connections++
        lastProblem = undefined
        Deferred.unsafeDone(ready, Exit.succeed(s))
        for (const sub of subs) sendSubscribe(s, sub)
        yield* Effect.forkScoped(
          Effect.gen(function* () {
            while (!s.closed) {
              yield* Effect.sleep(keepalive)
              const answered = yield* exchange(s, "ping", {}, timeout).pipe(Effect.either)
              if (answered._tag === "Left" && answered.left.code === "TIMEOUT") {
                lastProblem = `no answer to a ping within ${Duration.format(timeout)}`
                forceClose(s, lastProblem)
              }
            }
          })
        )
      })

    const openSocket = (inbox: Queue.Queue<SocketEvent>): Session => {
      const socket = authFrame
        ? new Ctor(url)
        : new Ctor(url, undefined, { headers: { authorization: `Bearer ${Redacted.value(secret)}` } })
      const s: Session = { socket, inbox, pending: new Map(), subs: new Map(), ready: false, closed: false }
      socket.onopen = () => inbox.unsafeOffer({ _tag: "open" })
      socket.onmessage = (event) => inbox.unsafeOffer({ _tag: "message", data: event.data })
      socket.onerror = (event) => {
        const status = /Unexpected server response: (\d+)/.exec(event?.message ?? "")
        if (status !== null) s.httpStatus = Number(status[1])
        if (!s.closed && event?.message !== undefined) lastProblem = event.message
      }
      socket.onclose = (event) => {
        markClosed(s)
        inbox.unsafeOffer({ _tag: "close", code: event.code, reason: event.reason })
      }
      return s
    }

    const detach = (s: Session) => {
      markClosed(s)
      s.socket.onopen = null
      s.socket.onmessage = null
      s.socket.onclose = null
      // `ws` throws an `error` event nobody listens to.
      s.socket.onerror = () => undefined
      if (s.socket.readyState === 1) s.socket.close(1000, "client closed")
      else if (s.socket.readyState === 0) {
        if (s.socket.terminate !== undefined) s.socket.terminate()
        else s.socket.close()
      }
    }

    /** One connection's life, until it closes. */
    const session = Effect.scoped(
      Effect.gen(function* () {
        const inbox = yield* Queue.unbounded<SocketEvent>()
        const s = yield* Effect.acquireRelease(
          Effect.sync(() => openSocket(inbox)),
          (s) => Effect.sync(() => detach(s))
        )
        yield* Effect.forkScoped(
          Effect.sleep(timeout).pipe(
            Effect.andThen(
              Effect.sync(() => {
                if (!s.ready) {
                  lastProblem = `the connection was not up within ${Duration.format(timeout)}`
                  forceClose(s, lastProblem)
                }
              })
            )
          )
        )
        while (true) {
          const event = yield* Queue.take(s.inbox)
          switch (event._tag) {
            case "open":
              if (!authFrame) yield* becomeReady(s)
              else {
                const id = nextId()
                s.pending.set(id, {
                  type: "auth",
                  resolve: (exit) => {
                    if (Exit.isSuccess(exit)) s.authenticated = true
                  }
                })
                send(s, JSON.stringify({ v: Edge.version, type: "auth", id, token: Redacted.value(secret) }))
              }
              break
            case "message":
              yield* onFrame(s, event.data)
              if (s.authenticated && !s.ready) yield* becomeReady(s)
              break
            case "close":
              return { session: s, code: event.code, reason: event.reason }
          }
        }
      })
    )

    /** After a drop: requests in flight fail (a mutation is never re-sent); subscriptions wait for the next session. */
    const dropped = (s: Session, code: number, reason: string) => {
      markClosed(s)
      if (s.ready) lastProblem = `the connection dropped (close ${code}${reason === "" ? "" : `: ${reason}`})`
      for (const [id, pending] of s.pending) {
        if (pending.subscription !== undefined) continue
        pending.resolve(
          Exit.fail(
            new TroupeClientError({
              code: "DISCONNECTED",
              message: `the connection to the gateway dropped before the reply to ${pending.type} ${id}; it may or may not have taken effect: check before retrying`
            })
          )
        )
      }
      s.pending.clear()
      s.subs.clear()
    }

    /** Stop for good: everything waiting fails with `error`. */
    const stop = (error: TroupeClientError) => {
      if (fatal !== undefined) return
      fatal = error
      const s = current
      if (s !== undefined) {
        markClosed(s)
        for (const pending of s.pending.values()) pending.resolve(Exit.fail(error))
        s.pending.clear()
      }
      const failed = Deferred.unsafeMake<Session, TroupeClientError>(FiberId.none)
      Deferred.unsafeDone(failed, Exit.fail(error))
      Deferred.unsafeDone(ready, Exit.fail(error))
      ready = failed
      for (const sub of [...subs]) endSub(sub, Exit.fail(error))
    }

    const loop = Effect.gen(function* () {
      const driver = yield* Schedule.driver(options.reconnect ?? defaultReconnect)
      while (true) {
        const ended = yield* session
        const { session: s, code, reason } = ended
        const wasReady = s.ready
        dropped(s, code, reason)
        if (code === Edge.CloseCode.unauthorized || s.httpStatus === 401 || s.httpStatus === 403) {
          return stop(
            new TroupeClientError({
              code: "UNAUTHORIZED",
              message: `the gateway at ${url} refused the service secret: set the same GH_SERVICE_SECRET on the client and the gateway`
            })
          )
        }
        if (wasReady) yield* driver.reset
        const again = yield* driver.next(ended).pipe(Effect.isSuccess)
        if (!again) {
          return stop(
            new TroupeClientError({
              code: "DISCONNECTED",
              message: `gave up reconnecting to the gateway at ${url}${lastProblem === undefined ? "" : ` (last problem: ${lastProblem})`}`,
              details: { last_problem: lastProblem ?? null }
            })
          )
        }
      }
    })

    yield* Effect.addFinalizer(() =>
      Effect.sync(() =>
        stop(new TroupeClientError({ code: "DISCONNECTED", message: "the client was closed" }))
      )
    )
    yield* Effect.forkScoped(loop)

    return TroupeClient.of({
      submit: (job) => request("job.submit", { job }),
      cancel: (jobId, reason) =>
        request("job.cancel", { job_id: jobId, ...(reason === undefined ? {} : { reason }) }),
      resume: (jobId, resolution) => request("job.resume", { job_id: jobId, ...resolution }),
      get: (jobId) => request("job.get", { job_id: jobId }),
      events: (jobId, sinceEventId) =>
        Effect.map(
          request("job.events", {
            job_id: jobId,
            ...(sinceEventId === undefined ? {} : { since_event_id: sinceEventId })
          }),
          (r) => r.events
        ),
      subscription,
      subscribe: (filter, subscribeOptions) =>
        Stream.unwrapScoped(Effect.map(subscription(filter, subscribeOptions), (s) => s.events)),
      workers: () => Effect.map(request("workers.list", {}), (r) => r.workers),
      drain: (workerId, reason) =>
        request("worker.drain", { worker_id: workerId, ...(reason === undefined ? {} : { reason }) }),
      deregister: (input) => request("worker.deregister", { ...input }),
      ping: () => Effect.asVoid(request("ping", {})),
      connections: () => connections
    })
  })

/** A client as a layer (closed with the layer). */
export const layer = (options: Options): Layer.Layer<TroupeClient> =>
  Layer.scoped(TroupeClient, make(options))

// --- internal ---

type ResultOf<T extends Edge.RequestType> = Schema.Schema.Type<(typeof Edge.Results)[T]>

interface Pending {
  readonly type: Edge.RequestType
  /** Set for a `subscribe`: a drop does not fail it, the next session sends it again. */
  readonly subscription?: Sub
  readonly resolve: (exit: Exit.Exit<unknown, TroupeClientError>) => void
}

interface Sub {
  readonly filter: Filter
  readonly mailbox: Mailbox.Mailbox<Edge.EventRecord, TroupeClientError>
  readonly confirmed: Deferred.Deferred<number, TroupeClientError>
  /** The ids delivered lately (a safety net against a duplicate across a resubscribe). */
  readonly seen: Set<string>
  /** The last event delivered: where a resubscribe resumes. */
  lastEventId: string | undefined
  done: boolean
}

type SocketEvent =
  | { readonly _tag: "open" }
  | { readonly _tag: "message"; readonly data: unknown }
  | { readonly _tag: "close"; readonly code: number; readonly reason: string }

interface Session {
  readonly socket: WebSocketLike
  readonly inbox: Queue.Queue<SocketEvent>
  readonly pending: Map<string, Pending>
  /** The subscriptions by the id of their `subscribe` on this connection. */
  readonly subs: Map<string, Sub>
  authenticated?: boolean
  ready: boolean
  closed: boolean
  /** The HTTP status of a refused upgrade. */
  httpStatus?: number
}

const seenLimit = 10_000

const decodeFrame = Schema.decodeUnknownEither(Schema.parseJson(Edge.ServerFrame))
const decodeSubscribed = Schema.decodeUnknownEither(Edge.Results.subscribe)
const resultDecoders = Object.fromEntries(
  Object.entries(Edge.Results).map(([type, schema]) => [
    type,
    Schema.decodeUnknownEither(schema as Schema.Schema<unknown, unknown>)
  ])
) as Record<Edge.RequestType, (u: unknown) => ReturnType<ReturnType<typeof Schema.decodeUnknownEither>>>

const decodeResult = <T extends Edge.RequestType>(
  type: T,
  raw: unknown
): Effect.Effect<ResultOf<T>, TroupeClientError> => {
  const decoded = resultDecoders[type](raw)
  return decoded._tag === "Right"
    ? Effect.succeed(decoded.right as ResultOf<T>)
    : Effect.fail(
        new TroupeClientError({
          code: "INTERNAL",
          message: `the gateway's reply to ${type} does not match protocol v${Edge.version}: is the client older than the gateway?`,
          details: { issue: String(decoded.left) }
        })
      )
}

const encode = (frame: Record<string, unknown>): Effect.Effect<string, TroupeClientError> =>
  Effect.try({
    try: () => JSON.stringify(frame),
    catch: (e) =>
      new TroupeClientError({
        code: "INVALID_FRAME",
        message: `the ${String(frame.type)} request cannot be sent as JSON: ${String(e)}`
      })
  })

const textOf = (data: unknown): string | undefined =>
  data instanceof ArrayBuffer
    ? new TextDecoder().decode(data)
    : ArrayBuffer.isView(data)
      ? new TextDecoder().decode(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
      : undefined

/** The stored event a frame carries: the frame without its envelope. */
const recordOf = ({
  v: _v,
  type: _type,
  subscription: _subscription,
  ...record
}: Edge.Event): Edge.EventRecord => record

/** `ws://h:p/v1/ws` as is; `ws://h:p` and `http(s)://h:p` get `/v1/ws` (and `ws(s):`). */
const socketUrl = (input: string): string => {
  const u = new URL(input)
  if (u.protocol === "http:") u.protocol = "ws:"
  else if (u.protocol === "https:") u.protocol = "wss:"
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/v1/ws"
  return u.toString()
}
