/**
 * A fixed-bucket histogram in the Prometheus sense: a count per bucket, a sum and a count,
 * kept in preallocated typed arrays, so observing a value allocates nothing (it sits on the
 * routing path). Rendered in the Prometheus text format 0.0.4 with cumulative buckets.
 */

/** A histogram with fixed upper bounds (a `+Inf` bucket is implicit). */
export interface Histogram {
  /** The finite upper bounds, ascending. */
  readonly bounds: ReadonlyArray<number>
  /** Record one value (NaN is ignored). */
  readonly observe: (value: number) => void
  /** Cumulative counts per bucket (the last one is `+Inf`, equal to `count`), the sum and the count. */
  readonly snapshot: () => Snapshot
}

/** A histogram's state at one moment. */
export interface Snapshot {
  readonly bounds: ReadonlyArray<number>
  readonly cumulative: ReadonlyArray<number>
  readonly sum: number
  readonly count: number
}

/** Create a histogram with these finite upper bounds (ascending). */
export const make = (bounds: ReadonlyArray<number>): Histogram => {
  const upper = Float64Array.from(bounds)
  const n = upper.length
  const counts = new Float64Array(n + 1)
  // [sum, count] in one array, so `observe` touches no object field.
  const totals = new Float64Array(2)
  const observe = (value: number) => {
    if (Number.isNaN(value)) return
    let i = 0
    while (i < n && value > upper[i]!) i++
    counts[i]!++
    totals[0]! += value
    totals[1]!++
  }
  const snapshot = (): Snapshot => {
    const cumulative = new Array<number>(n + 1)
    let acc = 0
    for (let i = 0; i <= n; i++) {
      acc += counts[i]!
      cumulative[i] = acc
    }
    return { bounds: [...bounds], cumulative, sum: totals[0]!, count: totals[1]! }
  }
  return { bounds: [...bounds], observe, snapshot }
}

/** The histogram's series in the Prometheus text format: `# HELP`, `# TYPE`, `_bucket`, `_sum`, `_count`. */
export const render = (name: string, help: string, histogram: Histogram): string => {
  const s = histogram.snapshot()
  const lines = [`# HELP ${name} ${help}`, `# TYPE ${name} histogram`]
  for (const [i, le] of s.bounds.entries()) lines.push(`${name}_bucket{le="${le}"} ${s.cumulative[i]}`)
  lines.push(`${name}_bucket{le="+Inf"} ${s.cumulative[s.bounds.length]}`)
  lines.push(`${name}_sum ${s.sum}`, `${name}_count ${s.count}`)
  return `${lines.join("\n")}\n`
}

/**
 * Routing latency in seconds, process-wide: every node of this process observes the round
 * trip of each ask it sends (the `ask` call's send → the reply dispatched back to it), that
 * is two deliveries through the mailbox plus the receiving handler's time. Rows carry no
 * send time on the NOTIFY fast path, so one-way delivery cannot be measured without a
 * second clock; the ask's round trip is timed on this process's monotonic clock alone. Asks
 * that time out are not observed. `GET /metrics` serves it as `troupe_routing_latency_seconds`.
 */
export const routingLatency: Histogram = make([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1])
