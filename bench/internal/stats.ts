/**
 * Small helpers shared by the benchmarks: percentiles, progress lines, a text table and the
 * result file.
 */
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"

/** Latency summary in milliseconds (nearest-rank percentiles). */
export interface Summary {
  readonly count: number
  readonly mean: number
  readonly p50: number
  readonly p90: number
  readonly p99: number
  readonly p999: number
  readonly max: number
}

/** Summarise samples (any order; not modified). */
export const summarize = (samples: ArrayLike<number>): Summary => {
  const sorted = Float64Array.from(samples as ArrayLike<number>).sort()
  const n = sorted.length
  if (n === 0)
    return {
      count: 0,
      mean: Number.NaN,
      p50: Number.NaN,
      p90: Number.NaN,
      p99: Number.NaN,
      p999: Number.NaN,
      max: Number.NaN
    }
  const at = (p: number) => sorted[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))]!
  let sum = 0
  for (let i = 0; i < n; i++) sum += sorted[i]!
  return {
    count: n,
    mean: sum / n,
    p50: at(50),
    p90: at(90),
    p99: at(99),
    p999: at(99.9),
    max: sorted[n - 1]!
  }
}

/** Round for reports. */
/** A latency summary as the benchmarks' JSON writes it (milliseconds, 3 decimals). */
export const summaryMs = (s: Summary) => ({
  count: s.count,
  mean_ms: round(s.mean, 3),
  p50_ms: round(s.p50, 3),
  p90_ms: round(s.p90, 3),
  p99_ms: round(s.p99, 3),
  p999_ms: round(s.p999, 3),
  max_ms: round(s.max, 3)
})

export const round = (x: number, digits = 3): number => {
  if (!Number.isFinite(x)) return x
  const f = 10 ** digits
  return Math.round(x * f) / f
}

const t0 = performance.now()

/** A progress line with the time since the start of the process. */
export const progress = (line: string): void => {
  const s = ((performance.now() - t0) / 1000).toFixed(1).padStart(6)
  console.log(`[${s}s] ${line}`)
}

/** A text table: first row is the header. */
export const table = (rows: ReadonlyArray<ReadonlyArray<string>>): string => {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)))
  const line = (r: ReadonlyArray<string>) =>
    r
      .map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join("  ")
      .trimEnd()
  const rule = widths.map((w) => "-".repeat(w)).join("  ")
  return [line(rows[0]!), rule, ...rows.slice(1).map(line)].join("\n")
}

/** Thousands separators. */
export const int = (x: number): string =>
  Number.isFinite(x) ? Math.round(x).toLocaleString("en-US") : String(x)

/** Milliseconds with 2 decimals. */
export const ms = (x: number): string => (Number.isFinite(x) ? `${x.toFixed(2)} ms` : String(x))

/** The machine, for the result file. */
export const machine = () => ({
  node_version: process.version,
  platform: `${Os.platform()} ${Os.release()} ${Os.arch()}`,
  cpus: Os.cpus().length,
  cpu_model: Os.cpus()[0]?.model ?? "unknown",
  total_memory_bytes: Os.totalmem(),
  load_average_at_start: Os.loadavg().map((x) => round(x, 2))
})

/** Write a result file under bench/results. */
export const writeResult = (name: string, result: unknown): string => {
  const dir = Path.join(Path.dirname(new URL(import.meta.url).pathname), "..", "results")
  Fs.mkdirSync(dir, { recursive: true })
  const file = Path.join(dir, `${name}.json`)
  Fs.writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`)
  return file
}

/** Sleep in a promise. */
export const sleep = (millis: number) => new Promise<void>((r) => setTimeout(r, millis))

// --- CPU accounting (Linux /proc; zeros elsewhere) ---

const clockTicks = 100

const readStat = (pid: string): { ppid: number; ticks: number; childTicks: number } | undefined => {
  try {
    const text = Fs.readFileSync(`/proc/${pid}/stat`, "utf8")
    const rest = text.slice(text.lastIndexOf(")") + 2).split(" ")
    // rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
    return {
      ppid: Number(rest[1]),
      ticks: Number(rest[11]) + Number(rest[12]),
      childTicks: Number(rest[13]) + Number(rest[14])
    }
  } catch {
    return undefined
  }
}

/** User + system CPU seconds of a live process (NaN without a pid or without /proc). */
export const processCpuSeconds = (pid: number | undefined): number => {
  const stat = pid === undefined ? undefined : readStat(String(pid))
  return stat === undefined ? Number.NaN : stat.ticks / clockTicks
}

/**
 * CPU seconds used so far by a server process and its children (backends, autovacuum
 * workers): the live children's own time plus, through the server's cutime/cstime, the time
 * of children that have exited.
 */
const serverCpuSeconds = (serverPid: number | undefined): number => {
  if (serverPid === undefined) return Number.NaN
  const server = readStat(String(serverPid))
  if (server === undefined) return Number.NaN
  let ticks = server.ticks + server.childTicks
  let dirs: Array<string>
  try {
    dirs = Fs.readdirSync("/proc").filter((d) => /^\d+$/.test(d))
  } catch {
    return Number.NaN
  }
  for (const d of dirs) {
    const s = readStat(d)
    if (s && s.ppid === serverPid) ticks += s.ticks
  }
  return ticks / clockTicks
}

/** Busy and total CPU seconds of the whole machine, and steal. */
const machineCpuSeconds = () => {
  try {
    const f = Fs.readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number)
    const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f
    const busy = user + nice + system + irq + softirq
    return {
      busy: busy / clockTicks,
      total: (busy + idle + iowait + steal) / clockTicks,
      steal: steal / clockTicks
    }
  } catch {
    return { busy: Number.NaN, total: Number.NaN, steal: Number.NaN }
  }
}

/** CPU use over a window: this process and the Postgres server in % of one core, the machine in % of all cores. */
export interface CpuUse {
  readonly wall_s: number
  readonly process_pct_of_core: number
  readonly postgres_pct_of_core: number
  readonly machine_busy_pct: number
  readonly machine_steal_pct: number
  /** What the rest of the machine used meanwhile (other processes), in % of one core. */
  readonly others_pct_of_core: number
}

/** Start measuring; the returned function ends the window. */
export const cpuMeter = (serverPid: number | undefined): (() => CpuUse) => {
  const wall = performance.now()
  const proc = process.cpuUsage()
  const pgCpu = serverCpuSeconds(serverPid)
  const m = machineCpuSeconds()
  return () => {
    const seconds = (performance.now() - wall) / 1000
    const p = process.cpuUsage(proc)
    const m2 = machineCpuSeconds()
    const total = m2.total - m.total
    const processPct = ((p.user + p.system) / 1e6 / seconds) * 100
    const postgresPct = ((serverCpuSeconds(serverPid) - pgCpu) / seconds) * 100
    const machinePct = ((m2.busy - m.busy) / total) * 100
    return {
      wall_s: round(seconds, 2),
      process_pct_of_core: round(processPct, 1),
      postgres_pct_of_core: round(postgresPct, 1),
      machine_busy_pct: round(machinePct, 1),
      machine_steal_pct: round(((m2.steal - m.steal) / total) * 100, 1),
      others_pct_of_core: round(
        (machinePct / 100) * Os.cpus().length * 100 - processPct - (postgresPct || 0),
        1
      )
    }
  }
}
