/**
 * What the gateway reports about the fleet: the workers as the client app's
 * `GET /api/v1/monitoring/workers` (and the socket's `workers.list`) show them, and the
 * database-wide part of `GET /metrics` (jobs by status, mailbox depth per node, workers by
 * status) with this process's routing-latency histogram. Read-only queries.
 *
 * `/metrics` is rendered by prom-client from a registry of each `make`'s own (not
 * prom-client's global one); the gauges are set from the database at each scrape.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as Prometheus from "prom-client"
import type { MonitoredWorker } from "../../protocol/Edge.ts"
import { PersistenceError } from "../../protocol/Errors.ts"
import { JobStatus } from "../../protocol/Jobs.ts"
import { refail } from "../db/Persistence.ts"
import * as Histogram from "../core/Histogram.ts"
import { aliveSql } from "../core/NodeMembership.ts"

/** The monitoring queries. */
export interface Monitoring {
  /** Every registered worker, by id. */
  readonly workers: Effect.Effect<ReadonlyArray<MonitoredWorker>, PersistenceError>
  /** `/metrics` in the Prometheus text format 0.0.4, without the gateway's own connection gauge. */
  readonly metrics: Effect.Effect<string, PersistenceError>
}

/** A worker's derived state: `offline` (marked so, or its node is dead), `draining`, `busy` (running or waiting for a human), `idle`. */
export type WorkerState = MonitoredWorker["status"]

/** The states, in the order `/metrics` lists them. */
export const workerStates: ReadonlyArray<WorkerState> = ["idle", "busy", "draining", "offline"]

/** A worker as the inspector shows it: the registry row, its node's liveness, active jobs, derived state and uptime. */
export interface WorkerRow {
  readonly worker_id: string
  /** The registry's status: `active`, `draining` or `offline`. */
  readonly status: string
  readonly node_id: string | null
  readonly node_alive: boolean
  /** Jobs `running` or `needs_human` on it. */
  readonly active_jobs: number
  readonly current_job_id: string | null
  readonly current_task_url: string | null
  readonly browser_session_id: string | null
  readonly target_worker_id: string | null
  readonly ec2_instance_id: string | null
  readonly ec2_ip: string | null
  readonly max_concurrent: number
  readonly jobs_completed: number
  readonly jobs_failed: number
  readonly last_heartbeat: Date
  readonly registered_at: Date
  readonly deregistered_at: Date | null
  readonly deregister_reason: string | null
  readonly state: WorkerState
  /** Since registration, until now or (offline) until it was deregistered or last seen. */
  readonly uptime_seconds: number
}

/**
 * Every registered worker with its derived state, by id. `draining` wins over `busy`: a
 * draining worker still finishing a job says so (its `current_job_id` shows the job), where
 * `busy` would hide that it takes no more. State and uptime are computed on the database's
 * clock.
 */
export const workerRows: Effect.Effect<
  ReadonlyArray<WorkerRow>,
  PersistenceError,
  SqlClient.SqlClient
> = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql
    .unsafe<Omit<WorkerRow, "uptime_seconds"> & { uptime_seconds: number | string }>(`
        SELECT w.*,
          round(extract(epoch FROM (CASE WHEN w.state = 'offline'
            THEN coalesce(w.deregistered_at, w.last_heartbeat) ELSE now() END) - w.registered_at))::int AS uptime_seconds
        FROM (
          SELECT w.*, CASE
              WHEN w.status = 'offline' OR NOT w.node_alive THEN 'offline'
              WHEN w.status = 'draining' THEN 'draining'
              WHEN w.active_jobs > 0 THEN 'busy'
              ELSE 'idle' END AS state
          FROM (
            SELECT w.worker_id, w.status, w.node_id, (n.id IS NOT NULL AND ${aliveSql}) AS node_alive,
              (SELECT count(*) FROM gh_automation_jobs j
                WHERE j.worker_id = w.worker_id AND j.status IN ('running', 'needs_human'))::int AS active_jobs,
              w.current_job_id::text AS current_job_id, w.current_task_url, w.browser_session_id, w.target_worker_id,
              w.ec2_instance_id, w.ec2_ip, w.max_concurrent, w.jobs_completed, w.jobs_failed, w.last_heartbeat,
              w.registered_at, w.deregistered_at, w.deregister_reason
            FROM gh_worker_registry w LEFT JOIN nodes n ON n.id = w.node_id
          ) w
        ) w
        ORDER BY w.worker_id`)
    .pipe(
      Effect.map((rows) =>
        rows.map((r) => ({ ...r, uptime_seconds: Math.max(0, Number(r.uptime_seconds)) }))
      ),
      refail
    )
)

/** A worker in the requirements' shape (timestamps as ISO strings). */
export const toMonitored = (r: WorkerRow): MonitoredWorker => ({
  worker_id: r.worker_id,
  status: r.state,
  target_worker_id: r.target_worker_id,
  ec2_instance_id: r.ec2_instance_id,
  ec2_ip: r.ec2_ip,
  current_job_id: r.current_job_id,
  current_task_url: r.current_task_url,
  browser_session_id: r.browser_session_id,
  registered_at: iso(r.registered_at),
  last_heartbeat: iso(r.last_heartbeat),
  jobs_completed: r.jobs_completed,
  jobs_failed: r.jobs_failed,
  uptime_seconds: r.uptime_seconds
})

/** Create the monitoring queries over the current `SqlClient`. */
export const make: Effect.Effect<Monitoring, never, SqlClient.SqlClient> = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  const provided = Effect.provideService(SqlClient.SqlClient, sql)

  const workers = workerRows.pipe(
    Effect.map((rows) => rows.map(toMonitored)),
    provided
  )

  const jobCounts = sql<{ status: string; n: number }>`
    SELECT status, count(*)::int AS n FROM gh_automation_jobs GROUP BY status`.pipe(
    refail
  )

  // Every node that is up, and every node id with pending rows (a dead node's backlog shows).
  const mailboxDepths = sql
    .unsafe<{ node: string; n: number }>(`
    SELECT coalesce(p.node_id, up.id) AS node, coalesce(p.n, 0)::int AS n
    FROM (SELECT node_id, count(*) AS n FROM actor_mailbox WHERE claim IS NULL GROUP BY node_id) p
    FULL JOIN (SELECT n.id FROM nodes n WHERE n.status = 'running' AND ${aliveSql}) up ON up.id = p.node_id
    ORDER BY 1`)
    .pipe(refail)

  // --- Metrics ---

  const registry = new Prometheus.Registry()
  const jobsGauge = new Prometheus.Gauge({
    name: "troupe_jobs",
    help: "Jobs in gh_automation_jobs by status.",
    labelNames: ["status"],
    registers: [registry]
  })
  const depthGauge = new Prometheus.Gauge({
    name: "troupe_mailbox_depth",
    help: "Pending (unclaimed) actor_mailbox rows per node: every node that is up, and any node id with pending rows.",
    labelNames: ["node"],
    registers: [registry]
  })
  const workersGauge = new Prometheus.Gauge({
    name: "troupe_workers",
    help: "Registered workers by derived status (as GET /api/v1/monitoring/workers reports them).",
    labelNames: ["status"],
    registers: [registry]
  })
  registerHistogram(
    registry,
    "troupe_routing_latency_seconds",
    "Round trip of asks sent by this process's nodes through the mailbox (send to reply received): two deliveries plus the receiving handler's time. Timed-out asks are not observed.",
    Histogram.routingLatency
  )
  // The gauges are shared: one scrape sets and renders them at a time.
  const rendering = yield* Effect.makeSemaphore(1)

  const metrics = Effect.all([jobCounts, mailboxDepths, workerRows.pipe(provided)], {
    concurrency: "unbounded"
  }).pipe(
    Effect.flatMap(([jobs, depths, workerList]) =>
      rendering.withPermits(1)(
        Effect.suspend(() => {
          const byStatus = new Map(jobs.map((r) => [r.status, r.n]))
          const byState = new Map<string, number>()
          for (const w of workerList) byState.set(w.state, (byState.get(w.state) ?? 0) + 1)
          jobsGauge.reset()
          for (const status of JobStatus.literals) jobsGauge.set({ status }, byStatus.get(status) ?? 0)
          depthGauge.reset()
          for (const d of depths) depthGauge.set({ node: d.node }, d.n)
          workersGauge.reset()
          for (const status of workerStates) workersGauge.set({ status }, byState.get(status) ?? 0)
          return Effect.promise(() => registry.metrics())
        })
      )
    )
  )

  return { workers, metrics } satisfies Monitoring
})

/** Serve a core `Histogram` from a prom-client registry: each scrape renders its snapshot of that moment. */
export const registerHistogram = (
  registry: Prometheus.Registry,
  name: string,
  help: string,
  histogram: Histogram.Histogram
): void => {
  new SnapshotHistogram(name, help, histogram, registry)
}

/**
 * A gauge family in the Prometheus text format (`# HELP`, `# TYPE`, one sample per label
 * set), for a series a door appends to `metrics` itself (the gateway's open sockets).
 */
export const gauge = (
  name: string,
  help: string,
  samples: ReadonlyArray<readonly [Readonly<Record<string, string>>, number]>
): string => {
  const lines = [`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} gauge`]
  for (const [labels, value] of samples) {
    const entries = Object.entries(labels)
    const set =
      entries.length === 0 ? "" : `{${entries.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}`
    lines.push(`${name}${set} ${value}`)
  }
  return `${lines.join("\n")}\n`
}

// --- internal ---

/**
 * A prom-client histogram whose series are a core `Histogram`'s snapshot at scrape time:
 * the routing path observes into that one, which allocates nothing per value, and
 * prom-client can neither take bucket counts from elsewhere nor register a custom collector
 * (prometheus/client_js#241). prom-client 15's registry renders a metric from
 * `getForPromString` (its `get` builds on it too), so that is what this overrides.
 */
class SnapshotHistogram extends Prometheus.Histogram {
  readonly #name: string
  readonly #help: string
  readonly #source: Histogram.Histogram

  constructor(name: string, help: string, source: Histogram.Histogram, registry: Prometheus.Registry) {
    super({ name, help, buckets: [...source.bounds], registers: [registry] })
    this.#name = name
    this.#help = help
    this.#source = source
  }

  /** The snapshot in prom-client's shape: one `_bucket` per bound and `+Inf` (cumulative), `_sum`, `_count`. */
  async getForPromString() {
    const s = this.#source.snapshot()
    const sample = (metricName: string, labels: Record<string, string | number>, value: number) => ({
      metricName,
      labels,
      sharedLabels: {},
      value
    })
    const bucket = `${this.#name}_bucket`
    return {
      name: this.#name,
      help: this.#help,
      type: "histogram",
      aggregator: "sum",
      values: [
        ...s.bounds.map((le, i) => sample(bucket, { le }, s.cumulative[i]!)),
        sample(bucket, { le: "+Inf" }, s.cumulative[s.bounds.length]!),
        sample(`${this.#name}_sum`, {}, s.sum),
        sample(`${this.#name}_count`, {}, s.count)
      ]
    }
  }
}

const iso = (d: Date | string): string => new Date(d).toISOString()

/** A label value: backslash, double quote and newline escaped. */
const escapeLabel = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")

/** A HELP text: backslash and newline escaped. */
const escapeHelp = (v: string) => v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")
