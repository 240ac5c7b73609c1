/**
 * The worker node of the edge benchmark in a process of its own (as in production: the
 * gateway's event loop does not run the worker's claims and handlers). Started by
 * bench/edge.ts.
 *
 * Input: TROUPE_BENCH_URL (the benchmark database), TROUPE_BENCH_WORKER_ID. Handlers: `noop`,
 * and `hold` (`{ seq }`), which blocks until interrupted. Output, over IPC: `{ ready: true }`
 * once the worker is registered; `{ entered: seq, at }` when a `hold` handler starts and
 * `{ interrupted: seq, at }` when it is interrupted, `at` in epoch milliseconds with
 * sub-millisecond resolution (`performance.timeOrigin + performance.now()`), comparable
 * across processes on one machine. SIGTERM stops it gracefully.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Schema } from "effect"
import * as JobHandler from "../../src/runtime/jobs/JobHandler.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Worker from "../../src/actors/WorkerActor.ts"
import { clientLayer } from "./db.ts"

const url = process.env.TROUPE_BENCH_URL
const workerId = process.env.TROUPE_BENCH_WORKER_ID
if (url === undefined || workerId === undefined)
  throw new Error(
    "TROUPE_BENCH_URL and TROUPE_BENCH_WORKER_ID are not set: this script is started by bench/edge.ts"
  )

const now = () => performance.timeOrigin + performance.now()
const tell = (message: Record<string, unknown>) => Effect.sync(() => process.send?.(message))

const Seq = Schema.Struct({ seq: Schema.Number })

const handlers = JobHandler.handlers({
  noop: Effect.succeed({ ok: true }),
  hold: Effect.gen(function* () {
    const { seq } = yield* JobHandler.payload(Seq)
    yield* tell({ entered: seq, at: now() })
    return yield* Effect.never.pipe(Effect.onInterrupt(() => tell({ interrupted: seq, at: now() })))
  })
})

Effect.gen(function* () {
  const node = yield* Node.make({ nodeId: `${workerId}-node`, role: "worker" })
  yield* Worker.make(node, { workerId, maxConcurrent: 1, handlers })
  yield* tell({ ready: true })
  return yield* Effect.never
}).pipe(
  Effect.scoped,
  Effect.provide(clientLayer(url, { applicationName: `bench-edge-worker:${workerId}`, maxConnections: 16 })),
  NodeRuntime.runMain
)
