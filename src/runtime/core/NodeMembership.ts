/**
 * A node's row in `nodes` and its liveness: a session advisory lock held on a dedicated,
 * direct connection for the node's lifetime (so a node whose database session is gone is
 * known dead at once), and a heartbeat as the fallback for partitions.
 */
import { SqlClient } from "@effect/sql"
import { Data, Duration, Effect, type Redacted, Schedule, type Scope } from "effect"
import * as Crypto from "node:crypto"
import * as Os from "node:os"
import { describe } from "../db/Database.ts"
import { refail } from "../db/Persistence.ts"
import * as Notifier from "./Notifier.ts"
import { PersistenceError } from "../../protocol/Errors.ts"

/** Another live process already runs a node with this id. */
export class NodeIdInUse extends Data.TaggedError("NodeIdInUse")<{ readonly nodeId: string }> {
  override get message() {
    return `a node with id "${this.nodeId}" is already running against this database: give this one another TROUPE_NODE_ID`
  }
}

/** The advisory lock key of a node id (positive, 62 bits). */
export const lockKey = (nodeId: string): bigint =>
  Crypto.createHash("sha256").update(`troupe:node:${nodeId}`).digest().readBigUInt64BE(0) &
  0x3fff_ffff_ffff_ffffn

/** SQL predicate: the node row `n` holds its lock, i.e. the node is alive. */
export const aliveSql = `EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
  AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = n.lock_key)`

/** Register the node, take its lock and heartbeat, for the lifetime of the scope. */
export const make = (options: {
  readonly nodeId: string
  readonly role: string
  readonly address: string | null
  readonly directUrl: Redacted.Redacted<string>
  readonly heartbeat: Duration.DurationInput
}): Effect.Effect<void, NodeIdInUse | PersistenceError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const key = lockKey(options.nodeId)
    const session = yield* Notifier.make({
      url: options.directUrl,
      applicationName: `troupe-lock:${options.nodeId}`,
      failFast: true,
      setup: (client) =>
        Effect.tryPromise({
          try: () => client.query("SELECT pg_try_advisory_lock($1::bigint) AS ok", [key.toString()]),
          catch: (error) => new PersistenceError({ reason: describe(error) })
        }).pipe(
          Effect.filterOrFail(
            (res) => res.rows[0]?.ok === true,
            () => new NodeIdInUse({ nodeId: options.nodeId })
          ),
          Effect.asVoid
        )
    })
    yield* session.ready.pipe(
      Effect.timeoutFail({
        duration: "30 seconds",
        onTimeout: () =>
          new PersistenceError({
            reason: "could not take the node lock within 30 s: is the database reachable?"
          })
      })
    )
    yield* refail(sql`
      INSERT INTO nodes (id, role, address, pid, hostname, lock_key, started_at, last_heartbeat, status)
      VALUES (${options.nodeId}, ${options.role}, ${options.address}, ${process.pid}, ${Os.hostname()},
              ${key.toString()}::bigint, now(), now(), 'running')
      ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, address = EXCLUDED.address, pid = EXCLUDED.pid,
        hostname = EXCLUDED.hostname, lock_key = EXCLUDED.lock_key, started_at = now(), last_heartbeat = now(),
        status = 'running'`)
    yield* sql`UPDATE nodes SET last_heartbeat = now() WHERE id = ${options.nodeId}`.pipe(
      Effect.catchAllCause((cause) => Effect.logWarning("node heartbeat failed", cause)),
      Effect.repeat({ schedule: Schedule.spaced(Duration.decode(options.heartbeat)) }),
      Effect.interruptible,
      Effect.annotateLogs({ module: "NodeMembership", node: options.nodeId }),
      Effect.forkScoped
    )
    yield* Effect.addFinalizer(() =>
      sql`UPDATE nodes SET status = 'stopped', last_heartbeat = now() WHERE id = ${options.nodeId}`.pipe(
        Effect.timeout("5 seconds"),
        Effect.ignore
      )
    )
  })
