/**
 * `actor_registry`: actor id → node id + epoch + status, with a per-node cache that NOTIFY
 * on `registry:changed` invalidates (and a reconnect of the listener clears, since
 * invalidations may have been missed while it was down). Statements fail with
 * `PersistenceError`.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import { refailAll } from "../db/Persistence.ts"
import { nodeChannel, registryChannel } from "../../protocol/Ids.ts"

/** Where an actor lives. */
export interface Placement {
  readonly actorId: string
  readonly kind: string
  readonly nodeId: string
  readonly epoch: number
  readonly status: "active" | "failed"
}

interface Row {
  readonly actor_id: string
  readonly kind: string
  readonly node_id: string
  readonly epoch: string
  readonly status: "active" | "failed"
}

const toPlacement = (r: Row): Placement => ({
  actorId: r.actor_id,
  kind: r.kind,
  nodeId: r.node_id,
  epoch: Number(r.epoch),
  status: r.status
})

/** The largest number of placements a node keeps cached before it starts over. */
const cacheLimit = 200_000

/** Create the registry over the current `SqlClient`. */
export const make = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const cache = new Map<string, Placement>()

  const remember = (p: Placement) => {
    if (cache.size >= cacheLimit) cache.clear()
    cache.set(p.actorId, p)
  }

  /** Look placements up, from the cache where possible. Unknown ids are absent from the result. */
  const lookupMany = (actorIds: ReadonlyArray<string>) =>
    Effect.gen(function* () {
      const found = new Map<string, Placement>()
      const missing: Array<string> = []
      for (const id of actorIds) {
        const hit = cache.get(id)
        if (hit) found.set(id, hit)
        else missing.push(id)
      }
      if (missing.length > 0) {
        const rows = yield* sql<Row>`
          SELECT actor_id, kind, node_id, epoch::text AS epoch, status FROM actor_registry
          WHERE actor_id = ANY(${missing}::text[])`.withoutTransform
        for (const r of rows) {
          const p = toPlacement(r)
          remember(p)
          found.set(p.actorId, p)
        }
      }
      return found
    })

  /**
   * Place actors on a node. An actor already active there keeps its epoch; one placed
   * elsewhere (or failed) moves here with a new epoch, its pending messages follow it, and
   * every node's cache entry for it is invalidated.
   */
  const place = (actorIds: ReadonlyArray<string>, nodeId: string) =>
    Effect.gen(function* () {
      const rows = yield* sql<Row & { moved: boolean }>`
        WITH input AS (SELECT DISTINCT ON (a) a AS actor_id FROM unnest(${actorIds}::text[]) a),
        up AS (
          INSERT INTO actor_registry (actor_id, kind, node_id)
          SELECT actor_id, split_part(actor_id, ':', 1), ${nodeId} FROM input
          ON CONFLICT (actor_id) DO UPDATE SET node_id = EXCLUDED.node_id, epoch = actor_registry.epoch + 1,
            status = 'active', updated_at = now()
          WHERE actor_registry.node_id <> EXCLUDED.node_id OR actor_registry.status <> 'active'
          RETURNING actor_id, kind, node_id, epoch, status, (xmax <> 0) AS moved
        )
        SELECT actor_id, kind, node_id, epoch::text AS epoch, status, moved FROM up
        UNION ALL
        SELECT r.actor_id, r.kind, r.node_id, r.epoch::text, r.status, false FROM actor_registry r
        WHERE r.actor_id IN (SELECT actor_id FROM input) AND r.actor_id NOT IN (SELECT actor_id FROM up)`
        .withoutTransform
      const moved = rows.filter((r) => r.moved).map((r) => r.actor_id)
      if (moved.length > 0) {
        yield* sql`
          WITH f AS (UPDATE actor_mailbox SET node_id = ${nodeId}, claim = NULL
                     WHERE actor_id = ANY(${moved}::text[]) AND node_id <> ${nodeId} RETURNING 1)
          SELECT pg_notify(${nodeChannel(nodeId)}, 'm'), (SELECT count(*) FROM f)`
        yield* sql`SELECT pg_notify(${registryChannel}, a) FROM unnest(${moved}::text[]) a`
      }
      // Not cached here: a node may place a million actors that never get a message
      // (measured: 253 B of heap per cached placement). Lookups fill the cache on demand.
      const placements = rows.map(toPlacement)
      for (const p of placements) cache.delete(p.actorId)
      return placements
    })

  /** Mark an actor failed (past its restart limit), if this node still holds it at this epoch. */
  const markFailed = (actorId: string, nodeId: string, epoch: number) =>
    Effect.gen(function* () {
      yield* sql`
        UPDATE actor_registry SET status = 'failed', updated_at = now()
        WHERE actor_id = ${actorId} AND node_id = ${nodeId} AND epoch = ${epoch}`
      yield* sql`SELECT pg_notify(${registryChannel}, ${actorId})`
      const hit = cache.get(actorId)
      if (hit) cache.set(actorId, { ...hit, status: "failed" })
    })

  return refailAll({
    lookupMany,
    place,
    markFailed,
    /** Drop one cached placement (on a `registry:changed` NOTIFY). */
    invalidate: (actorId: string): void => void cache.delete(actorId),
    /** Drop every cached placement (after a reconnect of the listener). */
    invalidateAll: (): void => cache.clear()
  })
})

/** The registry functions. */
export type ActorRegistry = Effect.Effect.Success<typeof make>
