/**
 * The peers of the jobs benchmark: pg-boss and graphile-worker, each run in this process
 * against its own schema on the benchmark's Postgres, at its best documented settings.
 *
 * Two measurements per peer, with the same harness:
 *
 * 1. Pickup latency: one job at a time on an idle worker. Latency = from the start of the
 *    enqueue call to the entry of the handler (one `performance.now()` clock: producer and
 *    worker share this process). After each pickup the harness waits `gapMs`, so the worker
 *    has completed the job and gone back to waiting before the next one is enqueued.
 * 2. No-op throughput: `jobs` jobs enqueued in batches of `enqueueBatch` from one producer
 *    while the workers drain them; jobs/s = jobs / (last handler entry − first enqueue call).
 *    The time until every job is also settled in the database (completed or deleted) is
 *    reported beside it.
 */

import * as Fs from "node:fs"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import { Logger, makeWorkerUtils, run, type Runner } from "graphile-worker"
import { PgBoss } from "pg-boss"
import pg from "pg"
import { type CpuUse, cpuMeter, ms, round, type Summary, sleep, summarize } from "./stats.ts"

/** How much to measure (the same for every peer, and for troupe). */
export interface Sizes {
  readonly pickupWarmup: number
  readonly pickupSamples: number
  /** Pause after each pickup so the worker is idle again when the next job is enqueued. */
  readonly gapMs: number
  readonly throughputWarmupJobs: number
  readonly throughputJobs: number
  /** Jobs per enqueue call in the throughput phase. */
  readonly enqueueBatch: number
}

/** What a measurement needs besides its database url. */
export interface Context {
  readonly sizes: Sizes
  readonly log: (line: string) => void
  /** The embedded server's pid, for the CPU figures (`undefined` with DATABASE_URL). */
  readonly serverPid: number | undefined
}

/** Pickup latency summary (ms), timeouts and the CPU used meanwhile. */
export type PickupFigures = Summary & { readonly timeouts: number; readonly cpu: CpuUse }

/** What one peer measured: plain numbers, and the settings that produced them. */
export interface PeerFigures {
  readonly peer: string
  readonly version: string
  readonly schema: string
  readonly pickup: PickupFigures
  readonly throughput: ThroughputFigures
  readonly settings: {
    readonly pickup: Record<string, unknown>
    readonly throughput: Record<string, unknown>
    readonly notes: ReadonlyArray<string>
  }
}

/** One throughput run. */
export interface ThroughputFigures {
  readonly jobs: number
  readonly enqueue_batch: number
  /** First enqueue call → last handler entry. */
  readonly elapsed_ms: number
  readonly jobs_per_s: number
  /** First enqueue call → last enqueue call returned. */
  readonly enqueue_elapsed_ms: number
  readonly enqueue_jobs_per_s: number
  /** First enqueue call → no unsettled job left in the peer's table (polled every 5 ms). */
  readonly settled_elapsed_ms: number
  readonly settled_jobs_per_s: number
  /** CPU over the measured round (enqueue to settled). */
  readonly cpu: CpuUse
}

// --- pg-boss ---

/** pg-boss at its best documented settings for each phase (see `notes`). */
export const pgBossSettings = {
  schema: "bench_pgboss",
  constructor: {
    /** LISTEN/NOTIFY wake-ups (v12): a dedicated listener connection; queues opt in with `notify`. */
    useListenNotify: true,
    /** The pool (default 10): room for the workers' fetches, completions and the producer. */
    max: 10,
    /** No cron in this benchmark. */
    schedule: false
  },
  queue: { notify: true, policy: "standard" },
  pickup: {
    batchSize: 1,
    localConcurrency: 1,
    /** The documented minimum (0.5 s) for both: polling is only the backstop behind NOTIFY. */
    pollingIntervalSeconds: 0.5,
    notifyPollingIntervalSeconds: 0.5
  },
  throughput: {
    /** Chosen by a sweep on this machine (batchSize 100–1000 × localConcurrency 1–4): 500 × 2 was best. */
    batchSize: 500,
    localConcurrency: 2,
    /** Fetch again at once while fetches come back full, instead of waiting out the interval. */
    burstWhenBatchFull: true,
    pollingIntervalSeconds: 0.5,
    notifyPollingIntervalSeconds: 0.5
  },
  enqueue: { pickup: "send(queue, data)", throughput: "insert(queue, jobs[]) (one statement per batch)" }
}

/** Measure pg-boss (see the module comment). */
export const measurePgBoss = async (
  url: string,
  ctx: Context,
  settings: typeof pgBossSettings = pgBossSettings
): Promise<PeerFigures> => {
  const { sizes, log } = ctx
  const boss = new PgBoss({ connectionString: url, schema: settings.schema, ...settings.constructor })
  const warnings: Array<string> = []
  boss.on("error", (e) => log(`  pg-boss error: ${(e as Error).message}`))
  boss.on("warning", (w) => warnings.push(w.message))
  await boss.start()
  try {
    // --- Pickup ---
    const pickupQueue = "bench-pickup"
    await boss.createQueue(pickupQueue, settings.queue)
    const arrivals = new Arrivals()
    await boss.work<{ seq: number }>(pickupQueue, settings.pickup, async (jobs) => {
      const now = performance.now()
      for (const job of jobs) arrivals.arrive(job.data.seq, now)
    })
    // pg-boss reads a queue's `notify` flag from its queue cache, filled by the first fetch.
    await sleep(200)
    const pickup = await pickupLoop(ctx, arrivals, (seq) => boss.send(pickupQueue, { seq }))
    await boss.offWork(pickupQueue)

    // --- Throughput ---
    const throughputQueue = "bench-throughput"
    await boss.createQueue(throughputQueue, settings.queue)
    const counter = new Counter()
    await boss.work<{ seq: number }>(throughputQueue, settings.throughput, async (jobs) => {
      counter.add(jobs.length)
    })
    await sleep(200)
    const unsettled = countQuery(
      url,
      `SELECT count(*)::int AS n FROM ${settings.schema}.job WHERE name = $1 AND state IN ('created', 'retry', 'active')`,
      [throughputQueue]
    )
    const enqueue = async (from: number, count: number) => {
      await boss.insert(
        throughputQueue,
        Array.from({ length: count }, (_, i) => ({ data: { seq: from + i } }))
      )
    }
    const throughput = await throughputRun(ctx, counter, enqueue, unsettled)
    await boss.offWork(throughputQueue)
    return {
      peer: "pg-boss",
      version: packageVersion("pg-boss"),
      schema: settings.schema,
      pickup,
      throughput,
      settings: {
        pickup: {
          constructor: settings.constructor,
          queue: settings.queue,
          work: settings.pickup,
          enqueue: settings.enqueue.pickup
        },
        throughput: {
          constructor: settings.constructor,
          queue: settings.queue,
          work: settings.throughput,
          enqueue: settings.enqueue.throughput,
          enqueue_batch: sizes.enqueueBatch
        },
        notes: [
          "v12 has LISTEN/NOTIFY wake-ups: useListenNotify on the instance and notify: true on the queue; the insert's transaction NOTIFYs and the listener aborts the waiting workers' polling delay.",
          "pollingIntervalSeconds and notifyPollingIntervalSeconds at their documented minimum, 0.5 s (the backstop behind NOTIFY).",
          "A batch handler completes its whole batch in one statement; burstWhenBatchFull fetches again at once while batches come back full.",
          "Pickup: batchSize 1, localConcurrency 1 (a sweep found 2 workers, or the throughput settings, no faster). Throughput: batchSize 500 x localConcurrency 2, the best of a sweep over batchSize 100-1000 x localConcurrency 1-4.",
          ...(warnings.length > 0 ? [`warnings during the run: ${[...new Set(warnings)].join("; ")}`] : [])
        ]
      }
    }
  } finally {
    await boss.stop({ graceful: true, timeout: 10_000 })
  }
}

// --- graphile-worker ---

/** graphile-worker at its best documented settings for each phase (see `notes`). */
export const graphileSettings = {
  schema: "bench_graphile_worker",
  /**
   * Both phases use the configuration of graphile-worker's published performance figures
   * (worker.graphile.org/docs/performance). For pickup a sweep on this machine found it as good
   * as one worker without the local queue (p50 2.6 vs 2.9 ms: completion batching helps).
   */
  pickup: {
    concurrentJobs: 24,
    maxPoolSize: 25,
    /** The backstop behind LISTEN "jobs:insert" (default 2000 ms); the same 0.5 s as pg-boss. */
    pollInterval: 500,
    preparedStatements: true,
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    localQueue: { size: 500 } as { size: number } | undefined
  },
  throughput: {
    concurrentJobs: 24,
    maxPoolSize: 25,
    pollInterval: 500,
    preparedStatements: true,
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
    localQueue: { size: 500 } as { size: number } | undefined
  },
  enqueue: {
    pickup: "workerUtils.addJob(task, payload)",
    throughput: "workerUtils.addJobs(specs[]) (one add_jobs call per batch)"
  }
}

type GraphilePhase = typeof graphileSettings.pickup

/** Measure graphile-worker (see the module comment). */
export const measureGraphile = async (
  url: string,
  ctx: Context,
  settings: typeof graphileSettings = graphileSettings
): Promise<PeerFigures> => {
  const { sizes, log } = ctx
  const logger = new Logger(() => (level, message) => {
    if (level === "error") log(`  graphile-worker error: ${message}`)
  })
  const utils = await makeWorkerUtils({ connectionString: url, schema: settings.schema, logger })
  try {
    await utils.migrate()
    const start = async (phase: GraphilePhase, onJob: (payload: unknown) => void): Promise<Runner> => {
      const runner = await run({
        noHandleSignals: true,
        taskList: {
          noop: async (payload) => onJob(payload)
        },
        preset: {
          worker: {
            connectionString: url,
            schema: settings.schema,
            logger,
            concurrentJobs: phase.concurrentJobs,
            maxPoolSize: phase.maxPoolSize,
            pollInterval: phase.pollInterval,
            preparedStatements: phase.preparedStatements,
            completeJobBatchDelay: phase.completeJobBatchDelay,
            failJobBatchDelay: phase.failJobBatchDelay,
            ...(phase.localQueue ? { localQueue: phase.localQueue } : {})
          }
        }
      })
      // Wait for the LISTEN connection (the pool announces it) before the first job.
      await sleep(200)
      return runner
    }

    // --- Pickup ---
    const arrivals = new Arrivals()
    const pickupRunner = await start(settings.pickup, (payload) =>
      arrivals.arrive((payload as { seq: number }).seq, performance.now())
    )
    let pickup: PeerFigures["pickup"]
    try {
      pickup = await pickupLoop(ctx, arrivals, (seq) => utils.addJob("noop", { seq }))
    } finally {
      await pickupRunner.stop()
    }

    // --- Throughput ---
    const counter = new Counter()
    const throughputRunner = await start(settings.throughput, () => counter.add(1))
    let throughput: ThroughputFigures
    try {
      const unsettled = countQuery(url, `SELECT count(*)::int AS n FROM ${settings.schema}._private_jobs`)
      const enqueue = async (from: number, count: number) => {
        await utils.addJobs(
          Array.from({ length: count }, (_, i) => ({ identifier: "noop", payload: { seq: from + i } }))
        )
      }
      throughput = await throughputRun(ctx, counter, enqueue, unsettled)
    } finally {
      await throughputRunner.stop()
    }
    return {
      peer: "graphile-worker",
      version: packageVersion("graphile-worker"),
      schema: settings.schema,
      pickup,
      throughput,
      settings: {
        pickup: { ...settings.pickup, enqueue: settings.enqueue.pickup },
        throughput: {
          ...settings.throughput,
          enqueue: settings.enqueue.throughput,
          enqueue_batch: sizes.enqueueBatch
        },
        notes: [
          'run() LISTENs on "jobs:insert"; add_job/add_jobs NOTIFY and the pool nudges idle workers (as many as the batch has jobs).',
          "Prepared statements on (preparedStatements: true, i.e. noPreparedStatements: false), the default.",
          "Both phases use the configuration of the published performance figures: concurrentJobs 24, maxPoolSize 25, localQueue.size 500, completeJobBatchDelay 0, failJobBatchDelay 0 (for pickup, a sweep found it as good as or better than 1 or 4 workers without the local queue).",
          "pollInterval 500 ms (default 2000): only the backstop behind LISTEN, the same 0.5 s as pg-boss's minimum."
        ]
      }
    }
  } finally {
    await utils.release()
  }
}

// --- Harness (shared with troupe's section) ---

/** Values by key (handler entries by sequence number for the pickup loop), awaited before or after they arrive. */
export class Arrivals<K = number, V = number> {
  private readonly waiting = new Map<K, (at: V) => void>()
  private readonly early = new Map<K, V>()

  /** Called by a handler on entry. */
  arrive(seq: K, at: V): void {
    const w = this.waiting.get(seq)
    if (w) {
      this.waiting.delete(seq)
      w(at)
    } else this.early.set(seq, at)
  }

  /** The handler entry time of job `seq`, or `undefined` after `timeoutMs`. */
  wait(seq: K, timeoutMs: number): Promise<V | undefined> {
    const at = this.early.get(seq)
    if (at !== undefined) {
      this.early.delete(seq)
      return Promise.resolve(at)
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting.delete(seq)
        resolve(undefined)
      }, timeoutMs)
      this.waiting.set(seq, (t) => {
        clearTimeout(timer)
        resolve(t)
      })
    })
  }
}

/** Counts handled jobs and remembers when the last one arrived. */
export class Counter {
  handled = 0
  lastAt = 0
  private target = Number.POSITIVE_INFINITY
  private reached: (() => void) | undefined

  add(n: number): void {
    this.handled += n
    this.lastAt = performance.now()
    if (this.handled >= this.target) this.reached?.()
  }

  /** Resolves when `handled` reaches `target` (true), or after `timeoutMs` (false). */
  until(target: number, timeoutMs: number): Promise<boolean> {
    this.target = target
    if (this.handled >= target) return Promise.resolve(true)
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs)
      this.reached = () => {
        clearTimeout(timer)
        this.reached = undefined
        resolve(true)
      }
    })
  }

  reset(): void {
    this.handled = 0
    this.lastAt = 0
    this.target = Number.POSITIVE_INFINITY
    this.reached = undefined
  }
}

/** A count of unsettled jobs on one connection of its own, opened on first use. */
export interface CountQuery {
  readonly count: () => Promise<number>
  readonly close: () => Promise<void>
}

/** `text` must return one row with an integer column `n`. */
export const countQuery = (url: string, text: string, values?: ReadonlyArray<unknown>): CountQuery => {
  let client: pg.Client | undefined
  return {
    count: async () => {
      if (client === undefined) {
        client = new pg.Client({ connectionString: url, application_name: "bench-jobs-count" })
        await client.connect()
      }
      const { rows } = await client.query<{ n: number }>(text, values as Array<unknown> | undefined)
      return rows[0]!.n
    },
    close: async () => {
      await client?.end()
      client = undefined
    }
  }
}

/** A missed pickup is given this long before it counts as a timeout (the peers poll every 0.5 s). */
const pickupTimeoutMs = 5_000

/**
 * Enqueue one job at a time (`enqueue(seq)`), wait for its handler entry (`arrivals`), pause
 * `gapMs`; the first `pickupWarmup` samples are dropped.
 */
export const pickupLoop = async (
  ctx: Context,
  arrivals: Arrivals,
  enqueue: (seq: number) => Promise<unknown>
): Promise<PickupFigures> => {
  const { sizes } = ctx
  let stopCpu: (() => CpuUse) | undefined
  const total = sizes.pickupWarmup + sizes.pickupSamples
  const samples: Array<number> = []
  let timeouts = 0
  for (let seq = 0; seq < total; seq++) {
    if (seq === sizes.pickupWarmup) stopCpu = cpuMeter(ctx.serverPid)
    const entered = arrivals.wait(seq, pickupTimeoutMs)
    const t = performance.now()
    await enqueue(seq)
    const at = await entered
    if (seq >= sizes.pickupWarmup) {
      if (at === undefined) timeouts++
      else samples.push(at - t)
    }
    await sleep(sizes.gapMs)
  }
  const cpu = stopCpu?.() ?? cpuMeter(ctx.serverPid)()
  const summary = summarize(samples)
  if (sizes.pickupSamples > 0)
    ctx.log(
      `  pickup p50 ${ms(summary.p50)}, p99 ${ms(summary.p99)}, max ${ms(summary.max)} (${summary.count} samples, ${timeouts} timeouts); CPU % of a core: this process ${cpu.process_pct_of_core}, Postgres ${cpu.postgres_pct_of_core}, other processes ${cpu.others_pct_of_core}`
    )
  return { ...summary, timeouts, cpu }
}

/**
 * A warm-up round, then the measured round: enqueue `jobs` in batches from one producer while
 * the workers drain them; then poll `unsettled` until it reaches 0 (and close it).
 */
export const throughputRun = async (
  ctx: Context,
  counter: Counter,
  enqueue: (from: number, count: number) => Promise<void>,
  unsettled: CountQuery
): Promise<ThroughputFigures> => {
  try {
    return await throughputRounds(ctx, counter, enqueue, unsettled)
  } finally {
    await unsettled.close()
  }
}

const throughputRounds = async (
  ctx: Context,
  counter: Counter,
  enqueue: (from: number, count: number) => Promise<void>,
  unsettled: CountQuery
): Promise<ThroughputFigures> => {
  const { sizes, log } = ctx
  const round1 = async (jobs: number, offset: number) => {
    counter.reset()
    const done = counter.until(jobs, 180_000)
    const stopCpu = cpuMeter(ctx.serverPid)
    const start = performance.now()
    for (let i = 0; i < jobs; i += sizes.enqueueBatch)
      await enqueue(offset + i, Math.min(sizes.enqueueBatch, jobs - i))
    const enqueuedAt = performance.now()
    if (!(await done)) throw new Error(`only ${counter.handled} of ${jobs} jobs were handled within 180 s`)
    const handledAt = counter.lastAt
    while ((await unsettled.count()) > 0) {
      if (performance.now() - start > 240_000) throw new Error("jobs were handled but never settled")
      await sleep(5)
    }
    const settledAt = performance.now()
    return { start, enqueuedAt, handledAt, settledAt, cpu: stopCpu() }
  }
  if (sizes.throughputWarmupJobs > 0) {
    const w = await round1(sizes.throughputWarmupJobs, 10_000_000)
    log(
      `  warm-up: ${sizes.throughputWarmupJobs} jobs in ${Math.round(w.handledAt - w.start)} ms, measuring ${sizes.throughputJobs}`
    )
  }
  const r = await round1(sizes.throughputJobs, 0)
  const elapsed = r.handledAt - r.start
  const enqueueElapsed = r.enqueuedAt - r.start
  const settled = r.settledAt - r.start
  return {
    jobs: sizes.throughputJobs,
    enqueue_batch: sizes.enqueueBatch,
    elapsed_ms: round(elapsed, 1),
    jobs_per_s: Math.round((sizes.throughputJobs / elapsed) * 1000),
    enqueue_elapsed_ms: round(enqueueElapsed, 1),
    enqueue_jobs_per_s: Math.round((sizes.throughputJobs / enqueueElapsed) * 1000),
    settled_elapsed_ms: round(settled, 1),
    settled_jobs_per_s: Math.round((sizes.throughputJobs / settled) * 1000),
    cpu: r.cpu
  }
}

// --- internal ---

const nodeModules = Path.resolve(Path.dirname(fileURLToPath(import.meta.url)), "..", "..", "node_modules")

/** The installed version of a package (from its package.json). */
const packageVersion = (name: string): string => {
  try {
    const pkg: unknown = JSON.parse(Fs.readFileSync(Path.join(nodeModules, name, "package.json"), "utf8"))
    if (typeof pkg === "object" && pkg !== null && "version" in pkg && typeof pkg.version === "string")
      return pkg.version
  } catch {
    // not installed where expected
  }
  return "unknown"
}
