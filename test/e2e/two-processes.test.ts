/**
 * Nodes in separate OS processes on one database: node "a" in the test process, the others
 * started with `node --import tsx test/fixtures/node-process.ts`. Messages and replies cross
 * process boundaries only through Postgres.
 */

import * as Path from "node:path"
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import { Add, Counter, Get } from "../fixtures/Actors.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"

const script = Path.join(Processes.root, "test/fixtures/node-process.ts")

/** Start a node process hosting counters with these keys; resolves once it printed `ready`. */
const nodeProcess = (nodeId: string, keys: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const urls = yield* Database.DatabaseUrls
    const proc = yield* Processes.start(process.execPath, ["--import", "tsx", script], {
      env: Processes.cleanEnv({
        DATABASE_URL: Redacted.value(urls.url),
        NODE_ID: nodeId,
        ACTOR_KEYS: keys.join(",")
      })
    })
    yield* proc.waitFor(/^ready$/m, { within: "60 seconds" })
    return proc
  })

/** Send a command to a node process and wait for its answer line. */
const command = (proc: Processes.Proc, verb: "tell" | "ask", actorId: string, body: unknown) =>
  Effect.gen(function* () {
    const from = proc.stdout().length
    proc.writeLine(`${verb} ${actorId} ${JSON.stringify(body)}`)
    const line = (yield* proc.waitFor(/^(told|reply|error) .*\n/m, { from, within: "30 seconds" })).trim()
    if (line.startsWith("error ")) return yield* Effect.fail(new Error(`${proc.pid}: ${line}`))
    return line.startsWith("reply ")
      ? (JSON.parse(line.slice(`reply ${actorId} `.length)) as unknown)
      : undefined
  })

describe("nodes in separate OS processes", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a tells and asks counters hosted by two other processes, and a third process asks an actor on a",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const a = yield* Node.make({ nodeId: "a", actors: [Counter] })
          const onA = yield* a.spawn(Counter, "on-a")
          const [b, c] = yield* Effect.all([nodeProcess("b", ["b1"]), nodeProcess("c", ["c1"])], {
            concurrency: 2
          })

          // Where the actors live, as the registry and the nodes table say: other processes.
          const placed = yield* sql<{ actor_id: string; node_id: string; pid: number }>`
            SELECT r.actor_id, r.node_id, n.pid FROM actor_registry r JOIN nodes n ON n.id = r.node_id
            ORDER BY r.actor_id`
          expect(placed).toEqual([
            { actor_id: "counter:b1", node_id: "b", pid: b.pid },
            { actor_id: "counter:c1", node_id: "c", pid: c.pid },
            { actor_id: "counter:on-a", node_id: "a", pid: process.pid }
          ])

          // a → b: tells, then an ask whose reply row travels b → a.
          const b1 = a.ref(Counter, "b1")
          yield* b1.tell(new Add({ n: 2 }))
          yield* b1.tell(new Add({ n: 3 }))
          expect(yield* b1.ask(new Get())).toBe(5)
          // a → c, independently.
          const c1 = a.ref(Counter, "c1")
          yield* c1.tell(new Add({ n: 10 }))
          expect(yield* c1.ask(new Get())).toBe(10)
          expect(yield* b1.ask(new Get())).toBe(5)

          // c → a: a child process asks an actor hosted in the test process; the reply goes a → c.
          yield* onA.tell(new Add({ n: 7 }))
          expect(yield* command(c, "ask", onA.id, { _tag: "Get" })).toEqual({ _tag: "Success", value: 7 })
          // c → b: between two child processes, seen by a.
          yield* command(c, "tell", b1.id, { _tag: "Add", n: 1 })
          expect(yield* b1.ask(new Get())).toBe(6)
          // b → c, answered to b.
          expect(yield* command(b, "ask", c1.id, { _tag: "Add", n: 1 })).toEqual({
            _tag: "Success",
            value: 11
          })

          // The counters ran where they were placed: a handled only what was sent to its own actor.
          expect(a.stats().handled).toBe(2)
          // Every row, replies included, is acknowledged (acknowledgements are batched, asynchronous).
          yield* Processes.eventually(
            sql<{ n: string }>`SELECT count(*)::text AS n FROM actor_mailbox`,
            (rows) => rows[0]!.n === "0",
            "every mailbox row to be acknowledged"
          )
        })
    )

    it.scoped("messages sent to a node while its process is stopped are delivered when it starts again", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const a = yield* Node.make({ nodeId: "a2", actors: [Counter] })
        const first = yield* nodeProcess("b2", ["r1"])
        const r1 = a.ref(Counter, "r1")
        yield* r1.tell(new Add({ n: 1 }))
        expect(yield* r1.ask(new Get())).toBe(1)

        // A graceful stop: SIGTERM, finalizers run, exit code 0, the node marked stopped.
        first.signalGroup("SIGTERM")
        const ended = yield* first.exited("30 seconds")
        expect(ended).toEqual({ code: 0, signal: null })
        expect(first.stdout()).toMatch(/^stopped$/m)
        const [row] = yield* sql<{ status: string }>`SELECT status FROM nodes WHERE id = 'b2'`
        expect(row!.status).toBe("stopped")

        // Tells while it is down are accepted (committed) and wait in its mailbox.
        yield* r1.tell(new Add({ n: 4 }))
        yield* r1.tell(new Add({ n: 6 }))
        const pending = yield* sql<{ node_id: string; claimed: boolean }>`
            SELECT node_id, claim IS NOT NULL AS claimed FROM actor_mailbox WHERE actor_id = 'counter:r1'`
        expect(pending).toEqual([
          { node_id: "b2", claimed: false },
          { node_id: "b2", claimed: false }
        ])

        // Started again (a new process, a fresh in-memory counter): both are delivered.
        const second = yield* nodeProcess("b2", ["r1"])
        expect(second.pid).not.toBe(first.pid)
        expect(yield* r1.ask(new Get())).toBe(10)
        yield* Processes.eventually(
          sql<{ n: string }>`SELECT count(*)::text AS n FROM actor_mailbox WHERE actor_id = 'counter:r1'`,
          (rows) => rows[0]!.n === "0",
          "the mailbox of counter:r1 to be empty"
        )
        const handled = yield* sql<{ body: { n?: number } }>`
            SELECT body FROM actor_message_log WHERE actor_id = 'counter:r1' AND node_id = 'b2' ORDER BY id`
        expect(handled.map((m) => m.body.n ?? null)).toEqual([1, null, 4, 6, null])
      })
    )
  })
})
