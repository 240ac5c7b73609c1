/**
 * Numbered migrations, applied on start. Several nodes may start at once: the run holds a
 * transaction-scoped advisory lock, so one node migrates and the others wait, then find
 * nothing left to do.
 */
import * as Migrator from "@effect/sql/Migrator"
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

const m0001_runtime = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`
    CREATE TABLE nodes (
      id text PRIMARY KEY,
      role text NOT NULL,
      address text,
      pid integer,
      hostname text,
      lock_key bigint NOT NULL,
      started_at timestamptz NOT NULL DEFAULT now(),
      last_heartbeat timestamptz NOT NULL DEFAULT now(),
      status text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'stopped'))
    )`
  yield* sql`
    CREATE TABLE actor_registry (
      actor_id text PRIMARY KEY,
      kind text NOT NULL,
      node_id text NOT NULL,
      epoch bigint NOT NULL DEFAULT 1,
      status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'failed')),
      created_at timestamptz NOT NULL DEFAULT now(),
      updated_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX actor_registry_node ON actor_registry (node_id)`
  yield* sql`
    CREATE TABLE actor_mailbox (
      id bigserial PRIMARY KEY,
      message_id uuid NOT NULL,
      node_id text NOT NULL,
      actor_id text,
      kind text NOT NULL CHECK (kind IN ('tell', 'ask', 'reply')),
      sender text NOT NULL,
      reply_to text,
      correlation_id uuid,
      body jsonb NOT NULL,
      claim uuid,
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE UNIQUE INDEX actor_mailbox_message_id ON actor_mailbox (message_id)`
  yield* sql`CREATE INDEX actor_mailbox_pending ON actor_mailbox (node_id, id) WHERE claim IS NULL`
  // Diagnostic history for the inspector (`actor <id>`, `tail`): unlogged, trimmed by age.
  yield* sql`
    CREATE UNLOGGED TABLE actor_message_log (
      id bigint PRIMARY KEY,
      message_id uuid NOT NULL,
      node_id text NOT NULL,
      actor_id text,
      kind text NOT NULL,
      sender text NOT NULL,
      body jsonb NOT NULL,
      sent_at timestamptz NOT NULL,
      handled_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX actor_message_log_actor ON actor_message_log (actor_id, id)`
  yield* sql`
    CREATE TABLE actor_dead_letters (
      id bigserial PRIMARY KEY,
      message_id uuid NOT NULL,
      actor_id text,
      node_id text NOT NULL,
      sender text NOT NULL,
      body jsonb NOT NULL,
      error_tag text NOT NULL,
      reason text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX actor_dead_letters_actor ON actor_dead_letters (actor_id, id)`
  yield* sql`
    CREATE TABLE actor_events (
      id bigserial PRIMARY KEY,
      actor_id text NOT NULL,
      node_id text NOT NULL,
      event_type text NOT NULL,
      message text NOT NULL,
      metadata jsonb NOT NULL DEFAULT '{}',
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX actor_events_actor ON actor_events (actor_id, id)`
})

/**
 * `actor_mailbox` turns over all its rows all the time: vacuum it after a few thousand dead
 * rows, not after a fraction of the table (measured: 111k dead rows made an empty claim
 * cost 0.75 ms).
 */
const m0002_mailbox_vacuum = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`ALTER TABLE actor_mailbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000)`
})

/** All migrations, by id. Append; never edit one that has shipped. */
export const migrations: Record<string, Effect.Effect<void, unknown, SqlClient.SqlClient>> = {
  "1_runtime": m0001_runtime,
  "2_mailbox_vacuum": m0002_mailbox_vacuum
}

const runMigrator = Migrator.make({})

/**
 * Apply pending migrations; safe when several nodes start at once. The Migrator serialises
 * its runs with `LOCK TABLE` on its table; creating that table is the one race left, so we
 * create it first under an advisory lock.
 */
export const run = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql.withTransaction(
    Effect.zipRight(
      sql`SELECT pg_advisory_xact_lock(${migrationLockKey}::bigint)`,
      sql`CREATE TABLE IF NOT EXISTS troupe_migrations (
            migration_id integer PRIMARY KEY,
            created_at timestamptz NOT NULL DEFAULT now(),
            name text NOT NULL)`
    )
  )
  return yield* runMigrator({ loader: Migrator.fromRecord(migrations), table: "troupe_migrations" })
})

/** The advisory lock key that serialises migration runs (`hashtext('troupe:migrations')`). */
const migrationLockKey = 7_420_117_001
