/**
 * The event stream behind the gateway's `subscribe` and `job.events`: the rows of
 * `gh_job_events` and `gh_worker_events`, replayed from the tables and then live, with no gap
 * and no duplicate, also across a reconnect.
 *
 * Ids come from a sequence, so concurrent transactions commit out of id order: a reader that
 * tails by `id > last` skips a row with a smaller id that commits later. Every row therefore
 * carries the id of the transaction that wrote it (`xid`, migration 4), and the stream is
 * ordered by `(xid, id)` and read only below a watermark, the `xmin` of the reading
 * statement's snapshot: every transaction below it has ended, so no row can appear below it
 * later. An event id names a position `(xid, id)`; resuming after it replays everything at
 * a greater position.
 *
 * One tail per node reads the new rows once per wake-up and fans them out in-process to the
 * local subscriptions, indexed by job, `valet_task_id` and worker. It wakes on NOTIFY
 * `events:new` (a statement trigger on both tables), on every reconnect of the node's
 * listener, on a slow poll, and soon again (a few ms, backing off) while committed rows wait
 * above the watermark for an older transaction to end.
 */
import { SqlClient } from "@effect/sql"
import { Context, Deferred, Duration, Effect, Exit, Layer, Schema, type Scope } from "effect"
import { EventId, type EventRecord } from "../../protocol/Edge.ts"
import { PersistenceError } from "../../protocol/Errors.ts"
import { InvalidRequest, isJobId, NotFound } from "../../protocol/Jobs.ts"
import { makeWake, pollEvery } from "../core/internal/loop.ts"
import { refail } from "../db/Persistence.ts"
import { runHot } from "../db/PreparedPool.ts"
import { Node, type TroupeNode } from "../core/Node.ts"
import { eventsChannel } from "../../protocol/Notifications.ts"


/** Which events a subscription gets. */
export type EventFilter =
  | { readonly job_id: string }
  | { readonly valet_task_id: string }
  | { readonly worker_id: string }
  | { readonly all: true }

/** A subscription: how many events its replay delivered, and how to end it. */
export interface Subscription {
  readonly replayed: number
  /**
   * Where the subscription starts: an event id to resume from (`sinceEventId`) if no event
   * reaches the subscriber before it has to reconnect. `"0"` is the start of the stream.
   */
  readonly position: string
  readonly unsubscribe: Effect.Effect<void>
}

/** Counters of a stream, for tests, benchmarks and operators. */
export interface Stats {
  /** Subscriptions open now. */
  readonly subscriptions: number
  /** Reads of the tail since start. */
  readonly reads: number
  /** Events the tail has read since start (each once, whatever the number of subscribers). */
  readonly events: number
}

/** The event stream of a node. */
export interface EventStream {
  /** Replay what matches `filter` after `sinceEventId` (when given), then live, in stream order, each event once. `onEvent` is called synchronously, in order, from one fiber. */
  readonly subscribe: (
    filter: EventFilter,
    options: { readonly sinceEventId?: string; readonly onEvent: (event: EventRecord) => void }
  ) => Effect.Effect<Subscription, NotFound | PersistenceError>
  /** A job's events after `sinceEventId`, oldest first (stream order), at most `limit` (default 1000). */
  readonly history: (
    jobId: string,
    options?: { readonly sinceEventId?: string; readonly limit?: number }
  ) => Effect.Effect<ReadonlyArray<EventRecord>, NotFound | InvalidRequest | PersistenceError>
  readonly stats: () => Stats
}

/** Options of a stream (the defaults suit a gateway). */
export interface Options {
  /** Fallback poll when no NOTIFY arrives (default 1 s). */
  readonly pollInterval?: Duration.DurationInput
  /** Rows per query of a replay (default 500). */
  readonly replayPage?: number
  /** Rows per read of the tail at most (default 1000); a full read is followed by another at once. */
  readonly tailBatch?: number
  /** The longest wait between re-reads while rows wait above the watermark (default 50 ms). */
  readonly maxHoldBackoff?: Duration.DurationInput
}

/** The event stream of this process's node. */
export class Events extends Context.Tag("troupe/runtime/jobs/EventStream")<Events, EventStream>() {}

/** The event stream on this process's node, for the layer's lifetime. */
export const layer = (options: Options = {}): Layer.Layer<Events, never, Node | SqlClient.SqlClient> =>
  Layer.scoped(Events, Effect.flatMap(Node, (node) => make(node, options)))

/** Start the stream of a node for the lifetime of the scope. */
export const make = (
  node: TroupeNode,
  options: Options = {}
): Effect.Effect<EventStream, never, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const hot = runHot(node.prepared)
    const pollMs = Duration.toMillis(options.pollInterval ?? "1 second")
    const replayPage = Math.max(1, options.replayPage ?? 500)
    const tailBatch = Math.max(1, options.tailBatch ?? 1000)
    const maxHoldMs = Duration.toMillis(options.maxHoldBackoff ?? "50 millis")

    // --- Statements ---

    // The worker a job event is about: the one it names (every event a worker writes names
    // it), else the job's. Not the job's current worker first: a requeued job's earlier events
    // stay with the worker that ran that attempt, so replay and live agree.
    const jobWorker = sql.literal(`coalesce(
        CASE WHEN jsonb_typeof(e.metadata->'worker_id') = 'string' THEN e.metadata->>'worker_id' END,
        e.actor, j.worker_id)`)

    const jobEvents = sql`SELECT 'job' AS source, e.xid AS x, e.id AS n, e.job_id::text AS job_id,
        ${jobWorker} AS worker_id, j.valet_task_id, e.event_type,
        e.message, e.actor, e.metadata, e.created_at
      FROM gh_job_events e LEFT JOIN gh_automation_jobs j ON j.id = e.job_id`
    const workerEvents = sql`SELECT 'worker' AS source, e.xid AS x, e.id AS n, NULL::text AS job_id, e.worker_id,
        NULL::text AS valet_task_id, e.event_type, e.message, NULL::text AS actor, e.metadata, e.created_at
      FROM gh_worker_events e`
    const columns = sql`ev.source, ev.x::text AS xid, ev.n::text AS id, ev.job_id, ev.worker_id, ev.valet_task_id,
      ev.event_type, ev.message, ev.actor, ev.metadata, ev.created_at`

    /** The watermark now: every transaction below it has ended. */
    const watermark = sql<{
      w: string
    }>`SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS w`.withoutTransform.pipe(
      Effect.map((rows) => BigInt(rows[0]!.w))
    )

    /**
     * The tail's read: the rows after `from` and below the watermark of this statement, in
     * stream order, with the watermark and whether committed rows wait above it.
     */
    const readTail = (from: Position) =>
      hot(
        "troupe_events_tail",
        sql<Row & { w: string; pending: boolean }>`
      WITH s AS MATERIALIZED (
        SELECT w, EXISTS (SELECT 1 FROM gh_job_events WHERE xid >= w)
                  OR EXISTS (SELECT 1 FROM gh_worker_events WHERE xid >= w) AS pending
        FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS w) t
      ),
      ev AS (
        (${jobEvents} WHERE (e.xid, e.id) > (${String(from.xid)}::xid8, ${String(from.id)}::bigint)
           AND e.xid < (SELECT w FROM s) ORDER BY e.xid, e.id LIMIT ${tailBatch}::int)
        UNION ALL
        (${workerEvents} WHERE (e.xid, e.id) > (${String(from.xid)}::xid8, ${String(from.id)}::bigint)
           AND e.xid < (SELECT w FROM s) ORDER BY e.xid, e.id LIMIT ${tailBatch}::int)
      )
      SELECT s.w::text AS w, s.pending, ${columns}
      FROM s LEFT JOIN (SELECT * FROM ev ORDER BY x, n LIMIT ${tailBatch}::int) ev ON true
      ORDER BY ev.x, ev.n`
      )

    /**
     * A page of the rows that match `filter` after `from`, up to `to` (inclusive) or, without
     * it, below the watermark of this statement; in stream order.
     */
    const readPage = (filter: Key, from: Position, to: Position | undefined, limit: number) => {
      const range = sql`(e.xid, e.id) > (${String(from.xid)}::xid8, ${String(from.id)}::bigint) AND ${
        to === undefined
          ? sql`e.xid < (SELECT w FROM s)`
          : sql`(e.xid, e.id) <= (${String(to.xid)}::xid8, ${String(to.id)}::bigint)`
      }`
      const jobWhere =
        filter.kind === "job"
          ? sql`e.job_id = ${filter.value}::uuid`
          : filter.kind === "task"
            ? sql`e.job_id IN (SELECT id FROM gh_automation_jobs WHERE valet_task_id = ${filter.value}::text)`
            : filter.kind === "worker"
              ? sql`${jobWorker} = ${filter.value}::text`
              : sql`true`
      const jobBranch = sql`(${jobEvents} WHERE ${range} AND ${jobWhere} ORDER BY e.xid, e.id LIMIT ${limit}::int)`
      const union =
        filter.kind === "worker" || filter.kind === "all"
          ? sql`${jobBranch} UNION ALL (${workerEvents} WHERE ${range} AND ${
              filter.kind === "worker" ? sql`e.worker_id = ${filter.value}::text` : sql`true`
            } ORDER BY e.xid, e.id LIMIT ${limit}::int)`
          : jobBranch
      return sql<Row>`
      WITH s AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS w)
      SELECT ${columns} FROM (${union}) ev ORDER BY ev.x, ev.n LIMIT ${limit}::int`.withoutTransform
    }

    /** Where an event id is in the stream, or NotFound. */
    const positionOf = (eventId: string) =>
      (eventId === "0"
        ? Effect.succeed([{ xid: "0", id: "0" }])
        : Schema.is(EventId)(eventId) && BigInt(eventId) <= maxBigint
          ? sql<{ xid: string; id: string }>`
            SELECT xid::text AS xid, id::text AS id FROM gh_job_events WHERE id = ${eventId}::bigint
            UNION ALL SELECT xid::text, id::text FROM gh_worker_events WHERE id = ${eventId}::bigint
            LIMIT 1`.withoutTransform.pipe(refail)
          : Effect.succeed([])
      ).pipe(
        Effect.flatMap((rows) =>
          rows[0] === undefined
            ? Effect.fail(new NotFound({ what: "event", id: eventId.slice(0, 80) }))
            : Effect.succeed<Position>({ xid: BigInt(rows[0].xid), id: BigInt(rows[0].id) })
        )
      )

    /** The id of the last event at or before a position ("0" when there is none). */
    const eventAtOrBefore = (at: Position) =>
      sql<{ id: string }>`
        SELECT id::text AS id FROM (
          (SELECT xid, id FROM gh_job_events WHERE (xid, id) <= (${at.xid.toString()}::xid8, ${at.id.toString()}::bigint)
            ORDER BY xid DESC, id DESC LIMIT 1)
          UNION ALL
          (SELECT xid, id FROM gh_worker_events WHERE (xid, id) <= (${at.xid.toString()}::xid8, ${at.id.toString()}::bigint)
            ORDER BY xid DESC, id DESC LIMIT 1)
        ) e ORDER BY xid DESC, id DESC LIMIT 1`.withoutTransform.pipe(
        Effect.map((rows) => rows[0]?.id ?? "0"),
        refail
      )

    // --- Subscriptions ---

    const byJob = new Map<string, Set<Sub>>()
    const byTask = new Map<string, Set<Sub>>()
    const byWorker = new Map<string, Set<Sub>>()
    const all = new Set<Sub>()
    /** Subscriptions no event can match (a job id that is not a uuid). */
    const nowhere = new Map<string, Set<Sub>>()
    let count = 0
    /** Bumped on every registration: the tail's cheap read (no subscribers) checks it. */
    let registrations = 0
    const counters = { reads: 0, events: 0 }
    const failures: Array<unknown> = []

    const indexOf = (key: Key) =>
      key.kind === "job"
        ? byJob
        : key.kind === "task"
          ? byTask
          : key.kind === "worker"
            ? byWorker
            : key.kind === "never"
              ? nowhere
              : undefined

    const add = (sub: Sub) => {
      const index = indexOf(sub.key)
      if (index === undefined) all.add(sub)
      else {
        let set = index.get(sub.key.value)
        if (set === undefined) {
          set = new Set()
          index.set(sub.key.value, set)
        }
        set.add(sub)
      }
      count++
      registrations++
    }

    const remove = (sub: Sub) => {
      if (sub.state === "closed") return
      sub.state = "closed"
      sub.buffer = []
      const index = indexOf(sub.key)
      if (index === undefined) all.delete(sub)
      else {
        const set = index.get(sub.key.value)
        if (set !== undefined) {
          set.delete(sub)
          if (set.size === 0) index.delete(sub.key.value)
        }
      }
      count--
    }

    const call = (sub: Sub, item: Item) => {
      try {
        sub.onEvent(item.record)
      } catch (error) {
        failures.push(error)
      }
    }

    const offer = (sub: Sub, item: Item) => {
      if (sub.state === "live") {
        if (sub.floor !== undefined) {
          if (!isAfter(item.pos, sub.floor)) return
          sub.floor = undefined
        }
        call(sub, item)
      } else if (sub.state === "buffering") sub.buffer.push(item)
    }

    const visit = (set: Set<Sub> | undefined, item: Item) => {
      if (set !== undefined) for (const sub of set) offer(sub, item)
    }

    const fanOut = (item: Item) => {
      const r = item.record
      if (r.job_id !== null) visit(byJob.get(r.job_id), item)
      if (r.valet_task_id !== null) visit(byTask.get(r.valet_task_id), item)
      if (r.worker_id !== null) visit(byWorker.get(r.worker_id), item)
      if (all.size > 0) visit(all, item)
    }

    const logFailures = Effect.suspend(() => {
      if (failures.length === 0) return Effect.void
      const first = failures[0]
      const n = failures.length
      failures.length = 0
      return Effect.logWarning(`event stream: ${n} event handler(s) threw`, first)
    })

    // --- Tail ---

    /** Everything at or below this position has been fanned out (undefined until the first read). */
    let cursor: Position | undefined
    const ready = yield* Deferred.make<void>()
    let holdMs = 0
    let errors = 0

    /** One read; returns how long to wait for a wake-up before the next one. */
    const step = Effect.gen(function* () {
      if (cursor === undefined) {
        const w = yield* watermark
        cursor = { xid: w, id: 0n }
        Deferred.unsafeDone(ready, Exit.void)
        return pollMs
      }
      counters.reads++
      if (count === 0) {
        // Nobody to tell: only move the position to the watermark, so a new subscription
        // does not start far behind.
        const before = registrations
        const w = yield* watermark
        if (count !== 0 || registrations !== before) return 0
        if (w > cursor.xid) cursor = { xid: w, id: 0n }
        return pollMs
      }
      const from: Position = cursor
      const rows = yield* readTail(from)
      // From here to the end, nothing yields: fanning out and moving the position happen
      // together, so a subscription registers either before or after the whole read.
      const head = rows[0]!
      const w = BigInt(head.w)
      let last = from
      let n = 0
      for (const row of rows) {
        if (row.id === null) continue
        const item = toItem(row)
        fanOut(item)
        last = item.pos
        n++
      }
      counters.events += n
      if (n >= tailBatch) {
        cursor = last
        return 0
      }
      cursor = w > from.xid ? { xid: w, id: 0n } : from
      if (head.pending) {
        holdMs = Math.min(maxHoldMs, Math.max(1, holdMs * 2))
        return holdMs
      }
      holdMs = 0
      return pollMs
    }).pipe(
      Effect.tap(() => {
        errors = 0
        return logFailures
      }),
      Effect.catchAllCause((cause) =>
        Effect.as(
          Effect.logWarning("event stream: reading new events failed; retrying", cause),
          Math.min(pollMs, 20 * 2 ** Math.min(errors++, 6))
        )
      )
    )

    const wakeLatch = yield* makeWake
    const wake = wakeLatch.signal
    const loop = step.pipe(
      Effect.flatMap((waitMs) =>
        waitMs <= 0 ? Effect.void : waitMs >= pollMs ? wakeLatch.await : wakeLatch.awaitAtMost(Duration.millis(waitMs))
      ),
      Effect.catchAllCause((cause) => Effect.logWarning("event stream", cause)),
      Effect.forever
    )
    yield* Effect.forkScoped(Effect.interruptible(loop))
    // The fallback poll: a timer of its own, not a timeout around every wait.
    yield* pollEvery(wakeLatch, Duration.millis(pollMs))
    yield* node.listen(eventsChannel, wake)
    yield* node.onReconnect(wake)

    const awaitReady = Deferred.await(ready).pipe(
      Effect.timeoutFail({
        duration: "10 seconds",
        onTimeout: () =>
          new PersistenceError({
            reason: "the event stream has not reached the database yet; try again shortly"
          })
      })
    )

    // --- API ---

    const subscribe: EventStream["subscribe"] = (filter, subscribeOptions) =>
      Effect.gen(function* () {
        const key = keyOf(filter)
        const since =
          subscribeOptions.sinceEventId === undefined
            ? undefined
            : yield* positionOf(subscribeOptions.sinceEventId)
        yield* awaitReady
        const sub: Sub = {
          key,
          onEvent: subscribeOptions.onEvent,
          state: "live",
          buffer: [],
          floor: undefined
        }
        const unsubscribe = Effect.sync(() => remove(sub))
        if (since === undefined) {
          add(sub)
          // Live from the tail's position: everything after it reaches the subscriber.
          const at = cursor!
          const position = yield* eventAtOrBefore(at).pipe(
            Effect.tapError(() => Effect.sync(() => remove(sub)))
          )
          return { replayed: 0, position, unsubscribe }
        }
        // Buffer what the tail reads from now on; replay up to where it is now.
        sub.state = "buffering"
        add(sub)
        const upTo = cursor!
        return yield* Effect.gen(function* () {
          let replayed = 0
          let floor = since
          if (key.kind !== "never" && isAfter(upTo, since)) {
            while (true) {
              const rows = yield* readPage(key, floor, upTo, replayPage).pipe(refail)
              for (const row of rows) {
                const item = toItem(row)
                call(sub, item)
                floor = item.pos
                replayed++
              }
              if (rows.length < replayPage) break
            }
          }
          // Then what the tail buffered meanwhile, past what was replayed; then live.
          const buffered = sub.buffer
          sub.buffer = []
          for (const item of buffered) {
            if (!isAfter(item.pos, floor)) continue
            call(sub, item)
            floor = item.pos
          }
          sub.state = "live"
          // The tail only hands over rows after its position: past it, no check is needed.
          sub.floor = isAfter(floor, cursor!) ? floor : undefined
          yield* logFailures
          return { replayed, position: subscribeOptions.sinceEventId!, unsubscribe }
        }).pipe(
          Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : Effect.sync(() => remove(sub))))
        )
      })

    const history: EventStream["history"] = (jobId, historyOptions) =>
      Effect.gen(function* () {
        if (!isJobId(jobId)) {
          return yield* new InvalidRequest({ reason: `job id "${jobId.slice(0, 80)}" is not a uuid` })
        }
        const limit = historyOptions?.limit ?? 1000
        if (!Number.isInteger(limit) || limit < 1) {
          return yield* new InvalidRequest({
            reason: `limit must be a whole number of 1 or more, not ${limit}`
          })
        }
        const id = jobId.toLowerCase()
        const exists =
          yield* sql`SELECT 1 FROM gh_automation_jobs WHERE id = ${id}::uuid`.withoutTransform.pipe(
            refail
          )
        if (exists.length === 0) return yield* new NotFound({ what: "job", id })
        const since =
          historyOptions?.sinceEventId === undefined
            ? { xid: 0n, id: 0n }
            : yield* positionOf(historyOptions.sinceEventId)
        const rows = yield* readPage(
          { kind: "job", value: id },
          since,
          undefined,
          Math.min(limit, 10_000)
        ).pipe(refail)
        return rows.map((row) => toItem(row).record)
      })

    return {
      subscribe,
      history,
      stats: () => ({ subscriptions: count, reads: counters.reads, events: counters.events })
    } satisfies EventStream
  })

// --- internal ---

/** A place in the stream: the writing transaction, then the event id. */
interface Position {
  readonly xid: bigint
  readonly id: bigint
}

const isAfter = (a: Position, b: Position) => a.xid > b.xid || (a.xid === b.xid && a.id > b.id)

interface Item {
  readonly pos: Position
  readonly record: EventRecord
}

/** A filter as an index key; `never` for a job id that is not a uuid (no event can match). */
type Key =
  | { readonly kind: "job" | "task" | "worker"; readonly value: string }
  | { readonly kind: "all" | "never"; readonly value: "" }

interface Sub {
  readonly key: Key
  readonly onEvent: (event: EventRecord) => void
  state: "buffering" | "live" | "closed"
  /** What the tail read while the replay ran. */
  buffer: Array<Item>
  /** While set, live events at or before it were already delivered (a resume from ahead of the tail). */
  floor: Position | undefined
}

/** A row of either table as the statements select it. */
interface Row {
  readonly source: "job" | "worker"
  readonly xid: string
  readonly id: string
  readonly job_id: string | null
  readonly worker_id: string | null
  readonly valet_task_id: string | null
  readonly event_type: string
  readonly message: string | null
  readonly actor: string | null
  readonly metadata: unknown
  readonly created_at: Date | string
}

const toItem = (row: Row): Item => ({
  pos: { xid: BigInt(row.xid), id: BigInt(row.id) },
  record: {
    event_id: row.id,
    source: row.source,
    job_id: row.job_id,
    worker_id: row.worker_id,
    valet_task_id: row.valet_task_id,
    event_type: row.event_type,
    message: row.message,
    actor: row.actor,
    metadata: row.metadata,
    created_at: (row.created_at instanceof Date ? row.created_at : new Date(row.created_at)).toISOString()
  }
})

const keyOf = (filter: EventFilter): Key =>
  "job_id" in filter
    ? isJobId(filter.job_id)
      ? { kind: "job", value: filter.job_id.toLowerCase() }
      : { kind: "never", value: "" }
    : "valet_task_id" in filter
      ? { kind: "task", value: filter.valet_task_id }
      : "worker_id" in filter
        ? { kind: "worker", value: filter.worker_id }
        : { kind: "all", value: "" }


const maxBigint = 9_223_372_036_854_775_807n
