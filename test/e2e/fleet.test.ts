/**
 * The fleet acceptance test: three worker OS processes (test/fixtures/worker-process.ts),
 * the gateway (job service and reaper) in the test process, 300 jobs of mixed affinity, and
 * one worker SIGKILLed while it runs some of them. Every run is recorded by the handler in
 * `test_job_runs` on the database clock, so what ran where and when is read back, not
 * inferred: no job is lost, none runs on two workers at once, the dead worker's strict jobs
 * fail with WORKER_UNAVAILABLE, and everything else finishes on the survivors.
 */

import * as Path from "node:path"
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Fiber, Redacted, Schedule } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import type { WorkerUnavailable } from "../../src/protocol/Jobs.ts"
import * as Db from "../fixtures/Db.ts"
import { startGateway } from "../fixtures/Jobs.ts"
import * as Processes from "../fixtures/Processes.ts"

const script = Path.join(Processes.root, "test/fixtures/worker-process.ts")

const workers = ["fleet-w1", "fleet-w2", "fleet-w3"] as const
const victim = "fleet-w2"
const maxConcurrent = 8
const jobCount = 300
/** Jobs started (on any worker) before the victim is killed. */
const killAfterStarted = 100

type Affinity = "any" | "preferred" | "strict"

interface Spec {
  readonly affinity: Affinity
  readonly target: string | null
  readonly ms: number
}

/**
 * A third of each affinity, interleaved; targeted ones spread over the three workers; 20–150 ms
 * each, and 150–400 ms once the kill may come, so that on a loaded machine too the victim is
 * seen running a strict and another job with time to go.
 */
const specs: ReadonlyArray<Spec> = Array.from({ length: jobCount }, (_, i) => {
  const affinity = (["any", "preferred", "strict"] as const)[i % 3]!
  return {
    affinity,
    target: affinity === "any" ? null : workers[Math.floor(i / 3) % 3]!,
    ms: i < killAfterStarted ? 20 + ((i * 37) % 131) : 150 + ((i * 37) % 251)
  }
})

type Submitted =
  | { readonly _tag: "accepted"; readonly spec: Spec; readonly jobId: string }
  | {
      readonly _tag: "refused"
      readonly spec: Spec
      readonly error: WorkerUnavailable
      readonly afterKill: boolean
    }

interface JobRow {
  readonly id: string
  readonly worker_affinity: Affinity
  readonly target_worker_id: string | null
  readonly status: string
  readonly error_code: string | null
  readonly worker_id: string | null
  readonly attempts: number
  readonly finished_us: number | null
}

interface RunRow {
  readonly job_id: string
  readonly worker_id: string
  readonly attempt: number
  readonly started_us: number
  readonly ended_us: number | null
}

/** Start a worker process; resolves once it printed `ready` (registered, claiming). */
const workerProcess = (workerId: string) =>
  Effect.gen(function* () {
    const urls = yield* Database.DatabaseUrls
    const proc = yield* Processes.start(process.execPath, ["--import", "tsx", script], {
      env: Processes.cleanEnv({
        DATABASE_URL: Redacted.value(urls.url),
        NODE_ID: `node-${workerId}`,
        WORKER_ID: workerId,
        MAX_CONCURRENT: String(maxConcurrent)
      })
    })
    yield* proc.waitFor(/^ready$/m, { within: "40 seconds" })
    return proc
  })

/** The database clock in microseconds since the epoch (exact in a double). */
const nowUs = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(
    sql<{ us: number }>`SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::float8 AS us`,
    (rows) => rows[0]!.us
  )
)

/** This process's wall clock in microseconds. */
const wallUs = () => (performance.timeOrigin + performance.now()) * 1000

/**
 * The database clock minus ours, from the quickest of a few round trips; `errorUs` bounds
 * how far off it can be. Local moments (the kill, the exit) become database times with it.
 */
const clockOffset = Effect.gen(function* () {
  let best = { offsetUs: 0, errorUs: Number.POSITIVE_INFINITY }
  for (let i = 0; i < 7; i++) {
    const before = wallUs()
    const db = yield* nowUs
    const after = wallUs()
    if ((after - before) / 2 < best.errorUs)
      best = { offsetUs: db - (before + after) / 2, errorUs: (after - before) / 2 }
  }
  return best
})

describe("a fleet of worker processes", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "three workers, 300 jobs of mixed affinity, one SIGKILLed mid-run: none lost, none run twice at once, its strict jobs fail, the rest finish elsewhere",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const began = performance.now()
          yield* sql`CREATE TABLE test_job_runs (job_id uuid NOT NULL, worker_id text NOT NULL, attempt int NOT NULL,
            started_at timestamptz NOT NULL DEFAULT clock_timestamp(), ended_at timestamptz)`
          const { jobs, reaper } = yield* startGateway("fleet-gw")
          const procs = yield* Effect.all(
            workers.map((w) => workerProcess(w)),
            { concurrency: "unbounded" }
          )
          const victimProc = procs[workers.indexOf(victim)]!
          const clock = yield* clockOffset
          const ready = performance.now()

          // --- Submit: strict jobs wait while their target is full (and only then) ---

          let killSent = false
          const submit = (spec: Spec): Effect.Effect<Submitted, unknown> =>
            jobs
              .submit({
                job_type: "work",
                payload: { ms: spec.ms },
                worker_affinity: spec.affinity,
                ...(spec.target === null ? {} : { target_worker_id: spec.target })
              })
              .pipe(
                Effect.retry({
                  schedule: Schedule.spaced("10 millis"),
                  while: (e) => e._tag === "WorkerUnavailable" && e.reason.startsWith("it is full")
                }),
                Effect.map((job): Submitted => ({ _tag: "accepted", spec, jobId: job.id })),
                Effect.catchTag("WorkerUnavailable", (error) =>
                  Effect.succeed<Submitted>({ _tag: "refused", spec, error, afterKill: killSent })
                )
              )
          const submitting = yield* Effect.fork(Effect.forEach(specs, submit, { concurrency: 4 }))

          // --- Kill the victim while it runs strict and non-strict jobs ---

          // Runs count when they still have a while to go (their `ms` is known), so the kill
          // lands while they run, not just after.
          const trigger = yield* Processes.eventually(
            sql<{ started: number; victim_strict: number; victim_other: number; at_us: number }>`
              WITH open AS (
                SELECT j.worker_affinity FROM test_job_runs r JOIN gh_automation_jobs j ON j.id = r.job_id
                WHERE r.worker_id = ${victim} AND r.ended_at IS NULL
                  AND r.started_at + make_interval(secs => (j.payload->>'ms')::float8 / 1000)
                      > clock_timestamp() + interval '80 milliseconds'
              )
              SELECT (SELECT count(DISTINCT job_id) FROM test_job_runs)::int AS started,
                (SELECT count(*) FROM open WHERE worker_affinity = 'strict')::int AS victim_strict,
                (SELECT count(*) FROM open WHERE worker_affinity <> 'strict')::int AS victim_other,
                (extract(epoch FROM clock_timestamp()) * 1000000)::float8 AS at_us`,
            (rows) => {
              const r = rows[0]!
              return r.started >= killAfterStarted && r.victim_strict >= 1 && r.victim_other >= 1
            },
            `${killAfterStarted} jobs started, the victim running a strict and another job with 80 ms to go`,
            "30 seconds"
          )
          // The process dies between these two moments (on the database clock, conservatively).
          const killedAtUs = wallUs() + clock.offsetUs - clock.errorUs
          let exitedAtUs = Number.POSITIVE_INFINITY
          victimProc.child.once("exit", () => (exitedAtUs = wallUs() + clock.offsetUs + clock.errorUs))
          killSent = true
          victimProc.child.kill("SIGKILL")
          const ended = yield* victimProc.exited("10 seconds")
          expect(ended.signal).toBe("SIGKILL")
          const deadByUs = exitedAtUs
          const killed = performance.now()

          // --- Wait until every submitted job has ended ---

          const submitted = yield* Fiber.join(submitting)
          const accepted = submitted.filter(
            (s): s is Extract<Submitted, { _tag: "accepted" }> => s._tag === "accepted"
          )
          const refused = submitted.filter(
            (s): s is Extract<Submitted, { _tag: "refused" }> => s._tag === "refused"
          )
          yield* Processes.eventually(
            sql<{ open: number; total: number }>`
              SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed', 'cancelled'))::int AS open,
                count(*)::int AS total FROM gh_automation_jobs`,
            (rows) => rows[0]!.open === 0 && rows[0]!.total === accepted.length,
            "every submitted job to end",
            "30 seconds"
          )
          const settled = performance.now()

          const jobRows = yield* sql<JobRow>`
            SELECT id::text AS id, worker_affinity, target_worker_id, status, error_code, worker_id, attempts,
              (extract(epoch FROM finished_at) * 1000000)::float8 AS finished_us
            FROM gh_automation_jobs`
          const runRows = yield* sql<RunRow>`
            SELECT job_id::text AS job_id, worker_id, attempt,
              (extract(epoch FROM started_at) * 1000000)::float8 AS started_us,
              (extract(epoch FROM ended_at) * 1000000)::float8 AS ended_us
            FROM test_job_runs ORDER BY job_id, attempt`
          const endings = yield* sql<{ job_id: string; events: Array<string> }>`
            SELECT job_id::text AS job_id, array_agg(event_type ORDER BY id) AS events FROM gh_job_events
            WHERE event_type IN ('job_completed', 'job_failed', 'job_cancelled') GROUP BY job_id`
          const registry = yield* sql<{ worker_id: string; status: string }>`
            SELECT worker_id, status FROM gh_worker_registry ORDER BY worker_id`
          const [firstRequeue] = yield* sql<{ us: number | null }>`
            SELECT (extract(epoch FROM min(created_at)) * 1000000)::float8 AS us
            FROM gh_job_events WHERE event_type = 'job_requeued'`

          const byId = new Map(jobRows.map((j) => [j.id, j]))
          const runsOf = new Map<string, Array<RunRow>>()
          for (const r of runRows) {
            const list = runsOf.get(r.job_id) ?? []
            list.push(r)
            runsOf.set(r.job_id, list)
          }
          const runs = (id: string) => runsOf.get(id) ?? []
          const ranOnVictim = (id: string) => runs(id).some((r) => r.worker_id === victim)

          // --- No job lost: every submission is a job in exactly one terminal state, or a refusal ---

          expect(accepted.length + refused.length).toBe(jobCount)
          expect(new Set(accepted.map((s) => s.jobId)).size).toBe(accepted.length)
          expect(jobRows.length).toBe(accepted.length)
          for (const s of accepted) expect(byId.has(s.jobId), `job ${s.jobId} is in the table`).toBe(true)
          const notEnded = jobRows.filter((j) => j.status !== "completed" && j.status !== "failed")
          expect(notEnded).toEqual([])
          // Refusals: only strict jobs for the dead worker, after the kill (it is offline, not full).
          for (const s of refused) {
            expect({ affinity: s.spec.affinity, target: s.spec.target, afterKill: s.afterKill }).toEqual({
              affinity: "strict",
              target: victim,
              afterKill: true
            })
            expect(s.error.reason).not.toMatch(/full/)
          }
          for (const r of runRows) expect(byId.has(r.job_id), `run of unknown job ${r.job_id}`).toBe(true)

          // Every broken promise about a job, with the job's history, so a failure says what happened.
          const problems: Array<{ readonly job: string; readonly problem: string }> = []
          const problem = (job: string, text: string) => problems.push({ job, problem: text })

          // One ending each, and the one its row says.
          const endingOf = new Map(endings.map((e) => [e.job_id, e.events]))
          for (const j of jobRows) {
            const events = endingOf.get(j.id) ?? []
            if (events.length !== 1 || events[0] !== `job_${j.status}`) {
              problem(j.id, `status ${j.status}, but its ending events are [${events}]`)
            }
          }

          // --- No job ran on two workers at once ---

          let tightestGapMs = Number.POSITIVE_INFINITY
          for (const [id, list] of runsOf) {
            const attempts = list.map((r) => r.attempt)
            if (new Set(attempts).size !== attempts.length)
              problem(id, `attempt recorded twice (${attempts})`)
            for (const r of list) {
              if (r.ended_us === null && r.worker_id !== victim) {
                problem(id, `attempt ${r.attempt} on ${r.worker_id} (alive) never ended`)
              }
            }
            for (let i = 1; i < list.length; i++) {
              const prev = list[i - 1]!
              const next = list[i]!
              // A run the dead worker never finished lasted until its process died.
              const prevEnd = prev.ended_us ?? deadByUs
              if (next.started_us <= prevEnd) {
                problem(
                  id,
                  `attempt ${next.attempt} on ${next.worker_id} started ${((prevEnd - next.started_us) / 1000).toFixed(1)} ms before attempt ${prev.attempt} on ${prev.worker_id} ended`
                )
              } else if (prev.ended_us === null) {
                tightestGapMs = Math.min(tightestGapMs, (next.started_us - prevEnd) / 1000)
              }
            }
          }

          // --- The dead worker's strict jobs: failed with WORKER_UNAVAILABLE unless done before it died ---

          const victimStrict = jobRows.filter(
            (j) => j.worker_affinity === "strict" && j.target_worker_id === victim
          )
          const strictFailed = victimStrict.filter((j) => j.status === "failed")
          for (const j of victimStrict) {
            const elsewhere = runs(j.id).filter((r) => r.worker_id !== victim)
            for (const r of elsewhere)
              problem(j.id, `strict job of ${victim} ran on ${r.worker_id} (attempt ${r.attempt})`)
            if (j.status === "completed") {
              if (j.worker_id !== victim) problem(j.id, `strict job of ${victim} completed by ${j.worker_id}`)
              else if (j.finished_us! > deadByUs) problem(j.id, `completed by ${victim} after it died`)
            } else if (j.status !== "failed" || j.error_code !== "WORKER_UNAVAILABLE") {
              problem(
                j.id,
                `strict job of ${victim} ended ${j.status} / ${j.error_code}, not failed / WORKER_UNAVAILABLE`
              )
            }
          }

          // --- Everything else completed: moved off the dead worker, or on its strict target ---

          const others = jobRows.filter(
            (j) => !(j.worker_affinity === "strict" && j.target_worker_id === victim)
          )
          let moved = 0
          for (const j of others) {
            if (j.status !== "completed") {
              problem(
                j.id,
                `${j.worker_affinity} job (target ${j.target_worker_id}) ended ${j.status} / ${j.error_code}`
              )
              continue
            }
            const list = runs(j.id)
            const last = list[list.length - 1]
            if (last?.worker_id !== j.worker_id) {
              problem(j.id, `completed by ${j.worker_id}, but its last recorded run is on ${last?.worker_id}`)
            }
            const onSurvivors = list.filter((r) => r.worker_id !== victim)
            if (onSurvivors.length > 1) problem(j.id, `ran ${onSurvivors.length} times on live workers`)
            if (j.worker_id === victim) {
              if (j.finished_us! > deadByUs) problem(j.id, `completed by ${victim} after it died`)
            } else if (ranOnVictim(j.id)) {
              moved++
              if (j.attempts < 2) problem(j.id, `moved off ${victim} but its attempts are ${j.attempts}`)
            }
            if (j.worker_affinity === "strict") {
              for (const r of list) {
                if (r.worker_id !== j.target_worker_id) {
                  problem(
                    j.id,
                    `strict job of ${j.target_worker_id} ran on ${r.worker_id} (attempt ${r.attempt})`
                  )
                }
              }
            }
          }

          if (problems.length > 0) {
            const histories = yield* Effect.forEach(
              [...new Set(problems.map((p) => p.job))].slice(0, 10),
              (id) =>
                Effect.map(
                  sql<{ at: string; event_type: string; actor: string | null; message: string }>`
                  SELECT to_char(created_at, 'HH24:MI:SS.US') AS at, event_type, actor, message
                  FROM gh_job_events WHERE job_id = ${id}::uuid ORDER BY id`,
                  (events) =>
                    `job ${id}: ${JSON.stringify(byId.get(id))}\n` +
                    `  runs: ${JSON.stringify(runs(id))}\n` +
                    events.map((e) => `  ${e.at} ${e.event_type} [${e.actor}] ${e.message}`).join("\n")
                )
            )
            console.log(
              `fleet: ${problems.length} problems (kill at ${killedAtUs} µs, dead by ${deadByUs} µs)\n${histories.join("\n")}`
            )
          }
          expect(problems).toEqual([])
          expect(registry).toEqual(
            workers.map((w) => ({ worker_id: w, status: w === victim ? "offline" : "active" }))
          )
          // The kill caught some of the victim's strict jobs and others running (the trigger waited for it).
          const strictFailedRunning = strictFailed.filter((j) => ranOnVictim(j.id))
          expect(strictFailedRunning.length).toBeGreaterThanOrEqual(1)
          expect(moved).toBeGreaterThanOrEqual(1)

          // --- Failover time: from the kill to a job of the dead worker starting elsewhere ---

          const restarts = runRows.filter((r) => r.worker_id !== victim && r.attempt >= 2)
          expect(restarts.length).toBeGreaterThanOrEqual(1)
          const failoverMs = (Math.min(...restarts.map((r) => r.started_us)) - killedAtUs) / 1000
          const detectedMs = firstRequeue?.us == null ? null : (firstRequeue.us - killedAtUs) / 1000
          const count = (pred: (j: JobRow) => boolean) => jobRows.filter(pred).length
          console.log(
            [
              `fleet: ${workers.length} worker processes × ${maxConcurrent} slots, ${jobCount} jobs submitted, ${victim} SIGKILLed after ${killAfterStarted} had started`,
              `  failover      ${failoverMs.toFixed(0)} ms from the kill to the first job of ${victim} starting on another worker` +
                (detectedMs === null ? "" : ` (requeued by the reaper after ${detectedMs.toFixed(0)} ms)`),
              `  jobs          ${accepted.length} accepted, ${refused.length} strict submits to ${victim} refused after the kill`,
              `  completed     ${count((j) => j.status === "completed")} (${count((j) => j.status === "completed" && j.worker_id === victim)} by ${victim} before it died, ${moved} moved off it)`,
              `  failed        ${strictFailed.length} strict jobs of ${victim} with WORKER_UNAVAILABLE (${strictFailedRunning.length} were running on it)`,
              `  kill          sent ${((killedAtUs - trigger[0]!.at_us) / 1000).toFixed(1)} ms after the reading that triggered it; exit seen ≤ ${((deadByUs - killedAtUs) / 1000).toFixed(1)} ms later (clock error ±${(clock.errorUs / 1000).toFixed(2)} ms)`,
              `  runs          ${runRows.length}; tightest gap between a dead run and the next attempt ${Number.isFinite(tightestGapMs) ? `${tightestGapMs.toFixed(0)} ms` : "n/a"}`,
              `  reaper        ${JSON.stringify(reaper?.stats())}`,
              `  timings       workers up ${((ready - began) / 1000).toFixed(1)} s, kill at +${((killed - ready) / 1000).toFixed(1)} s, all ended +${((settled - killed) / 1000).toFixed(1)} s later`
            ].join("\n")
          )
          expect(failoverMs).toBeLessThan(5000)
        }),
      60_000
    )
  })
})
