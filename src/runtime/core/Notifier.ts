/**
 * LISTEN on a dedicated, direct connection that reconnects.
 *
 * `PgClient.listen` of `@effect/sql-pg` neither reconnects nor reports a reconnect, and a
 * NOTIFY sent while the connection was down is gone for good. So this notifier owns its
 * connection, reconnects with exponential backoff and full jitter, re-issues every LISTEN,
 * and then calls the `onConnect` hooks: that is where a consumer drains what it missed.
 */
import { Deferred, Duration, Effect, Fiber, Random, Redacted, type Scope } from "effect"
import pg from "pg"
import { describe } from "../db/Database.ts"
import { PersistenceError } from "../../protocol/Errors.ts"

/** A running listener; `E` is what its `setup` may fail with. */
export interface Notifier<E = never> {
  /** Subscribe to a channel; the callback runs on every NOTIFY on it. */
  readonly listen: (channel: string, onPayload: (payload: string) => void) => Effect.Effect<void>
  /** Run after every (re)connect, once all LISTENs are in place. Runs at once if connected now. */
  readonly onConnect: (hook: () => void) => Effect.Effect<void>
  /** Resolves once the first connection is listening (fails if `failFast` and the first attempt fails). */
  readonly ready: Effect.Effect<void, PersistenceError | E>
  /** How many times the connection was established. */
  readonly connections: () => number
}

/** Options of a notifier. */
export interface Options<E = never> {
  readonly url: Redacted.Redacted<string>
  /** `application_name` of the session, so operators (and tests) can find it. */
  readonly applicationName: string
  readonly minBackoff?: Duration.DurationInput
  readonly maxBackoff?: Duration.DurationInput
  /** Run on every new connection before the LISTENs (e.g. take an advisory lock); a failure drops the connection. */
  readonly setup?: (client: pg.Client) => Effect.Effect<void, E>
  /** When the first connection fails, fail `ready` instead of retrying quietly. */
  readonly failFast?: boolean
}

/** Start a notifier for the lifetime of the scope. */
export const make = <E = never>(options: Options<E>): Effect.Effect<Notifier<E>, never, Scope.Scope> =>
  Effect.gen(function* () {
    const channels = new Map<string, Set<(payload: string) => void>>()
    const hooks = new Set<() => void>()
    const ready = yield* Deferred.make<void, PersistenceError | E>()
    let client: pg.Client | undefined
    let connected = false
    let connections = 0
    const minMs = Duration.toMillis(options.minBackoff ?? "50 millis")
    const maxMs = Duration.toMillis(options.maxBackoff ?? "5 seconds")

    const deliver = (msg: pg.Notification) => {
      const subs = channels.get(msg.channel)
      if (subs) for (const f of subs) f(msg.payload ?? "")
    }
    // A notification that arrives on a new connection before its `onConnect` hooks have run
    // is held back until they have: a consumer sees "reconnected" before anything sent after
    // the gap (a receiver that takes notifications as a complete, ordered record relies on it).
    let held: Array<pg.Notification> | undefined
    const dispatch = (msg: pg.Notification) => {
      if (held) held.push(msg)
      else deliver(msg)
    }

    const listenSql = (c: pg.Client, channel: string) => c.query(`LISTEN ${c.escapeIdentifier(channel)}`)

    // One connection's life: connect, LISTEN, run hooks, wait for it to break.
    const session = Effect.gen(function* () {
      const lost = yield* Deferred.make<void>()
      held = []
      const c = new pg.Client({
        connectionString: Redacted.value(options.url),
        application_name: options.applicationName,
        keepAlive: true,
        connectionTimeoutMillis: 5_000
      })
      c.on("error", () => Deferred.unsafeDone(lost, Effect.void))
      c.on("end", () => Deferred.unsafeDone(lost, Effect.void))
      c.on("notification", dispatch)
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          connected = false
          if (client === c) client = undefined
          c.removeAllListeners("notification")
        }).pipe(Effect.zipRight(Effect.promise(() => c.end().catch(() => undefined))))
      )
      yield* Effect.gen(function* () {
        yield* Effect.tryPromise({ try: () => c.connect(), catch: persistence })
        if (options.setup) yield* options.setup(c)
        client = c
        yield* Effect.tryPromise({
          try: async () => {
            for (const channel of channels.keys()) await listenSql(c, channel)
          },
          catch: persistence
        })
      }).pipe(
        Effect.tapError((error) =>
          connections === 0 && options.failFast ? Deferred.fail(ready, error) : Effect.void
        )
      )
      connected = true
      connections++
      for (const hook of hooks) hook()
      const early = held
      held = undefined
      for (const msg of early) deliver(msg)
      yield* Deferred.succeed(ready, undefined)
      yield* Deferred.await(lost)
    }).pipe(Effect.scoped)

    const loop = Effect.gen(function* () {
      let attempt = 0
      while (true) {
        const before = connections
        yield* Effect.exit(session)
        if (connections > before) attempt = 0
        const cap = Math.min(maxMs, minMs * 2 ** attempt)
        attempt++
        const delay = Math.round((yield* Random.next) * cap)
        if (connections === before && attempt > 1) {
          yield* Effect.logDebug(`reconnecting in ${delay} ms (attempt ${attempt})`)
        }
        yield* Effect.sleep(Duration.millis(delay))
      }
    }).pipe(Effect.annotateLogs({ module: "Notifier", listener: options.applicationName }))
    const fiber = yield* Effect.forkScoped(Effect.interruptible(loop))
    yield* Effect.addFinalizer(() => Fiber.interrupt(fiber))

    return {
      listen: (channel, onPayload) =>
        Effect.gen(function* () {
          let subs = channels.get(channel)
          if (!subs) {
            subs = new Set()
            channels.set(channel, subs)
            const c = client
            if (c) yield* Effect.promise(() => listenSql(c, channel).catch(() => undefined))
          }
          subs.add(onPayload)
        }),
      onConnect: (hook) =>
        Effect.sync(() => {
          hooks.add(hook)
          if (connected) hook()
        }),
      ready: Deferred.await(ready),
      connections: () => connections
    } satisfies Notifier<E>
  })

// --- internal ---

const persistence = (error: unknown) => new PersistenceError({ reason: describe(error) })
