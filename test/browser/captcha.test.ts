/**
 * Captcha detection and the human hand-off in a real Chromium. Each vendor's markup is
 * served from a loopback page that loads the vendor's real script and iframe URLs; those
 * requests are answered locally through Playwright routing, so no request leaves the
 * machine. The fixture page removes its widget once the test marks it solved (as a human
 * would, by solving it): a resume before that brings a second `needs_human`, a resume after
 * it lets the recipe go on from where it stopped.
 */
import { describe, expect, layer } from "@effect/vitest"
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"
import * as Os from "node:os"
import * as Path from "node:path"
import * as Fs from "node:fs"
import * as ArtifactStore from "../../src/browser/ArtifactStore.ts"
import * as Browser from "../../src/browser/Browser.ts"
import * as WorkerHttp from "../../src/edge/WorkerHttp.ts"
import * as Recipe from "../../src/browser/Recipe.ts"
import * as Db from "../fixtures/Db.ts"
import * as Site from "../fixtures/Site.ts"
import { eventually, startGateway, startWorker, statusIs } from "../fixtures/Jobs.ts"

const chromiumPath = process.env.TROUPE_CHROMIUM ?? "/usr/bin/chromium"

/** Each captcha: its markup (marked `data-captcha`), what detection must say, the title it shows. */
const vendors = {
  recaptcha_v2: {
    markup: `<script src="https://www.google.com/recaptcha/api.js" async defer></script>
      <div class="g-recaptcha" data-sitekey="6Lc-test" data-captcha><iframe title="reCAPTCHA" width="304" height="78"
        src="https://www.google.com/recaptcha/api2/anchor?ar=1&k=6Lc-test&co=aHR0cDovLzEyNy4wLjAuMQ..&hl=en&v=test&size=normal"></iframe></div>`,
    captcha_type: "recaptcha_v2",
    element_selector: 'iframe[src*="/recaptcha/"][src*="anchor"]'
  },
  recaptcha_v2_invisible: {
    markup: `<script src="https://www.google.com/recaptcha/api.js" async defer></script>
      <div class="g-recaptcha" data-sitekey="6Lc-test" data-size="invisible" data-captcha></div>`,
    captcha_type: "recaptcha_v2",
    element_selector: '.g-recaptcha[data-size="invisible"]'
  },
  recaptcha_v3: {
    markup: `<script data-captcha src="https://www.google.com/recaptcha/api.js?render=6Lc-test"></script>`,
    captcha_type: "recaptcha_v3",
    element_selector: 'script[src*="/recaptcha/api.js?render="]'
  },
  hcaptcha: {
    markup: `<script src="https://js.hcaptcha.com/1/api.js" async defer></script>
      <div class="h-captcha" data-sitekey="10000000-ffff-ffff-ffff-000000000001" data-captcha><iframe width="303" height="78"
        src="https://newassets.hcaptcha.com/captcha/v1/test/static/hcaptcha.html#frame=checkbox&id=0&host=127.0.0.1"></iframe></div>`,
    captcha_type: "hcaptcha",
    element_selector: 'iframe[src*="hcaptcha.com"]'
  },
  turnstile: {
    markup: `<script src="https://challenges.cloudflare.com/turnstile/v0/api.js" async defer></script>
      <div class="cf-turnstile" data-sitekey="1x00000000000000000000AA" data-captcha><iframe width="300" height="65"
        src="https://challenges.cloudflare.com/cdn-cgi/challenge-platform/h/g/turnstile/if/ov2/av0/rcv0/0/test/1x00000000000000000000AA/auto/normal"></iframe></div>`,
    captcha_type: "cloudflare_turnstile",
    element_selector: 'iframe[src*="challenges.cloudflare.com"]'
  },
  cloudflare_challenge: {
    markup: `<div id="challenge-stage" data-captcha><h1>Checking if the site connection is secure</h1></div>
      <script src="/cdn-cgi/challenge-platform/h/g/orchestrate/chl_page/v1?ray=test"></script>`,
    captcha_type: "custom",
    element_selector: "#challenge-stage"
  },
  custom: {
    markup: `<div id="bot-check" data-captcha>Prove you are human</div>`,
    captcha_type: "custom",
    element_selector: "#bot-check"
  }
} as const

/** The fixture site: `/captcha/<vendor>/<key>` shows the widget until `/solve/<key>` is marked. */
const site = Effect.suspend(() => {
  const solved = new Set<string>()
  return Effect.map(
    Site.serve((req, res) => {
      const [path, query] = (req.url ?? "/").split("?")
      const late = query === "late"
      const [, what, vendor, key] = path!.split("/")
      if (what === "solved") return res.writeHead(200).end(solved.has(vendor!) ? "yes" : "no")
      if (what === "cdn-cgi") return res.writeHead(200, { "content-type": "text/javascript" }).end("")
      const v = vendors[vendor as keyof typeof vendors]
      if (what !== "captcha" || v === undefined) return res.writeHead(404).end()
      res
        .writeHead(200, { "content-type": "text/html" })
        .end(`<!doctype html><html><head><title>${
          vendor === "cloudflare_challenge" ? "Just a moment..." : "Apply"
        }</title></head><body>${late ? `<template id="later">${v.markup}</template>` : v.markup}<p id="form">The form</p>
        <script>
          ${late ? `setTimeout(() => document.body.prepend(document.getElementById("later").content.cloneNode(true)), 300)` : ""}
          const check = setInterval(async () => {
            const answer = await (await fetch("/solved/${key}")).text()
            if (answer !== "yes") return
            clearInterval(check)
            for (const e of document.querySelectorAll("[data-captcha]")) e.remove()
            document.title = "Apply"
            document.body.insertAdjacentHTML("beforeend", '<p id="done">Solved</p>')
          }, 30)
        </script></body></html>`)
    }),
    ({ base }) => ({ base, solve: (key: string) => void solved.add(key) })
  )
})

/** Every request to a vendor is answered here, never by the network. */
const vendorRequests: Array<string> = []
const answerVendorsLocally = Browser.make({
  executablePath: chromiumPath,
  onContext: async (context) => {
    await context.route(
      /^https:\/\/([a-z0-9-]+\.)*(google\.com|gstatic\.com|hcaptcha\.com|cloudflare\.com)\//,
      (route) => {
        vendorRequests.push(route.request().url())
        const isScript = route.request().resourceType() === "script"
        return route.fulfill({
          status: 200,
          contentType: isScript ? "text/javascript" : "text/html",
          body: isScript
            ? ""
            : "<!doctype html><html><body><div class='recaptcha-checkbox'></div></body></html>"
        })
      }
    )
  }
})

const interactionEvents = (jobId: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) =>
    Effect.map(
      sql<{
        n: number
      }>`SELECT count(*)::int AS n FROM gh_job_events WHERE job_id = ${jobId}::uuid AND event_type = 'interaction_needed'`,
      (rows) => rows[0]!.n
    )
  )

describe("captcha hand-off in Chromium", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "each captcha is detected with its type and selector; a resume while it is there asks again; once gone the recipe goes on",
      () =>
        Effect.gen(function* () {
          const { base, solve } = yield* site
          const browser = yield* answerVendorsLocally
          const dir = yield* Effect.acquireRelease(
            Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-artifacts-"))),
            (d) => Effect.sync(() => Fs.rmSync(d, { recursive: true, force: true }))
          )
          const artifacts = ArtifactStore.filesystem(dir)
          const { jobs } = yield* startGateway("gw-c1")
          const w = yield* startWorker("c1", { handlers: Recipe.handlers(browser, artifacts) })
          const http = yield* WorkerHttp.make(w.worker, { port: 0, host: "127.0.0.1", artifacts })
          artifacts.servedAt(`http://127.0.0.1:${http.port}`)
          const fetchPng = (url: string) =>
            Effect.promise(async () => {
              const res = await fetch(url)
              return {
                status: res.status,
                type: res.headers.get("content-type"),
                bytes: new Uint8Array(await res.arrayBuffer())
              }
            })
          for (const [vendor, expected] of Object.entries(vendors)) {
            const key = `${vendor}-${Date.now()}`
            const job = yield* jobs.submit({
              job_type: "recipe",
              payload: {
                steps: [
                  { action: "goto", url: `${base}/captcha/${vendor}/${key}` },
                  { action: "extract", as: "form", selector: "#form" }
                ],
                captcha: {
                  custom_selectors: vendor === "custom" ? ["#bot-check"] : [],
                  recheck_after_ms: 100
                }
              }
            })
            yield* statusIs(job.id, "needs_human")
            const held = yield* jobs.get(job.id)
            expect({ vendor, interaction: held.interaction }).toMatchObject({
              vendor,
              interaction: {
                type: "captcha",
                captcha_type: expected.captcha_type,
                element_selector: expected.element_selector,
                page_url: `${base}/captcha/${vendor}/${key}`,
                timeout_seconds: 300
              }
            })
            // The screenshot of the held page is served by the worker as a PNG.
            const shot = yield* fetchPng((held.interaction as { screenshot_url: string }).screenshot_url)
            expect({ status: shot.status, type: shot.type, magic: [...shot.bytes.slice(0, 4)] }).toEqual({
              status: 200,
              type: "image/png",
              magic: [0x89, 0x50, 0x4e, 0x47]
            })
            // Resumed while the captcha is still there: checked again, and a second needs_human.
            yield* jobs.resume(job.id, { resolved_by: "human" })
            yield* eventually(Effect.map(interactionEvents(job.id), (n) => (n === 2 ? true : undefined)))
            yield* statusIs(job.id, "needs_human")
            const again = (yield* jobs.get(job.id)).interaction as { message: string; screenshot_url: string }
            expect(again.message).toContain("after 1 re-check")
            // A fresh screenshot for the second hand-off.
            expect(again.screenshot_url).not.toBe(
              (held.interaction as { screenshot_url: string }).screenshot_url
            )
            // Solved: the widget goes, the resume lets the recipe go on from the step after the goto.
            solve(key)
            yield* jobs.resume(job.id, { resolved_by: "human" })
            yield* statusIs(job.id, "completed")
            expect((yield* jobs.get(job.id)).result).toMatchObject({ extracted: { form: "The form" } })
          }
          expect(vendorRequests.some((u) => u.startsWith("https://www.google.com/recaptcha/"))).toBe(true)
          expect(vendorRequests.some((u) => u.includes("hcaptcha.com"))).toBe(true)
          expect(vendorRequests.some((u) => u.startsWith("https://challenges.cloudflare.com/"))).toBe(true)
          expect(browser.stats().openContexts).toBe(0)
          // A token nobody was given finds nothing.
          expect((yield* fetchPng(`http://127.0.0.1:${http.port}/artifacts/${"A".repeat(32)}`)).status).toBe(
            404
          )
        })
    )

    it.scoped(
      "a step that fails because a captcha covers the page is tried again once the human has solved it",
      () =>
        Effect.gen(function* () {
          const { base, solve } = yield* site
          const browser = yield* answerVendorsLocally
          const { jobs } = yield* startGateway("gw-c2")
          yield* startWorker("c2", { handlers: Recipe.handlers(browser) })
          const key = `late-${Date.now()}`
          const job = yield* jobs.submit({
            job_type: "recipe",
            payload: {
              steps: [
                // The captcha comes 300 ms after the page has loaded: the goto sees none.
                { action: "goto", url: `${base}/captcha/hcaptcha/${key}?late` },
                // #done is only there once the captcha is solved: this step fails while it stands.
                { action: "wait_for", selector: "#done", timeout_ms: 1500, name: "wait for the form" },
                { action: "extract", as: "done", selector: "#done" }
              ],
              captcha: { recheck_after_ms: 50 }
            }
          })
          yield* statusIs(job.id, "needs_human")
          expect((yield* jobs.get(job.id)).interaction).toMatchObject({ captcha_type: "hcaptcha" })
          // The registry shows the worker's browser session and the page its job holds.
          const registry = Effect.flatMap(
            SqlClient.SqlClient,
            (sql) =>
              sql<{ browser_session_id: string | null; current_task_url: string | null }>`
            SELECT browser_session_id, current_task_url FROM gh_worker_registry WHERE worker_id = 'w-c2'`
          )
          expect((yield* registry)[0]).toEqual({
            browser_session_id: expect.stringMatching(/^chromium-1-\d+$/),
            current_task_url: `${base}/captcha/hcaptcha/${key}?late`
          })
          solve(key)
          yield* jobs.resume(job.id, { resolved_by: "human" })
          yield* statusIs(job.id, "completed")
          expect((yield* jobs.get(job.id)).result).toMatchObject({ extracted: { done: "Solved" } })
          // Cleared once the job has ended.
          yield* eventually(
            Effect.map(registry, (rows) =>
              rows[0]?.browser_session_id === null && rows[0]?.current_task_url === null ? true : undefined
            )
          )
          // The step failed once (the captcha), then passed on its second try.
          const steps = yield* Effect.flatMap(
            SqlClient.SqlClient,
            (sql) =>
              sql<{ event_type: string }>`SELECT event_type FROM gh_job_events WHERE job_id = ${job.id}::uuid
            AND event_type LIKE 'cookbook_step_%' AND message LIKE '%wait for the form%' ORDER BY id`
          )
          expect(steps.map((e) => e.event_type)).toEqual([
            "cookbook_step_started",
            "cookbook_step_failed",
            "cookbook_step_started",
            "cookbook_step_completed"
          ])
        })
    )
  })
})
