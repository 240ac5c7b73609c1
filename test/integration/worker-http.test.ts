import { describe, expect, it, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { ConfigProvider, Context, Effect, Exit, Layer, Option, Redacted, Scope } from "effect"
import * as Net from "node:net"
import pg from "pg"
import packageJson from "../../package.json" with { type: "json" }
import * as WorkerActor from "../../src/actors/WorkerActor.ts"
import * as Browser from "../../src/browser/Browser.ts"
import * as WorkerHttp from "../../src/edge/WorkerHttp.ts"
import * as Db from "../fixtures/Db.ts"
import * as Ws from "../fixtures/Ws.ts"
import {
  command,
  eventually,
  key,
  startedOf,
  startGateway,
  startWorker,
  statusIs,
  statusOf,
  type WorkerNode
} from "../fixtures/Jobs.ts"

const secret = "s3cret-deploy-token"
interface Answer {
  readonly status: number
  readonly headers: Headers
  readonly body: any
}

/** A real request over loopback. */
const call = (url: string, init: RequestInit = {}) =>
  Effect.promise(async (): Promise<Answer> => {
    const response = await fetch(url, init)
    const text = await response.text()
    return {
      status: response.status,
      headers: response.headers,
      body: text === "" ? undefined : JSON.parse(text)
    }
  })

/** Serve a worker's HTTP routes on an ephemeral loopback port; the base url. */
const serve = (w: WorkerNode, options: WorkerHttp.Options = {}) =>
  Effect.map(
    WorkerHttp.make(w.worker, {
      host: "127.0.0.1",
      port: 0,
      deploySecret: Redacted.make(secret),
      ...options
    }),
    (http) => `http://127.0.0.1:${http.port}`
  )

const drain = (base: string, headers: Record<string, string> = {}, body?: string) =>
  call(`${base}/worker/drain`, { method: "POST", headers, ...(body === undefined ? {} : { body }) })

const registryStatus = (workerId: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(
      sql<{ status: string }>`SELECT status FROM gh_worker_registry WHERE worker_id = ${workerId}`,
      (rows) => rows[0]?.status
    )
  )

const expectRestError = (answer: Answer, status: number, code: string) => {
  expect(answer.status).toBe(status)
  expect(Object.keys(answer.body)).toEqual(["error"])
  expect(answer.body.error.code).toBe(code)
  expect(typeof answer.body.error.message).toBe("string")
  expect(answer.body.error.message.length).toBeGreaterThan(10)
}

/** A SqlClient over a `pg` pool whose server is `port` on loopback (nothing, or something that never answers). */
const unreachableSql = (port: number) =>
  PgClient.layerFromPool({
    acquire: Effect.acquireRelease(
      Effect.sync(() => {
        const pool = new pg.Pool({ host: "127.0.0.1", port, user: "nobody", database: "nothing", max: 2 })
        pool.on("error", () => undefined)
        return pool
      }),
      (
        pool // A connect to the silent server never ends on its own: give up on it.
      ) =>
        Effect.promise(() => pool.end().catch(() => undefined)).pipe(
          Effect.interruptible,
          Effect.timeoutOption("1 second")
        )
    )
  }).pipe(Layer.build, Effect.map(Context.get(SqlClient.SqlClient)), Effect.orDie)

/** A TCP server that accepts connections and never says a word (a hung database). */
const silentServer = Effect.acquireRelease(
  Effect.async<{ port: number; server: Net.Server; sockets: Set<Net.Socket> }>((resume) => {
    const sockets = new Set<Net.Socket>()
    const server = Net.createServer((socket) => {
      sockets.add(socket)
      socket.on("close", () => sockets.delete(socket))
    })
    server.listen(0, "127.0.0.1", () =>
      resume(Effect.succeed({ port: (server.address() as Net.AddressInfo).port, server, sockets }))
    )
  }),
  ({ server, sockets }) =>
    Effect.async<void>((resume) => {
      for (const s of sockets) s.destroy()
      server.close(() => resume(Effect.void))
    })
)

/** A loopback port nothing listens on. */
const closedPort = Effect.async<number>((resume) => {
  const server = Net.createServer()
  server.listen(0, "127.0.0.1", () => {
    const port = (server.address() as Net.AddressInfo).port
    server.close(() => resume(Effect.succeed(port)))
  })
})

describe("worker node HTTP", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("GET /health: every field of Health, with a real database check", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("h1")
        const base = yield* serve(w, { environment: "staging", commitSha: "abc1234" })
        const before = Date.now()
        const answer = yield* call(`${base}/health`)
        expect(answer.status).toBe(200)
        expect(answer.headers.get("content-type")).toContain("application/json")
        expect(Object.keys(answer.body).sort()).toEqual(
          ["api_healthy", "commit_sha", "environment", "service", "status", "timestamp", "version"].sort()
        )
        expect(answer.body.status).toBe("ok")
        expect(answer.body.service).toBe("troupe-worker")
        expect(answer.body.version).toBe(packageJson.version)
        expect(answer.body.environment).toBe("staging")
        expect(answer.body.commit_sha).toBe("abc1234")
        expect(answer.body.api_healthy).toBe(true)
        expect(typeof answer.body.timestamp).toBe("string")
        expect(new Date(answer.body.timestamp).toISOString()).toBe(answer.body.timestamp)
        expect(Date.parse(answer.body.timestamp)).toBeGreaterThanOrEqual(before - 5)
        expect(Date.parse(answer.body.timestamp)).toBeLessThanOrEqual(Date.now() + 5)

        // The defaults, when nothing is configured.
        const plain = yield* serve(w, {})
        const defaults = (yield* call(`${plain}/health`)).body
        expect(defaults.environment).toBe("development")
        expect(defaults.commit_sha).toBe("unknown")
      })
    )

    it.scoped("GET /health: api_healthy false and status degraded when the database refuses or hangs", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("h2")
        // Refused: nothing listens on the port.
        const refused = yield* unreachableSql(yield* closedPort)
        const base1 = yield* serve(w).pipe(Effect.provideService(SqlClient.SqlClient, refused))
        const down = yield* call(`${base1}/health`)
        expect(down.status).toBe(503)
        expect(down.body.status).toBe("degraded")
        expect(down.body.api_healthy).toBe(false)
        expect(down.body.service).toBe("troupe-worker")

        // Hung: the server accepts and never answers; the check gives up after its timeout.
        const silent = yield* silentServer
        const hung = yield* unreachableSql(silent.port)
        const base2 = yield* serve(w, { healthTimeout: "300 millis" }).pipe(
          Effect.provideService(SqlClient.SqlClient, hung)
        )
        const started = Date.now()
        const slow = yield* call(`${base2}/health`)
        const took = Date.now() - started
        expect(slow.status).toBe(503)
        expect(slow.body.status).toBe("degraded")
        expect(slow.body.api_healthy).toBe(false)
        expect(took).toBeGreaterThanOrEqual(250)
        expect(took).toBeLessThan(5_000)

        // The worker's own routes do not depend on the database check.
        expect((yield* call(`${base2}/worker/health`)).body.status).toBe("idle")
      })
    )

    it.scoped("GET /worker/health and /worker/status: idle → busy → idle as a job runs and ends", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-s")
        const startedAround = Date.now()
        const w = yield* startWorker("s1", {
          ec2InstanceId: "i-0abc123",
          ec2Ip: "10.0.0.9",
          maxConcurrent: 2
        })
        const base = yield* serve(w)

        const idle = yield* call(`${base}/worker/health`)
        expect(idle.status).toBe(200)
        expect(idle.body).toEqual({ status: "idle", active_jobs: 0, deploy_safe: true })

        const status = yield* call(`${base}/worker/status`)
        expect(status.status).toBe(200)
        expect(Object.keys(status.body).sort()).toEqual(
          [
            "active_jobs",
            "browser",
            "ec2_instance_id",
            "ec2_ip",
            "is_draining",
            "is_running",
            "max_concurrent",
            "uptime_ms",
            "worker_id"
          ].sort()
        )
        expect(status.body.worker_id).toBe("w-s1")
        expect(status.body.ec2_instance_id).toBe("i-0abc123")
        expect(status.body.ec2_ip).toBe("10.0.0.9")
        expect(status.body.active_jobs).toBe(0)
        expect(status.body.max_concurrent).toBe(2)
        expect(status.body.is_running).toBe(true)
        expect(status.body.is_draining).toBe(false)
        expect(Number.isInteger(status.body.uptime_ms)).toBe(true)
        expect(status.body.uptime_ms).toBeGreaterThanOrEqual(0)
        expect(status.body.uptime_ms).toBeLessThanOrEqual(Date.now() - startedAround)
        // No browser handed to this server.
        expect(status.body.browser).toBeNull()

        const k = key()
        const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)
        const busy = yield* call(`${base}/worker/health`)
        expect(busy.body).toEqual({ status: "busy", active_jobs: 1, deploy_safe: false })
        const busyStatus = (yield* call(`${base}/worker/status`)).body
        expect(busyStatus.active_jobs).toBe(1)
        expect(busyStatus.uptime_ms).toBeGreaterThanOrEqual(status.body.uptime_ms)

        yield* command(k, { _tag: "complete" })
        const after = yield* eventually(
          Effect.map(call(`${base}/worker/health`), (a) => (a.body.status === "idle" ? a : undefined))
        )
        expect(after.body).toEqual({ status: "idle", active_jobs: 0, deploy_safe: true })
        expect((yield* statusOf(job.id)).status).toBe("completed")
      })
    )

    it.scoped("POST /worker/drain: a wrong or missing secret is refused with 401 and changes nothing", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("d1")
        const base = yield* serve(w)
        expectRestError(yield* drain(base), 401, "UNAUTHORIZED")
        expectRestError(yield* drain(base, { "X-Deploy-Secret": "wrong" }), 401, "UNAUTHORIZED")
        expectRestError(yield* drain(base, { "X-Deploy-Secret": `${secret}x` }), 401, "UNAUTHORIZED")
        expectRestError(yield* drain(base, { "X-Deploy-Secret": "" }), 401, "UNAUTHORIZED")
        // The secret in another header does not count.
        expectRestError(yield* drain(base, { Authorization: `Bearer ${secret}` }), 401, "UNAUTHORIZED")
        const status = (yield* call(`${base}/worker/status`)).body
        expect(status.is_draining).toBe(false)
        expect((yield* call(`${base}/worker/health`)).body.status).toBe("idle")
        expect(yield* registryStatus("w-d1")).toBe("active")
      })
    )

    it.scoped(
      "POST /worker/drain: 503 when GH_DEPLOY_SECRET is not set (never open), and nothing changes",
      () =>
        Effect.gen(function* () {
          const w = yield* startWorker("d2")
          for (const deploySecret of [undefined, Redacted.make("")]) {
            const base = yield* serve(w, { deploySecret })
            const answer = yield* drain(base, { "X-Deploy-Secret": "" })
            expectRestError(answer, 503, "INTERNAL")
            expect(answer.body.error.message).toContain("GH_DEPLOY_SECRET is not set")
            expectRestError(yield* drain(base, { "X-Deploy-Secret": secret }), 503, "INTERNAL")
          }
          expect(yield* registryStatus("w-d2")).toBe("active")
          expect(w.worker.stats().running).toBe(0)
        })
    )

    it.scoped(
      "POST /worker/drain: the running job finishes, nothing new is claimed; health says draining, deploy_safe once empty",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { jobs } = yield* startGateway("gw-d")
          const w = yield* startWorker("d3", { maxConcurrent: 2 })
          const base = yield* serve(w)
          const k1 = key()
          const first = yield* jobs.submit({ job_type: "ctl", payload: { key: k1 } })
          yield* startedOf(k1)

          // A body that is not the documented one is refused before anything happens.
          expectRestError(
            yield* drain(base, { "X-Deploy-Secret": secret }, "{not json"),
            400,
            "INVALID_FRAME"
          )
          expectRestError(
            yield* drain(base, { "X-Deploy-Secret": secret }, JSON.stringify({ reason: 42 })),
            400,
            "INVALID_FRAME"
          )
          expect(yield* registryStatus("w-d3")).toBe("active")

          const drained = yield* drain(
            base,
            { "X-Deploy-Secret": secret, "Content-Type": "application/json" },
            JSON.stringify({ reason: "deploy" })
          )
          expect(drained.status).toBe(200)
          expect(drained.body).toEqual({ ok: true, worker_id: "w-d3", status: "draining", active_jobs: 1 })
          expect(yield* registryStatus("w-d3")).toBe("draining")
          const events = yield* sql<{ metadata: { reason?: string } }>`
            SELECT metadata FROM gh_worker_events WHERE worker_id = 'w-d3' AND event_type = 'worker_draining'`
          expect(events.map((e) => e.metadata.reason)).toEqual(["deploy"])

          expect((yield* call(`${base}/worker/health`)).body).toEqual({
            status: "draining",
            active_jobs: 1,
            deploy_safe: false
          })
          const status = (yield* call(`${base}/worker/status`)).body
          expect(status.is_draining).toBe(true)
          expect(status.is_running).toBe(true)
          expect(status.active_jobs).toBe(1)

          // A free slot, but draining: a job submitted now stays queued.
          const claimedBefore = w.worker.stats().claimed
          const k2 = key()
          const second = yield* jobs.submit({ job_type: "ctl", payload: { key: k2 } })
          w.worker.wake()

          // The running job still finishes.
          yield* command(k1, { _tag: "complete" })
          const empty = yield* eventually(
            Effect.map(call(`${base}/worker/health`), (a) => (a.body.active_jobs === 0 ? a : undefined))
          )
          expect(empty.body).toEqual({ status: "draining", active_jobs: 0, deploy_safe: true })
          expect((yield* statusOf(first.id)).status).toBe("completed")
          expect((yield* statusOf(second.id)).status).toBe("queued")
          expect(w.worker.stats().claimed).toBe(claimedBefore)

          // Draining again answers the same; no body is fine.
          const again = yield* drain(base, { "X-Deploy-Secret": secret })
          expect(again.body).toEqual({ ok: true, worker_id: "w-d3", status: "draining", active_jobs: 0 })

          // Another worker takes the queued job: it was claimable all along, only not by the drained one.
          yield* startWorker("d4")
          expect((yield* startedOf(k2)).workerId).toBe("w-d4")
          yield* command(k2, { _tag: "complete" })
          const done = yield* statusIs(second.id, "completed")
          expect(done.worker_id).toBe("w-d4")
          expect(w.worker.stats().claimed).toBe(claimedBefore)
        })
    )

    it.scoped("a deregistered worker: not running, deploy safe; drain answers 409", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("d5")
        const base = yield* serve(w)
        yield* w.worker.deregister(
          new WorkerActor.Deregister({
            reason: "scale-down",
            cancel_active_jobs: true,
            drain_timeout_seconds: 0
          })
        )
        const status = (yield* call(`${base}/worker/status`)).body
        expect(status.is_running).toBe(false)
        expect(status.is_draining).toBe(false)
        expect((yield* call(`${base}/worker/health`)).body).toEqual({
          status: "draining",
          active_jobs: 0,
          deploy_safe: true
        })
        expectRestError(yield* drain(base, { "X-Deploy-Secret": secret }), 409, "CONFLICT")
      })
    )

    it.scoped("unknown routes answer 404, known routes with the wrong method 405 with Allow", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("r1")
        const base = yield* serve(w)
        expectRestError(yield* call(`${base}/nope`), 404, "NOT_FOUND")
        expectRestError(yield* call(`${base}/worker`), 404, "NOT_FOUND")
        expectRestError(yield* call(`${base}/worker/drain/now`, { method: "POST" }), 404, "NOT_FOUND")

        const post = yield* call(`${base}/health`, { method: "POST" })
        expectRestError(post, 405, "INVALID_FRAME")
        expect(post.headers.get("allow")).toBe("GET, HEAD")
        const get = yield* call(`${base}/worker/drain`)
        expectRestError(get, 405, "INVALID_FRAME")
        expect(get.headers.get("allow")).toBe("POST")
        const del = yield* call(`${base}/worker/status?x=1`, { method: "DELETE" })
        expectRestError(del, 405, "INVALID_FRAME")

        // A query string does not change the route.
        expect((yield* call(`${base}/worker/health?verbose=1`)).body.status).toBe("idle")
        // HEAD answers like GET, without a body.
        const head = yield* call(`${base}/worker/health`, { method: "HEAD" })
        expect(head.status).toBe(200)
        expect(head.body).toBeUndefined()
      })
    )

    it.scoped("/worker/status and /metrics carry the browser's figures; the registry gets the server's address", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-m")
        const w = yield* startWorker("m1", { maxConcurrent: 3 })
        // A browser that has not been launched yet (no browser job has run): its figures are zero.
        const browser = yield* Browser.make({ executablePath: "/nonexistent/chromium" })
        const scope = yield* Scope.make()
        const base = yield* serve(w, { browser }).pipe(Scope.extend(scope))
        const status = (yield* call(`${base}/worker/status`)).body
        expect(status.browser).toEqual({ version: null, open_contexts: 0, launches: 0, chromium_rss_mb: 0 })

        const k = key()
        yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)
        const response = yield* Effect.promise(() => fetch(`${base}/metrics`))
        expect(response.status).toBe(200)
        expect(response.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8")
        const text = yield* Effect.promise(() => response.text())
        for (const line of [
          "# TYPE troupe_worker_active_jobs gauge",
          'troupe_worker_active_jobs{worker_id="w-m1"} 1',
          'troupe_worker_max_concurrent{worker_id="w-m1"} 3',
          'troupe_worker_draining{worker_id="w-m1"} 0',
          "# TYPE troupe_browser_open_contexts gauge",
          'troupe_browser_open_contexts{worker_id="w-m1"} 0',
          "# TYPE troupe_browser_launches_total counter",
          'troupe_browser_launches_total{worker_id="w-m1"} 0',
          'troupe_browser_chromium_rss_bytes{worker_id="w-m1"} 0',
          'troupe_browser_info{worker_id="w-m1",version=""} 0',
          'troupe_live_viewers{worker_id="w-m1"} 0'
        ]) {
          expect(text.split("\n"), line).toContain(line)
        }
        yield* command(k, { _tag: "complete" })

        // Where gateways find this worker's live view; cleared when the server stops.
        const httpUrl = Effect.flatMap(SqlClient.SqlClient, (sql) =>
          Effect.map(
            sql<{ http_url: string | null }>`SELECT http_url FROM gh_worker_registry WHERE worker_id = 'w-m1'`,
            (rows) => rows[0]?.http_url
          )
        )
        yield* eventually(Effect.map(httpUrl, (url) => (url === base ? url : undefined)))
        yield* Scope.close(scope, Exit.void)
        expect(yield* httpUrl).toBeNull()
      })
    )

    it.scoped("/live/<job_id> on a worker: a WebSocket behind the service secret; no page here is named", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("lv1")
        const browser = yield* Browser.make({ executablePath: "/nonexistent/chromium" })
        const noSecret = (yield* serve(w, { browser })).replace("http", "ws")
        const withSecret = (yield* serve(w, { browser, serviceSecret: Redacted.make("live-s3cret") })).replace(
          "http",
          "ws"
        )
        const jobId = "0b0e2f4c-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
        // No service secret configured: the live view is off, and says what to set.
        const off = yield* Ws.connect(`${noSecret}/live/${jobId}`)
        off.send({ v: 1, type: "auth", token: "anything" })
        expect((yield* off.closed()).code).toBe(4401)
        expect(off.frames[0]).toMatchObject({ code: "UNAUTHORIZED", message: expect.stringContaining("GH_SERVICE_SECRET") })
        // The secret on the upgrade, or in the auth frame; then a job with no page here is named.
        const byHeader = yield* Ws.connect(`${withSecret}/live/${jobId}`, { secret: "live-s3cret" })
        expect((yield* byHeader.closed()).code).toBe(4404)
        expect(byHeader.frames).toEqual([
          {
            v: 1,
            type: "error",
            code: "NOT_FOUND",
            message: `job ${jobId} has no open page on this worker: it is not running here, or it has no browser session`
          }
        ])
        const byFrame = yield* Ws.connect(`${withSecret}/live/${jobId}`)
        byFrame.send({ v: 1, type: "auth", token: "live-s3cret" })
        expect((yield* byFrame.closed()).code).toBe(4404)
        // Other paths are not upgraded.
        const elsewhere = yield* Ws.connect(`${withSecret}/worker/status`).pipe(Effect.flip)
        expect(elsewhere.message).toBe("upgrade refused: HTTP 404")
      })
    )

    it.scoped("the server stops when its scope closes", () =>
      Effect.gen(function* () {
        const w = yield* startWorker("c1")
        const scope = yield* Scope.make()
        const base = yield* serve(w).pipe(Scope.extend(scope))
        expect((yield* call(`${base}/worker/health`)).status).toBe(200)
        yield* Scope.close(scope, Exit.void)
        const after = yield* Effect.tryPromise(() => fetch(`${base}/worker/health`)).pipe(Effect.exit)
        expect(Exit.isFailure(after)).toBe(true)
      })
    )
  })

  it.effect("OptionsConfig: defaults, and the environment's values", () =>
    Effect.gen(function* () {
      const defaults = yield* WorkerHttp.OptionsConfig.pipe(
        Effect.withConfigProvider(ConfigProvider.fromMap(new Map()))
      )
      expect(defaults).toEqual({
        port: 3101,
        host: "0.0.0.0",
        deploySecret: undefined,
        serviceSecret: undefined,
        dataDir: ".troupe",
        environment: "development",
        commitSha: "unknown"
      })
      const set = yield* WorkerHttp.OptionsConfig.pipe(
        Effect.withConfigProvider(
          ConfigProvider.fromMap(
            new Map([
              ["GH_WORKER_PORT", "4101"],
              ["TROUPE_HTTP_HOST", "127.0.0.1"],
              ["GH_DEPLOY_SECRET", secret],
              ["GH_SERVICE_SECRET", "service-s3cret"],
              ["NODE_ENV", "production"],
              ["COMMIT_SHA", "deadbeef"]
            ])
          )
        )
      )
      expect(set.port).toBe(4101)
      expect(set.host).toBe("127.0.0.1")
      expect(Option.map(Option.fromNullable(set.deploySecret), Redacted.value)).toEqual(Option.some(secret))
      expect(Option.map(Option.fromNullable(set.serviceSecret), Redacted.value)).toEqual(
        Option.some("service-s3cret")
      )
      expect(set.environment).toBe("production")
      expect(set.commitSha).toBe("deadbeef")
      const bad = yield* WorkerHttp.OptionsConfig.pipe(
        Effect.withConfigProvider(ConfigProvider.fromMap(new Map([["GH_WORKER_PORT", "70000"]]))),
        Effect.exit
      )
      expect(Exit.isFailure(bad)).toBe(true)
    })
  )
})
