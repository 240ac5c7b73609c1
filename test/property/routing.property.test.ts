import { describe, expect, layer } from "@effect/vitest"
import type { SqlClient } from "@effect/sql"
import { Effect, Exit, Scope } from "effect"
import fc from "fast-check"
import type { DatabaseUrls } from "../../src/runtime/db/Database.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import { Counter } from "../fixtures/Actors.ts"
import * as Db from "../fixtures/Db.ts"
import {
  awaitMailboxEmpty,
  awaitRecorded,
  checkExactlyOnceInOrder,
  killListener,
  sendSequence
} from "../fixtures/Delivery.ts"

type Step =
  | {
      readonly _tag: "Tell"
      readonly node: number
      readonly sender: number
      readonly actor: number
      readonly count: number
    }
  | { readonly _tag: "KillListener"; readonly node: number }
  | { readonly _tag: "RestartNode"; readonly node: number }

const NODES = 3
const ACTORS = 7
const SENDERS = 3

const step: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      _tag: fc.constant("Tell" as const),
      node: fc.nat(NODES - 1),
      sender: fc.nat(SENDERS - 1),
      actor: fc.nat(ACTORS - 1),
      count: fc.integer({ min: 1, max: 25 })
    })
  },
  {
    weight: 2,
    arbitrary: fc.record({ _tag: fc.constant("KillListener" as const), node: fc.nat(NODES - 1) })
  },
  { weight: 1, arbitrary: fc.record({ _tag: fc.constant("RestartNode" as const), node: fc.nat(NODES - 1) }) }
)

let runs = 0

/** Run one schedule on three fresh nodes; resolve to the list of violations (empty when all is well). */
const runSchedule = (steps: ReadonlyArray<Step>) =>
  Effect.gen(function* () {
    const run = `r${++runs}-${Date.now().toString(36)}`
    const nodeIds = Array.from({ length: NODES }, (_, i) => `${run}-n${i}`)
    const start = (i: number) =>
      Effect.gen(function* () {
        const scope = yield* Scope.make()
        const node = yield* Node.make({
          nodeId: nodeIds[i]!,
          actors: [Counter],
          pollInterval: "2 seconds"
        }).pipe(Scope.extend(scope))
        return { scope, node }
      })
    const nodes = yield* Effect.forEach(nodeIds, (_, i) => start(i))
    yield* Effect.addFinalizer(() =>
      Effect.forEach(nodes, (n) => Scope.close(n.scope, Exit.void), { discard: true })
    )
    // Actors spread over the nodes.
    const actorKeys = Array.from({ length: ACTORS }, (_, j) => `${run}-a${j}`)
    for (let j = 0; j < ACTORS; j++) yield* nodes[j % NODES]!.node.spawn(Counter, actorKeys[j]!)

    const expected = new Map<string, Map<string, Array<number>>>(
      actorKeys.map((k) => [Counter.id(k), new Map()])
    )
    const nextSeq = new Map<string, number>()
    let total = 0
    for (const s of steps) {
      switch (s._tag) {
        case "Tell": {
          const sender = `${nodeIds[s.node]}/s${s.sender}`
          const from = nextSeq.get(sender) ?? 0
          nextSeq.set(sender, from + s.count)
          const byActor = expected.get(Counter.id(actorKeys[s.actor]!))!
          const seqs = byActor.get(sender) ?? []
          for (let q = from; q < from + s.count; q++) seqs.push(q)
          byActor.set(sender, seqs)
          total += s.count
          yield* sendSequence(nodes[s.node]!.node, sender, actorKeys[s.actor]!, from, s.count)
          break
        }
        case "KillListener":
          yield* killListener(nodeIds[s.node]!)
          break
        case "RestartNode": {
          yield* Scope.close(nodes[s.node]!.scope, Exit.void)
          nodes[s.node] = yield* start(s.node)
          break
        }
      }
    }
    yield* awaitRecorded([...expected.keys()], total, "30 seconds")
    yield* awaitMailboxEmpty
    return checkExactlyOnceInOrder(expected)
  }).pipe(Effect.scoped)

describe("routing property", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "random tells among 3 nodes and 7 actors, with listener kills and node restarts: each message handled once, FIFO per sender→receiver",
      () =>
        Effect.gen(function* () {
          const ctx = yield* Effect.context<SqlClient.SqlClient | DatabaseUrls>()
          const seed = Number(process.env.TROUPE_PROPERTY_SEED ?? Date.now() % 2 ** 31)
          const result = yield* Effect.promise(() =>
            fc.check(
              fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 30 }), async (steps) => {
                const problems = await Effect.runPromise(runSchedule(steps).pipe(Effect.provide(ctx)))
                if (problems.length > 0) throw new Error(problems.join("\n"))
              }),
              { numRuns: Number(process.env.TROUPE_PROPERTY_RUNS ?? 12), seed, endOnFailure: true }
            )
          )
          if (result.failed) {
            console.error(
              `routing property failed with seed ${seed} (rerun with TROUPE_PROPERTY_SEED=${seed})`
            )
            console.error(fc.defaultReportMessage(result))
          }
          expect(result.failed, `seed ${seed}`).toBe(false)
        })
    )
  })
})
