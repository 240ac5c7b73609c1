/**
 * Hand-off: a submit of an `any` job takes a slot an idle worker has on offer and the job
 * travels to that worker in the NOTIFY, with no claim. Each job must still run exactly once,
 * no worker may run more than its `max_concurrent`, and a hand-off whose NOTIFY was missed
 * must be picked up when the worker catches up.
 */
import { SqlClient } from "@effect/sql"
import { layer } from "@effect/vitest"
import { Deferred, Effect, Schema } from "effect"
import { expect } from "vitest"
import * as JobHandler from "../../src/runtime/jobs/JobHandler.ts"
import { maxPushBytes } from "../../src/protocol/Notifications.ts"
import * as Db from "../fixtures/Db.ts"
import { killListener } from "../fixtures/Delivery.ts"
import { eventually, handlers, key, slot, startGateway, startWorker, statusIs } from "../fixtures/Jobs.ts"

/** Handlers that record, per worker, how many of their runs overlap and which jobs ran. */
const counting = () => {
  const running = new Map<string, number>()
  const peak = new Map<string, number>()
  const runs: Array<string> = []
  const work = Effect.gen(function* () {
    const ctx = yield* JobHandler.JobContext
    const now = (running.get(ctx.workerId) ?? 0) + 1
    running.set(ctx.workerId, now)
    peak.set(ctx.workerId, Math.max(peak.get(ctx.workerId) ?? 0, now))
    runs.push(ctx.jobId)
    // Some work that yields, so runs on one worker can overlap.
    for (let i = 0; i < 20; i++) yield* Effect.yieldNow()
    running.set(ctx.workerId, running.get(ctx.workerId)! - 1)
    const { blob } = yield* JobHandler.payload(Schema.Struct({ blob: Schema.optional(Schema.String) }))
    return { worker: ctx.workerId, bytes: blob?.length ?? 0 }
  })
  return { handlers: JobHandler.handlers({ ...handlers, work }), peak, runs }
}

const offersOf = (workerId: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(
      sql<{ n: number }>`SELECT count(*)::int AS n FROM job_offers WHERE worker_id = ${workerId}`,
      (rows) => rows[0]!.n
    )
  )

const statusesOf = (ids: ReadonlyArray<string>) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      sql<{ id: string; status: string; attempts: number; worker_id: string | null; started: number }>`
      SELECT j.id::text AS id, j.status, j.attempts, j.worker_id,
        (SELECT count(*)::int FROM gh_job_events e WHERE e.job_id = j.id AND e.event_type = 'job_started') AS started
      FROM gh_automation_jobs j WHERE j.id = ANY(${ids}::uuid[])`.withoutTransform
  )

/** The NOTIFY payload a submit sends when it hands a `ctl` job (attempt 1) to a worker. */
const pushedCtl = (id: string, workerId: string, key: string) =>
  JSON.stringify({
    v: 1,
    id,
    worker_id: workerId,
    attempts: 1,
    job_type: "ctl",
    payload: { key },
    timeout_seconds: null,
    worker_affinity: "any",
    target_worker_id: null,
    valet_task_id: null,
    cost: {}
  })

/**
 * What a submit does when the NOTIFY to the worker's node never arrives: wait for the
 * worker's offer, take it, write the job running for that worker, place its actor; no NOTIFY.
 */
const handOffSilently = (workerId: string, jobType: string, payload: unknown) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* eventually(Effect.map(offersOf(workerId), (n) => (n > 0 ? true : undefined)))
    const rows = yield* sql<{ id: string }>`
      WITH o AS (
        DELETE FROM job_offers WHERE id = (SELECT id FROM job_offers WHERE worker_id = ${workerId} LIMIT 1)
        RETURNING worker_id, node_id
      ),
      ins AS (
        INSERT INTO gh_automation_jobs (job_type, payload, worker_affinity, status, worker_id, node_id, attempts, started_at)
        SELECT ${jobType}, ${JSON.stringify(payload)}::jsonb, 'any', 'running', worker_id, node_id, 1, now() FROM o
        RETURNING id, node_id
      ),
      placed AS (INSERT INTO actor_registry (actor_id, kind, node_id, epoch)
        SELECT 'job:' || id, 'job', node_id, 1 FROM ins RETURNING 1)
      SELECT id::text AS id FROM ins WHERE (SELECT count(*) FROM placed) >= 0`
    expect(rows).toHaveLength(1)
    return rows[0]!.id
  })

layer(Db.layer, { excludeTestServices: true })((it) => {
  it.scoped(
    "a burst of `any` jobs to idle workers: handed over, each run once, never past max_concurrent",
    () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-h1")
        const c = counting()
        const a = yield* startWorker("h1a", { maxConcurrent: 2, handlers: c.handlers })
        const b = yield* startWorker("h1b", { maxConcurrent: 3, handlers: c.handlers })
        // Idle workers put their free slots on offer.
        yield* eventually(
          Effect.map(Effect.all([offersOf("w-h1a"), offersOf("w-h1b")]), ([x, y]) =>
            x === 2 && y === 3 ? true : undefined
          )
        )
        const first = yield* jobs.submit({ job_type: "work" })
        // The submit itself handed it to a worker: it comes back running, already placed.
        expect(first.status).toBe("running")
        expect(["w-h1a", "w-h1b"]).toContain(first.worker_id)
        expect(first.attempts).toBe(1)

        const ids = [first.id]
        for (let i = 0; i < 60; i++) ids.push((yield* jobs.submit({ job_type: "work" })).id)
        const rows = yield* eventually(
          Effect.map(statusesOf(ids), (rows) =>
            rows.every((r) => r.status === "completed") ? rows : undefined
          ),
          "20 seconds"
        )
        // Each ran once, under one attempt, with one job_started.
        expect(rows.map((r) => r.attempts)).toEqual(ids.map(() => 1))
        expect(rows.map((r) => r.started)).toEqual(ids.map(() => 1))
        expect([...c.runs].sort()).toEqual([...ids].sort())
        expect(c.peak.get("w-h1a") ?? 0).toBeLessThanOrEqual(2)
        expect(c.peak.get("w-h1b") ?? 0).toBeLessThanOrEqual(3)
        expect(a.worker.stats().handed + b.worker.stats().handed).toBeGreaterThan(0)
        // Idle again: every slot back on offer, none twice.
        yield* eventually(
          Effect.map(Effect.all([offersOf("w-h1a"), offersOf("w-h1b")]), ([x, y]) =>
            x === 2 && y === 3 ? true : undefined
          )
        )
      })
  )

  it.scoped("strict and preferred jobs to an idle target are handed to that target, never to another", () =>
    Effect.gen(function* () {
      const { jobs } = yield* startGateway("gw-h5")
      const c = counting()
      yield* startWorker("h5a", { maxConcurrent: 1, handlers: c.handlers, targetWorkerId: "sandbox-a" })
      yield* startWorker("h5b", { maxConcurrent: 1, handlers: c.handlers })
      const idle = Effect.map(Effect.all([offersOf("w-h5a"), offersOf("w-h5b")]), ([x, y]) =>
        x === 1 && y === 1 ? true : undefined
      )
      for (const worker_affinity of ["strict", "preferred"] as const) {
        for (const target_worker_id of ["w-h5a", "sandbox-a"]) {
          yield* eventually(idle)
          const job = yield* jobs.submit({ job_type: "work", worker_affinity, target_worker_id })
          expect(job).toMatchObject({ status: "running", worker_id: "w-h5a", attempts: 1 })
          const done = yield* eventually(
            Effect.map(jobs.get(job.id), (j) => (j.status === "completed" ? j : undefined))
          )
          expect(done.result).toEqual({ worker: "w-h5a", bytes: 0 })
        }
      }
    })
  )

  it.scoped("a job too large for a NOTIFY is handed over by id and fetched", () =>
    Effect.gen(function* () {
      const { jobs } = yield* startGateway("gw-h2")
      const c = counting()
      const w = yield* startWorker("h2", { handlers: c.handlers })
      yield* eventually(Effect.map(offersOf("w-h2"), (n) => (n === 1 ? true : undefined)))
      const blob = "x".repeat(maxPushBytes + 100)
      const job = yield* jobs.submit({ job_type: "work", payload: { blob } })
      expect(job.status).toBe("running")
      const done = yield* eventually(
        Effect.map(jobs.get(job.id), (j) => (j.status === "completed" ? j : undefined))
      )
      expect(done.result).toEqual({ worker: "w-h2", bytes: blob.length })
      expect(w.worker.stats().handed).toBe(1)
    })
  )

  it.scoped("a hand-off whose NOTIFY was missed runs after a reconnect of the listener", () =>
    Effect.gen(function* () {
      yield* startGateway("gw-h3")
      const c = counting()
      // A poll far away: only the reconnect can bring the job.
      const w = yield* startWorker("h3", { handlers: c.handlers, pollInterval: "60 seconds" })
      const id = yield* handOffSilently("w-h3", "work", {})
      expect(yield* killListener("h3")).toBe(1)
      yield* statusIs(id, "completed")
      expect(c.runs.filter((x) => x === id)).toEqual([id])
      expect((yield* statusesOf([id])).map((r) => [r.attempts, r.started, r.worker_id])).toEqual([
        [1, 1, "w-h3"]
      ])
      expect(w.worker.stats().handed).toBe(1)
    })
  )

  it.scoped("a hand-off whose NOTIFY was missed runs after the next poll period", () =>
    Effect.gen(function* () {
      yield* startGateway("gw-h7")
      const c = counting()
      const w = yield* startWorker("h7", { handlers: c.handlers, pollInterval: "300 millis" })
      const id = yield* handOffSilently("w-h7", "work", {})
      yield* statusIs(id, "completed")
      expect(c.runs.filter((x) => x === id)).toEqual([id])
      expect(w.worker.stats().handed).toBe(1)
    })
  )

  it.scoped(
    "a handed job cancelled before its NOTIFY arrives never starts, and its slot is offered again",
    () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-h8")
        const c = counting()
        yield* startWorker("h8", { handlers: c.handlers, pollInterval: "60 seconds" })
        const id = yield* handOffSilently("w-h8", "work", {})
        // Routed to the job's actor on the worker's node, which finds no run and settles the row.
        expect(yield* jobs.cancel(id, "changed my mind")).toMatchObject({
          status: "cancelled",
          worker_id: "w-h8"
        })
        // The spent offer is counted again: the worker offers its slot and takes the next job.
        yield* eventually(
          Effect.map(offersOf("w-h8"), (n) => (n === 1 ? true : undefined)),
          "5 seconds"
        )
        const next = yield* jobs.submit({ job_type: "work" })
        expect(next).toMatchObject({ status: "running", worker_id: "w-h8" })
        yield* statusIs(next.id, "completed")
        expect(c.runs).toEqual([next.id])
        expect((yield* jobs.get(id)).status).toBe("cancelled")
      })
  )

  it.scoped("a NOTIFY for an attempt that already ended stops its handler without a write", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      yield* startGateway("gw-h9")
      yield* startWorker("h9", { pollInterval: "60 seconds" })
      const k = key()
      const id = yield* handOffSilently("w-h9", "ctl", { key: k })
      // Ended by someone else (a cancel, the reaper) before the worker saw it …
      yield* sql`UPDATE gh_automation_jobs SET status = 'cancelled', finished_at = now() WHERE id = ${id}::uuid`
      // … and then its NOTIFY arrives, as a submit sends it.
      yield* sql`SELECT pg_notify('jobs:h9', ${pushedCtl(id, "w-h9", k)})`
      yield* Deferred.await(slot(k).started)
      yield* Deferred.await(slot(k).interrupted)
      const rows = yield* statusesOf([id])
      expect(rows.map((r) => [r.status, r.started])).toEqual([["cancelled", 0]])
    })
  )

  it.scoped(
    "a cancel pushed right behind its job's NOTIFY (one commit, one read) ends the job cancelled and frees the slot",
    () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw-h9c")
        yield* startWorker("h9c", { pollInterval: "60 seconds" })
        const k = key()
        const id = yield* handOffSilently("w-h9c", "ctl", { key: k })
        // The job's NOTIFY and the cancel push commit together, so they arrive together.
        const cancel = { v: 1, cancel: true, id, worker_id: "w-h9c", attempts: 1, reason: "pushed at once" }
        yield* sql`SELECT pg_notify('jobs:h9c', ${pushedCtl(id, "w-h9c", k)}),
          pg_notify('jobs:h9c', ${JSON.stringify(cancel)})`
        yield* statusIs(id, "cancelled")
        const ended = yield* sql<{ event_type: string; reason: string }>`
          SELECT event_type, metadata->>'reason' AS reason FROM gh_job_events
          WHERE job_id = ${id}::uuid AND event_type = 'job_cancelled'`
        expect(ended).toEqual([{ event_type: "job_cancelled", reason: "pushed at once" }])
        // The worker (one slot) is free again: the next job runs.
        const next = yield* jobs.submit({ job_type: "noop" })
        yield* statusIs(next.id, "completed")
      })
  )

  it.scoped(
    "deregister counts a handed job whose NOTIFY is still on its way: it is cancelled and named",
    () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-h10")
        const c = counting()
        yield* startWorker("h10", { handlers: c.handlers, pollInterval: "60 seconds" })
        const id = yield* handOffSilently("w-h10", "work", {})
        const result = yield* jobs.deregister({
          worker_id: "w-h10",
          reason: "scale_in",
          cancel_active_jobs: true
        })
        expect(result).toEqual({ worker_ids: ["w-h10"], cancelled_job_ids: [id] })
        expect((yield* jobs.get(id)).status).toBe("cancelled")
      })
  )

  it.scoped("an offer left by a node whose lock is gone (it died) is not taken: the job queues", () =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      // No reaper: it would clear the dead node's offer before the submit meets it.
      const { jobs } = yield* startGateway("gw-h6", { reaper: false })
      // A node that died a moment ago: its row still says running, its worker is still active
      // and its offer is still there (the reaper has not run yet), but nobody holds its lock.
      yield* sql`INSERT INTO nodes (id, role, lock_key, status) VALUES ('h6-dead', 'worker', 424242, 'running')`
      yield* sql`INSERT INTO gh_worker_registry (worker_id, node_id, status) VALUES ('w-h6-dead', 'h6-dead', 'active')`
      yield* sql`INSERT INTO job_offers (worker_id, node_id) VALUES ('w-h6-dead', 'h6-dead')`
      const job = yield* jobs.submit({ job_type: "noop" })
      expect(job).toMatchObject({ status: "queued", worker_id: null, attempts: 0 })
      expect(yield* offersOf("w-h6-dead")).toBe(1)
      // A live worker takes it from the queue.
      yield* startWorker("h6")
      const done = yield* eventually(
        Effect.map(jobs.get(job.id), (j) => (j.status === "completed" ? j : undefined))
      )
      expect(done).toMatchObject({ worker_id: "w-h6", attempts: 1 })
      yield* sql`DELETE FROM job_offers WHERE worker_id = 'w-h6-dead'`
      yield* sql`UPDATE gh_worker_registry SET status = 'offline' WHERE worker_id = 'w-h6-dead'`
      yield* sql`UPDATE nodes SET status = 'stopped' WHERE id = 'h6-dead'`
    })
  )

  it.scoped("a draining or stopped worker takes back its offers: submits queue instead", () =>
    Effect.gen(function* () {
      const { jobs } = yield* startGateway("gw-h4")
      const w = yield* startWorker("h4", { maxConcurrent: 2 })
      yield* eventually(Effect.map(offersOf("w-h4"), (n) => (n === 2 ? true : undefined)))
      yield* w.worker.drain("deploy")
      // A claim in flight may lend once more after the drain's withdraw: the reaper or the
      // next catch-up takes it back; no submit can take it (the worker is not active).
      yield* eventually(Effect.map(offersOf("w-h4"), (n) => (n === 0 ? true : undefined)))
      const queued = yield* jobs.submit({ job_type: "noop" })
      expect(queued).toMatchObject({ status: "queued", worker_id: null })

      const v = yield* startWorker("h4b", { maxConcurrent: 1 })
      yield* statusIs(queued.id, "completed")
      yield* eventually(Effect.map(offersOf("w-h4b"), (n) => (n === 1 ? true : undefined)))
      yield* v.stop
      yield* eventually(Effect.map(offersOf("w-h4b"), (n) => (n === 0 ? true : undefined)))
      expect(yield* jobs.submit({ job_type: "noop" })).toMatchObject({ status: "queued", worker_id: null })
    })
  )
})
