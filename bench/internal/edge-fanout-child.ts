/**
 * The fan-out part of the edge benchmark in a process of its own, so the 1,000 client
 * sockets do not share the gateway's event loop (they would not in production). Started by
 * bench/edge.ts; the writer is in this process too, so receipt and commit times are on one
 * `performance.now()` clock.
 *
 * Input: TROUPE_BENCH_FANOUT, the `FanoutOptions` as JSON. Output: IPC messages
 * `{ phase: "writing" }` and `{ phase: "written" }` around the measured window, then `{ result }`
 * or `{ error }`; progress lines on stdout.
 */
import { type FanoutOptions, runFanout } from "./edge-ws.ts"
import { progress } from "./stats.ts"

const options: FanoutOptions = JSON.parse(process.env.TROUPE_BENCH_FANOUT ?? "null")
if (options === null)
  throw new Error("TROUPE_BENCH_FANOUT is not set: this script is started by bench/edge.ts")

try {
  const result = await runFanout(options, (line) => progress(`[clients] ${line.trimStart()}`), {
    writing: () => process.send?.({ phase: "writing" }),
    written: () => process.send?.({ phase: "written" })
  })
  process.send?.({ result })
} catch (e) {
  process.send?.({ error: e instanceof Error ? (e.stack ?? e.message) : String(e) })
}
process.disconnect?.()
