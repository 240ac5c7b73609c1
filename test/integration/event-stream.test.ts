import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { type Duration, Effect, Fiber, Schedule } from "effect"
import fc from "fast-check"
import * as Crypto from "node:crypto"
import type pg from "pg"
import type { EventRecord } from "../../src/protocol/Edge.ts"
import type { DatabaseUrls } from "../../src/runtime/db/Database.ts"
import * as EventStream from "../../src/runtime/jobs/EventStream.ts"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Db from "../fixtures/Db.ts"
import { killListener } from "../fixtures/Delivery.ts"
import { reportEvents, startGateway, startWorker } from "../fixtures/Jobs.ts"

// --- helpers ---

/** A subscriber that records what it gets. */
const collector = () => {
  const events: Array<EventRecord> = []
  return { events, onEvent: (e: EventRecord) => void events.push(e) }
}

/** Wait until `cond` holds (it reads what subscribers recorded), or fail naming `what`. */
const waitUntil = (cond: () => boolean, what: () => string, timeout: Duration.DurationInput = "10 seconds") =>
  Effect.sync(cond).pipe(
    Effect.repeat({ schedule: Schedule.spaced("5 millis"), until: (ok) => ok }),
    Effect.timeoutFail({ duration: timeout, onTimeout: () => new Error(`timed out waiting for ${what()}`) })
  )

const ids = (events: ReadonlyArray<EventRecord>) => events.map((e) => e.event_id)

/** A finished job (no worker or reaper touches it) to hang events on. */
const insertJob = (valetTaskId: string, workerId: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ id: string }>`INSERT INTO gh_automation_jobs (job_type, valet_task_id, worker_id, status)
      VALUES ('noop', ${valetTaskId}, ${workerId}, 'completed') RETURNING id::text AS id`.pipe(
      Effect.map((rows) => rows[0]!.id)
    )
  )

/** A job event, committed on its own (the pool). */
const jobEvent = (jobId: string, actor: string, type = "step_started") =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    sql<{ id: string }>`INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
      VALUES (${jobId}::uuid, ${type}, ${`${type} of ${jobId}`}, ${actor}, ${JSON.stringify({ worker_id: actor })}::jsonb)
      RETURNING id::text AS id`.pipe(Effect.map((rows) => rows[0]!.id))
  )

/** A job event on a raw connection (inside whatever transaction it has open). */
const jobEventOn = (c: pg.Client, jobId: string, actor: string) =>
  Effect.promise(() =>
    c.query<{ id: string }>(
      `INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata)
       VALUES ($1::uuid, 'step_started', '', $2, jsonb_build_object('worker_id', $2::text)) RETURNING id::text AS id`,
      [jobId, actor]
    )
  ).pipe(Effect.map((r) => r.rows[0]!.id))

/** A worker lifecycle event on a raw connection. */
const workerEventOn = (c: pg.Client, workerId: string) =>
  Effect.promise(() =>
    c.query<{ id: string }>(
      `INSERT INTO gh_worker_events (worker_id, event_type, message) VALUES ($1, 'worker_heartbeat', '')
       RETURNING id::text AS id`,
      [workerId]
    )
  ).pipe(Effect.map((r) => r.rows[0]!.id))

/** Wait until the tail has read at least once after now (a read that began after this call ended). */
const tailHasLooked = (stream: EventStream.EventStream) =>
  Effect.suspend(() => {
    const reads = stream.stats().reads
    return waitUntil(
      () => stream.stats().reads >= reads + 2,
      () => "the tail to read again"
    )
  })

const exec = (c: pg.Client, text: string) => Effect.promise(() => c.query(text)).pipe(Effect.asVoid)

/**
 * A fallback poll longer than any wait of these tests: what they see came through NOTIFY,
 * the reconnect hook or the re-reads behind an open transaction.
 */
const noPoll = "10 minutes"

/** A node and its stream. */
const startStream = (nodeId: string, options?: EventStream.Options) =>
  Effect.gen(function* () {
    const node = yield* Node.make({ nodeId })
    const stream = yield* EventStream.make(node, options)
    return { node, stream }
  })

describe("event stream", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a job that runs: live subscriptions by job, valet task, worker and all get its events in order, each once",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const { node, jobs } = yield* startGateway("es-gw1")
          const stream = yield* EventStream.make(node)
          const task = `task-${Crypto.randomUUID()}`
          // Queued, and no worker yet: nothing has happened to it.
          const job = yield* jobs.submit({ valet_task_id: task, job_type: "report" })
          const byJob = collector()
          const byTask = collector()
          const byWorker = collector()
          const everything = collector()
          const subs = [
            yield* stream.subscribe({ job_id: job.id.toUpperCase() }, byJob),
            yield* stream.subscribe({ valet_task_id: task }, byTask),
            yield* stream.subscribe({ worker_id: "w-es1" }, byWorker),
            yield* stream.subscribe({ all: true }, everything)
          ]
          expect(subs.map((s) => s.replayed)).toEqual([0, 0, 0, 0])
          expect(stream.stats().subscriptions).toBe(4)
          yield* startWorker("es1")
          const done = (c: { events: Array<EventRecord> }) => () =>
            c.events.some((e) => e.job_id === job.id && e.event_type === "job_completed")
          for (const c of [byJob, byTask, byWorker, everything]) {
            yield* waitUntil(
              done(c),
              () => `job_completed in ${JSON.stringify(c.events.map((e) => e.event_type))}`
            )
          }
          const stored = yield* sql<{ id: string; event_type: string }>`
            SELECT id::text AS id, event_type FROM gh_job_events WHERE job_id = ${job.id}::uuid ORDER BY gh_job_events.id`
          expect(stored.map((e) => e.event_type)).toEqual(reportEvents)
          const jobIds = stored.map((e) => e.id)
          expect(ids(byJob.events)).toEqual(jobIds)
          expect(ids(byTask.events)).toEqual(jobIds)
          const first = byJob.events[0]!
          expect(first).toMatchObject({
            source: "job",
            job_id: job.id,
            worker_id: "w-es1",
            valet_task_id: task,
            event_type: "job_started",
            actor: "w-es1"
          })
          expect(first.metadata).toMatchObject({ worker_id: "w-es1" })
          expect(new Date(first.created_at).toISOString()).toBe(first.created_at)
          // The worker's own events (it registered after the subscription) and its job's, in order.
          const completedAt = byWorker.events.findIndex((e) => e.event_type === "job_completed")
          const workerSeen = byWorker.events.slice(0, completedAt + 1)
          expect(workerSeen[0]).toMatchObject({
            source: "worker",
            worker_id: "w-es1",
            event_type: "worker_registered"
          })
          const workerStored = yield* sql<{ id: string }>`
            SELECT id::text AS id FROM (
              SELECT id, xid FROM gh_worker_events WHERE worker_id = 'w-es1'
              UNION ALL SELECT id, xid FROM gh_job_events WHERE actor = 'w-es1') e
            WHERE (xid, id) <= (SELECT xid, id FROM gh_job_events WHERE id = ${jobIds.at(-1)!}::bigint)
            ORDER BY e.xid, e.id`
          expect(ids(workerSeen)).toEqual(workerStored.map((e) => e.id))
          // Everything, in stream order, without a gap from the first event it got.
          const allSeen = everything.events.slice(
            0,
            everything.events.findIndex((e) => e.event_id === jobIds.at(-1)) + 1
          )
          const allStored = yield* sql<{ id: string }>`
            SELECT id::text AS id FROM (
              SELECT id, xid FROM gh_worker_events UNION ALL SELECT id, xid FROM gh_job_events) e
            WHERE (xid, id) >= (SELECT xid, id FROM (SELECT id, xid FROM gh_worker_events
                                  UNION ALL SELECT id, xid FROM gh_job_events) f WHERE id = ${allSeen[0]!.event_id}::bigint)
              AND (xid, id) <= (SELECT xid, id FROM gh_job_events WHERE id = ${jobIds.at(-1)!}::bigint)
            ORDER BY e.xid, e.id`
          expect(ids(allSeen)).toEqual(allStored.map((e) => e.id))
          expect(allSeen.some((e) => e.source === "worker")).toBe(true)
          for (const s of subs) yield* s.unsubscribe
          expect(stream.stats().subscriptions).toBe(0)
        })
    )

    it.scoped(
      "out-of-order commits: a lower id committed late is delivered, and a resume from the last id seen gets exactly the rest",
      () =>
        Effect.gen(function* () {
          const { stream } = yield* startStream("es-n2", {
            replayPage: 2,
            tailBatch: 3,
            pollInterval: noPoll
          })
          const c1 = yield* Db.rawClient
          const c2 = yield* Db.rawClient
          const task = `task-${Crypto.randomUUID()}`
          const job = yield* insertJob(task, "w-2")
          const mark = yield* jobEvent(job, "w-2", "marker")
          const a = collector()
          const subA = yield* stream.subscribe({ job_id: job }, { sinceEventId: mark, onEvent: a.onEvent })
          expect(subA.replayed).toBe(0)

          // c1 writes first (lower id) and commits last.
          yield* exec(c1, "BEGIN")
          const low = yield* jobEventOn(c1, job, "w-2")
          const mid = yield* jobEventOn(c2, job, "w-2")
          const high = yield* jobEvent(job, "w-2")
          expect(BigInt(low) < BigInt(mid) && BigInt(mid) < BigInt(high)).toBe(true)
          // Held back behind the open transaction (delivering `mid` now would skip `low` later).
          yield* tailHasLooked(stream)
          expect(ids(a.events)).toEqual([])
          yield* exec(c1, "COMMIT")
          yield* waitUntil(
            () => a.events.length >= 3,
            () => `3 events, got ${ids(a.events)}`
          )
          expect(ids(a.events)).toEqual([low, mid, high])

          // A transaction that writes no event (so sends no NOTIFY) holds events back only while open.
          yield* exec(c1, "BEGIN")
          yield* Effect.promise(() => c1.query("SELECT pg_current_xact_id()"))
          const behind = yield* jobEvent(job, "w-2")
          yield* tailHasLooked(stream)
          expect(ids(a.events)).toEqual([low, mid, high])
          yield* exec(c1, "COMMIT")
          yield* waitUntil(
            () => a.events.length >= 4,
            () => `the event behind a transaction that wrote none, got ${ids(a.events)}`
          )
          expect(ids(a.events)).toEqual([low, mid, high, behind])

          // Again, and A leaves while the early transaction is still open.
          yield* exec(c1, "BEGIN")
          yield* Effect.promise(() => c1.query("SELECT pg_current_xact_id()"))
          const late = yield* jobEventOn(c2, job, "w-2") // a later transaction, committed at once
          const lateInC1 = yield* jobEventOn(c1, job, "w-2") // a higher id in the earlier transaction
          yield* subA.unsubscribe
          const seenByA = a.events.length
          yield* exec(c1, "COMMIT")
          const after = yield* jobEvent(job, "w-2")
          const b = collector()
          const subB = yield* stream.subscribe(
            { valet_task_id: task },
            { sinceEventId: a.events.at(-1)!.event_id, onEvent: b.onEvent }
          )
          yield* waitUntil(
            () => b.events.length >= 3,
            () => `3 events, got ${ids(b.events)}`
          )
          // Stream order: the transaction that began first comes first, whatever its ids.
          expect(ids(b.events)).toEqual([lateInC1, late, after])
          expect(a.events.length).toBe(seenByA)
          // Nothing more arrives: a new event is the next one B gets.
          const last = yield* jobEvent(job, "w-2")
          yield* waitUntil(
            () => b.events.length >= 4,
            () => "the last event"
          )
          expect(ids(b.events)).toEqual([lateInC1, late, after, last])
          yield* subB.unsubscribe
        })
    )

    it.scoped("resume with a long history: replay in pages, then live, while writers keep committing", () =>
      Effect.gen(function* () {
        const { stream } = yield* startStream("es-n3", { replayPage: 7, tailBatch: 5, pollInterval: noPoll })
        const job = yield* insertJob("t3", "w-3")
        const mark = yield* jobEvent(job, "w-3", "marker")
        const written = [] as Array<string>
        for (let i = 0; i < 60; i++) written.push(yield* jobEvent(job, "w-3"))
        // 40 more in one transaction: the tail reads them in several batches.
        const sql = yield* SqlClient.SqlClient
        const inOne = yield* sql<{ id: string }>`
            INSERT INTO gh_job_events (job_id, event_type, actor) SELECT ${job}::uuid, 'thought', 'w-3'
            FROM generate_series(1, 40) RETURNING id::text AS id`
        written.push(...inOne.map((r) => r.id).sort((x, y) => Number(x) - Number(y)))
        // Writers keep going while the subscriber replays.
        const writer = yield* Effect.forkScoped(
          Effect.forEach(Array.from({ length: 30 }), () => jobEvent(job, "w-3"), { concurrency: 3 })
        )
        const c = collector()
        const sub = yield* stream.subscribe({ worker_id: "w-3" }, { sinceEventId: mark, onEvent: c.onEvent })
        const more = yield* Fiber.join(writer)
        written.push(...more)
        yield* waitUntil(
          () => c.events.length >= written.length,
          () => `${written.length} events, got ${c.events.length}`
        )
        const got = ids(c.events)
        expect(new Set(got).size).toBe(got.length)
        expect([...got].sort()).toEqual([...written].sort())
        // The sequential part comes in id order.
        expect(got.slice(0, 100)).toEqual(written.slice(0, 100))
        yield* sub.unsubscribe
      })
    )

    it.scoped("an unknown event id or job is NotFound; history pages a job's events in stream order", () =>
      Effect.gen(function* () {
        const { stream } = yield* startStream("es-n4")
        const unknown = yield* stream
          .subscribe({ all: true }, { sinceEventId: "987654321", onEvent: () => undefined })
          .pipe(Effect.flip)
        expect(unknown).toMatchObject({ _tag: "NotFound", what: "event", id: "987654321" })
        const garbled = yield* stream
          .subscribe({ all: true }, { sinceEventId: "99999999999999999999", onEvent: () => undefined })
          .pipe(Effect.flip)
        expect(garbled._tag).toBe("NotFound")
        const noJob = Crypto.randomUUID()
        const missing = yield* stream.history(noJob).pipe(Effect.flip)
        expect(missing).toMatchObject({ _tag: "NotFound", what: "job", id: noJob })
        const invalid = yield* stream.history("not-a-job").pipe(Effect.flip)
        expect(invalid._tag).toBe("InvalidRequest")
        expect(stream.stats().subscriptions).toBe(0)

        const job = yield* insertJob("t4", "w-4")
        const other = yield* insertJob("t4", "w-4")
        const written = [] as Array<string>
        for (let i = 0; i < 5; i++) {
          written.push(yield* jobEvent(job, "w-4"))
          yield* jobEvent(other, "w-4")
        }
        const all = yield* stream.history(job)
        expect(ids(all)).toEqual(written)
        expect(all[0]).toMatchObject({ source: "job", job_id: job, valet_task_id: "t4", worker_id: "w-4" })
        const page = yield* stream.history(job.toUpperCase(), { sinceEventId: written[1]!, limit: 2 })
        expect(ids(page)).toEqual(written.slice(2, 4))
        const badSince = yield* stream.history(job, { sinceEventId: "123456789012" }).pipe(Effect.flip)
        expect(badSince).toMatchObject({ _tag: "NotFound", what: "event" })
        // History stops below the watermark too: an event behind an open transaction waits.
        const c1 = yield* Db.rawClient
        yield* exec(c1, "BEGIN")
        yield* Effect.promise(() => c1.query("SELECT pg_current_xact_id()"))
        const held = yield* jobEvent(job, "w-4")
        expect(ids(yield* stream.history(job, { sinceEventId: written.at(-1)! }))).toEqual([])
        yield* exec(c1, "COMMIT")
        expect(ids(yield* stream.history(job, { sinceEventId: written.at(-1)! }))).toEqual([held])
      })
    )

    it.scoped("the listener connection is killed mid-stream: nothing is lost, nothing twice", () =>
      Effect.gen(function* () {
        const { node, stream } = yield* startStream("es-n5", { pollInterval: noPoll })
        const job = yield* insertJob("t5", "w-5")
        const c = collector()
        const sub = yield* stream.subscribe({ job_id: job }, c)
        const written = [] as Array<string>
        for (let round = 0; round < 3; round++) {
          for (let i = 0; i < 10; i++) written.push(yield* jobEvent(job, "w-5"))
          const connections = node.stats().listenerConnections
          expect(yield* killListener("es-n5")).toBe(1)
          // Written while the listener is down: no NOTIFY reaches this node.
          for (let i = 0; i < 10; i++) written.push(yield* jobEvent(job, "w-5"))
          yield* waitUntil(
            () => node.stats().listenerConnections > connections,
            () => "the listener to reconnect"
          )
        }
        yield* waitUntil(
          () => c.events.length >= written.length,
          () => `${written.length} events, got ${c.events.length}`
        )
        const last = yield* jobEvent(job, "w-5")
        yield* waitUntil(
          () => c.events.at(-1)?.event_id === last,
          () => "the last event"
        )
        expect(ids(c.events)).toEqual([...written, last])
        yield* sub.unsubscribe
      })
    )

    it.scoped(
      "property: concurrent writers committing out of id order, a subscriber that leaves and resumes from the last id it saw: every committed event once, per job in id order",
      () =>
        Effect.gen(function* () {
          const ctx = yield* Effect.context<SqlClient.SqlClient | DatabaseUrls>()
          const { stream } = yield* startStream("es-n6", {
            replayPage: 3,
            tailBatch: 4,
            pollInterval: noPoll
          })
          const conns = [yield* Db.rawClient, yield* Db.rawClient, yield* Db.rawClient]
          const seed = Number(process.env.TROUPE_PROPERTY_SEED ?? Date.now() % 2 ** 31)
          const result = yield* Effect.promise(() =>
            fc.check(
              fc.asyncProperty(planArb, async (schedule) => {
                const problems = await Effect.runPromise(
                  runSchedule(stream, conns, schedule).pipe(Effect.provide(ctx), Effect.scoped)
                )
                if (problems.length > 0) throw new Error(problems.join("\n"))
              }),
              { numRuns: Number(process.env.TROUPE_PROPERTY_RUNS ?? 80), seed, endOnFailure: true }
            )
          )
          if (result.failed) {
            console.error(
              `event stream property failed with seed ${seed} (rerun with TROUPE_PROPERTY_SEED=${seed})`
            )
            console.error(fc.defaultReportMessage(result))
          }
          expect(result.failed, `seed ${seed}`).toBe(false)
          expect(stream.stats().subscriptions).toBe(0)
        })
    )
  })
})

// --- the property ---

type Command =
  | { readonly _tag: "begin"; readonly conn: number; readonly early: boolean }
  | { readonly _tag: "insert"; readonly conn: number; readonly worker: boolean; readonly n: number }
  | { readonly _tag: "commit"; readonly conn: number }
  | { readonly _tag: "rollback"; readonly conn: number }
  | { readonly _tag: "killListener" }

type FilterKind = "all" | "job" | "task" | "worker"

interface Plan {
  readonly commands: ReadonlyArray<Command>
  readonly filter: FilterKind
  /** Where the subscriber leaves, and where it comes back (fractions of the schedule). */
  readonly leave: number
  readonly back: number
}

const CONNS = 3
const conn = fc.nat(CONNS - 1)
const commandArb: fc.Arbitrary<Command> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ _tag: fc.constant("begin" as const), conn, early: fc.boolean() }) },
  {
    weight: 6,
    arbitrary: fc.record({
      _tag: fc.constant("insert" as const),
      conn,
      worker: fc.boolean(),
      n: fc.integer({ min: 1, max: 3 })
    })
  },
  { weight: 3, arbitrary: fc.record({ _tag: fc.constant("commit" as const), conn }) },
  { weight: 1, arbitrary: fc.record({ _tag: fc.constant("rollback" as const), conn }) },
  { weight: 1, arbitrary: fc.constant({ _tag: "killListener" as const }) }
)
const planArb: fc.Arbitrary<Plan> = fc
  .record({
    commands: fc.array(commandArb, { minLength: 1, maxLength: 40 }),
    filter: fc.constantFrom<FilterKind>("all", "job", "task", "worker"),
    a: fc.double({ min: 0, max: 1, noNaN: true }),
    b: fc.double({ min: 0, max: 1, noNaN: true })
  })
  .map(({ commands, filter, a, b }) => ({ commands, filter, leave: Math.min(a, b), back: Math.max(a, b) }))

interface Written {
  readonly id: string
  readonly conn: number
  readonly worker: boolean
}

/**
 * Run one schedule: connection `c` writes the events of job `c` (jobs 0 and 1 share a valet
 * task) as worker `c`, and lifecycle events of worker `c`. Returns the violations.
 */
const runSchedule = (stream: EventStream.EventStream, conns: ReadonlyArray<pg.Client>, schedule: Plan) =>
  Effect.gen(function* () {
    const run = Crypto.randomUUID().slice(0, 8)
    const task = `task-${run}`
    const workers = Array.from({ length: CONNS }, (_, c) => `w-${run}-${c}`)
    const jobs: Array<string> = []
    for (let c = 0; c < CONNS; c++) jobs.push(yield* insertJob(c < 2 ? task : `other-${run}`, workers[c]!))
    const filter: EventStream.EventFilter =
      schedule.filter === "all"
        ? { all: true }
        : schedule.filter === "job"
          ? { job_id: jobs[0]! }
          : schedule.filter === "task"
            ? { valet_task_id: task }
            : { worker_id: workers[0]! }
    const matches = (w: Written) =>
      schedule.filter === "all"
        ? true
        : schedule.filter === "job"
          ? !w.worker && w.conn === 0
          : schedule.filter === "task"
            ? !w.worker && w.conn < 2
            : w.conn === 0
    // Markers: job 0's events, written by the pool before and after everything.
    const first = yield* jobEvent(jobs[0]!, workers[0]!, "marker")

    const committed: Array<Written> = []
    const open: Array<Array<Written> | undefined> = Array.from({ length: CONNS }, () => undefined)
    const seen1 = collector()
    const seen2 = collector()
    const sub1 = yield* stream.subscribe(filter, { sinceEventId: first, onEvent: seen1.onEvent })
    let seenAtLeave = -1
    const leaveAt = Math.floor(schedule.leave * schedule.commands.length)
    const backAt = Math.floor(schedule.back * schedule.commands.length)
    // The subscriber comes back while the writers go on: its replay overlaps their commits.
    let sub2: Fiber.RuntimeFiber<EventStream.Subscription, unknown> | undefined
    const resubscribe = Effect.suspend(() =>
      Effect.fork(
        stream.subscribe(filter, {
          sinceEventId: seen1.events.at(-1)?.event_id ?? first,
          onEvent: seen2.onEvent
        })
      )
    ).pipe(
      Effect.tap((fiber) => {
        sub2 = fiber
      }),
      Effect.asVoid
    )

    for (let i = 0; i <= schedule.commands.length; i++) {
      if (i === leaveAt) {
        yield* sub1.unsubscribe
        seenAtLeave = seen1.events.length
      }
      if (i === backAt) yield* resubscribe
      const cmd = schedule.commands[i]
      if (cmd === undefined) break
      switch (cmd._tag) {
        case "begin":
          if (open[cmd.conn] === undefined) {
            yield* exec(conns[cmd.conn]!, "BEGIN")
            // Take a transaction id now: this transaction's events will get higher ids than
            // those of transactions that start after it but write first.
            if (cmd.early) yield* exec(conns[cmd.conn]!, "SELECT pg_current_xact_id()")
            open[cmd.conn] = []
          }
          break
        case "insert":
          for (let k = 0; k < cmd.n; k++) {
            const c = conns[cmd.conn]!
            const id = cmd.worker
              ? yield* workerEventOn(c, workers[cmd.conn]!)
              : yield* jobEventOn(c, jobs[cmd.conn]!, workers[cmd.conn]!)
            const w = { id, conn: cmd.conn, worker: cmd.worker }
            const txn = open[cmd.conn]
            if (txn === undefined) committed.push(w)
            else txn.push(w)
          }
          break
        case "commit":
        case "rollback": {
          const txn = open[cmd.conn]
          if (txn !== undefined) {
            yield* exec(conns[cmd.conn]!, cmd._tag === "commit" ? "COMMIT" : "ROLLBACK")
            if (cmd._tag === "commit") committed.push(...txn)
            open[cmd.conn] = undefined
          }
          break
        }
        case "killListener":
          yield* killListener("es-n6")
          break
      }
    }
    for (let c = 0; c < CONNS; c++) {
      const txn = open[c]
      if (txn !== undefined) {
        yield* exec(conns[c]!, "COMMIT")
        committed.push(...txn)
      }
    }
    const last = yield* jobEvent(jobs[0]!, workers[0]!, "marker")
    const sub = yield* Fiber.join(sub2!)
    yield* waitUntil(
      () => seen2.events.some((e) => e.event_id === last),
      () => `the last marker (got ${seen1.events.length} + ${seen2.events.length} events)`
    )
    yield* sub.unsubscribe

    const problems: Array<string> = []
    if (seen1.events.length !== seenAtLeave) problems.push("events arrived after unsubscribe")
    const got = [...seen1.events, ...seen2.events].filter((e) => e.event_id !== last)
    const gotIds = ids(got)
    const expected = committed.filter(matches).map((w) => w.id)
    if (new Set(gotIds).size !== gotIds.length) problems.push(`duplicates in ${gotIds}`)
    const missing = expected.filter((id) => !gotIds.includes(id))
    const extra = gotIds.filter((id) => !expected.includes(id))
    if (missing.length > 0) problems.push(`missing ${missing} (got ${gotIds})`)
    if (extra.length > 0) problems.push(`unexpected ${extra}`)
    // Each connection wrote its events one transaction after another: they come in id order.
    const byWriter = new Map(committed.map((w) => [w.id, `${w.conn}:${w.worker}`]))
    const lastOf = new Map<string, bigint>()
    for (const e of got) {
      const writer = byWriter.get(e.event_id)
      if (writer === undefined) continue
      const prev = lastOf.get(writer)
      if (prev !== undefined && prev >= BigInt(e.event_id)) problems.push(`${e.event_id} came after ${prev}`)
      lastOf.set(writer, BigInt(e.event_id))
    }
    return problems
  })
