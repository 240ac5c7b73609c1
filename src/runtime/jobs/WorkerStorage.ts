/**
 * `gh_worker_registry` and `gh_worker_events`: a worker's registration, heartbeat, status and
 * lookup, and the reaper's sweep of workers whose node is gone. Every statement fails with
 * `PersistenceError`.
 *
 * A statement lives with the table it exists to change. So these stay in `JobStorage.ts`
 * although they touch the registry: `closeTarget` and `closeOfflineTargets` read it but
 * change jobs (strict ones fail, preferred ones open); `targetState` explains a strict
 * insert's refusal from the same `targets` rows the insert decided by; and the job
 * statements that bump a worker's counters or `current_job_id` (`recordStarted`,
 * `finishMany`, `reap`) do it in the job's own round trip. `reap` here also deletes
 * `job_offers` rows: an offer is a free slot of an active worker, and it goes in the
 * statement that takes the worker offline.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import { aliveSql } from "../core/NodeMembership.ts"
import { refailAll } from "../db/Persistence.ts"

/** A worker's registration. */
export interface WorkerRegistration {
  readonly workerId: string
  readonly nodeId: string
  readonly targetWorkerId: string | null
  readonly ec2InstanceId: string | null
  readonly ec2Ip: string | null
  readonly maxConcurrent: number
}

/** Create the worker statements over the current `SqlClient` (none is on the hot path). */
export const make = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient

  /** Register (or re-register) a worker as active on a node, with its `worker_registered` event. */
  const register = (w: WorkerRegistration) =>
    sql`
      WITH up AS (
        INSERT INTO gh_worker_registry (worker_id, status, target_worker_id, ec2_instance_id, ec2_ip, node_id,
          max_concurrent, registered_at, last_heartbeat, current_job_id, deregistered_at, deregister_reason)
        VALUES (${w.workerId}::text, 'active', ${w.targetWorkerId}::text, ${w.ec2InstanceId}::text, ${w.ec2Ip}::text,
          ${w.nodeId}::text, ${w.maxConcurrent}::int, now(), now(), NULL, NULL, NULL)
        ON CONFLICT (worker_id) DO UPDATE SET status = 'active', target_worker_id = EXCLUDED.target_worker_id,
          ec2_instance_id = EXCLUDED.ec2_instance_id, ec2_ip = EXCLUDED.ec2_ip, node_id = EXCLUDED.node_id,
          max_concurrent = EXCLUDED.max_concurrent, registered_at = now(), last_heartbeat = now(),
          current_job_id = NULL, deregistered_at = NULL, deregister_reason = NULL
        RETURNING worker_id
      )
      INSERT INTO gh_worker_events (worker_id, event_type, message, metadata)
      SELECT worker_id, 'worker_registered', ${`Worker ${w.workerId} registered on node ${w.nodeId}`}::text,
        ${JSON.stringify({
          ec2_instance_id: w.ec2InstanceId,
          ec2_ip: w.ec2Ip,
          target_worker_id: w.targetWorkerId,
          node_id: w.nodeId,
          max_concurrent: w.maxConcurrent
        })}::jsonb
      FROM up`

  /**
   * A heartbeat: the row's timestamp and a `worker_heartbeat` event. Returns false when the
   * row is `offline` (the reaper took the worker for dead during a blip): register again.
   */
  const heartbeat = (workerId: string, metadata: Record<string, unknown>) =>
    sql<{ n: number }>`
      WITH up AS (
        UPDATE gh_worker_registry SET last_heartbeat = now() WHERE worker_id = ${workerId}::text AND status <> 'offline'
        RETURNING worker_id
      ),
      ev AS (
        INSERT INTO gh_worker_events (worker_id, event_type, message, metadata)
        SELECT worker_id, 'worker_heartbeat', '', ${JSON.stringify(metadata)}::jsonb FROM up
      )
      SELECT (SELECT count(*) FROM up)::int AS n`.withoutTransform.pipe(
      Effect.map((rows) => (rows[0]?.n ?? 0) > 0)
    )

  /** Set a worker's status and write its event (with its counters and uptime). */
  const setStatus = (
    workerId: string,
    status: "active" | "draining" | "offline",
    eventType: string,
    message: string,
    metadata: Record<string, unknown>
  ) =>
    sql<{ jobs_completed: number; jobs_failed: number; registered_at: Date }>`
      WITH up AS (
        UPDATE gh_worker_registry SET status = ${status}::text,
          deregistered_at = CASE WHEN ${status}::text = 'offline' THEN now() ELSE deregistered_at END,
          deregister_reason = CASE WHEN ${status}::text = 'offline' THEN ${String(metadata.reason ?? "")}::text
                                   ELSE deregister_reason END,
          current_job_id = CASE WHEN ${status}::text = 'offline' THEN NULL ELSE current_job_id END
        WHERE worker_id = ${workerId}
        RETURNING worker_id, jobs_completed, jobs_failed, registered_at
      ),
      ev AS (
        INSERT INTO gh_worker_events (worker_id, event_type, message, metadata)
        SELECT worker_id, ${eventType}::text, ${message}::text,
          ${JSON.stringify(metadata)}::jsonb || jsonb_build_object('jobs_completed', jobs_completed,
            'jobs_failed', jobs_failed, 'uptime_seconds', extract(epoch FROM now() - registered_at)::int)
        FROM up
      )
      SELECT jobs_completed, jobs_failed, registered_at FROM up`.withoutTransform

  /** Workers a drain or deregistration names (by worker id or sandbox id), with whether their node is alive. */
  const find = (by: { readonly workerId?: string; readonly targetWorkerId?: string }) =>
    sql<{ worker_id: string; node_id: string | null; status: string; alive: boolean }>`
      SELECT w.worker_id, w.node_id, w.status,
        (n.id IS NOT NULL AND n.status = 'running' AND ${sql.literal(aliveSql)}) AS alive
      FROM gh_worker_registry w LEFT JOIN nodes n ON n.id = w.node_id
      WHERE (${by.workerId ?? null}::text IS NOT NULL AND w.worker_id = ${by.workerId ?? null}::text)
         OR (${by.targetWorkerId ?? null}::text IS NOT NULL AND w.target_worker_id = ${by.targetWorkerId ?? null}::text)
      ORDER BY w.worker_id`.withoutTransform

  /**
   * Workers whose node is gone (lock released or heartbeat older than `staleSeconds`) go
   * `offline`, with a `worker_offline` event; offers of workers no longer active go too.
   * Returns the workers taken offline: their targets are for `JobStorage.closeTarget`.
   */
  const reap = (staleSeconds: number) =>
    sql<{ worker_id: string }>`
      WITH gone AS (
        SELECT w.worker_id, w.target_worker_id FROM gh_worker_registry w LEFT JOIN nodes n ON n.id = w.node_id
        WHERE w.status IN ('active', 'draining')
          AND (n.id IS NULL OR n.status <> 'running' OR NOT (${sql.literal(aliveSql)})
               OR n.last_heartbeat < now() - make_interval(secs => ${staleSeconds}::float8))
        FOR UPDATE OF w SKIP LOCKED
      ),
      off AS (
        UPDATE gh_worker_registry w SET status = 'offline', current_job_id = NULL
        FROM gone WHERE w.worker_id = gone.worker_id RETURNING w.worker_id
      ),
      ev AS (
        INSERT INTO gh_worker_events (worker_id, event_type, message, metadata)
        SELECT worker_id, 'worker_offline', 'Worker stopped answering (its node is gone)', jsonb_build_object('reason', 'node_dead')
        FROM off
      ),
      -- Slots on offer from workers that are not active (gone now, or left without withdrawing),
      -- or from an earlier process of a worker that now runs on another node.
      stale AS (
        DELETE FROM job_offers o WHERE o.worker_id IN (SELECT worker_id FROM off)
          OR NOT EXISTS (SELECT 1 FROM gh_worker_registry w
                         WHERE w.worker_id = o.worker_id AND w.node_id = o.node_id AND w.status = 'active')
      )
      SELECT worker_id FROM off`.withoutTransform.pipe(Effect.map((rows) => rows.map((r) => r.worker_id)))

  /** The worker's browser session and the page its job is on (null, null: none). */
  const setBrowser = (workerId: string, sessionId: string | null, url: string | null) =>
    sql`UPDATE gh_worker_registry SET browser_session_id = ${sessionId}, current_task_url = ${url}
        WHERE worker_id = ${workerId}::text`.pipe(Effect.asVoid)

  /**
   * Where the worker's HTTP server answers (`http://host:port`), once it listens; null when
   * it stops (only if it still names that address: a newer process of the worker may have
   * set its own). The gateway proxies the live view there.
   */
  const setHttpUrl = (workerId: string, url: string | null, previous?: string) =>
    sql`UPDATE gh_worker_registry SET http_url = ${url}
        WHERE worker_id = ${workerId}::text AND (${previous ?? null}::text IS NULL OR http_url = ${previous ?? null}::text)`.pipe(
      Effect.asVoid
    )

  /**
   * Where a job's page is: its status, its worker, that worker's registry status and HTTP
   * address (the live view's route, found as a cancel's is); none when there is no such job.
   */
  const pageOf = (jobId: string) =>
    sql<{ status: string; worker_id: string | null; worker_status: string | null; http_url: string | null }>`
      SELECT j.status, j.worker_id, w.status AS worker_status, w.http_url
      FROM gh_automation_jobs j LEFT JOIN gh_worker_registry w ON w.worker_id = j.worker_id
      WHERE j.id = ${jobId}::uuid`.withoutTransform.pipe(Effect.map((rows) => rows[0]))

  return refailAll({ register, heartbeat, setStatus, find, reap, setBrowser, setHttpUrl, pageOf })
})

/** The worker statements. */
export type WorkerStorage = Effect.Effect.Success<typeof make>
