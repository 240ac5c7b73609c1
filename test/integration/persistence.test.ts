/**
 * A database error during a cancel, a resume or a drain is answered as `PersistenceError`,
 * and the actor that met it keeps running: the same request succeeds once the database
 * takes the write again, with no restart of the actor. The errors are real: a trigger makes
 * Postgres refuse the one write the request needs.
 */
import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect, Queue } from "effect"
import * as Db from "../fixtures/Db.ts"
import { command, key, slot, startedOf, startGateway, startWorker, statusIs, statusOf } from "../fixtures/Jobs.ts"

/** Make Postgres refuse updates of `table` that match `when` until the scope closes. */
const refuse = (table: string, when: string) =>
  Effect.acquireRelease(
    Effect.flatMap(SqlClient.SqlClient, (sql) =>
      Effect.gen(function* () {
        yield* sql.unsafe(`CREATE OR REPLACE FUNCTION troupe_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN RAISE EXCEPTION 'injected failure: the database refuses this write'; END $$`)
        yield* sql.unsafe(`CREATE TRIGGER troupe_test_refuse BEFORE UPDATE ON ${table}
          FOR EACH ROW WHEN (${when}) EXECUTE FUNCTION troupe_test_refuse()`)
      })
    ).pipe(Effect.orDie),
    () =>
      Effect.flatMap(SqlClient.SqlClient, (sql) =>
        sql.unsafe(`DROP TRIGGER IF EXISTS troupe_test_refuse ON ${table}`)
      ).pipe(Effect.orDie)
  )

describe("a database error during a request", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("resume: answered as PersistenceError; the job still waits, and resumes once the write goes through", () =>
      Effect.gen(function* () {
        const { jobs } = yield* startGateway("gw-r")
        const w = yield* startWorker("n-r")
        const k = key()
        const job = yield* jobs.submit({ job_type: "ctl", payload: { key: k } })
        yield* startedOf(k)
        yield* command(k, { _tag: "needs_human", timeoutSeconds: 60 })
        yield* statusIs(job.id, "needs_human")

        const refused = yield* Effect.scoped(
          Effect.zipRight(
            refuse("gh_automation_jobs", "OLD.status = 'needs_human' AND NEW.status = 'running'"),
            Effect.flip(jobs.resume(job.id, { resolved_by: "human" }))
          )
        )
        expect(refused._tag).toBe("PersistenceError")
        expect(refused.message).toContain("injected failure")
        expect((yield* statusOf(job.id)).status).toBe("needs_human")

        const resumed = yield* jobs.resume(job.id, { resolved_by: "human" })
        expect(resumed.status).toBe("running")
        const answer = yield* Queue.take(slot(k).resumed)
        expect(answer).toMatchObject({ resolved_by: "human" })
        yield* command(k, { _tag: "complete" })
        yield* statusIs(job.id, "completed")
        expect(w.node.stats().restarts).toBe(0)
      })
    )

    it.scoped("drain: answered as PersistenceError; the worker stops claiming, and a second drain records it", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const { jobs } = yield* startGateway("gw-d")
        const w = yield* startWorker("n-d", { retryWritesFor: "200 millis" })

        const refused = yield* Effect.scoped(
          Effect.zipRight(
            refuse("gh_worker_registry", "NEW.status = 'draining'"),
            Effect.flip(jobs.drain(w.worker.workerId, "maintenance"))
          )
        )
        expect(refused._tag).toBe("PersistenceError")
        expect(refused.message).toContain("injected failure")
        // Draining in memory at once: it claims nothing more.
        expect((yield* w.worker.status).status).toBe("draining")

        const drained = yield* jobs.drain(w.worker.workerId, "maintenance")
        expect(drained.status).toBe("draining")
        const rows = yield* sql<{ status: string }>`
          SELECT status FROM gh_worker_registry WHERE worker_id = ${w.worker.workerId}`
        expect(rows[0]?.status).toBe("draining")
        expect(w.node.stats().restarts).toBe(0)
      })
    )

    it.scoped("cancel: answered as PersistenceError; the job stays queued, and the cancel goes through afterwards", () =>
      Effect.gen(function* () {
        const { jobs, node } = yield* startGateway("gw-c")
        const job = yield* jobs.submit({ job_type: "noop", payload: {} })
        expect(job.status).toBe("queued")

        const refused = yield* Effect.scoped(
          Effect.zipRight(
            refuse("gh_automation_jobs", "NEW.status = 'cancelled'"),
            Effect.flip(jobs.cancel(job.id, "changed my mind"))
          )
        )
        expect(refused._tag).toBe("PersistenceError")
        expect((yield* statusOf(job.id)).status).toBe("queued")

        const cancelled = yield* jobs.cancel(job.id, "changed my mind")
        expect(cancelled.status).toBe("cancelled")
        yield* statusIs(job.id, "cancelled")
        expect(node.stats().restarts).toBe(0)
      })
    )
  })
})
