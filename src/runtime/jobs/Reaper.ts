/**
 * The reaper: one per database at a time (a `Singleton` on the `reaper` lease), it settles the
 * jobs of workers that are gone and of attempts past their deadline. A node's session
 * advisory lock disappears the moment its process dies, so a SIGKILLed worker's jobs are
 * requeued (or failed, for `strict`) within one reaper period; a stale heartbeat is the
 * fallback for a partitioned node that still holds its lock.
 */
import type { SqlClient } from "@effect/sql"
import { Duration, Effect, type Scope } from "effect"
import * as JobStorage from "./JobStorage.ts"
import * as WorkerStorage from "./WorkerStorage.ts"
import * as Singleton from "../core/Singleton.ts"

/** Options of the reaper. */
export interface Options {
  readonly nodeId: string
  /** How often it looks (default 250 ms): the bound on failover detection. */
  readonly interval?: Duration.DurationInput
  /** A node whose heartbeat is older than this is dead even if it holds its lock (default 30 s). */
  readonly staleAfter?: Duration.DurationInput
  /** Grace past a job's deadline before the reaper (not its own worker) times it out (default 5 s). */
  readonly timeoutGrace?: Duration.DurationInput
  /** Backoff before a requeued job may run again: base × 2^(attempt − 1), capped (250 ms, 30 s). */
  readonly backoffBase?: Duration.DurationInput
  readonly backoffMax?: Duration.DurationInput
  /** How long the lease lasts without renewal (default 5 s). */
  readonly leaseTtl?: Duration.DurationInput
}

/** Counters of the reaper. */
export interface Reaper {
  readonly stats: () => {
    readonly rounds: number
    readonly requeued: number
    readonly failed: number
    readonly workersOffline: number
  }
  readonly holdsLease: () => boolean
}

/** Run the reaper for the lifetime of the scope. */
export const make = (options: Options): Effect.Effect<Reaper, never, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const storage = yield* JobStorage.make()
    const workers = yield* WorkerStorage.make
    const interval = Duration.decode(options.interval ?? "250 millis")
    const staleSeconds = Duration.toSeconds(options.staleAfter ?? "30 seconds")
    const graceSeconds = Duration.toSeconds(options.timeoutGrace ?? "5 seconds")
    const backoffBaseMs = Duration.toMillis(options.backoffBase ?? "250 millis")
    const backoffMaxMs = Duration.toMillis(options.backoffMax ?? "30 seconds")
    const counters = { rounds: 0, requeued: 0, failed: 0, workersOffline: 0 }

    const round = Effect.gen(function* () {
      counters.rounds++
      const reaped = yield* storage.reap({ staleSeconds, graceSeconds, backoffBaseMs, backoffMaxMs })
      for (const r of reaped) {
        if (r.status === "queued") {
          counters.requeued++
          yield* JobStorage.wakeLater(storage, r.run_in_ms)
        } else counters.failed++
      }
      const offline = yield* workers.reap(staleSeconds)
      yield* storage.closeTarget(offline, "went offline")
      const stranded = yield* storage.closeOfflineTargets
      counters.failed += stranded.length
      counters.workersOffline += offline.length
      if (reaped.length > 0 || offline.length > 0) {
        yield* Effect.logInfo(
          `${reaped.filter((r) => r.status === "queued").length} requeued, ${reaped.filter((r) => r.status === "failed").length} failed, ${offline.length} workers offline`
        )
      }
    })

    // The lease is renewed as often as the reaper looks: taking over from a dead holder is
    // bounded by one period, as reaping is.
    const lease = yield* Singleton.make(
      "reaper",
      round.pipe(
        Effect.catchAllCause((cause) => Effect.logWarning("reaper round failed", cause)),
        Effect.zipRight(Effect.sleep(interval)),
        Effect.forever,
        Effect.annotateLogs({ module: "Reaper", node: options.nodeId })
      ),
      { holder: options.nodeId, ttl: options.leaseTtl ?? "5 seconds", renewEvery: interval }
    )
    return { stats: () => ({ ...counters }), holdsLease: lease.holds }
  })
