/**
 * A singleton: an effect that runs on one node of the cluster at a time, the holder of a
 * named lease in `leases` (as `Singleton.make` in Effect cluster, with a lease row instead
 * of shards). Every node that starts it competes for the lease; the holder renews it, and it
 * passes on when it expires or at once when its holder's node is dead (its session advisory
 * lock gone). The effect is started when the lease is taken and interrupted when it is lost,
 * or when a renewal has failed for as long as the lease lasts.
 */
import { SqlClient } from "@effect/sql"
import { Cause, Duration, Effect, Exit, Fiber, type Scope } from "effect"
import { refail } from "../db/Persistence.ts"
import { makeFailures } from "./internal/loop.ts"
import { aliveSql } from "./NodeMembership.ts"

/** Options of a singleton. */
export interface Options {
  /** Who competes for the lease: the node id. */
  readonly holder: string
  /** How long the lease lasts without renewal (default 5 s). */
  readonly ttl?: Duration.DurationInput
  /** How often the holder renews it and the others try to take it (default 1 s). */
  readonly renewEvery?: Duration.DurationInput
}

/** A running singleton. */
export interface Singleton {
  /** This node holds the lease now (and runs the effect). */
  readonly holds: () => boolean
}

/**
 * Run `run` on whichever node holds the lease `name`, for the lifetime of the scope. A `run`
 * that ends (or fails, which is logged) is started again at the next renewal while the
 * lease is held. On close, the effect is interrupted and the lease given up.
 */
export const make = <E, R>(
  name: string,
  run: Effect.Effect<void, E, R>,
  options: Options
): Effect.Effect<Singleton, never, SqlClient.SqlClient | Scope.Scope | Exclude<R, Scope.Scope>> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const holder = options.holder
    const ttl = Duration.decode(options.ttl ?? "5 seconds")
    const ttlSeconds = Duration.toSeconds(ttl)
    const ttlMillis = Duration.toMillis(ttl)
    const renewEvery = Duration.decode(options.renewEvery ?? "1 second")
    const failures = makeFailures(`renewing the lease "${name}"`)
    let fiber: Fiber.RuntimeFiber<void, E> | undefined
    // Until when the lease is ours for sure, on this process's clock: the last renewal's start + ttl.
    let heldUntil = 0

    const acquire = refail(
      sql<{ holder: string }>`
        INSERT INTO leases (name, holder, expires_at) VALUES (${name}, ${holder}, now() + make_interval(secs => ${ttlSeconds}))
        ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
        WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now()
           OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = leases.holder AND n.status = 'running' AND ${sql.literal(aliveSql)})
        RETURNING holder`
    ).pipe(Effect.map((rows) => rows.length > 0))

    const stopRun = Effect.suspend(() => {
      const f = fiber
      fiber = undefined
      return f ? Fiber.interrupt(f) : Effect.void
    })

    const tick = Effect.gen(function* () {
      const startedAt = performance.now()
      const renewed = yield* acquire.pipe(
        Effect.zipLeft(failures.succeeded),
        Effect.catchAll((e) => Effect.as(failures.failed(e), undefined))
      )
      if (renewed === true) heldUntil = startedAt + ttlMillis
      if (renewed === false || performance.now() >= heldUntil) {
        heldUntil = 0
        return yield* stopRun
      }
      const ended = fiber?.unsafePoll()
      if (ended) {
        fiber = undefined
        // Interrupted only: its scope is closing (this tick is the last), not a failure to report.
        if (Exit.isFailure(ended) && !Cause.isInterruptedOnly(ended.cause))
          yield* Effect.logWarning("singleton ended with a failure; starting it again", ended.cause)
      }
      if (fiber === undefined) fiber = yield* Effect.forkScoped(Effect.scoped(run))
    })

    yield* Effect.addFinalizer(() =>
      Effect.zipRight(
        stopRun,
        sql`DELETE FROM leases WHERE name = ${name} AND holder = ${holder}`.pipe(
          Effect.timeout("2 seconds"),
          Effect.ignore
        )
      )
    )
    yield* tick.pipe(
      Effect.zipRight(Effect.sleep(renewEvery)),
      Effect.forever,
      Effect.interruptible,
      Effect.annotateLogs({ module: "Singleton", singleton: name, node: holder }),
      Effect.forkScoped
    )

    return { holds: () => fiber !== undefined && performance.now() < heldUntil } satisfies Singleton
  })
