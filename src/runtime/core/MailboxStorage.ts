/**
 * The durable mailbox: `actor_mailbox` rows, the wake-up NOTIFY sent in the same statement,
 * claims in batches, acknowledgements, dead letters, the diagnostic message log and its
 * trim, and the actors' lifecycle events (`actor_events`). Every statement fails with
 * `PersistenceError`.
 *
 * A row is addressed to the node that hosts its actor, looked up in `actor_registry` inside
 * the insert itself, so a tell never needs a registry round trip and a tell to an unknown id
 * is detected in the same statement.
 *
 * The wake-up NOTIFY of an insert says what was inserted, so that the receiver can skip the
 * claim round trip (see `Wakeup`): the rows themselves when they fit in a small payload, else
 * their ids, else just `m` ("something is pending"). The rows stay in the table either way.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import { refailAll } from "../db/Persistence.ts"
import { type PreparedPool, runHot } from "../db/PreparedPool.ts"
import { nodeChannel } from "../../protocol/Ids.ts"
import { type MailboxMessage, wakeupMaxBytes, wakeupMaxRows } from "../../protocol/Notifications.ts"

/** What a sender writes. `nodeId` is set for replies (addressed to a node, not an actor). */
export interface OutboundRow {
  readonly messageId: string
  readonly actorId: string | null
  readonly kind: "tell" | "ask" | "reply"
  readonly sender: string
  readonly replyTo: string | null
  readonly correlationId: string | null
  /** The encoded message, as JSON text. */
  readonly body: string
  readonly nodeId: string | null
}

/** A claimed row. */
export type InboundRow = MailboxMessage

/** An actor's lifecycle event. */
export interface ActorEvent {
  readonly actorId: string
  readonly nodeId: string
  readonly eventType: string
  readonly message: string
  readonly metadata: Record<string, unknown>
}

/** A dead letter to store. */
export interface DeadLetter {
  readonly messageId: string
  readonly actorId: string | null
  readonly nodeId: string
  readonly sender: string
  readonly body: unknown
  readonly errorTag: string
  readonly reason: string
}

/**
 * Create the storage functions over the current `SqlClient`; with `prepared`, the statements
 * of the routing path (insert, claims, acknowledgements) run as named statements on that pool.
 */
export const makeWith = (options: { readonly prepared?: PreparedPool | undefined }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const hot = runHot(options.prepared)

    /**
     * Insert a batch in order and NOTIFY each target node once, in one statement (one
     * transaction). Returns the message ids that were inserted, with their node.
     */
    const insert = (rows: ReadonlyArray<OutboundRow>) =>
      hot(
        "troupe_mailbox_insert",
        sql<{ message_id: string; node_id: string }>`
        WITH input AS (
          SELECT * FROM unnest(
            ${rows.map((r) => r.messageId)}::uuid[], ${rows.map((r) => r.actorId)}::text[],
            ${rows.map((r) => r.kind)}::text[], ${rows.map((r) => r.sender)}::text[],
            ${rows.map((r) => r.replyTo)}::text[], ${rows.map((r) => r.correlationId)}::uuid[],
            ${rows.map((r) => r.body)}::text[], ${rows.map((r) => r.nodeId)}::text[]
          ) WITH ORDINALITY AS u(message_id, actor_id, kind, sender, reply_to, correlation_id, body, node_id, ord)
        ),
        ins AS (
          INSERT INTO actor_mailbox (message_id, node_id, actor_id, kind, sender, reply_to, correlation_id, body)
          SELECT i.message_id, COALESCE(i.node_id, r.node_id), i.actor_id, i.kind, i.sender, i.reply_to,
                 i.correlation_id, i.body::jsonb
          FROM input i LEFT JOIN actor_registry r ON i.node_id IS NULL AND r.actor_id = i.actor_id
          WHERE COALESCE(i.node_id, r.node_id) IS NOT NULL
          ORDER BY i.ord
          ON CONFLICT (message_id) DO NOTHING
          RETURNING id, message_id, node_id, actor_id, kind, sender, reply_to, correlation_id, body
        ),
        per_node AS (
          SELECT node_id, count(*) AS n, json_build_object('v', 1, 'ids', json_agg(id::text ORDER BY id))::text AS ids
          FROM ins GROUP BY node_id
        ),
        woken AS (
          SELECT count(pg_notify(${nodeChannel("")} || p.node_id, CASE
            WHEN p.n <= ${wakeupMaxRows} AND octet_length(w.rows) <= ${wakeupMaxBytes} THEN w.rows
            WHEN octet_length(p.ids) <= ${wakeupMaxBytes} THEN p.ids
            ELSE 'm' END)) AS n
          FROM per_node p LEFT JOIN LATERAL (
            SELECT json_build_object('v', 1, 'rows', json_agg(json_build_array(i.id::text, i.message_id, i.actor_id, i.kind,
                     i.sender, i.reply_to, i.correlation_id, i.body) ORDER BY i.id))::text AS rows
            FROM ins i WHERE p.n <= ${wakeupMaxRows} AND i.node_id = p.node_id
          ) w ON true
        )
        SELECT ins.message_id::text AS message_id, ins.node_id FROM ins, woken`
      )

    /** Which of these actor ids are registered (to tell a retried insert from an unknown actor). */
    const registered = (actorIds: ReadonlyArray<string>) =>
      sql<{
        actor_id: string
      }>`SELECT actor_id FROM actor_registry WHERE actor_id = ANY(${actorIds}::text[])`.pipe(
        Effect.map((rows) => new Set(rows.map((r) => r.actor_id)))
      )

    /** Claim up to `limit` unclaimed rows of a node under a fresh claim token, oldest first. */
    const claim = (nodeId: string, token: string, limit: number) =>
      hot(
        "troupe_mailbox_claim",
        sql<InboundRow>`
        UPDATE actor_mailbox m SET claim = ${token}::uuid
        WHERE m.id IN (
          SELECT id FROM actor_mailbox WHERE node_id = ${nodeId} AND claim IS NULL
          ORDER BY id LIMIT ${limit} FOR UPDATE SKIP LOCKED
        )
        RETURNING m.id::text AS id, m.message_id::text AS message_id, m.actor_id, m.kind, m.sender, m.reply_to,
                  m.correlation_id::text AS correlation_id, m.body`
      ).pipe(Effect.map((rows) => [...rows].sort(byId)))

    /**
     * Claim the given rows of a node under a fresh claim token (those still unclaimed: a row
     * already claimed or acknowledged is left out), by primary key.
     */
    const claimIds = (nodeId: string, token: string, ids: ReadonlyArray<string>) =>
      hot(
        "troupe_mailbox_claim_ids",
        sql<InboundRow>`
        UPDATE actor_mailbox m SET claim = ${token}::uuid
        WHERE m.id = ANY(${ids}::bigint[]) AND m.node_id = ${nodeId} AND m.claim IS NULL
        RETURNING m.id::text AS id, m.message_id::text AS message_id, m.actor_id, m.kind, m.sender, m.reply_to,
                  m.correlation_id::text AS correlation_id, m.body`
      ).pipe(Effect.map((rows) => [...rows].sort(byId)))

    /** Give claims back: those under the given tokens, or (no tokens) every claim of the node. */
    const release = (nodeId: string, tokens?: ReadonlyArray<string>) =>
      tokens === undefined
        ? sql`UPDATE actor_mailbox SET claim = NULL WHERE node_id = ${nodeId} AND claim IS NOT NULL`
        : sql`UPDATE actor_mailbox SET claim = NULL WHERE node_id = ${nodeId} AND claim = ANY(${tokens}::uuid[])`

    /** Give back specific claimed rows (graceful shutdown: queued but not handled). */
    const unclaim = (ids: ReadonlyArray<string>) =>
      sql`UPDATE actor_mailbox SET claim = NULL WHERE id = ANY(${ids}::bigint[])`

    /** Acknowledge handled rows: delete them, keeping a copy in the message log when `log` is on. */
    const ack = (ids: ReadonlyArray<string>, log: boolean) =>
      log
        ? hot(
            "troupe_mailbox_ack_log",
            sql`
          WITH d AS (DELETE FROM actor_mailbox WHERE id = ANY(${ids}::bigint[]) RETURNING *)
          INSERT INTO actor_message_log (id, message_id, node_id, actor_id, kind, sender, body, sent_at)
          SELECT id, message_id, node_id, actor_id, kind, sender, body, created_at FROM d WHERE kind <> 'reply'
          ON CONFLICT (id) DO NOTHING`
          )
        : hot("troupe_mailbox_ack", sql`DELETE FROM actor_mailbox WHERE id = ANY(${ids}::bigint[])`)

    /** Readdress rows to the node that now hosts their actor, and wake it. */
    const forward = (ids: ReadonlyArray<string>, nodeId: string) =>
      sql`
        WITH f AS (UPDATE actor_mailbox SET node_id = ${nodeId}, claim = NULL WHERE id = ANY(${ids}::bigint[]) RETURNING 1)
        SELECT pg_notify(${nodeChannel(nodeId)}, 'm'), (SELECT count(*) FROM f)`

    /** Store dead letters. */
    const deadLetter = (letters: ReadonlyArray<DeadLetter>) =>
      sql`
        INSERT INTO actor_dead_letters (message_id, actor_id, node_id, sender, body, error_tag, reason)
        SELECT * FROM unnest(
          ${letters.map((l) => l.messageId)}::uuid[], ${letters.map((l) => l.actorId)}::text[],
          ${letters.map((l) => l.nodeId)}::text[], ${letters.map((l) => l.sender)}::text[],
          ${letters.map((l) => JSON.stringify(l.body ?? null))}::jsonb[], ${letters.map((l) => l.errorTag)}::text[],
          ${letters.map((l) => l.reason)}::text[]
        )`

    /** The newest id in the message log ("0" when empty): a mark for `trimLog`. */
    const logMark = () =>
      sql<{ max: string | null }>`SELECT max(id)::text AS max FROM actor_message_log`.pipe(
        Effect.map((rows) => rows[0]?.max ?? "0")
      )

    /** Drop message-log rows up to a mark taken earlier (ids grow, so that is the older ones). */
    const trimLog = (upTo: string) => sql`DELETE FROM actor_message_log WHERE id <= ${upTo}::bigint`

    /** Record an actor's lifecycle event (`actor_restarted`, `actor_failed`) for the inspector. */
    const writeEvent = (event: ActorEvent) =>
      sql`INSERT INTO actor_events (actor_id, node_id, event_type, message, metadata)
          VALUES (${event.actorId}, ${event.nodeId}, ${event.eventType}, ${event.message},
                  ${JSON.stringify(event.metadata)}::jsonb)`.pipe(Effect.asVoid)

    return refailAll({
      insert,
      registered,
      claim,
      claimIds,
      release,
      unclaim,
      ack,
      forward,
      deadLetter,
      logMark,
      trimLog,
      writeEvent
    })
  })

/** Create the storage functions over the current `SqlClient` (every statement unnamed). */
export const make = makeWith({})

/** The storage functions. */
export type MailboxStorage = Effect.Effect.Success<typeof make>

// --- internal ---

/** Order bigint ids given as decimal strings. */
const byId = (a: { id: string }, b: { id: string }) =>
  a.id.length !== b.id.length ? a.id.length - b.id.length : a.id < b.id ? -1 : a.id > b.id ? 1 : 0
