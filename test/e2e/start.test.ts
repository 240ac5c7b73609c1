/**
 * `npm start` as a user runs it: a real child process on an embedded Postgres under a fresh
 * TROUPE_DATA_DIR, driven and inspected through the `troupe` CLI, stopped with Ctrl-C, and
 * recovered after a crash that leaves its Postgres behind.
 */

import * as Fs from "node:fs"
import * as Path from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Processes from "../fixtures/Processes.ts"

interface Owner {
  readonly pid: number
  readonly postgresPid: number
  readonly port: number
}

/** What the node wrote when its embedded Postgres became ready. */
const ownerFile = (dir: string) => Path.join(dir, "pg.owner.json")
const readOwner = (dir: string): Owner => JSON.parse(Fs.readFileSync(ownerFile(dir), "utf8"))

/** When the scope closes, stop any Postgres still running on the directory (a failed test's leftover). */
const stopPostgresOnClose = (dir: string) =>
  Effect.addFinalizer(() =>
    Effect.promise(async () => {
      let pid: number
      try {
        pid = Number(Fs.readFileSync(Path.join(dir, "pg", "postmaster.pid"), "utf8").split("\n")[0])
      } catch {
        return
      }
      if (!Number.isFinite(pid) || pid <= 0 || !Processes.isAlive(pid)) return
      const gone = async (ms: number) => {
        const deadline = Date.now() + ms
        while (Date.now() < deadline && Processes.isAlive(pid)) await new Promise((r) => setTimeout(r, 50))
        return !Processes.isAlive(pid)
      }
      try {
        process.kill(pid, "SIGINT")
        if (!(await gone(15_000))) {
          process.kill(pid, "SIGKILL")
          await gone(5_000)
        }
      } catch {
        // gone already
      }
    })
  )

/** A data directory and the environment of a `troupe` run on it (no DATABASE_URL: the embedded server). */
const setup = (name: string) =>
  Effect.gen(function* () {
    const dir = yield* Processes.tempDir(`troupe-e2e-${name}-`)
    yield* stopPostgresOnClose(dir)
    const nodeId = `e2e-${name}-${process.pid}`
    const env = Processes.cleanEnv({ TROUPE_DATA_DIR: dir, TROUPE_NODE_ID: nodeId })
    return { dir, nodeId, env }
  })

const npmStart = (env: NodeJS.ProcessEnv) =>
  Effect.gen(function* () {
    const proc = yield* Processes.start("npm", ["start"], { env })
    const line = yield* proc.waitFor("is up", { within: "90 seconds" })
    return { proc, line }
  })

const ping = (nodeId: string, text: string, env: NodeJS.ProcessEnv) =>
  Processes.troupeJson(
    ["inspect", "send", `probe:${nodeId}`, JSON.stringify({ _tag: "Ping", text }), "--ask"],
    env
  )

describe("npm start", () => {
  it.scopedLive(
    "runs a node on an embedded Postgres that the inspector reaches; Ctrl-C stops the node and its Postgres",
    () =>
      Effect.gen(function* () {
        const { dir, nodeId, env } = yield* setup("up")
        const { proc, line } = yield* npmStart(env)
        expect(line).toContain(`troupe node "${nodeId}" is up`)
        const owner = readOwner(dir)
        expect(Processes.isAlive(owner.postgresPid)).toBe(true)
        expect(proc.stdout()).toContain(`embedded Postgres on 127.0.0.1:${owner.port}`)

        const nodes = yield* Processes.troupeJson(["inspect", "nodes", "--json"], env)
        expect(nodes).toEqual([
          // The probe and the node's WorkerActor.
          expect.objectContaining({ id: nodeId, state: "up", status: "running", pid: owner.pid, actors: 2 })
        ])

        const reply = yield* ping(nodeId, "hi", env)
        expect(reply).toMatchObject({ _tag: "Success", value: { text: "hi", node: nodeId } })
        // The inspector's temporary node for the ask leaves nothing behind.
        const after = yield* Processes.troupeJson<Array<{ id: string }>>(["inspect", "nodes", "--json"], env)
        expect(after.map((n) => n.id)).toEqual([nodeId])

        // Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        proc.signalGroup("SIGINT")
        const ended = yield* proc.exited("30 seconds")
        // npm forwards the signal to its script and, once the script is done, ends itself with
        // that same signal when the script's shell died of it (dash does), or with the script's
        // code 0 otherwise: never a failure code.
        expect(ended.code === 0 || (ended.code === null && ended.signal === "SIGINT")).toBe(true)
        expect(proc.stdout()).toContain(`troupe node "${nodeId}" stopping`)
        // By the time the command returns, the node and its Postgres are gone, and so is the owner file.
        expect(Processes.isAlive(owner.pid)).toBe(false)
        expect(Processes.isAlive(owner.postgresPid)).toBe(false)
        expect(Fs.existsSync(ownerFile(dir))).toBe(false)
        expect(proc.stderr()).not.toMatch(/error|troupe:/i)
      }),
    // Every step is a real process (npm, node, Postgres, the CLI): generous under a loaded machine.
    180_000
  )

  it.scopedLive(
    "after a crash (SIGKILL) that orphans its Postgres, the next start stops the orphan and finds its data",
    () =>
      Effect.gen(function* () {
        const { dir, nodeId, env } = yield* setup("crash")
        const first = yield* npmStart(env)
        const before = readOwner(dir)
        expect(yield* ping(nodeId, "before the crash", env)).toMatchObject({
          value: { text: "before the crash", node: nodeId }
        })
        // The message log is written when the node acknowledges the message: wait for it.
        const logged = (actor: any) =>
          (actor.last_messages as Array<{ body: { text?: string } }>).some(
            (m) => m.body.text === "before the crash"
          )
        yield* Processes.eventually(
          Processes.troupeJson(["inspect", "actor", `probe:${nodeId}`, "--json"], env),
          logged,
          "the ping to be in the message log"
        )

        // The crash: SIGKILL to the node's whole process group. Postgres runs in its own group.
        first.proc.signalGroup("SIGKILL")
        const crashed = yield* first.proc.exited("30 seconds")
        expect(crashed.signal).toBe("SIGKILL")
        expect(first.proc.stdout()).not.toContain("stopping")
        expect(Processes.isAlive(before.pid)).toBe(false)
        expect(Processes.isAlive(before.postgresPid)).toBe(true)

        // The orphaned server still answers the inspector, which sees the node dead (its lock is gone).
        yield* Processes.eventually(
          Processes.troupeJson<Array<{ id: string; state: string }>>(["inspect", "nodes", "--json"], env),
          (ns) => ns.find((n) => n.id === nodeId)?.state === "dead",
          "the crashed node to be reported dead"
        )

        const second = yield* npmStart(env)
        expect(second.line).toContain(`troupe node "${nodeId}" is up`)
        const now = readOwner(dir)
        expect(now.postgresPid).not.toBe(before.postgresPid)
        expect(Processes.isAlive(before.postgresPid)).toBe(false)
        expect(Processes.isAlive(now.postgresPid)).toBe(true)

        const nodes = yield* Processes.troupeJson(["inspect", "nodes", "--json"], env)
        expect(nodes).toEqual([expect.objectContaining({ id: nodeId, state: "up", pid: now.pid })])
        // The same actor, still placed on this node at the same epoch (it never moved).
        const actors = yield* Processes.troupeJson(["inspect", "actors", "--json"], env)
        expect(actors).toEqual([
          expect.objectContaining({
            actor_id: `probe:${nodeId}`,
            node_id: nodeId,
            epoch: 1,
            status: "active"
          }),
          expect.objectContaining({
            actor_id: `worker:worker-${nodeId}`,
            node_id: nodeId,
            epoch: 1,
            status: "active"
          })
        ])
        // What was committed before the crash is still there.
        const actor = yield* Processes.troupeJson(["inspect", "actor", `probe:${nodeId}`, "--json"], env)
        expect(actor).toMatchObject({ node_state: "up", mailbox: { pending: 0, in_flight: 0 } })
        expect(logged(actor)).toBe(true)
        expect(yield* ping(nodeId, "after the crash", env)).toMatchObject({
          value: { text: "after the crash", node: nodeId }
        })

        second.proc.signalGroup("SIGINT")
        const ended = yield* second.proc.exited("30 seconds")
        expect(ended.code === 0 || ended.signal === "SIGINT").toBe(true)
        expect(Processes.isAlive(now.postgresPid)).toBe(false)
        expect(Fs.existsSync(ownerFile(dir))).toBe(false)
      }),
    // Every step is a real process (npm, node, Postgres, the CLI): generous under a loaded machine.
    180_000
  )

  for (const { name, how, signal } of [
    { name: "ctrlc", how: "Ctrl-C (SIGINT to its process group)", signal: "SIGINT" as const },
    {
      name: "term",
      how: "SIGTERM to its process only (as `kill` or a supervisor sends)",
      signal: "SIGTERM" as const
    }
  ]) {
    it.scopedLive(`troupe start stops gracefully on ${how} and exits 0`, () =>
      Effect.gen(function* () {
        const { dir, nodeId, env } = yield* setup(name)
        const proc = yield* Processes.start(process.execPath, ["bin/troupe.js", "start"], { env })
        yield* proc.waitFor("is up", { within: "90 seconds" })
        const owner = readOwner(dir)
        expect(owner.pid).toBe(proc.pid)
        if (signal === "SIGINT") proc.signalGroup(signal)
        else process.kill(proc.pid, signal)
        const ended = yield* proc.exited("30 seconds")
        expect(ended).toEqual({ code: 0, signal: null })
        expect(proc.stdout()).toContain(`troupe node "${nodeId}" stopping`)
        expect(proc.stderr()).toBe("")
        expect(Processes.isAlive(owner.postgresPid)).toBe(false)
        expect(Fs.existsSync(ownerFile(dir))).toBe(false)
      })
    )
  }
})
