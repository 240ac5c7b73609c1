/**
 * A node: one process's share of the actor system.
 *
 * Outbound, every `tell`, `ask` and reply goes through one writer fiber that batches what
 * is waiting into a single statement: insert the rows, NOTIFY each target node once. One
 * writer per node keeps each sender's messages in commit order, which is what makes
 * per-sender→receiver FIFO hold.
 *
 * Inbound, a claim loop woken by NOTIFY on `node:<id>` (and by every reconnect of the
 * listener, and by a slow poll as a fallback) claims pending rows in batches, oldest first,
 * and hands them to local actors. An actor is a plain object with a queue while idle and
 * gets a fiber only while it has messages: measured, an idle actor costs a few hundred
 * bytes this way, where a parked fiber per actor would not fit the 2 KB budget. Handled rows
 * are acknowledged (deleted) in batches; a handled message id is remembered, so a row
 * redelivered after a lost acknowledgement is not handled twice.
 */
import { SqlClient } from "@effect/sql"
import {
  Cause,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  FiberRef,
  FiberSet,
  Option,
  ParseResult,
  Queue,
  Schedule,
  Schema,
  Scope
} from "effect"
import * as Crypto from "node:crypto"
import type * as Actor from "./Actor.ts"
import * as ActorRegistry from "./ActorRegistry.ts"
import { DatabaseUrls, describe, makePreparedPool, type PreparedPool } from "../db/Database.ts"
import { routingLatency } from "./Histogram.ts"
import * as MailboxStorage from "./MailboxStorage.ts"
import * as NodeMembership from "./NodeMembership.ts"
import * as Notifier from "./Notifier.ts"
import {
  ActorFailed,
  ActorNotFound,
  AskTimeout,
  MailboxFull,
  MalformedMessage,
  PersistenceError,
  ReplyBody,
  type RuntimeError
} from "../../protocol/Errors.ts"
import {
  type ActorId,
  actorId as makeActorId,
  nodeChannel,
  parseActorId,
  registryChannel
} from "../../protocol/Ids.ts"

/** Options of a node. */
export interface Options {
  readonly nodeId: string
  /** `gateway`, `worker`, or both (`gateway+worker`). */
  readonly role?: string
  /** Where the node can be reached (its HTTP address), for operators. */
  readonly address?: string | null
  /** The actor kinds this node can host. */
  readonly actors?: ReadonlyArray<Actor.Any>
  /** Rows claimed per round trip (default 1000). */
  readonly claimBatch?: number
  /** Messages claimed but not yet handled, node-wide, before claiming pauses (default 50,000). */
  readonly maxInflight?: number
  /** Rows written per statement at most (default 2000). */
  readonly writeBatch?: number
  /** Fallback poll when no NOTIFY arrives (default 5 s). */
  readonly pollInterval?: Duration.DurationInput
  readonly heartbeat?: Duration.DurationInput
  /** Keep handled messages in `actor_message_log` for the inspector (default on). */
  readonly messageLog?: boolean
  readonly messageLogRetention?: Duration.DurationInput
  /** How long a graceful shutdown waits for handlers in flight (default 10 s). */
  readonly shutdownTimeout?: Duration.DurationInput
  /** How long a send retries while the database is unreachable (default 30 s). */
  readonly sendRetryFor?: Duration.DurationInput
  /**
   * Run the mailbox insert, claims and acknowledgements as named (prepared) statements on a
   * small pool of the node's own, on `DATABASE_URL` (default on). Turn it off behind a
   * transaction pooler that does not support prepared statements.
   */
  readonly preparedStatements?: boolean
}

/** Errors of a send. */
export type SendError = ActorNotFound | PersistenceError

/** Errors the runtime adds to an ask. */
export type AskError = RuntimeError

/** A typed handle on an actor. */
export interface ActorRef<M extends Schema.TaggedRequest.All> {
  readonly id: ActorId
  /** Send without waiting for the handler; succeeds once the message is committed. */
  readonly tell: (message: M) => Effect.Effect<void, SendError>
  /** Send and wait for the reply. */
  readonly ask: <A extends M>(
    message: A,
    options?: { readonly timeout?: Duration.DurationInput }
  ) => Effect.Effect<Schema.WithResult.Success<A>, Schema.WithResult.Failure<A> | AskError>
}

/** Counters of a node, for tests, benchmarks and the inspector. */
export interface Stats {
  readonly actorsInMemory: number
  readonly actorsRunning: number
  readonly inflight: number
  readonly pendingAsks: number
  readonly handled: number
  readonly deadLettered: number
  readonly restarts: number
  readonly claims: number
  readonly writes: number
  readonly listenerConnections: number
}

/** A running node. */
export interface TroupeNode {
  readonly id: string
  /** Place an actor on this node (or keep it here) and return its handle. */
  readonly spawn: <M extends Schema.TaggedRequest.All, R>(
    actor: Actor.Actor<M, R>,
    key: string
  ) => Effect.Effect<ActorRef<M>, PersistenceError>
  /** Place many actors here; with `activate`, also build them in memory now. */
  readonly spawnMany: (
    actor: Actor.Any,
    keys: ReadonlyArray<string>,
    options?: { readonly activate?: boolean }
  ) => Effect.Effect<void, PersistenceError>
  /** Let this node host actors of a kind whose actors are placed elsewhere (e.g. by a claim statement). */
  readonly register: (actor: Actor.Any) => Effect.Effect<void>
  /** A handle on an actor wherever it lives (nothing is checked until a message is sent). */
  readonly ref: <M extends Schema.TaggedRequest.All, R>(actor: Actor.Actor<M, R>, key: string) => ActorRef<M>
  /** Send an already-encoded message to an actor id. */
  readonly tellRaw: (actorId: string, body: unknown) => Effect.Effect<void, SendError>
  /** Ask with an already-encoded message; returns the reply body as stored. */
  readonly askRaw: (
    actorId: string,
    body: unknown,
    options?: { readonly timeout?: Duration.DurationInput }
  ) => Effect.Effect<unknown, AskError>
  readonly stats: () => Stats
  /** Wake the claim loop (used by tests to check that nothing is pending). */
  readonly wake: () => void
  /** The node's pool for named (prepared) hot statements, unless `preparedStatements: false`. */
  readonly prepared: PreparedPool | undefined
  /** Subscribe to a NOTIFY channel on the node's listener connection (kept across reconnects). */
  readonly listen: (channel: string, onPayload: (payload: string) => void) => Effect.Effect<void>
  /** Run after every (re)connect of the listener: where a consumer catches up on what it missed. */
  readonly onReconnect: (hook: () => void) => Effect.Effect<void>
}

/** The node of this process. */
export class Node extends Context.Tag("troupe/runtime/Node")<Node, TroupeNode>() {}

/** The sender recorded on messages sent from within a handler: the handling actor's id. */
export const currentSender = FiberRef.unsafeMake<string | undefined>(undefined)

/** Start a node for the lifetime of the scope. */
export const make = (
  options: Options
): Effect.Effect<TroupeNode, unknown, SqlClient.SqlClient | DatabaseUrls | Scope.Scope> =>
  Effect.gen(function* () {
    const nodeId = options.nodeId
    const urls = yield* DatabaseUrls
    // Opened first, closed last: the graceful shutdown below still writes through it.
    const prepared =
      (options.preparedStatements ?? true)
        ? yield* makePreparedPool(urls.url, { applicationName: `troupe-mailbox:${nodeId}` })
        : undefined
    const storage = yield* MailboxStorage.makeWith({ prepared })
    const registry = yield* ActorRegistry.make
    const sql = yield* SqlClient.SqlClient
    const context = yield* Effect.context<never>()
    const kinds = new Map<string, Actor.Any>()
    for (const a of options.actors ?? []) kinds.set(a.kind, a)
    const claimBatch = options.claimBatch ?? 1000
    const maxInflight = options.maxInflight ?? 50_000
    const writeBatch = options.writeBatch ?? 2000
    const logMessages = options.messageLog ?? true
    const sendRetryFor = Duration.decode(options.sendRetryFor ?? "30 seconds")
    const shutdownTimeout = Duration.decode(options.shutdownTimeout ?? "10 seconds")
    const selfSender = `node:${nodeId}`

    // --- Membership and listener ---

    yield* NodeMembership.make({
      nodeId,
      role: options.role ?? "gateway+worker",
      address: options.address ?? null,
      directUrl: urls.directUrl,
      heartbeat: options.heartbeat ?? "5 seconds"
    })
    // Claims left by an earlier run of this node were never handled: take them back.
    yield* storage.release(nodeId)

    const counters = { handled: 0, deadLettered: 0, restarts: 0, claims: 0, writes: 0 }
    const fibers = yield* FiberSet.make<unknown, unknown>()
    const run = <A, E>(effect: Effect.Effect<A, E>) => FiberSet.run(fibers, effect)
    const drainFibers = yield* FiberSet.make<void, never>()

    // --- Outbound: one writer, batched ---

    type Outgoing =
      | {
          readonly _tag: "Row"
          readonly row: MailboxStorage.OutboundRow
          readonly done: Deferred.Deferred<void, SendError>
        }
      | { readonly _tag: "Flush"; readonly done: Deferred.Deferred<void, SendError> }
    const outbox = yield* Queue.unbounded<Outgoing>()
    const retryDb = Schedule.exponential("20 millis").pipe(
      Schedule.union(Schedule.spaced("1 second")),
      Schedule.upTo(sendRetryFor)
    )

    const writeOnce = (batch: ReadonlyArray<Outgoing>) =>
      Effect.gen(function* () {
        const items = batch.filter((o) => o._tag === "Row")
        if (items.length > 0) {
          const rows = items.map((o) => o.row)
          const inserted = yield* storage.insert(rows).pipe(Effect.retry(retryDb), Effect.either)
          counters.writes++
          if (inserted._tag === "Left") {
            const error = new PersistenceError({ reason: describe(inserted.left) })
            for (const o of items) Deferred.unsafeDone(o.done, Exit.fail(error))
          } else {
            const ok = new Set(inserted.right.map((r) => r.message_id))
            const missing = items.filter((o) => !ok.has(o.row.messageId))
            // A retried statement may have committed the first time: those ids exist already.
            const known =
              missing.length === 0
                ? new Set<string>()
                : yield* storage.registered(missing.map((o) => o.row.actorId ?? "")).pipe(
                    Effect.retry(retryDb),
                    Effect.orElseSucceed(() => new Set<string>())
                  )
            for (const o of items) {
              if (ok.has(o.row.messageId) || o.row.nodeId !== null || known.has(o.row.actorId ?? "")) {
                Deferred.unsafeDone(o.done, Exit.void)
              } else {
                Deferred.unsafeDone(o.done, Exit.fail(new ActorNotFound({ actorId: o.row.actorId ?? "" })))
              }
            }
          }
        }
        for (const o of batch) if (o._tag === "Flush") Deferred.unsafeDone(o.done, Exit.void)
      })

    yield* Queue.takeBetween(outbox, 1, writeBatch).pipe(
      Effect.flatMap((chunk) => writeOnce([...chunk])),
      Effect.catchAllCause((cause) => Effect.logWarning("mailbox writer", cause)),
      Effect.forever,
      Effect.interruptible,
      run
    )

    const send = (row: MailboxStorage.OutboundRow) =>
      Effect.flatMap(Deferred.make<void, SendError>(), (done) =>
        Effect.zipRight(Queue.offer(outbox, { _tag: "Row", row, done }), Deferred.await(done))
      )

    const flushOutbox = Effect.flatMap(Deferred.make<void, SendError>(), (done) =>
      Effect.zipRight(Queue.offer(outbox, { _tag: "Flush", done }), Deferred.await(done))
    )

    const senderOf = Effect.map(FiberRef.get(currentSender), (s) => s ?? selfSender)

    const tellRaw = (target: string, body: unknown): Effect.Effect<void, SendError> =>
      Effect.flatMap(senderOf, (sender) =>
        send({
          messageId: Crypto.randomUUID(),
          actorId: target,
          kind: "tell",
          sender,
          replyTo: null,
          correlationId: null,
          body: JSON.stringify(body),
          nodeId: null
        })
      )

    const pendingAsks = new Map<string, Deferred.Deferred<ReplyBody>>()

    const askRaw = (
      target: string,
      body: unknown,
      askOptions?: { readonly timeout?: Duration.DurationInput }
    ) =>
      Effect.gen(function* () {
        const timeout = Duration.decode(askOptions?.timeout ?? "30 seconds")
        const messageId = Crypto.randomUUID()
        const reply = yield* Deferred.make<ReplyBody>()
        pendingAsks.set(messageId, reply)
        const sender = yield* senderOf
        const sentAt = performance.now()
        const result = yield* send({
          messageId,
          actorId: target,
          kind: "ask",
          sender,
          replyTo: nodeId,
          correlationId: null,
          body: JSON.stringify(body),
          nodeId: null
        }).pipe(
          Effect.zipRight(Deferred.await(reply)),
          Effect.timeoutFail({
            duration: timeout,
            onTimeout: () => new AskTimeout({ actorId: target, timeoutMs: Duration.toMillis(timeout) })
          }),
          Effect.ensuring(Effect.sync(() => pendingAsks.delete(messageId)))
        )
        routingLatency.observe((performance.now() - sentAt) / 1000)
        if (result._tag === "RuntimeError") return yield* Effect.fail(result.error)
        return result.exit
      })

    const ref = <M extends Schema.TaggedRequest.All, R>(
      actor: Actor.Actor<M, R>,
      key: string
    ): ActorRef<M> => {
      const id = makeActorId(actor.kind, key)
      const encode = Schema.encode(actor.schema)
      return {
        id,
        tell: (message) => Effect.flatMap(Effect.orDie(encode(message)), (body) => tellRaw(id, body)),
        ask: (message, askOptions) =>
          Effect.gen(function* () {
            const body = yield* Effect.orDie(encode(message))
            const exit = yield* askRaw(id, body, askOptions)
            const decoded = yield* Effect.orDie(Schema.decodeUnknown(exitSchemaOf(message))(exit))
            return yield* decoded
          })
      }
    }

    // --- Local actors ---

    interface Envelope {
      readonly rowId: string
      readonly messageId: string
      readonly actorId: string
      readonly kind: "tell" | "ask"
      readonly sender: string
      readonly replyTo: string | null
      readonly body: unknown
    }

    interface LocalActor {
      readonly id: string
      readonly def: Actor.Any
      readonly key: string
      epoch: number
      queue: Array<Envelope | undefined>
      head: number
      running: boolean
      current: Envelope | undefined
      handlers: Record<string, (m: any) => Effect.Effect<unknown, unknown>> | undefined
      scope: Scope.CloseableScope | undefined
      lastActive: number
      restarts: Array<number> | undefined
      failed: boolean
    }

    const actors = new Map<string, LocalActor>()
    let inflight = 0
    let stopping = false

    // Rows in an actor's queue or in its handler: a row can reach dispatch twice (in a wake-up
    // and again in a scan before it is acknowledged), the second time it is skipped.
    const queuedRows = new Set<string>()
    const handledIds = new Set<string>()
    const markHandled = (messageId: string) => {
      handledIds.add(messageId)
      if (handledIds.size > 200_000) handledIds.delete(handledIds.values().next().value as string)
    }

    // Acknowledgements are buffered and deleted in batches by one fiber.
    let acks: Array<string> = []
    const ackWake = yield* Queue.sliding<void>(1)
    const ack = (rowId: string) => {
      acks.push(rowId)
      ackWake.unsafeOffer(undefined)
    }
    const flushAcks = Effect.suspend(() => {
      if (acks.length === 0) return Effect.void
      const ids = acks
      acks = []
      return storage.ack(ids, logMessages).pipe(
        Effect.retry(Schedule.exponential("20 millis").pipe(Schedule.union(Schedule.spaced("2 seconds")))),
        Effect.onInterrupt(() => Effect.sync(() => (acks = ids.concat(acks))))
      )
    })
    // Acknowledgements are off the latency path: coalesce them for a few milliseconds
    // (measured: one DELETE per two messages at 1,000 msgs/s without this).
    yield* Queue.take(ackWake).pipe(
      Effect.zipRight(
        Effect.suspend(() => (acks.length >= 256 ? Effect.void : Effect.sleep(Duration.millis(5))))
      ),
      Effect.zipRight(flushAcks),
      Effect.catchAllCause((cause) => Effect.logWarning("mailbox acknowledgements", cause)),
      Effect.forever,
      Effect.interruptible,
      run
    )

    const deadLetter = (
      env: Envelope | MailboxStorage.InboundRow,
      error: { _tag: string; message: string }
    ) => {
      counters.deadLettered++
      const letter: MailboxStorage.DeadLetter = {
        messageId: "rowId" in env ? env.messageId : env.message_id,
        actorId: "rowId" in env ? env.actorId : env.actor_id,
        nodeId,
        sender: env.sender,
        body: env.body,
        errorTag: error._tag,
        reason: error.message
      }
      return storage.deadLetter([letter]).pipe(
        Effect.retry(retryDb),
        Effect.catchAllCause((c) => Effect.logError("dead letter lost", c))
      )
    }

    const reply = (to: { replyTo: string | null; messageId: string; actorId: string }, body: ReplyBody) =>
      to.replyTo === null
        ? Effect.void
        : send({
            messageId: Crypto.randomUUID(),
            actorId: null,
            kind: "reply",
            sender: to.actorId,
            replyTo: null,
            correlationId: to.messageId,
            body: JSON.stringify(body),
            nodeId: to.replyTo
          }).pipe(Effect.catchAllCause((c) => Effect.logWarning("reply not delivered", c)))

    /** Refuse a message: dead-letter it, answer an asker with the error, acknowledge it. */
    const reject = (env: Envelope, error: RuntimeError) =>
      Effect.gen(function* () {
        yield* deadLetter(env, error)
        yield* reply(env, { _tag: "RuntimeError", error })
        markHandled(env.messageId)
        ack(env.rowId)
      })

    const writeEvent = (
      actorId: string,
      eventType: string,
      message: string,
      metadata: Record<string, unknown>
    ) =>
      sql`INSERT INTO actor_events (actor_id, node_id, event_type, message, metadata)
          VALUES (${actorId}, ${nodeId}, ${eventType}, ${message}, ${JSON.stringify(metadata)}::jsonb)`.pipe(
        Effect.retry(retryDb),
        Effect.catchAllCause((c) => Effect.logWarning("actor event not written", c))
      )

    const closeScope = (a: LocalActor) => {
      const scope = a.scope
      a.scope = undefined
      a.handlers = undefined
      return scope ? Scope.close(scope, Exit.void) : Effect.void
    }

    const activate = (a: LocalActor) =>
      Effect.gen(function* () {
        const scope = yield* Scope.make()
        const address: Actor.Address = {
          id: a.id as ActorId,
          kind: a.def.kind,
          key: a.key,
          epoch: a.epoch,
          nodeId
        }
        const behavior = a.def.behavior(address) as Effect.Effect<unknown, unknown, Scope.Scope>
        const exit = yield* behavior.pipe(
          Scope.extend(scope),
          Effect.provide(context),
          Effect.locally(currentSender, a.id),
          Effect.exit
        )
        if (Exit.isSuccess(exit)) {
          a.scope = scope
          a.handlers = exit.value as LocalActor["handlers"]
          return Option.none<string>()
        }
        yield* Scope.close(scope, Exit.void)
        return Option.some(`activation failed: ${Cause.pretty(exit.cause)}`)
      })

    /** A crash: restart with backoff, or past the limit mark the actor failed. */
    const supervise = (a: LocalActor, reason: string) =>
      Effect.gen(function* () {
        yield* closeScope(a)
        const policy = a.def.restart
        const now = Date.now()
        const windowMs = Duration.toMillis(policy.window)
        a.restarts = (a.restarts ?? []).filter((t) => now - t < windowMs)
        a.restarts.push(now)
        const n = a.restarts.length
        const short = reason.split("\n")[0]!.slice(0, 500)
        if (n > policy.maxRestarts) {
          a.failed = true
          yield* registry.markFailed(a.id, nodeId, a.epoch).pipe(
            Effect.retry(retryDb),
            Effect.catchAllCause((c) => Effect.logError("could not mark actor failed", c))
          )
          yield* writeEvent(
            a.id,
            "actor_failed",
            `crashed ${n} times within ${Duration.format(policy.window)}: ${short}`,
            {
              restarts: n,
              reason: reason.slice(0, 4000)
            }
          )
          yield* Effect.logWarning(`actor ${a.id} marked failed after ${n} crashes: ${short}`)
          return
        }
        counters.restarts++
        const backoff = Math.min(
          Duration.toMillis(policy.maxBackoff),
          Duration.toMillis(policy.minBackoff) * 2 ** (n - 1)
        )
        yield* writeEvent(a.id, "actor_restarted", `restart ${n} in ${backoff} ms: ${short}`, {
          restart: n,
          backoff_ms: backoff,
          reason: reason.slice(0, 4000)
        })
        yield* Effect.sleep(Duration.millis(backoff))
      })

    const failedError = (a: LocalActor) =>
      new ActorFailed({
        actorId: a.id,
        reason: "it crashed past its restart limit and is marked failed; spawn it again to reset"
      })

    const processOne = (a: LocalActor, env: Envelope) =>
      Effect.gen(function* () {
        if (handledIds.has(env.messageId)) return ack(env.rowId)
        while (a.handlers === undefined && !a.failed) {
          const failure = yield* activate(a)
          if (Option.isSome(failure)) yield* supervise(a, failure.value)
        }
        if (a.failed) return yield* reject(env, failedError(a))
        const decoded = Schema.decodeUnknownEither(a.def.schema)(env.body)
        if (decoded._tag === "Left") {
          return yield* reject(
            env,
            new MalformedMessage({
              actorId: a.id,
              reason: ParseResult.TreeFormatter.formatErrorSync(decoded.left)
            })
          )
        }
        const message = decoded.right as Schema.TaggedRequest.All
        const handler = a.handlers![message._tag]!
        const exit = yield* Effect.suspend(() => handler(message)).pipe(
          Effect.locally(currentSender, a.id),
          Effect.exit
        )
        if (Exit.isFailure(exit) && Cause.isInterruptedOnly(exit.cause) && stopping) {
          // Cut short by shutdown: leave it unhandled, it is given back to the table.
          return yield* Effect.interrupt
        }
        const expected =
          Exit.isSuccess(exit) ||
          (Cause.isFailType(exit.cause) && Option.isSome(Cause.failureOption(exit.cause)))
        if (expected) {
          // Counted before the reply is written: an asker may see the reply at once.
          counters.handled++
          markHandled(env.messageId)
          if (env.kind === "ask") {
            const encoded = Schema.encodeEither(exitSchemaOf(message))(exit)
            yield* reply(
              env,
              encoded._tag === "Right"
                ? { _tag: "Exit", exit: encoded.right }
                : {
                    _tag: "RuntimeError",
                    error: new ActorFailed({
                      actorId: a.id,
                      reason: `reply does not match its schema: ${encoded.left.message}`
                    })
                  }
            )
          }
          ack(env.rowId)
          return
        }
        const reason = Cause.pretty(exit.cause)
        yield* reject(
          env,
          new ActorFailed({
            actorId: a.id,
            reason: `handler crashed: ${reason.split("\n")[0]!.slice(0, 500)}`
          })
        )
        yield* supervise(a, reason)
      })

    const drain = (a: LocalActor): Effect.Effect<void> =>
      Effect.gen(function* () {
        while (a.head < a.queue.length && !stopping) {
          const env = a.queue[a.head]!
          a.queue[a.head++] = undefined
          if (a.head > 1024 && a.head * 2 > a.queue.length) {
            a.queue = a.queue.slice(a.head)
            a.head = 0
          }
          a.current = env
          yield* processOne(a, env)
          queuedRows.delete(env.rowId)
          a.current = undefined
          a.lastActive = Date.now()
          inflight--
          if (inflight === maxInflight >> 1) wake()
        }
        if (a.head >= a.queue.length) {
          a.queue = []
          a.head = 0
        }
        a.running = false
      })

    const newLocal = (p: ActorRegistry.Placement, def: Actor.Any): LocalActor => {
      const a: LocalActor = {
        id: p.actorId,
        def,
        key: parseActorId(p.actorId).key,
        epoch: p.epoch,
        queue: [],
        head: 0,
        running: false,
        current: undefined,
        handlers: undefined,
        scope: undefined,
        lastActive: Date.now(),
        restarts: undefined,
        failed: p.status === "failed"
      }
      actors.set(a.id, a)
      return a
    }

    const enqueue = (a: LocalActor, env: Envelope) =>
      Effect.gen(function* () {
        if (a.queue.length - a.head >= a.def.capacity) {
          return yield* run(reject(env, new MailboxFull({ actorId: a.id, capacity: a.def.capacity })))
        }
        a.queue.push(env)
        queuedRows.add(env.rowId)
        inflight++
        if (!a.running) {
          a.running = true
          yield* FiberSet.run(drainFibers, drain(a))
        }
      })

    // --- Inbound: claim and dispatch ---

    const dispatch = (rows: ReadonlyArray<MailboxStorage.InboundRow>) =>
      Effect.gen(function* () {
        const unknown = new Set<string>()
        for (const row of rows) {
          if (row.kind === "reply" || queuedRows.has(row.id)) continue
          if (!actors.has(row.actor_id!)) unknown.add(row.actor_id!)
        }
        const placements =
          unknown.size === 0
            ? new Map<string, ActorRegistry.Placement>()
            : yield* registry.lookupMany([...unknown]).pipe(Effect.retry(retryDb), Effect.orDie)
        const forwards = new Map<string, Array<string>>()
        for (const row of rows) {
          if (queuedRows.has(row.id)) continue
          if (row.kind === "reply") {
            const decoded = Schema.decodeUnknownEither(ReplyBody)(row.body)
            const waiting = row.correlation_id ? pendingAsks.get(row.correlation_id) : undefined
            if (waiting && decoded._tag === "Right") Deferred.unsafeDone(waiting, Exit.succeed(decoded.right))
            ack(row.id)
            continue
          }
          const env: Envelope = {
            rowId: row.id,
            messageId: row.message_id,
            actorId: row.actor_id!,
            kind: row.kind,
            sender: row.sender,
            replyTo: row.reply_to,
            body: row.body
          }
          let a = actors.get(env.actorId)
          if (a === undefined) {
            const p = placements.get(env.actorId)
            if (p === undefined) {
              yield* run(reject(env, new ActorNotFound({ actorId: env.actorId })))
              continue
            }
            if (p.nodeId !== nodeId) {
              const list = forwards.get(p.nodeId) ?? []
              list.push(row.id)
              forwards.set(p.nodeId, list)
              continue
            }
            const def = kinds.get(p.kind)
            if (def === undefined) {
              yield* run(
                reject(
                  env,
                  new ActorFailed({
                    actorId: env.actorId,
                    reason: `node "${nodeId}" has no behaviour for kind "${p.kind}"`
                  })
                )
              )
              continue
            }
            a = newLocal(p, def)
          }
          yield* enqueue(a, env)
        }
        for (const [target, ids] of forwards) {
          yield* storage.forward(ids, target).pipe(Effect.retry(retryDb), Effect.orDie)
        }
      })

    // The claim loop works through what the listener heard, in the order it arrived (commit
    // order). A wake-up that carries its rows is dispatched at once, with no claim round trip,
    // when the node is caught up: every row made pending for it before that wake-up has been
    // dispatched already, so the rows cannot overtake an older message of the same sender.
    // Caught up is set by a complete scan of the node's pending rows and lost by anything that
    // may hide a row: a bare `m`, a reconnect of the listener (NOTIFYs are lost while it is
    // down), a failed claim, a full inflight budget, a row for an actor not in memory (it may
    // have been moved here with older rows). Rows dispatched this way are not claimed; their
    // acknowledgement deletes them, and a scan before that skips them (`queuedRows`).
    let heard: Array<MailboxStorage.Wakeup> = []
    let scanDue = true
    let caughtUp = false
    let lastScan = 0
    const loopWake = yield* Queue.sliding<void>(1)
    /** Scan for pending rows (not only what NOTIFYs announce). */
    const wake = () => {
      scanDue = true
      loopWake.unsafeOffer(undefined)
    }
    const onWakeup = (payload: string) => {
      heard.push(MailboxStorage.decodeWakeup(payload))
      loopWake.unsafeOffer(undefined)
    }
    let releaseTokens: Array<string> = []
    let claimFailures = 0

    type Round = "more" | "complete" | "incomplete"
    const claimRound: Effect.Effect<Round> = Effect.gen(function* () {
      if (stopping || inflight >= maxInflight) return "incomplete" as Round
      if (releaseTokens.length > 0) {
        yield* storage.release(nodeId, releaseTokens)
        releaseTokens = []
      }
      const token = Crypto.randomUUID()
      const limit = Math.min(claimBatch, maxInflight - inflight)
      const rows = yield* storage
        .claim(nodeId, token, limit)
        .pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
      counters.claims++
      if (rows.length > 0) yield* dispatch(rows)
      return (rows.length === limit ? "more" : "complete") as Round
    }).pipe(
      Effect.tap(() =>
        claimFailures > 0
          ? Effect.logInfo(`claims work again after ${claimFailures} failed attempts`).pipe(
              Effect.zipRight(Effect.sync(() => (claimFailures = 0)))
            )
          : Effect.void
      ),
      Effect.catchAll((e) =>
        Effect.gen(function* () {
          claimFailures++
          if (claimFailures === 1 || claimFailures % 20 === 0) {
            yield* Effect.logWarning(`claiming messages failed (${claimFailures}x), retrying: ${describe(e)}`)
          }
          yield* Effect.sleep(Duration.millis(Math.min(2000, 25 * 2 ** Math.min(claimFailures, 7))))
          wake()
          return "incomplete" as Round
        })
      )
    )

    /** Claim the rows a wake-up named by id (they did not fit in its payload); on failure, scan. */
    const claimAnnounced = (ids: ReadonlyArray<string>) =>
      Effect.gen(function* () {
        if (releaseTokens.length > 0) {
          yield* storage.release(nodeId, releaseTokens)
          releaseTokens = []
        }
        const token = Crypto.randomUUID()
        const rows = yield* storage
          .claimIds(nodeId, token, ids)
          .pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
        counters.claims++
        if (rows.length > 0) yield* dispatch(rows)
      }).pipe(Effect.catchAll(() => Effect.sync(wake)))

    const pollMillis = Duration.toMillis(Duration.decode(options.pollInterval ?? "5 seconds"))
    const step = Effect.gen(function* () {
      // A scan at least every poll interval, even under a steady stream of wake-ups: rows
      // made pending without a NOTIFY (a failed claim given back, a row moved here) are found.
      if (Date.now() - lastScan >= pollMillis) scanDue = true
      const events = heard
      heard = []
      for (const event of events) {
        if (scanDue || !caughtUp || stopping || inflight >= maxInflight || event._tag === "Scan") {
          scanDue = true // the scan below covers this wake-up: its rows are committed
          continue
        }
        if (event._tag === "Ids") {
          yield* claimAnnounced(event.ids)
          continue
        }
        if (event.rows.some((r) => r.kind !== "reply" && !actors.has(r.actor_id!))) {
          scanDue = true
          continue
        }
        yield* dispatch(event.rows)
      }
      if (scanDue) {
        scanDue = false
        caughtUp = false
        lastScan = Date.now()
        let round: Round = "more"
        while (round === "more") round = yield* claimRound
        caughtUp = round === "complete"
      }
    })

    // The poll is a timer of its own: a timeout around each take would start (and cancel) a
    // timer and two fibers per wake-up, that is per message at a moderate load.
    const claimLoop = Queue.take(loopWake).pipe(Effect.zipRight(step), Effect.forever)
    yield* Effect.sync(() => loopWake.unsafeOffer(undefined)).pipe(
      Effect.delay(Duration.millis(pollMillis)),
      Effect.forever,
      Effect.interruptible,
      run
    )

    // --- Listener ---

    const notifier = yield* Notifier.make({
      url: urls.directUrl,
      applicationName: `troupe-listener:${nodeId}`
    })
    yield* notifier.listen(nodeChannel(nodeId), onWakeup)
    yield* notifier.listen(registryChannel, (id) => registry.invalidate(id))
    yield* notifier.onConnect(() => {
      registry.invalidateAll()
      wake()
    })
    const claimFiber = yield* run(Effect.interruptible(claimLoop))
    yield* notifier.ready

    // --- Passivation and housekeeping ---

    const sweepEvery = Duration.millis(
      Math.max(100, Math.min(30_000, ...[...kinds.values()].map((k) => Duration.toMillis(k.idleTimeout) / 4)))
    )
    const sweep = Effect.gen(function* () {
      const now = Date.now()
      const idle: Array<LocalActor> = []
      for (const a of actors.values()) {
        if (
          !a.running &&
          a.head >= a.queue.length &&
          now - a.lastActive > Duration.toMillis(a.def.idleTimeout)
        )
          idle.push(a)
      }
      for (const a of idle) {
        actors.delete(a.id)
        yield* closeScope(a)
      }
    })
    yield* sweep.pipe(Effect.delay(sweepEvery), Effect.forever, Effect.interruptible, run)

    if (logMessages) {
      const retention = Duration.decode(options.messageLogRetention ?? "5 minutes")
      const marks: Array<string> = []
      yield* Effect.gen(function* () {
        const rows = yield* sql<{ max: string | null }>`SELECT max(id)::text AS max FROM actor_message_log`
        marks.push(rows[0]?.max ?? "0")
        if (marks.length > 5) {
          const cutoff = marks.shift()!
          yield* sql`DELETE FROM actor_message_log WHERE id <= ${cutoff}::bigint`
        }
      }).pipe(
        Effect.catchAllCause((c) => Effect.logDebug("message log trim", c)),
        Effect.delay(Duration.millis(Math.max(1000, Duration.toMillis(retention) / 5))),
        Effect.forever,
        Effect.interruptible,
        run
      )
    }

    // --- Graceful shutdown (runs first: added last) ---

    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        stopping = true
        yield* Fiber.interrupt(claimFiber)
        // Wait for handlers in flight, then cut them short.
        yield* FiberSet.awaitEmpty(drainFibers).pipe(Effect.timeout(shutdownTimeout), Effect.ignore)
        yield* FiberSet.clear(drainFibers)
        const giveBack: Array<string> = []
        for (const a of actors.values()) {
          if (a.current) giveBack.push(a.current.rowId)
          for (let i = a.head; i < a.queue.length; i++) giveBack.push(a.queue[i]!.rowId)
          a.queue = []
          a.head = 0
        }
        yield* Effect.forEach(actors.values(), closeScope, { discard: true })
        yield* flushOutbox.pipe(Effect.timeout("10 seconds"), Effect.ignore)
        yield* flushAcks.pipe(Effect.timeout("10 seconds"), Effect.ignore)
        if (giveBack.length > 0) {
          yield* storage
            .unclaim(giveBack)
            .pipe(Effect.retry(retryDb), Effect.timeout("10 seconds"), Effect.ignore)
        }
        // Rows claimed but never dispatched (none in a clean stop) go back too.
        yield* storage.release(nodeId).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        for (const d of pendingAsks.values()) Deferred.unsafeDone(d, Exit.interrupt(claimFiber.id()))
      })
    )

    // --- API ---

    const spawnMany = (
      actor: Actor.Any,
      keys: ReadonlyArray<string>,
      spawnOptions?: { readonly activate?: boolean }
    ) =>
      Effect.gen(function* () {
        if (!kinds.has(actor.kind)) kinds.set(actor.kind, actor)
        for (let i = 0; i < keys.length; i += 5000) {
          const ids = keys.slice(i, i + 5000).map((k) => makeActorId(actor.kind, k))
          const placements = yield* registry.place(ids, nodeId)
          if (spawnOptions?.activate) {
            for (const p of placements) {
              const a = actors.get(p.actorId) ?? newLocal(p, actor)
              a.epoch = p.epoch
              if (a.handlers === undefined) {
                const failure = yield* activate(a)
                if (Option.isSome(failure)) yield* Effect.logWarning(`actor ${a.id}: ${failure.value}`)
              }
            }
          } else {
            for (const p of placements) {
              const a = actors.get(p.actorId)
              if (a) {
                a.epoch = p.epoch
                a.failed = p.status === "failed"
                if (!a.failed) a.restarts = undefined
              }
            }
          }
        }
      }).pipe(Effect.catchTag("SqlError", (e) => Effect.fail(new PersistenceError({ reason: describe(e) }))))

    return {
      id: nodeId,
      spawn: (actor, key) => Effect.as(spawnMany(actor, [key]), ref(actor, key)),
      spawnMany,
      register: (actor) =>
        Effect.sync(() => {
          if (!kinds.has(actor.kind)) kinds.set(actor.kind, actor)
        }),
      ref,
      tellRaw,
      askRaw,
      wake,
      prepared,
      listen: notifier.listen,
      onReconnect: notifier.onConnect,
      stats: () => {
        let running = 0
        for (const a of actors.values()) if (a.running) running++
        return {
          actorsInMemory: actors.size,
          actorsRunning: running,
          inflight,
          pendingAsks: pendingAsks.size,
          ...counters,
          listenerConnections: notifier.connections()
        }
      }
    } satisfies TroupeNode
  })

// --- internal ---

/** The Schema of the exit of a request (its success, its failure, defects). */
const exitSchemaOf = (message: Schema.TaggedRequest.All) =>
  Schema.exitSchema(message as unknown as Schema.WithResult<any, any, any, any, never>) as Schema.Schema<
    Exit.Exit<any, any>,
    unknown,
    never
  >
