/**
 * A node's outbound side: every `tell`, `ask` and reply goes through one writer fiber that
 * batches what is waiting into a single statement (insert the rows, NOTIFY each target node
 * once: `MailboxStorage.insert`). One writer per node keeps each sender's messages in commit
 * order, which is what makes per-sender→receiver FIFO hold. Asks wait here for their reply,
 * which the inbox hands over by correlation id.
 */
import {
  Deferred,
  Duration,
  Effect,
  Exit,
  type FiberId,
  FiberRef,
  Queue,
  type Schedule,
  Schema,
  type Scope
} from "effect"
import * as Crypto from "node:crypto"
import * as Actor from "./Actor.ts"
import { routingLatency } from "./Histogram.ts"
import type * as MailboxStorage from "./MailboxStorage.ts"
import {
  ActorNotFound,
  AskTimeout,
  type PersistenceError,
  ReplyBody,
  type RuntimeError
} from "../../protocol/Errors.ts"
import { type ActorId, actorId as makeActorId } from "../../protocol/Ids.ts"

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

/** The sender recorded on messages sent from within a handler: the handling actor's id. */
export const currentSender = FiberRef.unsafeMake<string | undefined>(undefined)

/** Where a reply goes: the asking node, for the ask with this message id. */
export interface ReplyTo {
  readonly replyTo: string | null
  readonly messageId: string
  readonly actorId: string
}

/** A node's outbox. */
export interface Outbox {
  /** Send an already-encoded message to an actor id. */
  readonly tellRaw: (actorId: string, body: unknown) => Effect.Effect<void, SendError>
  /** Ask with an already-encoded message; returns the reply body as stored. */
  readonly askRaw: (
    actorId: string,
    body: unknown,
    options?: { readonly timeout?: Duration.DurationInput }
  ) => Effect.Effect<unknown, AskError>
  /** A typed handle on an actor wherever it lives. */
  readonly ref: <M extends Schema.TaggedRequest.All>(actor: Actor.Actor<M>, key: string) => ActorRef<M>
  /** Answer an ask (nothing for a tell); a reply that cannot be written is logged. */
  readonly reply: (to: ReplyTo, body: ReplyBody) => Effect.Effect<void>
  /** Hand a reply row's body to the ask waiting for it, if any (it may have timed out). */
  readonly answer: (correlationId: string | null, body: unknown) => void
  /** Wait until everything queued before this call is written. */
  readonly flush: Effect.Effect<void>
  /** End every ask still waiting (graceful shutdown). */
  readonly interruptAsks: (by: FiberId.FiberId) => void
  readonly pendingAsks: () => number
  /** Statements written so far. */
  readonly writes: () => number
}

/** Start the writer of a node for the lifetime of the scope. */
export const make = (options: {
  readonly nodeId: string
  readonly storage: MailboxStorage.MailboxStorage
  /** Rows per statement at most. */
  readonly writeBatch: number
  /** How a statement is retried while the database is away. */
  readonly retry: Schedule.Schedule<unknown>
}): Effect.Effect<Outbox, never, Scope.Scope> =>
  Effect.gen(function* () {
    const { nodeId, storage, retry } = options
    const selfSender = `node:${nodeId}`
    const annotate = Effect.annotateLogs({ module: "Outbox", node: nodeId })
    let writes = 0

    // --- The writer ---

    type Outgoing =
      | {
          readonly _tag: "Row"
          readonly row: MailboxStorage.OutboundRow
          readonly done: Deferred.Deferred<void, SendError>
        }
      | { readonly _tag: "Flush"; readonly done: Deferred.Deferred<void, SendError> }
    const queue = yield* Queue.unbounded<Outgoing>()

    const writeOnce = (batch: ReadonlyArray<Outgoing>) =>
      Effect.gen(function* () {
        const items = batch.filter((o) => o._tag === "Row")
        if (items.length > 0) {
          const rows = items.map((o) => o.row)
          const inserted = yield* storage.insert(rows).pipe(Effect.retry(retry), Effect.either)
          writes++
          if (inserted._tag === "Left") {
            for (const o of items) Deferred.unsafeDone(o.done, Exit.fail(inserted.left))
          } else {
            const ok = new Set(inserted.right.map((r) => r.message_id))
            const missing = items.filter((o) => !ok.has(o.row.messageId))
            // A retried statement may have committed the first time: those ids exist already.
            const known =
              missing.length === 0
                ? new Set<string>()
                : yield* storage.registered(missing.map((o) => o.row.actorId ?? "")).pipe(
                    Effect.retry(retry),
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

    yield* Queue.takeBetween(queue, 1, options.writeBatch).pipe(
      Effect.flatMap((chunk) => writeOnce([...chunk])),
      Effect.catchAllCause((cause) => Effect.logWarning("mailbox writer", cause)),
      Effect.forever,
      Effect.interruptible,
      annotate,
      Effect.forkScoped
    )

    const send = (row: MailboxStorage.OutboundRow) =>
      Effect.flatMap(Deferred.make<void, SendError>(), (done) =>
        Effect.zipRight(Queue.offer(queue, { _tag: "Row", row, done }), Deferred.await(done))
      )

    const flush = Effect.flatMap(Deferred.make<void, SendError>(), (done) =>
      Effect.zipRight(Queue.offer(queue, { _tag: "Flush", done }), Deferred.await(done))
    ).pipe(Effect.ignore)

    // --- Tell, ask, reply ---

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

    const ref = <M extends Schema.TaggedRequest.All>(actor: Actor.Actor<M>, key: string): ActorRef<M> => {
      const id = makeActorId(actor.kind, key)
      const encode = Schema.encode(actor.schema)
      return {
        id,
        tell: (message) => Effect.flatMap(Effect.orDie(encode(message)), (body) => tellRaw(id, body)),
        ask: (message, askOptions) =>
          Effect.gen(function* () {
            const body = yield* Effect.orDie(encode(message))
            const exit = yield* askRaw(id, body, askOptions)
            const decoded = yield* Effect.orDie(Schema.decodeUnknown(Actor.exitSchema(message))(exit))
            return yield* decoded
          })
      }
    }

    const reply = (to: ReplyTo, body: ReplyBody) =>
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
          }).pipe(Effect.catchAllCause((c) => annotate(Effect.logWarning("reply not delivered", c))))

    const answer = (correlationId: string | null, body: unknown) => {
      const waiting = correlationId ? pendingAsks.get(correlationId) : undefined
      if (waiting === undefined) return
      const decoded = decodeReply(body)
      if (decoded._tag === "Right") Deferred.unsafeDone(waiting, Exit.succeed(decoded.right))
    }

    return {
      tellRaw,
      askRaw,
      ref,
      reply,
      answer,
      flush,
      interruptAsks: (by) => {
        for (const d of pendingAsks.values()) Deferred.unsafeDone(d, Exit.interrupt(by))
      },
      pendingAsks: () => pendingAsks.size,
      writes: () => writes
    } satisfies Outbox
  })

// --- internal ---

const decodeReply = Schema.decodeUnknownEither(ReplyBody)
