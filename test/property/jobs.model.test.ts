/**
 * Model-based test of the job lifecycle: fast-check drives submit / complete / fail / cancel /
 * needs_human / resume / kill / restart / drain / deregister against a pure model, on a real
 * Postgres with a gateway and three worker nodes, and after every step waits for the system to
 * settle and checks:
 * - a strict job never runs anywhere but its target;
 * - a job never has two live owners;
 * - a cancel of a running job is handled by the actor on the owning node;
 * - a terminal state never changes;
 * - every job is live or in exactly one terminal state, the one the model expects;
 * - a preferred job whose target is idle and online runs on the target.
 * A failure prints fast-check's seed and the shrunk command list; replay with `{ seed, path }`.
 */
import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Deferred, Effect, Exit, Runtime, Scope } from "effect"
import * as fc from "fast-check"
import * as Crypto from "node:crypto"
import type { DatabaseUrls } from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import { command, eventually, slot, startGateway, startWorker, type WorkerNode } from "../fixtures/Jobs.ts"

type Affinity = "strict" | "preferred" | "any"
type Status = "queued" | "running" | "needs_human" | "completed" | "failed" | "cancelled"
const live = (s: Status) => s === "queued" || s === "running" || s === "needs_human"

interface MJob {
  readonly key: string
  readonly id: string
  readonly affinity: Affinity
  readonly target: string | null
  status: Status
  worker: string | null
  errorCode: string | null
  /** Open to every worker (preferred whose target went away). */
  open: boolean
  attempts: number
}

interface MWorker {
  readonly id: string
  alive: boolean
  status: "active" | "draining" | "offline"
}

interface Model {
  readonly workers: Array<MWorker>
  readonly jobs: Array<MJob>
}

interface Real {
  readonly run: <A, E>(effect: Effect.Effect<A, E, SqlClient.SqlClient | DatabaseUrls>) => Promise<A>
  readonly jobs: Effect.Effect.Success<ReturnType<typeof startGateway>>["jobs"]
  readonly nodes: Array<WorkerNode | undefined>
  readonly generation: Array<number>
  readonly prefix: string
  readonly scope: Scope.CloseableScope
}

type Cmd = fc.AsyncCommand<Model, Real>

const workerIds = (prefix: string) => [0, 1, 2].map((i) => `${prefix}-w${i}`)

/** Jobs a worker holds now (running or waiting for a human). */
const held = (m: Model, w: string) =>
  m.jobs.filter((j) => j.worker === w && (j.status === "running" || j.status === "needs_human"))

const eligible = (j: MJob, w: MWorker) =>
  j.affinity === "any" || j.target === w.id || (j.affinity === "preferred" && j.open)

const canClaim = (w: MWorker, m: Model) => w.alive && w.status === "active" && held(m, w.id).length === 0

class Submit implements Cmd {
  constructor(
    readonly affinity: Affinity,
    readonly targetIndex: number
  ) {}
  check = () => true
  async run(m: Model, r: Real) {
    const target = this.affinity === "any" ? null : m.workers[this.targetIndex]!
    const key = Crypto.randomUUID()
    const input = {
      job_type: "ctl",
      payload: { key },
      worker_affinity: this.affinity,
      target_worker_id: target?.id ?? null
    }
    const exit = await r.run(r.jobs.submit(input).pipe(Effect.exit))
    if (this.affinity === "strict") {
      const t = target!
      const load =
        held(m, t.id).length +
        m.jobs.filter((j) => j.status === "queued" && j.affinity === "strict" && j.target === t.id).length
      const accept = t.alive && t.status === "active" && load < 1
      expect(
        Exit.isSuccess(exit),
        `strict submit to ${t.id} (alive ${t.alive}, ${t.status}, load ${load}): ${Exit.isFailure(exit) ? String(exit.cause) : "accepted"}`
      ).toBe(accept)
      if (!accept) {
        if (Exit.isFailure(exit)) expect(JSON.stringify(exit.cause)).toContain("WorkerUnavailable")
        return
      }
    }
    if (Exit.isFailure(exit)) throw new Error(`submit failed: ${JSON.stringify(exit.cause)}`)
    const idleTarget = target !== null && canClaim(target, m)
    const job: MJob = {
      key,
      id: exit.value.id,
      affinity: this.affinity,
      target: target?.id ?? null,
      status: "queued",
      worker: null,
      errorCode: null,
      open: this.affinity === "preferred" && !(target!.alive && target!.status === "active"),
      attempts: 0
    }
    m.jobs.push(job)
    await settle(m, r)
    if (this.affinity === "preferred" && idleTarget) {
      // The invariant: a preferred job whose target is idle and online runs on the target.
      expect(slot(key).runs[0]).toBe(target!.id)
    }
  }
  toString = () => `Submit(${this.affinity}, ${this.targetIndex})`
}

/** Steer the n-th running job (complete, fail or ask for a human). */
class Steer implements Cmd {
  constructor(
    readonly action: "complete" | "fail" | "needs_human",
    readonly n: number
  ) {}
  check = (m: Readonly<Model>) => m.jobs.some((j) => j.status === "running")
  async run(m: Model, r: Real) {
    const running = m.jobs.filter((j) => j.status === "running")
    const j = running[this.n % running.length]!
    await r.run(
      command(
        j.key,
        this.action === "needs_human"
          ? { _tag: "needs_human", timeoutSeconds: 3600 }
          : this.action === "fail"
            ? { _tag: "fail", code: "BOOM" }
            : { _tag: "complete" }
      )
    )
    if (this.action === "complete") j.status = "completed"
    else if (this.action === "fail") {
      j.status = "failed"
      j.errorCode = "BOOM"
    } else j.status = "needs_human"
    await settle(m, r)
  }
  toString = () => `Steer(${this.action}, ${this.n})`
}

class Cancel implements Cmd {
  constructor(readonly n: number) {}
  check = (m: Readonly<Model>) => m.jobs.length > 0
  async run(m: Model, r: Real) {
    const j = m.jobs[this.n % m.jobs.length]!
    const owner = j.worker
    const exit = await r.run(r.jobs.cancel(j.id, "model cancel").pipe(Effect.exit))
    if (live(j.status)) {
      if (Exit.isFailure(exit))
        throw new Error(`cancel of ${j.status} job failed: ${JSON.stringify(exit.cause)}`)
      expect(exit.value.status).toBe("cancelled")
      if (j.status !== "queued") {
        // Handled by the actor on the node that holds the job, which interrupted the handler.
        const nodeOfOwner = r.nodes[m.workers.findIndex((w) => w.id === owner)]!.node.id
        expect(exit.value.node_id).toBe(nodeOfOwner)
        expect(exit.value.worker_id).toBe(owner)
        expect(await r.run(Deferred.isDone(slot(j.key).interrupted))).toBe(true)
      }
      j.status = "cancelled"
      j.errorCode = "CANCELLED"
    } else {
      expect(Exit.isFailure(exit)).toBe(true)
      expect(JSON.stringify(Exit.isFailure(exit) ? exit.cause : "")).toContain("Conflict")
    }
    await settle(m, r)
  }
  toString = () => `Cancel(${this.n})`
}

class Resume implements Cmd {
  constructor(readonly n: number) {}
  check = (m: Readonly<Model>) => m.jobs.length > 0
  async run(m: Model, r: Real) {
    const waiting = m.jobs.filter((j) => j.status === "needs_human")
    const j = waiting.length > 0 ? waiting[this.n % waiting.length]! : m.jobs[this.n % m.jobs.length]!
    const exit = await r.run(r.jobs.resume(j.id, { resolved_by: "model" }).pipe(Effect.exit))
    if (j.status === "needs_human") {
      if (Exit.isFailure(exit)) throw new Error(`resume failed: ${JSON.stringify(exit.cause)}`)
      expect(exit.value.status).toBe("running")
      j.status = "running"
    } else {
      expect(Exit.isFailure(exit)).toBe(true)
      expect(JSON.stringify(Exit.isFailure(exit) ? exit.cause : "")).toContain("Conflict")
    }
    await settle(m, r)
  }
  toString = () => `Resume(${this.n})`
}

/** A worker's process dies: its node and worker stop without a word. */
class Kill implements Cmd {
  constructor(readonly w: number) {}
  check = (m: Readonly<Model>) => m.workers[this.w]!.alive
  async run(m: Model, r: Real) {
    const w = m.workers[this.w]!
    await r.run(r.nodes[this.w]!.stop)
    r.nodes[this.w] = undefined
    w.alive = false
    w.status = "offline"
    for (const j of m.jobs) {
      if (j.worker === w.id && (j.status === "running" || j.status === "needs_human")) {
        if (j.affinity === "strict") fail(j, "WORKER_UNAVAILABLE")
        else if (j.attempts >= 3) fail(j, "MAX_ATTEMPTS")
        else {
          j.status = "queued"
          j.worker = null
          if (j.affinity === "preferred") j.open = true
        }
      }
    }
    closeTarget(m, w)
    await settle(m, r)
  }
  toString = () => `Kill(${this.w})`
}

class Restart implements Cmd {
  constructor(readonly w: number) {}
  check = (m: Readonly<Model>) => !m.workers[this.w]!.alive
  async run(m: Model, r: Real) {
    const w = m.workers[this.w]!
    r.generation[this.w]! += 1
    r.nodes[this.w] = await r.run(
      startWorker(`${r.prefix}-n${this.w}-g${r.generation[this.w]}`, { workerId: w.id }).pipe(
        Scope.extend(r.scope)
      )
    )
    w.alive = true
    w.status = "active"
    await settle(m, r)
  }
  toString = () => `Restart(${this.w})`
}

class Drain implements Cmd {
  constructor(readonly w: number) {}
  check = (m: Readonly<Model>) => m.workers[this.w]!.alive && m.workers[this.w]!.status === "active"
  async run(m: Model, r: Real) {
    const w = m.workers[this.w]!
    const state = await r.run(r.jobs.drain(w.id, "model drain"))
    expect(state.status).toBe("draining")
    w.status = "draining"
    closeTarget(m, w)
    await settle(m, r)
  }
  toString = () => `Drain(${this.w})`
}

class Deregister implements Cmd {
  constructor(readonly w: number) {}
  check = (m: Readonly<Model>) => m.workers[this.w]!.alive && m.workers[this.w]!.status !== "offline"
  async run(m: Model, r: Real) {
    const w = m.workers[this.w]!
    const expected = held(m, w.id)
      .map((j) => j.id)
      .sort()
    const result = await r.run(
      r.jobs.deregister({
        worker_id: w.id,
        reason: "model",
        cancel_active_jobs: true,
        drain_timeout_seconds: 0
      })
    )
    expect([...result.cancelled_job_ids].sort()).toEqual(expected)
    for (const j of held(m, w.id)) {
      j.status = "cancelled"
      j.errorCode = "CANCELLED"
    }
    w.status = "offline"
    closeTarget(m, w)
    await settle(m, r)
    // An offline worker stays out of service until its process restarts: model that as a kill.
    await r.run(r.nodes[this.w]!.stop)
    r.nodes[this.w] = undefined
    w.alive = false
    await settle(m, r)
  }
  toString = () => `Deregister(${this.w})`
}

const fail = (j: MJob, code: string) => {
  j.status = "failed"
  j.errorCode = code
}

/** A worker leaves service: strict jobs queued for it fail, preferred ones open to everyone. */
const closeTarget = (m: Model, w: MWorker) => {
  for (const j of m.jobs) {
    if (j.status !== "queued" || j.target !== w.id) continue
    if (j.affinity === "strict") fail(j, "WORKER_UNAVAILABLE")
    if (j.affinity === "preferred") j.open = true
  }
}

interface Row {
  id: string
  status: Status
  worker_id: string | null
  error_code: string | null
  attempts: number
}

/**
 * Wait until the system agrees with the model (statuses it can predict) and has nothing
 * left to claim (no queued job that an idle, live, active worker may take), then take over
 * what the model leaves open (who claimed an `any` job) and check the invariants.
 */
const settle = async (m: Model, r: Real) => {
  const ids = m.jobs.map((j) => j.id)
  const rows = await r.run(
    eventually(
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const rows =
          yield* sql<Row>`SELECT id::text, status, worker_id, error_code, attempts FROM gh_automation_jobs
          WHERE id = ANY(${ids}::uuid[])`
        const byId = new Map(rows.map((row) => [row.id, row]))
        const busy = new Set(
          rows
            .filter((row) => row.status === "running" || row.status === "needs_human")
            .map((row) => row.worker_id)
        )
        const idle = m.workers.filter((w) => w.alive && w.status === "active" && !busy.has(w.id))
        for (const j of m.jobs) {
          const row = byId.get(j.id)!
          if (!live(j.status) || j.status === "needs_human") {
            if (row.status !== j.status) return undefined
          } else if (j.status === "running") {
            if (row.status !== "running" || row.worker_id !== j.worker) return undefined
          } else if (row.status === "queued") {
            // Still claimable by an idle worker: not settled yet.
            if (idle.some((w) => eligible(j, w))) return undefined
          } else if (row.status !== "running") return undefined
        }
        // Every job the DB says is held must be held by a live worker in memory.
        for (const row of rows) {
          if (row.status !== "running" && row.status !== "needs_human") continue
          const i = m.workers.findIndex((w) => w.id === row.worker_id)
          if (i < 0 || !r.nodes[i]?.worker.runningJobIds().includes(row.id)) return undefined
        }
        return rows
      }),
      "20 seconds"
    )
  )
  const byId = new Map(rows.map((row) => [row.id, row]))
  for (const j of m.jobs) {
    const row = byId.get(j.id)!
    expect(row.status, `job ${j.id} (${j.affinity} → ${j.target})`).toBe(
      j.status === "queued" && row.status === "running" ? "running" : j.status
    )
    if (j.status === "queued" && row.status === "running") {
      // Claimed: by someone allowed to, with room for it.
      const w = m.workers.find((w) => w.id === row.worker_id)!
      expect(eligible(j, w), `${row.worker_id} may not run ${j.affinity} job for ${j.target}`).toBe(true)
      j.status = "running"
      j.worker = row.worker_id
    }
    if (!live(j.status)) expect(row.error_code).toBe(j.errorCode)
    j.attempts = row.attempts
    // A strict job never runs anywhere but its target.
    if (j.affinity === "strict") for (const w of slot(j.key).runs) expect(w).toBe(j.target)
  }
  // A job never has two live owners; a worker runs at most one job (max_concurrent 1).
  const owners = new Map<string, number>()
  for (const n of r.nodes) {
    if (!n) continue
    const mine = n.worker.runningJobIds().filter((id) => ids.includes(id))
    expect(mine.length).toBeLessThanOrEqual(1)
    for (const id of mine) owners.set(id, (owners.get(id) ?? 0) + 1)
  }
  for (const [id, count] of owners) expect(count, `owners of ${id}`).toBe(1)
}

const commands = [
  fc
    .tuple(fc.constantFrom<Affinity>("strict", "preferred", "any"), fc.nat(2))
    .map(([a, t]) => new Submit(a, t)),
  fc
    .tuple(fc.constantFrom<Affinity>("strict", "preferred", "any"), fc.nat(2))
    .map(([a, t]) => new Submit(a, t)),
  fc
    .tuple(fc.constantFrom("complete" as const, "fail" as const, "needs_human" as const), fc.nat())
    .map(([a, n]) => new Steer(a, n)),
  fc.nat().map((n) => new Steer("complete", n)),
  fc.nat().map((n) => new Cancel(n)),
  fc.nat().map((n) => new Resume(n)),
  fc.nat(2).map((w) => new Kill(w)),
  fc.nat(2).map((w) => new Restart(w)),
  fc.nat(2).map((w) => new Drain(w)),
  fc.nat(2).map((w) => new Deregister(w))
]

describe("job lifecycle model", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "random schedules of submit, steer, cancel, resume, kill, restart, drain, deregister keep every invariant",
      () =>
        Effect.gen(function* () {
          const runtime = yield* Effect.runtime<SqlClient.SqlClient | DatabaseUrls>()
          const run = <A, E>(effect: Effect.Effect<A, E, SqlClient.SqlClient | DatabaseUrls>) =>
            Runtime.runPromise(runtime)(effect)
          let round = 0
          yield* Effect.promise(() =>
            fc.assert(
              fc.asyncProperty(fc.commands(commands, { maxCommands: 30 }), async (cmds) => {
                const prefix = `r${round++}`
                const scope = await run(Scope.make())
                try {
                  const { jobs } = await run(
                    startGateway(`${prefix}-gw`, { preferredWait: "1 hour" }).pipe(Scope.extend(scope))
                  )
                  const nodes: Array<WorkerNode | undefined> = []
                  for (const [i, id] of workerIds(prefix).entries()) {
                    nodes.push(
                      await run(startWorker(`${prefix}-n${i}-g0`, { workerId: id }).pipe(Scope.extend(scope)))
                    )
                  }
                  const model: Model = {
                    workers: workerIds(prefix).map((id) => ({ id, alive: true, status: "active" as const })),
                    jobs: []
                  }
                  const real: Real = { run, jobs, nodes, generation: [0, 0, 0], prefix, scope }
                  await fc.asyncModelRun(() => ({ model, real }), cmds)
                } finally {
                  await run(Scope.close(scope, Exit.void))
                  // What this round left live must not be requeued into the next round's workers.
                  await run(
                    Effect.flatMap(
                      SqlClient.SqlClient,
                      (sql) =>
                        sql`UPDATE gh_automation_jobs SET status = 'cancelled', finished_at = now()
                            WHERE status IN ('queued', 'running', 'needs_human')`
                    )
                  )
                }
              }),
              { numRuns: 30, endOnFailure: true, verbose: 1 }
            )
          )
        }),
      300_000
    )
  })
})
