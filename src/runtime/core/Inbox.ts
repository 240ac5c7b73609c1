/**
 * A node's inbound side: the claim loop, woken by NOTIFY on `node:<id>` (and by every
 * reconnect of the listener, and by a slow poll as a fallback), claims pending rows in
 * batches, oldest first, and dispatches them: replies to the asks waiting in the outbox,
 * messages to local actors, rows for actors that moved to the node now hosting them.
 *
 * The loop works through what the listener heard, in the order it arrived (commit order). A
 * wake-up that carries its rows is dispatched at once, with no claim round trip, when the
 * node is caught up: every row made pending for it before that wake-up has been dispatched
 * already, so the rows cannot overtake an older message of the same sender. Caught up is set
 * by a complete scan of the node's pending rows and lost by anything that may hide a row: a
 * bare `m`, a reconnect of the listener (NOTIFYs are lost while it is down), a failed claim,
 * a full inflight budget, a row for an actor not in memory (it may have been moved here with
 * older rows). Rows dispatched this way are not claimed; their acknowledgement deletes them,
 * and a scan before that skips them (`LocalActors.isQueued`).
 */
import { Duration, Effect, Fiber, FiberSet, type Schedule, type Scope } from "effect"
import * as Crypto from "node:crypto"
import type { Acks } from "./Acks.ts"
import type * as Actor from "./Actor.ts"
import type * as ActorRegistry from "./ActorRegistry.ts"
import { fromRow } from "./internal/envelope.ts"
import { makeFailures, makeWake, pollEvery } from "./internal/loop.ts"
import type { LocalActors } from "./LocalActors.ts"
import * as MailboxStorage from "./MailboxStorage.ts"
import type { Outbox } from "./Outbox.ts"
import { ActorFailed, ActorNotFound, type PersistenceError } from "../../protocol/Errors.ts"
import * as Notifications from "../../protocol/Notifications.ts"

/** A node's inbox. */
export interface Inbox {
  /** Scan for pending rows (not only what NOTIFYs announce). */
  readonly wake: () => void
  /** A NOTIFY on the node's channel. */
  readonly onWakeup: (payload: string) => void
  /** Stop claiming: interrupt the claim loop and wait for it. */
  readonly stop: Effect.Effect<void>
  /** Claim statements run so far. */
  readonly claims: () => number
}

/** Start the claim loop of a node for the lifetime of the scope. */
export const make = (options: {
  readonly nodeId: string
  readonly storage: MailboxStorage.MailboxStorage
  readonly registry: ActorRegistry.ActorRegistry
  readonly local: LocalActors
  readonly acks: Acks
  readonly outbox: Outbox
  /** The kinds the node hosts (it may learn more later). */
  readonly kinds: ReadonlyMap<string, Actor.Any>
  /** Rows claimed per round trip. */
  readonly claimBatch: number
  /** Messages claimed but not yet handled, node-wide, before claiming pauses. */
  readonly maxInflight: number
  /** A scan at least this often, even when no NOTIFY arrives. */
  readonly pollInterval: Duration.Duration
  /** How a lookup or a forward is retried while the database is away. */
  readonly retry: Schedule.Schedule<unknown>
}): Effect.Effect<Inbox, never, Scope.Scope> =>
  Effect.gen(function* () {
    const { nodeId, storage, registry, local, acks, outbox, kinds, claimBatch, maxInflight, retry } = options
    const background = yield* FiberSet.make<void, never>()
    let claims = 0

    // --- Dispatch ---

    const dispatch = (
      rows: ReadonlyArray<MailboxStorage.InboundRow>
    ): Effect.Effect<void, PersistenceError> =>
      Effect.gen(function* () {
        const unknown = new Set<string>()
        for (const row of rows) {
          if (row.kind === "reply" || local.isQueued(row.id)) continue
          if (!local.has(row.actor_id!)) unknown.add(row.actor_id!)
        }
        const placements =
          unknown.size === 0
            ? new Map<string, ActorRegistry.Placement>()
            : yield* registry.lookupMany([...unknown]).pipe(Effect.retry(retry))
        const forwards = new Map<string, Array<string>>()
        for (const row of rows) {
          if (local.isQueued(row.id)) continue
          if (row.kind === "reply") {
            outbox.answer(row.correlation_id, row.body)
            acks.ack(row.id)
            continue
          }
          const env = fromRow(row)
          let a = local.get(env.actorId)
          if (a === undefined) {
            const p = placements.get(env.actorId)
            if (p === undefined) {
              yield* FiberSet.run(background, acks.reject(env, new ActorNotFound({ actorId: env.actorId })))
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
              yield* FiberSet.run(
                background,
                acks.reject(
                  env,
                  new ActorFailed({
                    actorId: env.actorId,
                    reason: `node "${nodeId}" has no behaviour for kind "${p.kind}"`
                  })
                )
              )
              continue
            }
            a = local.host(p, def)
          }
          yield* local.enqueue(a, env)
        }
        for (const [target, ids] of forwards) {
          yield* storage.forward(ids, target).pipe(Effect.retry(retry))
        }
      })

    // --- The claim loop ---

    let heard: Array<Notifications.Wakeup> = []
    let scanDue = true
    let caughtUp = false
    let lastScan = 0
    const latch = yield* makeWake
    const wake = () => {
      scanDue = true
      latch.signal()
    }
    const onWakeup = (payload: string) => {
      heard.push(Notifications.decodeWakeup(payload))
      latch.signal()
    }
    let releaseTokens: Array<string> = []
    const failures = makeFailures("claiming messages")

    /** Give back the claims of statements that failed (they may have committed). */
    const releaseFailed = Effect.suspend(() => {
      if (releaseTokens.length === 0) return Effect.void
      return Effect.zipRight(
        storage.release(nodeId, releaseTokens),
        Effect.sync(() => {
          releaseTokens = []
        })
      )
    })

    type Round = "more" | "complete" | "incomplete"
    const claimRound: Effect.Effect<Round> = Effect.gen(function* () {
      if (local.isStopping() || local.inflight() >= maxInflight) return "incomplete" as Round
      yield* releaseFailed
      const token = Crypto.randomUUID()
      const limit = Math.min(claimBatch, maxInflight - local.inflight())
      const rows = yield* storage
        .claim(nodeId, token, limit)
        .pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
      claims++
      if (rows.length > 0) {
        yield* dispatch(rows).pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
      }
      return (rows.length === limit ? "more" : "complete") as Round
    }).pipe(
      Effect.zipLeft(failures.succeeded),
      Effect.catchAll((e) =>
        Effect.zipRight(
          failures.failed(e),
          Effect.sync(() => {
            wake()
            return "incomplete" as Round
          })
        )
      )
    )

    /** Claim the rows a wake-up named by id (they did not fit in its payload); on failure, scan. */
    const claimAnnounced = (ids: ReadonlyArray<string>) =>
      Effect.gen(function* () {
        yield* releaseFailed
        const token = Crypto.randomUUID()
        const rows = yield* storage
          .claimIds(nodeId, token, ids)
          .pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
        claims++
        if (rows.length > 0) {
          yield* dispatch(rows).pipe(Effect.tapError(() => Effect.sync(() => releaseTokens.push(token))))
        }
      }).pipe(Effect.catchAll(() => Effect.sync(wake)))

    const pollMillis = Duration.toMillis(options.pollInterval)
    const step = Effect.gen(function* () {
      // A scan at least every poll interval, even under a steady stream of wake-ups: rows
      // made pending without a NOTIFY (a failed claim given back, a row moved here) are found.
      if (Date.now() - lastScan >= pollMillis) scanDue = true
      const events = heard
      heard = []
      for (const event of events) {
        if (
          scanDue ||
          !caughtUp ||
          local.isStopping() ||
          local.inflight() >= maxInflight ||
          event._tag === "Scan"
        ) {
          scanDue = true // the scan below covers this wake-up: its rows are committed
          continue
        }
        if (event._tag === "Ids") {
          yield* claimAnnounced(event.ids)
          continue
        }
        if (event.rows.some((r) => r.kind !== "reply" && !local.has(r.actor_id!))) {
          scanDue = true
          continue
        }
        // Not claimed: on a failure they are still pending, and the scan finds them.
        yield* dispatch(event.rows).pipe(Effect.catchAll(() => Effect.sync(wake)))
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

    const claimFiber = yield* latch.await.pipe(
      Effect.zipRight(step),
      Effect.catchAllCause((cause) =>
        Effect.zipRight(Effect.logWarning("claim loop", cause), Effect.sync(wake))
      ),
      Effect.forever,
      Effect.interruptible,
      Effect.annotateLogs({ module: "Inbox", node: nodeId }),
      Effect.forkScoped
    )
    yield* pollEvery(latch, options.pollInterval)

    return {
      wake,
      onWakeup,
      stop: Fiber.interrupt(claimFiber).pipe(Effect.asVoid),
      claims: () => claims
    } satisfies Inbox
  })
