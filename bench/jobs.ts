/**
 * The jobs benchmark (`npm run bench -- jobs [--quick] [--only pgboss,graphile,troupe]`): how
 * fast a job reaches its handler and how many no-op jobs per second get through, for
 * troupe's job system and for two Postgres job queues at their best documented settings
 * (pg-boss, graphile-worker), on the same Postgres in the same run.
 *
 * 1. Pickup latency: one job at a time on an idle worker, enqueue call → handler entry.
 * 2. No-op throughput: N jobs enqueued in batches while the workers drain them, median of
 *    `throughputRounds` rounds.
 * 3. troupe only: cancel latency and failover time (see `measureTroupe`).
 *
 * The peers' harness and settings live in bench/internal/peers.ts. Each peer installs into its
 * own schema of the benchmark database; troupe uses the database itself.
 */

import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { fileURLToPath } from "node:url"
import * as Db from "./internal/db.ts"
import * as Peers from "./internal/peers.ts"
import * as Troupe from "./internal/troupe.ts"
import { int, machine, ms, progress, round, table, writeResult } from "./internal/stats.ts"

// --- Settings ---

const sizes: { readonly full: Peers.Sizes; readonly quick: Peers.Sizes } = {
  full: {
    pickupWarmup: 100,
    pickupSamples: 1_000,
    gapMs: 20,
    throughputWarmupJobs: 2_000,
    throughputJobs: 20_000,
    enqueueBatch: 1_000
  },
  quick: {
    pickupWarmup: 30,
    pickupSamples: 300,
    gapMs: 20,
    throughputWarmupJobs: 500,
    throughputJobs: 2_000,
    enqueueBatch: 500
  }
}

/** Throughput rounds per peer; the median round is reported (the machine is shared and noisy). */
const throughputRounds = { full: 3, quick: 1 }

const targets = {
  pickup_p50_ms: 1.5,
  pickup_p99_ms: 3,
  /** troupe's jobs/s against the better peer's. */
  jobs_per_s_vs_best_peer: 1.5,
  cancel_p50_ms: 5,
  cancel_p99_ms: 20,
  failover_ms: 2_000
}

// --- troupe: the job system (src/edge/Jobs.ts, src/actors/WorkerActor.ts, src/runtime/jobs/JobStorage.ts) ---

/** troupe's figures; every field is optional until measured. */
export interface TroupeFigures {
  /** Enqueue call → handler entry, one job at a time on an idle worker (as `Peers.pickupLoop`). */
  readonly pickup_p50_ms: number
  readonly pickup_p99_ms: number
  /** No-op jobs/s, enqueued in batches of `sizes.enqueueBatch` (as `Peers.throughputRun`). */
  readonly jobs_per_s: number
  /**
   * A backlog of `throughputJobs` queued jobs, inserted after an ANALYZE of the empty queue,
   * drained by two fresh worker nodes: jobs/s from their start to the last handler entry.
   * Guards the plans against stale statistics (docs/JOBS.md).
   */
  readonly backlog_jobs_per_s: number
  /**
   * The same throughput run through the fewest writes the data contract allows, in raw SQL
   * with no troupe code (bench/internal/floor.ts): what any implementation of the contract
   * can reach on this machine and server.
   */
  readonly floor_jobs_per_s: number
  /** The same on bare copies of the two tables: primary keys and the queue index only, no trigger. */
  readonly floor_bare_jobs_per_s: number
  /** Cancel call → the running handler observes the cancellation. */
  readonly cancel_p50_ms: number
  readonly cancel_p99_ms: number
  /** A worker node dies holding a running job → the job runs again on another node. */
  readonly failover_ms: number
  /** Settings that produced the figures (written to the JSON as they are). */
  readonly settings: Record<string, unknown>
  /** Details worth keeping (full summaries, CPU), written to the JSON as they are. */
  readonly details: Record<string, unknown>
}

/**
 * MEASURE TROUPE HERE. Returns `{}` for now: every figure prints as "not measured yet" and its
 * target as pending.
 *
 * `db.url` is a fresh database (`db.name`) on the same server the peers use; the peers only add
 * their schemas `bench_pgboss_<n>` and `bench_graphile_worker_<n>` to it (`db.server`,
 * `db.embedded`, `db.serverPid` describe the server). `Db.clientLayer(db.url)` gives a migrated
 * `@effect/sql-pg` client as one node would have it. `ctx.sizes` are the sample counts the peers
 * ran with (`--quick` makes them small), `ctx.log` prints a progress line, `ctx.serverPid` feeds
 * `cpuMeter`. `Peers.Arrivals`, `Peers.pickupLoop`, `Peers.Counter` and `Peers.throughputRun`
 * are the peers' harness: use them so the numbers compare like for like.
 */
export const measureTroupe = (db: Db.BenchDatabase, ctx: Peers.Context): Promise<Partial<TroupeFigures>> =>
  Troupe.measure(db, ctx)

// --- Main ---

const peerKeys = ["pgboss", "graphile"] as const
type PeerKey = (typeof peerKeys)[number]
const sections = [...peerKeys, "troupe"] as const
type Section = (typeof sections)[number]

const peerNames: Record<PeerKey, string> = { pgboss: "pg-boss", graphile: "graphile-worker" }

const resultsDir = Path.resolve(Path.dirname(fileURLToPath(import.meta.url)), "results")

const usage =
  "usage: npm run bench -- jobs [--quick] [--only pgboss,graphile,troupe]\n" +
  "  --quick  small sample counts (for development); writes bench/results/jobs-quick.json\n" +
  "  --only   run only these sections; peers not run are taken from the last full bench/results/jobs.json"

const parseArgs = (args: ReadonlyArray<string>) => {
  let quick = false
  let only: ReadonlySet<Section> = new Set(sections)
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!
    if (a === "--quick") quick = true
    else if (a === "--only" || a.startsWith("--only=")) {
      const list = a === "--only" ? args[++i] : a.slice("--only=".length)
      const names = (list ?? "").split(",").filter((s) => s.length > 0)
      const unknown = names.filter((n) => !(sections as ReadonlyArray<string>).includes(n))
      if (names.length === 0 || unknown.length > 0)
        throw new Error(`--only takes a list of ${sections.join(", ")}; got "${list ?? ""}"\n${usage}`)
      only = new Set(names as Array<Section>)
    } else throw new Error(`unknown argument "${a}"\n${usage}`)
  }
  return { quick, only }
}

/** A peer's figures reduced to what the report shows, with the rounds behind the median. */
interface PeerResult {
  readonly peer: string
  readonly version: string
  readonly measured_at: string
  readonly pickup_p50_ms: number
  readonly pickup_p99_ms: number
  readonly jobs_per_s: number
  readonly details: Record<string, unknown>
}

const median = (xs: ReadonlyArray<number>) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor((s.length - 1) / 2)]!
}

/** Run one peer: pickup once, throughput `rounds` times (fresh schema each time), median round. */
const runPeer = async (
  key: PeerKey,
  db: Db.BenchDatabase,
  ctx: Peers.Context,
  rounds: number,
  date: string
): Promise<PeerResult> => {
  const measure = (round: number, withPickup: boolean) => {
    const c: Peers.Context = {
      ...ctx,
      sizes: withPickup ? ctx.sizes : { ...ctx.sizes, pickupWarmup: 0, pickupSamples: 0 }
    }
    return key === "pgboss"
      ? Peers.measurePgBoss(db.url, c, {
          ...Peers.pgBossSettings,
          schema: `${Peers.pgBossSettings.schema}_${round}`
        })
      : Peers.measureGraphile(db.url, c, {
          ...Peers.graphileSettings,
          schema: `${Peers.graphileSettings.schema}_${round}`
        })
  }
  const runs: Array<Peers.PeerFigures> = []
  for (let r = 0; r < rounds; r++) {
    const f = await measure(r, r === 0)
    runs.push(f)
    ctx.log(
      `  throughput round ${r + 1}/${rounds}: ${int(f.throughput.jobs_per_s)} jobs/s handled, ${int(f.throughput.settled_jobs_per_s)} settled; CPU % of a core: this process ${f.throughput.cpu.process_pct_of_core}, Postgres ${f.throughput.cpu.postgres_pct_of_core}, other processes ${f.throughput.cpu.others_pct_of_core}`
    )
  }
  const first = runs[0]!
  const rates = runs.map((f) => f.throughput.jobs_per_s)
  const medianRun = runs.find((f) => f.throughput.jobs_per_s === median(rates))!
  const r3 = (x: number) => round(x, 3)
  return {
    peer: first.peer,
    version: first.version,
    measured_at: date,
    pickup_p50_ms: r3(first.pickup.p50),
    pickup_p99_ms: r3(first.pickup.p99),
    jobs_per_s: medianRun.throughput.jobs_per_s,
    details: {
      pickup: {
        count: first.pickup.count,
        timeouts: first.pickup.timeouts,
        mean_ms: r3(first.pickup.mean),
        p50_ms: r3(first.pickup.p50),
        p90_ms: r3(first.pickup.p90),
        p99_ms: r3(first.pickup.p99),
        p999_ms: r3(first.pickup.p999),
        max_ms: r3(first.pickup.max),
        cpu: first.pickup.cpu
      },
      throughput_median: medianRun.throughput,
      throughput_rounds: runs.map((f) => f.throughput),
      settings: first.settings
    }
  }
}

/** Peer results of the last full run, for sections skipped with --only. */
const previousPeers = (): Partial<Record<PeerKey, PeerResult>> => {
  try {
    const parsed: unknown = JSON.parse(Fs.readFileSync(Path.join(resultsDir, "jobs.json"), "utf8"))
    if (typeof parsed !== "object" || parsed === null || !("peers" in parsed)) return {}
    const peers = parsed.peers
    if (typeof peers !== "object" || peers === null) return {}
    const out: Partial<Record<PeerKey, PeerResult>> = {}
    for (const k of peerKeys) {
      const p: unknown = (peers as Record<string, unknown>)[k]
      if (
        typeof p === "object" &&
        p !== null &&
        "pickup_p50_ms" in p &&
        typeof p.pickup_p50_ms === "number" &&
        "pickup_p99_ms" in p &&
        typeof p.pickup_p99_ms === "number" &&
        "jobs_per_s" in p &&
        typeof p.jobs_per_s === "number"
      )
        out[k] = p as PeerResult
    }
    return out
  } catch {
    return {}
  }
}

interface Verdict {
  readonly target: string
  readonly value: number | null
  /** `null` while the value (or a peer figure it is held against) is missing. */
  readonly pass: boolean | null
}

/** The better peer's jobs/s, when both peers were measured. */
const bestPeerJobsPerS = (peers: Partial<Record<PeerKey, PeerResult>>) =>
  peers.pgboss !== undefined && peers.graphile !== undefined
    ? Math.max(peers.pgboss.jobs_per_s, peers.graphile.jobs_per_s)
    : undefined

const computeTargets = (
  t: Partial<TroupeFigures>,
  peers: Partial<Record<PeerKey, PeerResult>>
): Record<string, Verdict> => {
  const pg = peers.pgboss
  const gw = peers.graphile
  const both = pg !== undefined && gw !== undefined
  const v = (x: number | undefined) => (x === undefined ? null : round(x, 3))
  const belowPeers = (x: number | undefined, pick: (p: PeerResult) => number) =>
    x !== undefined && both ? x < pick(pg) && x < pick(gw) : null
  const atMost = (x: number | undefined, limit: number) => (x === undefined ? null : x <= limit)
  const and = (...xs: Array<boolean | null>) => (xs.some((x) => x === null) ? null : xs.every(Boolean))
  const bestPeer = bestPeerJobsPerS(peers)
  const peerText = (pick: (p: PeerResult) => number, unit: string) =>
    both ? ` (pg-boss ${pick(pg)}${unit}, graphile-worker ${pick(gw)}${unit})` : " (peer figures missing)"
  return {
    pickup_p50_ms: {
      target: `<= ${targets.pickup_p50_ms} and below both peers' p50${peerText((p) => p.pickup_p50_ms, " ms")}`,
      value: v(t.pickup_p50_ms),
      pass: and(
        atMost(t.pickup_p50_ms, targets.pickup_p50_ms),
        belowPeers(t.pickup_p50_ms, (p) => p.pickup_p50_ms)
      )
    },
    pickup_p99_ms: {
      target: `<= ${targets.pickup_p99_ms} and below both peers' p99${peerText((p) => p.pickup_p99_ms, " ms")}`,
      value: v(t.pickup_p99_ms),
      pass: and(
        atMost(t.pickup_p99_ms, targets.pickup_p99_ms),
        belowPeers(t.pickup_p99_ms, (p) => p.pickup_p99_ms)
      )
    },
    jobs_per_s: {
      target: `>= ${targets.jobs_per_s_vs_best_peer} x the better peer${bestPeer === undefined ? " (peer figures missing)" : ` (${int(bestPeer)} jobs/s → >= ${int(targets.jobs_per_s_vs_best_peer * bestPeer)})`}`,
      value: t.jobs_per_s === undefined ? null : Math.round(t.jobs_per_s),
      pass:
        t.jobs_per_s === undefined || bestPeer === undefined
          ? null
          : t.jobs_per_s >= targets.jobs_per_s_vs_best_peer * bestPeer
    },
    cancel_p50_ms: {
      target: `<= ${targets.cancel_p50_ms}`,
      value: v(t.cancel_p50_ms),
      pass: atMost(t.cancel_p50_ms, targets.cancel_p50_ms)
    },
    cancel_p99_ms: {
      target: `<= ${targets.cancel_p99_ms}`,
      value: v(t.cancel_p99_ms),
      pass: atMost(t.cancel_p99_ms, targets.cancel_p99_ms)
    },
    failover_ms: {
      target: `<= ${targets.failover_ms}`,
      value: v(t.failover_ms),
      pass: atMost(t.failover_ms, targets.failover_ms)
    }
  }
}

export const main = async (args: ReadonlyArray<string>): Promise<void> => {
  const { quick, only } = parseArgs(args)
  const size = quick ? sizes.quick : sizes.full
  const rounds = quick ? throughputRounds.quick : throughputRounds.full
  const startedAt = new Date()
  const host = machine()
  const wall = performance.now()
  progress(
    `jobs benchmark${quick ? " (--quick)" : ""}: ${[...only].join(", ")}; ${host.cpus} cores, Node ${host.node_version}, load average ${host.load_average_at_start.join(" ")}`
  )
  const db = await Db.open(progress)
  try {
    const server = await Db.serverInfo(db.url)
    progress(`database ${db.name} on PostgreSQL ${server.version} (${db.server})`)
    const ctx: Peers.Context = { sizes: size, log: progress, serverPid: db.serverPid }

    // --- Peers ---
    const previous = previousPeers()
    const peers: Partial<Record<PeerKey, PeerResult>> = {}
    const peerSource: Partial<Record<PeerKey, string>> = {}
    for (const key of peerKeys) {
      if (only.has(key)) {
        progress(
          `${peerNames[key]}: pickup ${size.pickupWarmup} warm-up + ${int(size.pickupSamples)} samples; throughput ${rounds} × ${int(size.throughputJobs)} jobs in batches of ${int(size.enqueueBatch)}`
        )
        peers[key] = await runPeer(key, db, ctx, rounds, startedAt.toISOString())
        peerSource[key] = "this run"
      } else if (previous[key] !== undefined) {
        peers[key] = previous[key]
        peerSource[key] = `bench/results/jobs.json of ${previous[key].measured_at}`
        progress(`${peerNames[key]}: not run, using ${peerSource[key]}`)
      }
    }

    // --- troupe ---
    let troupe: Partial<TroupeFigures> = {}
    if (only.has("troupe")) {
      progress("troupe")
      troupe = await measureTroupe(db, ctx)
      if (Object.keys(troupe).length === 0) progress("  not measured yet (measureTroupe returns {})")
    }

    // --- Report ---
    const verdicts = computeTargets(troupe, peers)
    const bestPeer = bestPeerJobsPerS(peers)
    const cell = (x: number | undefined, f: (x: number) => string) => (x === undefined ? "—" : f(x))
    const troupeCell = (x: number | undefined, f: (x: number) => string) =>
      x === undefined ? "not measured yet" : f(x)
    const verdictCell = (v: Verdict) => (v.pass === null ? "pending" : v.pass ? "PASS" : "FAIL")
    const tput = (x: number) => `${int(x)} jobs/s`
    const rows: Array<Array<string>> = [
      ["measurement", "pg-boss", "graphile-worker", "troupe", "target", ""],
      [
        "pickup latency p50",
        cell(peers.pgboss?.pickup_p50_ms, ms),
        cell(peers.graphile?.pickup_p50_ms, ms),
        troupeCell(troupe.pickup_p50_ms, ms),
        `≤ ${targets.pickup_p50_ms} ms, < peers`,
        verdictCell(verdicts.pickup_p50_ms!)
      ],
      [
        "pickup latency p99",
        cell(peers.pgboss?.pickup_p99_ms, ms),
        cell(peers.graphile?.pickup_p99_ms, ms),
        troupeCell(troupe.pickup_p99_ms, ms),
        `≤ ${targets.pickup_p99_ms} ms, < peers`,
        verdictCell(verdicts.pickup_p99_ms!)
      ],
      [
        `no-op throughput (median of ${rounds})`,
        cell(peers.pgboss?.jobs_per_s, tput),
        cell(peers.graphile?.jobs_per_s, tput),
        troupeCell(troupe.jobs_per_s, tput),
        `≥ ${targets.jobs_per_s_vs_best_peer} × better peer`,
        verdictCell(verdicts.jobs_per_s!)
      ],
      [
        "drain of a queued backlog (statistics taken empty)",
        "",
        "",
        troupeCell(troupe.backlog_jobs_per_s, tput),
        "",
        ""
      ],
      ...(
        [
          ["throughput floor: contract in raw SQL, migrated tables", troupe.floor_jobs_per_s],
          ["throughput floor: contract in raw SQL, bare tables", troupe.floor_bare_jobs_per_s]
        ] as const
      ).map(([label, x]) => [
        label,
        "",
        "",
        troupeCell(x, tput),
        bestPeer === undefined ? "" : `target needs ${tput(targets.jobs_per_s_vs_best_peer * bestPeer)}`,
        x === undefined || bestPeer === undefined
          ? ""
          : x >= targets.jobs_per_s_vs_best_peer * bestPeer
            ? "reachable"
            : "out of reach"
      ]),
      [
        "cancel latency p50",
        "",
        "",
        troupeCell(troupe.cancel_p50_ms, ms),
        `≤ ${targets.cancel_p50_ms} ms`,
        verdictCell(verdicts.cancel_p50_ms!)
      ],
      [
        "cancel latency p99",
        "",
        "",
        troupeCell(troupe.cancel_p99_ms, ms),
        `≤ ${targets.cancel_p99_ms} ms`,
        verdictCell(verdicts.cancel_p99_ms!)
      ],
      [
        "failover (node dies → job runs elsewhere)",
        "",
        "",
        troupeCell(troupe.failover_ms, ms),
        `≤ ${int(targets.failover_ms)} ms`,
        verdictCell(verdicts.failover_ms!)
      ]
    ]
    const wallSeconds = (performance.now() - wall) / 1000
    console.log("")
    console.log(
      `jobs benchmark${quick ? " (--quick)" : ""}, ${startedAt.toISOString()}: PostgreSQL ${server.version} (${db.server}), Node ${host.node_version}, ${host.cpus} cores`
    )
    console.log(table(rows))
    for (const key of peerKeys) {
      const p = peers[key]
      if (p === undefined) continue
      const s = (p.details.settings ?? {}) as { pickup?: unknown; throughput?: unknown }
      console.log(
        `\n${peerNames[key]} ${p.version} (${peerSource[key]}):\n  pickup settings: ${JSON.stringify(s.pickup)}\n  throughput settings: ${JSON.stringify(s.throughput)}`
      )
    }

    const allMeasured = Object.values(verdicts).every((v) => v.pass !== null)
    const result = {
      benchmark: "jobs",
      date: startedAt.toISOString(),
      quick,
      sections_run: [...only],
      duration_s: round(wallSeconds, 1),
      pgboss_pickup_p50_ms: peers.pgboss?.pickup_p50_ms ?? null,
      pgboss_pickup_p99_ms: peers.pgboss?.pickup_p99_ms ?? null,
      graphile_pickup_p50_ms: peers.graphile?.pickup_p50_ms ?? null,
      graphile_pickup_p99_ms: peers.graphile?.pickup_p99_ms ?? null,
      pgboss_jobs_per_s: peers.pgboss?.jobs_per_s ?? null,
      graphile_jobs_per_s: peers.graphile?.jobs_per_s ?? null,
      // troupe's own figures under the names the jobs issue gives them (unprefixed).
      pickup_p50_ms: troupe.pickup_p50_ms ?? null,
      pickup_p99_ms: troupe.pickup_p99_ms ?? null,
      jobs_per_s: troupe.jobs_per_s ?? null,
      backlog_jobs_per_s: troupe.backlog_jobs_per_s ?? null,
      floor_jobs_per_s: troupe.floor_jobs_per_s ?? null,
      floor_bare_jobs_per_s: troupe.floor_bare_jobs_per_s ?? null,
      cancel_p50_ms: troupe.cancel_p50_ms ?? null,
      cancel_p99_ms: troupe.cancel_p99_ms ?? null,
      failover_ms: troupe.failover_ms ?? null,
      postgres_version: server.version,
      node_version: host.node_version,
      targets: verdicts,
      all_targets_met: allMeasured ? Object.values(verdicts).every((v) => v.pass === true) : null,
      machine: { ...host, load_average_at_end: Os.loadavg().map((x) => round(x, 2)) },
      database: Db.describeDatabase(db, server),
      settings: Object.fromEntries(
        peerKeys.filter((k) => peers[k] !== undefined).map((k) => [k, peers[k]!.details.settings])
      ),
      sizes: { ...size, throughput_rounds: rounds },
      method: {
        pickup:
          "one job at a time on an idle worker: performance.now() at the start of the enqueue call and at handler entry (same process); the harness pauses gapMs after each pickup; warm-up samples dropped",
        throughput:
          "throughputJobs no-op jobs enqueued in batches of enqueueBatch from one producer while the workers drain them; jobs/s = jobs / (last handler entry - first enqueue call); median of throughput_rounds rounds, each on a fresh schema after a warm-up round; settled = no unsettled row left in the peer's table",
        backlog:
          "throughputJobs jobs inserted queued in one statement after an ANALYZE of the emptied queue, then two fresh worker nodes (256 slots each) start; jobs/s = jobs / (last handler entry - the workers' start)",
        floor:
          "the throughput run through the contract's fewest writes in raw SQL (insert queued; claim: pick + mark running + job_started; end: mark completed + job_completed) no troupe code; on troupe's migrated tables, then on bare copies with primary keys and the queue index only; one round after a warm-up each, right after troupe's throughput (bench/internal/floor.ts)"
      },
      peers: Object.fromEntries(
        peerKeys
          .filter((k) => peers[k] !== undefined)
          .map((k) => [k, { ...peers[k]!, source: peerSource[k] }])
      ),
      troupe: {
        settings: troupe.settings ?? null,
        details: troupe.details ?? null
      }
    }
    const file = writeResult(quick ? "jobs-quick" : "jobs", result)
    progress(`wrote ${Path.relative(process.cwd(), file)} in ${wallSeconds.toFixed(0)} s total`)
  } finally {
    progress("cleaning up the database")
    await db.close()
  }
}
