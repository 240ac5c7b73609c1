import { describe, expect, it, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect, Exit, Fiber, Layer, Schedule, Scope } from "effect"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Database from "../../src/runtime/db/Database.ts"
import * as EmbeddedPostgres from "../../src/runtime/db/EmbeddedPostgres.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import { Counter, SlowRecord, recorded } from "../fixtures/Actors.ts"
import * as Db from "../fixtures/Db.ts"
import {
  awaitMailboxEmpty,
  awaitRecorded,
  checkExactlyOnceInOrder,
  killListener,
  sendSequence
} from "../fixtures/Delivery.ts"

/** Expected (sender → actor → seqs) when each sender sends `count` messages round-robin over `actors`. */
const roundRobin = (senders: ReadonlyArray<string>, actors: ReadonlyArray<string>, count: number) => {
  const expected = new Map<string, Map<string, Array<number>>>()
  for (const a of actors) expected.set(Counter.id(a), new Map(senders.map((s) => [s, []])))
  for (const s of senders)
    for (let seq = 0; seq < count; seq++)
      expected
        .get(Counter.id(actors[seq % actors.length]!))!
        .get(s)!
        .push(seq)
  return expected
}

/** Each sender sends `count` messages round-robin over the actors, one at a time. */
const sendRoundRobin = (
  node: Node.TroupeNode,
  sender: string,
  actors: ReadonlyArray<string>,
  count: number
) =>
  Effect.gen(function* () {
    for (let seq = 0; seq < count; seq++)
      yield* sendSequence(node, sender, actors[seq % actors.length]!, seq, 1)
  })

describe("delivery survives blips", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "10,000 messages while the listener's backend is killed again and again: each handled once, in per-sender order",
      () =>
        Effect.gen(function* () {
          const a = yield* Node.make({ nodeId: "kill-a", actors: [Counter] })
          const b = yield* Node.make({ nodeId: "kill-b", actors: [Counter], pollInterval: "30 seconds" })
          const actors = Array.from({ length: 20 }, (_, i) => `kill-${i}`)
          yield* b.spawnMany(Counter, actors)
          const senders = Array.from({ length: 10 }, (_, i) => `sender-${i}`)
          let kills = 0
          const killer = yield* killListener("kill-b").pipe(
            Effect.tap((n) => Effect.sync(() => (kills += n))),
            Effect.repeat(Schedule.spaced("40 millis")),
            Effect.fork
          )
          yield* Effect.forEach(senders, (s) => sendRoundRobin(a, s, actors, 1000), {
            concurrency: "unbounded",
            discard: true
          })
          yield* Fiber.interrupt(killer)
          yield* awaitRecorded(actors.map(Counter.id), 10_000)
          expect(checkExactlyOnceInOrder(roundRobin(senders, actors, 1000))).toEqual([])
          expect(kills).toBeGreaterThanOrEqual(3)
          expect(b.stats().listenerConnections).toBeGreaterThan(kills / 2)
          yield* awaitMailboxEmpty
        })
    )

    it.scoped(
      "a node stopped with messages pending gets them when it starts again; a graceful stop finishes what is in flight",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const a = yield* Node.make({ nodeId: "pend-a", actors: [Counter] })
          const startB = Effect.gen(function* () {
            const scope = yield* Scope.make()
            const node = yield* Node.make({ nodeId: "pend-b", actors: [Counter] }).pipe(Scope.extend(scope))
            return { scope, node }
          })
          let b = yield* startB
          yield* b.node.spawnMany(Counter, ["pend-1", "pend-2"])
          yield* Scope.close(b.scope, Exit.void)
          // pend-b is down: these are committed and wait in the table.
          yield* Effect.forEach(["s1", "s2"], (s) => sendRoundRobin(a, s, ["pend-1", "pend-2"], 100), {
            concurrency: 2,
            discard: true
          })
          const [waiting] = yield* sql<{
            n: string
          }>`SELECT count(*)::text AS n FROM actor_mailbox WHERE node_id = 'pend-b'`
          expect(Number(waiting!.n)).toBe(200)
          b = yield* startB
          yield* awaitRecorded(["counter:pend-1", "counter:pend-2"], 200)
          expect(checkExactlyOnceInOrder(roundRobin(["s1", "s2"], ["pend-1", "pend-2"], 100))).toEqual([])

          // A graceful stop while a slow handler runs: it finishes, the rest stays in the table.
          const slow = a.ref(Counter, "pend-1")
          for (let seq = 0; seq < 20; seq++) yield* slow.tell(new SlowRecord({ from: "slow", seq, ms: 40 }))
          const slowSeen = () => (recorded.get("counter:pend-1") ?? []).filter(([f]) => f === "slow").length
          yield* Effect.sync(slowSeen).pipe(
            Effect.repeat({ schedule: Schedule.spaced("5 millis"), until: (n) => n >= 1 })
          )
          yield* Scope.close(b.scope, Exit.void)
          const handledBeforeStop = slowSeen()
          expect(handledBeforeStop).toBeGreaterThanOrEqual(1)
          expect(handledBeforeStop).toBeLessThan(20)
          const [left] = yield* sql<{ n: string; claimed: string }>`
          SELECT count(*)::text AS n, count(claim)::text AS claimed FROM actor_mailbox WHERE node_id = 'pend-b'`
          expect(Number(left!.n)).toBe(20 - handledBeforeStop)
          expect(Number(left!.claimed)).toBe(0)
          b = yield* startB
          const expected = new Map([
            ["counter:pend-1", new Map([["slow", Array.from({ length: 20 }, (_, i) => i)]])]
          ])
          yield* Effect.sync(slowSeen).pipe(
            Effect.repeat({ schedule: Schedule.spaced("20 millis"), until: (n) => n >= 20 }),
            Effect.timeout("20 seconds")
          )
          const slowOnly = new Map([["counter:pend-1", expected.get("counter:pend-1")!]])
          const log = (recorded.get("counter:pend-1") ?? []).filter(([f]) => f === "slow").map(([, s]) => s)
          expect(log).toEqual(slowOnly.get("counter:pend-1")!.get("slow"))
          yield* Scope.close(b.scope, Exit.void)
        })
    )
  })
})

describe("Postgres stopped and started mid-stream", () => {
  it.scopedLive("the nodes reconnect and lose nothing that was committed", () =>
    Effect.gen(function* () {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-restart-"))
      Fs.chmodSync(dir, 0o755)
      yield* Effect.addFinalizer(() => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true })))
      const server = yield* EmbeddedPostgres.start({ dataDir: Path.join(dir, "pg"), profile: "test" })
      const ctx = yield* Layer.build(
        Database.layerClient({ maxConnections: 8 }).pipe(
          Layer.provideMerge(Database.layerUrlsFixed(server.url))
        )
      )
      yield* Effect.gen(function* () {
        const a = yield* Node.make({ nodeId: "pg-a", actors: [Counter] })
        const b = yield* Node.make({ nodeId: "pg-b", actors: [Counter] })
        const actors = ["pg-1", "pg-2", "pg-3"]
        yield* b.spawnMany(Counter, actors)
        const senders = ["p1", "p2", "p3"]
        const sending = yield* Effect.forEach(senders, (s) => sendRoundRobin(a, s, actors, 600), {
          concurrency: "unbounded",
          discard: true
        }).pipe(Effect.fork)
        yield* awaitRecorded(actors.map(Counter.id), 300)
        yield* server.stop
        // The outage itself (not a synchronisation): the server stays down a while.
        yield* Effect.sleep("1 second")
        yield* server.restart
        yield* Fiber.join(sending)
        yield* awaitRecorded(actors.map(Counter.id), 1800)
        expect(checkExactlyOnceInOrder(roundRobin(senders, actors, 600))).toEqual([])
        expect(b.stats().listenerConnections).toBeGreaterThanOrEqual(2)
        yield* awaitMailboxEmpty
      }).pipe(Effect.provide(ctx))
    })
  )
})
