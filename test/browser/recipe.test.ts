/**
 * Recipes in a real Chromium against pages served on loopback: a multi-page form filled and
 * submitted with its values extracted, cancel during a `goto` that never loads and during a
 * `wait_for` that never matches (the context closes, the next job runs on the same browser),
 * a browser killed under a job, and a machine without Chromium.
 */
import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import * as ArtifactStore from "../../src/browser/ArtifactStore.ts"
import * as WorkerHttp from "../../src/edge/WorkerHttp.ts"
import * as Browser from "../../src/browser/Browser.ts"
import * as Recipe from "../../src/browser/Recipe.ts"
import * as Db from "../fixtures/Db.ts"
import * as Site from "../fixtures/Site.ts"
import { eventually, startGateway, startWorker, statusIs, statusOf } from "../fixtures/Jobs.ts"

const chromiumPath = process.env.TROUPE_CHROMIUM ?? "/usr/bin/chromium"

const page = (title: string, body: string) =>
  `<!doctype html><html><head><title>${title}</title></head><body>${body}</body></html>`

let hungOnce = 0
let hangs = 0

/** The fixture site: a two-page form, its summary, and a page that never finishes loading. */
const site = Site.serve((req, res) => {
  const url = new URL(req.url ?? "/", "http://x")
  const html = (body: string) => res.writeHead(200, { "content-type": "text/html" }).end(body)
  switch (url.pathname) {
    case "/apply":
      return html(
        page(
          "Apply",
          `<form action="/details" method="get"><label>Name <input id="name" name="name"></label>
               <button id="next" type="submit">Next</button></form>`
        )
      )
    case "/details":
      return html(
        page(
          "Details",
          `<p id="greeting">Hello ${url.searchParams.get("name") ?? ""}</p>
               <form action="/done" method="get"><input type="hidden" name="name" value="${url.searchParams.get("name") ?? ""}">
               <select id="role" name="role"><option value="dev">Developer</option><option value="ops">Operator</option></select>
               <input id="agree" type="checkbox" name="agree" value="yes"> <button id="submit" type="submit">Submit</button></form>`
        )
      )
    case "/done":
      return html(
        page(
          "Done",
          `<p id="summary">Applied: ${url.searchParams.get("name")} as ${url.searchParams.get("role")}, agreed ${url.searchParams.get("agree") ?? "no"}</p>
               <a class="next" href="/jobs/1">one</a><a class="next" href="/jobs/2">two</a>`
        )
      )
    case "/upload":
      return html(
        page(
          "Upload",
          `<input id="cv" type="file"><p id="picked"></p>
           <script>document.getElementById("cv").addEventListener("change", async (e) => {
             const f = e.target.files[0]
             document.getElementById("picked").textContent = f.name + " " + f.type + " " + (await f.text())
           })</script>`
        )
      )
    case "/hang":
      hangs++
      return // never answered
    case "/hang-once":
      // The first visit never loads; later ones do (a job whose first attempt dies with its browser).
      if (hungOnce++ === 0) return
      return html(page("Loaded", `<p id="loaded">loaded</p>`))
    default:
      res.writeHead(404).end()
  }
})

const eventsOf = (jobId: string) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      sql<{ event_type: string; metadata: Record<string, unknown> }>`
      SELECT event_type, metadata FROM gh_job_events WHERE job_id = ${jobId}::uuid ORDER BY id`
  )

const errorOf = (jobId: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(
      sql<{ error_code: string | null; error_message: string | null; result: unknown }>`
        SELECT error_code, error_message, result FROM gh_automation_jobs WHERE id = ${jobId}::uuid`,
      (rows) => rows[0]!
    )
  )

describe("recipes in Chromium", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a recipe fills and submits a two-page form and returns what it extracted; events carry the step indices",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const browser = yield* Browser.make({ executablePath: chromiumPath })
          const { jobs } = yield* startGateway("gw-b1")
          yield* startWorker("b1", { handlers: Recipe.handlers(browser) })
          const steps = [
            { action: "goto", url: `${base}/apply` },
            { action: "fill", selector: "#name", value: "Ada" },
            { action: "click", selector: "#next", name: "next page" },
            { action: "wait_for", url: "**/details?*" },
            { action: "assert_text", selector: "#greeting", text: "Hello Ada" },
            { action: "select", selector: "#role", value: "ops" },
            { action: "check", selector: "#agree" },
            { action: "click", selector: "#submit" },
            { action: "wait_for", selector: "#summary" },
            { action: "extract", as: "summary", selector: "#summary" },
            { action: "extract", as: "links", selector: "a.next", attribute: "href", all: true }
          ]
          const job = yield* jobs.submit({ job_type: "recipe", payload: { steps } })
          yield* statusIs(job.id, "completed")
          const done = yield* jobs.get(job.id)
          expect(done.result).toEqual({
            extracted: { summary: "Applied: Ada as ops, agreed yes", links: ["/jobs/1", "/jobs/2"] },
            url: expect.stringContaining("/done?")
          })
          const events = yield* eventsOf(job.id)
          const completed = events.filter((e) => e.event_type === "cookbook_step_completed")
          expect(completed.map((e) => [e.metadata.step_index, e.metadata.total_steps])).toEqual(
            steps.map((_, i) => [i + 1, steps.length])
          )
          expect(completed.every((e) => typeof e.metadata.elapsed_ms === "number")).toBe(true)
          expect(browser.stats()).toMatchObject({ openContexts: 0, launches: 1 })
        })
    )

    it.scoped(
      "cancel during a goto that never loads and during a wait_for: cancelled at once, context closed, the next job runs on the same browser",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const browser = yield* Browser.make({ executablePath: chromiumPath })
          const { jobs } = yield* startGateway("gw-b2")
          yield* startWorker("b2", { handlers: Recipe.handlers(browser) })
          for (const steps of [
            [{ action: "goto", url: `${base}/hang`, timeout_ms: 600_000 }],
            [
              { action: "goto", url: `${base}/apply` },
              { action: "wait_for", selector: "#never", timeout_ms: 600_000 }
            ]
          ]) {
            const job = yield* jobs.submit({ job_type: "recipe", payload: { steps } })
            // The step in progress is the last one, on the job's open context.
            yield* eventually(
              Effect.map(eventsOf(job.id), (es) =>
                es.filter((e) => e.event_type === "cookbook_step_started").length === steps.length &&
                browser.stats().openContexts === 1
                  ? true
                  : undefined
              )
            )
            const state = yield* jobs.cancel(job.id, "user pressed stop")
            expect(state.status).toBe("cancelled")
            expect((yield* statusOf(job.id)).error_code).toBe("CANCELLED")
            yield* eventually(Effect.sync(() => (browser.stats().openContexts === 0 ? true : undefined)))
          }
          const next = yield* jobs.submit({
            job_type: "recipe",
            payload: {
              steps: [
                { action: "goto", url: `${base}/apply` },
                { action: "extract", as: "title", selector: "button" }
              ]
            }
          })
          yield* statusIs(next.id, "completed")
          expect((yield* jobs.get(next.id)).result).toMatchObject({ extracted: { title: "Next" } })
          expect(browser.stats()).toMatchObject({ openContexts: 0, launches: 1 })
        })
    )

    it.scoped(
      "a browser killed under a job: BROWSER_CRASHED, the job retried on a new browser while it has attempts, failed when it has none; the next job is fine",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const browser = yield* Browser.make({ executablePath: chromiumPath })
          const { jobs } = yield* startGateway("gw-b3")
          yield* startWorker("b3", { handlers: Recipe.handlers(browser) })
          // Kill the browser once its page waits on the fixture site (the request has arrived).
          const killUnder = (launches: number, arrived: () => boolean) =>
            Effect.gen(function* () {
              const pid = yield* eventually(
                Effect.sync(() =>
                  arrived() && browser.stats().openContexts === 1 && browser.stats().launches === launches
                    ? browser.pid()
                    : undefined
                )
              )
              process.kill(pid, "SIGKILL")
              return pid
            })
          // Attempts left: requeued with the crash named, run again on a new browser, completed.
          const retried = yield* jobs.submit({
            job_type: "recipe",
            max_attempts: 2,
            payload: {
              steps: [
                { action: "goto", url: `${base}/hang-once`, timeout_ms: 600_000 },
                { action: "extract", as: "loaded", selector: "#loaded" }
              ]
            }
          })
          const pid = yield* killUnder(1, () => hungOnce > 0)
          yield* statusIs(retried.id, "completed")
          expect((yield* errorOf(retried.id)).result).toMatchObject({ extracted: { loaded: "loaded" } })
          const requeued = (yield* eventsOf(retried.id)).filter((e) => e.event_type === "job_requeued")
          expect(requeued).toHaveLength(1)
          expect(requeued[0]!.metadata).toMatchObject({ reason: "error", error_code: "BROWSER_CRASHED", attempt: 1 })
          expect(browser.stats().launches).toBe(2)
          // The killed browser's process is gone.
          expect(
            Fs.existsSync(`/proc/${pid}`) && !Fs.readFileSync(`/proc/${pid}/stat`, "utf8").includes(") Z")
          ).toBe(false)
          // No attempts left: failed with BROWSER_CRASHED.
          const last = yield* jobs.submit({
            job_type: "recipe",
            max_attempts: 1,
            payload: { steps: [{ action: "goto", url: `${base}/hang`, timeout_ms: 600_000 }] }
          })
          const hangsBefore = hangs
          yield* killUnder(2, () => hangs > hangsBefore)
          yield* statusIs(last.id, "failed")
          const error = yield* errorOf(last.id)
          expect(error.error_code).toBe("BROWSER_CRASHED")
          expect(error.error_message).toContain("attempt 1 of 1")
          const next = yield* jobs.submit({
            job_type: "recipe",
            payload: {
              steps: [
                { action: "goto", url: `${base}/apply` },
                { action: "assert_text", selector: "title", text: "" }
              ]
            }
          })
          yield* statusIs(next.id, "completed")
          expect(browser.stats().launches).toBe(3)
          expect(browser.stats().openContexts).toBe(0)
        })
    )

    it.scoped(
      "upload puts the payload's file into a file input; screenshot steps store PNGs (observation events); a failed step's error names its page and a screenshot of it",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const dir = yield* Effect.acquireRelease(
            Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-artifacts-"))),
            (d) => Effect.sync(() => Fs.rmSync(d, { recursive: true, force: true }))
          )
          const artifacts = ArtifactStore.filesystem(dir)
          const browser = yield* Browser.make({ executablePath: chromiumPath })
          const { jobs } = yield* startGateway("gw-b5")
          const w = yield* startWorker("b5", { handlers: Recipe.handlers(browser, artifacts) })
          const http = yield* WorkerHttp.make(w.worker, { port: 0, host: "127.0.0.1", artifacts })
          artifacts.servedAt(`http://127.0.0.1:${http.port}`)
          const png = (url: string) =>
            Effect.promise(async () => {
              const res = await fetch(url)
              return { type: res.headers.get("content-type"), bytes: new Uint8Array(await res.arrayBuffer()) }
            })
          const isPng = (b: Uint8Array) => Buffer.from(b.subarray(0, 8)).equals(Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]))

          const job = yield* jobs.submit({
            job_type: "recipe",
            payload: {
              steps: [
                { action: "goto", url: `${base}/upload` },
                {
                  action: "upload",
                  selector: "#cv",
                  file: { name: "cv.txt", mime_type: "text/plain", content_base64: Buffer.from("Ada Lovelace").toString("base64") }
                },
                { action: "wait_for", text: "cv.txt" },
                { action: "extract", as: "picked", selector: "#picked" },
                { action: "screenshot", as: "page" }
              ]
            }
          })
          yield* statusIs(job.id, "completed")
          const { extracted } = (yield* errorOf(job.id)).result as { extracted: Record<string, string> }
          expect(extracted.picked).toBe("cv.txt text/plain Ada Lovelace")
          const shot = yield* png(extracted.page!)
          expect(shot.type).toBe("image/png")
          expect(isPng(shot.bytes)).toBe(true)
          const kinds = (yield* eventsOf(job.id)).map((e) => e.event_type)
          expect(kinds).toContain("observation_started")
          expect(kinds).toContain("observation_completed")

          const failing = yield* jobs.submit({
            job_type: "recipe",
            payload: {
              steps: [
                { action: "goto", url: `${base}/upload` },
                { action: "click", selector: "#missing", timeout_ms: 200, name: "the missing button" }
              ]
            }
          })
          yield* statusIs(failing.id, "failed")
          const error = yield* errorOf(failing.id)
          expect(error.error_code).toBe("RECIPE_STEP_FAILED")
          expect(error.error_message).toContain("step 2 (the missing button) failed on")
          expect(error.error_message).toContain(`${base}/upload`)
          const url = /\(screenshot: (\S+)\)$/.exec(error.error_message ?? "")?.[1]
          expect(url).toBeDefined()
          expect(isPng((yield* png(url!)).bytes)).toBe(true)
          expect((yield* eventsOf(failing.id)).map((e) => e.event_type)).toContain("cookbook_step_failed")
        })
    )

    it.scoped(
      "without Chromium a recipe fails with BROWSER_UNAVAILABLE naming TROUPE_CHROMIUM; other jobs keep working; a bad recipe is refused at submit with the step's path",
      () =>
        Effect.gen(function* () {
          const browser = yield* Browser.make({ executablePath: "/nonexistent/chromium" })
          const { jobs } = yield* startGateway("gw-b4")
          yield* startWorker("b4", {
            handlers: { ...Recipe.handlers(browser), noop: Effect.succeed({ ok: true }) }
          })
          const job = yield* jobs.submit({
            job_type: "recipe",
            payload: { steps: [{ action: "goto", url: "http://127.0.0.1:9/" }] }
          })
          yield* statusIs(job.id, "failed")
          const error = yield* errorOf(job.id)
          expect(error.error_code).toBe("BROWSER_UNAVAILABLE")
          expect(error.error_message).toContain("TROUPE_CHROMIUM")
          // A bad recipe is refused at submit, naming the offending step; nothing is stored.
          const recipes = Effect.flatMap(SqlClient.SqlClient, (sql) =>
            Effect.map(
              sql<{ n: number }>`SELECT count(*)::int AS n FROM gh_automation_jobs WHERE job_type = 'recipe'`,
              (rows) => rows[0]!.n
            )
          )
          const before = yield* recipes
          const bad = yield* Effect.flip(
            jobs.submit({
              job_type: "recipe",
              payload: { steps: [{ action: "goto", url: "http://127.0.0.1:9/" }, { action: "click" }] }
            })
          )
          expect(bad._tag).toBe("InvalidRequest")
          expect(bad.message).toContain("steps[1]")
          expect(yield* recipes).toBe(before)
          const other = yield* jobs.submit({ job_type: "noop", payload: {} })
          yield* statusIs(other.id, "completed")
        })
    )
  })
})
