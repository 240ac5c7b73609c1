/**
 * One Chromium per worker node, a `BrowserContext` per job. The browser is launched on the
 * first job that needs it (through `playwright-core`, `TROUPE_CHROMIUM` or `/usr/bin/chromium`,
 * headless unless `TROUPE_BROWSER_HEADLESS=false`), and launched again for the next job
 * after a crash. A job's context (cookies, storage, downloads of its own) and its page are
 * acquired in the job's scope, so they close however the job ends: completed, failed,
 * cancelled (the handler is interrupted, the context closed at once) or timed out.
 *
 * No Chromium on the machine: a browser job fails with `BROWSER_UNAVAILABLE`, naming the
 * variable to set; everything else keeps working. The browser dying under a job fails it
 * with `BROWSER_CRASHED`.
 */
import { Config, Context, Effect, Layer, Option, Queue, type Scope } from "effect"
import * as Fs from "node:fs"
import { type Browser as PwBrowser, type BrowserContext, chromium, type Page } from "playwright-core"
import { JobContext, JobError } from "../runtime/jobs/JobHandler.ts"

/** Error codes of browser jobs. */
export const BrowserErrorCode = {
  unavailable: "BROWSER_UNAVAILABLE",
  crashed: "BROWSER_CRASHED",
  /** A Playwright call of a handler (`usePage`) failed. */
  actionFailed: "BROWSER_ACTION_FAILED"
} as const

/** A job's browser: its own context and page (a service next to `JobContext`). */
export interface Session {
  readonly context: BrowserContext
  readonly page: Page
  /** An id for `browser_session_id`: the browser's launch and the context's number in it. */
  readonly id: string
  /** The job it belongs to, when it was opened for one. */
  readonly jobId: string | undefined
}

/** The browser session of the running job (provided by `withSession`). */
export class BrowserSession extends Context.Tag("troupe/browser/BrowserSession")<BrowserSession, Session>() {}

/** How the browser is launched. */
export interface Options {
  /** The Chromium binary (`TROUPE_CHROMIUM`, default `/usr/bin/chromium`). */
  readonly executablePath?: string
  /** Headless (default); `TROUPE_BROWSER_HEADLESS=false` runs headful on `DISPLAY`. */
  readonly headless?: boolean
  /** Run on each new context before its page opens (tests answer vendors' URLs locally with `context.route`). */
  readonly onContext?: (context: BrowserContext) => Promise<void>
}

/** `TROUPE_CHROMIUM`, `TROUPE_BROWSER_HEADLESS`. */
export const OptionsConfig = Config.all({
  executablePath: Config.string("TROUPE_CHROMIUM").pipe(Config.withDefault("/usr/bin/chromium")),
  headless: Config.boolean("TROUPE_BROWSER_HEADLESS").pipe(Config.withDefault(true))
})

/** Figures of the browser, for `/worker/status` and `/metrics`. */
export interface Stats {
  /** Chromium's version, once launched. */
  readonly version: string | null
  readonly openContexts: number
  readonly launches: number
  /** Resident memory of Chromium's processes (the browser and its children), in bytes; 0 when it is not running. */
  readonly rssBytes: number
}

/** The browser of a worker node. */
export interface Browser {
  /** A fresh context and page (for the job `jobId`, when given), closed when the scope closes. */
  readonly session: (jobId?: string) => Effect.Effect<Session, JobError, Scope.Scope>
  /** The open session of a job running here, if it has one (the live view finds its page so). */
  readonly sessionOf: (jobId: string) => Session | undefined
  readonly stats: () => Stats
  /** The running browser's main process (Linux: a child of this process running the binary), to check recovery. */
  readonly pid: () => number | undefined
}

/** The browser of this worker node. */
export class BrowserTag extends Context.Tag("troupe/browser/Browser")<BrowserTag, Browser>() {}

/** Make the browser of a worker node; it is launched on first use and closed with the scope. */
export const make = (options: Options = {}): Effect.Effect<Browser, never, Scope.Scope> =>
  Effect.gen(function* () {
    const executablePath = options.executablePath ?? "/usr/bin/chromium"
    const headless = options.headless ?? true
    const lock = yield* Effect.makeSemaphore(1)
    let current: PwBrowser | undefined
    let launches = 0
    let contexts = 0
    let opened = 0
    let version: string | null = null

    const unavailable = (reason: string) =>
      new JobError({
        code: BrowserErrorCode.unavailable,
        message: `no browser: ${reason}; install Chromium or set TROUPE_CHROMIUM to its path`
      })

    /** The running browser, launched if there is none (or it crashed). */
    const ensure = lock.withPermits(1)(
      Effect.suspend(() => {
        if (current?.isConnected()) return Effect.succeed(current)
        if (!Fs.existsSync(executablePath)) return Effect.fail(unavailable(`${executablePath} does not exist`))
        return Effect.tryPromise({
          try: () => chromium.launch({ executablePath, headless, args: ["--no-sandbox"] }),
          catch: (e) => unavailable(`${executablePath} did not start (${firstLine(e)})`)
        }).pipe(
          Effect.tap((browser) =>
            Effect.sync(() => {
              launches++
              version = browser.version()
              current = browser
              browser.on("disconnected", () => {
                if (current === browser) current = undefined
              })
            })
          )
        )
      })
    )

    const byJob = new Map<string, Session>()

    const session = (jobId?: string) => Effect.gen(function* () {
      const browser = yield* ensure
      // Counted inside the acquire (which cannot be interrupted), so a cancel that lands just
      // after the context opened cannot make its release uncount it without a count.
      const context = yield* Effect.acquireRelease(
        Effect.tryPromise({ try: () => browser.newContext(), catch: (e) => crashed(e) }).pipe(
          Effect.tap(() => Effect.sync(() => contexts++))
        ),
        (context) =>
          Effect.promise(() => context.close().catch(() => undefined)).pipe(
            Effect.ensuring(Effect.sync(() => contexts--))
          )
      )
      const prepare = options.onContext
      if (prepare !== undefined) yield* Effect.tryPromise({ try: () => prepare(context), catch: (e) => crashed(e) })
      const page = yield* Effect.tryPromise({ try: () => context.newPage(), catch: (e) => crashed(e) })
      const session: Session = { context, page, id: `chromium-${launches}-${++opened}`, jobId }
      if (jobId !== undefined) {
        byJob.set(jobId, session)
        yield* Effect.addFinalizer(() =>
          Effect.sync(() => {
            if (byJob.get(jobId) === session) byJob.delete(jobId)
          })
        )
      }
      return session
    })

    yield* Effect.addFinalizer(() =>
      Effect.promise(async () => {
        await current?.close().catch(() => undefined)
        current = undefined
      })
    )

    return {
      session,
      sessionOf: (jobId) => byJob.get(jobId),
      stats: () => {
        const pid = current?.isConnected() ? childPid(executablePath) : undefined
        return { version, openContexts: contexts, launches, rssBytes: pid === undefined ? 0 : treeRss(pid) }
      },
      pid: () => (current?.isConnected() ? childPid(executablePath) : undefined)
    } satisfies Browser
  })

/** The browser of this worker node as a layer, configured from the environment. */
export const layerConfig: Layer.Layer<BrowserTag, never> = Layer.scoped(
  BrowserTag,
  Effect.flatMap(Effect.orDie(OptionsConfig), make)
)

/**
 * Run `effect` with a fresh browser session of its own, closed when it ends however it ends.
 * Inside a job (`JobContext`) the session is the job's: the live view finds its page, and
 * (unless `followNavigation: false`) every navigation of its main frame is recorded as the
 * worker's `current_task_url`, latest first.
 */
export const withSession = <A, E, R>(
  browser: Browser,
  effect: Effect.Effect<A, E, R | BrowserSession>,
  options: { readonly followNavigation?: boolean } = {}
): Effect.Effect<A, E | JobError, Exclude<Exclude<R, BrowserSession>, Scope.Scope>> =>
  Effect.scoped(
    Effect.gen(function* () {
      const ctx = yield* Effect.serviceOption(JobContext)
      const session = yield* browser.session(Option.isSome(ctx) ? ctx.value.jobId : undefined)
      if (Option.isSome(ctx) && options.followNavigation !== false) {
        // The latest URL only: a burst of redirects is one write.
        const urls = yield* Queue.sliding<string>(1)
        const { page } = session
        page.on("framenavigated", (frame) => {
          if (frame === page.mainFrame()) Queue.unsafeOffer(urls, frame.url())
        })
        yield* Effect.forkScoped(
          Effect.forever(Effect.flatMap(Queue.take(urls), (url) => ctx.value.browserAt(session.id, url)))
        )
      }
      return yield* Effect.provideService(effect, BrowserSession, session)
    })
  )

/**
 * A handler that runs on a page of its own: the job's `BrowserSession` (context and page),
 * from the worker's browser (`BrowserTag`, which `troupe/worker` provides to your handlers).
 *
 * ```ts
 * apply: Browser.withPage(Effect.gen(function* () {
 *   const { page } = yield* Browser.BrowserSession
 *   yield* Effect.promise(() => page.goto(url))
 * }))
 * ```
 */
export const withPage = <A, E, R>(
  effect: Effect.Effect<A, E, R | BrowserSession>
): Effect.Effect<A, E | JobError, Exclude<Exclude<R, BrowserSession>, Scope.Scope> | BrowserTag> =>
  Effect.flatMap(BrowserTag, (browser) => withSession(browser, effect))

/**
 * Call Playwright on the job's page: a browser that died under the call fails it with
 * `BROWSER_CRASHED` (retried while the job has attempts left), any other rejection with
 * `BROWSER_ACTION_FAILED` and the first line of Playwright's message.
 */
export const usePage = <A>(f: (page: Page, context: BrowserContext) => Promise<A>): Effect.Effect<A, JobError, BrowserSession> =>
  Effect.flatMap(BrowserSession, (session) =>
    Effect.tryPromise({
      try: () => f(session.page, session.context),
      catch: (e) =>
        isGone(e) ? crashed(e) : new JobError({ code: BrowserErrorCode.actionFailed, message: whatFailed(e) })
    })
  )

/** The browser died under the job: `BROWSER_CRASHED`, retried while the job has attempts left. */
export const crashed = (e: unknown): JobError =>
  new JobError({ code: BrowserErrorCode.crashed, message: `the browser crashed: ${firstLine(e)}`, retryable: true })

/** The first line of an error's message (Playwright's carry a call log below it). */
export const firstLine = (e: unknown): string =>
  String(e instanceof Error ? e.message : e).split("\n")[0]!.slice(0, 300)

/** A Playwright error's first line and, from its call log, what it was waiting for (the selector). */
export const whatFailed = (e: unknown): string => {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: Playwright colours its call log
  const log = String(e instanceof Error ? e.message : e).replace(/\u001b\[[0-9;]*m/g, "")
  const waiting = /^\s*-\s*(waiting for .*)$/m.exec(log)?.[1]
  return waiting === undefined ? firstLine(e) : `${firstLine(e)} (${waiting.slice(0, 300)})`
}

/** Whether a Playwright error says the browser (or its page) is gone. */
export const isGone = (e: unknown): boolean =>
  /Target (page, context or browser )?(has been )?closed|Browser has been closed|browser has disconnected/i.test(
    String(e)
  )

// --- internal ---

/** The pid of this process's child that runs `binary`, read from /proc (Linux). */
const childPid = (binary: string): number | undefined => {
  for (const entry of Fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = Fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1])
      if (ppid !== process.pid) continue
      const argv0 = Fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0")[0]
      // `binary` itself, or what it execs (Debian's /usr/bin/chromium is a wrapper script).
      if (argv0 === binary || argv0?.includes("chrom") === true) return Number(entry)
    } catch {
      // gone meanwhile
    }
  }
  return undefined
}

/** The resident memory of `root` and its descendants, in bytes (from /proc). */
const treeRss = (root: number): number => {
  const parent = new Map<number, number>()
  for (const entry of Fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = Fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      parent.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]))
    } catch {
      // gone meanwhile
    }
  }
  const inTree = (pid: number): boolean => {
    for (let p: number | undefined = pid, hops = 0; p !== undefined && p > 1 && hops < 64; p = parent.get(p), hops++) {
      if (p === root) return true
    }
    return false
  }
  let pages = 0
  for (const pid of parent.keys()) {
    if (!inTree(pid)) continue
    try {
      pages += Number(Fs.readFileSync(`/proc/${pid}/statm`, "utf8").split(" ")[1])
    } catch {
      // gone meanwhile
    }
  }
  return pages * pageSize
}

const pageSize = 4096
