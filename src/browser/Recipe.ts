/**
 * Recipes (the "cookbook"): the built-in `recipe` job type. Its payload is a list of steps,
 * checked with `Recipe`'s Schema; each step runs on the job's own page between
 * `cookbook_step_started` and `cookbook_step_completed` (or `_failed`) events that carry
 * `step_index`, `total_steps` and `elapsed_ms`. What `extract` steps read is the job's
 * result. A failed step fails the job with `RECIPE_STEP_FAILED`, naming the step and the
 * page's URL; the browser dying under it fails it with `BROWSER_CRASHED`.
 */
import { Cause, Duration, Effect, Either, Exit, Option, ParseResult, Schema } from "effect"
import type { Page } from "playwright-core"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"
import { type Browser, BrowserSession, crashed, isGone, whatFailed, withSession } from "./Browser.ts"
import type { ArtifactStore } from "./ArtifactStore.ts"
import * as Captcha from "./Captcha.ts"

const Selector = Schema.String.pipe(Schema.minLength(1), Schema.maxLength(2000))
const common = {
  /** Shown in the step's events. */
  name: Schema.optional(Schema.String.pipe(Schema.maxLength(200))),
  /** How long the step may take (default 10 s). */
  timeout_ms: Schema.optional(Schema.Int.pipe(Schema.between(1, 600_000)))
}

/** One step of a recipe. */
export const Step = Schema.Union(
  Schema.Struct({ action: Schema.Literal("goto"), url: Schema.String, ...common }),
  Schema.Struct({ action: Schema.Literal("click"), selector: Selector, ...common }),
  Schema.Struct({ action: Schema.Literal("fill"), selector: Selector, value: Schema.String, ...common }),
  Schema.Struct({ action: Schema.Literal("select"), selector: Selector, value: Schema.String, ...common }),
  Schema.Struct({ action: Schema.Literal("check"), selector: Selector, ...common }),
  Schema.Struct({ action: Schema.Literal("press"), selector: Selector, key: Schema.String, ...common }),
  Schema.Struct({
    action: Schema.Literal("wait_for"),
    selector: Schema.optional(Selector),
    url: Schema.optional(Schema.String),
    text: Schema.optional(Schema.String),
    ...common
  }),
  Schema.Struct({
    action: Schema.Literal("extract"),
    /** The key of the result it goes under. */
    as: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(100)),
    selector: Selector,
    /** An attribute instead of the text. */
    attribute: Schema.optional(Schema.String),
    /** Every match, as a list (default: the first). */
    all: Schema.optional(Schema.Boolean),
    ...common
  }),
  Schema.Struct({ action: Schema.Literal("assert_text"), selector: Selector, text: Schema.String, ...common }),
  Schema.Struct({
    action: Schema.Literal("upload"),
    /** The file input. */
    selector: Selector,
    /** The file, given in the payload (the worker's disk is not the client's). */
    file: Schema.Struct({
      name: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(255)),
      mime_type: Schema.optional(Schema.String.pipe(Schema.maxLength(200))),
      /** Its bytes, base64 (at most 10 MB of file). */
      content_base64: Schema.String.pipe(Schema.maxLength(14_000_000), Schema.pattern(/^[A-Za-z0-9+/]*={0,2}$/))
    }),
    ...common
  }),
  Schema.Struct({
    action: Schema.Literal("screenshot"),
    /** The key of the result its URL goes under (default `screenshot_<step number>`). */
    as: Schema.optional(Schema.String.pipe(Schema.minLength(1), Schema.maxLength(100))),
    /** The whole page (default) or the viewport. */
    full_page: Schema.optional(Schema.Boolean),
    ...common
  })
)
export type Step = typeof Step.Type

/** How a recipe hands a captcha to a human. */
export const CaptchaOptions = Schema.Struct({
  /** Selectors that mean "a captcha" on the recipe's site (`custom`), tried before the vendors' markers. */
  custom_selectors: Schema.optional(Schema.Array(Selector).pipe(Schema.maxItems(50))),
  /** How long a human has, per hand-off (default 300 s). */
  timeout_seconds: Schema.optional(Schema.Int.pipe(Schema.between(1, 7 * 24 * 3600))),
  /** The wait after a human says it is solved, before the page is checked again (default 2,500 ms). */
  recheck_after_ms: Schema.optional(Schema.Int.pipe(Schema.between(0, 60_000)))
})

/** A recipe: its steps, in order, and how captchas are handed to a human. */
export const Recipe = Schema.Struct({
  steps: Schema.Array(Step).pipe(Schema.minItems(1), Schema.maxItems(500)),
  captcha: Schema.optional(CaptchaOptions)
})
export type Recipe = typeof Recipe.Type

/**
 * What is wrong with a recipe, for the front desk to refuse it at submit: the first issues,
 * each with its path (`steps[2].selector: …`); undefined when it is a valid recipe.
 */
export const problemOf = (payload: unknown): string | undefined => {
  const decoded = decodeRecipe(payload, { errors: "all", onExcessProperty: "error" })
  if (Either.isRight(decoded)) return undefined
  return ParseResult.ArrayFormatter.formatErrorSync(decoded.left)
    .slice(0, 5)
    .map((issue) => `${pathText(issue.path)}: ${issue.message}`)
    .join("; ")
}

/** The `recipe` job type, on this node's browser. */
export const handlers = (browser: Browser, artifacts?: ArtifactStore): JobHandler.Handlers =>
  JobHandler.handlers({
    recipe: Effect.gen(function* () {
      const recipe = yield* JobHandler.payload(Recipe)
      // The recipe records the page itself, after each navigating step (before any hand-off).
      return yield* withSession(browser, run(recipe, artifacts), { followNavigation: false })
    })
  })

/** Run a recipe's steps on the session's page; the extracted values and the final URL. */
export const run = (recipe: Recipe, artifacts?: ArtifactStore) =>
  Effect.gen(function* () {
    const session = yield* BrowserSession
    const { page } = session
    const extracted: Record<string, string | ReadonlyArray<string> | null> = {}
    const total = recipe.steps.length
    const custom = recipe.captcha?.custom_selectors ?? []
    const lookForCaptcha = Effect.tryPromise({ try: () => Captcha.detect(page, custom), catch: (e) => crashed(e) })
    const handOff = (found: Captcha.Detected) =>
      handToHuman(lookForCaptcha, found, page, artifacts, {
        timeoutSeconds: recipe.captcha?.timeout_seconds ?? 300,
        recheckAfterMs: recipe.captcha?.recheck_after_ms ?? 2500
      })
    /** A screenshot of the page, stored (between `observation_started` and `_completed`); its URL. */
    const screenshot = (why: string, fullPage: boolean) =>
      JobHandler.observation(
        why,
        Effect.tryPromise({ try: () => page.screenshot({ fullPage, type: "png" }), catch: (e) => crashed(e) }).pipe(
          Effect.flatMap((png) =>
            artifacts === undefined
              ? Effect.fail(new JobHandler.JobError({ code: "NO_ARTIFACT_STORE", message: "this worker keeps no screenshots" }))
              : Effect.mapError(
                  artifacts.putPng(png),
                  (e) => new JobHandler.JobError({ code: "ARTIFACT_NOT_STORED", message: e.message })
                )
          ),
          Effect.map((a) => a.url)
        )
      )
    for (const [i, step] of recipe.steps.entries()) {
      const label = `${i + 1}/${total} ${step.name ?? describeStep(step)}`
      const action =
        step.action === "screenshot"
          ? Effect.map(screenshot(`Screenshot of ${safeUrl(page)}`, step.full_page ?? true), (url) => {
              extracted[step.as ?? `screenshot_${i + 1}`] = url
            })
          : Effect.tryPromise({
              try: () => perform(page, step, extracted),
              catch: (e) =>
                isGone(e)
                  ? crashed(e)
                  : new JobHandler.JobError({
                      code: "RECIPE_STEP_FAILED",
                      message: `step ${i + 1} (${step.name ?? step.action}) failed on ${safeUrl(page)}: ${whatFailed(e)}`
                    })
            })
      const attempt = JobHandler.cookbookStep(label, action, { index: i + 1, total })
      // A step that fails because a captcha stands in the way is tried again once a human has solved it.
      while (true) {
        const exit = yield* Effect.exit(attempt)
        if (Exit.isSuccess(exit)) break
        const failure = Cause.failureOption(exit.cause)
        if (Option.isNone(failure) || failure.value.code !== "RECIPE_STEP_FAILED") return yield* exit
        const found = yield* lookForCaptcha
        if (found === undefined) {
          // The job's error names the page and, when one could be taken, a screenshot of it.
          const shot = yield* Effect.option(screenshot(`Screenshot after step ${i + 1} failed`, true))
          if (Option.isNone(shot)) return yield* exit
          return yield* Effect.fail(
            new JobHandler.JobError({ code: failure.value.code, message: `${failure.value.message} (screenshot: ${shot.value})` })
          )
        }
        yield* handOff(found)
      }
      if (navigates(step)) {
        yield* JobHandler.browserAt(session.id, safeUrl(page))
        const found = yield* lookForCaptcha
        if (found !== undefined) yield* handOff(found)
      }
    }
    return { extracted, url: safeUrl(page) }
  })

// --- internal ---

const decodeRecipe = Schema.decodeUnknownEither(Recipe)

const pathText = (path: ReadonlyArray<PropertyKey>) =>
  path.length === 0
    ? "payload"
    : path.map((k, i) => (typeof k === "number" ? `[${k}]` : i === 0 ? String(k) : `.${String(k)}`)).join("")

/** Steps after which the page may be a new one (and may show a captcha). */
const navigates = (step: Step) => step.action === "goto" || step.action === "click" || step.action === "press"

/**
 * Hold the page for a human: `needs_human` with the captcha's type, selector and the page's
 * URL; once a human says it is solved, wait `recheckAfterMs` and look again. Still there: a
 * new `needs_human`, with the number of re-checks; gone: the recipe goes on.
 */
const handToHuman = (
  lookForCaptcha: Effect.Effect<Captcha.Detected | undefined, JobHandler.JobError>,
  first: Captcha.Detected,
  page: Page,
  artifacts: ArtifactStore | undefined,
  options: { readonly timeoutSeconds: number; readonly recheckAfterMs: number }
) =>
  Effect.gen(function* () {
    let found: Captcha.Detected | undefined = first
    for (let rechecks = 0; found !== undefined; rechecks++) {
      // A fresh full-page screenshot for each hand-off; a screenshot that fails does not stop it.
      const screenshot =
        artifacts === undefined
          ? undefined
          : yield* Effect.tryPromise(() => page.screenshot({ fullPage: true, type: "png" })).pipe(
              Effect.flatMap((png) => artifacts.putPng(png)),
              Effect.map((a) => a.url),
              Effect.catchAll((e) => Effect.as(Effect.logWarning("screenshot for the hand-off not taken", e), undefined))
            )
      yield* JobHandler.needsHuman({
        ...(screenshot === undefined ? {} : { screenshot_url: screenshot }),
        type: "captcha",
        captcha_type: found.captcha_type,
        difficulty: found.difficulty,
        page_url: safeUrl(page),
        element_selector: found.element_selector,
        timeout_seconds: options.timeoutSeconds,
        message:
          rechecks === 0
            ? `${captchaNames[found.kind]} detected`
            : `${captchaNames[found.kind]} still there after ${rechecks} re-check${rechecks === 1 ? "" : "s"}`
      })
      yield* Effect.sleep(Duration.millis(options.recheckAfterMs))
      found = yield* lookForCaptcha
    }
  })

const captchaNames: Record<Captcha.Detected["kind"], string> = {
  recaptcha_v2_checkbox: "reCAPTCHA challenge",
  recaptcha_v2_invisible: "Invisible reCAPTCHA",
  recaptcha_v3: "reCAPTCHA v3",
  hcaptcha: "hCaptcha challenge",
  turnstile: "Cloudflare Turnstile",
  cloudflare_challenge: "Cloudflare challenge page",
  custom: "Captcha"
}

const perform = async (
  page: Page,
  step: Step,
  extracted: Record<string, string | ReadonlyArray<string> | null>
): Promise<void> => {
  const timeout = step.timeout_ms ?? 10_000
  switch (step.action) {
    case "goto":
      await page.goto(step.url, { timeout, waitUntil: "load" })
      return
    case "click":
      await page.click(step.selector, { timeout })
      return
    case "fill":
      await page.fill(step.selector, step.value, { timeout })
      return
    case "select":
      await page.selectOption(step.selector, step.value, { timeout })
      return
    case "check":
      await page.check(step.selector, { timeout })
      return
    case "press":
      await page.press(step.selector, step.key, { timeout })
      return
    case "wait_for":
      if (step.selector !== undefined) await page.waitForSelector(step.selector, { timeout })
      if (step.url !== undefined) await page.waitForURL(step.url, { timeout })
      if (step.text !== undefined) await page.getByText(step.text).first().waitFor({ timeout })
      return
    case "extract": {
      const locator = page.locator(step.selector)
      const read = (l: ReturnType<Page["locator"]>) =>
        step.attribute === undefined ? l.innerText({ timeout }) : l.getAttribute(step.attribute, { timeout })
      if (step.all === true) {
        const n = await locator.count()
        const values: Array<string> = []
        for (let k = 0; k < n; k++) values.push((await read(locator.nth(k))) ?? "")
        extracted[step.as] = values
      } else extracted[step.as] = await read(locator.first())
      return
    }
    case "upload":
      await page.setInputFiles(
        step.selector,
        {
          name: step.file.name,
          mimeType: step.file.mime_type ?? "application/octet-stream",
          buffer: Buffer.from(step.file.content_base64, "base64")
        },
        { timeout }
      )
      return
    case "screenshot":
      return // taken by `run`, which has the artifact store
    case "assert_text": {
      const text = await page.locator(step.selector).first().innerText({ timeout })
      if (!text.includes(step.text)) throw new Error(`expected "${step.text}" in ${step.selector}, found "${text.slice(0, 200)}"`)
      return
    }
  }
}

const describeStep = (step: Step): string => {
  switch (step.action) {
    case "goto":
      return `goto ${step.url}`
    case "wait_for":
      return `wait for ${step.selector ?? step.url ?? step.text ?? "nothing"}`
    case "extract":
      return `extract ${step.as}`
    case "upload":
      return `upload ${step.file.name} to ${step.selector}`
    case "screenshot":
      return "screenshot"
    default:
      return `${step.action} ${step.selector}`
  }
}

const safeUrl = (page: Page) => {
  try {
    return page.url()
  } catch {
    return "about:blank"
  }
}

