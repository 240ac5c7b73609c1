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

/**
 * Jobs and workers. `gh_*` tables keep the names and columns the client app reads directly
 * (a contract); `callback_outbox` and `leases` are ours.
 *
 * `attempts` is also the fencing epoch of a job's current attempt: every write of an owner
 * names the attempt it holds, so a stale owner's late write matches no row.
 */
const m0003_jobs = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`
    CREATE TABLE gh_automation_jobs (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      valet_task_id text,
      job_type text NOT NULL,
      payload jsonb NOT NULL DEFAULT '{}',
      status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'needs_human', 'completed', 'failed', 'cancelled')),
      target_worker_id text,
      worker_affinity text NOT NULL DEFAULT 'any' CHECK (worker_affinity IN ('strict', 'preferred', 'any')),
      worker_id text,
      node_id text,
      priority integer NOT NULL DEFAULT 0,
      attempts integer NOT NULL DEFAULT 0,
      max_attempts integer NOT NULL DEFAULT 3,
      timeout_seconds integer,
      callback_url text,
      interaction jsonb,
      result jsonb,
      error_code text,
      error_message text,
      cost jsonb NOT NULL DEFAULT '{"total_cost_usd": 0, "action_count": 0, "total_tokens": 0, "breakdown": []}',
      run_at timestamptz NOT NULL DEFAULT now(),
      open_at timestamptz,
      deadline_at timestamptz,
      created_at timestamptz NOT NULL DEFAULT now(),
      updated_at timestamptz NOT NULL DEFAULT now(),
      started_at timestamptz,
      finished_at timestamptz
    )`
  yield* sql`CREATE INDEX gh_automation_jobs_queued ON gh_automation_jobs (priority DESC, created_at, id)
    WHERE status = 'queued'`
  yield* sql`CREATE INDEX gh_automation_jobs_live ON gh_automation_jobs (node_id)
    WHERE status IN ('running', 'needs_human')`
  yield* sql`CREATE INDEX gh_automation_jobs_worker ON gh_automation_jobs (worker_id, status)`
  yield* sql`CREATE INDEX gh_automation_jobs_valet_task ON gh_automation_jobs (valet_task_id)`
  yield* sql`CREATE INDEX gh_automation_jobs_created ON gh_automation_jobs (created_at DESC)`
  yield* sql`
    CREATE TABLE gh_job_events (
      id bigserial PRIMARY KEY,
      job_id uuid NOT NULL,
      event_type text NOT NULL,
      message text NOT NULL DEFAULT '',
      actor text,
      metadata jsonb NOT NULL DEFAULT '{}',
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX gh_job_events_job ON gh_job_events (job_id, id)`
  yield* sql`
    CREATE TABLE gh_worker_registry (
      worker_id text PRIMARY KEY,
      status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'draining', 'offline')),
      target_worker_id text,
      ec2_instance_id text,
      ec2_ip text,
      current_job_id uuid,
      current_task_url text,
      browser_session_id text,
      node_id text,
      max_concurrent integer NOT NULL DEFAULT 1,
      registered_at timestamptz NOT NULL DEFAULT now(),
      last_heartbeat timestamptz NOT NULL DEFAULT now(),
      jobs_completed integer NOT NULL DEFAULT 0,
      jobs_failed integer NOT NULL DEFAULT 0,
      deregistered_at timestamptz,
      deregister_reason text
    )`
  yield* sql`CREATE INDEX gh_worker_registry_target ON gh_worker_registry (target_worker_id)`
  yield* sql`CREATE INDEX gh_worker_registry_node ON gh_worker_registry (node_id)`
  yield* sql`
    CREATE TABLE gh_worker_events (
      id bigserial PRIMARY KEY,
      worker_id text NOT NULL,
      event_type text NOT NULL,
      message text NOT NULL DEFAULT '',
      metadata jsonb NOT NULL DEFAULT '{}',
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX gh_worker_events_worker ON gh_worker_events (worker_id, id)`
  yield* sql`
    CREATE TABLE callback_outbox (
      id bigserial PRIMARY KEY,
      job_id uuid NOT NULL,
      url text NOT NULL,
      status text NOT NULL,
      payload jsonb NOT NULL,
      idempotency_key text NOT NULL UNIQUE,
      attempts integer NOT NULL DEFAULT 0,
      next_attempt_at timestamptz NOT NULL DEFAULT now(),
      locked_by text,
      locked_until timestamptz,
      delivered_at timestamptz,
      failed_at timestamptz,
      last_error text,
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX callback_outbox_due ON callback_outbox (next_attempt_at, id)
    WHERE delivered_at IS NULL AND failed_at IS NULL`
  yield* sql`CREATE INDEX callback_outbox_job ON callback_outbox (job_id, id)`
  yield* sql`
    CREATE TABLE leases (
      name text PRIMARY KEY,
      holder text NOT NULL,
      expires_at timestamptz NOT NULL
    )`
  // The callback body of a job as it is now (the shape the client app expects).
  yield* sql.unsafe(`
    CREATE FUNCTION troupe_callback_payload(j gh_automation_jobs) RETURNS jsonb LANGUAGE sql STABLE AS $$
      SELECT jsonb_build_object(
        'job_id', j.id, 'valet_task_id', j.valet_task_id, 'status', j.status, 'worker_id', j.worker_id,
        'target_worker_id', j.target_worker_id, 'worker_affinity', j.worker_affinity, 'cost', j.cost)
        || CASE WHEN j.status = 'needs_human' THEN jsonb_build_object('interaction', j.interaction) ELSE '{}' END
        || CASE WHEN j.status IN ('completed', 'failed', 'cancelled')
             THEN jsonb_build_object('result', j.result, 'error_code', j.error_code, 'error_message', j.error_message,
                                     'finished_at', j.finished_at)
             ELSE '{}' END
    $$`)
  // Write a job event and, for a status change of a job with a callback url, its callback
  // (same transaction); wake the dispatcher. Returns the event id.
  yield* sql.unsafe(`
    CREATE FUNCTION troupe_job_event(j gh_automation_jobs, p_type text, p_message text, p_actor text,
                                     p_metadata jsonb, p_callback boolean) RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE ev bigint;
    BEGIN
      INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
      VALUES (j.id, p_type, coalesce(p_message, ''), p_actor, coalesce(p_metadata, '{}'))
      RETURNING id INTO ev;
      IF p_callback AND j.callback_url IS NOT NULL THEN
        INSERT INTO callback_outbox (job_id, url, status, payload, idempotency_key)
        VALUES (j.id, j.callback_url, j.status, troupe_callback_payload(j), j.id::text || ':' || ev::text);
        PERFORM pg_notify('callbacks:new', j.id::text);
      END IF;
      PERFORM pg_notify('job_events:new', ev::text);
      RETURN ev;
    END $$`)
})

/**
 * The resumable event stream (`EventStream.ts`). Event ids come from one sequence for both
 * tables, so an id names one event. Each row records the transaction that wrote it (`xid`):
 * the stream is ordered by `(xid, id)` and read below the oldest running transaction, so a
 * row that commits late cannot land behind a reader. Rows from before this migration get
 * xid 0 (a constant default, so no table rewrite). Every insert wakes the stream's tails
 * (`events:new`, a statement trigger; Postgres folds identical notifies of a transaction).
 */
const m0004_event_stream = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  // Nothing inserts while the sequences are merged.
  yield* sql`LOCK TABLE gh_job_events, gh_worker_events IN ACCESS EXCLUSIVE MODE`
  yield* sql`SELECT setval('gh_job_events_id_seq', GREATEST(
      (SELECT coalesce(max(id), 0) FROM gh_job_events), (SELECT coalesce(max(id), 0) FROM gh_worker_events),
      (SELECT last_value FROM gh_job_events_id_seq), (SELECT last_value FROM gh_worker_events_id_seq)) + 1, false)`
  yield* sql`ALTER TABLE gh_worker_events ALTER COLUMN id SET DEFAULT nextval('gh_job_events_id_seq')`
  yield* sql`DROP SEQUENCE gh_worker_events_id_seq`
  for (const table of ["gh_job_events", "gh_worker_events"]) {
    yield* sql.unsafe(`ALTER TABLE ${table} ADD COLUMN xid xid8 NOT NULL DEFAULT '0'`)
    yield* sql.unsafe(`ALTER TABLE ${table} ALTER COLUMN xid SET DEFAULT pg_current_xact_id()`)
    yield* sql.unsafe(`CREATE INDEX ${table}_stream ON ${table} (xid, id)`)
  }
  yield* sql.unsafe(`
    CREATE FUNCTION troupe_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('events:new', '1');
      RETURN NULL;
    END $$`)
  yield* sql`CREATE TRIGGER gh_job_events_notify AFTER INSERT ON gh_job_events
    FOR EACH STATEMENT EXECUTE FUNCTION troupe_events_notify()`
  yield* sql`CREATE TRIGGER gh_worker_events_notify AFTER INSERT ON gh_worker_events
    FOR EACH STATEMENT EXECUTE FUNCTION troupe_events_notify()`
})

/**
 * Offers (`Worker.ts`, `JobStorage.insertAny`): an idle worker publishes one row per free
 * slot; a submit of an `any` job takes one (`FOR UPDATE SKIP LOCKED`) and hands the job to
 * that worker in the same statement, so the worker starts it from the NOTIFY without a claim.
 */
const m0005_job_offers = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`
    CREATE TABLE job_offers (
      id bigserial PRIMARY KEY,
      worker_id text NOT NULL,
      node_id text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now()
    )`
  yield* sql`CREATE INDEX job_offers_worker ON job_offers (worker_id)`
})

/**
 * The claim's pick as a function that may only walk `gh_automation_jobs_queued` in order
 * (`enable_bitmapscan`, `enable_seqscan` off in it). With stale statistics (a backlog that
 * grew faster than autovacuum analyses) the planner chose a bitmap scan of every queued
 * entry, dead ones included, and a sort, for each claim (measured: 40 ms per claim of 214
 * with 14,540 entries, so claims slowed as the backlog grew); the ordered scan stops after
 * `n` rows and marks the dead entries it passes. `ROWS 10`: with the default guess of 1,000
 * rows the claim's update hashed the whole jobs table to find the picked rows by id.
 */
const m0006_claim_pick = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql.unsafe(`
    CREATE FUNCTION troupe_pick_jobs(p_worker text, p_target text, p_n int) RETURNS SETOF uuid
    LANGUAGE sql VOLATILE ROWS 10 SET enable_bitmapscan = off SET enable_seqscan = off AS $$
      SELECT id FROM gh_automation_jobs
      WHERE status = 'queued' AND run_at <= now()
        AND (worker_affinity = 'any' OR target_worker_id = p_worker OR target_worker_id = p_target
             OR (worker_affinity = 'preferred' AND open_at <= now()))
      ORDER BY priority DESC, created_at, id
      LIMIT p_n
      FOR UPDATE SKIP LOCKED
    $$`)
})

/**
 * `gh_worker_registry.http_url`: where a worker's HTTP server answers, set once it listens.
 * A gateway proxies a job's live view to its worker there (frames never go through Postgres).
 */
const m0007_worker_http_url = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql`ALTER TABLE gh_worker_registry ADD COLUMN http_url text`
})

/** All migrations, by id. Append; never edit one that has shipped. */
export const migrations: Record<string, Effect.Effect<void, unknown, SqlClient.SqlClient>> = {
  "1_runtime": m0001_runtime,
  "2_mailbox_vacuum": m0002_mailbox_vacuum,
  "3_jobs": m0003_jobs,
  "4_event_stream": m0004_event_stream,
  "5_job_offers": m0005_job_offers,
  "6_claim_pick": m0006_claim_pick,
  "7_worker_http_url": m0007_worker_http_url
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
