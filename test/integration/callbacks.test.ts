import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import {
  ConfigProvider,
  Deferred,
  Duration,
  Effect,
  ExecutionStrategy,
  Exit,
  Logger,
  LogLevel,
  Schedule,
  Scope
} from "effect"
import * as Http from "node:http"
import * as Net from "node:net"
import type { AddressInfo } from "node:net"
import * as CallbackDispatcher from "../../src/runtime/jobs/CallbackDispatcher.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Db from "../fixtures/Db.ts"

// --- A real HTTP server that records what it receives ---

interface Received {
  readonly key: string
  readonly attempt: string | undefined
  readonly authorization: string | undefined
  readonly contentType: string | undefined
  readonly path: string
  readonly body: { readonly job_id?: string; readonly valet_task_id?: string; readonly status?: string }
  /** The status the server answered (set once answered). */
  status: number | undefined
}

/** How the server answers a request: a status (and headers), after an optional delay in ms or once `hold` resolves. */
type Responder = (
  request: Received,
  previousForKey: number
) => { status: number; headers?: Record<string, string>; delayMs?: number; hold?: Promise<void> }

const startServer = (respond: Responder) =>
  Effect.acquireRelease(
    Effect.async<{ server: Http.Server; received: Array<Received> }>((resume) => {
      const received: Array<Received> = []
      const server = Http.createServer((req, res) => {
        const chunks: Array<Buffer> = []
        req.on("data", (c: Buffer) => chunks.push(c))
        req.on("end", () => {
          const header = (name: string) => {
            const v = req.headers[name]
            return Array.isArray(v) ? v.join(",") : v
          }
          const r: Received = {
            key: header("idempotency-key") ?? "",
            attempt: header("x-troupe-attempt"),
            authorization: header("authorization"),
            contentType: header("content-type"),
            path: new URL(req.url ?? "/", "http://x").pathname,
            body: JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}"),
            status: undefined
          }
          const previous = received.filter((x) => x.key === r.key).length
          received.push(r)
          const { status, headers, delayMs, hold } = respond(r, previous)
          const answer = () => {
            r.status = status
            res
              .writeHead(status, { "Content-Type": "text/plain", ...headers })
              .end(status < 300 ? "ok" : "try later")
          }
          if (hold) void hold.then(answer)
          else if (delayMs) setTimeout(answer, delayMs)
          else answer()
        })
      })
      server.listen(0, "127.0.0.1", () => resume(Effect.succeed({ server, received })))
    }),
    ({ server }) =>
      Effect.async<void>((resume) => {
        server.closeAllConnections()
        server.close(() => resume(Effect.void))
      })
  ).pipe(
    Effect.map(({ server, received }) => ({
      url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
      received,
      /** Requests answered with a 2xx, per idempotency key. */
      okCount: (key: string) =>
        received.filter((r) => r.key === key && r.status !== undefined && r.status < 300).length
    }))
  )

// --- Jobs and outbox rows ---

interface OutboxState {
  readonly id: string
  readonly job_id: string
  readonly status: string
  readonly idempotency_key: string
  readonly attempts: number
  readonly delivered: boolean
  readonly failed: boolean
  readonly last_error: string | null
  readonly locked_by: string | null
}

const insertJob = (callbackUrl: string, valetTaskId: string) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const [job] = yield* sql<{ id: string }>`
      INSERT INTO gh_automation_jobs (job_type, callback_url, valet_task_id, status)
      VALUES ('apply', ${callbackUrl}, ${valetTaskId}, 'queued') RETURNING *`
    return job!.id
  })

/** Set a job's status and write its event with a callback (what the job actor does). */
const report = (jobId: string, status: string) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    yield* sql.withTransaction(
      Effect.zipRight(
        sql`UPDATE gh_automation_jobs SET status = ${status} WHERE id = ${jobId}::uuid`,
        sql`SELECT troupe_job_event(j, 'job_started', 'msg', 'w1', '{}'::jsonb, true)
            FROM gh_automation_jobs j WHERE id = ${jobId}::uuid`
      )
    )
  })

const outboxOf = (jobIds: ReadonlyArray<string>) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) => sql<OutboxState>`
      SELECT id::text AS id, job_id::text AS job_id, status, idempotency_key, attempts,
             delivered_at IS NOT NULL AS delivered, failed_at IS NOT NULL AS failed, last_error, locked_by
      FROM callback_outbox WHERE job_id = ANY(${jobIds}::uuid[]) ORDER BY id`
  )

/** Poll the outbox of these jobs until `done` holds (bounded; fails with what it saw). */
const awaitOutbox = (
  jobIds: ReadonlyArray<string>,
  done: (rows: ReadonlyArray<OutboxState>) => boolean,
  within: Duration.DurationInput = "30 seconds"
) => {
  let last: ReadonlyArray<OutboxState> = []
  return outboxOf(jobIds).pipe(
    Effect.tap((rows) => Effect.sync(() => (last = rows))),
    Effect.repeat({ schedule: Schedule.spaced("25 millis"), until: done }),
    Effect.map(() => last),
    Effect.timeoutFail({
      duration: within,
      onTimeout: () => new Error(`the outbox did not reach the expected state: ${JSON.stringify(last)}`)
    })
  )
}

const allDelivered = (n: number) => (rows: ReadonlyArray<OutboxState>) =>
  rows.length === n && rows.every((r) => r.delivered)

/** A node and a dispatcher on it. Test timings: short retries, and a poll slow enough that only NOTIFY and retry timers can explain a prompt delivery. */
const startDispatcher = (nodeId: string, options?: Partial<CallbackDispatcher.Options>) =>
  Effect.gen(function* () {
    const node = yield* Node.make({ nodeId })
    return yield* CallbackDispatcher.make({
      node,
      nodeId: node.id,
      retryDelays: ["100 millis", "150 millis", "200 millis"],
      pollInterval: "1 minute",
      requestTimeout: "2 seconds",
      ...options
    })
  })

/** A loopback port nothing listens on (bound once, then closed). */
const closedPort = Effect.async<number>((resume) => {
  const probe = Net.createServer()
  probe.listen(0, "127.0.0.1", () => {
    const { port } = probe.address() as AddressInfo
    probe.close(() => resume(Effect.succeed(port)))
  })
})

/** Fail the first `n` requests of each key with a 500. */
const failFirst =
  (n: number): Responder =>
  (_, previous) => ({ status: previous < n ? 500 : 200 })

describe("callback dispatcher", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a server that fails twice then succeeds gets each status exactly once, with the right headers",
      () =>
        Effect.gen(function* () {
          const server = yield* startServer(failFirst(2))
          const dispatcher = yield* startDispatcher("cb-1")
          const jobId = yield* insertJob(`${server.url}/hooks/job?token=s3cret`, "valet-1")
          yield* report(jobId, "running")
          yield* report(jobId, "completed")
          const rows = yield* awaitOutbox([jobId], allDelivered(2))

          expect(rows.map((r) => r.status)).toEqual(["running", "completed"])
          for (const row of rows) {
            expect(row.idempotency_key).toMatch(new RegExp(`^${jobId}:\\d+$`))
            expect(server.okCount(row.idempotency_key)).toBe(1)
            expect(row.attempts).toBe(3)
            expect(row.locked_by).toBeNull()
            const requests = server.received.filter((r) => r.key === row.idempotency_key)
            expect(requests.map((r) => [r.attempt, r.status])).toEqual([
              ["1", 500],
              ["2", 500],
              ["3", 200]
            ])
            for (const r of requests) {
              expect(r.contentType).toBe("application/json")
              expect(r.path).toBe("/hooks/job")
              expect(r.body).toMatchObject({ job_id: jobId, valet_task_id: "valet-1", status: row.status })
            }
          }
          expect(server.received.filter((r) => r.status === 200).map((r) => r.body.status)).toEqual([
            "running",
            "completed"
          ])
          expect(dispatcher.stats()).toEqual({ delivered: 2, failedAttempts: 4, gaveUp: 0 })
        })
    )

    it.scoped(
      "a dispatcher stopped after a failed attempt: a new one on another node delivers everything once",
      () =>
        Effect.gen(function* () {
          // Phase 1 answers 500 to everything; phase 2 fails once more per key, then succeeds.
          let phase2 = false
          const server = yield* startServer((_, previous) => ({
            status: phase2 && previous >= 2 ? 200 : 500
          }))
          const first = yield* Scope.fork(yield* Effect.scope, ExecutionStrategy.sequential)
          const d1 = yield* startDispatcher("cb-2a", {
            retryDelays: ["300 millis", "100 millis", "100 millis"]
          }).pipe(Scope.extend(first))
          const jobId = yield* insertJob(`${server.url}/hook`, "valet-2")
          yield* report(jobId, "running")
          yield* report(jobId, "completed")
          yield* awaitOutbox([jobId], (rows) => rows[0]?.attempts === 1)
          yield* Scope.close(first, Exit.void)
          expect(d1.stats().delivered).toBe(0)
          // A graceful stop leaves no row locked by the stopped node.
          const afterStop = yield* outboxOf([jobId])
          expect(afterStop.filter((r) => r.locked_by !== null)).toEqual([])
          expect(afterStop.every((r) => !r.delivered && !r.failed)).toBe(true)

          phase2 = true
          const d2 = yield* startDispatcher("cb-2b")
          const rows = yield* awaitOutbox([jobId], allDelivered(2))
          for (const row of rows) expect(server.okCount(row.idempotency_key)).toBe(1)
          expect(rows.map((r) => r.attempts)).toEqual([3, 3])
          expect(d2.stats().delivered).toBe(2)
          expect(server.received.filter((r) => r.status === 200).map((r) => r.body.status)).toEqual([
            "running",
            "completed"
          ])
        })
    )

    it.scoped("a row locked by a dispatcher that died is taken over once its lock expires", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const server = yield* startServer(() => ({ status: 204 }))
        const jobId = yield* insertJob(`${server.url}/hook`, "valet-crash")
        // The row as a crashed dispatcher leaves it: claimed, lock still running.
        const [lock] = yield* sql.withTransaction(
          Effect.zipRight(
            report(jobId, "running"),
            sql<{ until_ms: number }>`
              UPDATE callback_outbox SET locked_by = 'ghost', locked_until = now() + interval '600 milliseconds'
              WHERE job_id = ${jobId}::uuid
              RETURNING (EXTRACT(EPOCH FROM locked_until) * 1000)::float8 AS until_ms`
          )
        )
        yield* startDispatcher("cb-crash")
        const [row] = yield* awaitOutbox([jobId], allDelivered(1))
        expect(server.okCount(row!.idempotency_key)).toBe(1)
        const [at] = yield* sql<{ delivered_ms: number }>`
          SELECT (EXTRACT(EPOCH FROM delivered_at) * 1000)::float8 AS delivered_ms
          FROM callback_outbox WHERE id = ${row!.id}::bigint`
        expect(at!.delivered_ms).toBeGreaterThanOrEqual(lock!.until_ms)
      })
    )

    it.scoped("two dispatchers at once never deliver the same key twice (50 rows)", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const server = yield* startServer(() => ({ status: 200, delayMs: Math.floor(Math.random() * 10) }))
        const a = yield* startDispatcher("cb-3a", { concurrency: 4 })
        const b = yield* startDispatcher("cb-3b", { concurrency: 4 })
        const jobIds = yield* Effect.forEach(
          Array.from({ length: 50 }, (_, i) => i),
          (i) => insertJob(`${server.url}/hook`, `valet-3-${i}`)
        )
        // All 50 rows in one transaction: both dispatchers are woken at once.
        yield* sql`UPDATE gh_automation_jobs SET status = 'running' WHERE id = ANY(${jobIds}::uuid[])`
        yield* sql`SELECT troupe_job_event(j, 'job_started', 'msg', 'w1', '{}'::jsonb, true)
                   FROM gh_automation_jobs j WHERE id = ANY(${jobIds}::uuid[])`
        const rows = yield* awaitOutbox(jobIds, allDelivered(50))
        for (const row of rows) expect(server.okCount(row.idempotency_key)).toBe(1)
        expect(server.received.length).toBe(50)
        expect(new Set(server.received.map((r) => r.key)).size).toBe(50)
        expect(rows.every((r) => r.attempts === 1)).toBe(true)
        expect(a.stats().delivered + b.stats().delivered).toBe(50)
      })
    )

    it.scoped(
      "statuses of a job arrive in the order they were written, across retries and two dispatchers",
      () =>
        Effect.gen(function* () {
          const statuses = ["running", "needs_human", "running", "completed"]
          // The first attempt of every other status fails: a later status would overtake it if order were not kept.
          const server = yield* startServer((r, previous) => ({
            status:
              previous === 0 && (r.body.status === "needs_human" || r.body.status === "completed")
                ? 503
                : 200,
            delayMs: Math.floor(Math.random() * 15)
          }))
          yield* startDispatcher("cb-4a", { retryDelays: ["50 millis", "50 millis", "50 millis"] })
          yield* startDispatcher("cb-4b", { retryDelays: ["50 millis", "50 millis", "50 millis"] })
          const jobIds = yield* Effect.forEach([0, 1, 2], (i) =>
            insertJob(`${server.url}/hook`, `valet-4-${i}`)
          )
          for (const status of statuses) for (const jobId of jobIds) yield* report(jobId, status)
          const rows = yield* awaitOutbox(jobIds, allDelivered(12))

          for (const jobId of jobIds) {
            const written = rows.filter((r) => r.job_id === jobId).map((r) => r.idempotency_key)
            const requests = server.received.filter((r) => r.body.job_id === jobId)
            // Every request of a job's row comes after the last request of its earlier rows.
            const order = requests.map((r) => written.indexOf(r.key))
            expect(order).toEqual([...order].sort((x, y) => x - y))
            expect(requests.filter((r) => r.status === 200).map((r) => r.body.status)).toEqual(statuses)
            for (const key of written) expect(server.okCount(key)).toBe(1)
          }
        })
    )

    it.scoped(
      "gives up after the configured delays, logs it without secrets, and keeps delivering other rows",
      () =>
        Effect.gen(function* () {
          const logs: Array<string> = []
          const capture = Logger.make(({ message }) => {
            logs.push(Array.isArray(message) ? message.map(String).join(" ") : String(message))
          })
          const server = yield* startServer((r) => ({ status: r.path === "/dead" ? 500 : 200 }))
          const dispatcher = yield* startDispatcher("cb-5", { retryDelays: ["50 millis", "80 millis"] }).pipe(
            Effect.provide(Logger.replace(Logger.defaultLogger, capture)),
            Logger.withMinimumLogLevel(LogLevel.All)
          )
          const dead = yield* insertJob(`${server.url}/dead?token=s3cret`, "valet-5-dead")
          const alive = yield* insertJob(`${server.url}/ok`, "valet-5-ok")
          yield* report(dead, "running")
          yield* report(alive, "running")

          const [failed] = yield* awaitOutbox([dead], (rows) => rows[0]?.failed === true)
          expect(failed!.delivered).toBe(false)
          expect(failed!.attempts).toBe(3)
          expect(failed!.last_error).toContain("HTTP 500")
          expect(failed!.locked_by).toBeNull()
          expect(server.received.filter((r) => r.path === "/dead").map((r) => r.attempt)).toEqual([
            "1",
            "2",
            "3"
          ])
          yield* awaitOutbox([alive], allDelivered(1))

          // The given-up row blocks nothing: a later status of that job and another job's status still go out.
          yield* report(dead, "completed")
          const later = yield* insertJob(`${server.url}/ok`, "valet-5-later")
          yield* report(later, "running")
          yield* awaitOutbox([later], allDelivered(1))
          const deadRows = yield* awaitOutbox([dead], (rows) => rows.length === 2 && rows[1]!.failed)
          expect(deadRows[1]!.attempts).toBe(3)

          expect(dispatcher.stats()).toEqual({ delivered: 2, failedAttempts: 6, gaveUp: 2 })
          const warning = logs.find((l) => l.includes("given up"))
          expect(warning).toContain(`127.0.0.1`)
          expect(warning).toContain("/dead")
          expect(logs.join("\n")).not.toContain("s3cret")
          expect(logs.join("\n")).not.toContain("token")
        })
    )

    it.scoped("the stats count a row before the outbox shows it delivered or given up", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const locker = yield* Db.rawClient
        // Each request is answered only once the test opens its gate.
        let gate: { readonly arrived: Deferred.Deferred<void>; readonly hold: Promise<void> } | undefined
        const server = yield* startServer((r) => {
          Deferred.unsafeDone(gate!.arrived, Exit.void)
          return { status: r.path === "/dead" ? 500 : 200, hold: gate!.hold }
        })
        // No retries: the first attempt's failure gives the row up.
        const dispatcher = yield* startDispatcher("cb-6", { retryDelays: [] })

        /** Hold the row's lock while its result is written: the dispatcher's UPDATE waits on it. */
        const heldWhileRecorded = (path: string) =>
          Effect.gen(function* () {
            let open!: () => void
            const arrived = yield* Deferred.make<void>()
            gate = { arrived, hold: new Promise<void>((resolve) => (open = resolve)) }
            const jobId = yield* insertJob(`${server.url}${path}`, `valet-6${path}`)
            yield* report(jobId, "running")
            yield* Deferred.await(arrived)
            yield* Effect.promise(async () => {
              await locker.query("BEGIN")
              await locker.query("SELECT 1 FROM callback_outbox WHERE job_id = $1::uuid FOR UPDATE", [jobId])
            })
            open()
            yield* sql<{ n: number }>`
              SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'`.pipe(
              Effect.repeat({ schedule: Schedule.spaced("10 millis"), until: ([row]) => row!.n > 0 }),
              Effect.timeoutFail({
                duration: "10 seconds",
                onTimeout: () => new Error("the dispatcher never waited on the row lock")
              })
            )
            const during = { stats: dispatcher.stats(), rows: yield* outboxOf([jobId]) }
            yield* Effect.promise(() => locker.query("COMMIT"))
            return { jobId, during }
          })

        const ok = yield* heldWhileRecorded("/ok")
        expect(ok.during.rows.map((r) => r.delivered)).toEqual([false])
        expect(ok.during.stats).toEqual({ delivered: 1, failedAttempts: 0, gaveUp: 0 })
        yield* awaitOutbox([ok.jobId], allDelivered(1))
        expect(dispatcher.stats()).toEqual({ delivered: 1, failedAttempts: 0, gaveUp: 0 })

        const dead = yield* heldWhileRecorded("/dead")
        expect(dead.during.rows.map((r) => r.failed)).toEqual([false])
        expect(dead.during.stats).toEqual({ delivered: 1, failedAttempts: 1, gaveUp: 1 })
        const [failed] = yield* awaitOutbox([dead.jobId], (rows) => rows[0]?.failed === true)
        expect(failed!.last_error).toContain("HTTP 500")
        expect(dispatcher.stats()).toEqual({ delivered: 1, failedAttempts: 1, gaveUp: 1 })
      })
    )

    it.scoped(
      "a redirect is not followed, a silent server times out, a refused connection fails, url credentials go as Basic auth",
      () =>
        Effect.gen(function* () {
          const server = yield* startServer((r) => {
            switch (r.path) {
              case "/moved":
                return { status: 302, headers: { Location: "/ok" } }
              case "/silent":
                return { status: 200, hold: new Promise<void>(() => {}) }
              case "/auth":
                return {
                  status:
                    r.authorization === `Basic ${Buffer.from("bob:p@ss").toString("base64")}` ? 200 : 401
                }
              default:
                return { status: 200 }
            }
          })
          // No retries: each row's first failure is its last.
          const dispatcher = yield* startDispatcher("cb-7", { retryDelays: [], requestTimeout: "300 millis" })
          const target = new URL(server.url)
          const moved = yield* insertJob(`${server.url}/moved`, "valet-7-moved")
          const silent = yield* insertJob(`${server.url}/silent`, "valet-7-silent")
          const refused = yield* insertJob(`http://127.0.0.1:${yield* closedPort}/hook`, "valet-7-refused")
          const auth = yield* insertJob(`http://bob:p%40ss@${target.host}/auth?token=s3cret`, "valet-7-auth")
          for (const jobId of [moved, silent, refused, auth]) yield* report(jobId, "running")
          const rows = yield* awaitOutbox(
            [moved, silent, refused, auth],
            (rows) => rows.length === 4 && rows.every((r) => r.delivered || r.failed)
          )
          const of = (jobId: string) => rows.find((r) => r.job_id === jobId)!

          expect(of(moved).failed).toBe(true)
          expect(of(moved).last_error).toContain("HTTP 302 Found")
          expect(server.received.filter((r) => r.path === "/ok")).toEqual([])
          expect(of(silent).failed).toBe(true)
          expect(of(silent).last_error).toBe("no response within 300 ms")
          expect(of(refused).failed).toBe(true)
          expect(of(refused).last_error).toContain("request failed")
          expect(of(refused).last_error).toContain("ECONNREFUSED")
          expect(of(auth).delivered).toBe(true)
          expect(server.received.find((r) => r.path === "/auth")!.authorization).toMatch(/^Basic /)
          expect(dispatcher.stats()).toEqual({ delivered: 1, failedAttempts: 3, gaveUp: 3 })
        })
    )

    it.effect(
      "TROUPE_CALLBACK_RETRY_DELAYS_MS sets the retry delays; a malformed value is refused with its name",
      () =>
        Effect.gen(function* () {
          const read = (env: Record<string, string>) =>
            CallbackDispatcher.DispatcherConfig.pipe(
              Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env))))
            )
          const set = yield* read({
            TROUPE_CALLBACK_RETRY_DELAYS_MS: "100,2000,30000",
            TROUPE_CALLBACK_TIMEOUT_MS: "2500"
          })
          expect(set.retryDelays.map(Duration.toMillis)).toEqual([100, 2000, 30000])
          expect(Duration.toMillis(set.requestTimeout)).toBe(2500)
          const unset = yield* read({})
          expect(unset.retryDelays.map(Duration.toMillis)).toEqual([10_000, 20_000, 30_000])
          expect(Duration.toMillis(unset.requestTimeout)).toBe(10_000)
          const bad = yield* Effect.flip(read({ TROUPE_CALLBACK_RETRY_DELAYS_MS: "10s,20s" }))
          expect(String(bad)).toContain("TROUPE_CALLBACK_RETRY_DELAYS_MS")
        })
    )
  })
})
