import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { ConfigProvider, Effect, Schedule } from "effect"
import * as Node from "../../src/runtime/core/Node.ts"
import { NodeIdInUse } from "../../src/runtime/core/NodeMembership.ts"
import * as Db from "../fixtures/Db.ts"
import {
  Add,
  AddCapped,
  Boom,
  Counter,
  Get,
  Hold,
  Sleepy,
  Tiny,
  TooBig,
  activations,
  gate
} from "../fixtures/Actors.ts"

describe("tell and ask between two nodes in one process", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("a tell from node a reaches an actor on node b, and an ask gets its reply", () =>
      Effect.gen(function* () {
        const a = yield* Node.make({ nodeId: "a", actors: [Counter] })
        const b = yield* Node.make({ nodeId: "b", actors: [Counter] })
        yield* b.spawn(Counter, "c1")
        const ref = a.ref(Counter, "c1")
        yield* ref.tell(new Add({ n: 2 }))
        yield* ref.tell(new Add({ n: 3 }))
        expect(yield* ref.ask(new Get())).toBe(5)
        expect(b.stats().handled).toBe(3)
        expect(a.stats().handled).toBe(0)
      })
    )

    it.scoped("a typed failure of the handler reaches the asker as that failure", () =>
      Effect.gen(function* () {
        const a = yield* Node.make({ nodeId: "a2", actors: [Counter] })
        const b = yield* Node.make({ nodeId: "b2", actors: [Counter] })
        const ref = yield* b.spawn(Counter, "capped")
        const remote = a.ref(Counter, "capped")
        expect(yield* remote.ask(new AddCapped({ n: 5, limit: 10 }))).toBe(5)
        const refused = yield* Effect.flip(remote.ask(new AddCapped({ n: 6, limit: 10 })))
        expect(refused).toBeInstanceOf(TooBig)
        expect(refused).toMatchObject({ _tag: "TooBig", limit: 10 })
        expect(yield* ref.ask(new Get())).toBe(5)
      })
    )

    it.scoped("an unknown actor id yields ActorNotFound for tell and ask", () =>
      Effect.gen(function* () {
        const a = yield* Node.make({ nodeId: "a3", actors: [Counter] })
        const ref = a.ref(Counter, "nobody")
        const told = yield* Effect.flip(ref.tell(new Add({ n: 1 })))
        expect(told._tag).toBe("ActorNotFound")
        expect(told.message).toContain("counter:nobody")
        const asked = yield* Effect.flip(ref.ask(new Get()))
        expect(asked._tag).toBe("ActorNotFound")
      })
    )

    it.scoped(
      "a malformed message goes to dead letters, the asker gets MalformedMessage, the actor keeps running",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const a = yield* Node.make({ nodeId: "a4", actors: [Counter] })
          const b = yield* Node.make({ nodeId: "b4", actors: [Counter] })
          const ref = yield* b.spawn(Counter, "m")
          yield* ref.tell(new Add({ n: 7 }))
          const error = yield* Effect.flip(
            a.askRaw(ref.id, { _tag: "Add", n: "seven" }, { timeout: "10 seconds" })
          )
          expect(error._tag).toBe("MalformedMessage")
          expect(error.message).toContain("Expected number")
          yield* a.tellRaw(ref.id, { _tag: "NoSuchMessage" })
          expect(yield* a.ref(Counter, "m").ask(new Get())).toBe(7)
          const letters = yield* sql<{ error_tag: string; body: unknown }>`
          SELECT error_tag, body FROM actor_dead_letters WHERE actor_id = ${ref.id} ORDER BY id`
          expect(letters.map((l) => l.error_tag)).toEqual(["MalformedMessage", "MalformedMessage"])
          expect(letters[0]!.body).toEqual({ _tag: "Add", n: "seven" })
        })
    )

    it.scoped(
      "a handler that dies is restarted; past the limit the actor is marked failed and the event written",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const a = yield* Node.make({ nodeId: "a5", actors: [Counter] })
          const b = yield* Node.make({ nodeId: "b5", actors: [Counter] })
          const ref = yield* b.spawn(Counter, "fragile")
          const remote = a.ref(Counter, "fragile")
          yield* remote.tell(new Add({ n: 1 }))
          const crash = yield* Effect.flip(remote.ask(new Boom()))
          expect(crash._tag).toBe("ActorFailed")
          expect(crash.message).toContain("boom on purpose")
          // Restarted: state rebuilt from scratch, the actor answers again.
          expect(yield* remote.ask(new Get())).toBe(0)
          expect(activations.get(ref.id)).toBe(2)
          yield* Effect.flip(remote.ask(new Boom()))
          yield* Effect.flip(remote.ask(new Boom()))
          const failed = yield* Effect.flip(remote.ask(new Get()))
          expect(failed._tag).toBe("ActorFailed")
          expect(failed.message).toContain("marked failed")
          const [reg] = yield* sql<{
            status: string
          }>`SELECT status FROM actor_registry WHERE actor_id = ${ref.id}`
          expect(reg!.status).toBe("failed")
          const events = yield* sql<{ event_type: string }>`
          SELECT event_type FROM actor_events WHERE actor_id = ${ref.id} ORDER BY id`
          expect(events.map((e) => e.event_type)).toEqual([
            "actor_restarted",
            "actor_restarted",
            "actor_failed"
          ])
          // Spawning again resets it.
          yield* b.spawn(Counter, "fragile")
          expect(yield* remote.ask(new Get())).toBe(0)
        })
    )

    it.scoped("past its capacity, a message goes to dead letters and the asker gets MailboxFull", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const a = yield* Node.make({ nodeId: "a7", actors: [Tiny] })
        const b = yield* Node.make({ nodeId: "b7", actors: [Tiny] })
        yield* b.spawn(Tiny, "t")
        const ref = a.ref(Tiny, "t")
        const g = yield* gate("tiny")
        yield* ref.tell(new Hold({ gate: "tiny" }))
        yield* g.entered
        yield* ref.tell(new Add({ n: 1 })) // fills the one place in the queue
        const full = yield* Effect.flip(ref.ask(new Get()))
        expect(full._tag).toBe("MailboxFull")
        expect(full.message).toContain("capacity")
        yield* g.open
        expect(yield* ref.ask(new Get())).toBe(1)
        const letters = yield* sql<{
          error_tag: string
        }>`SELECT error_tag FROM actor_dead_letters WHERE actor_id = 'tiny:t'`
        expect(letters.map((l) => l.error_tag)).toEqual(["MailboxFull"])
      })
    )

    it.scoped("a second node with the id of a running one is refused, and the first keeps working", () =>
      Effect.gen(function* () {
        const first = yield* Node.make({ nodeId: "twin", actors: [Counter] })
        const refused = yield* Effect.flip(Effect.scoped(Node.make({ nodeId: "twin", actors: [Counter] })))
        expect(refused).toBeInstanceOf(NodeIdInUse)
        expect((refused as NodeIdInUse).message).toContain("TROUPE_NODE_ID")
        const ref = yield* first.spawn(Counter, "twin-c")
        expect(yield* ref.ask(new Add({ n: 4 }))).toBe(4)
      })
    )

    it.scoped("Node.layer provides the node as a service, and releasing the layer stops it", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const total = yield* Effect.gen(function* () {
          const node = yield* Node.Node
          const ref = yield* node.spawn(Counter, "layered")
          yield* ref.tell(new Add({ n: 4 }))
          return yield* ref.ask(new Add({ n: 1 }))
        }).pipe(Effect.provide(Node.layer({ nodeId: "layered", actors: [Counter] })))
        expect(total).toBe(5)
        const [row] = yield* sql<{ status: string }>`SELECT status FROM nodes WHERE id = 'layered'`
        expect(row!.status).toBe("stopped")
      })
    )

    it.scoped("Node.layerConfig takes the node id from TROUPE_NODE_ID", () =>
      Effect.gen(function* () {
        const id = yield* Effect.map(Node.Node, (node) => node.id).pipe(
          Effect.provide(Node.layerConfig({ actors: [Counter] })),
          Effect.withConfigProvider(ConfigProvider.fromMap(new Map([["TROUPE_NODE_ID", "from-env"]])))
        )
        expect(id).toBe("from-env")
      })
    )

    it.scoped("an idle actor is passivated and re-activated by the next message", () =>
      Effect.gen(function* () {
        const a = yield* Node.make({ nodeId: "a6", actors: [Sleepy] })
        const ref = yield* a.spawn(Sleepy, "s")
        yield* ref.tell(new Add({ n: 1 }))
        expect(yield* ref.ask(new Get())).toBe(1)
        expect(a.stats().actorsInMemory).toBe(1)
        yield* Effect.repeat(
          Effect.sync(() => a.stats().actorsInMemory),
          {
            until: (n) => n === 0,
            schedule: Schedule.spaced("50 millis")
          }
        )
        expect(yield* ref.ask(new Get())).toBe(0)
        expect(activations.get(ref.id)).toBe(2)
      })
    )
  })
})
