/**
 * The routing benchmark (`npm run bench -- routing`): what it costs to move a message from
 * one node to an actor on another, against what Postgres' NOTIFY alone costs on the same
 * server, and what an actor costs in memory.
 *
 * 1. Cross-node tell latency at a fixed offered load (open loop: a send is started every
 *    1 ms whether or not earlier ones have completed). Latency = from the call of `tell` on
 *    node A to the start of the handler on node B; both nodes live in this process, so one
 *    `performance.now()` clock serves both ends.
 * 2. Cross-node throughput: many sender fibers on A, each telling sequentially (each tell
 *    waits for its commit), to actors on B; msgs/s = handled on B / elapsed. With the message
 *    log on (the default) and off.
 * 3. Raw NOTIFY ping-pong round trip between two plain `pg` clients.
 * 4. Raw one-way NOTIFY throughput: one NOTIFY per autocommit transaction from N connections,
 *    counted by one listener.
 * 5. Memory per actor, in a child process (bench/internal/memory-child.ts).
 *
 * Each node has its own pool (as it would in its own process), but the nodes share this
 * process' event loop and CPU with each other and with the benchmark driver.
 */

import { spawn } from "node:child_process"
import * as Os from "node:os"
import * as Path from "node:path"
import { monitorEventLoopDelay } from "node:perf_hooks"
import { fileURLToPath } from "node:url"
import { SqlClient } from "@effect/sql"
import { Duration, Effect, Exit, Layer, Schedule, Scope } from "effect"
import pg from "pg"
import * as Node from "../src/runtime/core/Node.ts"
import { Ping, Sink, sink } from "./internal/actors.ts"
import * as Db from "./internal/db.ts"
import * as SqlCount from "./internal/sqlcount.ts"
import * as Statements from "./internal/statements.ts"
import {
  cpuMeter,
  int,
  machine,
  ms,
  progress,
  round,
  type Summary,
  sleep,
  summarize,
  table,
  writeResult,
  summaryMs
} from "./internal/stats.ts"

// --- Settings ---

const settings = {
  latency: { ratePerSecond: 1000, warmupMessages: 1_000, measuredMessages: 8_000, targetActors: 100 },
  /** The same at a light load, for context (not a target). */
  latencyLight: { ratePerSecond: 200, warmupMessages: 200, measuredMessages: 1_000 },
  throughput: { senders: 256, targetActors: 256, warmupMessages: 5_000, measuredMessages: 60_000 },
  pingPong: { warmup: 200, roundTrips: 2_000 },
  oneWay: {
    connections: [1, 4, 16],
    messagesPerConnectionCount: { 1: 20_000, 4: 40_000, 16: 40_000 } as Record<number, number>
  },
  /** The raw one-way figure the tell throughput is held against: the node's single writer uses one connection. */
  oneWayReferenceConnections: 1,
  statements: { batchSizes: [1, 4, 16, 64, 256], rowsPerSize: 4_000 },
  memory: { active: 100_000, spawnManyPassivated: 50_000, sqlPassivated: 1_000_000 }
}

const targets = {
  tell_p50_ms: 1,
  tell_p99_ms: 5,
  tell_vs_raw_ratio: 0.5,
  rss_per_active_actor_bytes: 2048,
  /** "Does not grow with the passivated actors": at most 5 MB for 1,000,000 (5 bytes each), allowing for RSS noise. */
  rss_growth_passivated_bytes: 5 * 1024 * 1024
}

const root = Path.resolve(Path.dirname(fileURLToPath(import.meta.url)), "..")

// --- Raw NOTIFY baselines ---

const connect = async (url: string, applicationName: string) => {
  const c = new pg.Client({ connectionString: url, application_name: applicationName })
  await c.connect()
  return c
}

/** X listens on `pong`, Y on `ping`; X notifies ping, Y answers on pong; RTT measured at X. */
const pingPong = async (url: string, warmup: number, n: number): Promise<Summary> => {
  const x = await connect(url, "bench-raw-x")
  const y = await connect(url, "bench-raw-y")
  try {
    await y.query("LISTEN ping")
    await x.query("LISTEN pong")
    y.on("notification", (m) => {
      if (m.channel === "ping") void y.query("SELECT pg_notify('pong', $1)", [m.payload ?? ""])
    })
    let arrived: (() => void) | undefined
    x.on("notification", (m) => {
      if (m.channel === "pong") arrived?.()
    })
    const rtt = new Float64Array(n)
    for (let i = 0; i < warmup + n; i++) {
      const pong = new Promise<void>((r) => (arrived = r))
      const t = performance.now()
      await Promise.all([pong, x.query("SELECT pg_notify('ping', $1)", [String(i)])])
      if (i >= warmup) rtt[i - warmup] = performance.now() - t
    }
    return summarize(rtt)
  } finally {
    await x.end()
    await y.end()
  }
}

/** N connections each send `SELECT pg_notify(...)` (one transaction each) in a loop; one listener counts. */
const oneWay = async (url: string, connections: number, total: number) => {
  const listener = await connect(url, "bench-raw-listener")
  const senders = await Promise.all(
    Array.from({ length: connections }, (_, i) => connect(url, `bench-raw-sender-${i}`))
  )
  try {
    await listener.query("LISTEN oneway")
    let received = 0
    let lastAt = 0
    let done: (() => void) | undefined
    const all = new Promise<void>((r) => (done = r))
    listener.on("notification", () => {
      received++
      if (received === total) {
        lastAt = performance.now()
        done?.()
      }
    })
    const start = performance.now()
    let next = 0
    await Promise.all(
      senders.map(async (c) => {
        while (next < total) {
          next++
          await c.query("SELECT pg_notify('oneway', 'm')")
        }
      })
    )
    const sentAt = performance.now()
    await Promise.race([all, sleep(30_000)])
    const end = received === total ? lastAt : performance.now()
    return {
      connections,
      messages: total,
      received,
      elapsed_ms: end - start,
      send_elapsed_ms: sentAt - start,
      msgs_per_s: (received / (end - start)) * 1000
    }
  } finally {
    await Promise.all([listener, ...senders].map((c) => c.end()))
  }
}

// --- Through the runtime ---

const keys = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => `${prefix}-${i}`)

/** Wait until `cond` holds (polled every `everyMs`), or fail after `within`. */
const awaitUntil = (
  what: string,
  cond: () => boolean,
  within: Duration.DurationInput = "60 seconds",
  everyMs = 2
) =>
  Effect.sync(cond).pipe(
    Effect.repeat({ schedule: Schedule.spaced(Duration.millis(everyMs)), until: (ok) => ok }),
    Effect.timeoutFail({ duration: within, onTimeout: () => new Error(`timed out waiting for ${what}`) })
  )

/**
 * Wait until every mailbox row is acknowledged, so one phase does not leave work for the
 * next; then VACUUM the mailbox, so that each phase starts from a table without the dead rows
 * of the one before (autovacuum visits a database once a minute at best: within a phase,
 * dead rows accumulate as they would in production, across phases they would not).
 */
const settleMailbox = Effect.gen(function* () {
  const sql = yield* SqlClient.SqlClient
  yield* sql<{ n: string }>`SELECT count(*)::text AS n FROM actor_mailbox`.pipe(
    Effect.map((r) => Number(r[0]!.n)),
    Effect.repeat({ schedule: Schedule.spaced("20 millis"), until: (n) => n === 0 }),
    Effect.timeoutFail({
      duration: "30 seconds",
      onTimeout: () => new Error("mailbox rows were never acknowledged")
    })
  )
  yield* sql`VACUUM (ANALYZE) actor_mailbox`
})

/** Open loop at `rate`/s: a tell is forked at each tick whatever happened to earlier ones. */
const openLoop = (
  pair: Pair,
  targetKeys: ReadonlyArray<string>,
  options: {
    readonly rate: number
    readonly warmup: number
    readonly measured: number
    readonly serverPid: number | undefined
  }
) =>
  Effect.gen(function* () {
    const { a, b } = pair
    const total = options.warmup + options.measured
    const latency = new Float64Array(total).fill(Number.NaN)
    const committed = new Float64Array(total).fill(Number.NaN) // tell call to its commit (tell returns)
    const lag = new Float64Array(total) // tell call minus its scheduled time
    let handled = 0
    let failed = 0
    sink.onPing = (seq, sentAt, startedAt) => {
      latency[seq] = startedAt - sentAt
      handled++
    }
    const refs = targetKeys.map((k) => a.ref(Sink, k))
    const interval = 1000 / options.rate
    const claimsBefore = b.stats().claims
    const writesBefore = a.stats().writes
    let maxBurst = 0
    let warmupDone = false
    let statementsBefore = snapshotStatements(pair)
    let i = 0
    const start = performance.now()
    let measuredStart = start
    let stopCpu: (() => ReturnType<ReturnType<typeof cpuMeter>>) | undefined
    const loopDelay = monitorEventLoopDelay({ resolution: 10 })
    while (i < total) {
      const now = performance.now()
      const due = Math.min(total, Math.floor((now - start) / interval) + 1)
      maxBurst = Math.max(maxBurst, due - i)
      for (; i < due; i++) {
        const seq = i
        if (seq === options.warmup) {
          measuredStart = performance.now()
          statementsBefore = snapshotStatements(pair)
          stopCpu = cpuMeter(options.serverPid)
          loopDelay.enable()
        }
        lag[seq] = performance.now() - (start + seq * interval)
        yield* Effect.forkDaemon(
          Effect.suspend(() => {
            const t = performance.now()
            return refs[seq % refs.length]!.tell(new Ping({ seq, t })).pipe(
              Effect.zipRight(Effect.sync(() => (committed[seq] = performance.now() - t)))
            )
          }).pipe(Effect.catchAll(() => Effect.sync(() => failed++)))
        )
      }
      if (i < total) {
        const wait = start + i * interval - performance.now()
        yield* wait > 0 ? Effect.sleep(Duration.millis(wait)) : Effect.yieldNow()
      }
      if (!warmupDone && i >= options.warmup && options.warmup > 0) {
        warmupDone = true
        progress(`  warm-up sent (${int(options.warmup)}), measuring`)
      }
    }
    const sendEnd = performance.now()
    yield* awaitUntil("the open-loop messages to be handled", () => handled + failed >= total)
    const cpu = stopCpu?.()
    loopDelay.disable()
    yield* Effect.sleep("100 millis") // let the last acknowledgements go out before counting statements
    const statements = statementsSince(pair, statementsBefore, options.measured)
    const measured = latency.subarray(options.warmup).filter((x) => !Number.isNaN(x))
    const windowSize = Math.max(1, Math.round(options.rate))
    const trend: Array<{ from_seq: number; p50_ms: number; p99_ms: number }> = []
    for (let from = options.warmup; from < total; from += windowSize) {
      const w = summarize(
        latency.subarray(from, Math.min(total, from + windowSize)).filter((x) => !Number.isNaN(x))
      )
      trend.push({ from_seq: from, p50_ms: round(w.p50), p99_ms: round(w.p99) })
    }
    return {
      summary: summarize(measured),
      commit: summarize(committed.subarray(options.warmup).filter((x) => !Number.isNaN(x))),
      offered_rate_per_s: options.rate,
      achieved_send_rate_per_s: (options.measured / (sendEnd - measuredStart)) * 1000,
      schedule_lag: summarize(lag.subarray(options.warmup)),
      max_burst: maxBurst,
      trend_per_second: trend,
      statements,
      failed,
      writes: a.stats().writes - writesBefore,
      claims: b.stats().claims - claimsBefore,
      avg_rows_per_write: total / Math.max(1, a.stats().writes - writesBefore),
      avg_rows_per_claim: total / Math.max(1, b.stats().claims - claimsBefore),
      cpu,
      event_loop_delay_ms: {
        note: "monitorEventLoopDelay, resolution 10 ms: how late a 10 ms timer fired",
        p50: round(loopDelay.percentile(50) / 1e6 - 10),
        p99: round(loopDelay.percentile(99) / 1e6 - 10),
        max: round(loopDelay.max / 1e6 - 10)
      }
    }
  })

/** Closed loop: `senders` fibers each tell sequentially (waiting for each commit) until `total` are sent. */
const closedLoop = (
  pair: Pair,
  targetKeys: ReadonlyArray<string>,
  options: { readonly senders: number; readonly total: number; readonly serverPid: number | undefined }
) =>
  Effect.gen(function* () {
    const { a, b } = pair
    const latency = new Float64Array(options.total).fill(Number.NaN)
    let handled = 0
    let failed = 0
    let lastHandledAt = 0
    sink.onPing = (seq, sentAt, startedAt) => {
      latency[seq] = startedAt - sentAt
      handled++
      lastHandledAt = startedAt
    }
    const refs = targetKeys.map((k) => a.ref(Sink, k))
    const writesBefore = a.stats().writes
    const claimsBefore = b.stats().claims
    let next = 0
    const statementsBefore = snapshotStatements(pair)
    const stopCpu = cpuMeter(options.serverPid)
    const start = performance.now()
    yield* Effect.forEach(
      Array.from({ length: options.senders }, (_, s) => s),
      (s) =>
        Effect.gen(function* () {
          const ref = refs[s % refs.length]!
          while (next < options.total) {
            const seq = next++
            const sent = yield* Effect.either(ref.tell(new Ping({ seq, t: performance.now() })))
            if (sent._tag === "Left") failed++
          }
        }),
      { concurrency: "unbounded", discard: true }
    )
    const committedAt = performance.now()
    yield* awaitUntil(
      "the closed-loop messages to be handled",
      () => handled + failed >= options.total,
      "120 seconds"
    )
    const cpu = stopCpu()
    yield* Effect.sleep("100 millis")
    const statements = statementsSince(pair, statementsBefore, options.total)
    const elapsed = lastHandledAt - start
    const writes = a.stats().writes - writesBefore
    const claims = b.stats().claims - claimsBefore
    return {
      senders: options.senders,
      target_actors: targetKeys.length,
      messages: options.total,
      handled,
      failed,
      elapsed_ms: elapsed,
      msgs_per_s: (handled / elapsed) * 1000,
      commit_rate_per_s: (options.total / (committedAt - start)) * 1000,
      writes,
      avg_rows_per_write: options.total / Math.max(1, writes),
      claims,
      avg_rows_per_claim: options.total / Math.max(1, claims),
      latency: summarize(latency.filter((x) => !Number.isNaN(x))),
      cpu,
      statements
    }
  })

/** A pair of nodes (each with its own pool) and the sink actors spawned on B. */
interface Pair {
  readonly a: Node.TroupeNode
  readonly b: Node.TroupeNode
  readonly countA: SqlCount.StatementCounter
  readonly countB: SqlCount.StatementCounter
}

/** Statements each node ran between two snapshots, in all and per message. */
const statementsSince = (
  pair: Pair,
  before: { a: Record<string, number>; b: Record<string, number> },
  messages: number
) => {
  const a = SqlCount.diff(pair.countA.snapshot(), before.a)
  const b = SqlCount.diff(pair.countB.snapshot(), before.b)
  const perMessage = (c: Record<string, number>) =>
    Object.fromEntries(Object.entries(c).map(([k, v]) => [k, round(v / messages, 3)]))
  const total = (c: Record<string, number>) => Object.values(c).reduce((x, y) => x + y, 0)
  return {
    node_a: a,
    node_b: b,
    per_message_a: perMessage(a),
    per_message_b: perMessage(b),
    per_message_total: round((total(a) + total(b)) / messages, 3)
  }
}

const snapshotStatements = (pair: Pair) => ({ a: pair.countA.snapshot(), b: pair.countB.snapshot() })

const nodePair = (url: string, suffix: string, messageLog: boolean, sinkKeys: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const countA = SqlCount.make()
    const countB = SqlCount.make()
    const tracerA = yield* countA.tracer
    const tracerB = yield* countB.tracer
    const ctxA = yield* Layer.build(Db.clientLayer(url, { applicationName: `bench-node-a${suffix}` }))
    const ctxB = yield* Layer.build(Db.clientLayer(url, { applicationName: `bench-node-b${suffix}` }))
    const a = yield* Node.make({ nodeId: `bench-a${suffix}`, actors: [Sink], messageLog }).pipe(
      Effect.provide(ctxA),
      Effect.withTracer(tracerA)
    )
    const b = yield* Node.make({ nodeId: `bench-b${suffix}`, actors: [Sink], messageLog }).pipe(
      Effect.provide(ctxB),
      Effect.withTracer(tracerB)
    )
    yield* b.spawnMany(Sink, sinkKeys, { activate: true })
    return { a, b, ctxA, ctxB, countA, countB }
  })

/** Run the memory measurement in a child process with `--expose-gc`. */
const memoryChild = (url: string) =>
  new Promise<any>((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [
        "--expose-gc",
        // A small, fixed young generation: V8 otherwise shrinks it from 32 MB to 1 MB when the
        // process goes quiet, which shows up as a 30 MB RSS drop that has nothing to do with actors.
        "--min-semi-space-size=1",
        "--max-semi-space-size=1",
        "--import",
        "tsx",
        Path.join(root, "bench", "internal", "memory-child.ts")
      ],
      {
        cwd: root,
        env: {
          ...process.env,
          TROUPE_BENCH_URL: url,
          TROUPE_BENCH_ACTIVE: String(settings.memory.active),
          TROUPE_BENCH_SPAWNMANY_PASSIVE: String(settings.memory.spawnManyPassivated),
          TROUPE_BENCH_PASSIVATED: String(settings.memory.sqlPassivated)
        },
        stdio: ["ignore", "inherit", "inherit", "ipc"]
      }
    )
    let result: unknown
    child.on("message", (m) => (result = m))
    child.on("error", reject)
    child.on("exit", (code, signal) =>
      code === 0 && result !== undefined
        ? resolve(result)
        : reject(new Error(`memory child exited with ${signal ?? code} and ${result ? "a" : "no"} result`))
    )
  })

// --- Main ---

/**
 * `--quick` (about 20 s): only the latency phases (and a short raw ping-pong for reference),
 * to compare a change before and after under the same conditions; writes routing-quick.json.
 * `--rounds N` repeats the 1,000 msgs/s phase N times (default 3) and reports each round and
 * their median, so that a burst of load from other processes shows up as one bad round.
 */
const mainQuick = async (args: ReadonlyArray<string>): Promise<void> => {
  const startedAt = new Date()
  const roundsArg = args.indexOf("--rounds")
  const rounds = roundsArg >= 0 ? Math.max(1, Number(args[roundsArg + 1]) || 3) : 3
  const quick = {
    latency: { ...settings.latency, warmupMessages: 1_000, measuredMessages: 4_000 },
    latencyLight: { ...settings.latencyLight, warmupMessages: 200, measuredMessages: 1_000 },
    pingPong: { warmup: 100, roundTrips: 1_000 }
  }
  const host = machine()
  progress(
    `routing benchmark (quick): ${host.cpus} cores, Node ${host.node_version}, load average ${host.load_average_at_start.join(" ")}`
  )
  const db = await Db.open(progress)
  try {
    const server = await Db.serverInfo(db.url)
    progress(`database ${db.name} on PostgreSQL ${server.version} (${db.server})`)
    const rtt = await pingPong(db.url, quick.pingPong.warmup, quick.pingPong.roundTrips)
    progress(`raw NOTIFY ping-pong rtt p50 ${ms(rtt.p50)}, p99 ${ms(rtt.p99)}`)
    const serverPid = db.serverPid
    const results = await Effect.runPromise(
      Effect.gen(function* () {
        const latKeys = keys("lat", quick.latency.targetActors)
        const pair = yield* nodePair(db.url, "", true, latKeys)
        const out: Array<{ name: string; r: Effect.Effect.Success<ReturnType<typeof openLoop>> }> = []
        const phase = (
          name: string,
          p: { ratePerSecond: number; warmupMessages: number; measuredMessages: number }
        ) =>
          Effect.gen(function* () {
            const r = yield* openLoop(pair, latKeys, {
              rate: p.ratePerSecond,
              warmup: p.warmupMessages,
              measured: p.measuredMessages,
              serverPid
            })
            progress(
              `${name}: p50 ${ms(r.summary.p50)}, p99 ${ms(r.summary.p99)}, max ${ms(r.summary.max)}; commit p50 ${ms(r.commit.p50)}, p99 ${ms(r.commit.p99)}; ${r.avg_rows_per_write.toFixed(2)} rows/write, ${r.avg_rows_per_claim.toFixed(2)} rows/claim; CPU % of a core: process ${r.cpu?.process_pct_of_core}, Postgres ${r.cpu?.postgres_pct_of_core}, others ${r.cpu?.others_pct_of_core}`
            )
            out.push({ name, r })
            yield* Effect.provide(settleMailbox, pair.ctxA)
          })
        for (let i = 0; i < rounds; i++) yield* phase(`1,000 msgs/s, round ${i + 1}`, quick.latency)
        yield* phase("200 msgs/s", quick.latencyLight)
        return out
      }).pipe(Effect.scoped)
    )
    const at1000 = results.filter((x) => x.r.offered_rate_per_s === quick.latency.ratePerSecond)
    const median = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
    const p50 = median(at1000.map((x) => x.r.summary.p50))
    const p99 = median(at1000.map((x) => x.r.summary.p99))
    const rows: Array<Array<string>> = [
      ["phase", "p50", "p99", "commit p50 / p99", "CPU: process / Postgres / others (% of a core)"],
      ...results.map(({ name, r }) => [
        name,
        ms(r.summary.p50),
        ms(r.summary.p99),
        `${ms(r.commit.p50)} / ${ms(r.commit.p99)}`,
        r.cpu
          ? `${Math.round(r.cpu.process_pct_of_core)} / ${Number.isNaN(r.cpu.postgres_pct_of_core) ? "n/a" : Math.round(r.cpu.postgres_pct_of_core)} / ${Math.round(r.cpu.others_pct_of_core)}`
          : ""
      ]),
      [`median of the 1,000 msgs/s rounds`, ms(p50), ms(p99), "", ""],
      [`raw NOTIFY ping-pong RTT`, ms(rtt.p50), ms(rtt.p99), "", ""]
    ]
    console.log("")
    console.log(
      `routing benchmark (quick), ${startedAt.toISOString()}: PostgreSQL ${server.version} (${db.server}), Node ${host.node_version}, ${host.cpus} cores`
    )
    console.log(table(rows))
    const r3 = (x: number) => round(x, 3)
    const file = writeResult("routing-quick", {
      benchmark: "routing --quick",
      date: startedAt.toISOString(),
      tell_p50_ms: r3(p50),
      tell_p99_ms: r3(p99),
      raw_notify_rtt_p50_ms: r3(rtt.p50),
      raw_notify_rtt_p99_ms: r3(rtt.p99),
      machine: { ...host, load_average_at_end: Os.loadavg().map((x) => round(x, 2)) },
      settings: quick,
      phases: results.map(({ name, r }) => ({
        name,
        p50_ms: r3(r.summary.p50),
        p90_ms: r3(r.summary.p90),
        p99_ms: r3(r.summary.p99),
        max_ms: r3(r.summary.max),
        commit_p50_ms: r3(r.commit.p50),
        commit_p99_ms: r3(r.commit.p99),
        avg_rows_per_write: round(r.avg_rows_per_write, 2),
        avg_rows_per_claim: round(r.avg_rows_per_claim, 2),
        statements: r.statements.per_message_a,
        statements_b: r.statements.per_message_b,
        cpu: r.cpu,
        event_loop_delay_ms: r.event_loop_delay_ms
      }))
    })
    progress(`wrote ${Path.relative(process.cwd(), file)}`)
  } finally {
    await db.close()
  }
}

export const main = async (args: ReadonlyArray<string>): Promise<void> => {
  if (args.includes("--quick")) return mainQuick(args)
  const startedAt = new Date()
  const host = machine()
  const wall = performance.now()
  progress(
    `routing benchmark: ${host.cpus} cores, Node ${host.node_version}, load average ${host.load_average_at_start.join(" ")}`
  )
  const db = await Db.open(progress)
  try {
    const server = await Db.serverInfo(db.url)
    progress(`database ${db.name} on PostgreSQL ${server.version} (${db.server})`)

    // Raw NOTIFY baselines first, on an idle server.
    progress(
      `raw NOTIFY ping-pong: ${settings.pingPong.warmup} warm-up + ${int(settings.pingPong.roundTrips)} round trips`
    )
    const rtt = await pingPong(db.url, settings.pingPong.warmup, settings.pingPong.roundTrips)
    progress(`  rtt p50 ${ms(rtt.p50)}, p99 ${ms(rtt.p99)}`)
    const oneWays: Array<Awaited<ReturnType<typeof oneWay>>> = []
    for (const n of settings.oneWay.connections) {
      const total = settings.oneWay.messagesPerConnectionCount[n] ?? 20_000
      progress(`raw one-way NOTIFY: ${n} connection(s), ${int(total)} notifications`)
      await oneWay(db.url, n, Math.min(2_000, total)) // warm-up
      const r = await oneWay(db.url, n, total)
      oneWays.push(r)
      progress(`  ${int(r.msgs_per_s)} notifications/s received`)
    }
    const rawRef = oneWays.find((r) => r.connections === settings.oneWayReferenceConnections)!

    // Through the runtime.
    const serverPid = db.serverPid
    const runtime = await Effect.runPromise(
      Effect.gen(function* () {
        const latKeys = keys("lat", settings.latency.targetActors)
        const tpKeys = keys("tp", settings.throughput.targetActors)
        progress("starting nodes bench-a and bench-b (message log on, the default)")
        const pair = yield* nodePair(db.url, "", true, [...latKeys, ...tpKeys])
        const stmtLine = (st: ReturnType<typeof statementsSince>) => {
          const parts = (c: Record<string, number>) =>
            Object.entries(c)
              .filter(([k, v]) => k !== "heartbeat" && v >= 0.0005)
              .map(([k, v]) => `${k} ${v < 0.1 ? v.toFixed(3) : v.toFixed(2)}`)
              .join(", ")
          return `statements per message: A ${parts(st.per_message_a)}; B ${parts(st.per_message_b)}`
        }
        const cpuLine = (
          c:
            | {
                process_pct_of_core: number
                postgres_pct_of_core: number
                others_pct_of_core: number
              }
            | undefined
        ) =>
          c
            ? `CPU (% of a core): this process ${c.process_pct_of_core}, ${Number.isNaN(c.postgres_pct_of_core) ? `other processes incl. Postgres ${c.others_pct_of_core}` : `Postgres ${c.postgres_pct_of_core}, other processes ${c.others_pct_of_core}`}`
            : ""

        const l = settings.latency
        progress(
          `tell latency: open loop at ${int(l.ratePerSecond)} msgs/s, ${int(l.warmupMessages)} warm-up + ${int(l.measuredMessages)} measured, to ${l.targetActors} actors on B`
        )
        const latency = yield* openLoop(pair, latKeys, {
          rate: l.ratePerSecond,
          warmup: l.warmupMessages,
          measured: l.measuredMessages,
          serverPid
        })
        progress(
          `  p50 ${ms(latency.summary.p50)}, p99 ${ms(latency.summary.p99)}, max ${ms(latency.summary.max)}`
        )
        progress(`  ${stmtLine(latency.statements)}; ${cpuLine(latency.cpu)}`)
        yield* Effect.provide(settleMailbox, pair.ctxA)

        const ll = settings.latencyLight
        progress(
          `tell latency at a light load: open loop at ${int(ll.ratePerSecond)} msgs/s, ${int(ll.measuredMessages)} measured`
        )
        const latencyLight = yield* openLoop(pair, latKeys, {
          rate: ll.ratePerSecond,
          warmup: ll.warmupMessages,
          measured: ll.measuredMessages,
          serverPid
        })
        progress(
          `  p50 ${ms(latencyLight.summary.p50)}, p99 ${ms(latencyLight.summary.p99)}; ${stmtLine(latencyLight.statements)}; ${cpuLine(latencyLight.cpu)}`
        )
        yield* Effect.provide(settleMailbox, pair.ctxA)

        const t = settings.throughput
        progress(
          `tell throughput (message log on): ${t.senders} senders on A → ${t.targetActors} actors on B, ${int(t.warmupMessages)} warm-up + ${int(t.measuredMessages)} measured`
        )
        yield* closedLoop(pair, tpKeys, { senders: t.senders, total: t.warmupMessages, serverPid })
        yield* Effect.provide(settleMailbox, pair.ctxA)
        const withLog = yield* closedLoop(pair, tpKeys, {
          senders: t.senders,
          total: t.measuredMessages,
          serverPid
        })
        progress(
          `  ${int(withLog.msgs_per_s)} msgs/s handled (${withLog.avg_rows_per_write.toFixed(1)} rows/write, ${withLog.avg_rows_per_claim.toFixed(1)} rows/claim)`
        )
        progress(`  ${stmtLine(withLog.statements)}; ${cpuLine(withLog.cpu)}`)
        yield* Effect.provide(settleMailbox, pair.ctxA)

        const noLogScope = yield* Scope.make()
        const nlKeys = keys("nl", t.targetActors)
        progress("starting nodes bench-a-nolog and bench-b-nolog (messageLog: false)")
        const noLogPair = yield* nodePair(db.url, "-nolog", false, nlKeys).pipe(Scope.extend(noLogScope))
        progress(`tell throughput (message log off): same shape`)
        yield* closedLoop(noLogPair, nlKeys, {
          senders: t.senders,
          total: t.warmupMessages,
          serverPid
        })
        yield* Effect.provide(settleMailbox, noLogPair.ctxA)
        const noLog = yield* closedLoop(noLogPair, nlKeys, {
          senders: t.senders,
          total: t.measuredMessages,
          serverPid
        })
        progress(
          `  ${int(noLog.msgs_per_s)} msgs/s handled (${noLog.avg_rows_per_write.toFixed(1)} rows/write, ${noLog.avg_rows_per_claim.toFixed(1)} rows/claim)`
        )
        progress(`  ${stmtLine(noLog.statements)}; ${cpuLine(noLog.cpu)}`)
        yield* Effect.provide(settleMailbox, noLogPair.ctxA)
        yield* Scope.close(noLogScope, Exit.void)
        progress("stopping nodes")
        return { latency, latencyLight, withLog, noLog }
      }).pipe(Effect.scoped)
    )

    progress(
      "statements alone, sequential on 1 connection, no node reading (insert by batch size; insert and claim unnamed vs prepared)"
    )
    const { rows: statements, claimPlan } = await Effect.runPromise(
      Statements.measure(db.url, settings.statements.batchSizes, settings.statements.rowsPerSize)
    )
    for (const r of statements)
      progress(
        `  ${r.statement}, batch ${r.batch_size}: p50 ${ms(r.p50_ms)}, p99 ${ms(r.p99_ms)}, ${int(r.rows_per_s)} rows/s`
      )
    if (claimPlan)
      progress(
        `  one claim now: ${ms(claimPlan.execution_ms)} executing + ${ms(claimPlan.planning_ms)} planning, ${claimPlan.shared_buffers_hit} buffers, via ${claimPlan.scans.join(" → ")}; actor_mailbox has ${int(claimPlan.mailbox_dead_rows ?? Number.NaN)} dead rows, ${claimPlan.autovacuums} autovacuums so far`
      )

    progress(
      `memory (child process): ${int(settings.memory.active)} active actors, then ${int(settings.memory.spawnManyPassivated)} registered via spawnMany, then ${int(settings.memory.sqlPassivated)} via SQL`
    )
    const mem = await memoryChild(db.url)
    const snaps = mem.snapshots
    const rssPerActive = (snaps.afterActive.rss - snaps.before.rss) / mem.active_actors
    const heapPerActive = (snaps.afterActive.heapUsed - snaps.before.heapUsed) / mem.active_actors
    const rssPerSpawnMany =
      (snaps.afterSpawnMany.rss - snaps.afterActive.rss) / mem.spawnmany_passivated_actors
    const heapPerSpawnMany =
      (snaps.afterSpawnMany.heapUsed - snaps.afterActive.heapUsed) / mem.spawnmany_passivated_actors
    const rssGrowthPassivated = snaps.afterPassivated.rss - snaps.afterSpawnMany.rss
    const heapGrowthPassivated = snaps.afterPassivated.heapUsed - snaps.afterSpawnMany.heapUsed

    // --- Report ---

    const tellP50 = runtime.latency.summary.p50
    const tellP99 = runtime.latency.summary.p99
    const tellMax = runtime.withLog.msgs_per_s
    const ratio = tellMax / rawRef.msgs_per_s
    const pass = {
      tell_p50_ms: tellP50 <= targets.tell_p50_ms,
      tell_p99_ms: tellP99 <= targets.tell_p99_ms,
      tell_max_vs_raw_notify: ratio >= targets.tell_vs_raw_ratio,
      rss_per_active_actor_bytes: rssPerActive <= targets.rss_per_active_actor_bytes,
      rss_growth_passivated_bytes: rssGrowthPassivated <= targets.rss_growth_passivated_bytes
    }
    const verdict = (ok: boolean) => (ok ? "PASS" : "FAIL")
    const cpuCell = (
      c: { process_pct_of_core: number; postgres_pct_of_core: number; others_pct_of_core: number } | undefined
    ) =>
      c
        ? `${Math.round(c.process_pct_of_core)} / ${Number.isNaN(c.postgres_pct_of_core) ? "n/a" : Math.round(c.postgres_pct_of_core)} / ${Math.round(c.others_pct_of_core)}`
        : ""
    const bestRaw = oneWays.reduce((x, y) => (y.msgs_per_s > x.msgs_per_s ? y : x))
    const rows: Array<Array<string>> = [
      ["measurement", "value", "target", ""],
      [
        `tell latency p50 (open loop, ${int(settings.latency.ratePerSecond)} msgs/s)`,
        ms(tellP50),
        `≤ ${targets.tell_p50_ms} ms`,
        verdict(pass.tell_p50_ms)
      ],
      [`tell latency p99`, ms(tellP99), `≤ ${targets.tell_p99_ms} ms`, verdict(pass.tell_p99_ms)],
      [
        `tell latency p99.9 / max`,
        `${ms(runtime.latency.summary.p999)} / ${ms(runtime.latency.summary.max)}`,
        "",
        ""
      ],
      [
        `  CPU % of a core: this process / Postgres / other processes${db.serverPid === undefined ? " (Postgres n/a: not embedded)" : ""}`,
        cpuCell(runtime.latency.cpu),
        "",
        ""
      ],
      [
        `tell latency p50 / p99 at ${int(settings.latencyLight.ratePerSecond)} msgs/s`,
        `${ms(runtime.latencyLight.summary.p50)} / ${ms(runtime.latencyLight.summary.p99)}`,
        "",
        ""
      ],
      [
        `tell max throughput (log on, ${settings.throughput.senders} senders)`,
        `${int(tellMax)} msgs/s`,
        `≥ ${int(targets.tell_vs_raw_ratio * rawRef.msgs_per_s)}`,
        verdict(pass.tell_max_vs_raw_notify)
      ],
      [
        `  CPU % of a core: this process / Postgres / other processes${db.serverPid === undefined ? " (Postgres n/a: not embedded)" : ""}`,
        cpuCell(runtime.withLog.cpu),
        "",
        ""
      ],
      [
        `  tell latency p50 / p99 at that load`,
        `${ms(runtime.withLog.latency.p50)} / ${ms(runtime.withLog.latency.p99)}`,
        "",
        ""
      ],
      [`tell max throughput (messageLog: false)`, `${int(runtime.noLog.msgs_per_s)} msgs/s`, "", ""],
      [`raw NOTIFY ping-pong RTT p50 / p99`, `${ms(rtt.p50)} / ${ms(rtt.p99)}`, "", ""],
      ...oneWays.map((r) => [
        `raw one-way NOTIFY, ${r.connections} connection${r.connections > 1 ? "s" : ""}${r.connections === settings.oneWayReferenceConnections ? " (reference)" : ""}`,
        `${int(r.msgs_per_s)} msgs/s`,
        "",
        ""
      ]),
      [
        `tell max / raw one-way, ${rawRef.connections} connection`,
        ratio.toFixed(2),
        `≥ ${targets.tell_vs_raw_ratio}`,
        verdict(pass.tell_max_vs_raw_notify)
      ],
      [
        `tell max / best raw one-way (${bestRaw.connections} connections)`,
        (tellMax / bestRaw.msgs_per_s).toFixed(2),
        "",
        ""
      ],
      ...statements.map((r) => [
        `${r.statement}${r.batch_size > 1 || r.statement.startsWith("Mailbox") ? `, batch ${r.batch_size}` : ""} (p50 ${ms(r.p50_ms)})`,
        `${int(r.rows_per_s)} rows/s`,
        "",
        ""
      ]),
      [
        `RSS per active (idle, in-memory) actor`,
        `${int(rssPerActive)} B`,
        `≤ ${int(targets.rss_per_active_actor_bytes)} B`,
        verdict(pass.rss_per_active_actor_bytes)
      ],
      [`  of which JS heap`, `${int(heapPerActive)} B`, "", ""],
      [
        `RSS / heap per actor registered via spawnMany (not activated)`,
        `${int(rssPerSpawnMany)} B / ${int(heapPerSpawnMany)} B`,
        "",
        ""
      ],
      [
        `RSS growth, ${int(mem.sql_passivated_actors)} passivated (SQL-registered)`,
        `${int(rssGrowthPassivated)} B`,
        `≤ ${int(targets.rss_growth_passivated_bytes)} B`,
        verdict(pass.rss_growth_passivated_bytes)
      ],
      [`  JS heap growth meanwhile`, `${int(heapGrowthPassivated)} B`, "", ""]
    ]
    const wallSeconds = (performance.now() - wall) / 1000
    console.log("")
    console.log(
      `routing benchmark, ${startedAt.toISOString()}: PostgreSQL ${server.version} (${db.server}), Node ${host.node_version}, ${host.cpus} cores`
    )
    console.log(table(rows))
    console.log(
      `\nnotes: both nodes run in this one process (separate pools, shared event loop and CPU with the driver); the raw reference uses ${settings.oneWayReferenceConnections} connection because a node writes through one writer fiber on one connection at a time (other connection counts shown for comparison). RSS growth for passivated actors uses direct SQL registration: spawnMany caches each placement (see the spawnMany row).`
    )

    const r3 = (x: number) => round(x, 3)
    const result = {
      benchmark: "routing",
      date: startedAt.toISOString(),
      duration_s: round(wallSeconds, 1),
      tell_p50_ms: r3(tellP50),
      tell_p99_ms: r3(tellP99),
      tell_max_msgs_per_s: Math.round(tellMax),
      tell_max_msgs_per_s_message_log_off: Math.round(runtime.noLog.msgs_per_s),
      raw_notify_rtt_p50_ms: r3(rtt.p50),
      raw_notify_rtt_p99_ms: r3(rtt.p99),
      raw_notify_oneway_msgs_per_s: Math.round(rawRef.msgs_per_s),
      raw_notify_oneway_connections: rawRef.connections,
      tell_max_vs_raw_notify_ratio: round(ratio, 3),
      rss_per_active_actor_bytes: Math.round(rssPerActive),
      rss_growth_passivated_bytes: rssGrowthPassivated,
      postgres_version: server.version,
      node_version: host.node_version,
      targets: {
        tell_p50_ms: { target: `<= ${targets.tell_p50_ms}`, value: r3(tellP50), pass: pass.tell_p50_ms },
        tell_p99_ms: { target: `<= ${targets.tell_p99_ms}`, value: r3(tellP99), pass: pass.tell_p99_ms },
        tell_max_vs_raw_notify: {
          target: `tell_max_msgs_per_s >= ${targets.tell_vs_raw_ratio} x raw_notify_oneway_msgs_per_s (${rawRef.connections} connection)`,
          value: round(ratio, 3),
          pass: pass.tell_max_vs_raw_notify
        },
        rss_per_active_actor_bytes: {
          target: `<= ${targets.rss_per_active_actor_bytes}`,
          value: Math.round(rssPerActive),
          pass: pass.rss_per_active_actor_bytes
        },
        rss_growth_passivated_bytes: {
          target: `~0 (<= ${targets.rss_growth_passivated_bytes} bytes for ${mem.sql_passivated_actors} actors, noise allowance)`,
          value: rssGrowthPassivated,
          pass: pass.rss_growth_passivated_bytes
        }
      },
      all_targets_met: Object.values(pass).every(Boolean),
      machine: { ...host, load_average_at_end: Os.loadavg().map((x) => round(x, 2)) },
      database: Db.describeDatabase(db, server),
      settings,
      latency: Object.fromEntries(
        (
          [
            ["at_target_load", runtime.latency],
            ["light_load", runtime.latencyLight]
          ] as const
        ).map(([k, r]) => [
          k,
          {
            ...summaryMs(r.summary),
            offered_rate_per_s: r.offered_rate_per_s,
            achieved_send_rate_per_s: round(r.achieved_send_rate_per_s, 1),
            schedule_lag: summaryMs(r.schedule_lag),
            max_burst: r.max_burst,
            trend_per_second: r.trend_per_second,
            statements: r.statements,
            failed: r.failed,
            writes: r.writes,
            avg_rows_per_write: round(r.avg_rows_per_write, 2),
            claims: r.claims,
            avg_rows_per_claim: round(r.avg_rows_per_claim, 2),
            cpu: r.cpu,
            event_loop_delay_ms: r.event_loop_delay_ms
          }
        ])
      ),
      throughput: Object.fromEntries(
        (
          [
            ["message_log_on", runtime.withLog],
            ["message_log_off", runtime.noLog]
          ] as const
        ).map(([k, r]) => [
          k,
          {
            ...r,
            elapsed_ms: round(r.elapsed_ms, 1),
            msgs_per_s: Math.round(r.msgs_per_s),
            commit_rate_per_s: Math.round(r.commit_rate_per_s),
            avg_rows_per_write: round(r.avg_rows_per_write, 1),
            avg_rows_per_claim: round(r.avg_rows_per_claim, 1),
            latency: summaryMs(r.latency),
            connections_note:
              "sending node: one writer fiber, one pool connection at a time for inserts; receiving node: claim loop and ack fiber on its pool, plus one LISTEN connection"
          }
        ])
      ),
      raw_notify: {
        ping_pong: {
          ...summaryMs(rtt),
          note: "X LISTENs pong, Y LISTENs ping; X notifies ping, Y answers on pong; 2 connections"
        },
        one_way: oneWays.map((r) => ({
          ...r,
          elapsed_ms: round(r.elapsed_ms, 1),
          send_elapsed_ms: round(r.send_elapsed_ms, 1),
          msgs_per_s: Math.round(r.msgs_per_s)
        }))
      },
      statements_alone: statements,
      claim_plan_after_statements: claimPlan,
      memory: {
        ...mem,
        rss_per_active_actor_bytes: Math.round(rssPerActive),
        heap_per_active_actor_bytes: Math.round(heapPerActive),
        rss_per_spawnmany_passivated_actor_bytes: Math.round(rssPerSpawnMany),
        heap_per_spawnmany_passivated_actor_bytes: Math.round(heapPerSpawnMany),
        rss_growth_passivated_bytes: rssGrowthPassivated,
        heap_growth_passivated_bytes: heapGrowthPassivated,
        child_node_flags: "--expose-gc --min-semi-space-size=1 --max-semi-space-size=1",
        note: "passivated actors for rss_growth_passivated_bytes are inserted into actor_registry by SQL: spawnMany without activate caches every placement in the node's registry cache (see rss_per_spawnmany_passivated_actor_bytes)"
      }
    }
    const file = writeResult("routing", result)
    progress(`wrote ${Path.relative(process.cwd(), file)} in ${wallSeconds.toFixed(0)} s total`)
  } finally {
    progress("cleaning up the database")
    await db.close()
  }
}
