/**
 * The `troupe inspect` CLI as a separate process against this file's database, where node
 * "n1" runs in the test process with Counter actors.
 */

import * as Os from "node:os"
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Redacted } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import { Add, Counter, Get } from "../fixtures/Actors.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"

/** Node "n1", for the whole file. */
class N1 extends Context.Tag("test/e2e/inspect/N1")<N1, Node.TroupeNode>() {}
const N1Live = Layer.scoped(N1, Node.make({ nodeId: "n1", actors: [Counter] }))

/** The environment of a CLI run on this file's database. */
const cliEnv = Effect.map(Database.DatabaseUrls, (urls) =>
  Processes.cleanEnv({ DATABASE_URL: Redacted.value(urls.url) })
)

/** Wait until the node has acknowledged `count` messages of an actor (the log is written with the ack). */
const awaitLogged = (actorId: string, count: number) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Processes.eventually(
      sql<{ n: number }>`SELECT count(*)::int AS n FROM actor_message_log WHERE actor_id = ${actorId}`,
      (rows) => rows[0]!.n >= count,
      `${count} handled messages of ${actorId} in the message log`
    )
  )

describe("troupe inspect", () => {
  layer(N1Live.pipe(Layer.provideMerge(Db.layer)), { excludeTestServices: true })((it) => {
    it.scoped("nodes lists the running node with its state, pid and actor count", () =>
      Effect.gen(function* () {
        const n1 = yield* N1
        yield* n1.spawn(Counter, "nodes")
        const env = yield* cliEnv
        const nodes = yield* Processes.troupeJson(["inspect", "nodes", "--json"], env)
        expect(nodes).toEqual([
          expect.objectContaining({
            id: "n1",
            state: "up",
            status: "running",
            alive: true,
            role: "gateway+worker",
            pid: process.pid,
            hostname: Os.hostname(),
            pending: 0,
            in_flight: 0,
            actors: expect.any(Number)
          })
        ])
        expect(nodes[0].actors).toBeGreaterThanOrEqual(1)
        // `npm run inspect -- nodes` is the same command.
        const viaNpm = yield* Processes.run("npm", ["run", "--silent", "inspect", "--", "nodes", "--json"], {
          env
        })
        expect(viaNpm.code).toBe(0)
        expect(JSON.parse(viaNpm.stdout)).toEqual([
          expect.objectContaining({ id: "n1", state: "up", pid: process.pid, actors: nodes[0].actors })
        ])
        // The readable table says the same.
        const table = yield* Processes.troupe(["inspect", "nodes"], env)
        expect(table.code).toBe(0)
        const [header, row] = table.stdout.trim().split("\n")
        expect(header).toMatch(/^ID\s+STATE\s+ROLE/)
        expect(row).toMatch(new RegExp(`^n1\\s+up\\s+gateway\\+worker\\s+.*\\s${process.pid}\\s`))
      })
    )

    it.scoped("actors lists a spawned counter on n1", () =>
      Effect.gen(function* () {
        const n1 = yield* N1
        yield* n1.spawn(Counter, "listed")
        const env = yield* cliEnv
        const actors = yield* Processes.troupeJson<Array<Record<string, unknown>>>(
          ["inspect", "actors", "--kind", "counter", "--json"],
          env
        )
        expect(actors).toContainEqual(
          expect.objectContaining({
            actor_id: "counter:listed",
            kind: "counter",
            node_id: "n1",
            epoch: 1,
            status: "active",
            depth: 0
          })
        )
        expect(actors.every((a) => a.kind === "counter")).toBe(true)
      })
    )

    it.scoped("actor <id> shows its node, epoch, status, mailbox and the last messages it handled", () =>
      Effect.gen(function* () {
        const n1 = yield* N1
        const ref = yield* n1.spawn(Counter, "detail")
        yield* ref.tell(new Add({ n: 1 }))
        yield* ref.tell(new Add({ n: 2 }))
        expect(yield* ref.ask(new Get())).toBe(3)
        yield* awaitLogged(ref.id, 3)
        const env = yield* cliEnv
        const actor = yield* Processes.troupeJson(["inspect", "actor", "counter:detail", "--json"], env)
        expect(actor).toMatchObject({
          actor_id: "counter:detail",
          kind: "counter",
          node_id: "n1",
          node_state: "up",
          epoch: 1,
          status: "active",
          mailbox: { pending: 0, in_flight: 0 },
          queued: [],
          dead_letters: []
        })
        // Newest first.
        expect(actor.last_messages.map((m: any) => [m.kind, m.sender, m.body])).toEqual([
          ["ask", "node:n1", { _tag: "Get" }],
          ["tell", "node:n1", { _tag: "Add", n: 2 }],
          ["tell", "node:n1", { _tag: "Add", n: 1 }]
        ])
        // The readable form.
        const text = yield* Processes.troupe(["inspect", "actor", "counter:detail"], env)
        expect(text.code).toBe(0)
        expect(text.stdout).toContain("counter:detail  (kind counter)")
        expect(text.stdout).toMatch(/node\s+n1 \(up\)/)
        expect(text.stdout).toMatch(/mailbox\s+0 pending, 0 in flight/)
      })
    )

    it.scoped("send delivers a message the actor handles, and --ask prints the reply", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const n1 = yield* N1
        const ref = yield* n1.spawn(Counter, "sent")
        yield* ref.tell(new Add({ n: 1 }))
        const env = yield* cliEnv
        const sent = yield* Processes.troupeJson(
          ["inspect", "send", "counter:sent", '{"_tag":"Add","n":5}', "--json"],
          env
        )
        expect(sent).toMatchObject({
          actor_id: "counter:sent",
          node_id: "n1",
          message_id: expect.any(String)
        })
        expect(yield* ref.ask(new Get())).toBe(6)

        const plain = yield* Processes.troupe(
          ["inspect", "send", "counter:sent", '{"_tag":"Add","n":4}'],
          env
        )
        expect(plain.code).toBe(0)
        expect(plain.stdout).toMatch(/^sent [0-9a-f-]{36} to counter:sent on node n1$/m)

        const asked = yield* Processes.troupeJson(
          ["inspect", "send", "counter:sent", '{"_tag":"Get"}', "--ask"],
          env
        )
        expect(asked).toEqual({ _tag: "Success", value: 10 })
        // The inspector's temporary node for the ask is gone again.
        const nodes = yield* sql<{ id: string }>`SELECT id FROM nodes ORDER BY id`
        expect(nodes.map((n) => n.id)).toEqual(["n1"])
      })
    )

    it.scoped("refuses bad input with exit code 1 and a clear message", () =>
      Effect.gen(function* () {
        const n1 = yield* N1
        yield* n1.spawn(Counter, "refuse")
        const env = yield* cliEnv

        const badJson = yield* Processes.troupe(["inspect", "send", "counter:refuse", "{not json"], env)
        expect(badJson.code).toBe(1)
        expect(badJson.stderr).toMatch(/^troupe: the message is not valid JSON/m)

        const nobody = yield* Processes.troupe(["inspect", "send", "counter:nobody", "{}"], env)
        expect(nobody.code).toBe(1)
        expect(nobody.stderr).toContain('troupe: no actor is registered as "counter:nobody"')

        const notAnId = yield* Processes.troupe(["inspect", "send", "nokind", "{}"], env)
        expect(notAnId.code).toBe(1)
        expect(notAnId.stderr).toContain('"nokind" is not an actor id')

        const noActor = yield* Processes.troupe(["inspect", "actor", "nope:x"], env)
        expect(noActor.code).toBe(1)
        expect(noActor.stderr).toContain('troupe: no actor is registered as "nope:x"')
        expect(noActor.stdout).toBe("")

        // Nothing was delivered by the refused sends.
        expect(yield* n1.ref(Counter, "refuse").ask(new Get())).toBe(0)
      })
    )

    it.scoped("an unreachable database is reported in one line, without the password", () =>
      Effect.gen(function* () {
        const env = Processes.cleanEnv({ DATABASE_URL: "postgres://u:s3cretpw@127.0.0.1:1/x" })
        for (const args of [
          ["inspect", "nodes", "--json"],
          ["inspect", "actor", "counter:x"],
          ["inspect", "send", "counter:x", "{}", "--ask"]
        ]) {
          const r = yield* Processes.troupe(args, env)
          expect(r.code, args.join(" ")).toBe(1)
          expect(r.stderr).toMatch(/^troupe: cannot reach the database at 127\.0\.0\.1:1\/x/)
          expect(r.stderr.trim().split("\n")).toHaveLength(1)
          expect(r.stdout + r.stderr).not.toContain("s3cretpw")
        }
      })
    )

    it.scoped("tail follows traffic live: sent, handled and dead-lettered messages", () =>
      Effect.gen(function* () {
        const n1 = yield* N1
        const ref = yield* n1.spawn(Counter, "tailed")
        const env = yield* cliEnv
        const tail = yield* Processes.start(process.execPath, ["bin/troupe.js", "inspect", "tail"], { env })
        // It announces itself once it has read where the traffic stands: anything after is shown.
        yield* tail.waitFor("tailing mailbox traffic", { stream: "stderr", within: "60 seconds" })

        yield* ref.tell(new Add({ n: 42 }))
        const sentLine = yield* tail.waitFor(/^.*\bsent\s+counter:tailed\s.*\n/m)
        // (the body as stored: jsonb, so key order is Postgres' own)
        expect(sentLine).toContain("from node:n1")
        expect(sentLine).toContain('"n":42')
        const handledLine = yield* tail.waitFor(/^.*\bhandled\s+counter:tailed\s.*\n/m)
        expect(handledLine).toContain('"n":42')

        yield* n1.tellRaw(ref.id, { _tag: "Add", n: "not a number" })
        const deadLine = yield* tail.waitFor(/^.*\bdead\s+counter:tailed\s.*\n/m)
        expect(deadLine).toContain('"n":"not a number"')
        expect(deadLine).toContain(`message for "counter:tailed" does not match its schema`)
        // The counter kept going: the malformed message changed nothing.
        expect(yield* ref.ask(new Get())).toBe(42)

        // Ctrl-C ends it quietly.
        tail.signalGroup("SIGINT")
        expect(yield* tail.exited("20 seconds")).toEqual({ code: 0, signal: null })
      })
    )

    it.scoped("tail --json --actor prints one JSON event per line for that actor only", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const n1 = yield* N1
        const ours = yield* n1.spawn(Counter, "tail-json")
        const other = yield* n1.spawn(Counter, "tail-other")
        const env = yield* cliEnv
        const tail = yield* Processes.start(
          process.execPath,
          ["bin/troupe.js", "inspect", "tail", "--json", "--actor", ours.id],
          { env }
        )
        // In JSON mode it prints nothing until there is traffic: it has read where the traffic
        // stands once the queries of its polling rounds show up in the database.
        yield* Processes.eventually(
          sql<{ n: number }>`
            SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = 'troupe-inspect'
              AND query ~ 'FROM actor_(mailbox|message_log|dead_letters) WHERE id >'`,
          (rows) => rows[0]!.n > 0,
          "the tail to poll"
        )
        // Traffic of another actor, handled before ours is even sent: filtered out.
        yield* other.tell(new Add({ n: 1 }))
        yield* awaitLogged(other.id, 1)
        yield* ours.tell(new Add({ n: 8 }))
        yield* tail.waitFor(/"event":"handled".*\n/)
        const events = tail
          .stdout()
          .trim()
          .split("\n")
          .map((line) => JSON.parse(line))
        expect(events.map((e) => [e.event, e.actor_id, e.node_id, e.kind, e.sender, e.body])).toEqual([
          ["sent", ours.id, "n1", "tell", "node:n1", { _tag: "Add", n: 8 }],
          ["handled", ours.id, "n1", "tell", "node:n1", { _tag: "Add", n: 8 }]
        ])
        expect(events[0].message_id).toBe(events[1].message_id)
        tail.signalGroup("SIGINT")
        expect(yield* tail.exited("20 seconds")).toEqual({ code: 0, signal: null })
      })
    )

    it.scoped("--help of troupe and of troupe inspect exit 0 and list the subcommands", () =>
      Effect.gen(function* () {
        // No database needed for help.
        const env = Processes.cleanEnv({})
        const top = yield* Processes.troupe(["--help"], env)
        expect(top.code).toBe(0)
        const topText = Processes.stripAnsi(top.stdout)
        expect(topText).toMatch(/^\s*- start\s/m)
        expect(topText).toMatch(/^\s*- inspect\s/m)
        for (const sub of ["nodes", "actors", "actor", "send", "tail"]) {
          expect(topText).toMatch(new RegExp(`^\\s*- inspect ${sub}\\b`, "m"))
        }
        const inspect = yield* Processes.troupe(["inspect", "--help"], env)
        expect(inspect.code).toBe(0)
        const inspectText = Processes.stripAnsi(inspect.stdout)
        for (const sub of ["nodes", "actors", "actor", "send", "tail"]) {
          expect(inspectText).toMatch(new RegExp(`^\\s*- ${sub}\\b`, "m"))
        }
        expect(inspect.stderr).not.toContain("troupe:")
      })
    )
  })
})
