/**
 * Recipes (the "cookbook"): the built-in `recipe` job type. Its payload is a list of steps,
 * checked with `Recipe`'s Schema; each step runs on the job's own page between
 * `cookbook_step_started` and `cookbook_step_completed` (or `_failed`) events that carry
 * `step_index`, `total_steps` and `elapsed_ms`. What `extract` steps read is the job's
 * result. A failed step fails the job with `RECIPE_STEP_FAILED`, naming the step and the
 * page's URL; the browser dying under it fails it with `BROWSER_CRASHED`.
 */
import { Effect, Schema } from "effect"
import type { Page } from "playwright-core"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"
import { type Browser, BrowserSession, crashed, isGone, withSession } from "./Browser.ts"

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
  Schema.Struct({ action: Schema.Literal("assert_text"), selector: Selector, text: Schema.String, ...common })
)
export type Step = typeof Step.Type

/** A recipe: its steps, in order. */
export const Recipe = Schema.Struct({ steps: Schema.Array(Step).pipe(Schema.minItems(1), Schema.maxItems(500)) })
export type Recipe = typeof Recipe.Type

/** The `recipe` job type, on this node's browser. */
export const handlers = (browser: Browser): JobHandler.Handlers =>
  JobHandler.handlers({
    recipe: Effect.gen(function* () {
      const recipe = yield* JobHandler.payload(Recipe)
      return yield* withSession(browser, run(recipe))
    })
  })

/** Run a recipe's steps on the session's page; the extracted values and the final URL. */
export const run = (recipe: Recipe) =>
  Effect.gen(function* () {
    const { page } = yield* BrowserSession
    const extracted: Record<string, string | ReadonlyArray<string> | null> = {}
    const total = recipe.steps.length
    for (const [i, step] of recipe.steps.entries()) {
      const label = `${i + 1}/${total} ${step.name ?? describeStep(step)}`
      yield* JobHandler.cookbookStep(
        label,
        Effect.tryPromise({
          try: () => perform(page, step, extracted),
          catch: (e) =>
            isGone(e)
              ? crashed(e)
              : new JobHandler.JobError({
                  code: "RECIPE_STEP_FAILED",
                  message: `step ${i + 1} (${step.name ?? step.action}) failed on ${safeUrl(page)}: ${firstLine(e)}`
                })
        }),
        { index: i + 1, total }
      )
    }
    return { extracted, url: safeUrl(page) }
  })

// --- internal ---

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

const firstLine = (e: unknown) => String(e instanceof Error ? e.message : e).split("\n")[0]!.slice(0, 300)
