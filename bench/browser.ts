/**
 * The browser benchmark (`npm run bench -- browser [--quick] [--recheck-ms N]`): what a
 * recipe job costs over the same Playwright calls made by hand, on the same Chromium, in the
 * same run. Pages come from a node:http server on loopback (no network).
 *
 * A gateway node (job service, reaper) and a worker node (`Worker.make`, the built-in
 * `recipe` handler over `Browser.make`, `MAX_CONCURRENT_JOBS` 1) run in this process, each
 * with its own pool and LISTEN connection; jobs go in through `jobs.submit`, cancels and
 * resumes through `jobs.cancel` / `jobs.resume` (the JobActor on the worker's node).
 * In-process hooks take the times: the handler's `JobContext` is wrapped (its `report`,
 * `setProgress` and `needsHuman` are timed, then passed through) and so is the browser's
 * `session` (asked, open, closed). The "raw" side is a plain playwright-core script on the
 * same Chromium process (the `Browser` that `session().context.browser()` gives).
 *
 * 1. Recipe and session start, interleaved (a recipe job, then a raw run, `gapMs` apart):
 *    - `recipe_ms`: the 10-step recipe, from its first `cookbook_step_started` report being
 *      asked to its 10th `cookbook_step_completed` written; the job's fresh context and page
 *      are open before (not timed); inside: the 20 event writes, the captcha look-ups and
 *      registry writes after the steps that navigate.
 *      `raw_playwright_ms`: the same 10 calls (the ones Recipe.perform makes, with its
 *      options) on a fresh context and page opened before the timer.
 *    - `session_start`: `Browser.session` asked (before `newContext`) → step 1 (`goto`)'s
 *      `cookbook_step_completed` written; raw: `newContext` + `newPage` + `goto`.
 *    - whole: context asked → context closed (informational, both sides).
 * 2. Cancel mid-step: a recipe blocked in a `goto` of a page that never answers, or in a
 *    `wait_for` that never matches (alternately); `jobs.cancel` → the job's context closed
 *    and its handler ended (the worker's slot is freed on the handler's return), and → the
 *    front desk's answer (cancel recorded).
 * 3. Resume: a recipe whose `goto` lands on a page with a `custom` captcha selector waits for a
 *    human; the bench removes the element from the held page, then `jobs.resume` → step 2's
 *    `cookbook_step_started` asked. Overhead = that − `recheck_after_ms`.
 * 4. RSS per open context: `Browser.stats().rssBytes` with N sessions open on a loaded page
 *    against none (the sum over Chromium's processes, as `/metrics` shows it).
 * 5. Jobs per minute per worker at `MAX_CONCURRENT_JOBS` 1, 2, 4: a 3-step recipe, a batch
 *    submitted at once, submit → the last one `completed` in its row.
 */

import * as Fs from "node:fs"
import * as Http from "node:http"
import type { AddressInfo } from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { Effect, Exit, Layer, Runtime, Scope } from "effect"
import type { Browser as PwBrowser } from "playwright-core"
import * as Browser from "../src/browser/Browser.ts"
import * as Recipe from "../src/browser/Recipe.ts"
import * as Jobs from "../src/edge/Jobs.ts"
import * as Node from "../src/runtime/core/Node.ts"
import * as JobHandler from "../src/runtime/jobs/JobHandler.ts"
import * as Reaper from "../src/runtime/jobs/Reaper.ts"
import * as Worker from "../src/actors/WorkerActor.ts"
import * as Db from "./internal/db.ts"
import { Arrivals } from "./internal/peers.ts"
import {
  type CpuUse,
  cpuMeter,
  int,
  machine,
  ms,
  progress,
  round,
  type Summary,
  sleep,
  summarize,
  summaryMs,
  table,
  writeResult
} from "./internal/stats.ts"

// --- Settings ---

const sizes = {
  full: {
    recipe: { warmup: 3, samples: 40 },
    cancel: { warmup: 4, samples: 100 },
    resume: { warmup: 2, samples: 25 },
    rssContexts: 8,
    throughputJobs: 60
  },
  quick: {
    recipe: { warmup: 2, samples: 10 },
    cancel: { warmup: 2, samples: 20 },
    resume: { warmup: 1, samples: 6 },
    rssContexts: 4,
    throughputJobs: 16
  }
}

/** Pause between samples (a worker that is not flooded), and before a cancel or resume. */
const gapMs = 20

/** The configured `recheck_after_ms` of the resume phase (the recipe default is 2,500). */
const defaultRecheckMs = 500

const concurrencies = [1, 2, 4] as const

const targets = {
  recipe_ratio: 1.1,
  session_start_ratio: 1.2,
  browser_cancel_p50_ms: 20,
  browser_cancel_p99_ms: 100,
  resume_overhead_p99_ms: 50
}

/** Per-step timeout, as a recipe's default. */
const stepTimeout = 10_000

const usage =
  "usage: npm run bench -- browser [--quick] [--recheck-ms N]\n" +
  "  --quick          fewer samples (for development); writes bench/results/browser-quick.json\n" +
  `  --recheck-ms N   recheck_after_ms of the resume phase (default ${defaultRecheckMs})\n` +
  "Chromium: TROUPE_CHROMIUM (default /usr/bin/chromium); TROUPE_BROWSER_HEADLESS=false runs headful."

const parseArgs = (args: ReadonlyArray<string>) => {
  let quick = false
  let recheckMs = defaultRecheckMs
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!
    if (a === "--quick") quick = true
    else if (a === "--recheck-ms") {
      const v = args[++i]
      const n = Number(v)
      if (!Number.isInteger(n) || n < 0 || n > 60_000)
        throw new Error(`--recheck-ms takes a whole number from 0 to 60000, not "${v}"\n${usage}`)
      recheckMs = n
    } else throw new Error(`unknown argument "${a}"\n${usage}`)
  }
  return { quick, recheckMs }
}

// --- The site ---

const html = (title: string, body: string) =>
  `<!doctype html><html><head><title>${title}</title></head><body>${body}</body></html>`

/** The fixture site on loopback: a two-page form and its summary, a captcha page, a page that never answers. */
const serveSite = (hangs: Arrivals) =>
  new Promise<{ readonly base: string; readonly close: () => void }>((resolve) => {
    const server = Http.createServer((req, res) => {
      const url = new URL(req.url ?? "/", "http://x")
      const page = (body: string) => res.writeHead(200, { "content-type": "text/html" }).end(body)
      const q = (k: string) => url.searchParams.get(k) ?? ""
      switch (url.pathname) {
        case "/apply":
          return page(
            html(
              "Apply",
              `<form action="/details" method="get"><label>Name <input id="name" name="name"></label>
               <button id="next" type="submit">Next</button></form>`
            )
          )
        case "/details":
          return page(
            html(
              "Details",
              `<p id="greeting">Hello ${q("name")}</p>
               <form action="/done" method="get"><input type="hidden" name="name" value="${q("name")}">
               <select id="role" name="role"><option value="dev">Developer</option><option value="ops">Operator</option></select>
               <input id="agree" type="checkbox" name="agree" value="yes"> <button id="submit" type="submit">Submit</button></form>`
            )
          )
        case "/done":
          return page(
            html("Done", `<p id="summary">Applied: ${q("name")} as ${q("role")}, agreed ${q("agree") || "no"}</p>`)
          )
        case "/captcha":
          return page(html("Apply", `<div id="bot-check">Prove you are human</div><p id="form">The form</p>`))
        case "/hang":
          // Never answered: the goto waits until the context closes.
          hangs.arrive(Number(q("seq")), performance.now())
          return
        default:
          res.writeHead(404).end()
      }
    })
    server.listen(0, "127.0.0.1", () =>
      resolve({
        base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => {
          server.closeAllConnections()
          server.close()
        }
      })
    )
  })

/** The 10-step recipe (each step kind a job application uses, across three pages). */
const tenSteps = (base: string): ReadonlyArray<Recipe.Step> => [
  { action: "goto", url: `${base}/apply` },
  { action: "fill", selector: "#name", value: "Ada" },
  { action: "click", selector: "#next" },
  { action: "wait_for", url: "**/details?*" },
  { action: "assert_text", selector: "#greeting", text: "Hello Ada" },
  { action: "select", selector: "#role", value: "ops" },
  { action: "check", selector: "#agree" },
  { action: "click", selector: "#submit" },
  { action: "wait_for", selector: "#summary" },
  { action: "extract", as: "summary", selector: "#summary" }
]

const expectedSummary = "Applied: Ada as ops, agreed yes"

/** The short recipe of the throughput phase. */
const shortSteps = (base: string): ReadonlyArray<Recipe.Step> => [
  { action: "goto", url: `${base}/apply` },
  { action: "fill", selector: "#name", value: "Ada" },
  { action: "extract", as: "label", selector: "label" }
]

/**
 * The same 10 steps as a plain Playwright script, with the calls and options Recipe.perform
 * uses; the times: context asked, context and page open, goto done, steps done, closed.
 */
const rawRun = async (pw: PwBrowser, base: string) => {
  const t0 = performance.now()
  const context = await pw.newContext()
  try {
    const page = await context.newPage()
    const t1 = performance.now()
    const timeout = stepTimeout
    await page.goto(`${base}/apply`, { timeout, waitUntil: "load" })
    const t2 = performance.now()
    await page.fill("#name", "Ada", { timeout })
    await page.click("#next", { timeout })
    await page.waitForURL("**/details?*", { timeout })
    const greeting = await page.locator("#greeting").first().innerText({ timeout })
    if (!greeting.includes("Hello Ada")) throw new Error(`raw run: expected "Hello Ada", found "${greeting}"`)
    await page.selectOption("#role", "ops", { timeout })
    await page.check("#agree", { timeout })
    await page.click("#submit", { timeout })
    await page.waitForSelector("#summary", { timeout })
    const summary = await page.locator("#summary").first().innerText({ timeout })
    const t3 = performance.now()
    await context.close()
    const t4 = performance.now()
    if (summary !== expectedSummary) throw new Error(`raw run: extracted "${summary}"`)
    return { sessionStart: t2 - t0, steps: t3 - t1, whole: t4 - t0, close: t4 - t3 }
  } finally {
    await context.close().catch(() => undefined)
  }
}

// --- Hooks: the times of a job's handler and session, taken in this process ---

/** What the hooks saw of one job (performance.now() times). */
interface Trace {
  sessionAsked?: number
  sessionOpen?: number
  /** The session's scope began to close (the handler returned or was interrupted). */
  closing?: number
  sessionClosed?: number
  handlerEntered?: number
  handlerEnded?: number
  /** By step index (1-based): `cookbook_step_started` asked, `cookbook_step_completed` written. */
  readonly stepAsked: Map<number, number>
  readonly stepDone: Map<number, number>
  needsHuman?: number
  resumed?: number
}

class Traces {
  private readonly byJob = new Map<string, Trace>()
  /** `<jobId>:<what>` when it happens: what the bench waits on. */
  readonly signals = new Arrivals<string, number>()
  /** Handlers that ended, and a wait for a count. */
  ended = 0

  of(jobId: string): Trace {
    let t = this.byJob.get(jobId)
    if (t === undefined) {
      t = { stepAsked: new Map(), stepDone: new Map() }
      this.byJob.set(jobId, t)
    }
    return t
  }

  forget(jobId: string): void {
    this.byJob.delete(jobId)
  }

  /** Wait for `<jobId>:<what>`, failing after `timeoutMs`. */
  async wait(jobId: string, what: string, timeoutMs = 20_000): Promise<number> {
    const at = await this.signals.wait(`${jobId}:${what}`, timeoutMs)
    if (at === undefined) throw new Error(`job ${jobId}: ${what} did not happen within ${timeoutMs} ms`)
    return at
  }
}

/** The handlers, each under a `JobContext` whose calls are timed on the way through. */
const instrument = (handlers: JobHandler.Handlers, traces: Traces): JobHandler.Handlers =>
  Object.fromEntries(
    Object.entries(handlers).map(([jobType, handler]) => [
      jobType,
      Effect.flatMap(JobHandler.JobContext, (ctx) => {
        const t = traces.of(ctx.jobId)
        t.handlerEntered = performance.now()
        let index = 0
        const timed: JobHandler.JobContextShape = {
          ...ctx,
          setProgress: (p) => {
            index = p.index
            return ctx.setProgress(p)
          },
          report: (eventType, message, metadata) => {
            const step = index
            if (eventType === "cookbook_step_started") t.stepAsked.set(step, performance.now())
            return Effect.tap(ctx.report(eventType, message, metadata), () => {
              const at = performance.now()
              if (eventType === "cookbook_step_started") traces.signals.arrive(`${ctx.jobId}:started:${step}`, at)
              if (eventType === "cookbook_step_completed") t.stepDone.set(step, at)
            })
          },
          needsHuman: (interaction) =>
            Effect.suspend(() => {
              const at = performance.now()
              t.needsHuman = at
              traces.signals.arrive(`${ctx.jobId}:needs-human`, at)
              return Effect.tap(ctx.needsHuman(interaction), () => {
                t.resumed = performance.now()
              })
            })
        }
        return Effect.provideService(handler, JobHandler.JobContext, timed).pipe(
          Effect.ensuring(
            Effect.sync(() => {
              const at = performance.now()
              t.handlerEnded = at
              traces.ended++
              traces.signals.arrive(`${ctx.jobId}:ended`, at)
            })
          )
        )
      })
    ])
  )

/** The browser, with its sessions timed: asked, open, and closed (after its context closed). */
const traced = (browser: Browser.Browser, traces: Traces): Browser.Browser => ({
  ...browser,
  session: (jobId) =>
    Effect.gen(function* () {
      const t = jobId === undefined ? undefined : traces.of(jobId)
      const asked = performance.now()
      // Added first, so it runs last: after the context's own release.
      yield* Effect.addFinalizer(() =>
        Effect.sync(() => {
          if (t === undefined || jobId === undefined) return
          const at = performance.now()
          t.sessionClosed = at
          traces.signals.arrive(`${jobId}:closed`, at)
        })
      )
      const session = yield* browser.session(jobId)
      if (t !== undefined) {
        t.sessionAsked = asked
        t.sessionOpen = performance.now()
        // Added last, so it runs first: the scope begins to close (before the context's release).
        yield* Effect.addFinalizer(() => Effect.sync(() => void (t.closing = performance.now())))
      }
      return session
    })
})

// --- Measurements ---

interface Measured {
  readonly chromium: string
  readonly headless: boolean
  readonly launches: number
  readonly version: string | null
  readonly recipe: Summary
  readonly raw: Summary
  readonly sessionStart: Summary
  readonly rawSessionStart: Summary
  readonly recipeWhole: Summary
  readonly rawWhole: Summary
  readonly cancel: Summary
  readonly cancelClosed: Summary
  readonly cancelClosing: Summary
  readonly cancelContextClose: Summary
  readonly contextClose: Summary
  readonly rawContextClose: Summary
  readonly cancelReply: Summary
  readonly cancelByKind: Record<"goto" | "wait_for", Summary>
  readonly cancelChecks: { readonly samples: number; readonly context_open_at_reply: number; readonly running_at_reply: number }
  readonly resumeOverhead: Summary
  readonly resumeContinue: Summary
  readonly resumeReply: Summary
  readonly resumeHandler: Summary
  readonly recheckMs: number
  readonly rss: {
    readonly contexts: number
    readonly idle_bytes: number
    readonly open_bytes: number
    readonly after_close_bytes: number
    readonly per_context_mb: number
    readonly pss_idle_bytes: number
    readonly pss_open_bytes: number
    readonly pss_per_context_mb: number
    readonly processes_idle: number
    readonly processes_open: number
    readonly processes_after_close: number
  }
  readonly throughput: ReadonlyArray<{
    readonly max_concurrent: number
    readonly jobs: number
    readonly seconds: number
    readonly jobs_per_min: number
    readonly handler: Summary
    readonly cpu: CpuUse
  }>
}

const measure = (db: Db.BenchDatabase, size: (typeof sizes)["full"], recheckMs: number) =>
  Effect.gen(function* () {
    const runtime = yield* Effect.runtime<never>()
    const run = <A, E>(effect: Effect.Effect<A, E>) => Runtime.runPromise(runtime)(effect)
    const traces = new Traces()
    const hangs = new Arrivals()
    const site = yield* Effect.acquireRelease(
      Effect.promise(() => serveSite(hangs)),
      (s) => Effect.sync(s.close)
    )
    const { base } = site

    const options = yield* Effect.orDie(Browser.OptionsConfig)
    if (!Fs.existsSync(options.executablePath))
      return yield* Effect.die(
        new Error(`no Chromium at ${options.executablePath}: install it or set TROUPE_CHROMIUM to its path`)
      )
    const browser = yield* Browser.make(options)
    const handlers = instrument(Recipe.handlers(traced(browser, traces)), traces)

    // --- Gateway node ---
    const gw = yield* Node.make({ nodeId: "bench-browser-gw" })
    const jobs = yield* Jobs.make(gw)
    yield* Reaper.make({ nodeId: gw.id })

    /** A worker node with its own pool, in its own scope. */
    const workerNode = (name: string, maxConcurrent: number) =>
      Effect.gen(function* () {
        const scope = yield* Scope.make()
        const ctx = yield* Layer.buildWithScope(
          Db.clientLayer(db.url, { applicationName: `bench-browser-${name}`, maxConnections: 16 }),
          scope
        )
        const node = yield* Node.make({ nodeId: name }).pipe(Scope.extend(scope), Effect.provide(ctx))
        const worker = yield* Worker.make(node, { workerId: name, maxConcurrent, handlers }).pipe(
          Scope.extend(scope),
          Effect.provide(ctx)
        )
        yield* Effect.sleep("200 millis")
        return { worker, close: Scope.close(scope, Exit.void) }
      })

    const submit = (payload: Recipe.Recipe) =>
      run(jobs.submit({ job_type: "recipe", payload })).then((job) => job.id)

    /** Wait for the job's row to reach a terminal status (polled, outside any timing). */
    const settled = async (jobId: string, timeoutMs = 20_000) => {
      const until = performance.now() + timeoutMs
      while (true) {
        const job = await run(jobs.get(jobId))
        if (["completed", "failed", "cancelled"].includes(job.status)) return job
        if (performance.now() > until) throw new Error(`job ${jobId} still ${job.status} after ${timeoutMs} ms`)
        await sleep(5)
      }
    }
    const statusIs = async (jobId: string, status: string, timeoutMs = 20_000) => {
      const until = performance.now() + timeoutMs
      while (true) {
        const job = await run(jobs.get(jobId))
        if (job.status === status) return job
        if (performance.now() > until) throw new Error(`job ${jobId} is ${job.status}, not ${status}, after ${timeoutMs} ms`)
        await sleep(5)
      }
    }

    const main = yield* workerNode("bench-browser-w1", 1)

    return yield* Effect.promise(async (): Promise<Measured> => {
      // --- Warm-up: launch the browser with a first job ---
      progress(`Chromium ${options.executablePath} (headless ${options.headless}): warm-up job`)
      const first = await submit({ steps: tenSteps(base) })
      const warm = await settled(first, 60_000)
      if (warm.status !== "completed") throw new Error(`the warm-up job ended ${warm.status}: ${JSON.stringify(warm)}`)
      progress(`  Chromium ${browser.stats().version}, launched`)
      // The raw side drives the same Chromium process.
      const pw = await run(Effect.scoped(Effect.map(browser.session(), (s) => s.context.browser())))
      if (pw === null) throw new Error("the session's context has no browser")

      // --- Recipe and session start, interleaved ---
      progress(
        `recipe vs raw Playwright, 10 steps: ${size.recipe.warmup} warm-up + ${size.recipe.samples} pairs, ${gapMs} ms apart`
      )
      const recipeMs: Array<number> = []
      const rawMs: Array<number> = []
      const startMs: Array<number> = []
      const rawStartMs: Array<number> = []
      const wholeMs: Array<number> = []
      const rawWholeMs: Array<number> = []
      const rawCloseMs: Array<number> = []
      const closeMs: Array<number> = []
      for (let i = 0; i < size.recipe.warmup + size.recipe.samples; i++) {
        const jobId = await submit({ steps: tenSteps(base) })
        await traces.wait(jobId, "ended")
        const job = await settled(jobId)
        const extracted = (job.result as { extracted?: { summary?: string } } | null)?.extracted?.summary
        if (job.status !== "completed" || extracted !== expectedSummary)
          throw new Error(`recipe job ${jobId} ended ${job.status} with ${JSON.stringify(job.result ?? job)}`)
        const t = traces.of(jobId)
        await sleep(gapMs)
        const raw = await rawRun(pw, base)
        await sleep(gapMs)
        if (i < size.recipe.warmup) continue
        recipeMs.push(t.stepDone.get(10)! - t.stepAsked.get(1)!)
        startMs.push(t.stepDone.get(1)! - t.sessionAsked!)
        wholeMs.push(t.sessionClosed! - t.sessionAsked!)
        rawMs.push(raw.steps)
        rawStartMs.push(raw.sessionStart)
        rawWholeMs.push(raw.whole)
        rawCloseMs.push(raw.close)
        closeMs.push(t.sessionClosed! - t.closing!)
        traces.forget(jobId)
      }
      const recipe = summarize(recipeMs)
      const raw = summarize(rawMs)
      progress(
        `  recipe p50 ${ms(recipe.p50)}, raw p50 ${ms(raw.p50)}; session start p50 ${ms(summarize(startMs).p50)}, raw ${ms(summarize(rawStartMs).p50)}`
      )

      // --- Cancel mid-step ---
      progress(
        `cancel mid-step (goto of a page that never answers / wait_for that never matches): ${size.cancel.warmup} warm-up + ${size.cancel.samples} samples`
      )
      const cancelMs: Array<number> = []
      const closedMs: Array<number> = []
      const closingMs: Array<number> = []
      const cancelCloseMs: Array<number> = []
      const replyMs: Array<number> = []
      const byKind = { goto: [] as Array<number>, wait_for: [] as Array<number> }
      let contextOpenAtReply = 0
      let runningAtReply = 0
      for (let seq = 0; seq < size.cancel.warmup + size.cancel.samples; seq++) {
        const kind = seq % 2 === 0 ? "goto" : "wait_for"
        const steps: ReadonlyArray<Recipe.Step> =
          kind === "goto"
            ? [{ action: "goto", url: `${base}/hang?seq=${seq}`, timeout_ms: 600_000 }]
            : [
                { action: "goto", url: `${base}/apply` },
                { action: "wait_for", selector: "#never", timeout_ms: 600_000 }
              ]
        const jobId = await submit({ steps })
        await traces.wait(jobId, `started:${steps.length}`)
        if (kind === "goto" && (await hangs.wait(seq, 20_000)) === undefined)
          throw new Error(`cancel: the goto of job ${jobId} never reached the site`)
        // The step is under way: cancel, as a user would a moment later.
        await sleep(gapMs)
        if (browser.stats().openContexts !== 1) throw new Error(`cancel: ${browser.stats().openContexts} contexts open`)
        const t0 = performance.now()
        const state = await run(jobs.cancel(jobId, "bench"))
        const replied = performance.now()
        if (browser.stats().openContexts !== 0) contextOpenAtReply++
        if (main.worker.stats().running !== 0) runningAtReply++
        if (state.status !== "cancelled") throw new Error(`cancel: job ${jobId} is ${state.status}`)
        const closed = await traces.wait(jobId, "closed")
        const ended = await traces.wait(jobId, "ended")
        if (seq >= size.cancel.warmup) {
          const free = Math.max(closed, ended) - t0
          cancelMs.push(free)
          closedMs.push(closed - t0)
          const closing = traces.of(jobId).closing!
          closingMs.push(closing - t0)
          cancelCloseMs.push(closed - closing)
          replyMs.push(replied - t0)
          byKind[kind].push(free)
        }
        traces.forget(jobId)
        await sleep(gapMs)
      }
      const cancel = summarize(cancelMs)
      progress(`  context closed and slot free p50 ${ms(cancel.p50)}, p99 ${ms(cancel.p99)}`)
      if (browser.stats().openContexts !== 0) throw new Error("cancel: contexts left open")

      // --- Resume after a captcha ---
      progress(
        `resume after a captcha (custom selector, recheck_after_ms ${recheckMs}): ${size.resume.warmup} warm-up + ${size.resume.samples} samples`
      )
      const overheadMs: Array<number> = []
      const continueMs: Array<number> = []
      const resumeReplyMs: Array<number> = []
      const resumeHandlerMs: Array<number> = []
      for (let i = 0; i < size.resume.warmup + size.resume.samples; i++) {
        const jobId = await submit({
          steps: [
            { action: "goto", url: `${base}/captcha` },
            { action: "extract", as: "form", selector: "#form" }
          ],
          captcha: { custom_selectors: ["#bot-check"], recheck_after_ms: recheckMs }
        })
        await traces.wait(jobId, "needs-human")
        await statusIs(jobId, "needs_human")
        // The human solves it: the widget goes from the held page.
        const held = browser.sessionOf(jobId)
        if (held === undefined) throw new Error(`resume: no open session for job ${jobId}`)
        await held.page.evaluate('document.querySelector("#bot-check").remove()')
        await sleep(gapMs)
        const t0 = performance.now()
        await run(jobs.resume(jobId, { resolved_by: "human" }))
        const replied = performance.now()
        await traces.wait(jobId, "started:2")
        const job = await settled(jobId)
        if (job.status !== "completed") throw new Error(`resume: job ${jobId} ended ${job.status}`)
        const t = traces.of(jobId)
        if (i >= size.resume.warmup) {
          const next = t.stepAsked.get(2)!
          continueMs.push(next - t0)
          overheadMs.push(next - t0 - recheckMs)
          resumeReplyMs.push(replied - t0)
          resumeHandlerMs.push(t.resumed! - t0)
        }
        traces.forget(jobId)
        await sleep(gapMs)
      }
      const resumeOverhead = summarize(overheadMs)
      progress(`  overhead over the wait p50 ${ms(resumeOverhead.p50)}, p99 ${ms(resumeOverhead.p99)}`)

      await run(main.close)

      // --- RSS per open context ---
      progress(`RSS: ${size.rssContexts} open contexts (a loaded page each) against none`)
      const rssSettled = async () => {
        await sleep(1_000)
        const reads: Array<number> = []
        const pss: Array<number> = []
        for (let k = 0; k < 5; k++) {
          reads.push(browser.stats().rssBytes)
          const memory = treeMemory(browser.pid())
          pss.push(memory.pssBytes)
          processes = memory.processes
          await sleep(100)
        }
        return { rss: summarize(reads).p50, pss: summarize(pss).p50, processes }
      }
      let processes = 0
      const idle = await rssSettled()
      const scope = Effect.runSync(Scope.make())
      let open = idle
      try {
        for (let k = 0; k < size.rssContexts; k++) {
          const s = await run(browser.session().pipe(Scope.extend(scope)))
          await s.page.goto(`${base}/apply`, { waitUntil: "load" })
        }
        if (browser.stats().openContexts !== size.rssContexts)
          throw new Error(`rss: ${browser.stats().openContexts} contexts open`)
        open = await rssSettled()
      } finally {
        await run(Scope.close(scope, Exit.void))
      }
      const afterClose = await rssSettled()
      const perContextMb = (open.rss - idle.rss) / size.rssContexts / 2 ** 20
      const pssPerContextMb = (open.pss - idle.pss) / size.rssContexts / 2 ** 20
      progress(
        `  RSS ${round(idle.rss / 2 ** 20, 1)} MB idle, ${round(open.rss / 2 ** 20, 1)} MB open: ${round(perContextMb, 1)} MB a context (PSS ${round(pssPerContextMb, 1)} MB)`
      )

      // --- Jobs per minute per worker ---
      const throughput: Array<Measured["throughput"][number]> = []
      for (const c of concurrencies) {
        progress(`throughput: MAX_CONCURRENT_JOBS ${c}, ${size.throughputJobs} short recipe jobs submitted at once`)
        const w = await run(workerNode(`bench-browser-tp${c}`, c))
        try {
          // Warm-up: one round of the slots.
          const warmIds = await run(
            jobs.submitMany(Array.from({ length: c }, () => ({ job_type: "recipe", payload: { steps: shortSteps(base) } })))
          )
          for (const j of warmIds) await settled(j.id)
          const stop = cpuMeter(db.serverPid)
          const t0 = performance.now()
          const submitted = await run(
            jobs.submitMany(
              Array.from({ length: size.throughputJobs }, () => ({
                job_type: "recipe",
                payload: { steps: shortSteps(base) }
              }))
            )
          )
          const ids = submitted.map((j) => j.id)
          for (const id of ids) await traces.wait(id, "ended", 120_000)
          // Done when the last row says completed.
          while (true) {
            const rows = await Db.query<{ n: number }>(
              db.url,
              "SELECT count(*)::int AS n FROM gh_automation_jobs WHERE id = ANY($1::uuid[]) AND status = 'completed'",
              [ids]
            )
            if (rows[0]!.n === ids.length) break
            const bad = await Db.query<{ n: number }>(
              db.url,
              "SELECT count(*)::int AS n FROM gh_automation_jobs WHERE id = ANY($1::uuid[]) AND status IN ('failed', 'cancelled')",
              [ids]
            )
            if (bad[0]!.n > 0) throw new Error(`throughput: ${bad[0]!.n} jobs did not complete`)
            await sleep(2)
          }
          const seconds = (performance.now() - t0) / 1000
          const cpu = stop()
          const handler = summarize(ids.map((id) => traces.of(id).handlerEnded! - traces.of(id).handlerEntered!))
          for (const id of ids) traces.forget(id)
          const jobsPerMin = (ids.length / seconds) * 60
          throughput.push({ max_concurrent: c, jobs: ids.length, seconds, jobs_per_min: jobsPerMin, handler, cpu })
          progress(`  ${Math.round(jobsPerMin)} jobs/min (handler p50 ${ms(handler.p50)})`)
        } finally {
          await run(w.close)
        }
      }

      return {
        chromium: options.executablePath,
        headless: options.headless,
        launches: browser.stats().launches,
        version: browser.stats().version,
        recipe,
        raw,
        sessionStart: summarize(startMs),
        rawSessionStart: summarize(rawStartMs),
        recipeWhole: summarize(wholeMs),
        rawWhole: summarize(rawWholeMs),
        cancel,
        cancelClosed: summarize(closedMs),
        cancelClosing: summarize(closingMs),
        cancelContextClose: summarize(cancelCloseMs),
        contextClose: summarize(closeMs),
        rawContextClose: summarize(rawCloseMs),
        cancelReply: summarize(replyMs),
        cancelByKind: { goto: summarize(byKind.goto), wait_for: summarize(byKind.wait_for) },
        cancelChecks: {
          samples: cancelMs.length + size.cancel.warmup,
          context_open_at_reply: contextOpenAtReply,
          running_at_reply: runningAtReply
        },
        resumeOverhead,
        resumeContinue: summarize(continueMs),
        resumeReply: summarize(resumeReplyMs),
        resumeHandler: summarize(resumeHandlerMs),
        recheckMs,
        rss: {
          contexts: size.rssContexts,
          idle_bytes: idle.rss,
          open_bytes: open.rss,
          after_close_bytes: afterClose.rss,
          per_context_mb: perContextMb,
          pss_idle_bytes: idle.pss,
          pss_open_bytes: open.pss,
          pss_per_context_mb: pssPerContextMb,
          processes_idle: idle.processes,
          processes_open: open.processes,
          processes_after_close: afterClose.processes
        },
        throughput
      }
    })
  }).pipe(
    Effect.scoped,
    Effect.provide(Db.clientLayer(db.url, { applicationName: "bench-browser-gw", maxConnections: 16 }))
  )

/** PSS of a process and its descendants (Linux /proc; zeros elsewhere), and how many there are. */
const treeMemory = (root: number | undefined): { readonly pssBytes: number; readonly processes: number } => {
  if (root === undefined) return { pssBytes: 0, processes: 0 }
  const children = new Map<number, Array<number>>()
  for (const entry of Fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = Fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1])
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)])
    } catch {
      // gone meanwhile
    }
  }
  let pssKb = 0
  let processes = 0
  const todo = [root]
  while (todo.length > 0) {
    const pid = todo.pop()!
    todo.push(...(children.get(pid) ?? []))
    try {
      const rollup = Fs.readFileSync(`/proc/${pid}/smaps_rollup`, "utf8")
      pssKb += Number(/^Pss:\s+(\d+) kB/m.exec(rollup)?.[1] ?? 0)
      processes++
    } catch {
      // gone meanwhile, or a zombie
    }
  }
  return { pssBytes: pssKb * 1024, processes }
}

// --- Main ---

export const main = async (args: ReadonlyArray<string>): Promise<void> => {
  const { quick, recheckMs } = parseArgs(args)
  const size = quick ? sizes.quick : sizes.full
  const startedAt = new Date()
  const host = machine()
  const wall = performance.now()
  progress(
    `browser benchmark${quick ? " (--quick)" : ""}: ${host.cpus} cores, Node ${host.node_version}, load average ${host.load_average_at_start.join(" ")}`
  )
  const db = await Db.open(progress)
  try {
    const server = await Db.serverInfo(db.url)
    progress(`database ${db.name} on PostgreSQL ${server.version} (${db.server})`)
    const m = await Effect.runPromise(measure(db, size, recheckMs))

    // --- Report ---
    const r3 = (x: number) => round(x, 3)
    const verdict = (value: number, limit: number) => ({
      target: `<= ${limit}`,
      value: r3(value),
      pass: Number.isFinite(value) && value <= limit
    })
    const recipeRatio = m.recipe.p50 / m.raw.p50
    const startRatio = m.sessionStart.p50 / m.rawSessionStart.p50
    const wholeRatio = m.recipeWhole.p50 / m.rawWhole.p50
    const verdicts = {
      recipe_ratio: verdict(recipeRatio, targets.recipe_ratio),
      session_start_ratio: verdict(startRatio, targets.session_start_ratio),
      browser_cancel_p50_ms: verdict(m.cancel.p50, targets.browser_cancel_p50_ms),
      browser_cancel_p99_ms: verdict(m.cancel.p99, targets.browser_cancel_p99_ms),
      resume_overhead_p99_ms: verdict(m.resumeOverhead.p99, targets.resume_overhead_p99_ms)
    }
    const mark = (pass: boolean) => (pass ? "met" : "MISSED")
    const row = (label: string, s: Summary, target?: { readonly text: string; readonly pass: boolean }) => [
      label,
      ms(s.p50),
      ms(s.p99),
      ms(s.max),
      target?.text ?? "",
      target === undefined ? "" : mark(target.pass)
    ]
    const ratioRow = (label: string, ratio: number, target?: { readonly text: string; readonly pass: boolean }) => [
      label,
      `${ratio.toFixed(3)}×`,
      "",
      "",
      target?.text ?? "",
      target === undefined ? "" : mark(target.pass)
    ]
    const rows: Array<Array<string>> = [
      ["measurement", "p50", "p99", "max", "target", ""],
      row("10-step recipe job (recipe_ms)", m.recipe),
      row("  the same 10 calls, plain Playwright (raw_playwright_ms)", m.raw),
      ratioRow("  recipe ÷ raw, medians", recipeRatio, {
        text: `≤ ${targets.recipe_ratio}×`,
        pass: verdicts.recipe_ratio.pass
      }),
      row("session start: context asked → step 1 done", m.sessionStart),
      row("  raw newContext + newPage + goto", m.rawSessionStart),
      ratioRow("  session ÷ raw, medians", startRatio, {
        text: `≤ ${targets.session_start_ratio}×`,
        pass: verdicts.session_start_ratio.pass
      }),
      row("whole job session: context asked → closed", m.recipeWhole),
      row("  raw newContext → 10 calls → close", m.rawWhole),
      ratioRow("  whole ÷ raw, medians", wholeRatio),
      row("cancel mid-step → context closed, slot free", m.cancel, {
        text: `p50 ≤ ${targets.browser_cancel_p50_ms}, p99 ≤ ${targets.browser_cancel_p99_ms} ms`,
        pass: verdicts.browser_cancel_p50_ms.pass && verdicts.browser_cancel_p99_ms.pass
      }),
      row("  … during a goto that never loads", m.cancelByKind.goto),
      row("  … during a wait_for that never matches", m.cancelByKind.wait_for),
      row("  cancel → context closed", m.cancelClosed),
      row("  cancel → the session's scope closing (handler interrupted)", m.cancelClosing),
      row("  context.close() of the cancelled job", m.cancelContextClose),
      row("  context.close() of a completed recipe job", m.contextClose),
      row("  raw context.close() after the 10 calls", m.rawContextClose),
      row("  cancel → front desk's answer (cancelled recorded)", m.cancelReply),
      row(`resume → step 2 started, less the ${m.recheckMs} ms wait`, m.resumeOverhead, {
        text: `p99 ≤ ${targets.resume_overhead_p99_ms} ms`,
        pass: verdicts.resume_overhead_p99_ms.pass
      }),
      row("  resume → step 2 started (wait included)", m.resumeContinue),
      row("  resume → front desk's answer", m.resumeReply),
      row("  resume → the handler's needs_human returns", m.resumeHandler)
    ]
    const mb = (bytes: number) => `${round(bytes / 2 ** 20, 1)} MB`
    const reported: Array<Array<string>> = [
      ["reported", "value", "detail"],
      [
        "Chromium RSS per open context (rss_per_context_mb)",
        `${round(m.rss.per_context_mb, 1)} MB`,
        `${m.rss.contexts} contexts: ${mb(m.rss.open_bytes)} against ${mb(m.rss.idle_bytes)} with none (${mb(m.rss.after_close_bytes)} after closing); ${m.rss.processes_idle} → ${m.rss.processes_open} processes`
      ],
      [
        "  the same in PSS (shared pages split between processes)",
        `${round(m.rss.pss_per_context_mb, 1)} MB`,
        `${mb(m.rss.pss_open_bytes)} against ${mb(m.rss.pss_idle_bytes)}`
      ],
      ...m.throughput.map((t) => [
        `jobs/min per worker, MAX_CONCURRENT_JOBS ${t.max_concurrent}`,
        int(t.jobs_per_min),
        `${t.jobs} 3-step recipe jobs in ${t.seconds.toFixed(2)} s; handler p50 ${ms(t.handler.p50)}; CPU: bench process ${t.cpu.process_pct_of_core} %, Postgres ${t.cpu.postgres_pct_of_core} %, others (Chromium) ${t.cpu.others_pct_of_core} % of a core`
      ])
    ]
    const wallSeconds = (performance.now() - wall) / 1000
    console.log("")
    console.log(
      `browser benchmark${quick ? " (--quick)" : ""}, ${startedAt.toISOString()}: Chromium ${m.version}, PostgreSQL ${server.version} (${db.server}), Node ${host.node_version}, ${host.cpus} cores`
    )
    console.log(table(rows))
    console.log("")
    console.log(table(reported))
    console.log(
      `cancel checks: ${m.cancelChecks.context_open_at_reply} of ${m.cancelChecks.samples} answers came with the context still open, ${m.cancelChecks.running_at_reply} with the run still counted; browser launches over the run: ${m.launches}`
    )

    const result = {
      benchmark: "browser",
      date: startedAt.toISOString(),
      quick,
      duration_s: round(wallSeconds, 1),
      recipe_ms: r3(m.recipe.p50),
      raw_playwright_ms: r3(m.raw.p50),
      recipe_ratio: r3(recipeRatio),
      session_start_p50_ms: r3(m.sessionStart.p50),
      session_start_p99_ms: r3(m.sessionStart.p99),
      raw_session_start_p50_ms: r3(m.rawSessionStart.p50),
      raw_session_start_p99_ms: r3(m.rawSessionStart.p99),
      session_start_ratio: r3(startRatio),
      session_start_p99_ratio: r3(m.sessionStart.p99 / m.rawSessionStart.p99),
      browser_cancel_p50_ms: r3(m.cancel.p50),
      browser_cancel_p99_ms: r3(m.cancel.p99),
      recheck_after_ms: m.recheckMs,
      resume_overhead_p50_ms: r3(m.resumeOverhead.p50),
      resume_overhead_p99_ms: r3(m.resumeOverhead.p99),
      rss_per_context_mb: round(m.rss.per_context_mb, 2),
      pss_per_context_mb: round(m.rss.pss_per_context_mb, 2),
      jobs_per_min: Object.fromEntries(m.throughput.map((t) => [String(t.max_concurrent), round(t.jobs_per_min, 1)])),
      chromium_version: m.version,
      postgres_version: server.version,
      node_version: host.node_version,
      targets: verdicts,
      all_targets_met: Object.values(verdicts).every((v) => v.pass),
      machine: { ...host, load_average_at_end: Os.loadavg().map((x) => round(x, 2)) },
      database: Db.describeDatabase(db, server),
      sizes: size,
      settings: {
        chromium: m.chromium,
        headless: m.headless,
        gap_ms: gapMs,
        step_timeout_ms: stepTimeout,
        worker: "Worker.make in this process, MAX_CONCURRENT_JOBS 1 (2 and 4 in the throughput phase), its own pool and LISTEN connection",
        gateway: "Jobs.make + Reaper in this process, its own pool",
        raw: "playwright-core on the same Chromium process as the worker's Browser (session().context.browser())",
        browser_launches: m.launches
      },
      method: {
        recipe_ms:
          "a recipe job of 10 steps (goto, fill, click, wait_for url, assert_text, select, check, click, wait_for selector, extract) over /apply → /details → /done; from step 1's cookbook_step_started report asked to step 10's cookbook_step_completed written (hooks on the handler's JobContext); the job's fresh context and page are open before; inside: 20 event writes, the captcha look-up and registry write after each goto/click",
        raw_playwright_ms:
          "the same 10 Playwright calls with Recipe.perform's options, on a fresh context and page opened before the timer, on the same Chromium; interleaved with the recipe jobs, gap_ms apart; medians compared",
        session_start:
          "Browser.session asked (before newContext) → step 1 (goto /apply)'s cookbook_step_completed written; raw: newContext + newPage + goto(waitUntil load)",
        whole:
          "Browser.session asked → the job's context closed (all 10 steps, events, close); raw: newContext → 10 calls → context.close()",
        browser_cancel:
          "a recipe blocked mid-step, alternately in a goto of a page the site never answers (after the request reached the site) and a wait_for of a selector that never appears, gap_ms after the step's cookbook_step_started was written; jobs.cancel on the gateway node (storage, then the JobActor ask to the worker's node) → both the job's context closed (a finalizer that runs after the context's release) and its handler ended (the worker's slot is freed on its return); cancel_scope_closing: → the session scope's first finalizer (the handler interrupted); cancel_context_close: from there to the context's release done (context.close()); cancel_reply: → jobs.cancel's answer (job cancelled in its row); completed_context_close / raw_context_close: the same close after a completed recipe and in the raw script",
        resume_overhead:
          "a recipe: goto /captcha (a #bot-check element, custom_selectors) then extract; needs_human; the bench removes #bot-check from the held page (Browser.sessionOf(job).page), waits gap_ms, then jobs.resume({resolved_by: human}) → step 2's cookbook_step_started asked, minus recheck_after_ms; no artifact store (no screenshot before the hand-off; none on this path either way)",
        rss_per_context_mb:
          "Browser.stats().rssBytes (sum of RSS over Chromium's processes, shared pages counted in each) with N sessions open, each with /apply loaded, minus the same with none; each a median of 5 reads 100 ms apart after 1 s; / N. pss_per_context_mb: the same with PSS from /proc/<pid>/smaps_rollup over the browser's process tree (shared pages divided among the processes that map them)",
        jobs_per_min:
          "a worker node at MAX_CONCURRENT_JOBS c on the same browser; one round of c warm-up jobs; then N recipe jobs (goto /apply, fill, extract) in one jobs.submitMany → the last row completed; N / seconds × 60"
      },
      details: {
        recipe: summaryMs(m.recipe),
        raw_playwright: summaryMs(m.raw),
        session_start: summaryMs(m.sessionStart),
        raw_session_start: summaryMs(m.rawSessionStart),
        whole: summaryMs(m.recipeWhole),
        raw_whole: summaryMs(m.rawWhole),
        whole_ratio: r3(wholeRatio),
        cancel: summaryMs(m.cancel),
        cancel_goto: summaryMs(m.cancelByKind.goto),
        cancel_wait_for: summaryMs(m.cancelByKind.wait_for),
        cancel_context_closed: summaryMs(m.cancelClosed),
        cancel_scope_closing: summaryMs(m.cancelClosing),
        cancel_context_close: summaryMs(m.cancelContextClose),
        completed_context_close: summaryMs(m.contextClose),
        raw_context_close: summaryMs(m.rawContextClose),
        cancel_reply: summaryMs(m.cancelReply),
        cancel_checks: m.cancelChecks,
        resume_overhead: summaryMs(m.resumeOverhead),
        resume_to_next_step: summaryMs(m.resumeContinue),
        resume_reply: summaryMs(m.resumeReply),
        resume_handler: summaryMs(m.resumeHandler),
        rss: {
          ...m.rss,
          per_context_mb: round(m.rss.per_context_mb, 2),
          pss_per_context_mb: round(m.rss.pss_per_context_mb, 2)
        },
        throughput: m.throughput.map((t) => ({
          max_concurrent: t.max_concurrent,
          jobs: t.jobs,
          seconds: round(t.seconds, 3),
          jobs_per_min: round(t.jobs_per_min, 1),
          handler: summaryMs(t.handler),
          cpu: t.cpu
        }))
      }
    }
    const file = writeResult(quick ? "browser-quick" : "browser", result)
    progress(`wrote ${Path.relative(process.cwd(), file)} in ${wallSeconds.toFixed(0)} s total`)
  } finally {
    progress("cleaning up the database")
    await db.close()
  }
}
