/**
 * `gh_automation_jobs` and `gh_job_events`, with the job's `callback_outbox` rows and the
 * workers' `job_offers`: every statement about a job, each one round trip. Every statement
 * fails with `PersistenceError`. The worker registry's own statements are in `WorkerStorage.ts`.
 *
 * A job's `attempts` is the fencing epoch of its current attempt: every write of an owner
 * names the attempt it holds (`AND attempts = ${epoch}`), so once the reaper has requeued a
 * job, the old owner's late writes match nothing. Every status change writes its event and
 * its callback in the same statement: through `troupe_job_event`, or in the two batched hot
 * statements (`recordStarted`, `finishMany`) through its set-based twin `eventCallbacks`.
 *
 * Some statements also write what follows from the job's change in other tables, in the same
 * round trip: the job's actor in `actor_registry` (`placeJobs`, and its removal at the end),
 * the messages of a reattempt's actor in `actor_mailbox`, and the worker's counters and
 * `current_job_id` in `gh_worker_registry`.
 */
import { SqlClient } from "@effect/sql"
import * as Statement from "@effect/sql/Statement"
import { Duration, Effect } from "effect"
import type { Interaction, Job, SubmitJob } from "../../protocol/Jobs.ts"
import {
  anyJobsChannel,
  callbacksChannel,
  type Claimed,
  jobEventsChannel,
  maxPushBytes,
  nodeJobsPrefix
} from "../../protocol/Notifications.ts"
import { nodeChannel, registryChannel } from "../../protocol/Ids.ts"
import { type PreparedPool, runHot } from "../db/PreparedPool.ts"
import { aliveSql } from "../core/NodeMembership.ts"
import { refailAll } from "../db/Persistence.ts"
import type { WorkerRegistration } from "./WorkerStorage.ts"

/** How a job ends. */
export interface Outcome {
  readonly status: "completed" | "failed" | "cancelled"
  readonly result?: unknown
  readonly errorCode?: string | null
  readonly errorMessage?: string | null
  readonly eventType: string
  readonly message: string
  readonly metadata: Record<string, unknown>
}

/** Who holds a job: its status, attempt, node and worker, and whether that node is alive. */
export interface Owner {
  readonly status: string
  readonly attempts: number
  readonly node_id: string | null
  readonly worker_id: string | null
  readonly alive: boolean
}

/** Why a strict submit was refused, from the target's row. */
export interface TargetState {
  readonly exists: boolean
  readonly status: string | null
  readonly alive: boolean
  readonly load: number
  readonly maxConcurrent: number
}

/**
 * Create the job statements over the current `SqlClient`; with `prepared`, the statements on
 * the path from submit to handler and back (`insertAny`, `claim`, `recordStarted`,
 * `finishMany`) run as named statements on that pool.
 */
export const make = (options: { readonly prepared?: PreparedPool | undefined } = {}) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const runPrepared = runHot(options.prepared)

    // --- Submit ---
    // A job is inserted handed to a worker with a free slot on offer, or else queued, and
    // whoever should claim it is woken; a strict job only if its target can take it.

    /**
     * The columns `status, worker_id, node_id, attempts, started_at, deadline_at` of a job
     * being inserted, handed to the worker of offer `o` (a LEFT JOIN: queued when none).
     */
    const handedValues = (job: SubmitJob) => sql`
          CASE WHEN o.worker_id IS NULL THEN 'queued' ELSE 'running' END, o.worker_id, o.node_id,
          CASE WHEN o.worker_id IS NULL THEN 0 ELSE 1 END,
          CASE WHEN o.worker_id IS NOT NULL THEN now() END,
          CASE WHEN o.worker_id IS NOT NULL AND ${job.timeout_seconds}::int IS NOT NULL
               THEN now() + make_interval(secs => ${job.timeout_seconds}::int) END`

    /** Which workers a target names (its worker id, or the sandbox id it registered with), with their load. */
    const targets = (target: string | null) =>
      sql`SELECT w.worker_id, w.node_id, w.status, w.max_concurrent,
          (n.id IS NOT NULL AND n.status = 'running' AND ${sql.literal(aliveSql)}) AS alive,
          (SELECT count(*) FROM gh_automation_jobs j
             WHERE (j.worker_id = w.worker_id AND j.status IN ('running', 'needs_human'))
                OR (j.status = 'queued' AND j.worker_affinity = 'strict'
                    AND j.target_worker_id IN (w.worker_id, w.target_worker_id)))::int AS load
        FROM gh_worker_registry w LEFT JOIN nodes n ON n.id = w.node_id
        WHERE ${target}::text IS NOT NULL AND (w.worker_id = ${target}::text OR w.target_worker_id = ${target}::text)`

    /**
     * Insert a job and wake who should claim it: the target's node for `strict` and
     * `preferred` when the target is up, everyone otherwise. A `strict` job is inserted only
     * if its target is active, alive and not full (the same statement decides; `undefined`
     * when it refused). A `preferred` job is open to all at once when its target is not up,
     * else after `preferredWaitMs`.
     */
    const insert = (job: SubmitJob, preferredWaitMs: number) =>
      Effect.map(
        job.target_worker_id === null
          ? insertAny(job)
          : job.worker_affinity === "strict"
            ? // Two strict submits to one target must not both see its last free slot.
              sql.withTransaction(
                Effect.zipRight(
                  sql`SELECT pg_advisory_xact_lock(hashtext(${`troupe:strict:${job.target_worker_id}`}::text))`,
                  insertOne(job, preferredWaitMs)
                )
              )
            : insertOne(job, preferredWaitMs),
        (row) => (row === undefined ? undefined : toJob(row))
      )

    /**
     * A job without a target. When a worker has a free slot on offer (`offer`), the job is
     * handed to it in this statement: it is inserted `running` under attempt 1 for that
     * worker, its `job:<id>` actor is placed on the worker's node, and the NOTIFY to that
     * node carries the job (`Pushed`), so the worker starts the handler without a claim.
     * Otherwise it is queued and every worker is woken.
     */
    const insertAny = (job: SubmitJob) =>
      runPrepared(
        "troupe_job_insert_any",
        sql<JobRow & { woke: string }>`
      WITH offer AS (
        DELETE FROM job_offers WHERE id = (
          SELECT o.id FROM job_offers o
          JOIN gh_worker_registry w ON w.worker_id = o.worker_id AND w.node_id = o.node_id AND w.status = 'active'
          -- Alive by its lock: a job handed to a node that just died would spend an attempt.
          JOIN nodes n ON n.id = o.node_id AND n.status = 'running' AND ${sql.literal(aliveSql)}
          ORDER BY o.id LIMIT 1
          FOR UPDATE OF o SKIP LOCKED)
        RETURNING worker_id, node_id
      ),
      ins AS (
        INSERT INTO gh_automation_jobs (valet_task_id, job_type, payload, worker_affinity, callback_url, priority,
          max_attempts, timeout_seconds, status, worker_id, node_id, attempts, started_at, deadline_at)
        SELECT ${job.valet_task_id}::text, ${job.job_type}::text, ${JSON.stringify(job.payload ?? {})}::jsonb,
          ${job.worker_affinity}::text, ${job.callback_url}::text, ${job.priority}::int, ${job.max_attempts}::int,
          ${job.timeout_seconds}::int,
          ${handedValues(job)}
        FROM (VALUES (1)) v LEFT JOIN offer o ON true
        RETURNING *
      ),
      placed AS (${placeJobs("ins")})
      SELECT ${jobColumns("ins")},
        CASE WHEN ins.node_id IS NULL THEN pg_notify(${anyJobsChannel}::text, ins.id::text)
             ELSE pg_notify(${nodeJobsPrefix}::text || ins.node_id, ${pushedPayload("ins")})
        END IS NULL AS woke
      FROM ins`
      ).pipe(Effect.map((rows) => rows[0]))

    const insertOne = (job: SubmitJob, preferredWaitMs: number) =>
      sql<JobRow & { woke: string }>`
      WITH t AS (${targets(job.target_worker_id)}),
      avail AS (SELECT * FROM t WHERE status = 'active' AND alive ORDER BY load LIMIT 1),
      -- The target has a free slot on offer: hand the job to it, as insertAny does.
      offer AS (
        DELETE FROM job_offers WHERE id = (
          SELECT o.id FROM job_offers o JOIN avail a ON a.worker_id = o.worker_id AND a.node_id = o.node_id
          ORDER BY o.id LIMIT 1
          FOR UPDATE OF o SKIP LOCKED)
        RETURNING worker_id, node_id
      ),
      ins AS (
        INSERT INTO gh_automation_jobs (valet_task_id, job_type, payload, target_worker_id, worker_affinity,
          callback_url, priority, max_attempts, timeout_seconds, open_at,
          status, worker_id, node_id, attempts, started_at, deadline_at)
        SELECT ${job.valet_task_id}::text, ${job.job_type}::text, ${JSON.stringify(job.payload ?? {})}::jsonb,
          ${job.target_worker_id}::text, ${job.worker_affinity}::text, ${job.callback_url}::text, ${job.priority}::int,
          ${job.max_attempts}::int, ${job.timeout_seconds}::int,
          CASE WHEN ${job.worker_affinity}::text = 'preferred' THEN
            CASE WHEN EXISTS (SELECT 1 FROM avail) THEN now() + make_interval(secs => ${preferredWaitMs / 1000}::float8)
                 ELSE now() END
          END,
          ${handedValues(job)}
        FROM (VALUES (1)) v LEFT JOIN offer o ON true
        WHERE ${job.worker_affinity}::text <> 'strict' OR EXISTS (SELECT 1 FROM avail WHERE load < max_concurrent)
        RETURNING *
      ),
      placed AS (${placeJobs("ins")})
      SELECT ${jobColumns("ins")},
        CASE WHEN ins.node_id IS NOT NULL THEN pg_notify(${nodeJobsPrefix}::text || ins.node_id, ${pushedPayload("ins")})
             ELSE pg_notify(${nodeJobsPrefix}::text || CASE WHEN ins.worker_affinity <> 'any' AND a.node_id IS NOT NULL THEN a.node_id
                                            ELSE 'any' END, ins.id::text)
        END IS NULL AS woke
      FROM ins LEFT JOIN avail a ON true`.withoutTransform.pipe(Effect.map((rows) => rows[0]))

    /**
     * Insert many jobs that need no availability check (`any` and `preferred`), in order, and
     * wake everyone once. A `preferred` job whose target is up waits for it as in `insert`.
     */
    const insertMany = (jobs: ReadonlyArray<SubmitJob>, preferredWaitMs: number) =>
      sql<JobRow>`
      WITH input AS (
        SELECT * FROM unnest(
          ${jobs.map((j) => j.valet_task_id)}::text[], ${jobs.map((j) => j.job_type)}::text[],
          ${jobs.map((j) => JSON.stringify(j.payload ?? {}))}::jsonb[], ${jobs.map((j) => j.target_worker_id)}::text[],
          ${jobs.map((j) => j.worker_affinity)}::text[], ${jobs.map((j) => j.callback_url)}::text[],
          ${jobs.map((j) => j.priority)}::int[], ${jobs.map((j) => j.max_attempts)}::int[],
          ${jobs.map((j) => j.timeout_seconds)}::int[]
        ) WITH ORDINALITY AS u(valet_task_id, job_type, payload, target_worker_id, worker_affinity, callback_url,
                               priority, max_attempts, timeout_seconds, ord)
      ),
      up AS (
        SELECT DISTINCT ON (k) k FROM (
          SELECT w.worker_id AS k FROM gh_worker_registry w JOIN nodes n ON n.id = w.node_id
          WHERE w.status = 'active' AND n.status = 'running' AND ${sql.literal(aliveSql)}
          UNION ALL
          SELECT w.target_worker_id FROM gh_worker_registry w JOIN nodes n ON n.id = w.node_id
          WHERE w.status = 'active' AND w.target_worker_id IS NOT NULL AND n.status = 'running' AND ${sql.literal(aliveSql)}
        ) t
      ),
      ins AS (
        INSERT INTO gh_automation_jobs (valet_task_id, job_type, payload, target_worker_id, worker_affinity,
          callback_url, priority, max_attempts, timeout_seconds, open_at)
        SELECT i.valet_task_id, i.job_type, i.payload, i.target_worker_id, i.worker_affinity, i.callback_url,
          i.priority, i.max_attempts, i.timeout_seconds,
          CASE WHEN i.worker_affinity = 'preferred' THEN
            CASE WHEN i.target_worker_id IN (SELECT k FROM up)
                 THEN now() + make_interval(secs => ${preferredWaitMs / 1000}::float8) ELSE now() END
          END
        FROM input i ORDER BY i.ord
        RETURNING *
      )
      SELECT ${jobColumns("ins")}, (SELECT pg_notify(${anyJobsChannel}::text, 'batch')) IS NULL AS woke FROM ins`.withoutTransform.pipe(
        Effect.map((rows) => rows.map(toJob))
      )

    /** Why a target cannot take a strict job now: the `targets` rows the strict insert decided by. */
    const targetState = (target: string) =>
      Effect.map(
        sql<{ status: string; alive: boolean; load: number; max_concurrent: number }>`${targets(target)}`
          .withoutTransform,
        (rows): TargetState => {
          const best = rows.find((r) => r.status === "active" && r.alive) ?? rows[0]
          return best === undefined
            ? { exists: false, status: null, alive: false, load: 0, maxConcurrent: 0 }
            : {
                exists: true,
                status: best.status,
                alive: best.alive,
                load: best.load,
                maxConcurrent: best.max_concurrent
              }
        }
      )

    // --- Claim & hand-off ---
    // A worker takes queued jobs and lends the slots the queue cannot fill; it takes its
    // offers back, and catches up on jobs handed to it that it never started.

    /**
     * Claim the jobs this worker may run, oldest of the highest priority first, up to its
     * `free` slots plus those it had on offer (withdrawn here, `withdraw`): mark them running
     * under a new attempt, place their `job:<id>` actors on this node (moving any messages
     * waiting for an earlier placement). With `lend`, the slots the queue could not fill are
     * put on offer (`insertAny` hands the next jobs straight to them). One statement; the
     * last row (`id` null) carries how many offers were withdrawn and lent.
     */
    const claim = (
      worker: WorkerRegistration,
      free: number,
      options: { readonly withdraw: boolean; readonly lend: boolean }
    ) =>
      runPrepared(
        "troupe_job_claim",
        sql<Claimed & { attempts: number; withdrawn: number; lent: number }>`
      WITH gone AS (
        DELETE FROM job_offers
        WHERE worker_id = ${worker.workerId}::text AND node_id = ${worker.nodeId}::text AND ${options.withdraw}::bool
        RETURNING 1
      ),
      -- A withdrawn offer is a free slot again: the claim may fill it from the queue.
      lim AS (SELECT ${free}::int + (SELECT count(*) FROM gone)::int AS n),
      -- A draining or offline worker neither claims nor lends.
      active AS (SELECT 1 FROM gh_worker_registry WHERE worker_id = ${worker.workerId}::text AND status = 'active'),
      -- The queue index in order, locked rows skipped (Migrations: troupe_pick_jobs).
      picked AS (
        SELECT p.id FROM troupe_pick_jobs(${worker.workerId}::text, ${worker.targetWorkerId}::text,
                                          (SELECT n FROM lim)) AS p(id)
        WHERE EXISTS (SELECT 1 FROM active)
      ),
      -- A new attempt: the fencing epoch moves on, and the deadline counts from now.
      claimed AS (
        UPDATE gh_automation_jobs j SET status = 'running', worker_id = ${worker.workerId}, node_id = ${worker.nodeId},
          attempts = j.attempts + 1, started_at = coalesce(j.started_at, now()), updated_at = now(),
          deadline_at = CASE WHEN j.timeout_seconds IS NULL THEN NULL
                             ELSE now() + make_interval(secs => j.timeout_seconds) END
        FROM picked WHERE j.id = picked.id
        RETURNING j AS job, j.id, j.attempts, j.node_id
      ),
      placed AS (${placeJobs("claimed")}),
      -- A reattempt's actor may have had a placement elsewhere: messages waiting for it follow
      -- it here, and every node's cached placement is invalidated (as ActorRegistry.place does).
      moved AS (
        UPDATE actor_mailbox SET node_id = ${worker.nodeId}::text, claim = NULL
        WHERE actor_id IN (SELECT 'job:' || id FROM claimed WHERE attempts > 1) AND node_id <> ${worker.nodeId}::text
        RETURNING 1
      ),
      -- Moved messages need a scan on this node (a bare wake-up), not the rows-in-NOTIFY fast path.
      woke AS (
        SELECT pg_notify(${registryChannel}::text, 'job:' || c.id) FROM claimed c WHERE c.attempts > 1
        UNION ALL SELECT pg_notify(${nodeChannel("")}::text || ${worker.nodeId}::text, 'm') FROM (SELECT 1 FROM moved LIMIT 1) x
      ),
      -- The slots left free, on offer; none when the worker is not active.
      lent AS (
        INSERT INTO job_offers (worker_id, node_id)
        SELECT ${worker.workerId}::text, ${worker.nodeId}::text
        FROM generate_series(1, (SELECT n FROM lim) - (SELECT count(*) FROM claimed)::int)
        WHERE ${options.lend}::bool AND EXISTS (SELECT 1 FROM active)
        RETURNING 1
      )
      SELECT (c.job).id::text AS id, (c.job).job_type, (c.job).payload, (c.job).attempts, (c.job).timeout_seconds,
        (c.job).worker_affinity, (c.job).target_worker_id, (c.job).valet_task_id, (c.job).cost,
        0 AS withdrawn, 0 AS lent
      FROM claimed c
      WHERE ${evaluated("woke")}
      UNION ALL
      SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
        (SELECT count(*) FROM gone)::int, (SELECT count(*) FROM lent)::int`
      ).pipe(
        Effect.map((rows) => {
          const last = rows.find((r) => r.id === null)
          return {
            rows: rows.filter((r) => r.id !== null) as ReadonlyArray<Claimed>,
            withdrawn: last?.withdrawn ?? 0,
            lent: last?.lent ?? 0
          }
        })
      )

    /**
     * Take back every slot a worker (on this node) has on offer; returns how many were still
     * there. Offers an earlier process left under another node are the reaper's to delete.
     */
    const withdraw = (worker: WorkerRegistration) =>
      Effect.map(
        sql<{ n: number }>`
          WITH gone AS (
            DELETE FROM job_offers WHERE worker_id = ${worker.workerId}::text AND node_id = ${worker.nodeId}::text
            RETURNING 1
          )
          SELECT count(*)::int AS n FROM gone`.withoutTransform,
        (rows) => rows[0]?.n ?? 0
      )

    /**
     * Jobs handed to this worker (`insertAny`) that it has not started: it is not running
     * them (`known`) and no `job_started` was written for their attempt. What a worker
     * adopts when a NOTIFY may have been missed (a reconnect, a poll).
     */
    const handedNotStarted = (worker: WorkerRegistration, known: ReadonlyArray<string>) =>
      sql<Claimed>`
      SELECT ${claimedColumns} FROM gh_automation_jobs j
      WHERE j.worker_id = ${worker.workerId}::text AND j.status = 'running' AND j.node_id = ${worker.nodeId}::text
        AND NOT (j.id = ANY(${known}::uuid[]))
        AND NOT EXISTS (SELECT 1 FROM gh_job_events e WHERE e.job_id = j.id AND e.event_type = 'job_started'
                          AND (e.metadata->>'attempt')::int = j.attempts)`.withoutTransform

    /** A job handed to this worker, not started yet, whose NOTIFY was too large to carry it: read it. */
    const readHanded = (worker: WorkerRegistration, jobId: string, attempts: number) =>
      Effect.map(
        sql<Claimed>`
      SELECT ${claimedColumns} FROM gh_automation_jobs j
      WHERE j.id = ${jobId}::uuid AND j.attempts = ${attempts}::int AND j.worker_id = ${worker.workerId}::text
        AND ${byId("j", "running")}`.withoutTransform,
        (rows) => rows[0]
      )

    // --- Running ---
    // What a live attempt writes: its start, a pause for a human and the resume, reports.

    /**
     * `troupe_job_event`'s callbacks and NOTIFYs for a batch, as CTEs `cb` and `woke` (same rows,
     * same idempotency key): `ev` holds the events just written for the jobs of CTE `source`
     * (`id`; `job`, the row as it now is), each callback has status `status`, and `callbacks:new`
     * carries `word`.
     * Inlined, not called per row: a batch of up to 500 sends two NOTIFYs, not two per job, in
     * half the time (measured on 500 jobs: 23–58 ms through the function, 12–33 ms set-based).
     */
    const eventCallbacks = (source: string, status: string, word: string) => sql`
      cb AS (
        INSERT INTO callback_outbox (job_id, url, status, payload, idempotency_key)
        SELECT s.id, (s.job).callback_url, ${sql.literal(status)}, troupe_callback_payload(s.job), s.id::text || ':' || ev.id::text
        FROM ${sql.literal(source)} s JOIN ev ON ev.job_id = s.id WHERE (s.job).callback_url IS NOT NULL
        RETURNING 1
      ),
      woke AS (
        SELECT pg_notify(${callbacksChannel}::text, ${sql.literal(`'${word}'`)}) FROM (SELECT 1 FROM cb LIMIT 1) x
        UNION ALL SELECT pg_notify(${jobEventsChannel}::text, (SELECT max(id) FROM ev)::text) WHERE EXISTS (SELECT 1 FROM ev)
      )`

    /**
     * What follows a claim or hand-off, off the path to the handler's start: `job_started`
     * events and their callbacks, and the worker's `current_job_id`. The worker holds back the
     * attempt's own writes until this is done, so events stay in order. Returns the ids whose
     * attempt was still live.
     */
    const recordStarted = (
      worker: WorkerRegistration,
      claimed: ReadonlyArray<{ readonly id: string; readonly attempts: number }>
    ) =>
      runPrepared(
        "troupe_job_started",
        sql<{ id: string }>`
      WITH c AS (
        SELECT j AS job, j.id, j.attempts FROM gh_automation_jobs j
        JOIN unnest(${claimed.map((c) => c.id)}::uuid[], ${claimed.map((c) => c.attempts)}::int[]) AS u(id, attempts)
          ON j.id = u.id AND j.attempts = u.attempts AND ${byId("j")}
      ),
      w AS (
        UPDATE gh_worker_registry SET current_job_id = (SELECT id FROM c LIMIT 1), last_heartbeat = now()
        WHERE worker_id = ${worker.workerId}::text AND EXISTS (SELECT 1 FROM c)
      ),
      ev AS (
        INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
        SELECT c.id, 'job_started', 'Job assigned to ' || ${worker.workerId}::text, ${worker.workerId}::text,
          jsonb_build_object('worker_id', ${worker.workerId}::text, 'node_id', ${worker.nodeId}::text,
                             'attempt', c.attempts, 'elapsed_ms', 0)
        FROM c
        RETURNING id, job_id
      ),
      ${eventCallbacks("c", "'running'", "claimed")}
      SELECT c.id::text AS id FROM c WHERE ${evaluated("woke")}`
      ).pipe(
        // The attempts still live: one that ended before it started (cancelled, reaped) is not.
        Effect.map((rows) => new Set(rows.map((r) => r.id)))
      )

    /** Pause the attempt for a human: status, interaction, event and callback. */
    const pauseForHuman = (
      jobId: string,
      epoch: number,
      interaction: Interaction,
      metadata: Record<string, unknown>
    ) =>
      sql<{ event_id: string }>`
      WITH j AS (
        UPDATE gh_automation_jobs SET status = 'needs_human', interaction = ${JSON.stringify(interaction)}::jsonb,
          deadline_at = NULL, updated_at = now()
        WHERE id = ${jobId}::uuid AND attempts = ${epoch} AND ${byId("gh_automation_jobs", "running")}
        RETURNING gh_automation_jobs AS job, worker_id
      )
      SELECT troupe_job_event(j.job, 'interaction_needed', ${interaction.message}::text, j.worker_id,
               ${JSON.stringify(metadata)}::jsonb, true)::text AS event_id FROM j`.withoutTransform.pipe(
        Effect.map((rows) => rows.length > 0)
      )

    /** Continue an attempt paused for a human: back to running (with a fresh deadline), event and callback. */
    const resumeFromHuman = (
      jobId: string,
      epoch: number,
      message: string,
      metadata: Record<string, unknown>
    ) =>
      sql<{ event_id: string }>`
      WITH j AS (
        UPDATE gh_automation_jobs SET status = 'running', interaction = NULL, updated_at = now(),
          deadline_at = CASE WHEN timeout_seconds IS NULL THEN NULL
                             ELSE now() + make_interval(secs => timeout_seconds) END
        WHERE id = ${jobId}::uuid AND attempts = ${epoch} AND ${byId("gh_automation_jobs", "needs_human")}
        RETURNING gh_automation_jobs AS job, worker_id
      )
      SELECT troupe_job_event(j.job, 'interaction_resolved', ${message}::text, j.worker_id,
               ${JSON.stringify(metadata)}::jsonb, true)::text AS event_id FROM j`.withoutTransform.pipe(
        Effect.map((rows) => rows.length > 0)
      )

    /** A handler's report (step, thought, observation …): an event of the live attempt, no callback. */
    const report = (
      jobId: string,
      epoch: number,
      eventType: string,
      message: string,
      actor: string,
      metadata: Record<string, unknown>,
      cost?: unknown
    ) =>
      sql<{ id: string }>`
      WITH live AS (
        SELECT id FROM gh_automation_jobs
        WHERE id = ${jobId}::uuid AND attempts = ${epoch} AND ${byId("gh_automation_jobs")}
      ),
      c AS (
        UPDATE gh_automation_jobs SET cost = ${json(cost)}::jsonb, updated_at = now()
        WHERE ${cost === undefined}::boolean = false AND id IN (SELECT id FROM live)
      )
      INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
      SELECT id, ${eventType}::text, ${message}::text, ${actor}::text, ${JSON.stringify(metadata)}::jsonb FROM live
      RETURNING id::text AS id`.withoutTransform.pipe(Effect.map((rows) => rows.length > 0))

    // --- Ending ---
    // Attempts that end, batched as their handlers return; a cancel, settled in the row when
    // the job is queued, else located for routing to its owner.

    /**
     * End many attempts of one worker's jobs in one statement (`finish`, set-based): what
     * the worker writes when handlers return. Returns the ids that were still live attempts.
     */
    const finishMany = (
      items: ReadonlyArray<{
        readonly jobId: string
        readonly epoch: number
        readonly outcome: Outcome
        /** The attempt's cost so far, written with its end (reports may have missed some). */
        readonly cost?: unknown
      }>
    ) =>
      runPrepared(
        "troupe_job_finish_many",
        sql<{ id: string }>`
      WITH input AS (
        SELECT * FROM unnest(
          ${items.map((i) => i.jobId)}::uuid[], ${items.map((i) => i.epoch)}::int[],
          ${items.map((i) => i.outcome.status)}::text[], ${items.map((i) => json(i.outcome.result))}::jsonb[],
          ${items.map((i) => i.outcome.errorCode ?? null)}::text[], ${items.map((i) => text(i.outcome.errorMessage))}::text[],
          ${items.map((i) => i.outcome.eventType)}::text[], ${items.map((i) => i.outcome.message)}::text[],
          ${items.map((i) => json(i.outcome.metadata))}::jsonb[], ${items.map((i) => json(i.cost))}::jsonb[]
        ) AS u(id, epoch, status, result, error_code, error_message, event_type, event_message, metadata, cost)
      ),
      j AS (
        UPDATE gh_automation_jobs g SET status = i.status, result = i.result, error_code = i.error_code,
          cost = coalesce(i.cost, g.cost),
          error_message = i.error_message, finished_at = now(), updated_at = now(), interaction = NULL, deadline_at = NULL
        FROM input i
        WHERE g.id = i.id AND g.attempts = i.epoch AND ${byId("g")}
        RETURNING g AS job, g.id, g.worker_id, g.attempts, i.status AS new_status, i.event_type, i.event_message, i.metadata
      ),
      w AS (
        UPDATE gh_worker_registry w SET
          jobs_completed = w.jobs_completed
            + (SELECT count(*) FROM j WHERE j.worker_id = w.worker_id AND j.new_status = 'completed'),
          jobs_failed = w.jobs_failed
            + (SELECT count(*) FROM j WHERE j.worker_id = w.worker_id AND j.new_status = 'failed'),
          current_job_id = CASE WHEN w.current_job_id IN (SELECT id FROM j) THEN NULL ELSE w.current_job_id END
        WHERE w.worker_id IN (SELECT worker_id FROM j)
      ),
      -- The attempt's actor goes with it (a newer placement of the same job is not this one).
      r AS (DELETE FROM actor_registry a USING j WHERE a.actor_id = 'job:' || j.id AND a.epoch = j.attempts),
      ev AS (
        INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
        SELECT j.id, j.event_type, j.event_message, j.worker_id, j.metadata FROM j
        RETURNING id, job_id
      ),
      ${eventCallbacks("j", "s.new_status", "ended")}
      SELECT j.id::text AS id FROM j WHERE ${evaluated("woke")}`
      ).pipe(Effect.map((rows) => new Set(rows.map((r) => r.id))))

    /**
     * End one attempt (a cancel settled outside its worker's batch): `finishMany` of one.
     * True when the attempt was still live; false when someone else ended it first.
     */
    const finish = (jobId: string, epoch: number, outcome: Outcome) =>
      Effect.map(finishMany([{ jobId, epoch, outcome }]), (ended) => ended.has(jobId))

    /**
     * A cancel request in one round trip: a queued job is cancelled in its row (with its event
     * and callback); otherwise the job's owner is returned, for the cancel to be routed there.
     * A running job's owner node is also sent the cancel on `jobs:<node>` (`CancelPush`), so
     * its worker interrupts the handler at once; the routed cancel that follows gets the answer.
     */
    const cancelOrLocate = (jobId: string, reason: string) =>
      sql<Owner & { cancelled: boolean }>`
      WITH j AS (
        UPDATE gh_automation_jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
          error_code = 'CANCELLED', error_message = ${reason}::text
        WHERE id = ${jobId}::uuid AND status = 'queued'
        RETURNING gh_automation_jobs AS job, id
      ),
      ev AS (SELECT troupe_job_event(j.job, 'job_cancelled', ${`Cancelled while queued: ${reason}`}::text, NULL,
                                     jsonb_build_object('worker_id', NULL), true) AS id FROM j)
      SELECT true AS cancelled, 'cancelled' AS status, 0 AS attempts, NULL::text AS node_id, NULL::text AS worker_id,
        false AS alive, false AS pushed FROM ev
      UNION ALL
      SELECT false, l.status, l.attempts, l.node_id, l.worker_id, l.alive,
        -- (a push too large for a NOTIFY payload is left out: the routed cancel does it all)
        CASE WHEN l.alive AND l.status IN ('running', 'needs_human') AND octet_length(l.push) <= ${maxPushBytes} THEN
          pg_notify(${nodeJobsPrefix}::text || l.node_id, l.push)
        END IS NULL
      FROM (
        SELECT o.id, o.status, o.attempts, o.node_id, o.worker_id,
          (n.id IS NOT NULL AND n.status = 'running' AND ${sql.literal(aliveSql)}) AS alive,
          jsonb_build_object('v', 1, 'cancel', true, 'id', o.id, 'worker_id', o.worker_id, 'attempts', o.attempts,
                             'reason', ${reason}::text)::text AS push
        FROM gh_automation_jobs o LEFT JOIN nodes n ON n.id = o.node_id
        WHERE o.id = ${jobId}::uuid AND NOT EXISTS (SELECT 1 FROM j)
      ) l`.withoutTransform.pipe(Effect.map((rows) => rows[0]))

    // --- Reaping ---
    // Live jobs whose node is gone or whose deadline has passed; queued jobs whose target
    // stopped taking work; the wake-up once a requeued job may run.

    /**
     * Requeue, or fail, live jobs: those of dead nodes (lock gone or heartbeat older than
     * `staleSeconds`) and those past their deadline by `graceSeconds` — or, with `only`, that
     * one attempt (its owner gave up on it: a local timeout, or a failure worth retrying, given
     * as `only.error`). `strict` jobs of a dead worker fail with WORKER_UNAVAILABLE; jobs out of
     * attempts fail with MAX_ATTEMPTS (TIMEOUT when it was a timeout, the error's own code when
     * it was an error); the rest go back to the queue after a backoff. Returns what was done.
     */
    const reap = (options: {
      readonly staleSeconds: number
      readonly graceSeconds: number
      readonly backoffBaseMs: number
      readonly backoffMaxMs: number
      readonly only?: {
        readonly jobId: string
        readonly epoch: number
        /** The attempt failed with this (retryable) error, rather than timing out. */
        readonly error?: { readonly code: string; readonly message: string }
      }
      /** All live jobs of this node, held by an earlier process with the node's id. */
      readonly deadNode?: string
    }) => {
      const onlyId = options.only?.jobId ?? null
      const onlyEpoch = options.only?.epoch ?? null
      const deadNode = options.deadNode ?? null
      const errorCode = options.only?.error?.code ?? null
      const errorMessage = options.only?.error?.message ?? null
      return sql<{
        id: string
        status: string
        error_code: string | null
        prev_worker: string | null
        run_in_ms: number
        target_node: string | null
      }>`
      -- The live jobs to settle, and why: their node is dead (or, with deadNode, was this
      -- node's earlier process), or else their attempt timed out.
      WITH cand AS (
        SELECT j.id, j.worker_id AS prev_worker, j.node_id AS prev_node,
          CASE WHEN ${onlyId}::uuid IS NULL
                    AND (${deadNode}::text IS NOT NULL OR n.id IS NULL OR n.status <> 'running' OR NOT (${sql.literal(aliveSql)})
                         OR n.last_heartbeat < now() - make_interval(secs => ${options.staleSeconds}::float8))
               THEN 'dead' WHEN ${errorCode}::text IS NOT NULL THEN 'error' ELSE 'timeout' END AS reason
        FROM gh_automation_jobs j LEFT JOIN nodes n ON n.id = j.node_id
        WHERE j.status IN ('running', 'needs_human')
          AND CASE WHEN ${onlyId}::uuid IS NOT NULL THEN j.id = ${onlyId}::uuid AND j.attempts = ${onlyEpoch}::int
              WHEN ${deadNode}::text IS NOT NULL THEN j.node_id = ${deadNode}::text
              ELSE (n.id IS NULL OR n.status <> 'running' OR NOT (${sql.literal(aliveSql)})
                    OR n.last_heartbeat < now() - make_interval(secs => ${options.staleSeconds}::float8))
                   OR (j.status = 'running' AND j.deadline_at < now() - make_interval(secs => ${options.graceSeconds}::float8))
              END
        FOR UPDATE OF j SKIP LOCKED
      ),
      -- code: why the job fails now (NULL: it is requeued, after backoff_ms).
      decided AS (
        SELECT c.*, CASE
            WHEN c.reason = 'dead' AND j.worker_affinity = 'strict' THEN 'WORKER_UNAVAILABLE'
            WHEN j.attempts >= j.max_attempts THEN CASE WHEN c.reason = 'timeout' THEN 'TIMEOUT'
              WHEN c.reason = 'error' THEN ${errorCode}::text ELSE 'MAX_ATTEMPTS' END
          END AS code,
          LEAST(${options.backoffMaxMs}::float8, ${options.backoffBaseMs}::float8 * power(2, GREATEST(j.attempts - 1, 0)))::int AS backoff_ms
        FROM cand c JOIN gh_automation_jobs j ON j.id = c.id
      ),
      -- A requeued job loses its owner; a preferred job whose worker died opens to everyone.
      upd AS (
        UPDATE gh_automation_jobs j SET
          status = CASE WHEN d.code IS NULL THEN 'queued' ELSE 'failed' END,
          error_code = d.code,
          error_message = CASE
            WHEN d.code IS NOT NULL AND d.reason = 'error' THEN ${errorMessage}::text || ' (attempt ' || j.attempts || ' of ' || j.max_attempts || ')'
            WHEN d.code = 'WORKER_UNAVAILABLE' THEN 'worker ' || coalesce(d.prev_worker, '?') || ' died holding this strict job'
            WHEN d.code = 'TIMEOUT' THEN 'timed out after ' || j.timeout_seconds || ' s, attempt ' || j.attempts || ' of ' || j.max_attempts
            WHEN d.code = 'MAX_ATTEMPTS' THEN 'worker ' || coalesce(d.prev_worker, '?') || ' died; no attempts left (' || j.max_attempts || ')'
          END,
          finished_at = CASE WHEN d.code IS NULL THEN NULL ELSE now() END,
          run_at = CASE WHEN d.code IS NULL THEN now() + make_interval(secs => d.backoff_ms / 1000.0) ELSE j.run_at END,
          open_at = CASE WHEN j.worker_affinity = 'preferred' AND d.reason = 'dead' THEN now() ELSE j.open_at END,
          worker_id = CASE WHEN d.code IS NULL THEN NULL ELSE j.worker_id END,
          node_id = CASE WHEN d.code IS NULL THEN NULL ELSE j.node_id END,
          interaction = NULL, deadline_at = NULL, updated_at = now()
        FROM decided d WHERE j.id = d.id
        RETURNING j AS job, j.id, j.status, j.error_code, j.attempts, d.prev_worker, d.reason, d.backoff_ms
      ),
      w AS (
        UPDATE gh_worker_registry w SET
          jobs_failed = w.jobs_failed + (SELECT count(*) FROM upd WHERE upd.prev_worker = w.worker_id AND upd.status = 'failed'),
          current_job_id = CASE WHEN w.current_job_id IN (SELECT id FROM upd) THEN NULL ELSE w.current_job_id END
        WHERE w.worker_id IN (SELECT prev_worker FROM upd)
      ),
      -- A failed job's actor goes; a requeued one's stays until its next claim places it again.
      r AS (DELETE FROM actor_registry WHERE actor_id IN (SELECT 'job:' || id FROM upd WHERE status = 'failed')),
      -- (a SELECT CTE, run in full because the join below reads every row of it)
      ev AS (
        SELECT u.id, troupe_job_event(u.job,
          CASE WHEN u.status = 'failed' THEN 'job_failed' ELSE 'job_requeued' END,
          CASE WHEN u.status = 'failed' THEN (u.job).error_message
               WHEN u.reason = 'dead' THEN 'Worker ' || coalesce(u.prev_worker, '?') || ' died; requeued (attempt ' || u.attempts || ')'
               WHEN u.reason = 'error' THEN ${errorCode}::text || ' on ' || coalesce(u.prev_worker, '?') || ': ' || ${errorMessage}::text || '; requeued (attempt ' || u.attempts || ')'
               ELSE 'Timed out on ' || coalesce(u.prev_worker, '?') || '; requeued (attempt ' || u.attempts || ')' END,
          NULL,
          jsonb_build_object('worker_id', u.prev_worker, 'reason', u.reason, 'attempt', u.attempts, 'error_code', ${errorCode}::text,
                             'retry_in_ms', CASE WHEN u.status = 'queued' THEN u.backoff_ms END),
          u.status = 'failed') AS event_id
        FROM upd u
      )
      -- target_node: where to wake the requeued job's target (none for an 'any' job).
      SELECT u.id::text AS id, u.status, u.error_code, u.prev_worker,
        CASE WHEN u.status = 'queued' THEN u.backoff_ms ELSE 0 END AS run_in_ms,
        (SELECT w.node_id FROM gh_worker_registry w WHERE (u.job).worker_affinity <> 'any'
           AND w.status = 'active' AND (u.job).target_worker_id IN (w.worker_id, w.target_worker_id) LIMIT 1) AS target_node
      FROM upd u JOIN ev ON ev.id = u.id`.withoutTransform
    }

    /**
     * A worker stops taking work: its queued strict jobs fail with WORKER_UNAVAILABLE, its
     * queued preferred jobs open to everyone (and everyone is woken). Returns the failed ids.
     */
    const closeTarget = (workerIds: ReadonlyArray<string>, why: string) =>
      workerIds.length === 0
        ? Effect.succeed<ReadonlyArray<string>>([])
        : sql<{ id: string }>`
      WITH ws AS (
        SELECT worker_id, target_worker_id FROM gh_worker_registry WHERE worker_id = ANY(${workerIds}::text[])
      ),
      keys AS (SELECT worker_id AS k FROM ws UNION SELECT target_worker_id FROM ws WHERE target_worker_id IS NOT NULL),
      still AS (
        SELECT k FROM keys WHERE NOT EXISTS (
          SELECT 1 FROM gh_worker_registry o WHERE o.status = 'active' AND o.worker_id <> ALL(${workerIds}::text[])
            AND (o.worker_id = keys.k OR o.target_worker_id = keys.k))
      ),
      failed AS (
        UPDATE gh_automation_jobs SET status = 'failed', error_code = 'WORKER_UNAVAILABLE',
          error_message = 'target worker ' || target_worker_id || ' ' || ${why}::text || ' before it ran this strict job',
          finished_at = now(), updated_at = now()
        WHERE status = 'queued' AND worker_affinity = 'strict' AND target_worker_id IN (SELECT k FROM still)
        RETURNING gh_automation_jobs AS job, id
      ),
      opened AS (
        UPDATE gh_automation_jobs SET open_at = now(), updated_at = now()
        WHERE status = 'queued' AND worker_affinity = 'preferred' AND target_worker_id IN (SELECT k FROM still)
          AND (open_at IS NULL OR open_at > now())
        RETURNING 1
      ),
      ev AS (SELECT f.id, troupe_job_event(f.job, 'job_failed', (f.job).error_message, NULL,
                                     jsonb_build_object('worker_id', NULL), true) AS e FROM failed f)
      SELECT ev.id::text AS id, pg_notify(${anyJobsChannel}::text, 'opened') IS NULL AS woke FROM ev
      UNION ALL SELECT NULL, pg_notify(${anyJobsChannel}::text, 'opened') IS NULL FROM (SELECT count(*) AS n FROM opened) o WHERE o.n > 0`.withoutTransform.pipe(
            Effect.map((rows) => rows.filter((r) => r.id !== null).map((r) => r.id))
          )

    /**
     * Jobs left queued for a target that went offline (a submit that raced the target's
     * death): close those targets again. Cheap: it reads queued jobs by the partial index.
     */
    const closeOfflineTargets = sql<{ worker_id: string }>`
      SELECT DISTINCT w.worker_id FROM gh_automation_jobs j
      JOIN gh_worker_registry w ON j.target_worker_id IN (w.worker_id, w.target_worker_id)
      WHERE j.status = 'queued' AND w.status <> 'active'
        AND (j.worker_affinity = 'strict' OR (j.worker_affinity = 'preferred' AND (j.open_at IS NULL OR j.open_at > now())))`.withoutTransform.pipe(
      Effect.flatMap((rows) =>
        closeTarget(
          rows.map((r) => r.worker_id),
          "went offline"
        )
      )
    )

    /** Wake the workers listening on `channel` (`wakeLater`, and a preferred job's wait running out). */
    const notify = (channel: string, payload: string) =>
      sql`SELECT pg_notify(${channel}, ${payload})`.pipe(Effect.asVoid)

    // --- Reading ---
    // A job as stored, and who holds it.

    /** One job, or `undefined`. */
    const get = (jobId: string) =>
      sql<JobRow>`SELECT ${jobColumns("j")} FROM gh_automation_jobs j WHERE j.id = ${jobId}::uuid`.withoutTransform.pipe(
        Effect.map((rows) => (rows[0] ? toJob(rows[0]) : undefined))
      )

    /** A job's owner: its status, attempt and whether its node is alive. */
    const owner = (jobId: string) =>
      sql<Owner>`
      SELECT j.status, j.attempts, j.node_id, j.worker_id,
        (n.id IS NOT NULL AND n.status = 'running' AND ${sql.literal(aliveSql)}) AS alive
      FROM gh_automation_jobs j LEFT JOIN nodes n ON n.id = j.node_id
      WHERE j.id = ${jobId}::uuid`.withoutTransform.pipe(Effect.map((rows) => rows[0]))

    return refailAll({
      insert,
      insertMany,
      targetState,
      claim,
      withdraw,
      handedNotStarted,
      readHanded,
      recordStarted,
      pauseForHuman,
      resumeFromHuman,
      report,
      finishMany,
      finish,
      cancelOrLocate,
      reap,
      closeTarget,
      closeOfflineTargets,
      notify,
      get,
      owner
    })
  })

/** The job statements. */
export type JobStorage = Effect.Effect.Success<ReturnType<typeof make>>

/** Wake every worker once a requeued job's backoff has passed (in the background). */
export const wakeLater = (storage: JobStorage, afterMs: number) =>
  storage
    .notify(anyJobsChannel, "retry")
    .pipe(Effect.delay(Duration.millis(afterMs + 5)), Effect.ignore, Effect.forkDaemon, Effect.asVoid)

/** Whether a value can be stored as a job's result (JSON without BigInts or cycles). */
export const serializable = (value: unknown): boolean => {
  try {
    JSON.stringify(value ?? null)
    return true
  } catch {
    return false
  }
}

// --- internal ---

/** A row of `gh_automation_jobs` as selected by `jobColumns`. */
interface JobRow {
  readonly id: string
  readonly valet_task_id: string | null
  readonly job_type: string
  readonly payload: unknown
  readonly status: Job["status"]
  readonly target_worker_id: string | null
  readonly worker_affinity: Job["worker_affinity"]
  readonly worker_id: string | null
  readonly node_id: string | null
  readonly priority: number
  readonly attempts: number
  readonly max_attempts: number
  readonly timeout_seconds: number | null
  readonly callback_url: string | null
  readonly interaction: unknown
  readonly result: unknown
  readonly error_code: string | null
  readonly error_message: string | null
  readonly cost: unknown
  readonly created_at: Date
  readonly started_at: Date | null
  readonly finished_at: Date | null
}

/**
 * Place the `job:<id>` actors of the jobs in CTE `source` (`id`, `node_id`, `attempts`; those
 * without a node are queued, and skipped) on their nodes. It is `ActorRegistry.place`'s rule
 * with the attempt as the epoch: `place` bumps the epoch on each move, and a job moves only
 * through a new attempt, so its placement's epoch is its fencing epoch and an attempt's end
 * removes that placement only (`finishMany`). A fragment, not a SQL function: the insert and
 * the claim place their jobs in one INSERT, where a function would be a call per job.
 */
const placeJobs = (source: string) =>
  Statement.unsafeFragment(`
        INSERT INTO actor_registry (actor_id, kind, node_id, epoch)
        SELECT 'job:' || id, 'job', node_id, attempts FROM ${source} WHERE node_id IS NOT NULL
        ON CONFLICT (actor_id) DO UPDATE SET node_id = EXCLUDED.node_id, epoch = EXCLUDED.epoch,
          status = 'active', updated_at = now()`)

/** Read CTE `cte` to its end: Postgres runs an unread data-modifying CTE in full, a SELECT one (`woke`) not at all. */
const evaluated = (cte: string) => Statement.unsafeFragment(`(SELECT count(*) FROM ${cte}) >= 0`)

/**
 * A live job's status test (`running` or `needs_human`, or the one given) for statements that
 * find jobs by id, written as a CASE so that the planner neither estimates it from the
 * statistics nor answers it from the partial index `gh_automation_jobs_live`: such a
 * statement must look its jobs up by id. Statistics taken while few jobs ran made the plain
 * test look like one row, and the planner scanned every running job once per id of a batch
 * (measured: 1.1 s to end a batch of 500 with 2,255 jobs running; the cost grows with the
 * square of the load).
 */
const byId = (alias: string, only?: "running" | "needs_human") =>
  Statement.unsafeFragment(
    `(CASE WHEN ${alias}.status IN (${only === undefined ? "'running', 'needs_human'" : `'${only}'`}) THEN true ELSE false END)`
  )

/** The columns of a `Claimed` from `gh_automation_jobs j`. */
const claimedColumns = Statement.unsafeFragment(
  "j.id::text AS id, j.job_type, j.payload, j.attempts, j.timeout_seconds, j.worker_affinity, j.target_worker_id, j.valet_task_id, j.cost"
)

/**
 * The NOTIFY payload that hands the inserted job `alias` to its worker (`Pushed`): the job
 * when it fits in `maxPushBytes`, else its id and attempt.
 */
const pushedPayload = (alias: string) =>
  Statement.unsafeFragment(`(
    SELECT CASE WHEN octet_length(p) <= ${maxPushBytes} THEN p
      ELSE json_build_object('v', 1, 'id', ${alias}.id, 'worker_id', ${alias}.worker_id, 'attempts', ${alias}.attempts,
                             'fetch', true)::text END
    FROM (SELECT json_build_object('v', 1, 'id', ${alias}.id, 'worker_id', ${alias}.worker_id, 'attempts', ${alias}.attempts,
      'job_type', ${alias}.job_type, 'payload', ${alias}.payload, 'timeout_seconds', ${alias}.timeout_seconds,
      'worker_affinity', ${alias}.worker_affinity, 'target_worker_id', ${alias}.target_worker_id,
      'valet_task_id', ${alias}.valet_task_id, 'cost', ${alias}.cost)::text AS p) x)`)

/** The columns of a `JobRow` from `gh_automation_jobs` under `alias`. */
const jobColumns = (alias: string) =>
  Statement.unsafeFragment(
    [
      "id::text AS id",
      "valet_task_id",
      "job_type",
      "payload",
      "status",
      "target_worker_id",
      "worker_affinity",
      "worker_id",
      "node_id",
      "priority",
      "attempts",
      "max_attempts",
      "timeout_seconds",
      "callback_url",
      "interaction",
      "result",
      "error_code",
      "error_message",
      "cost",
      "created_at",
      "started_at",
      "finished_at"
    ]
      .map((c) => `${alias}.${c}`)
      .join(", ")
  )

/** A stored row as the wire shape. */
const toJob = ({ woke: _woke, ...r }: JobRow & { readonly woke?: unknown }): Job => ({
  ...r,
  created_at: r.created_at.toISOString(),
  started_at: r.started_at?.toISOString() ?? null,
  finished_at: r.finished_at?.toISOString() ?? null
})

/**
 * JSON for a jsonb parameter. Postgres rejects `\u0000` in jsonb and text, and a handler may
 * return what JSON cannot hold (a BigInt, a cycle): callers check with `serializable` first.
 */
const json = (value: unknown) => (value === undefined ? null : JSON.stringify(value).replace(/\\u0000/g, ""))

const NUL = String.fromCharCode(0)

/** Text Postgres accepts (no NUL characters). */
const text = (value: string | null | undefined) => (value == null ? null : value.replaceAll(NUL, ""))
