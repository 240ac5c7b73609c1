import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Deferred, Effect, Fiber, Queue } from "effect"
import * as Crypto from "node:crypto"
import * as Http from "node:http"
import type { AddressInfo } from "node:net"
import * as CallbackDispatcher from "../../src/runtime/jobs/CallbackDispatcher.ts"
import * as Db from "../fixtures/Db.ts"
import {
  command,
  eventually,
  gate,
  key,
  reportEvents,
  slot,
  startedOf,
  startGateway,
  startWorker,
  statusIs,
  statusOf
} from "../fixtures/Jobs.ts"
import * as JobStorage from "../../src/runtime/jobs/JobStorage.ts"

const eventsOf = (jobId: string) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      sql<{ event_type: string; actor: string | null; metadata: Record<string, unknown>; message: string }>`
      SELECT event_type, actor, metadata, message FROM gh_job_events WHERE job_id = ${jobId}::uuid ORDER BY id`
  )

/** A real HTTP server that fails the first `failures` requests of each idempotency key, then answers 200. */
const callbackServer = (failures: number) =>
  Effect.acquireRelease(
    Effect.async<{
      url: string
      received: Array<{ key: string; status: number; body: Record<string, unknown> }>
      close: () => void
    }>((resume) => {
      const received: Array<{ key: string; status: number; body: Record<string, unknown> }> = []
      const server = Http.createServer((req, res) => {
        const chunks: Array<Buffer> = []
        req.on("data", (c: Buffer) => chunks.push(c))
        req.on("end", () => {
          const key = String(req.headers["idempotency-key"] ?? "")
          const status = received.filter((r) => r.key === key).length < failures ? 503 : 200
          received.push({ key, status, body: JSON.parse(Buffer.concat(chunks).toString("utf8")) })
          res.writeHead(status).end()
        })
      })
      server.listen(0, "127.0.0.1", () =>
        resume(
          Effect.succeed({
            url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/callbacks/valet`,
            received,
            close: () => server.close()
          })
        )
      )
    }),
    (s) => Effect.sync(() => s.close())
  )

describe("jobs and workers", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "an `any` job runs on a worker and completes; events, counters and the client app's IP query agree",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw1")
          const w = yield* startWorker("n1", {
            ec2Ip: "10.0.0.7",
            ec2InstanceId: "i-0abc",
            targetWorkerId: "sandbox-1"
          })
          const k = key()
          const job = yield* jobs.submit({ valet_task_id: "task-1", job_type: "ctl", payload: { key: k } })
          // Queued, or already handed to the idle worker by the submit itself (a slot on offer).
          expect(job.status === "queued" || (job.status === "running" && job.worker_id === "w-n1")).toBe(true)
          expect(job.worker_affinity).toBe("any")
          const started = yield* startedOf(k)
          expect(started.workerId).toBe("w-n1")
          // The client app's query, unchanged, while the worker runs the job.
          const ip = yield* sql<{
            ec2_ip: string
          }>`SELECT ec2_ip FROM gh_worker_registry WHERE worker_id = ${"w-n1"}
          AND status IN ('active','draining') AND ec2_ip IS NOT NULL ORDER BY last_heartbeat DESC LIMIT 1`
          expect(ip[0]?.ec2_ip).toBe("10.0.0.7")
          // Written just after the claim, off the path to the handler's start.
          yield* eventually(
            Effect.map(
              sql<{
                current_job_id: string
              }>`SELECT current_job_id::text FROM gh_worker_registry WHERE worker_id = 'w-n1'`,
              (rows) => (rows[0]?.current_job_id === job.id ? true : undefined)
            )
          )
          yield* command(k, { _tag: "complete", result: { answer: 42 } })
          yield* statusIs(job.id, "completed")
          const done = yield* jobs.get(job.id)
          expect(done.result).toEqual({ answer: 42 })
          expect(done.worker_id).toBe("w-n1")
          const events = yield* eventsOf(job.id)
          expect(events.map((e) => e.event_type)).toEqual(["job_started", "job_completed"])
          for (const e of events) {
            expect(e.actor).toBe("w-n1")
            expect(e.metadata.worker_id).toBe("w-n1")
            expect(typeof e.metadata.elapsed_ms).toBe("number")
          }
          const counters = yield* sql<{ jobs_completed: number; current_job_id: string | null }>`
          SELECT jobs_completed, current_job_id FROM gh_worker_registry WHERE worker_id = 'w-n1'`
          expect(counters[0]).toEqual({ jobs_completed: 1, current_job_id: null })
          const registered = yield* sql<{ metadata: Record<string, unknown> }>`
          SELECT metadata FROM gh_worker_events WHERE worker_id = 'w-n1' AND event_type = 'worker_registered'`
          expect(registered[0]?.metadata).toMatchObject({
            ec2_instance_id: "i-0abc",
            ec2_ip: "10.0.0.7",
            target_worker_id: "sandbox-1"
          })
          // Counted when the worker gets its write's answer, just after the row changed.
          yield* eventually(Effect.sync(() => (w.worker.stats().completed === 1 ? true : undefined)))
        })
    )

    it.scoped(
      "strict jobs run only on their target; an offline, draining or full target refuses them with WORKER_UNAVAILABLE",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw2")
          const a = yield* startWorker("n2a", { targetWorkerId: "sandbox-a" })
          yield* startWorker("n2b")
          const unknown = yield* Effect.flip(
            jobs.submit({ job_type: "noop", worker_affinity: "strict", target_worker_id: "nobody" })
          )
          expect(unknown._tag).toBe("WorkerUnavailable")
          expect(unknown.message).toContain("no such worker")
          // By sandbox id, as the client app sends it.
          const keys = [key(), key(), key()]
          const first = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: keys[0] },
            worker_affinity: "strict",
            target_worker_id: "sandbox-a"
          })
          expect((yield* startedOf(keys[0]!)).workerId).toBe("w-n2a")
          const full = yield* Effect.flip(
            jobs.submit({
              job_type: "ctl",
              payload: { key: keys[1] },
              worker_affinity: "strict",
              target_worker_id: "w-n2a"
            })
          )
          expect(full._tag).toBe("WorkerUnavailable")
          expect(full.message).toContain("full")
          yield* command(keys[0]!, { _tag: "complete" })
          yield* statusIs(first.id, "completed")
          // Many strict jobs in a row, one at a time: every one runs on the target.
          for (let i = 0; i < 3; i++) {
            const k = key()
            const j = yield* eventually(
              jobs
                .submit({
                  job_type: "ctl",
                  payload: { key: k },
                  worker_affinity: "strict",
                  target_worker_id: "sandbox-a"
                })
                .pipe(
                  Effect.option,
                  Effect.map((o) => (o._tag === "Some" ? o.value : undefined))
                )
            )
            expect((yield* startedOf(k)).workerId).toBe("w-n2a")
            yield* command(k, { _tag: "complete" })
            const done = yield* statusIs(j.id, "completed")
            expect(done.worker_id).toBe("w-n2a")
          }
          yield* a.worker.drain("deploy")
          const draining = yield* Effect.flip(
            jobs.submit({ job_type: "noop", worker_affinity: "strict", target_worker_id: "w-n2a" })
          )
          expect(draining.message).toContain("draining")
          yield* a.stop
          const offline = yield* Effect.flip(
            jobs.submit({ job_type: "noop", worker_affinity: "strict", target_worker_id: "w-n2a" })
          )
          expect(offline.message).toContain("offline")
        })
    )

    it.scoped(
      "preferred: an idle target runs it; a busy target gives it to another after the wait; a draining target at once",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw3")
          const target = yield* startWorker("n3t")
          yield* startWorker("n3o")
          const k1 = key()
          yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k1 },
            worker_affinity: "preferred",
            target_worker_id: "w-n3t"
          })
          expect((yield* startedOf(k1)).workerId).toBe("w-n3t")
          // The target is busy now: the next preferred job goes elsewhere after the wait.
          const k2 = key()
          const j2 = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k2 },
            worker_affinity: "preferred",
            target_worker_id: "w-n3t"
          })
          expect((yield* startedOf(k2)).workerId).toBe("w-n3o")
          const events = yield* eventually(Effect.map(eventsOf(j2.id), (e) => (e.length > 0 ? e : undefined)))
          expect(events[0]?.event_type).toBe("job_started")
          expect(events[0]?.metadata.worker_id).toBe("w-n3o")
          yield* command(k1, { _tag: "complete" })
          yield* command(k2, { _tag: "complete" })
          yield* statusIs(j2.id, "completed")
          yield* target.worker.drain("scale-down")
          const k3 = key()
          yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k3 },
            worker_affinity: "preferred",
            target_worker_id: "w-n3t"
          })
          expect((yield* startedOf(k3)).workerId).toBe("w-n3o")
          yield* command(k3, { _tag: "complete" })
        })
    )

    it.scoped(
      "cancel reaches the node that runs the job, interrupts its handler at once and records who ran it",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw4")
          yield* startWorker("n4")
          const k = key()
          const job = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k },
            callback_url: "http://127.0.0.1:9/cb"
          })
          yield* startedOf(k)
          const state = yield* jobs.cancel(job.id, "user pressed stop")
          expect(state).toMatchObject({
            job_id: job.id,
            status: "cancelled",
            worker_id: "w-n4",
            node_id: "n4"
          })
          expect(yield* Deferred.isDone(slot(k).interrupted)).toBe(true)
          const row = yield* statusOf(job.id)
          expect(row).toMatchObject({ status: "cancelled", worker_id: "w-n4", error_code: "CANCELLED" })
          const events = yield* eventsOf(job.id)
          const cancelled = events.find((e) => e.event_type === "job_cancelled")!
          expect(cancelled.metadata).toMatchObject({
            worker_id: "w-n4",
            node_id: "n4",
            reason: "user pressed stop"
          })
          const sql = yield* SqlClient.SqlClient
          const callbacks = yield* sql<{ status: string; payload: Record<string, unknown> }>`
          SELECT status, payload FROM callback_outbox WHERE job_id = ${job.id}::uuid ORDER BY id`
          expect(callbacks.map((c) => c.status)).toEqual(["running", "cancelled"])
          expect(callbacks[1]!.payload).toMatchObject({
            job_id: job.id,
            status: "cancelled",
            worker_id: "w-n4"
          })
          // A terminal state never changes; an unknown job is NOT_FOUND; a queued one is cancelled in its row.
          const again = yield* Effect.flip(jobs.cancel(job.id))
          expect(again._tag).toBe("Conflict")
          const missing = yield* Effect.flip(jobs.cancel(Crypto.randomUUID()))
          expect(missing._tag).toBe("NotFound")
          const bad = yield* Effect.flip(jobs.cancel("not-a-uuid"))
          expect(bad._tag).toBe("InvalidRequest")
        })
    )

    it.scoped(
      "the cancel is pushed to the owning node with the lookup: that push alone stops the handler, a stale attempt's push does nothing",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw4p")
          yield* startWorker("n4p", { maxConcurrent: 2 })
          const sql = yield* SqlClient.SqlClient
          const push = (jobId: string, attempts: number, reason: string) =>
            sql`SELECT pg_notify('jobs:n4p', ${JSON.stringify({ v: 1, cancel: true, id: jobId, worker_id: "w-n4p", attempts, reason })})`
          // A push naming another attempt of the job is not this run's: the handler goes on.
          const k1 = key()
          const stale = yield* jobs.submit({ job_type: "ctl", payload: { key: k1 } })
          yield* startedOf(k1)
          yield* push(stale.id, 7, "stale")
          // The push for the live attempt below is sent after this one on the same channel, so
          // when it has been acted on, so has this.
          const k2 = key()
          const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k2 } })
          yield* startedOf(k2)
          yield* push(job.id, 1, "pushed stop")
          yield* Deferred.await(slot(k2).interrupted)
          yield* statusIs(job.id, "cancelled")
          expect(yield* statusOf(job.id)).toMatchObject({ worker_id: "w-n4p", error_code: "CANCELLED" })
          const ended = (yield* eventsOf(job.id)).filter((e) => e.event_type === "job_cancelled")
          expect(ended.map((e) => e.metadata)).toMatchObject([{ worker_id: "w-n4p", reason: "pushed stop" }])
          expect(yield* Deferred.isDone(slot(k1).interrupted)).toBe(false)
          expect((yield* statusOf(stale.id)).status).toBe("running")
          // The gateway's cancel sends that push with its lookup, and still answers with the end.
          const listener = yield* Db.rawClient
          yield* Effect.promise(() => listener.query(`LISTEN "jobs:n4p"`))
          const heard: Array<string> = []
          listener.on("notification", (n) => heard.push(n.payload ?? ""))
          const state = yield* jobs.cancel(stale.id, "user pressed stop")
          expect(state).toMatchObject({
            job_id: stale.id,
            status: "cancelled",
            worker_id: "w-n4p",
            node_id: "n4p"
          })
          yield* Deferred.await(slot(k1).interrupted)
          expect(heard.map((h) => JSON.parse(h))).toContainEqual({
            v: 1,
            cancel: true,
            id: stale.id,
            worker_id: "w-n4p",
            attempts: 1,
            reason: "user pressed stop"
          })
          const events = yield* eventsOf(stale.id)
          expect(events.filter((e) => e.event_type === "job_cancelled")).toHaveLength(1)
        })
    )

    it.scoped("a queued job is cancelled in its row without any worker", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw5")
        const job = yield* jobs.submit({ job_type: "noop" })
        const state = yield* jobs.cancel(job.id)
        expect(state.status).toBe("cancelled")
        expect((yield* statusOf(job.id)).status).toBe("cancelled")
        const w = yield* startWorker("n5")
        w.worker.wake()
        const later = yield* jobs.submit({ job_type: "noop" })
        yield* statusIs(later.id, "completed")
        expect((yield* statusOf(job.id)).status).toBe("cancelled")
      })
    )

    it.scoped(
      "needs_human pauses the job on its worker; resume continues it there; resuming a running job is a CONFLICT",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw6")
          yield* startWorker("n6")
          const k = key()
          const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
          yield* startedOf(k)
          const early = yield* Effect.flip(jobs.resume(job.id, { resolved_by: "human" }))
          expect(early._tag).toBe("Conflict")
          yield* command(k, { _tag: "needs_human", timeoutSeconds: 60 })
          yield* statusIs(job.id, "needs_human")
          const paused = yield* jobs.get(job.id)
          expect(paused.interaction).toMatchObject({
            type: "captcha",
            captcha_type: "recaptcha_v2",
            timeout_seconds: 60
          })
          const state = yield* jobs.resume(job.id, {
            resolved_by: "human",
            resolution_data: { solved: true }
          })
          expect(state).toMatchObject({ status: "running", worker_id: "w-n6", node_id: "n6" })
          const answer = yield* Queue.take(slot(k).resumed)
          expect(answer).toMatchObject({ resolved_by: "human", resolution_data: { solved: true } })
          yield* command(k, { _tag: "complete" })
          yield* statusIs(job.id, "completed")
          const types = (yield* eventsOf(job.id)).map((e) => e.event_type)
          expect(types).toEqual([
            "job_started",
            "interaction_needed",
            "interaction_resolved",
            "job_completed"
          ])
          const bad = yield* Effect.flip(jobs.resume(job.id, { resolved_by: "" }))
          expect(bad._tag).toBe("InvalidRequest")
        })
    )

    it.scoped("a pause that outlives its timeout fails the job with HITL_TIMEOUT", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw7")
        yield* startWorker("n7")
        const k = key()
        const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)
        yield* command(k, { _tag: "needs_human", timeoutSeconds: 1 })
        const row = yield* statusIs(job.id, "failed")
        expect(row.error_code).toBe("HITL_TIMEOUT")
        const late = yield* Effect.flip(jobs.resume(job.id, { resolved_by: "human" }))
        expect(late._tag).toBe("Conflict")
      })
    )

    it.scoped(
      "a worker that dies: its `any` job runs elsewhere, its strict job fails with WORKER_UNAVAILABLE",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw8")
          const doomed = yield* startWorker("n8d", { maxConcurrent: 2 })
          const kAny = key()
          const kStrict = key()
          const anyJob = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: kAny },
            target_worker_id: "w-n8d",
            worker_affinity: "preferred"
          })
          const strictJob = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: kStrict },
            target_worker_id: "w-n8d",
            worker_affinity: "strict"
          })
          yield* startedOf(kAny)
          yield* startedOf(kStrict)
          yield* doomed.stop
          yield* startWorker("n8s")
          const failed = yield* statusIs(strictJob.id, "failed")
          expect(failed.error_code).toBe("WORKER_UNAVAILABLE")
          yield* eventually(Effect.sync(() => (slot(kAny).runs.length === 2 ? true : undefined)))
          expect(slot(kAny).runs).toEqual(["w-n8d", "w-n8s"])
          expect(slot(kStrict).runs).toEqual(["w-n8d"])
          const moved = yield* statusOf(anyJob.id)
          expect(moved).toMatchObject({ status: "running", worker_id: "w-n8s", attempts: 2, node_id: "n8s" })
          // The cancel follows the job to its new node.
          const state = yield* jobs.cancel(anyJob.id)
          expect(state).toMatchObject({ status: "cancelled", node_id: "n8s" })
          const types = (yield* eventsOf(anyJob.id)).map((e) => e.event_type)
          expect(types).toEqual(["job_started", "job_requeued", "job_started", "job_cancelled"])
        })
    )

    it.scoped(
      "timeout_seconds: an attempt past its deadline is stopped and retried, then failed with TIMEOUT",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw9")
          yield* startWorker("n9")
          const k = key()
          const job = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k },
            timeout_seconds: 1,
            max_attempts: 2
          })
          const row = yield* statusIs(job.id, "failed")
          expect(row).toMatchObject({ error_code: "TIMEOUT", attempts: 2 })
          expect(slot(k).runs).toEqual(["w-n9", "w-n9"])
        })
    )

    it.scoped(
      "deregister by sandbox id cancels the active jobs, returns their ids and takes the worker offline",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw10")
          yield* startWorker("n10", { targetWorkerId: "sandbox-10" })
          const k = key()
          const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
          yield* startedOf(k)
          const queuedStrict = yield* Effect.flip(
            jobs.submit({ job_type: "noop", worker_affinity: "strict", target_worker_id: "sandbox-10" })
          )
          expect(queuedStrict._tag).toBe("WorkerUnavailable")
          const result = yield* jobs.deregister({
            target_worker_id: "sandbox-10",
            reason: "sandbox_terminated",
            cancel_active_jobs: true,
            drain_timeout_seconds: 30
          })
          expect(result).toEqual({ worker_ids: ["w-n10"], cancelled_job_ids: [job.id] })
          expect((yield* statusOf(job.id)).status).toBe("cancelled")
          const w = yield* sql<{ status: string; deregister_reason: string }>`
          SELECT status, deregister_reason FROM gh_worker_registry WHERE worker_id = 'w-n10'`
          expect(w[0]).toEqual({ status: "offline", deregister_reason: "sandbox_terminated" })
          const ev = yield* sql<{ event_type: string; metadata: Record<string, unknown> }>`
          SELECT event_type, metadata FROM gh_worker_events WHERE worker_id = 'w-n10' ORDER BY id`
          const types = ev.map((e) => e.event_type)
          expect(types).toContain("worker_draining")
          const last = ev.at(-1)!
          expect(last.event_type).toBe("worker_deregistered")
          expect(last.metadata).toMatchObject({ reason: "sandbox_terminated", jobs_completed: 0 })
          expect(typeof last.metadata.uptime_seconds).toBe("number")
          const unknown = yield* Effect.flip(jobs.deregister({ worker_id: "nobody" }))
          expect(unknown._tag).toBe("NotFound")
        })
    )

    it.scoped(
      "deregister without cancel_active_jobs waits up to drain_timeout_seconds: a job that finishes in time completes, one that does not is cancelled with its callback",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw21")
          yield* startWorker("n21", { targetWorkerId: "sandbox-21" })
          yield* startWorker("n22", { targetWorkerId: "sandbox-22" })
          const callbackUrl = "http://127.0.0.1:9/callback"

          // Finishes while the deregister waits: nothing is cancelled.
          const k1 = key()
          const first = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k1 },
            worker_affinity: "strict",
            target_worker_id: "sandbox-21",
            callback_url: callbackUrl
          })
          yield* startedOf(k1)
          const waiting = yield* Effect.fork(
            jobs.deregister({
              target_worker_id: "sandbox-21",
              reason: "scale_in",
              cancel_active_jobs: false,
              drain_timeout_seconds: 30
            })
          )
          // The worker drains first: wait for that, then let the job finish.
          yield* eventually(
            Effect.map(
              sql<{ status: string }>`SELECT status FROM gh_worker_registry WHERE worker_id = 'w-n21'`,
              (rows) => (rows[0]?.status === "draining" ? true : undefined)
            )
          )
          yield* command(k1, { _tag: "complete" })
          expect(yield* Fiber.join(waiting)).toEqual({ worker_ids: ["w-n21"], cancelled_job_ids: [] })
          expect((yield* statusOf(first.id)).status).toBe("completed")

          // Outlives a 1 s drain: cancelled when it ends, with a `cancelled` callback.
          const k2 = key()
          const second = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k2 },
            worker_affinity: "strict",
            target_worker_id: "sandbox-22",
            callback_url: callbackUrl
          })
          yield* startedOf(k2)
          const result = yield* jobs.deregister({
            target_worker_id: "sandbox-22",
            reason: "scale_in",
            cancel_active_jobs: false,
            drain_timeout_seconds: 1
          })
          expect(result).toEqual({ worker_ids: ["w-n22"], cancelled_job_ids: [second.id] })
          expect((yield* statusOf(second.id)).status).toBe("cancelled")
          const outbox = yield* sql<{ job_id: string; status: string }>`
            SELECT job_id::text AS job_id, status FROM callback_outbox
            WHERE job_id IN (${first.id}::uuid, ${second.id}::uuid) ORDER BY id`
          expect(outbox.filter((r) => r.job_id === first.id).map((r) => r.status)).toEqual([
            "running",
            "completed"
          ])
          expect(outbox.filter((r) => r.job_id === second.id).map((r) => r.status)).toEqual([
            "running",
            "cancelled"
          ])
          const offline = yield* sql<{ worker_id: string; status: string }>`
            SELECT worker_id, status FROM gh_worker_registry WHERE worker_id IN ('w-n21', 'w-n22') ORDER BY worker_id`
          expect(offline).toEqual([
            { worker_id: "w-n21", status: "offline" },
            { worker_id: "w-n22", status: "offline" }
          ])
        })
    )

    it.scoped(
      "handler reports become events with progress, and token usage becomes the cost in the job and its callback",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw11")
          yield* startWorker("n11")
          const job = yield* jobs.submit({ job_type: "report", callback_url: "http://127.0.0.1:9/cb" })
          yield* statusIs(job.id, "completed")
          const events = yield* eventsOf(job.id)
          expect(events.map((e) => e.event_type)).toEqual(reportEvents)
          const step = events.find((e) => e.event_type === "step_started")!
          expect(step.metadata).toMatchObject({ worker_id: "w-n11", step_index: 1, total_steps: 2 })
          expect(events.find((e) => e.event_type === "mode_switched")!.metadata).toMatchObject({
            fromMode: "cookbook",
            toMode: "ai"
          })
          const cost = (yield* jobs.get(job.id)).cost as Record<string, unknown>
          // 10,000 in × $3/M + 2,000 out × $15/M = $0.06; 3,230 × $1/M = $0.00323
          expect(cost).toEqual({
            total_cost_usd: 0.06323,
            action_count: 2,
            total_tokens: 15_230,
            breakdown: [
              { model: "claude-sonnet-4-20250514", tokens: 12_000, cost_usd: 0.06 },
              { model: "claude-haiku-4-5-20251001", tokens: 3_230, cost_usd: 0.00323 }
            ]
          })
          const callbacks = yield* sql<{ status: string; payload: Record<string, unknown> }>`
          SELECT status, payload FROM callback_outbox WHERE job_id = ${job.id}::uuid ORDER BY id`
          expect(callbacks.map((c) => c.status)).toEqual(["running", "completed"])
          expect(callbacks[1]!.payload).toMatchObject({
            job_id: job.id,
            status: "completed",
            worker_id: "w-n11",
            target_worker_id: null,
            cost,
            result: { submitted: true },
            error_code: null
          })
        })
    )

    it.scoped(
      "callbacks: each status of a job reaches a real HTTP server once per idempotency key, through two failures",
      () =>
        Effect.gen(function* () {
          const server = yield* callbackServer(2)
          const { jobs, node } = yield* startGateway("gw13")
          yield* CallbackDispatcher.make({
            node,
            nodeId: node.id,
            retryDelays: ["50 millis", "100 millis", "150 millis"]
          })
          yield* startWorker("n13")
          const k = key()
          const job = yield* jobs.submit({
            valet_task_id: "task-13",
            job_type: "ctl",
            payload: { key: k },
            callback_url: server.url
          })
          yield* startedOf(k)
          yield* command(k, { _tag: "needs_human", timeoutSeconds: 60 })
          yield* statusIs(job.id, "needs_human")
          yield* jobs.resume(job.id, { resolved_by: "human" })
          yield* command(k, { _tag: "complete", result: { ok: 1 } })
          const delivered = yield* eventually(
            Effect.sync(() => {
              const ok = server.received.filter((r) => r.status === 200)
              return ok.length === 4 ? ok : undefined
            })
          )
          expect(delivered.map((r) => r.body.status)).toEqual([
            "running",
            "needs_human",
            "running",
            "completed"
          ])
          expect(new Set(delivered.map((r) => r.key)).size).toBe(4)
          // Two failed attempts per key before the success, and never a second success.
          for (const r of delivered) expect(server.received.filter((x) => x.key === r.key).length).toBe(3)
          for (const r of delivered) {
            expect(r.body).toMatchObject({
              job_id: job.id,
              valet_task_id: "task-13",
              worker_id: "w-n13",
              target_worker_id: null
            })
            expect(r.body.cost).toMatchObject({
              total_cost_usd: 0,
              action_count: 0,
              total_tokens: 0,
              breakdown: []
            })
          }
          expect(delivered[1]!.body.interaction).toMatchObject({
            type: "captcha",
            captcha_type: "recaptcha_v2"
          })
          expect(delivered[3]!.body).toMatchObject({
            result: { ok: 1 },
            error_code: null,
            error_message: null
          })
        })
    )

    it.scoped("submitMany: a batch of mixed jobs all run; one bad input in a batch stores nothing", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw14")
        yield* startWorker("n14a", { maxConcurrent: 8 })
        yield* startWorker("n14b", { maxConcurrent: 8 })
        const countJobs = Effect.map(
          sql<{ n: number }>`SELECT count(*)::int AS n FROM gh_automation_jobs`,
          (r) => r[0]!.n
        )
        const before = yield* countJobs
        const unavailable = yield* Effect.flip(
          jobs.submitMany([
            { job_type: "noop" },
            { job_type: "noop", worker_affinity: "strict", target_worker_id: "nobody" }
          ])
        )
        expect(unavailable._tag).toBe("WorkerUnavailable")
        expect(yield* countJobs).toBe(before)
        const refused = yield* Effect.flip(
          jobs.submitMany([{ job_type: "noop" }, { job_type: "noop", priority: "x" }])
        )
        expect(refused._tag).toBe("InvalidRequest")
        expect(refused.message).toContain("job 1")
        expect(yield* countJobs).toBe(before)
        const batch = [
          ...Array.from({ length: 60 }, () => ({ job_type: "noop" })),
          ...Array.from({ length: 10 }, () => ({
            job_type: "noop",
            worker_affinity: "preferred",
            target_worker_id: "w-n14b"
          })),
          { job_type: "noop", worker_affinity: "strict", target_worker_id: "w-n14a" }
        ]
        const submitted = yield* jobs.submitMany(batch)
        expect(submitted.length).toBe(71)
        // In input order.
        expect(submitted.map((j) => j.worker_affinity)).toEqual(
          batch.map((b) => (b as { worker_affinity?: string }).worker_affinity ?? "any")
        )
        const ids = submitted.map((j) => j.id)
        const done = yield* eventually(
          Effect.map(
            sql<{ status: string; worker_id: string; worker_affinity: string }>`
              SELECT status, worker_id, worker_affinity FROM gh_automation_jobs WHERE id = ANY(${ids}::uuid[])`,
            (rows) => (rows.every((r) => r.status === "completed") ? rows : undefined)
          )
        )
        expect(done.filter((r) => r.worker_affinity === "strict").map((r) => r.worker_id)).toEqual(["w-n14a"])
        const counters = yield* sql<{
          n: number
        }>`SELECT sum(jobs_completed)::int AS n FROM gh_worker_registry WHERE worker_id IN ('w-n14a', 'w-n14b')`
        expect(counters[0]!.n).toBe(71)
      })
    )

    it.scoped(
      "concurrent strict submits never overfill a target, and a strict job stranded on an offline target fails",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw15")
          const w = yield* startWorker("n15", { maxConcurrent: 2 })
          yield* w.worker.drain("hold claims so the slots stay queued")
          yield* sql`UPDATE gh_worker_registry SET status = 'active' WHERE worker_id = 'w-n15'`
          const results = yield* Effect.forEach(
            Array.from({ length: 8 }, () => ({
              job_type: "noop",
              worker_affinity: "strict",
              target_worker_id: "w-n15"
            })),
            (input) => Effect.either(jobs.submit(input)),
            { concurrency: "unbounded" }
          )
          const accepted = results.filter((r) => r._tag === "Right")
          expect(accepted.length).toBe(2)
          for (const r of results) if (r._tag === "Left") expect(r.left.message).toContain("full")
          // The target goes offline behind the job service's back (as when a submit races its death).
          yield* sql`UPDATE gh_worker_registry SET status = 'offline' WHERE worker_id = 'w-n15'`
          for (const r of accepted) {
            const failed = yield* statusIs(r.right.id, "failed")
            expect(failed.error_code).toBe("WORKER_UNAVAILABLE")
          }
        })
    )

    it.scoped("a stale owner's late end is rejected: the attempt number fences it", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw16")
        const a = yield* startWorker("n16a")
        const k = key()
        const job = yield* jobs.submit({
          job_type: "gated",
          payload: { key: k },
          worker_affinity: "preferred",
          target_worker_id: "w-n16a"
        })
        expect(yield* Deferred.await(gate(k, 1).started)).toBe("w-n16a")
        // Its job_started is written (a worker stops an attempt found ended by that write).
        yield* eventually(
          Effect.map(eventsOf(job.id), (events) =>
            events.some((e) => e.event_type === "job_started") ? true : undefined
          )
        )
        // The system gives up on attempt 1 while its worker still runs it (as after a partition).
        const storage = yield* JobStorage.make()
        yield* storage.reap({
          staleSeconds: 30,
          graceSeconds: 0,
          backoffBaseMs: 0,
          backoffMaxMs: 0,
          only: { jobId: job.id, epoch: 1 }
        })
        yield* startWorker("n16b")
        yield* sql`SELECT pg_notify('jobs:any', 'test')`
        expect(yield* Deferred.await(gate(k, 2).started)).toBe("w-n16b")
        // Attempt 1 ends late: its write must change nothing.
        yield* Deferred.succeed(gate(k, 1).open, undefined)
        // Worker A has tried to record its end and let the run go.
        yield* eventually(Effect.sync(() => (a.worker.runningJobIds().includes(job.id) ? undefined : true)))
        const mid = yield* statusOf(job.id)
        expect(mid).toMatchObject({ status: "running", worker_id: "w-n16b", attempts: 2 })
        yield* Deferred.succeed(gate(k, 2).open, undefined)
        yield* statusIs(job.id, "completed")
        expect((yield* jobs.get(job.id)).result).toEqual({ worker: "w-n16b", attempt: 2 })
        const completions = (yield* eventsOf(job.id)).filter((e) => e.event_type === "job_completed")
        expect(completions.length).toBe(1)
        expect(completions[0]!.actor).toBe("w-n16b")
      })
    )

    it.scoped("a result Postgres or JSON cannot hold fails that job only; the worker keeps working", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw17")
        yield* startWorker("n17", { maxConcurrent: 4 })
        const [bad, nul, ok] = yield* jobs.submitMany([
          { job_type: "bigint" },
          { job_type: "nul" },
          { job_type: "noop" }
        ])
        const failed = yield* statusIs(bad!.id, "failed")
        expect(failed.error_code).toBe("RESULT_NOT_SERIALIZABLE")
        yield* statusIs(nul!.id, "completed")
        expect((yield* jobs.get(nul!.id)).result).toEqual({ text: "ab" })
        yield* statusIs(ok!.id, "completed")
      })
    )

    it.scoped("a worker taken for dead during a blip registers again and takes work", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw18")
        yield* startWorker("n18", { heartbeat: "100 millis" })
        // As the reaper does when the worker's lock session drops for a moment.
        yield* sql`UPDATE gh_worker_registry SET status = 'offline' WHERE worker_id = 'w-n18'`
        yield* eventually(
          Effect.map(
            sql<{ status: string }>`SELECT status FROM gh_worker_registry WHERE worker_id = 'w-n18'`,
            (r) => (r[0]?.status === "active" ? true : undefined)
          )
        )
        const job = yield* jobs.submit({ job_type: "noop" })
        yield* statusIs(job.id, "completed")
      })
    )

    it.scoped(
      "a node that crashed and restarts under the same id settles the jobs its earlier process held",
      () =>
        Effect.gen(function* () {
          const { jobs } = yield* startGateway("gw19")
          const first = yield* startWorker("n19", { workerId: "w-n19" })
          const k = key()
          const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
          yield* startedOf(k)
          // Stopped and back before any reaper round could see the node dead.
          yield* first.stop
          yield* startWorker("n19", { workerId: "w-n19" })
          yield* eventually(Effect.sync(() => (slot(k).runs.length === 2 ? true : undefined)))
          expect(yield* statusOf(job.id)).toMatchObject({
            status: "running",
            attempts: 2,
            worker_id: "w-n19"
          })
          yield* command(k, { _tag: "complete" })
          yield* statusIs(job.id, "completed")
        })
    )

    it.scoped("a cancel of a job whose node is gone is settled in its row at once", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        // No reaper: it would fail this strict job of a dead node before the cancel could land.
        const { jobs } = yield* startGateway("gw20", { reaper: false })
        const w = yield* startWorker("n20")
        const k = key()
        const job = yield* jobs.submit({
          job_type: "ctl",
          payload: { key: k },
          worker_affinity: "strict",
          target_worker_id: "w-n20"
        })
        yield* startedOf(k)
        // The node is gone as far as the database knows; the job still reads running (no reaper round).
        yield* sql`UPDATE nodes SET status = 'stopped' WHERE id = 'n20'`
        const state = yield* jobs.cancel(job.id, "user")
        expect(state).toMatchObject({ status: "cancelled", worker_id: "w-n20" })
        expect((yield* statusOf(job.id)).status).toBe("cancelled")
        yield* w.stop
      })
    )

    it.scoped("bad submissions get typed errors and nothing is stored", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw12")
        const countJobs = Effect.map(
          sql<{ n: number }>`SELECT count(*)::int AS n FROM gh_automation_jobs`,
          (r) => r[0]!.n
        )
        const before = yield* countJobs
        for (const bad of [
          {},
          { job_type: "x", worker_affinity: "sometimes" },
          { job_type: "x", worker_affinity: "strict" },
          { job_type: "x", priority: "high" },
          { job_type: "x", callback_url: "ftp://nope" },
          { job_type: "x", surprise: 1 },
          "not an object"
        ]) {
          const e = yield* Effect.flip(jobs.submit(bad))
          expect(e._tag).toBe("InvalidRequest")
        }
        expect(yield* countJobs).toBe(before)
      })
    )
  })
})
