/**
 * The actors a node holds in memory. An actor is a plain object with a queue while idle and
 * gets a fiber only while it has messages: measured, an idle actor costs a few hundred bytes
 * this way, where a parked fiber per actor would not fit the 2 KB budget. On its first
 * message (or on `spawnMany … activate`) its behaviour builds the handlers in a Scope of the
 * activation; messages are then decoded and handled one at a time, and asks answered. A crash
 * goes to the supervisor; an actor idle past its kind's timeout is passivated (dropped from
 * memory, its Scope closed, still registered).
 */
import {
  Cause,
  type Context,
  Duration,
  Effect,
  Exit,
  FiberSet,
  Option,
  ParseResult,
  Schema,
  Scope
} from "effect"
import type { Acks } from "./Acks.ts"
import * as Actor from "./Actor.ts"
import type * as ActorRegistry from "./ActorRegistry.ts"
import type { Envelope } from "./internal/envelope.ts"
import { currentSender, type Outbox } from "./Outbox.ts"
import * as Supervisor from "./Supervisor.ts"
import { ActorFailed, MailboxFull, MalformedMessage } from "../../protocol/Errors.ts"
import { type ActorId, parseActorId } from "../../protocol/Ids.ts"

/** An actor in memory. */
export interface LocalActor extends Supervisor.Supervised {
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
}

/** The actors of a node. */
export interface LocalActors {
  readonly get: (actorId: string) => LocalActor | undefined
  readonly has: (actorId: string) => boolean
  /** Hold an actor placed here (not yet activated). */
  readonly host: (placement: ActorRegistry.Placement, def: Actor.Any) => LocalActor
  /** Queue a message for an actor (refused with `MailboxFull` past its capacity) and run it. */
  readonly enqueue: (actor: LocalActor, env: Envelope) => Effect.Effect<void>
  /** The row is in an actor's queue or handler (so a second delivery of it is skipped). */
  readonly isQueued: (rowId: string) => boolean
  /** Take note of a (re)placement here; with `activate`, build the actor in memory now. */
  readonly placed: (
    placement: ActorRegistry.Placement,
    def: Actor.Any,
    options: { readonly activate: boolean }
  ) => Effect.Effect<void>
  /** Messages queued or in a handler, node-wide. */
  readonly inflight: () => number
  readonly stats: () => { readonly inMemory: number; readonly running: number; readonly handled: number }
  /** Take no more messages from the queues (the first step of a graceful shutdown). */
  readonly beginStop: () => void
  readonly isStopping: () => boolean
  /**
   * Wait up to `timeout` for handlers in flight, cut them short, close every activation, and
   * return the rows that were queued or cut short (to give back to the table).
   */
  readonly stop: (timeout: Duration.Duration) => Effect.Effect<ReadonlyArray<string>>
}

/** Hold the actors of a node for the lifetime of the scope. */
export const make = (options: {
  readonly nodeId: string
  /** What behaviours are built with (the node's context). */
  readonly context: Context.Context<never>
  /** The kinds the node hosts, at start (the passivation sweep runs at a quarter of the shortest idle timeout). */
  readonly kinds: ReadonlyMap<string, Actor.Any>
  readonly acks: Acks
  readonly outbox: Outbox
  readonly supervisor: Supervisor.Supervisor
  /** The in-flight budget: `onRoom` is called when half of it is free again. */
  readonly maxInflight: number
  readonly onRoom: () => void
}): Effect.Effect<LocalActors, never, Scope.Scope> =>
  Effect.gen(function* () {
    const { nodeId, context, acks, outbox, supervisor, maxInflight } = options
    const actors = new Map<string, LocalActor>()
    let inflight = 0
    let handled = 0
    let stopping = false
    // Rows in an actor's queue or in its handler: a row can reach dispatch twice (in a wake-up
    // and again in a scan before it is acknowledged), the second time it is skipped.
    const queuedRows = new Set<string>()
    const drainFibers = yield* FiberSet.make<void, never>()
    const background = yield* FiberSet.make<void, never>()

    // --- Activation ---

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

    /** A crash: close the activation, then restart with backoff or mark the actor failed. */
    const crashed = (a: LocalActor, reason: string) =>
      Effect.zipRight(closeScope(a), supervisor.crashed(a, reason))

    // --- Handling one message ---

    const processOne = (a: LocalActor, env: Envelope) =>
      Effect.gen(function* () {
        if (acks.wasHandled(env.messageId)) return acks.ack(env.rowId)
        while (a.handlers === undefined && !a.failed) {
          const failure = yield* activate(a)
          if (Option.isSome(failure)) yield* crashed(a, failure.value)
        }
        if (a.failed) return yield* acks.reject(env, Supervisor.failedError(a.id))
        const decoded = Schema.decodeUnknownEither(a.def.schema)(env.body)
        if (decoded._tag === "Left") {
          return yield* acks.reject(
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
          handled++
          acks.markHandled(env.messageId)
          if (env.kind === "ask") {
            const encoded = Schema.encodeEither(Actor.exitSchema(message))(exit)
            yield* outbox.reply(
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
          acks.ack(env.rowId)
          return
        }
        const reason = Cause.pretty(exit.cause)
        yield* acks.reject(
          env,
          new ActorFailed({
            actorId: a.id,
            reason: `handler crashed: ${reason.split("\n")[0]!.slice(0, 500)}`
          })
        )
        yield* crashed(a, reason)
      })

    // --- Queue and drain ---

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
          if (inflight === maxInflight >> 1) options.onRoom()
        }
        if (a.head >= a.queue.length) {
          a.queue = []
          a.head = 0
        }
        a.running = false
      }).pipe(Effect.annotateLogs({ module: "LocalActors", actor: a.id }))

    const host = (p: ActorRegistry.Placement, def: Actor.Any): LocalActor => {
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
          yield* FiberSet.run(
            background,
            acks.reject(env, new MailboxFull({ actorId: a.id, capacity: a.def.capacity }))
          )
          return
        }
        a.queue.push(env)
        queuedRows.add(env.rowId)
        inflight++
        if (!a.running) {
          a.running = true
          yield* FiberSet.run(drainFibers, drain(a))
        }
      })

    const placed = (
      p: ActorRegistry.Placement,
      def: Actor.Any,
      placedOptions: { readonly activate: boolean }
    ) =>
      Effect.gen(function* () {
        if (placedOptions.activate) {
          const a = actors.get(p.actorId) ?? host(p, def)
          a.epoch = p.epoch
          if (a.handlers === undefined) {
            const failure = yield* activate(a)
            if (Option.isSome(failure)) {
              yield* Effect.logWarning(failure.value).pipe(
                Effect.annotateLogs({ module: "LocalActors", node: nodeId, actor: a.id })
              )
            }
          }
          return
        }
        const a = actors.get(p.actorId)
        if (a) {
          a.epoch = p.epoch
          a.failed = p.status === "failed"
          if (!a.failed) a.restarts = undefined
        }
      })

    // --- Passivation ---

    const sweepEvery = Duration.millis(
      Math.max(
        100,
        Math.min(30_000, ...[...options.kinds.values()].map((k) => Duration.toMillis(k.idleTimeout) / 4))
      )
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
    yield* sweep.pipe(Effect.delay(sweepEvery), Effect.forever, Effect.interruptible, Effect.forkScoped)

    // --- Stop ---

    const stop = (timeout: Duration.Duration) =>
      Effect.gen(function* () {
        stopping = true
        // Wait for handlers in flight, then cut them short.
        yield* FiberSet.awaitEmpty(drainFibers).pipe(Effect.timeout(timeout), Effect.ignore)
        yield* FiberSet.clear(drainFibers)
        const giveBack: Array<string> = []
        for (const a of actors.values()) {
          if (a.current) giveBack.push(a.current.rowId)
          for (let i = a.head; i < a.queue.length; i++) giveBack.push(a.queue[i]!.rowId)
          a.queue = []
          a.head = 0
        }
        yield* Effect.forEach(actors.values(), closeScope, { discard: true })
        return giveBack
      })

    return {
      get: (id) => actors.get(id),
      has: (id) => actors.has(id),
      host,
      enqueue,
      isQueued: (rowId) => queuedRows.has(rowId),
      placed,
      inflight: () => inflight,
      stats: () => {
        let running = 0
        for (const a of actors.values()) if (a.running) running++
        return { inMemory: actors.size, running, handled }
      },
      beginStop: () => {
        stopping = true
      },
      isStopping: () => stopping,
      stop
    } satisfies LocalActors
  })
