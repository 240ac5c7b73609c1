/**
 * troupe's side of the jobs benchmark, measured with the peers' harness (`peers.ts`) so the
 * figures compare like for like:
 *
 * - pickup: a gateway node submits one job at a time (`jobs.submit`) to an idle worker node
 *   (same process, its own node, LISTEN connection and pool): submit call → handler entry;
 * - throughput: `jobs.submitMany` in batches while one worker node drains them;
 * - cancel: `jobs.cancel` of a running job → its handler's interruption is observed;
 * - failover: two worker OS processes (test/fixtures/worker-process.ts); the one running a
 *   job is SIGKILLed; kill → the job's handler starts on the other (database clock).
 */
import { Deferred, Effect, Exit, Layer, Runtime, Scope } from "effect"
import { spawn } from "node:child_process"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as JobHandler from "../../src/runtime/jobs/JobHandler.ts"
import * as Jobs from "../../src/edge/Jobs.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Reaper from "../../src/runtime/jobs/Reaper.ts"
import * as Worker from "../../src/actors/WorkerActor.ts"
import * as Db from "./db.ts"
import * as Floor from "./floor.ts"
import * as Peers from "./peers.ts"
import { cpuMeter, ms, round, sleep, summarize } from "./stats.ts"

/** Settings of troupe's runs (recorded in the JSON). */
export const troupeSettings = {
  pickup: {
    workers: 1,
    max_concurrent: 1,
    enqueue: "jobs.submit (insert + NOTIFY to jobs:any, one statement)"
  },
  throughput: {
    workers: Number(process.env.BENCH_TP_WORKERS ?? 2),
    max_concurrent: Number(process.env.BENCH_TP_CONCURRENCY ?? 256),
    enqueue: "jobs.submitMany (one INSERT … SELECT unnest per batch)"
  },
  cancel: { workers: 1, max_concurrent: 1, samples_full: 300, samples_quick: 60 },
  failover: { processes: 2, reaper_interval_ms: 250, requeue_backoff_ms: 250, runs_full: 5, runs_quick: 2 },
  pool: { max_connections_per_node: 16 },
  notes: [
    "Each node (gateway, worker) has its own pg pool and LISTEN connection, as separate processes would; they share this process's CPU.",
    "Completions are batched (finishMany); every transition writes its gh_job_events row and callback outbox row in the same statement."
  ]
}

/** Measure troupe; the figures `bench/jobs.ts` reports. */
export const measure = async (db: Db.BenchDatabase, ctx: Peers.Context) => {
  const layer = Db.clientLayer(db.url, { applicationName: "bench-troupe", maxConnections: 16 })
  const nodeLayer = (name: string) =>
    Db.clientLayer(db.url, { applicationName: `bench-troupe-${name}`, maxConnections: 16 })
  const program = Effect.gen(function* () {
    const runtime = yield* Effect.runtime<never>()
    const run = <A, E>(effect: Effect.Effect<A, E>) => Runtime.runPromise(runtime)(effect)
    // --- Gateway ---
    const gateway = yield* Node.make({ nodeId: "bench-gw" })
    const jobs = yield* Jobs.make(gateway)
    yield* Reaper.make({ nodeId: "bench-gw" })

    const arrivals = new Peers.Arrivals()
    const counter = new Peers.Counter()
    const interrupted = new Map<number, Deferred.Deferred<number>>()
    const entered = new Peers.Arrivals()
    const handlers = JobHandler.handlers({
      pick: Effect.flatMap(JobHandler.JobContext, (c) =>
        Effect.sync(() => arrivals.arrive((c.payload as { seq: number }).seq, performance.now()))
      ),
      tp: Effect.sync(() => counter.add(1)),
      hold: Effect.flatMap(JobHandler.JobContext, (c) => {
        const seq = (c.payload as { seq: number }).seq
        const d = interrupted.get(seq)!
        return Effect.sync(() => entered.arrive(seq, performance.now())).pipe(
          Effect.zipRight(Effect.never),
          Effect.onInterrupt(() => Deferred.succeed(d, performance.now()))
        )
      })
    })

    /** A worker node with its own pool, in its own scope; `settle`: wait 200 ms after it started. */
    const workerNode = (name: string, maxConcurrent: number, settle = true) =>
      Effect.gen(function* () {
        const scope = yield* Scope.make()
        const ctxLayer = yield* Layer.buildWithScope(nodeLayer(name), scope)
        const node = yield* Node.make({ nodeId: name }).pipe(Scope.extend(scope), Effect.provide(ctxLayer))
        const worker = yield* Worker.make(node, { workerId: name, maxConcurrent, handlers }).pipe(
          Scope.extend(scope),
          Effect.provide(ctxLayer)
        )
        if (settle) yield* Effect.sleep("200 millis")
        return { worker, close: Scope.close(scope, Exit.void) }
      })

    // --- Pickup ---
    ctx.log("  pickup")
    const pw = yield* workerNode("bench-pick", 1)
    const pickup = yield* Effect.promise(() =>
      Peers.pickupLoop(ctx, arrivals, (seq) => run(jobs.submit({ job_type: "pick", payload: { seq } })))
    )
    yield* pw.close

    // --- Throughput ---
    ctx.log("  throughput")
    const tws = []
    for (let i = 0; i < troupeSettings.throughput.workers; i++) {
      tws.push(yield* workerNode(`bench-tp${i}`, troupeSettings.throughput.max_concurrent))
    }
    const throughput = yield* Effect.promise(() =>
      Peers.throughputRun(
        ctx,
        counter,
        (from, count) =>
          run(
            jobs.submitMany(
              Array.from({ length: count }, (_, i) => ({ job_type: "tp", payload: { seq: from + i } }))
            )
          ).then(() => undefined),
        Peers.countQuery(
          db.url,
          "SELECT count(*)::int AS n FROM gh_automation_jobs WHERE status IN ('queued', 'running')"
        )
      )
    )
    const claimStats = tws.map((tw) => ({
      claims: tw.worker.stats().claims,
      claimed: tw.worker.stats().claimed
    }))
    ctx.log(`  claims: ${JSON.stringify(claimStats)}`)
    for (const tw of tws) yield* tw.close

    // --- Backlog: a queue that grew while statistics were taken with it empty ---
    ctx.log(`  backlog: ${ctx.sizes.throughputJobs} queued jobs, ANALYZE, then two workers start`)
    yield* Effect.promise(async () => {
      await Db.query(db.url, "ANALYZE gh_automation_jobs")
      await Db.query(
        db.url,
        "INSERT INTO gh_automation_jobs (job_type, payload) SELECT 'tp', jsonb_build_object('seq', g) FROM generate_series(1, $1::int) AS g",
        [ctx.sizes.throughputJobs]
      )
    })
    const backlogStart = counter.handled
    const backlogCpu = cpuMeter(ctx.serverPid)
    const backlogAt = performance.now()
    const bws = []
    for (let i = 0; i < troupeSettings.throughput.workers; i++) {
      bws.push(yield* workerNode(`bench-bl${i}`, troupeSettings.throughput.max_concurrent, false))
    }
    if (!(yield* Effect.promise(() => counter.until(backlogStart + ctx.sizes.throughputJobs, 120_000))))
      throw new Error("backlog: the workers did not drain it within 120 s")
    const backlog = {
      jobs: ctx.sizes.throughputJobs,
      jobs_per_s: Math.round((ctx.sizes.throughputJobs / (counter.lastAt - backlogAt)) * 1000),
      cpu: backlogCpu()
    }
    ctx.log(`  backlog drained at ${backlog.jobs_per_s} jobs/s`)
    for (const bw of bws) yield* bw.close
    yield* Effect.promise(() =>
      Db.query(db.url, "SELECT 1 FROM gh_automation_jobs WHERE status IN ('queued', 'running') LIMIT 1").then(
        (rows) => {
          if (rows.length > 0) throw new Error("backlog: jobs left unsettled")
        }
      )
    )

    // --- The contract's floor (raw SQL, no troupe code; see floor.ts) ---
    ctx.log("  throughput floor of the data contract (raw SQL), on the migrated tables")
    const floor = yield* Effect.promise(() => Floor.measure(db.url, ctx, "migrated"))
    ctx.log("  throughput floor of the data contract (raw SQL), on bare tables")
    const floorBare = yield* Effect.promise(() => Floor.measure(db.url, ctx, "bare"))

    // --- Cancel ---
    ctx.log("  cancel")
    const cw = yield* workerNode("bench-cancel", 1)
    const cancelSamples =
      ctx.sizes.pickupSamples >= 1000
        ? troupeSettings.cancel.samples_full
        : troupeSettings.cancel.samples_quick
    const warm = 10
    const cancelMs: Array<number> = []
    const stopCpu = cpuMeter(ctx.serverPid)
    for (let seq = 0; seq < warm + cancelSamples; seq++) {
      const d = yield* Deferred.make<number>()
      interrupted.set(seq, d)
      const started = entered.wait(seq, 5000)
      const job = yield* jobs.submit({ job_type: "hold", payload: { seq } })
      if ((yield* Effect.promise(() => started)) === undefined)
        throw new Error(`cancel: job ${seq} never started`)
      const t = performance.now()
      yield* jobs.cancel(job.id, "bench")
      const at = yield* Deferred.await(d)
      if (seq >= warm) cancelMs.push(at - t)
      yield* Effect.sleep(`${ctx.sizes.gapMs} millis`)
    }
    const cancelCpu = stopCpu()
    const cancel = summarize(cancelMs)
    ctx.log(`  cancel p50 ${ms(cancel.p50)}, p99 ${ms(cancel.p99)} (${cancel.count} samples)`)
    yield* cw.close

    // --- Failover (worker OS processes; the reaper is this process's gateway) ---
    ctx.log("  failover")
    const failoverRuns =
      ctx.sizes.pickupSamples >= 1000 ? troupeSettings.failover.runs_full : troupeSettings.failover.runs_quick
    const failovers: Array<number> = []
    for (let i = 0; i < failoverRuns; i++)
      failovers.push(yield* Effect.promise(() => failoverOnce(db.url, i)))
    ctx.log(`  failover ${failovers.map((f) => `${Math.round(f)} ms`).join(", ")}`)

    return {
      pickup,
      throughput: { ...throughput, claims: claimStats },
      backlog,
      floor,
      floorBare,
      cancel: { ...cancel, cpu: cancelCpu },
      failovers
    }
  })
  const inProcess = await Effect.runPromise(Effect.scoped(program).pipe(Effect.provide(layer)))
  const failovers = inProcess.failovers

  return {
    pickup_p50_ms: round(inProcess.pickup.p50, 3),
    pickup_p99_ms: round(inProcess.pickup.p99, 3),
    jobs_per_s: inProcess.throughput.jobs_per_s,
    backlog_jobs_per_s: inProcess.backlog.jobs_per_s,
    floor_jobs_per_s: inProcess.floor.jobs_per_s,
    floor_bare_jobs_per_s: inProcess.floorBare.jobs_per_s,
    cancel_p50_ms: round(inProcess.cancel.p50, 3),
    cancel_p99_ms: round(inProcess.cancel.p99, 3),
    failover_ms: Math.round(summarize(failovers).p50),
    settings: troupeSettings,
    details: {
      pickup: inProcess.pickup,
      throughput: inProcess.throughput,
      backlog: inProcess.backlog,
      floor: { migrated: inProcess.floor, bare: inProcess.floorBare, settings: Floor.floorSettings },
      cancel: inProcess.cancel,
      failover_runs_ms: failovers.map((f) => Math.round(f)),
      failover_max_ms: Math.round(Math.max(...failovers))
    }
  }
}

// --- internal ---

const root = Path.resolve(Path.dirname(fileURLToPath(import.meta.url)), "../..")

/** Start a worker process; resolves once it printed `ready`. */
const startWorkerProcess = (url: string, nodeId: string) =>
  new Promise<{ kill: () => void; exited: Promise<void> }>((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", "test/fixtures/worker-process.ts"], {
      cwd: root,
      env: { ...process.env, DATABASE_URL: url, NODE_ID: nodeId, WORKER_ID: nodeId, MAX_CONCURRENT: "1" },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let out = ""
    const exited = new Promise<void>((r) => child.on("exit", () => r()))
    child.stdout.on("data", (b: Buffer) => {
      out += b.toString()
      if (out.includes("ready")) resolve({ kill: () => child.kill("SIGKILL"), exited })
    })
    child.on("exit", (code) => {
      if (!out.includes("ready"))
        reject(new Error(`worker ${nodeId} exited (${code}) before it was ready: ${out}`))
    })
  })

/** One failover: the worker running a long job is killed; ms until the job starts on the other one. */
const failoverOnce = async (url: string, i: number): Promise<number> => {
  await Db.query(
    url,
    "CREATE TABLE IF NOT EXISTS test_job_runs (job_id uuid, worker_id text, attempt int, started_at timestamptz DEFAULT clock_timestamp(), ended_at timestamptz)"
  )
  const a = await startWorkerProcess(url, `bench-fo-a${i}`)
  const b = await startWorkerProcess(url, `bench-fo-b${i}`)
  try {
    const [job] = await Db.query<{ id: string }>(
      url,
      "INSERT INTO gh_automation_jobs (job_type, payload, worker_affinity, target_worker_id, open_at) VALUES ('work', '{\"ms\": 60000}', 'preferred', $1, now() + interval '1 hour') RETURNING id::text",
      [`bench-fo-a${i}`]
    )
    await Db.query(url, "SELECT pg_notify('jobs:any', 'bench')")
    // Wait until the first worker runs it.
    for (let t = 0; ; t++) {
      const rows = await Db.query(url, "SELECT 1 FROM test_job_runs WHERE job_id = $1", [job!.id])
      if (rows.length > 0) break
      if (t > 500) {
        const state = await Db.query(
          url,
          "SELECT status, worker_id, error_code, attempts FROM gh_automation_jobs WHERE id = $1",
          [job!.id]
        )
        const workers = await Db.query(
          url,
          "SELECT worker_id, status, node_id, current_job_id FROM gh_worker_registry"
        )
        throw new Error(
          `failover: the job never started: ${JSON.stringify(state)} ${JSON.stringify(workers)}`
        )
      }
      await sleep(10)
    }
    const [{ at }] = (await Db.query<{ at: string }>(
      url,
      "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS at"
    )) as [{ at: string }]
    a.kill()
    await a.exited
    for (let t = 0; ; t++) {
      const rows = await Db.query<{ started: string }>(
        url,
        "SELECT (extract(epoch FROM started_at) * 1000)::float8 AS started FROM test_job_runs WHERE job_id = $1 AND worker_id = $2",
        [job!.id, `bench-fo-b${i}`]
      )
      if (rows.length > 0) return Number(rows[0]!.started) - Number(at)
      if (t > 1000) throw new Error("failover: the job never moved")
      await sleep(5)
    }
  } finally {
    // Settle this run's job so it is not requeued into the next run's workers.
    await Db.query(
      url,
      "UPDATE gh_automation_jobs SET status = 'cancelled', finished_at = now() WHERE job_type = 'work' AND status IN ('queued', 'running')"
    )
    a.kill()
    b.kill()
    await Promise.all([a.exited, b.exited])
  }
}
