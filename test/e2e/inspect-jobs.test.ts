/**
 * `troupe inspect jobs | job <id> | workers` as a separate process against this file's
 * database: jobs, events, workers and callbacks written with SQL, node "live" running in the
 * test process (it holds its lock) and node "gone" a row whose lock nobody holds.
 */

import * as Crypto from "node:crypto"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { describe, expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Redacted } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"

/** The ids of the seeded jobs, by status. */
interface Jobs {
  readonly queued: string
  readonly running: string
  readonly needsHuman: string
  readonly completed: string
  readonly failed: string
  readonly cancelled: string
}

class Seeded extends Context.Tag("test/e2e/inspect-jobs/Seeded")<Seeded, Jobs>() {}

/** Node "live", for the whole file. */
const LiveNode = Layer.scopedDiscard(Node.make({ nodeId: "live" }))

const SeededLive = Layer.effect(
  Seeded,
  Effect.gen(function* () {
    const sql = yield* PgClient.PgClient
    // A node that died: its row is there, nobody holds its lock.
    yield* sql`INSERT INTO nodes (id, role, lock_key, status, last_heartbeat) VALUES ('gone', 'worker', 42, 'running', now() - interval '10 minutes')`
    const job = (columns: Record<string, unknown>) =>
      Effect.map(
        sql<{ id: string }>`INSERT INTO gh_automation_jobs ${sql.insert(columns)} RETURNING id`,
        (rows) => rows[0]!.id
      )
    const minutesAgo = (m: number) => new Date(Date.now() - m * 60_000)
    const jobs: Jobs = {
      queued: yield* job({ job_type: "apply", created_at: minutesAgo(50), payload: sql.json({ n: 1 }) }),
      running: yield* job({
        job_type: "apply",
        valet_task_id: "task-7",
        status: "running",
        worker_affinity: "strict",
        target_worker_id: "t-busy",
        worker_id: "w-busy",
        node_id: "live",
        attempts: 1,
        priority: 5,
        callback_url: "https://client.example/cb",
        payload: sql.json({ url: "https://example.com/apply" }),
        created_at: minutesAgo(40),
        started_at: minutesAgo(5)
      }),
      needsHuman: yield* job({
        job_type: "login",
        status: "needs_human",
        worker_affinity: "preferred",
        target_worker_id: "t-other",
        worker_id: "w-lost",
        node_id: "gone",
        attempts: 1,
        interaction: sql.json({ type: "captcha", message: "solve it", timeout_seconds: 300 }),
        created_at: minutesAgo(30),
        started_at: minutesAgo(29)
      }),
      completed: yield* job({
        job_type: "apply",
        status: "completed",
        worker_id: "w-idle",
        node_id: "live",
        attempts: 1,
        result: sql.json({ ok: true }),
        cost: sql.json({ total_cost_usd: 0.25, action_count: 4, total_tokens: 900, breakdown: [] }),
        created_at: minutesAgo(20),
        started_at: minutesAgo(19),
        finished_at: minutesAgo(18)
      }),
      failed: yield* job({
        job_type: "scrape",
        status: "failed",
        worker_affinity: "preferred",
        worker_id: "w-lost",
        node_id: "gone",
        attempts: 3,
        max_attempts: 3,
        error_code: "MAX_ATTEMPTS",
        error_message: "gave up after 3 attempts",
        created_at: minutesAgo(10),
        started_at: minutesAgo(9),
        finished_at: minutesAgo(8)
      }),
      cancelled: yield* job({
        job_type: "scrape",
        status: "cancelled",
        error_code: "CANCELLED",
        created_at: minutesAgo(5),
        finished_at: minutesAgo(4)
      })
    }
    // Events, one statement each so their ids follow this order; one of another job.
    for (const [type, message, actor, metadata] of [
      ["created", "submitted", "api", { by: "valet" }],
      ["started", "claimed by w-busy", "w-busy", { attempt: 1 }],
      ["progress", "filled 3 fields", null, {}]
    ] as const) {
      yield* sql`INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
        VALUES (${jobs.running}::uuid, ${type}, ${message}, ${actor}, ${sql.json(metadata)})`
    }
    yield* sql`INSERT INTO gh_job_events (job_id, event_type, message) VALUES (${jobs.completed}::uuid, 'created', 'other job')`
    // Callbacks of the running job: one delivered, one given up on.
    yield* sql`INSERT INTO callback_outbox (job_id, url, status, payload, idempotency_key, attempts, delivered_at)
      VALUES (${jobs.running}::uuid, 'https://client.example/cb', 'queued', '{"status":"queued"}', ${`${jobs.running}:1`}, 1, now())`
    yield* sql`INSERT INTO callback_outbox (job_id, url, status, payload, idempotency_key, attempts, failed_at, last_error)
      VALUES (${jobs.running}::uuid, 'https://client.example/cb', 'running', '{"status":"running"}', ${`${jobs.running}:2`}, 5, now(),
              'HTTP 500 from client.example')`
    // The actor that owns the running job.
    yield* sql`INSERT INTO actor_registry (actor_id, kind, node_id, epoch) VALUES (${`job:${jobs.running}`}, 'job', 'live', 2)`
    // Workers: busy, idle and draining on the live node; one whose node died (with a job it
    // still holds); one deregistered.
    yield* sql`INSERT INTO gh_worker_registry ${sql.insert([
      {
        worker_id: "w-busy",
        node_id: "live",
        target_worker_id: "t-busy",
        ec2_instance_id: "i-0abc",
        ec2_ip: "10.0.0.5",
        current_job_id: jobs.running,
        jobs_completed: 7,
        jobs_failed: 1,
        registered_at: minutesAgo(120)
      },
      {
        worker_id: "w-idle",
        node_id: "live",
        target_worker_id: null,
        ec2_instance_id: null,
        ec2_ip: null,
        current_job_id: null,
        jobs_completed: 1,
        jobs_failed: 0,
        registered_at: minutesAgo(60)
      }
    ])}`
    yield* sql`INSERT INTO gh_worker_registry (worker_id, node_id, status) VALUES ('w-drain', 'live', 'draining')`
    yield* sql`INSERT INTO gh_worker_registry (worker_id, node_id, status, last_heartbeat) VALUES ('w-lost', 'gone', 'active', now() - interval '10 minutes')`
    yield* sql`INSERT INTO gh_worker_registry (worker_id, node_id, status, registered_at, deregistered_at, deregister_reason)
      VALUES ('w-off', 'live', 'offline', now() - interval '3 hours', now() - interval '10 minutes', 'scaled in')`
    return jobs
  })
)

/** The environment of a CLI run on this file's database. */
const cliEnv = Effect.map(Database.DatabaseUrls, (urls) =>
  Processes.cleanEnv({ DATABASE_URL: Redacted.value(urls.url) })
)

/** A timestamp as `--json` prints it. */
const iso = (d: Date | string | null) => (d === null ? null : new Date(d).toISOString())

/** The row of a table whose first column is `first`. */
const rowOf = (stdout: string, first: string) =>
  stdout.split("\n").find((line) => line.startsWith(`${first} `))

describe("troupe inspect jobs, job, workers", () => {
  layer(SeededLive.pipe(Layer.provideMerge(LiveNode), Layer.provideMerge(Db.layer)), {
    excludeTestServices: true
  })((it) => {
    it.effect("jobs lists every job newest first, with status, affinity, worker, node and attempts", () =>
      Effect.gen(function* () {
        const jobs = yield* Seeded
        const env = yield* cliEnv
        const list = yield* Processes.troupeJson<Array<Record<string, unknown>>>(
          ["inspect", "jobs", "--json"],
          env
        )
        expect(
          list.map((j) => [
            j.id,
            j.status,
            j.job_type,
            j.worker_affinity,
            j.target_worker_id,
            j.worker_id,
            j.node_id,
            j.attempts,
            j.max_attempts
          ])
        ).toEqual([
          [jobs.cancelled, "cancelled", "scrape", "any", null, null, null, 0, 3],
          [jobs.failed, "failed", "scrape", "preferred", null, "w-lost", "gone", 3, 3],
          [jobs.completed, "completed", "apply", "any", null, "w-idle", "live", 1, 3],
          [jobs.needsHuman, "needs_human", "login", "preferred", "t-other", "w-lost", "gone", 1, 3],
          [jobs.running, "running", "apply", "strict", "t-busy", "w-busy", "live", 1, 3],
          [jobs.queued, "queued", "apply", "any", null, null, null, 0, 3]
        ])
        const sql = yield* SqlClient.SqlClient
        const stored = yield* sql<{
          id: string
          created_at: Date
          started_at: Date | null
          finished_at: Date | null
        }>`
          SELECT id, created_at, started_at, finished_at FROM gh_automation_jobs ORDER BY created_at DESC`
        expect(list.map((j) => [j.created_at, j.started_at, j.finished_at])).toEqual(
          stored.map((r) => [iso(r.created_at), iso(r.started_at), iso(r.finished_at)])
        )
        expect(list.find((j) => j.id === jobs.running)).toMatchObject({
          valet_task_id: "task-7",
          priority: 5
        })

        // The readable table says the same.
        const text = yield* Processes.troupe(["inspect", "jobs"], env)
        expect(text.code).toBe(0)
        const lines = text.stdout.trim().split("\n")
        expect(lines[0]).toMatch(
          /^ID\s+STATUS\s+JOB_TYPE\s+AFFINITY\s+TARGET\s+WORKER\s+NODE\s+ATTEMPTS\s+CREATED\s+STARTED\s+FINISHED$/
        )
        expect(lines.slice(1).map((l) => l.split(/\s+/)[0])).toEqual([
          jobs.cancelled,
          jobs.failed,
          jobs.completed,
          jobs.needsHuman,
          jobs.running,
          jobs.queued
        ])
        expect(rowOf(text.stdout, jobs.running)).toMatch(
          /\s+running\s+apply\s+strict\s+t-busy\s+w-busy\s+live\s+1\/3\s+\d+m ago\s+\d+m ago\s+—$/
        )
        expect(rowOf(text.stdout, jobs.failed)).toMatch(
          /\s+failed\s+scrape\s+preferred\s+—\s+w-lost\s+gone\s+3\/3\s+\d+m ago\s+\d+m ago\s+\d+m ago$/
        )
      })
    )

    it.effect("jobs filters by --status and --worker, and stops at --limit", () =>
      Effect.gen(function* () {
        const jobs = yield* Seeded
        const env = yield* cliEnv
        const ids = (args: ReadonlyArray<string>) =>
          Effect.map(
            Processes.troupeJson<Array<{ id: string }>>(["inspect", "jobs", ...args, "--json"], env),
            (rows) => rows.map((r) => r.id)
          )
        expect(yield* ids(["--status", "running"])).toEqual([jobs.running])
        expect(yield* ids(["--status", "needs_human"])).toEqual([jobs.needsHuman])
        expect(yield* ids(["--worker", "w-lost"])).toEqual([jobs.failed, jobs.needsHuman])
        expect(yield* ids(["--worker", "w-lost", "--status", "failed"])).toEqual([jobs.failed])
        expect(yield* ids(["--worker", "t-busy"])).toEqual([])
        expect(yield* ids(["--limit", "2"])).toEqual([jobs.cancelled, jobs.failed])

        const none = yield* Processes.troupe(
          ["inspect", "jobs", "--status", "queued", "--worker", "w-busy"],
          env
        )
        expect(none.code).toBe(0)
        expect(none.stdout.trim()).toBe("(none)")
      })
    )

    it.effect(
      "job <id> shows the job, its live owner node, its actor, events oldest first and callbacks",
      () =>
        Effect.gen(function* () {
          const jobs = yield* Seeded
          const env = yield* cliEnv
          const sql = yield* SqlClient.SqlClient
          const job = yield* Processes.troupeJson(["inspect", "job", jobs.running, "--json"], env)
          const [stored] = yield* sql<{ created_at: Date; started_at: Date; updated_at: Date; run_at: Date }>`
          SELECT created_at, started_at, updated_at, run_at FROM gh_automation_jobs WHERE id = ${jobs.running}::uuid`
          expect(job).toEqual({
            id: jobs.running,
            valet_task_id: "task-7",
            job_type: "apply",
            payload: { url: "https://example.com/apply" },
            status: "running",
            target_worker_id: "t-busy",
            worker_affinity: "strict",
            worker_id: "w-busy",
            node_id: "live",
            node_alive: true,
            node_state: "up",
            priority: 5,
            attempts: 1,
            max_attempts: 3,
            timeout_seconds: null,
            callback_url: "https://client.example/cb",
            interaction: null,
            result: null,
            error_code: null,
            error_message: null,
            cost: { total_cost_usd: 0, action_count: 0, total_tokens: 0, breakdown: [] },
            run_at: iso(stored!.run_at),
            open_at: null,
            deadline_at: null,
            created_at: iso(stored!.created_at),
            updated_at: iso(stored!.updated_at),
            started_at: iso(stored!.started_at),
            finished_at: null,
            actor: { actor_id: `job:${jobs.running}`, node_id: "live", epoch: 2, status: "active" },
            events: [
              expect.objectContaining({
                event_type: "created",
                message: "submitted",
                actor: "api",
                metadata: { by: "valet" }
              }),
              expect.objectContaining({
                event_type: "started",
                message: "claimed by w-busy",
                actor: "w-busy",
                metadata: { attempt: 1 }
              }),
              expect.objectContaining({
                event_type: "progress",
                message: "filled 3 fields",
                actor: null,
                metadata: {}
              })
            ],
            callbacks: [
              expect.objectContaining({
                url: "https://client.example/cb",
                status: "queued",
                attempts: 1,
                delivered_at: expect.any(String),
                failed_at: null,
                last_error: null
              }),
              expect.objectContaining({
                status: "running",
                attempts: 5,
                delivered_at: null,
                failed_at: expect.any(String),
                last_error: "HTTP 500 from client.example"
              })
            ]
          })
          expect(job.events.every((e: any) => typeof e.created_at === "string")).toBe(true)

          // The readable form.
          const text = yield* Processes.troupe(["inspect", "job", jobs.running], env)
          expect(text.code).toBe(0)
          expect(text.stdout).toContain(`${jobs.running}  (apply, running)`)
          expect(text.stdout).toMatch(/affinity\s+strict \(target t-busy\)/)
          expect(text.stdout).toMatch(/worker\s+w-busy/)
          expect(text.stdout).toMatch(/node\s+live \(up\)/)
          expect(text.stdout).toMatch(
            new RegExp(`actor\\s+job:${jobs.running} on live, epoch 2 \\(active\\)`)
          )
          expect(text.stdout).toMatch(/attempts\s+1\/3/)
          expect(text.stdout).toMatch(
            new RegExp(
              `started\\s+${iso(stored!.started_at)!
                .replace("T", " ")
                .replace(/\.\d+Z$/, "Z")} \\(\\d+m ago\\)`
            )
          )
          expect(text.stdout).toContain('payload      {"url":"https://example.com/apply"}')
          const events = text.stdout.slice(text.stdout.indexOf("Events (oldest first):"))
          expect(events.indexOf("submitted")).toBeLessThan(events.indexOf("claimed by w-busy"))
          expect(events.indexOf("claimed by w-busy")).toBeLessThan(events.indexOf("filled 3 fields"))
          expect(events).not.toContain("other job")
          expect(text.stdout).toMatch(/^\d+\s+running\s+5\s+—\s+\S+ \S+Z\s+HTTP 500 from client\.example/m)
        })
    )

    it.effect("job <id> of a job whose node died says so, and a job never placed has no node", () =>
      Effect.gen(function* () {
        const jobs = yield* Seeded
        const env = yield* cliEnv
        const failed = yield* Processes.troupeJson(["inspect", "job", jobs.failed, "--json"], env)
        expect(failed).toMatchObject({
          id: jobs.failed,
          status: "failed",
          node_id: "gone",
          node_alive: false,
          node_state: "dead",
          attempts: 3,
          max_attempts: 3,
          error_code: "MAX_ATTEMPTS",
          error_message: "gave up after 3 attempts",
          actor: null,
          events: [],
          callbacks: []
        })
        const text = yield* Processes.troupe(["inspect", "job", jobs.failed], env)
        expect(text.code).toBe(0)
        expect(text.stdout).toMatch(/node\s+gone \(dead\)/)
        expect(text.stdout).toMatch(/error\s+MAX_ATTEMPTS: gave up after 3 attempts/)
        expect(text.stdout).toMatch(/Events \(oldest first\):\n\(none\)/)

        const completed = yield* Processes.troupeJson(["inspect", "job", jobs.completed, "--json"], env)
        expect(completed).toMatchObject({
          result: { ok: true },
          cost: { total_cost_usd: 0.25, action_count: 4, total_tokens: 900, breakdown: [] }
        })
        const human = yield* Processes.troupeJson(["inspect", "job", jobs.needsHuman, "--json"], env)
        expect(human.interaction).toEqual({ type: "captcha", message: "solve it", timeout_seconds: 300 })

        const queued = yield* Processes.troupeJson(["inspect", "job", jobs.queued, "--json"], env)
        expect(queued).toMatchObject({
          node_id: null,
          node_alive: false,
          node_state: null,
          payload: { n: 1 }
        })
      })
    )

    it.effect(
      "workers derives idle, busy, draining and offline from the registry, the jobs and the nodes",
      () =>
        Effect.gen(function* () {
          const jobs = yield* Seeded
          const env = yield* cliEnv
          const workers = yield* Processes.troupeJson<Array<Record<string, any>>>(
            ["inspect", "workers", "--json"],
            env
          )
          expect(
            workers.map((w) => [w.worker_id, w.state, w.status, w.node_id, w.node_alive, w.active_jobs])
          ).toEqual([
            ["w-busy", "busy", "active", "live", true, 1],
            ["w-drain", "draining", "draining", "live", true, 0],
            ["w-idle", "idle", "active", "live", true, 0],
            // Its node is dead: offline, though it still holds a job.
            ["w-lost", "offline", "active", "gone", false, 1],
            ["w-off", "offline", "offline", "live", true, 0]
          ])
          const busy = workers[0]!
          expect(busy).toMatchObject({
            current_job_id: jobs.running,
            target_worker_id: "t-busy",
            ec2_instance_id: "i-0abc",
            ec2_ip: "10.0.0.5",
            jobs_completed: 7,
            jobs_failed: 1,
            last_heartbeat: expect.any(String),
            registered_at: expect.any(String)
          })
          // Up two hours (and the few seconds this test took).
          expect(busy.uptime_seconds).toBeGreaterThanOrEqual(7200)
          expect(busy.uptime_seconds).toBeLessThan(7200 + 600)
          // A deregistered worker's uptime stops at its deregistration.
          const off = workers.find((w) => w.worker_id === "w-off")!
          expect(off).toMatchObject({ uptime_seconds: 170 * 60, deregister_reason: "scaled in" })

          const text = yield* Processes.troupe(["inspect", "workers"], env)
          expect(text.code).toBe(0)
          const [header] = text.stdout.split("\n")
          expect(header).toMatch(
            /^WORKER_ID\s+STATE\s+STATUS\s+NODE_ID\s+ACTIVE\s+CURRENT_JOB_ID\s+TARGET_WORKER_ID\s+EC2_INSTANCE_ID\s+EC2_IP\s+COMPLETED\s+FAILED\s+HEARTBEAT\s+REGISTERED\s+UPTIME$/
          )
          expect(rowOf(text.stdout, "w-busy")).toMatch(
            new RegExp(
              `^w-busy\\s+busy\\s+active\\s+live\\s+1\\s+${jobs.running}\\s+t-busy\\s+i-0abc\\s+10\\.0\\.0\\.5\\s+7\\s+1\\s+\\S+( ago| now)\\s+2h ago\\s+2h`
            )
          )
          expect(rowOf(text.stdout, "w-lost")).toMatch(/^w-lost\s+offline\s+active\s+gone\s+1\s/)
          expect(rowOf(text.stdout, "w-off")).toMatch(/\s2h 50m$/)
        })
    )

    it.effect(
      "refuses a bad status, a malformed id and an unknown job with exit code 1 and a clear message",
      () =>
        Effect.gen(function* () {
          const env = yield* cliEnv
          const badStatus = yield* Processes.troupe(["inspect", "jobs", "--status", "done"], env)
          expect(badStatus.code).toBe(1)
          expect(badStatus.stderr.trim()).toBe(
            'troupe: --status "done" is not a job status: use one of queued, running, needs_human, completed, failed, cancelled'
          )
          expect(badStatus.stdout).toBe("")

          const notAnId = yield* Processes.troupe(["inspect", "job", "12345"], env)
          expect(notAnId.code).toBe(1)
          expect(notAnId.stderr).toMatch(/^troupe: "12345" is not a job id: expected a uuid/)
          expect(notAnId.stdout).toBe("")

          const unknown = Crypto.randomUUID()
          const nobody = yield* Processes.troupe(["inspect", "job", unknown, "--json"], env)
          expect(nobody.code).toBe(1)
          expect(nobody.stderr).toMatch(new RegExp(`^troupe: no job ${unknown} \\(list them with`))
          expect(nobody.stdout).toBe("")
        })
    )

    it.effect("--help of troupe inspect lists jobs, job and workers", () =>
      Effect.gen(function* () {
        const help = yield* Processes.troupe(["inspect", "--help"], Processes.cleanEnv({}))
        expect(help.code).toBe(0)
        const text = Processes.stripAnsi(help.stdout)
        for (const sub of ["jobs", "job", "workers"]) {
          expect(text).toMatch(new RegExp(`^\\s*- ${sub}\\b`, "m"))
        }
        expect(text).toContain("list jobs, newest first")
        expect(text).toContain("list workers: idle, busy, draining or offline")
      })
    )
  })
})
