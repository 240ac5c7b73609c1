/**
 * The wake-ups the hot statements send alongside their rows. Nothing else tells the callback
 * dispatcher and the event stream at once that a job started or ended (their fallback polls
 * come seconds later), and these NOTIFYs live in SELECT CTEs that Postgres would skip if
 * nothing read them: a change that loses one shows here.
 */
import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as Db from "../fixtures/Db.ts"
import { command, eventually, key, startedOf, startGateway, startWorker, statusIs } from "../fixtures/Jobs.ts"

describe("the wake-ups of a job's run", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("a job's start and end each wake the callback dispatcher and the event stream", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const listener = yield* Db.rawClient
        const heard: Array<{ channel: string; payload: string }> = []
        listener.on("notification", (n) => heard.push({ channel: n.channel, payload: n.payload ?? "" }))
        yield* Effect.promise(() => listener.query(`LISTEN "callbacks:new"; LISTEN "job_events:new"`))
        const { jobs } = yield* startGateway("gw-w")
        yield* startWorker("n-w")
        const k = key()
        const job = yield* jobs.submit({
          job_type: "ctl",
          payload: { key: k },
          callback_url: "http://127.0.0.1:9/callbacks"
        })
        yield* startedOf(k)
        // The handler may start before its job_started is committed: wait for the row, then its wake-up.
        const eventId = (type: string) =>
          eventually(
            Effect.map(
              sql<{ id: string }>`
                SELECT id::text AS id FROM gh_job_events WHERE job_id = ${job.id}::uuid AND event_type = ${type}`,
              (rows) => rows[0]?.id
            )
          )
        const heardEvent = (id: string) =>
          eventually(
            Effect.sync(() => (heard.some((h) => h.channel === "job_events:new" && h.payload === id) ? true : undefined))
          )
        yield* heardEvent(yield* eventId("job_started"))
        yield* command(k, { _tag: "complete" })
        yield* statusIs(job.id, "completed")
        yield* heardEvent(yield* eventId("job_completed"))
        const callbackWakeups = heard.filter((h) => h.channel === "callbacks:new").map((h) => h.payload)
        expect(callbackWakeups).toEqual(expect.arrayContaining(["claimed", "ended"]))
      })
    )
  })
})
