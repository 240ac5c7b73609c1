import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect, Exit, Schedule, Scope } from "effect"
import * as NodeMembership from "../../src/runtime/core/NodeMembership.ts"
import * as Singleton from "../../src/runtime/core/Singleton.ts"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"

/** The nodes whose copy of the singleton is running now. */
const running = new Set<string>()

/** A node (its membership) running the singleton `name` in its own scope. */
const startOn = (nodeId: string, name: string) =>
  Effect.gen(function* () {
    const scope = yield* Scope.make()
    const urls = yield* Database.DatabaseUrls
    const singleton = yield* Effect.gen(function* () {
      yield* NodeMembership.make({
        nodeId,
        role: "gateway",
        address: null,
        directUrl: urls.directUrl,
        heartbeat: "1 second"
      })
      return yield* Singleton.make(
        name,
        Effect.acquireRelease(
          Effect.sync(() => running.add(nodeId)),
          () => Effect.sync(() => running.delete(nodeId))
        ).pipe(Effect.zipRight(Effect.never)),
        { holder: nodeId, ttl: "3 seconds", renewEvery: "50 millis" }
      )
    }).pipe(Scope.extend(scope))
    return { singleton, stop: Scope.close(scope, Exit.void) }
  })

/** Wait until `check` holds (bounded). */
const until = (check: () => boolean) =>
  Effect.sync(check).pipe(
    Effect.repeat({ schedule: Schedule.spaced("10 millis"), until: (ok) => ok }),
    Effect.timeoutFail({
      duration: "10 seconds",
      onTimeout: () => new Error("condition not reached in time")
    })
  )

describe("a lease-held singleton", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("runs on one node at a time, and on another as soon as its holder stops", () =>
      Effect.gen(function* () {
        const a = yield* startOn("s-a", "test-1")
        yield* until(() => a.singleton.holds() && running.has("s-a"))
        const b = yield* startOn("s-b", "test-1")
        // Not a synchronisation: b tries every 50 ms, this gives it a dozen tries to take the lease wrongly.
        yield* Effect.sleep("600 millis")
        expect(b.singleton.holds()).toBe(false)
        expect([...running].filter((id) => id.startsWith("s-"))).toEqual(["s-a"])

        yield* a.stop
        expect(running.has("s-a")).toBe(false)
        const sql = yield* SqlClient.SqlClient
        yield* until(() => b.singleton.holds() && running.has("s-b"))
        const lease = yield* sql<{ holder: string }>`SELECT holder FROM leases WHERE name = 'test-1'`
        expect(lease[0]!.holder).toBe("s-b")
        yield* b.stop
        expect(running.has("s-b")).toBe(false)
        expect(yield* sql`SELECT 1 FROM leases WHERE name = 'test-1'`).toHaveLength(0)
      })
    )

    it.scoped("is interrupted on the node that lost its lease", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const a = yield* startOn("s-c", "test-2")
        yield* until(() => a.singleton.holds() && running.has("s-c"))
        const b = yield* startOn("s-d", "test-2")
        // Handed to s-d behind s-c's back (as an expired lease taken over would be).
        yield* sql`UPDATE leases SET holder = 's-d', expires_at = now() + interval '1 minute' WHERE name = 'test-2'`
        yield* until(() => !running.has("s-c") && running.has("s-d"))
        expect(a.singleton.holds()).toBe(false)
        expect(b.singleton.holds()).toBe(true)
        yield* b.stop
        yield* a.stop
      })
    )
  })
})
