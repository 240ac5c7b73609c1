/**
 * The throughput floor of the data contract: how many no-op jobs per second this Postgres
 * takes through the fewest writes the jobs issue's contract allows, with no troupe code on
 * the path. Each job is a `gh_automation_jobs` row (inserted queued, claimed `running`, ended
 * `completed`) and every transition writes its `gh_job_events` row (`job_started`,
 * `job_completed`), on the tables and indexes as migrated. Nothing else: no actor placement,
 * no worker counters, no callbacks, no JSON handling beyond the payload.
 *
 * Same harness as the peers (`Peers.throughputRun`): one producer inserts batches of
 * `enqueueBatch` with one statement each; two workers, each on its own connection, claim up
 * to `claimBatch` with one statement (pick in queue order with SKIP LOCKED, mark running,
 * write `job_started`) and end them with one more (mark completed, write `job_completed`).
 * A job counts as handled when its claim returns. If this floor is below a target, no
 * implementation of the contract on this machine meets it.
 */
import pg from "pg"
import * as Peers from "./peers.ts"

/**
 * Where the floor runs: on troupe's migrated tables (their indexes and the event stream's
 * trigger included), or on bare copies in schema `floor_bare` with only what the statements
 * need (primary keys and the queue index, no trigger): the least any implementation needs.
 */
export type FloorTables = "migrated" | "bare"

/** Settings of the floor run (recorded in the JSON). */
export const floorSettings = {
  workers: 2,
  claim_batch: 256,
  bare_tables: [
    "floor_bare.gh_automation_jobs (LIKE gh_automation_jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS): primary key, (priority DESC, created_at, id) WHERE status = 'queued'",
    "floor_bare.gh_job_events (LIKE gh_job_events INCLUDING DEFAULTS): primary key"
  ],
  statements_per_job_batch: [
    "INSERT … SELECT unnest($payloads) (queued)",
    "WITH picked (ORDER BY priority DESC, created_at, id … FOR UPDATE SKIP LOCKED), UPDATE → running, INSERT job_started",
    "UPDATE → completed, INSERT job_completed"
  ]
}

const claimSql = `
  WITH picked AS (
    SELECT id FROM gh_automation_jobs
    WHERE status = 'queued' AND run_at <= now() AND worker_affinity = 'any'
    ORDER BY priority DESC, created_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
  ),
  claimed AS (
    UPDATE gh_automation_jobs j SET status = 'running', worker_id = $1, node_id = $1,
      attempts = j.attempts + 1, started_at = now(), updated_at = now()
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.attempts, j.payload
  ),
  ev AS (
    INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
    SELECT id, 'job_started', 'Job assigned to ' || $1, $1, jsonb_build_object('worker_id', $1::text, 'attempt', attempts)
    FROM claimed
  )
  SELECT id::text, attempts FROM claimed`

const endSql = `
  WITH ended AS (
    UPDATE gh_automation_jobs g SET status = 'completed', finished_at = now(), updated_at = now()
    FROM unnest($2::uuid[], $3::int[]) AS u(id, epoch)
    WHERE g.id = u.id AND g.attempts = u.epoch AND (CASE WHEN g.status = 'running' THEN true ELSE false END)
    RETURNING g.id
  )
  INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
  SELECT id, 'job_completed', 'Job completed on ' || $1, $1, jsonb_build_object('worker_id', $1::text) FROM ended`

/**
 * Measure the floor on a migrated database with no job left unsettled (the count of queued
 * and running jobs is what the harness waits on); the figures as `Peers.throughputRun` gives them.
 */
export const measure = async (
  url: string,
  ctx: Peers.Context,
  tables: FloorTables
): Promise<Peers.ThroughputFigures> => {
  const schema = tables === "bare" ? "floor_bare" : "public"
  const connect = async () => {
    const c = new pg.Client({ connectionString: url, application_name: "bench-floor" })
    await c.connect()
    await c.query(`SET search_path = ${schema}`)
    return c
  }
  if (tables === "bare") {
    const admin = await connect()
    try {
      await admin.query(`
        DROP SCHEMA IF EXISTS floor_bare CASCADE;
        CREATE SCHEMA floor_bare;
        CREATE TABLE floor_bare.gh_automation_jobs (LIKE public.gh_automation_jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
        ALTER TABLE floor_bare.gh_automation_jobs ADD PRIMARY KEY (id);
        CREATE INDEX ON floor_bare.gh_automation_jobs (priority DESC, created_at, id) WHERE status = 'queued';
        CREATE TABLE floor_bare.gh_job_events (LIKE public.gh_job_events INCLUDING DEFAULTS);
        ALTER TABLE floor_bare.gh_job_events ADD PRIMARY KEY (id);`)
    } finally {
      await admin.end()
    }
  }
  const producer = await connect()
  const workers = await Promise.all(Array.from({ length: floorSettings.workers }, connect))
  // The best plans whatever the statistics say (as troupe's statements get them, see
  // troupe_pick_jobs and JobStorage's byId): the pick walks the queue index in order, the
  // end looks jobs up by id.
  for (const w of workers) await w.query("SET enable_bitmapscan = off")
  const counter = new Peers.Counter()
  let stopped = false
  const loops = workers.map(async (w, i) => {
    const name = `floor-w${i}`
    while (!stopped) {
      const claimed = await w.query<{ id: string; attempts: number }>(claimSql, [
        name,
        floorSettings.claim_batch
      ])
      if (claimed.rows.length === 0) {
        // The queue is empty: look again shortly (the producer is on its way).
        await new Promise((r) => setTimeout(r, 1))
        continue
      }
      counter.add(claimed.rows.length)
      await w.query(endSql, [name, claimed.rows.map((r) => r.id), claimed.rows.map((r) => r.attempts)])
    }
  })
  try {
    return await Peers.throughputRun(
      ctx,
      counter,
      async (from, count) => {
        const payloads = Array.from({ length: count }, (_, k) => JSON.stringify({ seq: from + k }))
        await producer.query(
          "INSERT INTO gh_automation_jobs (job_type, payload) SELECT 'floor', p FROM unnest($1::jsonb[]) AS p",
          [payloads]
        )
      },
      Peers.countQuery(
        url,
        `SELECT count(*)::int AS n FROM ${schema}.gh_automation_jobs WHERE status IN ('queued', 'running')`
      )
    )
  } finally {
    stopped = true
    await Promise.all(loops)
    await Promise.all([producer, ...workers].map((c) => c.end()))
  }
}
