/**
 * The callback dispatcher: POSTs each `callback_outbox` row's payload to its url.
 *
 * Rows are written by `troupe_job_event` in the transaction of the status change, with a
 * NOTIFY on `callbacks:new`. A scoped loop, woken by that NOTIFY, by every reconnect of the
 * listener, by the end of a delivery, at the time the next retry is due, and by a slow poll
 * as a fallback, claims due rows with `FOR UPDATE SKIP LOCKED` and a lock that expires
 * (`locked_until`), so several dispatchers can run at once and a crashed one's rows are
 * taken over after the lock ttl.
 *
 * Guarantees: at-least-once (a request cut short by a crash or a shutdown is sent again,
 * under the same `Idempotency-Key`); in order per job (a job's row is not claimed while an
 * earlier row of that job is neither delivered nor given up); nothing dropped silently (a
 * row that used up its retries keeps `failed_at` and `last_error`, and a warning is logged).
 *
 * Requests go through `@effect/platform`'s `HttpClient` on Node's `http`/`https`, with an
 * agent of the dispatcher's own that closes with its scope. Redirects are not followed: a
 * 3xx is a failed attempt like any other answer that is not a 2xx.
 */
import { HttpClient, HttpClientRequest, type HttpClientResponse } from "@effect/platform"
import { NodeHttpClient } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import {
  Cause,
  Config,
  Context,
  Data,
  Duration,
  Effect,
  Exit,
  Fiber,
  FiberSet,
  Layer,
  Schedule,
  Stream,
  type ConfigError,
  type Scope
} from "effect"
import * as Http from "node:http"
import { describe } from "../db/Database.ts"
import * as Node from "../core/Node.ts"
import { makeFailures, makeWake } from "../core/internal/loop.ts"
import { callbacksChannel } from "../../protocol/Notifications.ts"

/** The default wait before each retry: 10 s, 20 s, 30 s (four attempts in all). */
export const defaultRetryDelays: ReadonlyArray<Duration.Duration> = [
  Duration.seconds(10),
  Duration.seconds(20),
  Duration.seconds(30)
]


/** Options of a dispatcher. */
export interface Options {
  /** Where wake-ups come from: a node (or just its `listen` and `onReconnect`). */
  readonly node: Pick<Node.TroupeNode, "listen" | "onReconnect">
  /** Written to `locked_by` on claimed rows; must be unique among running dispatchers (a node id). */
  readonly nodeId: string
  /** Wait before each retry; one more attempt than delays in all (default 10 s, 20 s, 30 s). */
  readonly retryDelays?: ReadonlyArray<Duration.DurationInput>
  /** How long a request may take, response included (default 10 s). */
  readonly requestTimeout?: Duration.DurationInput
  /** How long a claim holds a row before another dispatcher may take it (default 1 minute; at least the request timeout + 5 s). */
  readonly lockTtl?: Duration.DurationInput
  /** Fallback poll when no NOTIFY arrives (default 5 s). */
  readonly pollInterval?: Duration.DurationInput
  /** Requests in flight at most (default 16). */
  readonly concurrency?: number
  /** How long closing the scope waits for requests in flight before cutting them short (default: the request timeout). */
  readonly shutdownTimeout?: Duration.DurationInput
}

/**
 * Counters of a dispatcher, for tests and operators. Each is counted before the row's new
 * state is written, so a reader who sees a row delivered or given up in `callback_outbox`
 * sees it counted here too.
 */
export interface Stats {
  /** Rows answered with a 2xx by this dispatcher. */
  readonly delivered: number
  /** Attempts that got no 2xx (non-2xx status, network error, timeout). */
  readonly failedAttempts: number
  /** Rows marked `failed_at` after their last retry. */
  readonly gaveUp: number
}

/** A running dispatcher. */
export interface Dispatcher {
  /** Look for due rows now. */
  readonly wake: () => void
  /** Counters since start. */
  readonly stats: () => Stats
}

/** The dispatcher of this process. */
export class CallbackDispatcher extends Context.Tag("troupe/runtime/CallbackDispatcher")<
  CallbackDispatcher,
  Dispatcher
>() {}

/** `TROUPE_CALLBACK_RETRY_DELAYS_MS` (e.g. "10000,20000,30000") and `TROUPE_CALLBACK_TIMEOUT_MS`. */
export const DispatcherConfig = Config.all({
  retryDelays: Config.array(
    Config.integer().pipe(
      Config.validate({ message: "retry delays are milliseconds, 0 or more", validation: (n) => n >= 0 })
    ),
    "TROUPE_CALLBACK_RETRY_DELAYS_MS"
  ).pipe(
    Config.map((ms) => ms.map(Duration.millis)),
    Config.withDefault(defaultRetryDelays)
  ),
  requestTimeout: Config.integer("TROUPE_CALLBACK_TIMEOUT_MS").pipe(
    Config.validate({
      message: "TROUPE_CALLBACK_TIMEOUT_MS must be a positive number of milliseconds",
      validation: (n) => n > 0
    }),
    Config.map(Duration.millis),
    Config.withDefault(Duration.seconds(10))
  )
})

/** Start a dispatcher for the lifetime of the scope, with delays and timeout from `DispatcherConfig`. */
export const makeConfig = (
  options: Omit<Options, "retryDelays" | "requestTimeout">
): Effect.Effect<Dispatcher, ConfigError.ConfigError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.flatMap(DispatcherConfig, (config) => make({ ...options, ...config }))

/** The dispatcher as a layer on the process's node, configured from the environment. */
export const layerConfig = (
  options?: Omit<Options, "retryDelays" | "requestTimeout" | "node" | "nodeId">
): Layer.Layer<CallbackDispatcher, ConfigError.ConfigError, SqlClient.SqlClient | Node.Node> =>
  Layer.scoped(
    CallbackDispatcher,
    Effect.flatMap(Node.Node, (node) => makeConfig({ ...options, node, nodeId: node.id }))
  )

/** Start a dispatcher for the lifetime of the scope. */
export const make = (options: Options): Effect.Effect<Dispatcher, never, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const nodeId = options.nodeId
    const delaysMs = (options.retryDelays ?? defaultRetryDelays).map((d) => Duration.toMillis(d))
    const timeoutMs = Duration.toMillis(options.requestTimeout ?? "10 seconds")
    const lockTtlMs = Math.max(Duration.toMillis(options.lockTtl ?? "1 minute"), timeoutMs + 5_000)
    const pollMs = Duration.toMillis(options.pollInterval ?? "5 seconds")
    const concurrency = Math.max(1, options.concurrency ?? 16)
    const shutdownTimeout = options.shutdownTimeout ?? Duration.millis(timeoutMs)
    const counters = { delivered: 0, failedAttempts: 0, gaveUp: 0 }
    const client = yield* makeClient
    const inflight = new Set<string>()
    let stopping = false

    const wakeLatch = yield* makeWake
    const wake = wakeLatch.signal
    const claimFailures = makeFailures("claiming callbacks", { max: Duration.millis(Math.min(2000, pollMs)) })

    // A result that cannot be written is retried until the lock would expire anyway.
    const retryDb = Schedule.exponential("50 millis").pipe(
      Schedule.union(Schedule.spaced("2 seconds")),
      Schedule.upTo(Duration.millis(lockTtlMs))
    )

    // --- Storage ---

    /** Claim due rows whose job has no earlier pending row, oldest first. */
    const claim = (limit: number) =>
      sql<OutboxRow>`
        WITH due AS (
          SELECT o.id FROM callback_outbox o
          WHERE o.delivered_at IS NULL AND o.failed_at IS NULL
            AND o.next_attempt_at <= now()
            AND (o.locked_until IS NULL OR o.locked_until < now())
            AND o.id <> ALL(${[...inflight]}::bigint[])
            AND NOT EXISTS (
              SELECT 1 FROM callback_outbox e
              WHERE e.job_id = o.job_id AND e.id < o.id AND e.delivered_at IS NULL AND e.failed_at IS NULL)
          ORDER BY o.id
          LIMIT ${limit}
          FOR UPDATE OF o SKIP LOCKED
        )
        UPDATE callback_outbox c
        SET locked_by = ${nodeId}, locked_until = now() + ${lockTtlMs}::float8 * interval '1 millisecond'
        FROM due WHERE c.id = due.id
        RETURNING c.id::text AS id, c.job_id::text AS job_id, c.url, c.payload::text AS body,
                  c.idempotency_key, c.attempts`.pipe(
        // UPDATE … RETURNING gives no order: deliveries start oldest first.
        Effect.map((rows) => [...rows].sort((a, b) => Number(BigInt(a.id) - BigInt(b.id))))
      )

    /** Milliseconds until the next row becomes claimable (null: nothing pending). */
    const nextDueIn = sql<{ ms: number | null }>`
      SELECT (EXTRACT(EPOCH FROM min(GREATEST(o.next_attempt_at, coalesce(o.locked_until, o.next_attempt_at)))
                - now()) * 1000)::float8 AS ms
      FROM callback_outbox o
      WHERE o.delivered_at IS NULL AND o.failed_at IS NULL
        AND o.id <> ALL(${[...inflight]}::bigint[])
        AND NOT EXISTS (
          SELECT 1 FROM callback_outbox e
          WHERE e.job_id = o.job_id AND e.id < o.id AND e.delivered_at IS NULL AND e.failed_at IS NULL)`.pipe(
      Effect.map((rows) => rows[0]?.ms ?? null)
    )

    // A 2xx is a fact whoever holds the lock now: record it regardless (another holder's later
    // failure then matches no row, as the lock is cleared).
    const markDelivered = (row: OutboxRow) =>
      sql`
        UPDATE callback_outbox
        SET delivered_at = now(), attempts = attempts + 1, locked_by = NULL, locked_until = NULL
        WHERE id = ${row.id}::bigint AND delivered_at IS NULL`

    // A failure counts only while this dispatcher still holds the claim it made.
    const markFailed = (row: OutboxRow, error: string, giveUp: boolean, delayMs: number) =>
      sql<{ id: string }>`
        UPDATE callback_outbox
        SET attempts = attempts + 1, last_error = ${error}, locked_by = NULL, locked_until = NULL,
            next_attempt_at = now() + ${delayMs}::float8 * interval '1 millisecond',
            failed_at = CASE WHEN ${giveUp} THEN now() END
        WHERE id = ${row.id}::bigint AND locked_by = ${nodeId} AND attempts = ${row.attempts}
          AND delivered_at IS NULL AND failed_at IS NULL
        RETURNING id::text AS id`

    const releaseLocks = sql`
      UPDATE callback_outbox SET locked_by = NULL, locked_until = NULL
      WHERE locked_by = ${nodeId} AND delivered_at IS NULL AND failed_at IS NULL`

    // --- Delivery ---

    const deliver = (row: OutboxRow) =>
      Effect.gen(function* () {
        const target = safeTarget(row.url)
        const attempt = row.attempts + 1
        const result = yield* Effect.either(post(client, row, attempt, timeoutMs))
        if (result._tag === "Right") {
          counters.delivered++
          yield* markDelivered(row).pipe(Effect.retry(retryDb))
          return
        }
        counters.failedAttempts++
        const error = scrub(result.left.reason, row.url).slice(0, 1000)
        const giveUp = row.attempts >= delaysMs.length
        const delayMs = giveUp ? 0 : delaysMs[row.attempts]!
        if (giveUp) counters.gaveUp++
        const updated = yield* markFailed(row, error, giveUp, delayMs).pipe(
          Effect.retry(retryDb),
          // Counted in advance: taken back when this dispatcher did not mark the row.
          Effect.onExit((exit) =>
            Effect.sync(() => {
              if (giveUp && !(Exit.isSuccess(exit) && exit.value.length > 0)) counters.gaveUp--
            })
          )
        )
        if (updated.length === 0) return
        if (giveUp) {
          yield* Effect.logWarning(
            `callback ${row.idempotency_key} to ${target} given up after ${attempt} attempts: ${error}`
          )
        } else {
          yield* Effect.logDebug(
            `callback ${row.idempotency_key} to ${target}: attempt ${attempt} failed (${error}), retry in ${delayMs} ms`
          )
        }
      }).pipe(
        Effect.catchAllCause((cause) =>
          Cause.isInterruptedOnly(cause)
            ? Effect.void
            : Effect.logWarning(
                `callback ${row.idempotency_key}: recording the result failed, it will be sent again after the lock ttl`,
                cause
              )
        ),
        Effect.ensuring(
          Effect.sync(() => {
            inflight.delete(row.id)
            wake()
          })
        )
      )

    // --- Claim loop ---

    const deliveries = yield* FiberSet.make<void, never>()

    /** One claim; returns how long to wait for a wake-up before the next one. */
    const round: Effect.Effect<number> = Effect.gen(function* () {
      if (stopping) return pollMs
      const room = concurrency - inflight.size
      if (room <= 0) return pollMs // the end of a delivery wakes the loop
      const rows = yield* claim(room)
      for (const row of rows) {
        inflight.add(row.id)
        yield* FiberSet.run(deliveries, deliver(row))
      }
      yield* claimFailures.succeeded
      if (rows.length === room) return 0
      const due = yield* nextDueIn
      // A due row that was not claimed is locked by a claim in progress elsewhere: look again shortly.
      return due === null ? pollMs : Math.min(pollMs, Math.max(10, Math.ceil(due)))
    }).pipe(
      Effect.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause) ? Effect.interrupt : Effect.as(claimFailures.failed(cause), 0)
      )
    )

    const loop = round.pipe(
      Effect.flatMap((waitMs) =>
        waitMs <= 0 ? Effect.void : wakeLatch.awaitAtMost(Duration.millis(waitMs))
      ),
      Effect.catchAllCause((cause) => Effect.logWarning("callback dispatcher", cause)),
      Effect.forever
    )
    const loopFiber = yield* Effect.forkScoped(Effect.interruptible(loop))

    yield* options.node.listen(callbacksChannel, wake)
    yield* options.node.onReconnect(wake)

    // --- Graceful shutdown (runs first: added last) ---

    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        stopping = true
        yield* Fiber.interrupt(loopFiber)
        yield* FiberSet.awaitEmpty(deliveries).pipe(Effect.timeout(shutdownTimeout), Effect.ignore)
        yield* FiberSet.clear(deliveries)
        // Requests cut short go back to the table at once, not after the lock ttl.
        yield* releaseLocks.pipe(Effect.timeout("5 seconds"), Effect.ignore)
      })
    )

    return {
      wake,
      stats: () => ({ ...counters })
    } satisfies Dispatcher
  })

// --- internal ---

/** A claimed `callback_outbox` row. */
interface OutboxRow {
  readonly id: string
  readonly job_id: string
  readonly url: string
  /** The payload as stored (JSON text). */
  readonly body: string
  readonly idempotency_key: string
  /** Attempts made before this one. */
  readonly attempts: number
}

/** An attempt that got no 2xx; `reason` is free of the url's secrets. */
class DeliveryFailed extends Data.TaggedError("DeliveryFailed")<{ readonly reason: string }> {}

/**
 * Node's HTTP client on an agent that closes with the scope. Tracing is off for it: a span
 * would record the url with its query string (where callers put tokens) and add trace
 * headers the callback's receiver never got before.
 */
const makeClient: Effect.Effect<HttpClient.HttpClient, never, Scope.Scope> = NodeHttpClient.make.pipe(
  Effect.provideServiceEffect(NodeHttpClient.HttpAgent, NodeHttpClient.makeAgent()),
  Effect.map(HttpClient.withTracerDisabledWhen(() => true))
)

/** POST the payload; succeeds on a 2xx only. The timeout covers the request and the part of the body read. */
const post = (
  client: HttpClient.HttpClient,
  row: OutboxRow,
  attempt: number,
  timeoutMs: number
): Effect.Effect<void, DeliveryFailed> =>
  Effect.gen(function* () {
    const parsed = parseTarget(row.url)
    if (parsed === undefined) {
      return yield* new DeliveryFailed({ reason: "the callback url is not a valid http(s) url" })
    }
    const headers: Record<string, string> = {
      "Idempotency-Key": row.idempotency_key,
      "X-Troupe-Attempt": String(attempt),
      "User-Agent": "troupe-callbacks"
    }
    // Credentials in the url are sent as Basic auth, and kept out of the url the client sees.
    if (parsed.username !== "" || parsed.password !== "") {
      const user = decodeURIComponent(parsed.username)
      const password = decodeURIComponent(parsed.password)
      headers.Authorization = `Basic ${Buffer.from(`${user}:${password}`).toString("base64")}`
      parsed.username = ""
      parsed.password = ""
    }
    const request = HttpClientRequest.post(parsed).pipe(
      HttpClientRequest.setHeaders(headers),
      HttpClientRequest.bodyText(row.body, "application/json")
    )
    // The scope aborts the request when it closes: a 2xx's body is never read.
    const response = yield* client.pipe(HttpClient.withScope).execute(request)
    if (response.status >= 200 && response.status < 300) return
    const text = yield* readSome(response, 300)
    const statusText = Http.STATUS_CODES[response.status]
    return yield* new DeliveryFailed({
      reason: `HTTP ${response.status}${statusText ? ` ${statusText}` : ""}${
        text ? `: ${text.replace(/\s+/g, " ").trim()}` : ""
      }`
    })
  }).pipe(
    Effect.scoped,
    Effect.catchTags({
      RequestError: (error) =>
        Effect.fail(new DeliveryFailed({ reason: `request failed: ${describe(error.cause ?? error)}` })),
      ResponseError: (error) =>
        Effect.fail(
          new DeliveryFailed({ reason: `reading the response failed: ${describe(error.cause ?? error)}` })
        )
    }),
    Effect.timeoutFail({
      duration: Duration.millis(timeoutMs),
      onTimeout: () => new DeliveryFailed({ reason: `no response within ${timeoutMs} ms` })
    })
  )

/** An http(s) URL, or undefined. */
const parseTarget = (url: string): URL | undefined => {
  try {
    const u = new URL(url)
    return u.protocol === "http:" || u.protocol === "https:" ? u : undefined
  } catch {
    return undefined
  }
}

/** Scheme, host and path of a url: what may be logged (no credentials, no query string). */
const safeTarget = (url: string): string => {
  const u = parseTarget(url)
  return u === undefined ? "(invalid url)" : `${u.protocol}//${u.host}${u.pathname}`
}

/** Replace any copy of the url in an error text by its loggable form. */
const scrub = (text: string, url: string): string => {
  const safe = safeTarget(url)
  let out = text.split(url).join(safe)
  const u = parseTarget(url)
  if (u !== undefined) {
    out = out.split(u.href).join(safe)
    if (u.search) out = out.split(u.search).join("")
    if (u.password) out = out.split(u.password).join("***")
  }
  return out
}

/** The first `max` characters of a response body, without reading the rest ("" if it cannot be read). */
const readSome = (response: HttpClientResponse.HttpClientResponse, max: number): Effect.Effect<string> =>
  response.stream.pipe(
    Stream.decodeText(),
    Stream.runFoldWhile(
      "",
      (text) => text.length < max,
      (text, chunk) => text + chunk
    ),
    Effect.map((text) => text.slice(0, max)),
    Effect.orElseSucceed(() => "")
  )
