/**
 * The client app's edge across OS processes: a gateway process and two worker processes
 * (each `troupe start` with its role), a client on a real WebSocket in the test process.
 * Submits strict, preferred and any jobs and watches them; cancels a running job and
 * receives `cancelled` with the worker that ran it; resumes a `needs_human` job; drains and
 * deregisters a worker; and cuts the connection mid-stream, then resumes with
 * `since_event_id`: every event exactly once, in order.
 */
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"
import { connect, eventsOf, type Frame, type WsClient } from "../fixtures/Ws.ts"

const secret = "e2e-service-secret-5b0c"
const bin = [`${Processes.root}/bin/troupe.js`, "start"]

/** `troupe start` with a role, on the test's database. */
const troupe = (nodeId: string, env: Record<string, string>) =>
  Effect.gen(function* () {
    const urls = yield* Database.DatabaseUrls
    return yield* Processes.start(process.execPath, bin, {
      env: Processes.cleanEnv({
        DATABASE_URL: Redacted.value(urls.url),
        TROUPE_NODE_ID: nodeId,
        TROUPE_HEARTBEAT_MS: "1000",
        GH_WORKER_HEARTBEAT_MS: "1000",
        GH_SERVICE_SECRET: secret,
        ...env
      })
    })
  })

const request = (c: WsClient, frame: Frame) =>
  Effect.flatMap(c.request(frame, "20 seconds"), (reply) =>
    reply.ok === true
      ? Effect.succeed(reply.result)
      : Effect.fail(new Error(`${frame.type}: ${JSON.stringify(reply.error)}`))
  )

const eventOf = (c: WsClient, subscription: string, jobId: string, type: string) =>
  c
    .waitFor(
      (f) => eventsOf(f, subscription).find((e) => e.job_id === jobId && e.event_type === type),
      "20 seconds"
    )
    .pipe(
      Effect.mapError(
        (e) =>
          new Error(
            `no ${type} for job ${jobId}; its events: ${JSON.stringify(eventsOf(c.frames, subscription).filter((x) => x.job_id === jobId))} ${e.message.slice(0, 200)}`
          )
      )
    )

describe("the edge across processes", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a client steers two worker processes through a gateway process, and resumes its stream after a cut",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const gateway = yield* troupe("e2e-gw", { TROUPE_ROLE: "gateway" })
          const line = yield* gateway.waitFor(/ws:\/\/127\.0\.0\.1:(\d+)\/v1\/ws/, { within: "40 seconds" })
          const port = /:(\d+)\//.exec(line)![1]
          const url = `ws://127.0.0.1:${port}/v1/ws`
          // Wrong secrets, every way in: refused, and (checked at the end) never printed.
          const wrongSecret = "e2e-wrong-secret-77d1"
          const refused = yield* connect(url, { secret: wrongSecret }).pipe(Effect.flip)
          expect(refused.message).toContain("HTTP 401")
          const wrongFrame = yield* connect(url)
          wrongFrame.send({ v: 1, type: "auth", id: "a1", token: wrongSecret })
          expect(yield* wrongFrame.closed("20 seconds")).toMatchObject({ code: 4401 })
          const rest = yield* Effect.tryPromise(() =>
            fetch(`http://127.0.0.1:${port}/api/v1/monitoring/workers`, {
              headers: { authorization: `Bearer ${wrongSecret}` }
            })
          )
          expect(rest.status).toBe(401)
          yield* Effect.all(
            ["e2e-a", "e2e-b"].map((w) =>
              Effect.flatMap(
                troupe(`node-${w}`, { TROUPE_ROLE: "worker", GH_WORKER_ID: w, MAX_CONCURRENT_JOBS: "2" }),
                (p) => p.waitFor(/worker\s+e2e-/, { within: "40 seconds" })
              )
            ),
            { concurrency: "unbounded" }
          )
          const c = yield* connect(url, { secret })
          const all = yield* c.request({ type: "subscribe", all: true })
          expect(all.ok).toBe(true)

          // strict, preferred and any
          const strict = yield* request(c, {
            type: "job.submit",
            job: { job_type: "echo", payload: { n: 1 }, worker_affinity: "strict", target_worker_id: "e2e-a" }
          })
          const preferred = yield* request(c, {
            type: "job.submit",
            job: {
              job_type: "echo",
              payload: { n: 2 },
              worker_affinity: "preferred",
              target_worker_id: "e2e-b"
            }
          })
          const any = yield* request(c, {
            type: "job.submit",
            job: { job_type: "noop", valet_task_id: "task-9" }
          })
          for (const job of [strict, preferred, any]) yield* eventOf(c, all.id, job.id, "job_completed")
          expect(yield* request(c, { type: "job.get", job_id: strict.id })).toMatchObject({
            status: "completed",
            worker_id: "e2e-a",
            result: { n: 1 }
          })
          expect(yield* request(c, { type: "job.get", job_id: preferred.id })).toMatchObject({
            status: "completed",
            worker_id: "e2e-b"
          })
          const started = yield* eventOf(c, all.id, any.id, "job_started")
          expect(["e2e-a", "e2e-b"]).toContain(started.worker_id)
          expect(started.valet_task_id).toBe("task-9")

          // cancel a running job: `cancelled` names the worker that ran it
          const long = yield* request(c, {
            type: "job.submit",
            job: {
              job_type: "sleep",
              payload: { ms: 600_000 },
              worker_affinity: "strict",
              target_worker_id: "e2e-b"
            }
          })
          yield* eventOf(c, all.id, long.id, "job_started")
          expect(yield* request(c, { type: "job.cancel", job_id: long.id })).toMatchObject({
            status: "cancelled",
            worker_id: "e2e-b"
          })
          expect(yield* eventOf(c, all.id, long.id, "job_cancelled")).toMatchObject({ worker_id: "e2e-b" })

          // resume a needs_human job
          const human = yield* request(c, {
            type: "job.submit",
            job: { job_type: "ask_human", payload: { message: "solve the captcha" } }
          })
          yield* eventOf(c, all.id, human.id, "interaction_needed")
          yield* request(c, {
            type: "job.resume",
            job_id: human.id,
            resolved_by: "ops",
            resolution_data: { ok: 1 }
          })
          yield* eventOf(c, all.id, human.id, "job_completed")
          expect(yield* request(c, { type: "job.get", job_id: human.id })).toMatchObject({
            status: "completed",
            result: { resolved_by: "ops", resolution_data: { ok: 1 } }
          })

          // cut the connection mid-stream, reconnect, resume from the last event seen
          // A job held until a human answers: its end is written during the outage, whatever
          // the burst's timing, so the resumed subscription has something to replay.
          const paused = yield* request(c, {
            type: "job.submit",
            job: { job_type: "ask_human", payload: { message: "hold on" } }
          })
          yield* eventOf(c, all.id, paused.id, "interaction_needed")
          const burst = yield* Effect.forEach(
            Array.from({ length: 40 }, (_, i) => i),
            (i) => request(c, { type: "job.submit", job: { job_type: "echo", payload: { i } } })
          )
          yield* c.waitFor((f) =>
            eventsOf(f, all.id).some((x) => burst.some((j) => j.id === x.job_id)) ? true : undefined
          )
          c.ws.terminate()
          // What the client had when the connection died (a terminated socket delivers nothing more).
          const seenBefore = eventsOf(c.frames, all.id)
          const last = seenBefore.at(-1)!.event_id
          expect(seenBefore.some((e) => e.job_id === paused.id && e.event_type === "job_completed")).toBe(
            false
          )
          // While the client is away, someone else answers the held job and sees it finish.
          const ops = yield* connect(url, { secret })
          const watch = yield* request(ops, { type: "subscribe", job_id: paused.id })
          yield* request(ops, { type: "job.resume", job_id: paused.id, resolved_by: "ops" })
          const finished = yield* eventOf(ops, watch.subscription, paused.id, "job_completed")
          const again = yield* connect(url, { secret })
          const resumed = yield* again.request({ type: "subscribe", all: true, since_event_id: last })
          expect(resumed.ok).toBe(true)
          // Replayed from the tables first (then any live ones that came meanwhile), all before
          // the reply: at least the end of the held job, which the gateway had already streamed.
          const beforeReply = eventsOf(again.frames.slice(0, again.frames.indexOf(resumed)), resumed.id)
          expect(resumed.result.replayed).toBeGreaterThan(0)
          expect(beforeReply.length).toBeGreaterThanOrEqual(resumed.result.replayed)
          const replayed = beforeReply.slice(0, resumed.result.replayed)
          expect(replayed.map((e) => e.event_id)).toContain(finished.event_id)
          yield* again
            .waitFor((f) => {
              const union = [...seenBefore, ...eventsOf(f, resumed.id)]
              return burst.every((j) =>
                union.some((e) => e.job_id === j.id && e.event_type === "job_completed")
              )
                ? true
                : undefined
            }, "30 seconds")
            .pipe(
              Effect.catchAll((e) =>
                Effect.gen(function* () {
                  const union = [...seenBefore, ...eventsOf(again.frames, resumed.id)]
                  const missing = burst
                    .filter((j) => !union.some((x) => x.job_id === j.id && x.event_type === "job_completed"))
                    .map((j) => j.id)
                  const rows = yield* sql<{ id: string; status: string }>`
                  SELECT id::text AS id, status FROM gh_automation_jobs WHERE id = ANY(${missing}::uuid[])`
                  return yield* Effect.fail(
                    new Error(
                      `no job_completed received for ${missing.length} burst jobs (resumed after ${last}, ${resumed.result.replayed} replayed); stored: ${JSON.stringify(rows)}; ${e.message.slice(0, 300)}`
                    )
                  )
                })
              )
            )
          const received = [...seenBefore, ...eventsOf(again.frames, resumed.id)]
          const ids = received.map((e) => e.event_id)
          expect(new Set(ids).size).toBe(ids.length)
          // Everything stored for these jobs arrived, and each job's events in order.
          const jobIds = [strict, preferred, any, long, human, paused, ...burst].map((j) => j.id)
          const stored = yield* sql<{ id: string; job_id: string }>`
            SELECT id::text AS id, job_id::text AS job_id FROM gh_job_events
            WHERE job_id = ANY(${jobIds}::uuid[]) ORDER BY id`
          const got = received.filter((e) => jobIds.includes(e.job_id))
          expect(got.map((e) => e.event_id).sort()).toEqual(stored.map((r) => r.id).sort())
          for (const jobId of jobIds) {
            const mine = got.filter((e) => e.job_id === jobId).map((e) => Number(e.event_id))
            expect(mine).toEqual([...mine].sort((a, b) => a - b))
          }

          // drain one worker, deregister the other with its running job cancelled
          expect(
            yield* request(again, { type: "worker.drain", worker_id: "e2e-b", reason: "deploy" })
          ).toMatchObject({
            worker_id: "e2e-b",
            status: "draining"
          })
          const held = yield* request(again, {
            type: "job.submit",
            job: {
              job_type: "sleep",
              payload: { ms: 600_000 },
              worker_affinity: "strict",
              target_worker_id: "e2e-a"
            }
          })
          yield* eventOf(again, resumed.id, held.id, "job_started")
          expect(
            yield* request(again, {
              type: "worker.deregister",
              worker_id: "e2e-a",
              reason: "sandbox_terminated",
              cancel_active_jobs: true,
              drain_timeout_seconds: 0
            })
          ).toEqual({ worker_ids: ["e2e-a"], cancelled_job_ids: [held.id] })
          yield* again.waitFor(
            (f) =>
              eventsOf(f, resumed.id).find(
                (e) =>
                  e.source === "worker" && e.worker_id === "e2e-a" && e.event_type === "worker_deregistered"
              ),
            "20 seconds"
          )
          const workers = (yield* request(again, { type: "workers.list" })).workers as Array<Frame>
          expect(workers.map((w) => [w.worker_id, w.status])).toEqual([
            ["e2e-a", "offline"],
            ["e2e-b", "draining"]
          ])
          // Neither the secret nor a wrong one ever reached the gateway's output.
          const output = gateway.stdout() + gateway.stderr()
          expect(output).toContain("/v1/ws")
          expect(output).not.toContain(secret)
          expect(output).not.toContain(wrongSecret)
        }),
      120_000
    )
  })
})
