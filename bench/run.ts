/**
 * `npm run bench -- <name> [args…]`: run one benchmark (bench/<name>.ts's exported `main`).
 */

/** Each benchmark's module; every one exports `main(args)`. */
const benchmarks: Record<
  string,
  {
    readonly description: string
    readonly load: () => Promise<{ main: (args: ReadonlyArray<string>) => Promise<void> }>
  }
> = {
  routing: {
    description: "cross-node tell latency and throughput, raw NOTIFY baselines, memory per actor",
    load: () => import("./routing.ts")
  },
  jobs: {
    description: "job pickup latency and throughput vs pg-boss and graphile-worker",
    load: () => import("./jobs.ts")
  },
  edge: {
    description: "WebSocket submit and cancel latency, event fan-out to 1,000 subscribers",
    load: () => import("./edge.ts")
  },
  browser: {
    description: "recipe overhead vs plain Playwright, session start, cancel, resume, RSS per context, jobs/min",
    load: () => import("./browser.ts")
  }
}

const usage = () => {
  const names = Object.entries(benchmarks).map(([name, b]) => `  ${name.padEnd(10)} ${b.description}`)
  console.error(
    [
      "usage: npm run bench -- <name> [args…]",
      "",
      "benchmarks:",
      ...names,
      "",
      "Uses DATABASE_URL when set (a fresh database troupe_bench_<pid> is created on that server",
      "and dropped afterwards), otherwise an embedded Postgres in a temporary directory.",
      "Results are written to bench/results/<name>.json."
    ].join("\n")
  )
}

const [name, ...rest] = process.argv.slice(2)
const bench = name === undefined ? undefined : benchmarks[name]
if (bench === undefined) {
  if (name !== undefined && name !== "--help" && name !== "-h") console.error(`unknown benchmark "${name}"\n`)
  usage()
  process.exitCode = name === "--help" || name === "-h" ? 0 : 2
} else {
  try {
    const mod = await bench.load()
    await mod.main(rest)
  } catch (e) {
    console.error(`benchmark ${name} failed:`, e)
    process.exitCode = 1
  }
}
