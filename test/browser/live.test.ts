/**
 * The live view in real Chromium: a recipe job held on a fixture page with a captcha widget,
 * watched and operated from a second Chromium (the human) through the gateway's
 * `/live/<job_id>` page, which proxies the worker node's screencast; then resumed to
 * completion. Also: the secret and unknown jobs are refused clearly, bad input is answered
 * with an error frame, and the job's worker node is found through the registry.
 */
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Fs from "node:fs"
import { chromium, type Page } from "playwright-core"
import * as Browser from "../../src/browser/Browser.ts"
import * as Recipe from "../../src/browser/Recipe.ts"
import * as WorkerHttp from "../../src/edge/WorkerHttp.ts"
import * as Db from "../fixtures/Db.ts"
import { secret, startEdge } from "../fixtures/Edge.ts"
import { eventually, startWorker, statusIs } from "../fixtures/Jobs.ts"
import * as Site from "../fixtures/Site.ts"
import * as Ws from "../fixtures/Ws.ts"

const chromiumPath = process.env.TROUPE_CHROMIUM ?? "/usr/bin/chromium"
const screenshotPath = new URL("../../test-results/live-view.png", import.meta.url)

/** Where the widget's checkbox is on the held page, in CSS pixels (its centre). */
const checkbox = { x: 141, y: 141 }

/**
 * `/bot/<key>`: a page with a bot-check widget (a `custom` captcha) whose checkbox sits at
 * `checkbox`. The page's own script removes the widget when the checkbox is clicked, as a
 * solved captcha goes away.
 */
const site = Site.serve((req, res) => {
  const [, what] = (req.url ?? "/").split("/")
  if (what === "plain")
    return res.writeHead(200, { "content-type": "text/html" }).end("<p>Nothing to solve</p>")
  if (what !== "bot") return res.writeHead(404).end()
  res.writeHead(200, { "content-type": "text/html" }).end(`<!doctype html><html><head><title>Apply</title>
    <style>
      body { margin: 0; font: 16px sans-serif; }
      #bot-check { position: absolute; left: 100px; top: 100px; width: 300px; height: 80px; box-sizing: border-box;
        border: 1px solid #999; background: #f4f4f4; }
      #human { position: absolute; left: 21px; top: 21px; width: 40px; height: 40px; margin: 0; }
      #bot-check span { position: absolute; left: 80px; top: 28px; }
      #form { position: absolute; left: 100px; top: 260px; }
    </style></head><body>
    <div id="bot-check"><input type="checkbox" id="human"><span>I am not a robot</span></div>
    <p id="form">The form</p>
    <script>
      document.getElementById("human").addEventListener("click", () => {
        document.getElementById("bot-check").remove()
        document.body.insertAdjacentHTML("beforeend", '<p id="done" style="position:absolute;left:100px;top:100px">Solved</p>')
      })
    </script></body></html>`)
})

/** A recipe that stops at the widget, and reads what only shows once it is solved. */
const heldRecipe = (base: string, extra: Record<string, unknown> = {}) => ({
  job_type: "recipe",
  ...extra,
  payload: {
    steps: [
      { action: "goto", url: `${base}/bot/${Date.now()}` },
      { action: "extract", as: "done", selector: "#done" }
    ],
    captcha: { custom_selectors: ["#bot-check"], recheck_after_ms: 100 }
  }
})

/** A worker node with its own browser and HTTP server (the live view's worker side). */
const browserWorker = (nodeId: string) =>
  Effect.gen(function* () {
    const browser = yield* Browser.make({ executablePath: chromiumPath })
    const w = yield* startWorker(nodeId, { handlers: Recipe.handlers(browser), maxConcurrent: 2 })
    const http = yield* WorkerHttp.make(w.worker, {
      port: 0,
      host: "127.0.0.1",
      browser,
      serviceSecret: Redacted.make(secret)
    })
    return { ...w, browser, http, base: `http://127.0.0.1:${http.port}` }
  })

/** The human's Chromium, closed with the scope. */
const human = Effect.acquireRelease(
  Effect.promise(() =>
    chromium.launch({ executablePath: chromiumPath, headless: true, args: ["--no-sandbox"] })
  ),
  (b) => Effect.promise(() => b.close())
)

const frames = (page: Page) =>
  Effect.promise(async () => Number((await page.locator("#screen").getAttribute("data-frames")) ?? "0"))

const get = (url: string) =>
  Effect.promise(async () => {
    const res = await fetch(url)
    return { status: res.status, type: res.headers.get("content-type"), text: await res.text() }
  })

describe("live view in Chromium", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "a human opens /live/<job_id> on the gateway, sees the held page, clicks its checkbox; the resumed job completes",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const edge = yield* startEdge("gw-l1")
          const w = yield* browserWorker("l1")
          const job = yield* edge.jobs.submit(heldRecipe(base))
          yield* statusIs(job.id, "needs_human")
          expect((yield* edge.jobs.get(job.id)).interaction).toMatchObject({
            captcha_type: "custom",
            element_selector: "#bot-check"
          })

          // The browser's figures while the page is held.
          const status = JSON.parse((yield* get(`${w.base}/worker/status`)).text)
          expect(status.browser).toEqual({
            version: expect.stringMatching(/^\d+\.\d+\.\d+\.\d+$/),
            open_contexts: 1,
            launches: 1,
            chromium_rss_mb: expect.any(Number)
          })
          expect(status.browser.chromium_rss_mb).toBeGreaterThan(10)

          // The human's browser opens the gateway's page; the secret rides in the fragment.
          const humanBrowser = yield* human
          const page = yield* Effect.promise(() =>
            humanBrowser.newPage({ viewport: { width: 1400, height: 1000 } })
          )
          yield* Effect.promise(() =>
            page.goto(`${edge.http}/live/${job.id}#secret=${encodeURIComponent(secret)}`)
          )
          yield* Effect.promise(() => page.locator("#screen[data-frames]").waitFor())
          // The picture is a decoded JPEG of the held page's viewport.
          expect(
            yield* Effect.promise(() =>
              page
                .locator("#screen")
                .evaluate((img) => [(img as any).naturalWidth, (img as any).naturalHeight])
            )
          ).toEqual([1280, 720])
          // The fragment is off the address bar, and the page says whose page it shows.
          expect(page.url()).toBe(`${edge.http}/live/${job.id}`)
          expect(yield* Effect.promise(() => page.textContent("#status"))).toBe("live · worker w-l1")
          expect(yield* Effect.promise(() => page.textContent("#url"))).toContain(`${base}/bot/`)
          const metrics = (yield* get(`${w.base}/metrics`)).text
          expect(metrics).toContain('troupe_live_viewers{worker_id="w-l1"} 1')

          // The test's artifact: the live page showing the held page with its widget.
          Fs.mkdirSync(new URL(".", screenshotPath), { recursive: true })
          yield* Effect.promise(() => page.screenshot({ path: screenshotPath.pathname }))
          expect([...Fs.readFileSync(screenshotPath).subarray(0, 4)]).toEqual([0x89, 0x50, 0x4e, 0x47])
          expect(yield* Effect.promise(() => page.isVisible("#login"))).toBe(false)

          // Click the widget's checkbox on the picture: the page's own script removes the widget.
          const held = w.browser.sessionOf(job.id)!
          const viewport = held.page.viewportSize()!
          const box = (yield* Effect.promise(() => page.locator("#screen").boundingBox()))!
          const before = yield* frames(page)
          yield* Effect.promise(() =>
            page.mouse.click(
              box.x + (checkbox.x * box.width) / viewport.width,
              box.y + (checkbox.y * box.height) / viewport.height
            )
          )
          yield* Effect.promise(() => held.page.waitForSelector("#done"))
          expect(yield* Effect.promise(() => held.page.locator("#bot-check").count())).toBe(0)
          // The human sees the page as it is now.
          yield* eventually(Effect.map(frames(page), (n) => (n > before ? n : undefined)))

          yield* edge.jobs.resume(job.id, { resolved_by: "human" })
          yield* statusIs(job.id, "completed")
          expect((yield* edge.jobs.get(job.id)).result).toMatchObject({ extracted: { done: "Solved" } })
          // The page closed with the job: the live page says so, and the screencast's viewer is gone.
          yield* Effect.promise(() => page.locator("#status", { hasText: /^ended: / }).waitFor())
          yield* eventually(
            Effect.map(get(`${w.base}/metrics`), (m) =>
              m.text.includes('troupe_live_viewers{worker_id="w-l1"} 0') ? true : undefined
            )
          )
          expect(w.browser.stats().openContexts).toBe(0)
        })
    )

    it.scoped("a wrong secret is refused, an unknown job is named, bad input gets an error frame", () =>
      Effect.gen(function* () {
        const { base } = yield* site
        const edge = yield* startEdge("gw-l2")
        const w = yield* browserWorker("l2")
        const live = (jobId: string) => `ws://127.0.0.1:${edge.gateway.port}/live/${jobId}/ws`
        const job = yield* edge.jobs.submit(heldRecipe(base))
        yield* statusIs(job.id, "needs_human")

        // A wrong secret: an UNAUTHORIZED frame, and the socket closes with 4401.
        const wrong = yield* Ws.connect(live(job.id))
        wrong.send({ v: 1, type: "auth", token: "not-the-secret" })
        expect(yield* wrong.closed()).toEqual({ code: 4401, reason: expect.stringContaining("wrong secret") })
        expect(wrong.frames).toEqual([
          { v: 1, type: "error", code: "UNAUTHORIZED", message: expect.stringContaining("wrong secret") }
        ])
        // Input before auth is not taken for it.
        const early = yield* Ws.connect(live(job.id))
        early.send({ v: 1, type: "click", x: 1, y: 1 })
        expect((yield* early.closed()).code).toBe(4401)
        expect(early.frames[0]).toMatchObject({ type: "error", code: "UNAUTHORIZED" })
        // The worker's own door refuses a wrong secret on the upgrade.
        const direct = yield* Ws.connect(`ws://127.0.0.1:${w.http.port}/live/${job.id}`, {
          secret: "not-the-secret"
        }).pipe(Effect.flip)
        expect(direct.message).toBe("upgrade refused: HTTP 401")

        // An unknown job (or no job id at all): NOT_FOUND naming it, and 4404.
        for (const id of ["0b0e2f4c-1a2b-4c3d-8e9f-0a1b2c3d4e5f", "nope"]) {
          const unknown = yield* Ws.connect(live(id))
          unknown.send({ v: 1, type: "auth", token: secret })
          expect(yield* unknown.closed()).toMatchObject({ code: 4404 })
          expect(unknown.frames).toEqual([
            { v: 1, type: "error", code: "NOT_FOUND", message: `no job ${id}: check the job id` }
          ])
        }
        // A job that has no page any more.
        const ended = yield* edge.jobs.submit({
          job_type: "recipe",
          payload: { steps: [{ action: "goto", url: `${base}/plain` }] }
        })
        yield* statusIs(ended.id, "completed")
        const gone = yield* Ws.connect(live(ended.id))
        gone.send({ v: 1, type: "auth", token: secret })
        expect((yield* gone.closed()).code).toBe(4404)
        expect(gone.frames[0]).toMatchObject({
          code: "NOT_FOUND",
          message: `job ${ended.id} is completed: only a running or needs_human job has a page to show`
        })

        // Bad input: an error frame each, and the socket stays to take the next one.
        const viewer = yield* Ws.connect(live(job.id))
        viewer.send({ v: 1, type: "auth", token: secret })
        yield* viewer.waitFor((fs) => fs.find((f) => f.type === "frame"))
        expect(viewer.frames[0]).toMatchObject({ type: "ready", job_id: job.id, worker_id: "w-l2" })
        const errorsAfter = (n: number) =>
          viewer.waitFor((fs) => {
            const errors = fs.filter((f) => f.type === "error")
            return errors.length >= n ? errors[n - 1] : undefined
          })
        viewer.sendRaw("{ not json")
        expect(yield* errorsAfter(1)).toMatchObject({ code: "INVALID_FRAME" })
        viewer.send({ v: 1, type: "click", x: "left" })
        expect(yield* errorsAfter(2)).toMatchObject({ code: "INVALID_FRAME" })
        viewer.send({ v: 1, type: "click", x: 5000, y: 10 })
        expect(yield* errorsAfter(3)).toMatchObject({
          code: "INVALID_FRAME",
          message: expect.stringContaining("outside the frame (1280×720 pixels)")
        })
        viewer.send({ v: 1, type: "key", key: "NoSuchKey" })
        expect(yield* errorsAfter(4)).toMatchObject({
          code: "INPUT_FAILED",
          message: `the page did not take the key: keyboard.press: Unknown key: "NoSuchKey"`
        })
        viewer.sendRaw(Buffer.from([1, 2, 3]))
        expect(yield* errorsAfter(5)).toMatchObject({
          code: "INVALID_FRAME",
          message: expect.stringContaining("binary")
        })
        expect(viewer.isClosed()).toBe(false)
        // Typing and a key press still reach the page: the checkbox toggled by Space removes the widget.
        const held = w.browser.sessionOf(job.id)!
        yield* Effect.promise(() => held.page.focus("#human"))
        viewer.send({ v: 1, type: "key", key: "Space" })
        yield* Effect.promise(() => held.page.waitForSelector("#done"))
        // Cancelling the job closes the page: the viewer is told, and the socket closes with 1000.
        yield* edge.jobs.cancel(job.id, "test over")
        const end = yield* viewer.closed()
        expect(end.code).toBe(1000)
        expect(viewer.frames.at(-1)).toMatchObject({
          type: "ended",
          reason: expect.stringContaining("closed")
        })
      })
    )

    it.scoped(
      "the gateway proxies the live view to the worker node that runs the job, found through the registry",
      () =>
        Effect.gen(function* () {
          const { base } = yield* site
          const edge = yield* startEdge("gw-l3")
          const a = yield* browserWorker("l3a")
          const b = yield* browserWorker("l3b")
          // Each worker's HTTP server put its address in the registry.
          const job = yield* edge.jobs.submit(
            heldRecipe(base, { target_worker_id: "w-l3b", worker_affinity: "strict" })
          )
          yield* statusIs(job.id, "needs_human")
          expect(a.browser.sessionOf(job.id)).toBeUndefined()
          const held = b.browser.sessionOf(job.id)!

          const viewer = yield* Ws.connect(`ws://127.0.0.1:${edge.gateway.port}/live/${job.id}/ws`)
          viewer.send({ v: 1, type: "auth", token: secret })
          const frame = yield* viewer.waitFor((fs) => fs.find((f) => f.type === "frame"))
          expect(viewer.frames[0]).toEqual({
            v: 1,
            type: "ready",
            job_id: job.id,
            worker_id: "w-l3b",
            page_url: held.page.url(),
            viewport: { width: 1280, height: 720 }
          })
          expect(frame).toMatchObject({
            seq: 1,
            format: "jpeg",
            width: 1280,
            height: 720,
            page_width: 1280,
            page_height: 720
          })
          expect([...Buffer.from(frame.data, "base64").subarray(0, 2)]).toEqual([0xff, 0xd8])
          // A click in frame pixels lands on the page on w-l3b.
          viewer.send({ v: 1, type: "click", x: checkbox.x, y: checkbox.y })
          yield* Effect.promise(() => held.page.waitForSelector("#done"))
          yield* edge.jobs.resume(job.id, { resolved_by: "human" })
          yield* statusIs(job.id, "completed")
          expect((yield* edge.jobs.get(job.id)).result).toMatchObject({ extracted: { done: "Solved" } })
          expect((yield* viewer.closed()).code).toBe(1000)
        })
    )
  })
})
