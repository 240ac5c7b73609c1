/**
 * A node: one process's share of the actor system, and the wiring of its parts. It joins
 * the cluster (`NodeMembership`: its row, its lock, its heartbeat), opens its listener
 * (`Notifier`, LISTEN on `node:<id>` and `registry:changed`), and runs the outbox (the one
 * batched writer), the inbox (the claim loop), the local actors and their supervisor. Its
 * scope closes them in the order a graceful shutdown needs: stop claiming, finish or give
 * back what is in flight, write what is queued, leave the cluster, close the pool last.
 */
import type { SqlClient } from "@effect/sql"
import {
  type ConfigError,
  Context,
  Duration,
  Effect,
  type FiberRef,
  Layer,
  type Schema,
  type Scope
} from "effect"
import * as Acks from "./Acks.ts"
import type * as Actor from "./Actor.ts"
import * as ActorRegistry from "./ActorRegistry.ts"
import * as Inbox from "./Inbox.ts"
import { retrySchedule } from "./internal/loop.ts"
import * as LocalActors from "./LocalActors.ts"
import * as MailboxStorage from "./MailboxStorage.ts"
import * as NodeMembership from "./NodeMembership.ts"
import * as Notifier from "./Notifier.ts"
import * as Outbox from "./Outbox.ts"
import * as Supervisor from "./Supervisor.ts"
import { NodeConfig } from "../Config.ts"
import { DatabaseUrls } from "../db/Database.ts"
import * as PreparedPool from "../db/PreparedPool.ts"
import type { PersistenceError } from "../../protocol/Errors.ts"
import { actorId as makeActorId, nodeChannel, registryChannel } from "../../protocol/Ids.ts"

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
export type SendError = Outbox.SendError

/** Errors the runtime adds to an ask. */
export type AskError = Outbox.AskError

/** A typed handle on an actor. */
export type ActorRef<M extends Schema.TaggedRequest.All> = Outbox.ActorRef<M>

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
export interface TroupeNode extends Pick<Outbox.Outbox, "ref" | "tellRaw" | "askRaw"> {
  readonly id: string
  /** Place an actor on this node (or keep it here) and return its handle. */
  readonly spawn: <M extends Schema.TaggedRequest.All, R>(
    actor: Actor.Hosted<M, R>,
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
  readonly stats: () => Stats
  /** Wake the claim loop (used by tests to check that nothing is pending). */
  readonly wake: () => void
  /** The node's pool for named (prepared) hot statements, unless `preparedStatements: false`. */
  readonly prepared: PreparedPool.PreparedPool | undefined
  /** Subscribe to a NOTIFY channel on the node's listener connection (kept across reconnects). */
  readonly listen: (channel: string, onPayload: (payload: string) => void) => Effect.Effect<void>
  /** Run after every (re)connect of the listener: where a consumer catches up on what it missed. */
  readonly onReconnect: (hook: () => void) => Effect.Effect<void>
}

/** The node of this process. */
export class Node extends Context.Tag("troupe/runtime/Node")<Node, TroupeNode>() {}

/** The sender recorded on messages sent from within a handler: the handling actor's id. */
export const currentSender: FiberRef.FiberRef<string | undefined> = Outbox.currentSender

/** Start a node for the lifetime of the scope. */
export const make = (
  options: Options
): Effect.Effect<
  TroupeNode,
  NodeMembership.NodeIdInUse | PersistenceError,
  SqlClient.SqlClient | DatabaseUrls | Scope.Scope
> =>
  Effect.gen(function* () {
    const nodeId = options.nodeId
    const urls = yield* DatabaseUrls
    // Opened first, closed last: the graceful shutdown below still writes through it.
    const prepared =
      (options.preparedStatements ?? true)
        ? yield* PreparedPool.make(urls.url, { applicationName: `troupe-mailbox:${nodeId}` })
        : undefined
    const storage = yield* MailboxStorage.makeWith({ prepared })
    const registry = yield* ActorRegistry.make
    const context = yield* Effect.context<never>()
    const kinds = new Map<string, Actor.Any>()
    for (const a of options.actors ?? []) kinds.set(a.kind, a)
    const maxInflight = options.maxInflight ?? 50_000
    const shutdownTimeout = Duration.decode(options.shutdownTimeout ?? "10 seconds")
    const retry = retrySchedule({ every: "1 second", upTo: options.sendRetryFor ?? "30 seconds" })

    // --- Membership ---

    yield* NodeMembership.make({
      nodeId,
      role: options.role ?? "gateway+worker",
      address: options.address ?? null,
      directUrl: urls.directUrl,
      heartbeat: options.heartbeat ?? "5 seconds"
    })
    // Claims left by an earlier run of this node were never handled: take them back.
    yield* storage.release(nodeId)

    // --- Outbox, acknowledgements, local actors, inbox ---

    const outbox = yield* Outbox.make({ nodeId, storage, writeBatch: options.writeBatch ?? 2000, retry })
    const logMessages = options.messageLog ?? true
    const acks = yield* Acks.make({ nodeId, storage, outbox, logMessages, retry })
    const supervisor = Supervisor.make({ nodeId, registry, storage, retry })
    const local = yield* LocalActors.make({
      nodeId,
      context,
      kinds,
      acks,
      outbox,
      supervisor,
      maxInflight,
      // Called from a handler's fiber, after `inbox` is made.
      onRoom: () => inbox.wake()
    })
    const inbox = yield* Inbox.make({
      nodeId,
      storage,
      registry,
      local,
      acks,
      outbox,
      kinds,
      claimBatch: options.claimBatch ?? 1000,
      maxInflight,
      pollInterval: Duration.decode(options.pollInterval ?? "5 seconds"),
      retry
    })

    // --- Listener ---

    const notifier = yield* Notifier.make({
      url: urls.directUrl,
      applicationName: `troupe-listener:${nodeId}`
    })
    yield* notifier.listen(nodeChannel(nodeId), inbox.onWakeup)
    yield* notifier.listen(registryChannel, (id) => registry.invalidate(id))
    yield* notifier.onConnect(() => {
      registry.invalidateAll()
      inbox.wake()
    })
    yield* notifier.ready

    // --- Message log ---

    if (logMessages) {
      // Trimmed by id marks taken every fifth of the retention: a row goes once five marks are newer.
      const retention = Duration.decode(options.messageLogRetention ?? "5 minutes")
      const marks: Array<string> = []
      yield* Effect.gen(function* () {
        marks.push(yield* storage.logMark())
        if (marks.length > 5) yield* storage.trimLog(marks.shift()!)
      }).pipe(
        Effect.catchAllCause((c) => Effect.logDebug("message log trim", c)),
        Effect.delay(Duration.millis(Math.max(1000, Duration.toMillis(retention) / 5))),
        Effect.forever,
        Effect.interruptible,
        Effect.annotateLogs({ module: "Node", node: nodeId }),
        Effect.forkScoped
      )
    }

    // --- Graceful shutdown (runs first: added last) ---

    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        local.beginStop()
        yield* inbox.stop
        const giveBack = yield* local.stop(shutdownTimeout)
        yield* outbox.flush.pipe(Effect.timeout("10 seconds"), Effect.ignore)
        yield* acks.flush.pipe(Effect.timeout("10 seconds"), Effect.ignore)
        if (giveBack.length > 0) {
          yield* storage
            .unclaim(giveBack)
            .pipe(Effect.retry(retry), Effect.timeout("10 seconds"), Effect.ignore)
        }
        // Rows claimed but never dispatched (none in a clean stop) go back too.
        yield* storage.release(nodeId).pipe(Effect.timeout("5 seconds"), Effect.ignore)
        outbox.interruptAsks(yield* Effect.fiberId)
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
        const activate = spawnOptions?.activate === true
        for (let i = 0; i < keys.length; i += 5000) {
          const ids = keys.slice(i, i + 5000).map((k) => makeActorId(actor.kind, k))
          const placements = yield* registry.place(ids, nodeId)
          for (const p of placements) yield* local.placed(p, actor, { activate })
        }
      })

    return {
      id: nodeId,
      spawn: (actor, key) => Effect.as(spawnMany(actor, [key]), outbox.ref(actor, key)),
      spawnMany,
      register: (actor) =>
        Effect.sync(() => {
          if (!kinds.has(actor.kind)) kinds.set(actor.kind, actor)
        }),
      ref: outbox.ref,
      tellRaw: outbox.tellRaw,
      askRaw: outbox.askRaw,
      wake: inbox.wake,
      prepared,
      listen: notifier.listen,
      onReconnect: notifier.onConnect,
      stats: () => {
        const actors = local.stats()
        return {
          actorsInMemory: actors.inMemory,
          actorsRunning: actors.running,
          inflight: local.inflight(),
          pendingAsks: outbox.pendingAsks(),
          handled: actors.handled,
          deadLettered: acks.deadLettered(),
          restarts: supervisor.restarts(),
          claims: inbox.claims(),
          writes: outbox.writes(),
          listenerConnections: notifier.connections()
        }
      }
    } satisfies TroupeNode
  }).pipe(Effect.annotateLogs({ module: "Node", node: options.nodeId }))

/** The node of this process as a layer: started when the layer is built, stopped gracefully when it is released. */
export const layer = (
  options: Options
): Layer.Layer<Node, NodeMembership.NodeIdInUse | PersistenceError, SqlClient.SqlClient | DatabaseUrls> =>
  Layer.scoped(Node, make(options))

/**
 * The node from the environment (`TROUPE_NODE_ID`, `TROUPE_ROLE`, `TROUPE_HEARTBEAT_MS`, see
 * `NodeConfig`), with the rest of its options given here.
 */
export const layerConfig = (
  options: Omit<Options, "nodeId" | "role" | "heartbeat"> = {}
): Layer.Layer<
  Node,
  NodeMembership.NodeIdInUse | PersistenceError | ConfigError.ConfigError,
  SqlClient.SqlClient | DatabaseUrls
> =>
  Layer.scoped(
    Node,
    Effect.flatMap(NodeConfig, (config) =>
      make({
        ...options,
        nodeId: config.nodeId,
        role: config.role,
        heartbeat: Duration.millis(config.heartbeatMs)
      })
    )
  )
