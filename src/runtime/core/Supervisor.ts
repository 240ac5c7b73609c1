/**
 * The supervisor of a node's local actors: what a crash (a handler's defect, a behaviour that
 * fails to build) leads to. Within the kind's restart window the actor is restarted after a
 * backoff that doubles per crash; one crash past `maxRestarts` marks it `failed` in the
 * registry, and it answers every message with `ActorFailed` until it is spawned again. Each
 * decision is written to `actor_events` for the inspector.
 */
import { Duration, Effect, type Schedule } from "effect"
import type * as Actor from "./Actor.ts"
import type * as ActorRegistry from "./ActorRegistry.ts"
import type * as MailboxStorage from "./MailboxStorage.ts"
import { ActorFailed } from "../../protocol/Errors.ts"

/** What the supervisor reads and keeps of an actor. */
export interface Supervised {
  readonly id: string
  readonly epoch: number
  readonly def: { readonly restart: Actor.RestartPolicy }
  /** Times of the crashes still inside the restart window. */
  restarts: Array<number> | undefined
  failed: boolean
}

/** What a crash leads to: the n-th restart in the window after a backoff, or failed. */
export type Verdict =
  | { readonly _tag: "Restart"; readonly n: number; readonly backoffMs: number }
  | { readonly _tag: "Fail"; readonly n: number }

/**
 * Decide on a crash at `now`: forget crashes older than the window, count this one, and
 * restart (backoff `minBackoff · 2^(n−1)` up to `maxBackoff`) or, past `maxRestarts`, fail.
 * Returns the crash times to keep with the verdict.
 */
export const decide = (
  policy: Actor.RestartPolicy,
  restarts: ReadonlyArray<number> | undefined,
  now: number
): { readonly restarts: Array<number>; readonly verdict: Verdict } => {
  const windowMs = Duration.toMillis(policy.window)
  const kept = (restarts ?? []).filter((t) => now - t < windowMs)
  kept.push(now)
  const n = kept.length
  if (n > policy.maxRestarts) return { restarts: kept, verdict: { _tag: "Fail", n } }
  const backoffMs = Math.min(
    Duration.toMillis(policy.maxBackoff),
    Duration.toMillis(policy.minBackoff) * 2 ** (n - 1)
  )
  return { restarts: kept, verdict: { _tag: "Restart", n, backoffMs } }
}

/** The answer of an actor marked failed. */
export const failedError = (actorId: string): ActorFailed =>
  new ActorFailed({
    actorId,
    reason: "it crashed past its restart limit and is marked failed; spawn it again to reset"
  })

/** A node's supervisor. */
export interface Supervisor {
  /**
   * Handle a crash of an actor whose activation is already closed: mark it failed, or wait
   * out its backoff (the caller activates it again after).
   */
  readonly crashed: (actor: Supervised, reason: string) => Effect.Effect<void>
  /** Restarts decided so far. */
  readonly restarts: () => number
}

/** Make the supervisor of a node. */
export const make = (options: {
  readonly nodeId: string
  readonly registry: ActorRegistry.ActorRegistry
  readonly storage: MailboxStorage.MailboxStorage
  /** How its writes are retried while the database is away. */
  readonly retry: Schedule.Schedule<unknown>
}): Supervisor => {
  const { nodeId, registry, storage, retry } = options
  let restarts = 0

  const writeEvent = (
    actorId: string,
    eventType: string,
    message: string,
    metadata: Record<string, unknown>
  ) =>
    storage.writeEvent({ actorId, nodeId, eventType, message, metadata }).pipe(
      Effect.retry(retry),
      Effect.catchAllCause((c) => Effect.logWarning("actor event not written", c))
    )

  const crashed = (a: Supervised, reason: string) =>
    Effect.gen(function* () {
      const policy = a.def.restart
      const decided = decide(policy, a.restarts, Date.now())
      a.restarts = decided.restarts
      const verdict = decided.verdict
      const short = reason.split("\n")[0]!.slice(0, 500)
      if (verdict._tag === "Fail") {
        a.failed = true
        yield* registry.markFailed(a.id, nodeId, a.epoch).pipe(
          Effect.retry(retry),
          Effect.catchAllCause((c) => Effect.logError("could not mark actor failed", c))
        )
        yield* writeEvent(
          a.id,
          "actor_failed",
          `crashed ${verdict.n} times within ${Duration.format(policy.window)}: ${short}`,
          { restarts: verdict.n, reason: reason.slice(0, 4000) }
        )
        yield* Effect.logWarning(`marked failed after ${verdict.n} crashes: ${short}`)
        return
      }
      restarts++
      yield* writeEvent(
        a.id,
        "actor_restarted",
        `restart ${verdict.n} in ${verdict.backoffMs} ms: ${short}`,
        {
          restart: verdict.n,
          backoff_ms: verdict.backoffMs,
          reason: reason.slice(0, 4000)
        }
      )
      yield* Effect.sleep(Duration.millis(verdict.backoffMs))
    }).pipe(Effect.annotateLogs({ module: "Supervisor", node: nodeId, actor: a.id }))

  return { crashed, restarts: () => restarts }
}
