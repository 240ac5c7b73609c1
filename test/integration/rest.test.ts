/**
 * The gateway's REST compatibility routes, health and metrics over real HTTP on loopback
 * (`fetch`), against a real gateway node and real workers: every route's shape field by
 * field against the requirements, the service secret on every `/api/v1` route, the error
 * mapping, and the Prometheus text of `/metrics`.
 */
import { NodeHttpServer } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { describe, expect, layer } from "@effect/vitest"
import { Deferred, Effect, Layer, Queue, Redacted, Schema } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Http from "node:http"
import type { AddressInfo } from "node:net"
import pg from "pg"
import { inject } from "vitest"
import * as Edge from "../../src/protocol/Edge.ts"
import { DeregisterResult, Job, JobState, JobStatus } from "../../src/protocol/Jobs.ts"
import type { JobService } from "../../src/edge/Jobs.ts"
import * as Monitoring from "../../src/runtime/jobs/Monitoring.ts"
import * as EventStream from "../../src/runtime/jobs/EventStream.ts"
import type * as Node from "../../src/runtime/core/Node.ts"
import * as Rest from "../../src/edge/Rest.ts"
import * as Db from "../fixtures/Db.ts"
import {
  command,
  eventually,
  key,
  slot,
  startedOf,
  startGateway,
  startWorker,
  statusIs,
  statusOf
} from "../fixtures/Jobs.ts"

const secret = "rest-test-secret-8f1d2c"
const isoPattern = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/

/** Serve the REST app on a free loopback port until the scope closes. */
const serve = (
  options: Partial<Rest.RestOptions> & { readonly jobs: JobService; readonly node: Node.TroupeNode }
) =>
  Effect.gen(function* () {
    const monitoring = options.monitoring ?? (yield* Monitoring.make)
    const events = options.events ?? (yield* EventStream.make(options.node))
    const handler = yield* NodeHttpServer.makeHandler(
      Rest.makeApp({
        secret: Redacted.make(secret),
        openConnections: () => 0,
        monitoring,
        ...options,
        events
      })
    )
    const server = Http.createServer(handler)
    yield* Effect.acquireRelease(
      Effect.async<void>((resume) => {
        server.listen(0, "127.0.0.1", () => resume(Effect.void))
      }),
      () =>
        Effect.async<void>((resume) => {
          server.close(() => resume(Effect.void))
          server.closeAllConnections()
        })
    )
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  })

interface Answer {
  readonly status: number
  readonly headers: Headers
  readonly text: string
  /** The JSON body (checked field by field by the tests). */
  readonly body: any
}

/** One HTTP request; `auth` is the whole Authorization header (`null`: none; default: the right secret). */
const call = (
  base: string,
  method: string,
  path: string,
  options: { readonly body?: unknown; readonly raw?: string; readonly auth?: string | null } = {}
) =>
  Effect.promise(async (): Promise<Answer> => {
    const headers: Record<string, string> = {}
    const auth = options.auth === undefined ? `Bearer ${secret}` : options.auth
    if (auth !== null) headers.authorization = auth
    let body: string | undefined
    if (options.raw !== undefined) body = options.raw
    else if (options.body !== undefined) body = JSON.stringify(options.body)
    if (body !== undefined) headers["content-type"] = "application/json"
    const response = await fetch(`${base}${path}`, { method, headers, body })
    const text = await response.text()
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch {
      parsed = undefined
    }
    return { status: response.status, headers: response.headers, text, body: parsed }
  })

/** POST `bytes` of a JSON string in chunks, with no Content-Length (chunked transfer encoding). */
const chunked = (base: string, path: string, bytes: number) =>
  Effect.async<{ status: number; text: string }, Error>((resume) => {
    const req = Http.request(
      `${base}${path}`,
      { method: "POST", headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" } },
      (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (c: Buffer) => chunks.push(c))
        res.on("end", () =>
          resume(
            Effect.succeed({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") })
          )
        )
      }
    )
    req.on("error", (e) => resume(Effect.fail(e)))
    const piece = "x".repeat(64 * 1024)
    req.write('"')
    for (let sent = 0; sent < bytes; sent += piece.length) req.write(piece)
    req.end('"')
  })

/** Decode exactly (no missing, no extra fields) or fail the test with the schema's message. */
const exact = <A, I>(schema: Schema.Schema<A, I>, value: unknown): A =>
  Schema.decodeUnknownSync(schema)(value, { onExcessProperty: "error" })

const expectError = (answer: Answer, status: number, code: Edge.ErrorCode) => {
  expect({ status: answer.status, code: answer.body?.error?.code }).toEqual({ status, code })
  exact(Edge.RestError, answer.body)
  expect(answer.body.error.message.length).toBeGreaterThan(10)
  expect(answer.headers.get("content-type")).toMatch(/^application\/json/)
}

// --- A minimal Prometheus text format 0.0.4 parser ---

interface Sample {
  readonly name: string
  readonly labels: Record<string, string>
  readonly value: number
}

const parsePrometheus = (text: string) => {
  const types = new Map<string, string>()
  const helps = new Map<string, string>()
  const samples: Array<Sample> = []
  expect(text.endsWith("\n")).toBe(true)
  for (const line of text.split("\n")) {
    if (line === "") continue
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line)
    if (meta) {
      if (meta[1] === "TYPE") {
        expect(["gauge", "counter", "histogram", "summary", "untyped"]).toContain(meta[3])
        expect(types.has(meta[2]!)).toBe(false)
        types.set(meta[2]!, meta[3]!)
      } else helps.set(meta[2]!, meta[3]!)
      continue
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (m === null) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`)
    const labels: Record<string, string> = {}
    if (m[2]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy
      let consumed = 0
      for (let l = re.exec(m[2]); l !== null; l = re.exec(m[2])) {
        labels[l[1]!] = l[2]!.replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\")
        consumed = re.lastIndex
      }
      expect(consumed).toBe(m[2].length)
    }
    const value = m[3] === "+Inf" ? Number.POSITIVE_INFINITY : Number(m[3])
    expect(Number.isNaN(value)).toBe(false)
    samples.push({ name: m[1]!, labels, value })
  }
  // Every sample belongs to a family with a TYPE and a HELP.
  for (const s of samples) {
    const family = types.has(s.name) ? s.name : s.name.replace(/_(bucket|sum|count)$/, "")
    expect(types.has(family), `TYPE of ${s.name}`).toBe(true)
    expect(helps.has(family), `HELP of ${s.name}`).toBe(true)
  }
  return { types, samples }
}

const series = (samples: ReadonlyArray<Sample>, name: string) => samples.filter((s) => s.name === name)

const histogramOf = (samples: ReadonlyArray<Sample>, name: string) => {
  const buckets = series(samples, `${name}_bucket`).map((s) => ({ le: s.labels.le!, n: s.value }))
  const sum = series(samples, `${name}_sum`)[0]!.value
  const count = series(samples, `${name}_count`)[0]!.value
  return { buckets, sum, count }
}

describe("REST compatibility routes, health and metrics", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("GET /health: the Health shape, 200 ok on a live database, 503 degraded when it is gone", () =>
      Effect.gen(function* () {
        const { jobs, node } = yield* startGateway("gw-health")
        // What a node read from COMMIT_SHA and TROUPE_ENV (DeploymentConfig, test/unit/config.test.ts).
        const base = yield* serve({ jobs, node, environment: "test", commitSha: "0123abcd" })
        const pkg = JSON.parse(Fs.readFileSync(new URL("../../package.json", import.meta.url), "utf8"))

        // No secret needed.
        const ok = yield* call(base, "GET", "/health", { auth: null })
        expect(ok.status).toBe(200)
        const health = exact(Edge.Health, ok.body)
        expect(Object.keys(ok.body).sort()).toEqual(
          ["status", "service", "version", "environment", "commit_sha", "api_healthy", "timestamp"].sort()
        )
        expect(health).toMatchObject({
          status: "ok",
          service: "troupe-gateway",
          version: pkg.version,
          environment: "test",
          commit_sha: "0123abcd",
          api_healthy: true
        })
        expect(health.timestamp).toMatch(isoPattern)
        expect(Math.abs(Date.parse(health.timestamp) - Date.now())).toBeLessThan(60_000)

        // An app on a database that then disappears: a real check, so it reports degraded.
        const url = yield* Db.freshDatabase
        const context = yield* Layer.build(
          PgClient.layer({ url: Redacted.make(url), connectTimeout: "2 seconds" })
        )
        const downBase = yield* serve({ jobs, node, commitSha: "0123abcd" }).pipe(Effect.provide(context))
        const before2 = yield* call(downBase, "GET", "/health", { auth: null })
        expect([before2.status, before2.body.api_healthy]).toEqual([200, true])
        yield* Effect.promise(async () => {
          const admin = new pg.Client({ connectionString: inject("adminUrl") })
          await admin.connect()
          try {
            await admin.query(`DROP DATABASE ${new URL(url).pathname.slice(1)} WITH (FORCE)`)
          } finally {
            await admin.end()
          }
        })
        const started = Date.now()
        const down = yield* call(downBase, "GET", "/health", { auth: null })
        expect(Date.now() - started).toBeLessThan(5000)
        expect(down.status).toBe(503)
        expect(exact(Edge.Health, down.body)).toMatchObject({
          status: "degraded",
          service: "troupe-gateway",
          api_healthy: false,
          commit_sha: "0123abcd"
        })
      })
    )

    it.scoped("every /api/v1 route refuses a missing or wrong secret with 401, and changes nothing", () =>
      Effect.gen(function* () {
        const { jobs, node } = yield* startGateway("gw-auth")
        yield* startWorker("n-auth", { targetWorkerId: "sandbox-auth" })
        const base = yield* serve({ jobs, node })
        const k = key()
        const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)
        const sql = yield* SqlClient.SqlClient
        const countJobs = Effect.map(
          sql<{ n: number }>`SELECT count(*)::int AS n FROM gh_automation_jobs`,
          (rows) => rows[0]!.n
        )
        const jobsBefore = yield* countJobs

        const routes: ReadonlyArray<readonly [string, string, unknown?]> = [
          ["GET", "/api/v1/monitoring/workers"],
          [
            "POST",
            "/api/v1/workers/deregister",
            { target_worker_id: "sandbox-auth", cancel_active_jobs: true }
          ],
          ["POST", "/api/v1/jobs", { job_type: "noop" }],
          ["GET", `/api/v1/jobs/${job.id}`],
          ["POST", `/api/v1/jobs/${job.id}/cancel`, { reason: "should not happen" }],
          ["POST", `/api/v1/jobs/${job.id}/resume`, { resolved_by: "human" }],
          ["GET", `/api/v1/jobs/${job.id}/events`],
          // Not even whether a route exists.
          ["GET", "/api/v1/no-such-route"],
          // Spellings the router takes for the same routes (it ignores case, merges slashes,
          // decodes %xx): none of them gets past the secret.
          ["POST", "//api/v1/jobs", { job_type: "noop" }],
          ["POST", `/API/v1/jobs/${job.id}/cancel`, { reason: "should not happen" }],
          [
            "POST",
            "/%61pi/v1/workers/deregister",
            { target_worker_id: "sandbox-auth", cancel_active_jobs: true }
          ],
          ["GET", "/Api/v1/monitoring/workers"]
        ]
        const wrongs: ReadonlyArray<string | null> = [
          null,
          "Bearer wrong-secret",
          `Bearer ${secret}x`,
          `Bearer ${secret.slice(0, -1)}`,
          `Basic ${secret}`,
          secret,
          "Bearer "
        ]
        for (const [method, path, body] of routes) {
          for (const auth of wrongs) {
            const answer = yield* call(base, method, path, { body, auth })
            expectError(answer, 401, "UNAUTHORIZED")
            expect(answer.headers.get("www-authenticate")).toBe("Bearer")
            expect(answer.text).not.toContain(secret)
          }
        }
        // Nothing happened: the job still runs, the worker still works, nothing was submitted.
        expect((yield* statusOf(job.id)).status).toBe("running")
        const worker = (yield* Monitoring.workerRows).find((w) => w.worker_id === "w-n-auth")
        expect(worker?.state).toBe("busy")
        expect(yield* countJobs).toBe(jobsBefore)

        // The right secret (the scheme in any case) is let through.
        const ok = yield* call(base, "GET", `/api/v1/jobs/${job.id}`, { auth: `bearer ${secret}` })
        expect(ok.status).toBe(200)
        expect(ok.body.id).toBe(job.id)
        yield* command(k, { _tag: "complete" })
      })
    )

    it.scoped(
      "jobs: submit → 201 Job, get, events since an id, cancel → JobState with the worker that ran it",
      () =>
        Effect.gen(function* () {
          const { jobs, node } = yield* startGateway("gw-jobs")
          yield* startWorker("n-jobs", { targetWorkerId: "sandbox-jobs" })
          const base = yield* serve({ jobs, node })
          const k = key()

          const submitted = yield* call(base, "POST", "/api/v1/jobs", {
            body: {
              valet_task_id: "task-rest-1",
              job_type: "ctl",
              payload: { key: k },
              target_worker_id: "sandbox-jobs",
              worker_affinity: "strict",
              callback_url: null,
              priority: 5,
              max_attempts: 2,
              timeout_seconds: 600
            }
          })
          expect(submitted.status).toBe(201)
          const job = exact(Job, submitted.body)
          expect(Object.keys(submitted.body).sort()).toEqual(Object.keys(Job.fields).sort())
          expect(submitted.headers.get("location")).toBe(`/api/v1/jobs/${job.id}`)
          expect(job).toMatchObject({
            valet_task_id: "task-rest-1",
            job_type: "ctl",
            payload: { key: k },
            target_worker_id: "sandbox-jobs",
            worker_affinity: "strict",
            priority: 5,
            max_attempts: 2,
            timeout_seconds: 600,
            callback_url: null,
            finished_at: null
          })
          // Queued, or already handed to its idle target by the submit itself (docs/JOBS.md).
          if (job.status === "queued")
            expect(job).toMatchObject({ attempts: 0, started_at: null, worker_id: null })
          else expect(job).toMatchObject({ status: "running", attempts: 1, worker_id: "w-n-jobs" })
          expect(job.id).toMatch(/^[0-9a-f-]{36}$/)
          expect(job.created_at).toMatch(isoPattern)
          expect(job.cost).toEqual({ total_cost_usd: 0, action_count: 0, total_tokens: 0, breakdown: [] })

          yield* startedOf(k)
          const running = yield* eventually(
            Effect.map(call(base, "GET", `/api/v1/jobs/${job.id}`), (a) =>
              a.body.status === "running" ? a : undefined
            )
          )
          expect(running.status).toBe(200)
          const got = exact(Job, running.body)
          expect(got).toMatchObject({
            id: job.id,
            status: "running",
            worker_id: "w-n-jobs",
            node_id: "n-jobs",
            attempts: 1
          })
          expect(got.started_at).toMatch(isoPattern)

          // job_started is written just after the claim (the handler may already run): wait for it.
          const all = yield* eventually(
            Effect.map(call(base, "GET", `/api/v1/jobs/${job.id}/events`), (a) =>
              a.status !== 200 || a.body.events?.length > 0 ? a : undefined
            )
          )
          expect(all.status).toBe(200)
          expect(Object.keys(all.body)).toEqual(["events"])
          const events = exact(Edge.Results["job.events"], all.body).events
          expect(events.map((e) => e.event_type)).toEqual(["job_started"])
          expect(events[0]).toMatchObject({
            source: "job",
            job_id: job.id,
            worker_id: "w-n-jobs",
            valet_task_id: "task-rest-1",
            actor: "w-n-jobs"
          })
          expect(events[0]!.event_id).toMatch(/^[0-9]+$/)
          expect(events[0]!.created_at).toMatch(isoPattern)
          expect(typeof events[0]!.message).toBe("string")

          const cancelled = yield* call(base, "POST", `/api/v1/jobs/${job.id}/cancel`, {
            body: { reason: "user pressed stop" }
          })
          expect(cancelled.status).toBe(200)
          expect(exact(JobState, cancelled.body)).toEqual({
            job_id: job.id,
            status: "cancelled",
            worker_id: "w-n-jobs",
            node_id: "n-jobs"
          })
          // The handler itself was stopped (the browser work ends), not left running.
          yield* Deferred.await(slot(k).interrupted).pipe(Effect.timeout("5 seconds"))
          const after = yield* call(base, "GET", `/api/v1/jobs/${job.id}`)
          expect(after.body).toMatchObject({ status: "cancelled", error_message: "user pressed stop" })
          expect(after.body.finished_at).toMatch(isoPattern)

          // History after the first event only.
          const since = yield* call(
            base,
            "GET",
            `/api/v1/jobs/${job.id}/events?since_event_id=${events[0]!.event_id}`
          )
          const later = exact(Edge.Results["job.events"], since.body).events
          expect(later.map((e) => e.event_type)).toEqual(["job_cancelled"])
          expect(BigInt(later[0]!.event_id) > BigInt(events[0]!.event_id)).toBe(true)

          // Cancel without a body is accepted; of a finished job it is a conflict.
          const again = yield* call(base, "POST", `/api/v1/jobs/${job.id}/cancel`)
          expectError(again, 409, "CONFLICT")
          expect(again.body.error.details).toMatchObject({ job_id: job.id, status: "cancelled" })
        })
    )

    it.scoped("resume: a running job is 409 CONFLICT; a needs_human job resumes with the human's data", () =>
      Effect.gen(function* () {
        const { jobs, node } = yield* startGateway("gw-resume")
        yield* startWorker("n-resume")
        const base = yield* serve({ jobs, node })
        const k = key()
        const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)

        const early = yield* call(base, "POST", `/api/v1/jobs/${job.id}/resume`, {
          body: { resolved_by: "human" }
        })
        expectError(early, 409, "CONFLICT")
        expect(early.body.error.details).toMatchObject({ job_id: job.id, status: "running" })
        expect((yield* statusOf(job.id)).status).toBe("running")

        yield* command(k, { _tag: "needs_human", timeoutSeconds: 120 })
        yield* statusIs(job.id, "needs_human")
        const waiting = yield* call(base, "GET", `/api/v1/jobs/${job.id}`)
        expect(waiting.body.interaction).toMatchObject({ type: "captcha", timeout_seconds: 120 })

        const bad = yield* call(base, "POST", `/api/v1/jobs/${job.id}/resume`, {
          body: { resolution_data: 1 }
        })
        expectError(bad, 400, "INVALID_FRAME")
        expect(bad.body.error.details.issues.map((i: { path: Array<string> }) => i.path)).toContainEqual([
          "resolved_by"
        ])
        expect((yield* statusOf(job.id)).status).toBe("needs_human")

        const resumed = yield* call(base, "POST", `/api/v1/jobs/${job.id}/resume`, {
          body: { resolved_by: "human", resolution_data: { solved: true } }
        })
        expect(resumed.status).toBe(200)
        expect(exact(JobState, resumed.body)).toEqual({
          job_id: job.id,
          status: "running",
          worker_id: "w-n-resume",
          node_id: "n-resume"
        })
        const answer = yield* Queue.take(slot(k).resumed)
        expect(answer).toMatchObject({ resolved_by: "human", resolution_data: { solved: true } })
        yield* command(k, { _tag: "complete" })
        yield* statusIs(job.id, "completed")
      })
    )

    it.scoped("errors map to RestError codes and statuses", () =>
      Effect.gen(function* () {
        const { jobs, node } = yield* startGateway("gw-errors")
        const off = yield* startWorker("n-off", { targetWorkerId: "sandbox-off" })
        const base = yield* serve({ jobs, node })
        yield* off.stop
        yield* eventually(
          Effect.map(Monitoring.workerRows, (rows) =>
            rows.find((w) => w.worker_id === "w-n-off" && w.state === "offline")
          )
        )
        const missing = Crypto.randomUUID()

        // Unknown job: 404 on every job route.
        for (const [method, path, body] of [
          ["GET", `/api/v1/jobs/${missing}`],
          ["POST", `/api/v1/jobs/${missing}/cancel`, {}],
          ["POST", `/api/v1/jobs/${missing}/resume`, { resolved_by: "human" }],
          ["GET", `/api/v1/jobs/${missing}/events`],
          ["GET", "/api/v1/jobs/not-a-uuid"]
        ] as const) {
          const answer = yield* call(base, method, path, { body })
          expectError(answer, 404, "NOT_FOUND")
        }
        const notFound = yield* call(base, "GET", `/api/v1/jobs/${missing}`)
        expect(notFound.body.error.details).toEqual({ what: "job", id: missing })

        // Strict to an offline worker: refused, nothing stored.
        const strict = yield* call(base, "POST", "/api/v1/jobs", {
          body: {
            valet_task_id: "task-strict-off",
            job_type: "noop",
            target_worker_id: "sandbox-off",
            worker_affinity: "strict"
          }
        })
        expectError(strict, 409, "WORKER_UNAVAILABLE")
        expect(strict.body.error.details).toEqual({
          target_worker_id: "sandbox-off",
          reason: "it is offline"
        })
        const sql = yield* SqlClient.SqlClient
        const stored = yield* sql<{
          n: number
        }>`SELECT count(*)::int AS n FROM gh_automation_jobs WHERE valet_task_id = 'task-strict-off'`
        expect(stored[0]!.n).toBe(0)

        // Bad bodies: 400 with details.
        const notJson = yield* call(base, "POST", "/api/v1/jobs", { raw: "{job_type: noop" })
        expectError(notJson, 400, "INVALID_FRAME")
        const empty = yield* call(base, "POST", "/api/v1/jobs", { raw: "" })
        expectError(empty, 400, "INVALID_FRAME")
        const unknownField = yield* call(base, "POST", "/api/v1/jobs", {
          body: { job_type: "noop", colour: "red" }
        })
        expectError(unknownField, 400, "INVALID_FRAME")
        expect(unknownField.body.error.details.issues).toContainEqual(
          expect.objectContaining({ path: ["colour"] })
        )
        const noType = yield* call(base, "POST", "/api/v1/jobs", { body: { payload: {} } })
        expectError(noType, 400, "INVALID_FRAME")
        expect(noType.body.error.details.issues).toContainEqual(
          expect.objectContaining({ path: ["job_type"] })
        )
        const noTarget = yield* call(base, "POST", "/api/v1/jobs", {
          body: { job_type: "noop", worker_affinity: "strict" }
        })
        expectError(noTarget, 400, "INVALID_FRAME")
        expect(noTarget.body.error.details.reason).toMatch(/needs a target_worker_id/)
        const badCancel = yield* call(base, "POST", `/api/v1/jobs/${missing}/cancel`, { body: { reason: 7 } })
        expectError(badCancel, 400, "INVALID_FRAME")
        const badSince = yield* call(base, "GET", `/api/v1/jobs/${missing}/events?since_event_id=abc`)
        expectError(badSince, 400, "INVALID_FRAME")
        const nobody = yield* call(base, "POST", "/api/v1/workers/deregister", { body: { reason: "x" } })
        expectError(nobody, 400, "INVALID_FRAME")
        // Text Postgres cannot store (NUL, a lone surrogate) and absurd nesting: 400, not a 500.
        const nul = yield* call(base, "POST", "/api/v1/jobs", {
          body: { job_type: "noop", valet_task_id: "a\u0000b" }
        })
        expectError(nul, 400, "INVALID_FRAME")
        const surrogate = yield* call(base, "POST", "/api/v1/jobs", {
          raw: '{"job_type":"noop","payload":{"t":"\\ud800"}}'
        })
        expectError(surrogate, 400, "INVALID_FRAME")
        const deep = yield* call(base, "POST", "/api/v1/jobs", {
          raw: `{"job_type":"noop","payload":${"[".repeat(10_000)}${"]".repeat(10_000)}}`
        })
        expectError(deep, 400, "INVALID_FRAME")
        const noWorker = yield* call(base, "POST", "/api/v1/workers/deregister", {
          body: { target_worker_id: "sandbox-never-existed" }
        })
        expectError(noWorker, 404, "NOT_FOUND")

        // Over 1 MiB: 413, and the connection still answers the 413.
        const big = yield* call(base, "POST", "/api/v1/jobs", {
          body: { job_type: "noop", payload: { blob: "x".repeat(Rest.maxBodyBytes) } }
        })
        expectError(big, 413, "INVALID_FRAME")
        // The same without a Content-Length (chunked): cut off at the limit, still answered.
        const streamed = yield* chunked(base, "/api/v1/jobs", 2 * Rest.maxBodyBytes)
        expect(streamed.status).toBe(413)
        expect(JSON.parse(streamed.text).error.code).toBe("INVALID_FRAME")
        const justUnder = yield* call(base, "POST", "/api/v1/jobs", {
          body: { job_type: "noop", payload: { blob: "x".repeat(Rest.maxBodyBytes - 200) } }
        })
        expect(justUnder.status).toBe(201)

        // Unknown routes.
        const unknown = yield* call(base, "GET", "/nope")
        expectError(unknown, 404, "NOT_FOUND")
        // Without the secret only /health and /metrics answer: the rest is 401, routes or not.
        expectError(yield* call(base, "GET", "/nope", { auth: null }), 401, "UNAUTHORIZED")
        expectError(yield* call(base, "GET", "/Health/", { auth: null }), 401, "UNAUTHORIZED")
        const wrongMethod = yield* call(base, "DELETE", `/api/v1/jobs/${missing}`)
        expectError(wrongMethod, 404, "NOT_FOUND")
      })
    )

    it.scoped(
      "GET /api/v1/monitoring/workers: the requirements' shape, with idle, busy, draining and offline",
      () =>
        Effect.gen(function* () {
          const { jobs, node } = yield* startGateway("gw-mon")
          yield* startWorker("n-idle", {
            targetWorkerId: "sb-idle",
            ec2InstanceId: "i-0idle",
            ec2Ip: "10.1.0.1"
          })
          const base = yield* serve({ jobs, node })
          // One job done on the idle worker, for its counter.
          const done = yield* jobs.submit({
            job_type: "noop",
            target_worker_id: "sb-idle",
            worker_affinity: "strict"
          })
          yield* statusIs(done.id, "completed")

          yield* startWorker("n-busy", { targetWorkerId: "sb-busy" })
          const kb = key()
          const busyJob = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: kb },
            target_worker_id: "sb-busy",
            worker_affinity: "strict"
          })
          yield* startedOf(kb)

          yield* startWorker("n-drain", { targetWorkerId: "sb-drain" })
          const kd = key()
          const drainJob = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: kd },
            target_worker_id: "sb-drain",
            worker_affinity: "strict"
          })
          yield* startedOf(kd)
          yield* jobs.drain("w-n-drain", "deploy")

          const gone = yield* startWorker("n-gone", { targetWorkerId: "sb-gone" })
          yield* gone.stop
          // A worker deregistered an hour after it registered, with the columns the client app
          // writes itself (task URL, browser session) and failures on its counter.
          const sql = yield* SqlClient.SqlClient
          yield* sql`INSERT INTO gh_worker_registry (worker_id, status, target_worker_id, current_task_url,
              browser_session_id, registered_at, last_heartbeat, deregistered_at, jobs_completed, jobs_failed)
            VALUES ('w-legacy', 'offline', 'sb-legacy', 'https://jobs.example/apply/42', 'bs-7f3a',
              now() - interval '2 hours', now() - interval '1 hour', now() - interval '1 hour', 7, 2)`

          const answer = yield* eventually(
            Effect.map(call(base, "GET", "/api/v1/monitoring/workers"), (a) => {
              const w = (a.body?.workers ?? []) as Array<Edge.MonitoredWorker>
              const byId = new Map(w.map((x) => [x.worker_id, x]))
              return byId.get("w-n-idle")?.jobs_completed === 1 &&
                byId.get("w-n-busy")?.current_job_id === busyJob.id &&
                byId.get("w-n-drain")?.current_job_id === drainJob.id
                ? a
                : undefined
            })
          )
          expect(answer.status).toBe(200)
          expect(Object.keys(answer.body)).toEqual(["workers"])
          const workers = exact(
            Schema.Struct({ workers: Schema.Array(Edge.MonitoredWorker) }),
            answer.body
          ).workers
          const fields = [
            "worker_id",
            "status",
            "target_worker_id",
            "ec2_instance_id",
            "ec2_ip",
            "current_job_id",
            "current_task_url",
            "browser_session_id",
            "registered_at",
            "last_heartbeat",
            "jobs_completed",
            "jobs_failed",
            "uptime_seconds"
          ]
          for (const raw of answer.body.workers) expect(Object.keys(raw).sort()).toEqual([...fields].sort())
          const byId = new Map(workers.map((w) => [w.worker_id, w]))
          expect(byId.get("w-n-idle")).toMatchObject({
            status: "idle",
            target_worker_id: "sb-idle",
            ec2_instance_id: "i-0idle",
            ec2_ip: "10.1.0.1",
            current_job_id: null,
            jobs_completed: 1,
            jobs_failed: 0
          })
          expect(byId.get("w-n-busy")).toMatchObject({ status: "busy", current_job_id: busyJob.id })
          // Draining while it finishes its job: draining, with the job it finishes.
          expect(byId.get("w-n-drain")).toMatchObject({ status: "draining", current_job_id: drainJob.id })
          expect(byId.get("w-n-gone")).toMatchObject({ status: "offline", target_worker_id: "sb-gone" })
          expect(byId.get("w-legacy")).toMatchObject({
            status: "offline",
            target_worker_id: "sb-legacy",
            current_job_id: null,
            current_task_url: "https://jobs.example/apply/42",
            browser_session_id: "bs-7f3a",
            jobs_completed: 7,
            jobs_failed: 2,
            // Registration to deregistration, not to now.
            uptime_seconds: 3600
          })
          for (const w of workers.filter((x) => x.worker_id !== "w-legacy")) {
            expect(w.registered_at).toMatch(isoPattern)
            expect(w.last_heartbeat).toMatch(isoPattern)
            expect(Number.isInteger(w.uptime_seconds)).toBe(true)
            expect(w.uptime_seconds).toBeGreaterThanOrEqual(0)
            expect(w.uptime_seconds).toBeLessThan(600)
            expect(Date.parse(w.last_heartbeat)).toBeGreaterThanOrEqual(Date.parse(w.registered_at))
          }
          // In worker id order.
          expect(workers.map((w) => w.worker_id)).toEqual([...workers.map((w) => w.worker_id)].sort())
          yield* command(kb, { _tag: "complete" })
          yield* command(kd, { _tag: "complete" })
        })
    )

    it.scoped(
      "POST /api/v1/workers/deregister by target_worker_id cancels the running job and returns its id",
      () =>
        Effect.gen(function* () {
          const { jobs, node } = yield* startGateway("gw-dereg")
          yield* startWorker("n-dereg", { targetWorkerId: "sandbox-dereg" })
          const base = yield* serve({ jobs, node })
          const k = key()
          const job = yield* jobs.submit({
            job_type: "ctl",
            payload: { key: k },
            target_worker_id: "sandbox-dereg",
            worker_affinity: "strict"
          })
          yield* startedOf(k)

          const answer = yield* call(base, "POST", "/api/v1/workers/deregister", {
            body: {
              target_worker_id: "sandbox-dereg",
              reason: "sandbox_terminated",
              cancel_active_jobs: true,
              drain_timeout_seconds: 30
            }
          })
          expect(answer.status).toBe(200)
          expect(exact(DeregisterResult, answer.body)).toEqual({
            worker_ids: ["w-n-dereg"],
            cancelled_job_ids: [job.id]
          })
          expect((yield* statusOf(job.id)).status).toBe("cancelled")
          const workers = yield* call(base, "GET", "/api/v1/monitoring/workers")
          const w = (workers.body.workers as Array<Edge.MonitoredWorker>).find(
            (x) => x.worker_id === "w-n-dereg"
          )
          expect(w?.status).toBe("offline")
          const sql = yield* SqlClient.SqlClient
          const events = yield* sql<{ event_type: string; metadata: { reason?: string } }>`
            SELECT event_type, metadata FROM gh_worker_events WHERE worker_id = 'w-n-dereg' ORDER BY id`
          expect(events.at(-1)).toMatchObject({
            event_type: "worker_deregistered",
            metadata: { reason: "sandbox_terminated" }
          })
          // A strict job for it now is refused.
          const strict = yield* call(base, "POST", "/api/v1/jobs", {
            body: { job_type: "noop", target_worker_id: "sandbox-dereg", worker_affinity: "strict" }
          })
          expectError(strict, 409, "WORKER_UNAVAILABLE")
        })
    )

    it.scoped(
      "GET /metrics: Prometheus text with jobs, mailbox depth, workers, routing latency, sockets",
      () =>
        Effect.gen(function* () {
          const { jobs, node } = yield* startGateway("gw-metrics")
          yield* startWorker("n-metrics")
          let sockets = 7
          const base = yield* serve({ jobs, node, openConnections: () => sockets })
          const sql = yield* SqlClient.SqlClient
          // Two messages waiting for a node that is gone: its backlog shows.
          yield* sql`INSERT INTO actor_mailbox (message_id, node_id, actor_id, kind, sender, body)
          VALUES (gen_random_uuid(), 'ghost "node"', 'probe:ghost', 'tell', 'test', '{}'),
                 (gen_random_uuid(), 'ghost "node"', 'probe:ghost', 'tell', 'test', '{}')`
          const k = key()
          const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
          yield* startedOf(k)

          const scrape = Effect.gen(function* () {
            const answer = yield* call(base, "GET", "/metrics", { auth: null })
            expect(answer.status).toBe(200)
            expect(answer.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8")
            return parsePrometheus(answer.text)
          })
          const first = yield* scrape
          expect(Object.fromEntries(first.types)).toEqual({
            troupe_jobs: "gauge",
            troupe_mailbox_depth: "gauge",
            troupe_workers: "gauge",
            troupe_routing_latency_seconds: "histogram",
            troupe_websocket_connections: "gauge"
          })

          // Jobs: all six statuses, as the table has them.
          const counts = yield* sql<{ status: string; n: number }>`
          SELECT status, count(*)::int AS n FROM gh_automation_jobs GROUP BY status`
          const jobSeries = series(first.samples, "troupe_jobs")
          expect(jobSeries.map((s) => s.labels.status)).toEqual([...JobStatus.literals])
          for (const s of jobSeries) {
            expect(s.value).toBe(counts.find((c) => c.status === s.labels.status)?.n ?? 0)
          }
          expect(jobSeries.find((s) => s.labels.status === "running")!.value).toBeGreaterThanOrEqual(1)

          // Mailbox depth: every node that is up, and the dead one's backlog (its label escaped).
          const depth = series(first.samples, "troupe_mailbox_depth")
          expect(depth.find((s) => s.labels.node === 'ghost "node"')?.value).toBe(2)
          expect(depth.map((s) => s.labels.node)).toEqual(expect.arrayContaining(["gw-metrics", "n-metrics"]))
          expect(depth.find((s) => s.labels.node === "gw-metrics")!.value).toBeGreaterThanOrEqual(0)

          // Workers: the four states, summing to the registry.
          const workerSeries = series(first.samples, "troupe_workers")
          expect(workerSeries.map((s) => s.labels.status)).toEqual(["idle", "busy", "draining", "offline"])
          const registry = yield* Monitoring.workerRows
          expect(workerSeries.reduce((a, s) => a + s.value, 0)).toBe(registry.length)
          expect(workerSeries.find((s) => s.labels.status === "busy")!.value).toBe(
            registry.filter((w) => w.state === "busy").length
          )

          // Sockets: what the gateway reports, at scrape time.
          expect(series(first.samples, "troupe_websocket_connections")).toEqual([
            { name: "troupe_websocket_connections", labels: {}, value: 7 }
          ])
          sockets = 3
          const second = yield* scrape
          expect(series(second.samples, "troupe_websocket_connections")[0]!.value).toBe(3)

          // Routing latency: a drain is an ask from this gateway's node to the worker's. (A cancel
          // may end the run by its push before its ask is routed, so it is not always one.)
          const cancelled = yield* call(base, "POST", `/api/v1/jobs/${job.id}/cancel`)
          expect(cancelled.body.status).toBe("cancelled")
          const before = histogramOf((yield* scrape).samples, "troupe_routing_latency_seconds")
          expect((yield* jobs.drain("w-n-metrics")).status).toBe("draining")
          const after = histogramOf((yield* scrape).samples, "troupe_routing_latency_seconds")
          for (const h of [before, after]) {
            expect(h.buckets.map((b) => b.le)).toEqual([
              "0.001",
              "0.0025",
              "0.005",
              "0.01",
              "0.025",
              "0.05",
              "0.1",
              "0.25",
              "1",
              "+Inf"
            ])
            for (let i = 1; i < h.buckets.length; i++) {
              expect(h.buckets[i]!.n).toBeGreaterThanOrEqual(h.buckets[i - 1]!.n)
            }
            expect(h.buckets.at(-1)!.n).toBe(h.count)
          }
          expect(after.count).toBe(before.count + 1)
          expect(after.sum).toBeGreaterThan(before.sum)
          // The round trip went through Postgres twice: more than nothing, less than the ask timeout.
          expect(after.sum - before.sum).toBeGreaterThan(0.0001)
          expect(after.sum - before.sum).toBeLessThan(10)
        })
    )
  })
})
