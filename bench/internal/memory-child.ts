/**
 * The memory part of the routing benchmark, in a process of its own (started by
 * bench/routing.ts with `--expose-gc`) so that its RSS holds nothing but one node.
 *
 * 1. A node with the `tiny` kind; a warm-up of 2,000 activated actors (so code and
 *    one-time structures are in place), gc, RSS.
 * 2. `spawnMany(Tiny, 100,000 keys, { activate: true })`: actors in memory, idle. gc, RSS.
 * 3. `spawnMany(Tiny, 50,000 keys)` without `activate`: registered, not in memory — but
 *    `ActorRegistry.place` remembers every placement in the node's registry cache. gc, RSS.
 * 4. 1,000,000 more registered on this node by direct SQL in batches (passivated: rows in
 *    `actor_registry` only). gc, RSS. Then one message to one of them, to show it is real.
 *
 * Input: TROUPE_BENCH_URL (and optionally TROUPE_BENCH_ACTIVE, TROUPE_BENCH_SPAWNMANY_PASSIVE,
 * TROUPE_BENCH_PASSIVATED; TROUPE_BENCH_VERBOSE=1 prints V8 heap spaces at each snapshot).
 * Output: one IPC message with the measurements.
 */

import * as v8 from "node:v8"
import { SqlClient } from "@effect/sql"
import { Effect, Layer, Schedule } from "effect"
import * as Node from "../../src/runtime/core/Node.ts"
import { Tiny, Touch } from "./actors.ts"
import { clientLayer } from "./db.ts"

const url = process.env.TROUPE_BENCH_URL
const active = Number(process.env.TROUPE_BENCH_ACTIVE ?? 100_000)
const viaSpawnMany = Number(process.env.TROUPE_BENCH_SPAWNMANY_PASSIVE ?? 50_000)
const passivated = Number(process.env.TROUPE_BENCH_PASSIVATED ?? 1_000_000)
const insertBatch = 50_000
const warmup = 2_000

const gc = (globalThis as { gc?: () => void }).gc
const t0 = performance.now()
const say = (line: string) =>
  console.log(`[${((performance.now() - t0) / 1000).toFixed(1).padStart(6)}s]   memory: ${line}`)

interface Snapshot {
  readonly rss: number
  readonly heapUsed: number
  readonly heapTotal: number
  readonly external: number
}

/** Collect until the heap stops shrinking, then read the process' memory. */
const settle = Effect.promise(async (): Promise<Snapshot> => {
  let last = Number.POSITIVE_INFINITY
  for (let i = 0; i < 8; i++) {
    gc!()
    await new Promise((r) => setTimeout(r, 50))
    const used = process.memoryUsage().heapUsed
    if (i >= 2 && used >= last * 0.995) break
    last = used
  }
  const m = process.memoryUsage()
  if (process.env.TROUPE_BENCH_VERBOSE) {
    const spaces = v8
      .getHeapSpaceStatistics()
      .map((s) => `${s.space_name}=${(s.space_size / 1048576).toFixed(1)}`)
    say(
      `rss ${mb(m.rss)} heapTotal ${mb(m.heapTotal)} heapUsed ${mb(m.heapUsed)} external ${mb(m.external)} arrayBuffers ${mb(m.arrayBuffers)} | ${spaces.join(" ")}`
    )
  }
  return { rss: m.rss, heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external }
})

const keys = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => `${prefix}-${i}`)

const mb = (b: number) => `${(b / 1024 / 1024).toFixed(1)} MB`

const program = Effect.gen(function* () {
  const ctx = yield* Layer.build(clientLayer(url!, { applicationName: "bench-memory", maxConnections: 4 }))
  const sql = yield* Effect.provide(SqlClient.SqlClient, ctx)
  const node = yield* Node.make({ nodeId: "bench-mem", actors: [Tiny] }).pipe(Effect.provide(ctx))

  yield* node.spawnMany(Tiny, keys("warm", warmup), { activate: true })
  const before = yield* settle
  say(`node up, ${warmup} warm-up actors; rss ${mb(before.rss)}, heap ${mb(before.heapUsed)}`)

  let t = performance.now()
  yield* node.spawnMany(Tiny, keys("a", active), { activate: true })
  const spawnActiveMs = performance.now() - t
  const afterActive = yield* settle
  const inMemory = node.stats().actorsInMemory
  say(
    `${active.toLocaleString("en-US")} activated in ${(spawnActiveMs / 1000).toFixed(1)} s (${inMemory.toLocaleString("en-US")} in memory); rss ${mb(afterActive.rss)} (+${mb(afterActive.rss - before.rss)})`
  )

  t = performance.now()
  yield* node.spawnMany(Tiny, keys("s", viaSpawnMany))
  const spawnPassiveMs = performance.now() - t
  // The same pause as before the next snapshot, so that both are taken in the same state.
  yield* Effect.sleep("1 second")
  const afterSpawnMany = yield* settle
  say(
    `${viaSpawnMany.toLocaleString("en-US")} registered with spawnMany (no activate) in ${(spawnPassiveMs / 1000).toFixed(1)} s; rss ${mb(afterSpawnMany.rss)} (+${mb(afterSpawnMany.rss - afterActive.rss)}), in memory ${node.stats().actorsInMemory.toLocaleString("en-US")}`
  )

  t = performance.now()
  for (let from = 0; from < passivated; from += insertBatch) {
    const to = Math.min(passivated, from + insertBatch) - 1
    yield* sql`
      INSERT INTO actor_registry (actor_id, kind, node_id)
      SELECT 'tiny:p-' || g, 'tiny', 'bench-mem' FROM generate_series(${from}::int, ${to}::int) g`
  }
  const insertMs = performance.now() - t
  // Give the node time for a fallback poll and a few heartbeats with the rows in place.
  yield* Effect.sleep("1 second")
  const afterPassivated = yield* settle
  say(
    `${passivated.toLocaleString("en-US")} registered by SQL in ${(insertMs / 1000).toFixed(1)} s; rss ${mb(afterPassivated.rss)} (${afterPassivated.rss >= afterSpawnMany.rss ? "+" : "-"}${mb(Math.abs(afterPassivated.rss - afterSpawnMany.rss))}), in memory ${node.stats().actorsInMemory.toLocaleString("en-US")}`
  )

  // A passivated actor is real: a message activates it.
  const handledBefore = node.stats().handled
  yield* node.ref(Tiny, `p-${passivated - 1}`).tell(new Touch())
  yield* Effect.sync(() => node.stats().handled).pipe(
    Effect.repeat({ schedule: Schedule.spaced("10 millis"), until: (n) => n > handledBefore }),
    Effect.timeout("10 seconds")
  )
  const registered = yield* sql<{
    n: string
  }>`SELECT count(*)::text AS n FROM actor_registry WHERE node_id = 'bench-mem'`

  return {
    active_actors: active,
    warmup_actors: warmup,
    spawnmany_passivated_actors: viaSpawnMany,
    sql_passivated_actors: passivated,
    registered_on_node: Number(registered[0]!.n),
    actors_in_memory_after_active: inMemory,
    actors_in_memory_after_passivated: node.stats().actorsInMemory - 1,
    passivated_message_handled: node.stats().handled > handledBefore,
    spawn_active_ms: spawnActiveMs,
    spawnmany_passivated_ms: spawnPassiveMs,
    sql_insert_ms: insertMs,
    snapshots: { before, afterActive, afterSpawnMany, afterPassivated }
  }
}).pipe(Effect.scoped)

if (!gc || !url) {
  console.error("memory-child: run with --expose-gc and TROUPE_BENCH_URL set (bench/routing.ts does)")
  process.exit(2)
}
const result = await Effect.runPromise(program)
process.send?.(result)
process.disconnect?.()
