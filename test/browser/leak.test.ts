/**
 * No leaked Chromium: SIGKILL a worker node while a browser job holds its page, and none of
 * the node's Chromium processes is alive 5 s later (Playwright talks to Chromium over a
 * pipe; Chromium ends when the pipe does). And after many jobs of every ending, the number
 * of Chromium processes is back to its baseline.
 */
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import * as Browser from "../../src/browser/Browser.ts"
import * as Recipe from "../../src/browser/Recipe.ts"
import { eventually, startGateway, startWorker, statusIs, statusOf } from "../fixtures/Jobs.ts"
import * as Processes from "../fixtures/Processes.ts"
import * as Site from "../fixtures/Site.ts"

/** Every process below `root` (children, their children …) whose command names Chromium. */
const chromiumBelow = (root: number): Array<number> => {
  const parent = new Map<number, number>()
  const command = new Map<number, string>()
  for (const entry of Fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = Fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      parent.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]))
      command.set(Number(entry), Fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0")[0] ?? "")
    } catch {
      // gone meanwhile
    }
  }
  const below = (pid: number): boolean => {
    for (let p = parent.get(pid); p !== undefined && p > 1; p = parent.get(p)) if (p === root) return true
    return false
  }
  return [...command.entries()]
    .filter(([pid, cmd]) => cmd.includes("chrom") && below(pid))
    .map(([pid]) => pid)
}

/** A page that never finishes loading. */
const hangingSite = Site.serve(() => {
  // never answered
})

const chromiumPath = process.env.TROUPE_CHROMIUM ?? "/usr/bin/chromium"

/** A page that loads, one that never does, and one with a captcha nobody solves. */
const endingsSite = Site.serve((req, res) => {
  const html = (body: string) => res.writeHead(200, { "content-type": "text/html" }).end(body)
  switch (new URL(req.url ?? "/", "http://x").pathname) {
    case "/ok":
      return html(`<title>ok</title><button id="go">go</button>`)
    case "/captcha":
      return html(`<title>check</title><div id="human-check">Are you human?</div>`)
    case "/hang":
      return // never answered
    default:
      res.writeHead(404).end()
  }
})

describe("no leaked Chromium", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "SIGKILL of a worker node holding a page leaves none of its Chromium processes alive within 5 s",
      () =>
        Effect.gen(function* () {
          const urls = yield* Database.DatabaseUrls
          const { base } = yield* hangingSite
          const { jobs } = yield* startGateway("gw-leak")
          const proc = yield* Processes.start(
            process.execPath,
            ["--import", "tsx", Path.join(Processes.root, "test/fixtures/handlers/worker-layer.ts")],
            {
              env: Processes.cleanEnv({
                DATABASE_URL: Redacted.value(urls.url),
                TROUPE_NODE_ID: "node-leak",
                GH_WORKER_ID: "worker-leak",
                GH_WORKER_PORT: "0"
              })
            }
          )
          yield* proc.waitFor("troupe worker worker-leak is up", { within: "90 seconds" })
          const job = yield* jobs.submit({
            job_type: "recipe",
            payload: { steps: [{ action: "goto", url: `${base}/hang`, timeout_ms: 600_000 }] }
          })
          yield* statusIs(job.id, "running")
          const chromium = yield* Processes.eventually(
            Effect.sync(() => chromiumBelow(proc.pid)),
            (pids) => pids.length > 0,
            "the worker's Chromium to start"
          )
          process.kill(proc.pid, "SIGKILL")
          const left = yield* Processes.eventually(
            Effect.sync(() => chromium.filter(Processes.isAlive)),
            (pids) => pids.length === 0,
            "the worker's Chromium processes to end",
            "5 seconds"
          )
          expect(left).toEqual([])
        }),
      180_000
    )

    it.scoped(
      "after many jobs of every ending (completed, failed, cancelled, timed out, HITL timeout) Chromium's process count is back to its baseline",
      () =>
        Effect.gen(function* () {
          const { base } = yield* endingsSite
          const browser = yield* Browser.make({ executablePath: chromiumPath })
          const { jobs } = yield* startGateway("gw-endings")
          yield* startWorker("endings", { handlers: Recipe.handlers(browser), maxConcurrent: 2 })
          const count = () => chromiumBelow(process.pid).length
          // The baseline: the browser up, after one job, with no context open.
          const first = yield* jobs.submit({ job_type: "recipe", payload: { steps: [{ action: "goto", url: `${base}/ok` }] } })
          yield* statusIs(first.id, "completed")
          yield* eventually(Effect.sync(() => (browser.stats().openContexts === 0 ? true : undefined)))
          const baseline = yield* Processes.eventually(
            Effect.sync(count),
            (n) => n > 0,
            "the browser's processes"
          )
          const hold = { action: "goto", url: `${base}/hang`, timeout_ms: 600_000 }
          for (let round = 0; round < 3; round++) {
            const completed = yield* jobs.submit({
              job_type: "recipe",
              payload: { steps: [{ action: "goto", url: `${base}/ok` }, { action: "click", selector: "#go" }] }
            })
            const failed = yield* jobs.submit({
              job_type: "recipe",
              payload: { steps: [{ action: "goto", url: `${base}/ok` }, { action: "click", selector: "#none", timeout_ms: 100 }] }
            })
            yield* statusIs(completed.id, "completed")
            yield* statusIs(failed.id, "failed")
            const cancelled = yield* jobs.submit({ job_type: "recipe", payload: { steps: [hold] } })
            const timedOut = yield* jobs.submit({
              job_type: "recipe",
              timeout_seconds: 1,
              max_attempts: 1,
              payload: { steps: [hold] }
            })
            yield* statusIs(cancelled.id, "running")
            yield* jobs.cancel(cancelled.id, "enough")
            yield* statusIs(cancelled.id, "cancelled")
            yield* statusIs(timedOut.id, "failed")
            expect((yield* statusOf(timedOut.id)).error_code).toBe("TIMEOUT")
            const hitl = yield* jobs.submit({
              job_type: "recipe",
              payload: {
                steps: [{ action: "goto", url: `${base}/captcha` }],
                captcha: { custom_selectors: ["#human-check"], timeout_seconds: 1 }
              }
            })
            yield* statusIs(hitl.id, "needs_human")
            yield* statusIs(hitl.id, "failed")
            expect((yield* statusOf(hitl.id)).error_code).toBe("HITL_TIMEOUT")
          }
          // Every context closed, and Chromium's processes back to what they were.
          yield* eventually(Effect.sync(() => (browser.stats().openContexts === 0 ? true : undefined)))
          const after = yield* Processes.eventually(
            Effect.sync(count),
            (n) => n <= baseline,
            `Chromium's process count to return to ${baseline}`,
            "10 seconds"
          )
          expect(after).toBe(baseline)
          expect(browser.stats().launches).toBe(1)
        }),
      180_000
    )
  })
})
