/**
 * A TypeScript handler on a page of its own: `withPage` from `troupe/worker` gives it the
 * job's `BrowserSession` from the worker's browser; the page's navigations show as the
 * worker's `current_task_url`, and the context closes when the job ends.
 */
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as Worker from "troupe/worker"
import * as Node from "../../src/runtime/core/Node.ts"
import * as Db from "../fixtures/Db.ts"
import { eventually, startGateway, statusIs } from "../fixtures/Jobs.ts"
import * as Site from "../fixtures/Site.ts"

const site = Site.serve((req, res) => {
  const url = new URL(req.url ?? "/", "http://x")
  if (url.pathname === "/held") {
    res.writeHead(200, { "content-type": "text/html" }).end("<title>Held</title><p id='wait'>waiting</p>")
    return
  }
  res.writeHead(200, { "content-type": "text/html" }).end(`<title>Page ${url.pathname}</title>`)
})

const registry = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  Effect.map(
    sql<{ browser_session_id: string | null; current_task_url: string | null }>`
      SELECT browser_session_id, current_task_url FROM gh_worker_registry WHERE worker_id = 'w-handler'`,
    (rows) => rows[0]
  )
)

describe("TypeScript handlers with a page", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("withPage: the handler drives its own page, its URL is in the registry, the context closes at the end", () =>
      Effect.gen(function* () {
        const { base } = yield* site
        const { jobs } = yield* startGateway("gw-handler")
        const node = yield* Node.make({ nodeId: "handler", heartbeat: "1 second" })
        const opened: Array<Worker.Session> = []
        const handlers = Worker.JobHandler.handlers({
          title: Worker.withPage(
            Effect.gen(function* () {
              const input = yield* Worker.JobHandler.payload(Schema.Struct({ path: Schema.String }))
              const session = yield* Worker.BrowserSession
              opened.push(session)
              yield* Worker.usePage((page) => page.goto(`${base}${input.path}`))
              return { title: yield* Worker.usePage((page) => page.title()) }
            })
          ),
          broken: Worker.withPage(Worker.usePage((page) => page.click("#nothing-here", { timeout: 100 }))),
          hold: Worker.withPage(
            Effect.gen(function* () {
              const { page } = yield* Worker.BrowserSession
              yield* Effect.promise(() => page.goto(`${base}/held`))
              yield* Worker.JobHandler.needsHuman({ type: "custom", timeout_seconds: 60, message: "look at the page" })
            })
          )
        })
        yield* Worker.make(node, { handlers, workerId: "w-handler", httpPort: false })

        const job = yield* jobs.submit({ job_type: "title", payload: { path: "/first" } })
        yield* statusIs(job.id, "completed")
        expect((yield* jobs.get(job.id)).result).toEqual({ title: "Page /first" })
        expect(opened[0]!.page.isClosed()).toBe(true)

        // A Playwright call that fails is a typed failure of the job, not a crash of the handler.
        const broken = yield* jobs.submit({ job_type: "broken", payload: {} })
        yield* statusIs(broken.id, "failed")
        const failed = yield* jobs.get(broken.id)
        expect(failed.error_code).toBe("BROWSER_ACTION_FAILED")
        expect(failed.error_message).toContain("#nothing-here")

        // While the job is held, the registry shows its session and the page it navigated to.
        const held = yield* jobs.submit({ job_type: "hold", payload: {} })
        yield* statusIs(held.id, "needs_human")
        const row = yield* eventually(
          Effect.map(registry, (r) => (r?.current_task_url === `${base}/held` ? r : undefined))
        )
        expect(row.browser_session_id).toMatch(/^chromium-\d+-\d+$/)
        yield* jobs.cancel(held.id, "done looking")
        yield* statusIs(held.id, "cancelled")
        yield* eventually(Effect.map(registry, (r) => (r?.current_task_url === null ? true : undefined)))
      })
    )
  })
})
