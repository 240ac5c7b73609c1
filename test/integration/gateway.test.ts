/**
 * The gateway's WebSocket edge in one process, over real sockets and a real Postgres:
 * authentication, typed errors for bad frames, requests onto the job service, live and
 * replayed subscriptions, the size limit and the slow-consumer limit.
 */
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Redacted, Scope } from "effect"
import * as Crypto from "node:crypto"
import * as Gateway from "../../src/edge/Gateway.ts"
import * as EventStream from "../../src/runtime/jobs/EventStream.ts"
import * as Db from "../fixtures/Db.ts"
import { secret, startEdge } from "../fixtures/Edge.ts"
import { command, eventually, key, slot, startedOf, startGateway, startWorker } from "../fixtures/Jobs.ts"
import { connect, eventsOf, type Frame } from "../fixtures/Ws.ts"

const errorCode = (reply: Frame) =>
  reply.ok === false ? reply.error.code : `ok: ${JSON.stringify(reply.result)}`

describe("gateway WebSocket edge", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("authenticates with a Bearer header or with an auth frame first", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-auth")
        const withHeader = yield* connect(edge.url, { secret })
        expect(yield* withHeader.request({ type: "ping" })).toMatchObject({ v: 1, type: "pong" })

        const browser = yield* connect(edge.url)
        const early = yield* browser.request({ type: "workers.list" })
        expect(early).toMatchObject({ v: 1, type: "reply", ok: false, error: { code: "UNAUTHORIZED" } })
        const auth = yield* browser.request({ type: "auth", token: secret })
        expect(auth).toMatchObject({ ok: true, result: { authenticated: true } })
        expect(yield* browser.request({ type: "workers.list" })).toMatchObject({
          ok: true,
          result: { workers: [] }
        })
        expect(edge.gateway.connections()).toBe(2)
      }).pipe(Effect.scoped)
    )

    it.scoped(
      "refuses a wrong secret: 401 on the upgrade, 4401 after a wrong auth frame or no auth in time",
      () =>
        Effect.gen(function* () {
          const edge = yield* startEdge("gw-noauth", { authTimeout: "300 millis" })
          const refused = yield* connect(edge.url, { secret: "wrong" }).pipe(Effect.flip)
          expect(refused.message).toContain("HTTP 401")

          const wrong = yield* connect(edge.url)
          wrong.send({ v: 1, type: "auth", id: "a1", token: `${secret}x` })
          expect(yield* wrong.closed()).toMatchObject({ code: 4401 })
          // Exactly the frame of docs/PROTOCOL.md#unauthorized, then the close.
          expect(wrong.frames).toEqual([
            {
              v: 1,
              type: "reply",
              id: "a1",
              ok: false,
              error: {
                code: "UNAUTHORIZED",
                message: "wrong secret: the token does not match GH_SERVICE_SECRET; closing"
              }
            }
          ])

          const silent = yield* connect(edge.url)
          expect(yield* silent.closed()).toMatchObject({ code: 4401 })
          // The secret never appears in what the server sends.
          expect(JSON.stringify([...wrong.frames, ...silent.frames])).not.toContain(secret)
        }).pipe(Effect.scoped)
    )

    it.scoped(
      "an unauthenticated socket gets UNAUTHORIZED for every mutation and subscribe, and changes nothing",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          // Long enough that the auth timer cannot be what answers.
          const edge = yield* startEdge("gw-unauth", { authTimeout: "60 seconds" })
          yield* startWorker("edge-w5")
          const k = key()
          const held = yield* edge.jobs.submit({
            job_type: "ctl",
            payload: { key: k },
            worker_affinity: "strict",
            target_worker_id: "w-edge-w5"
          })
          yield* startedOf(k)
          yield* command(k, { _tag: "needs_human", timeoutSeconds: 60 })
          const state = Effect.map(
            sql<{ jobs: number; job_status: string; worker_status: string }>`
              SELECT (SELECT count(*)::int FROM gh_automation_jobs) AS jobs,
                     (SELECT status FROM gh_automation_jobs WHERE id = ${held.id}::uuid) AS job_status,
                     (SELECT status FROM gh_worker_registry WHERE worker_id = 'w-edge-w5') AS worker_status`,
            (rows) => rows[0]!
          )
          const before = yield* eventually(
            Effect.map(state, (s) => (s.job_status === "needs_human" ? s : undefined))
          )
          expect(before).toEqual({ jobs: 1, job_status: "needs_human", worker_status: "active" })

          const c = yield* connect(edge.url)
          const requests: Array<Frame> = [
            { type: "job.submit", job: { job_type: "noop" } },
            { type: "job.cancel", job_id: held.id, reason: "not allowed" },
            { type: "job.resume", job_id: held.id, resolved_by: "intruder", resolution_data: { x: 1 } },
            { type: "worker.drain", worker_id: "w-edge-w5", reason: "not allowed" },
            {
              type: "worker.deregister",
              worker_id: "w-edge-w5",
              reason: "sandbox_terminated",
              cancel_active_jobs: true,
              drain_timeout_seconds: 0
            },
            { type: "subscribe", all: true }
          ]
          for (const frame of requests) {
            const reply = yield* c.request(frame)
            // Exactly the frame of docs/PROTOCOL.md#unauthorized: nothing else, no details.
            expect(reply).toEqual({
              v: 1,
              type: "reply",
              id: reply.id,
              ok: false,
              error: {
                code: "UNAUTHORIZED",
                message:
                  "not authenticated: send an auth frame with the service secret first, or connect with Authorization: Bearer <secret>"
              }
            })
            expect(reply.id).toMatch(/^t\d+$/)
          }
          expect(c.frames.map((f) => f.type)).toEqual(requests.map(() => "reply"))
          expect(yield* state).toEqual(before)
          expect(edge.events.stats().subscriptions).toBe(0)
          // Still open: the client can authenticate, and then the same requests take effect.
          expect(c.isClosed()).toBe(false)
          expect((yield* c.request({ type: "auth", token: secret })).ok).toBe(true)
          expect(yield* c.request(requests[1]!)).toMatchObject({
            ok: true,
            result: { job_id: held.id, status: "cancelled" }
          })
          expect(yield* state).toEqual({ ...before, job_status: "cancelled" })
        }).pipe(Effect.scoped)
    )

    it.scoped("serves REST, /health and /metrics on the gateway's own port", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-http")
        const get = (path: string, auth?: string) =>
          Effect.tryPromise(async () => {
            const res = await fetch(`${edge.http}${path}`, {
              headers: auth === undefined ? {} : { authorization: `Bearer ${auth}` }
            })
            return { status: res.status, headers: res.headers, text: await res.text() }
          })
        const gaugeOf = (text: string) =>
          /^troupe_websocket_connections (\d+)$/m.exec(text)?.[1] ?? `missing in:\n${text}`

        const a = yield* connect(edge.url, { secret })
        const b = yield* connect(edge.url, { secret })
        const metrics = yield* get("/metrics")
        expect(metrics.status).toBe(200)
        expect(metrics.headers.get("content-type")).toContain("text/plain")
        expect(metrics.text).toContain("# TYPE troupe_websocket_connections gauge")
        expect(gaugeOf(metrics.text)).toBe("2")
        // A live gauge: one socket gone, one less.
        b.ws.terminate()
        yield* eventually(Effect.sync(() => (edge.gateway.connections() === 1 ? true : undefined)))
        expect(gaugeOf((yield* get("/metrics")).text)).toBe("1")

        const health = yield* get("/health")
        expect(health.status).toBe(200)
        expect(JSON.parse(health.text)).toMatchObject({ status: "ok", api_healthy: true })

        // A job submitted over the socket reads the same over REST, with the secret only.
        const submitted = yield* a.request({ type: "job.submit", job: { job_type: "noop" } })
        const path = `/api/v1/jobs/${submitted.result.id}`
        const read = yield* get(path, secret)
        expect(read.status).toBe(200)
        expect(JSON.parse(read.text)).toMatchObject({ id: submitted.result.id, job_type: "noop" })
        for (const refused of [yield* get(path), yield* get(path, `${secret}x`)]) {
          expect(refused.status).toBe(401)
          expect(refused.headers.get("www-authenticate")).toBe("Bearer")
          expect(JSON.parse(refused.text)).toMatchObject({ error: { code: "UNAUTHORIZED" } })
          expect(refused.text).not.toContain(submitted.result.id)
        }
        // The sockets are untouched by the HTTP traffic.
        expect(yield* a.request({ type: "ping" })).toMatchObject({ type: "pong" })
      }).pipe(Effect.scoped)
    )

    it.scoped("answers every malformed frame with a typed error and keeps the connection", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-bad")
        const c = yield* connect(edge.url, { secret })
        const next = (from: number) => c.waitFor((frames) => frames[from])

        const cases: Array<[string | Buffer, string]> = [
          ["{not json", "INVALID_FRAME"],
          ["[1,2,3]", "INVALID_FRAME"],
          ["42", "INVALID_FRAME"],
          [Buffer.from([0, 1, 2, 255]), "INVALID_FRAME"],
          [JSON.stringify({ v: 2, type: "ping", id: "x" }), "INVALID_FRAME"],
          [JSON.stringify({ v: 1, type: "job.explode", id: "x" }), "INVALID_FRAME"],
          [JSON.stringify({ v: 1, type: "job.cancel", id: "x" }), "INVALID_FRAME"]
        ]
        for (const [data, code] of cases) {
          const at = c.frames.length
          c.sendRaw(data)
          const reply = yield* next(at)
          expect(reply).toMatchObject({ v: 1, type: "reply", ok: false, error: { code } })
          expect(typeof reply.error.message).toBe("string")
        }
        // A schema mismatch names the field.
        const mismatch = c.frames.at(-1)!
        expect(mismatch.id).toBe("x")
        expect(JSON.stringify(mismatch.error.details)).toContain("job_id")

        expect(errorCode(yield* c.request({ type: "job.get", job_id: "not-a-uuid" }))).toBe("INVALID_FRAME")
        expect(errorCode(yield* c.request({ type: "job.get", job_id: Crypto.randomUUID() }))).toBe(
          "NOT_FOUND"
        )
        expect(
          errorCode(yield* c.request({ type: "job.submit", job: { job_type: "noop", colour: "red" } }))
        ).toBe("INVALID_FRAME")
        expect(
          errorCode(
            yield* c.request({
              type: "job.submit",
              job: { job_type: "noop", worker_affinity: "strict", target_worker_id: "nobody" }
            })
          )
        ).toBe("WORKER_UNAVAILABLE")
        const queued = yield* c.request({ type: "job.submit", job: { job_type: "noop" } })
        expect(queued).toMatchObject({ ok: true, result: { status: "queued", job_type: "noop" } })
        expect(
          errorCode(
            yield* c.request({ type: "job.resume", job_id: queued.result.id, resolved_by: "someone" })
          )
        ).toBe("CONFLICT")
        expect(errorCode(yield* c.request({ type: "unsubscribe", subscription: "never" }))).toBe("NOT_FOUND")
        expect(errorCode(yield* c.request({ type: "worker.drain", worker_id: "nobody" }))).toBe("NOT_FOUND")
        expect(yield* c.request({ type: "ping" })).toMatchObject({ type: "pong" })
        expect(c.isClosed()).toBe(false)
      }).pipe(Effect.scoped)
    )

    it.scoped("submits, streams a job's events, and cancels it on the worker that runs it", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-run")
        yield* startWorker("edge-w1")
        const c = yield* connect(edge.url, { secret })
        const k = key()
        const submitted = yield* c.request({
          type: "job.submit",
          job: {
            job_type: "ctl",
            payload: { key: k },
            worker_affinity: "strict",
            target_worker_id: "w-edge-w1"
          }
        })
        expect(submitted).toMatchObject({ ok: true, result: { worker_affinity: "strict" } })
        const jobId: string = submitted.result.id
        const sub = yield* c.request({ type: "subscribe", job_id: jobId })
        expect(sub).toMatchObject({ ok: true, result: { subscription: sub.id } })
        yield* startedOf(k)
        yield* c.waitFor((f) => eventsOf(f, sub.id).find((e) => e.event_type === "job_started"))

        const cancelled = yield* c.request({ type: "job.cancel", job_id: jobId, reason: "user asked" })
        expect(cancelled).toMatchObject({
          ok: true,
          result: { job_id: jobId, status: "cancelled", worker_id: "w-edge-w1" }
        })
        const event = yield* c.waitFor((f) =>
          eventsOf(f, sub.id).find((e) => e.event_type === "job_cancelled")
        )
        expect(event).toMatchObject({
          v: 1,
          type: "event",
          job_id: jobId,
          source: "job",
          worker_id: "w-edge-w1"
        })
        yield* Deferred.await(slot(k).interrupted)

        const events = eventsOf(c.frames, sub.id)
        expect(new Set(events.map((e) => e.event_id)).size).toBe(events.length)
        expect(events[0]).toMatchObject({ event_type: "job_started" })
        expect(yield* c.request({ type: "job.get", job_id: jobId })).toMatchObject({
          ok: true,
          result: { status: "cancelled", worker_id: "w-edge-w1" }
        })
        const history = yield* c.request({ type: "job.events", job_id: jobId })
        expect(history.result.events.map((e: Frame) => e.event_id)).toEqual(events.map((e) => e.event_id))
      }).pipe(Effect.scoped)
    )

    it.scoped("resumes a needs_human job and replays a subscription from an event id", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-hitl")
        yield* startWorker("edge-w2")
        const c = yield* connect(edge.url, { secret })
        const k = key()
        const submitted = yield* c.request({
          type: "job.submit",
          job: { job_type: "ctl", payload: { key: k } }
        })
        const jobId: string = submitted.result.id
        const live = yield* c.request({ type: "subscribe", job_id: jobId })
        yield* startedOf(k)
        yield* command(k, { _tag: "needs_human", timeoutSeconds: 60 })
        const needed = yield* c.waitFor((f) =>
          eventsOf(f, live.id).find((e) => e.event_type === "interaction_needed")
        )
        expect(JSON.stringify(needed.metadata)).toContain("recaptcha_v2")
        const resumed = yield* c.request({
          type: "job.resume",
          job_id: jobId,
          resolved_by: "human",
          resolution_data: { token: "abc" }
        })
        expect(resumed).toMatchObject({
          ok: true,
          result: { job_id: jobId, status: "running", worker_id: "w-edge-w2" }
        })
        yield* command(k, { _tag: "complete" })
        yield* c.waitFor((f) => eventsOf(f, live.id).find((e) => e.event_type === "job_completed"))
        const seen = eventsOf(c.frames, live.id)

        // A second subscription from the first event on: the rest, once each, in the same order.
        const replay = yield* c.request({
          type: "subscribe",
          job_id: jobId,
          since_event_id: seen[0]!.event_id
        })
        expect(replay).toMatchObject({ ok: true, result: { replayed: seen.length - 1 } })
        const replayed = yield* c.waitFor((f) => {
          const got = eventsOf(f, replay.id)
          return got.length === seen.length - 1 ? got : undefined
        })
        expect(replayed.map((e) => e.event_id)).toEqual(seen.slice(1).map((e) => e.event_id))
        expect(
          errorCode(yield* c.request({ type: "subscribe", job_id: jobId, since_event_id: "999999999" }))
        ).toBe("NOT_FOUND")
      }).pipe(Effect.scoped)
    )

    it.scoped(
      "a subscription that saw nothing yet resumes from the position its reply gave; 0 is the start",
      () =>
        Effect.gen(function* () {
          const edge = yield* startEdge("gw-position")
          const sql = yield* SqlClient.SqlClient
          const job = yield* edge.jobs.submit({ job_type: "noop" })
          const first = yield* connect(edge.url, { secret })
          const sub = yield* first.request({ type: "subscribe", job_id: job.id })
          expect(sub.result).toMatchObject({
            subscription: sub.id,
            replayed: 0,
            position: expect.stringMatching(/^\d+$/)
          })
          first.ws.terminate()
          // Written while nobody listens.
          const written = yield* sql<{ id: string }>`
          INSERT INTO gh_job_events (job_id, event_type, message)
          SELECT ${job.id}::uuid, 'thought', 'step ' || n FROM generate_series(1, 3) n RETURNING id::text AS id`
          const again = yield* connect(edge.url, { secret })
          const resumed = yield* again.request({
            type: "subscribe",
            job_id: job.id,
            since_event_id: sub.result.position
          })
          expect(resumed.ok).toBe(true)
          // Replayed, or (when the gateway's tail had not read them yet) live right after: all three, once.
          const got = yield* again.waitFor((f) => {
            const e = eventsOf(f, resumed.id)
            return e.length >= 3 ? e : undefined
          })
          expect(got.map((e) => e.event_id)).toEqual(written.map((r) => r.id))
          const fromStart = yield* again.request({ type: "subscribe", job_id: job.id, since_event_id: "0" })
          expect(fromStart.result.replayed).toBe(3)
          expect(eventsOf(again.frames, fromStart.id).map((e) => e.event_id)).toEqual(
            written.map((r) => r.id)
          )
          expect(eventsOf(again.frames, resumed.id)).toHaveLength(3)
        })
    )

    it.scoped("drains and deregisters a worker, returning the cancelled job ids", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-dereg")
        yield* startWorker("edge-w3")
        const c = yield* connect(edge.url, { secret })
        const watch = yield* c.request({ type: "subscribe", worker_id: "w-edge-w3" })
        const k = key()
        const submitted = yield* c.request({
          type: "job.submit",
          job: {
            job_type: "ctl",
            payload: { key: k },
            worker_affinity: "strict",
            target_worker_id: "w-edge-w3"
          }
        })
        yield* startedOf(k)
        const drained = yield* c.request({ type: "worker.drain", worker_id: "w-edge-w3", reason: "deploy" })
        expect(drained).toMatchObject({
          ok: true,
          result: { worker_id: "w-edge-w3", status: "draining", active_job_ids: [submitted.result.id] }
        })
        const listed = yield* c.request({ type: "workers.list" })
        // Draining wins over busy: the worker finishes what it holds and takes nothing new.
        expect(listed.result.workers.find((w: Frame) => w.worker_id === "w-edge-w3")).toMatchObject({
          status: "draining",
          current_job_id: submitted.result.id
        })
        const result = yield* c.request({
          type: "worker.deregister",
          worker_id: "w-edge-w3",
          reason: "sandbox_terminated",
          cancel_active_jobs: true,
          drain_timeout_seconds: 0
        })
        expect(result).toMatchObject({
          ok: true,
          result: { worker_ids: ["w-edge-w3"], cancelled_job_ids: [submitted.result.id] }
        })
        const types = yield* c.waitFor((f) => {
          const got = eventsOf(f, watch.id).map((e) => e.event_type)
          return got.includes("worker_deregistered") && got.includes("job_cancelled") ? got : undefined
        })
        expect(types).toEqual(expect.arrayContaining(["worker_draining", "job_started", "job_cancelled"]))
      }).pipe(Effect.scoped)
    )

    it.scoped("closes a connection that sends more than 1 MiB with 1009; others keep working", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-big")
        const other = yield* connect(edge.url, { secret })
        const big = yield* connect(edge.url, { secret })
        big.sendRaw(JSON.stringify({ v: 1, type: "ping", id: "big", pad: "x".repeat(1024 * 1024) }))
        expect(yield* big.closed()).toMatchObject({ code: 1009 })
        expect(yield* other.request({ type: "ping" })).toMatchObject({ type: "pong" })
      }).pipe(Effect.scoped)
    )

    it.scoped("drops a peer that stops answering WebSocket pings", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-keepalive", { keepalive: "100 millis" })
        const live = yield* connect(edge.url, { secret })
        const dead = yield* connect(edge.url, { secret })
        // A peer whose process hangs: its socket reads nothing, so it answers no ping.
        ;(dead.ws as unknown as { _socket: { pause: () => void } })._socket.pause()
        yield* eventually(Effect.sync(() => (edge.gateway.connections() === 1 ? true : undefined)))
        // The one that answers stays connected through many pings.
        expect(yield* live.request({ type: "ping" })).toMatchObject({ type: "pong" })
        expect(live.isClosed()).toBe(false)
      })
    )

    it.scoped("limits requests in flight and subscriptions per connection with OVERLOADED", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-limits", { maxInflight: 1, maxSubscriptions: 2 })
        const c = yield* connect(edge.url, { secret })
        // Two requests in one write: the second arrives while the first waits on the database.
        c.ws.send(JSON.stringify({ v: 1, type: "workers.list", id: "l1" }))
        c.ws.send(JSON.stringify({ v: 1, type: "workers.list", id: "l2" }))
        const replies = yield* c.waitFor((f) => {
          const r = f.filter((x) => x.type === "reply")
          return r.length === 2 ? r : undefined
        })
        expect(replies.find((r) => r.id === "l2")).toMatchObject({ ok: false, error: { code: "OVERLOADED" } })
        expect(replies.find((r) => r.id === "l1")).toMatchObject({ ok: true })
        expect((yield* c.request({ type: "subscribe", all: true })).ok).toBe(true)
        expect((yield* c.request({ type: "subscribe", valet_task_id: "t-1" })).ok).toBe(true)
        expect(errorCode(yield* c.request({ type: "subscribe", worker_id: "w" }))).toBe("OVERLOADED")
      }).pipe(Effect.scoped)
    )

    it.scoped("closes a consumer that stops reading with 1013 once its bounded buffer overflows", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-slow", {
          sendBufferLimit: 64 * 1024,
          maxHeldBytes: 64 * 1024 * 1024,
          slowConsumerGrace: "2 seconds"
        })
        const sql = yield* SqlClient.SqlClient
        const slow = yield* connect(edge.url, { secret })
        const fast = yield* connect(edge.url, { secret })
        expect((yield* slow.request({ type: "subscribe", all: true })).ok).toBe(true)
        const fastSub = yield* fast.request({ type: "subscribe", all: true })
        // The slow client stops reading its socket.
        ;(slow.ws as unknown as { _socket: { pause: () => void; resume: () => void } })._socket.pause()
        const job = yield* edge.jobs.submit({ job_type: "noop" })
        // 2,000 events of 8 KiB: 16 MB, past what the kernel buffers and far past the 64 KiB limit.
        yield* sql`INSERT INTO gh_job_events (job_id, event_type, message, metadata)
          SELECT ${job.id}::uuid, 'observation_started', repeat('x', 8192), '{}'::jsonb FROM generate_series(1, 2000)`
        yield* eventually(Effect.sync(() => (edge.gateway.connections() === 1 ? true : undefined)))
        ;(slow.ws as unknown as { _socket: { resume: () => void } })._socket.resume()
        expect(yield* slow.closed()).toMatchObject({ code: 1013 })
        // The reader that keeps up gets every event.
        const got = yield* fast.waitFor((f) => {
          const e = eventsOf(f, fastSub.id)
          return e.length >= 2000 ? e : undefined
        })
        expect(got.length).toBe(2000)
      }).pipe(Effect.scoped)
    )

    it.scoped(
      "closes a consumer with 1013 at once when its held frames pass the cap; others keep working",
      () =>
        Effect.gen(function* () {
          const edge = yield* startEdge("gw-held", {
            sendBufferLimit: 64 * 1024,
            maxHeldBytes: 256 * 1024,
            // Far longer than the test may take: only the held-bytes cap can close it.
            slowConsumerGrace: "60 seconds"
          })
          const sql = yield* SqlClient.SqlClient
          const flood = yield* edge.jobs.submit({ job_type: "noop" })
          const quiet = yield* edge.jobs.submit({ job_type: "noop" })
          const slow = yield* connect(edge.url, { secret })
          const other = yield* connect(edge.url, { secret })
          expect((yield* slow.request({ type: "subscribe", job_id: flood.id })).ok).toBe(true)
          const otherSub = yield* other.request({ type: "subscribe", job_id: quiet.id })
          expect(otherSub.ok).toBe(true)
          // The slow client stops reading its socket.
          const raw = (slow.ws as unknown as { _socket: { pause: () => void; resume: () => void } })._socket
          raw.pause()
          // 8 KiB events until the gateway lets go of it: past the kernel's buffers, the 64 KiB
          // socket limit, then the 256 KiB held back.
          yield* eventually(
            Effect.gen(function* () {
              if (edge.gateway.connections() === 1) return true
              yield* sql`INSERT INTO gh_job_events (job_id, event_type, message, metadata)
              SELECT ${flood.id}::uuid, 'observation_started', repeat('x', 8192), '{}'::jsonb
              FROM generate_series(1, 200)`
              return undefined
            }),
            "30 seconds"
          )
          raw.resume()
          expect(yield* slow.closed()).toEqual({
            code: 1013,
            reason: "slow consumer: send buffer overflowed"
          })

          // The other connection is served as before: requests and its own events.
          expect(yield* other.request({ type: "ping" })).toMatchObject({ type: "pong" })
          const [written] = yield* sql<{ id: string }>`
          INSERT INTO gh_job_events (job_id, event_type, message)
          VALUES (${quiet.id}::uuid, 'thought', 'still here') RETURNING id::text AS id`
          const got = yield* other.waitFor((f) =>
            eventsOf(f, otherSub.id).find((e) => e.event_id === written!.id)
          )
          expect(got).toMatchObject({ job_id: quiet.id, message: "still here" })
          expect(other.isClosed()).toBe(false)
        }).pipe(Effect.scoped)
    )
    it.scoped(
      "stopping the gateway closes every socket with 1001 and returns, cutting a peer that never answers the close",
      () =>
        Effect.gen(function* () {
          const gw = yield* startGateway("gw-stop")
          const events = yield* EventStream.make(gw.node)
          const scope = yield* Scope.make()
          const gateway = yield* Gateway.make(gw.jobs, events, {
            port: 0,
            host: "127.0.0.1",
            secret: Redacted.make(secret)
          }).pipe(Scope.extend(scope))
          const url = `ws://127.0.0.1:${gateway.port}/v1/ws`
          const polite = yield* connect(url, { secret })
          // Unauthenticated: its auth deadline is still pending when the gateway stops.
          const waiting = yield* connect(url)
          // A peer whose process hangs: it reads nothing, so it never answers the close.
          const deaf = yield* connect(url, { secret })
          const raw = (deaf.ws as unknown as { _socket: { pause: () => void; resume: () => void } })._socket
          raw.pause()
          expect(gateway.connections()).toBe(3)

          const [stopped] = yield* Effect.timed(Scope.close(scope, Exit.void))
          expect(yield* polite.closed()).toEqual({ code: 1001, reason: "server shutting down" })
          expect(yield* waiting.closed()).toEqual({ code: 1001, reason: "server shutting down" })
          // The stop waited for the deaf peer's handshake no longer than the 2 s it is given.
          expect(Duration.toMillis(stopped)).toBeLessThan(5000)
          raw.resume()
          yield* deaf.closed()
          expect(gateway.connections()).toBe(0)
        })
    )
  })
})
