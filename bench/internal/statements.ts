/**
 * The statements of the routing path measured alone, sequentially on one connection, with
 * no node reading: where a tell's time goes on the database side.
 *
 * - `MailboxStorage.insert` as the writer runs it (through `@effect/sql-pg`), by batch size.
 * - The same insert text on a plain `pg` client, unnamed (parsed and planned every time, as
 *   `@effect/sql-pg` sends it) and named (a prepared statement: planned once per connection).
 * - The claim statement, likewise unnamed and named, claiming one pending row.
 *
 * Rows are addressed to actors registered on `bench-ghost`, a node that does not run.
 * The SQL texts below mirror src/runtime/core/MailboxStorage.ts (insert and claim).
 */
import { SqlClient } from "@effect/sql"
import { Effect, Layer } from "effect"
import pg from "pg"
import * as MailboxStorage from "../../src/runtime/core/MailboxStorage.ts"
import * as Db from "./db.ts"
import { round, summarize } from "./stats.ts"

const ghost = "bench-ghost"
const actors = 256

const insertText = `
      WITH input AS (
        SELECT * FROM unnest(
          $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], $7::text[], $8::text[]
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
        SELECT count(pg_notify($9 || p.node_id, CASE
          WHEN p.n <= $10 AND octet_length(w.rows) <= $11 THEN w.rows
          WHEN octet_length(p.ids) <= $11 THEN p.ids
          ELSE 'm' END)) AS n
        FROM per_node p LEFT JOIN LATERAL (
          SELECT json_build_object('v', 1, 'rows', json_agg(json_build_array(i.id::text, i.message_id, i.actor_id, i.kind,
                   i.sender, i.reply_to, i.correlation_id, i.body) ORDER BY i.id))::text AS rows
          FROM ins i WHERE p.n <= $10 AND i.node_id = p.node_id
        ) w ON true
      )
      SELECT ins.message_id::text AS message_id, ins.node_id FROM ins, woken`

const claimText = `
      UPDATE actor_mailbox m SET claim = $2::uuid
      WHERE m.id IN (
        SELECT id FROM actor_mailbox WHERE node_id = $1 AND claim IS NULL
        ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
      )
      RETURNING m.id::text AS id, m.message_id::text AS message_id, m.actor_id, m.kind, m.sender, m.reply_to,
                m.correlation_id::text AS correlation_id, m.body`

const row = (seq: number): MailboxStorage.OutboundRow => ({
  messageId: crypto.randomUUID(),
  actorId: `sink:ghost-${seq % actors}`,
  kind: "tell",
  sender: "node:bench-statements",
  replyTo: null,
  correlationId: null,
  body: JSON.stringify({ _tag: "Ping", seq, t: performance.now() }),
  nodeId: null
})

const params = (rows: ReadonlyArray<MailboxStorage.OutboundRow>) => [
  rows.map((r) => r.messageId),
  rows.map((r) => r.actorId),
  rows.map((r) => r.kind),
  rows.map((r) => r.sender),
  rows.map((r) => r.replyTo),
  rows.map((r) => r.correlationId),
  rows.map((r) => r.body),
  rows.map((r) => r.nodeId),
  "node:",
  32,
  7000
]

export interface StatementRow {
  readonly statement: string
  readonly batch_size: number
  readonly executions: number
  readonly p50_ms: number
  readonly p99_ms: number
  readonly rows_per_s: number
}

/** One claim's plan after the measurements (EXPLAIN ANALYZE), and the table's dead rows. */
export interface ClaimPlan {
  readonly execution_ms: number
  readonly planning_ms: number
  readonly shared_buffers_hit: number
  readonly scans: ReadonlyArray<string>
  readonly mailbox_live_rows: number | undefined
  readonly mailbox_dead_rows: number | undefined
  readonly autovacuums: number | undefined
}

/** Measure; `batchSizes` for the storage insert, `rowsPerSize` rows each (at least 200 statements). */
export const measure = (url: string, batchSizes: ReadonlyArray<number>, rowsPerSize: number) =>
  Effect.gen(function* () {
    const ctx = yield* Layer.build(
      Db.clientLayer(url, { applicationName: "bench-statements", maxConnections: 1 })
    )
    const storage = yield* Effect.provide(MailboxStorage.make, ctx)
    const sql = yield* Effect.provide(SqlClient.SqlClient, ctx)
    yield* sql`
      INSERT INTO actor_registry (actor_id, kind, node_id)
      SELECT 'sink:ghost-' || g, 'sink', ${ghost} FROM generate_series(0, ${actors - 1}::int) g
      ON CONFLICT (actor_id) DO NOTHING`
    const clean = sql`DELETE FROM actor_mailbox WHERE node_id = ${ghost}`
    const out: Array<StatementRow> = []
    const record = (statement: string, size: number, times: Float64Array, elapsedMs: number) => {
      const s = summarize(times)
      out.push({
        statement,
        batch_size: size,
        executions: times.length,
        p50_ms: round(s.p50),
        p99_ms: round(s.p99),
        rows_per_s: Math.round(((times.length * size) / elapsedMs) * 1000)
      })
    }

    let seq = 0
    for (const size of batchSizes) {
      const n = Math.max(200, Math.floor(rowsPerSize / size))
      for (let i = 0; i < 20; i++) yield* storage.insert(Array.from({ length: size }, () => row(seq++)))
      const times = new Float64Array(n)
      const start = performance.now()
      for (let i = 0; i < n; i++) {
        const rows = Array.from({ length: size }, () => row(seq++))
        const t = performance.now()
        yield* storage.insert(rows)
        times[i] = performance.now() - t
      }
      record("MailboxStorage.insert (@effect/sql-pg)", size, times, performance.now() - start)
      yield* clean
    }

    const plain = new pg.Client({ connectionString: url, application_name: "bench-statements-pg" })
    yield* Effect.promise(() => plain.connect())
    yield* Effect.addFinalizer(() => Effect.promise(() => plain.end().catch(() => undefined)))
    // Unnamed and named executions alternate, so both see the same table and the same machine.
    const pair = (label: string, n: number, run: (named: boolean) => Promise<number>) =>
      Effect.promise(async () => {
        const times = { unnamed: new Float64Array(n), named: new Float64Array(n) }
        for (let i = -50; i < n; i++) {
          for (const named of [false, true]) {
            const d = await run(named)
            if (i >= 0) (named ? times.named : times.unnamed)[i] = d
          }
        }
        for (const named of [false, true]) {
          const t = named ? times.named : times.unnamed
          let spent = 0
          for (const x of t) spent += x
          record(`${label}, plain pg, ${named ? "named (prepared)" : "unnamed"}`, 1, t, spent)
        }
      })
    const n = Math.min(2000, rowsPerSize)
    const insertOne = (named: boolean) => {
      const values = params([row(seq++)])
      return named
        ? plain.query({ name: "bench_insert", text: insertText, values })
        : plain.query(insertText, values)
    }
    yield* pair("same insert", n, async (named) => {
      const t = performance.now()
      await insertOne(named)
      return performance.now() - t
    })
    yield* clean
    // Claim one pending row at a time (the insert before it is not timed).
    yield* pair("claim statement", n, async (named) => {
      await insertOne(true)
      const values = [ghost, crypto.randomUUID(), 1000]
      const t = performance.now()
      await (named
        ? plain.query({ name: "bench_claim", text: claimText, values })
        : plain.query(claimText, values))
      return performance.now() - t
    })
    // The plan the claim gets now (unnamed: planned with these values), and how many dead rows it walks past.
    yield* Effect.promise(() => insertOne(true))
    const plan = yield* Effect.promise(() =>
      plain.query(`EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ${claimText}`, [ghost, crypto.randomUUID(), 1000])
    )
    const table = yield* Effect.promise(() =>
      plain.query(
        "SELECT n_live_tup::int AS live, n_dead_tup::int AS dead, autovacuum_count::int AS autovacuums FROM pg_stat_user_tables WHERE relname = 'actor_mailbox'"
      )
    )
    const top = plan.rows[0]["QUERY PLAN"][0]
    const scans: Array<string> = []
    const walk = (node: any) => {
      if (/Scan/.test(node["Node Type"]))
        scans.push(`${node["Node Type"]}${node["Index Name"] ? ` on ${node["Index Name"]}` : ""}`)
      for (const c of node.Plans ?? []) walk(c)
    }
    walk(top.Plan)
    const claimPlan: ClaimPlan = {
      execution_ms: top["Execution Time"],
      planning_ms: top["Planning Time"],
      shared_buffers_hit: top.Plan["Shared Hit Blocks"],
      scans,
      mailbox_live_rows: table.rows[0]?.live,
      mailbox_dead_rows: table.rows[0]?.dead,
      autovacuums: table.rows[0]?.autovacuums
    }
    yield* clean
    return { rows: out, claimPlan }
  }).pipe(Effect.scoped)
