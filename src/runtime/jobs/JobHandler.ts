/**
 * The API for authors of job handlers. A handler is an Effect that needs `JobContext`:
 *
 * ```ts
 * const handlers = JobHandler.handlers({
 *   apply: Effect.gen(function* () {
 *     const input = yield* JobHandler.payload(Schema.Struct({ url: Schema.String }))
 *     yield* JobHandler.step("Navigating to application page", openPage(input.url), { index: 1, total: 3 })
 *     yield* JobHandler.tokensUsed({ model: "claude-sonnet-4-20250514", input_tokens: 900, output_tokens: 120 })
 *     const answer = yield* JobHandler.needsHuman({ type: "captcha", timeout_seconds: 120, message: "reCAPTCHA" })
 *     return { submitted: true }
 *   })
 * })
 * ```
 *
 * What it returns is the job's `result`; a `JobError` fails the job with its `code`;
 * interruption (a cancel) stops it wherever it is, running its finalizers.
 */
import { Context, Data, Effect, Schema, ParseResult } from "effect"
import type { Interaction, Resolution } from "../../protocol/Jobs.ts"

/**
 * A handler's own failure: the job fails with this code and message. A `retryable` one (the
 * browser crashed under it, say) sends the job back to the queue while it has attempts left
 * (`max_attempts`), after a backoff; out of attempts, it fails with this code.
 */
export class JobError extends Data.TaggedError("JobError")<{
  readonly code: string
  readonly message: string
  readonly retryable?: boolean
}> {}

/** Nobody answered a `needs_human` in time: the job fails with `HITL_TIMEOUT`. */
export class HitlTimeout extends Data.TaggedError("HitlTimeout")<{ readonly timeoutSeconds: number }> {
  override get message() {
    return `no human resolved the interaction within ${this.timeoutSeconds} s`
  }
}

/** Token usage of one model call. Give `cost_usd`, or tokens priced from the price table. */
export interface Usage {
  readonly model: string
  readonly tokens?: number
  readonly input_tokens?: number
  readonly output_tokens?: number
  readonly cost_usd?: number
}

/** Where a handler is in its recipe (goes into every event's metadata). */
export interface Progress {
  readonly index: number
  readonly total?: number
}

/** What a running handler can see and do. */
export interface JobContextShape {
  readonly jobId: string
  readonly jobType: string
  readonly valetTaskId: string | null
  readonly payload: unknown
  /** The attempt number (1 on the first run). */
  readonly attempt: number
  readonly workerId: string
  readonly nodeId: string
  /** Write a `gh_job_events` row for this job (with worker id, elapsed time and progress). */
  readonly report: (
    eventType: string,
    message: string,
    metadata?: Record<string, unknown>
  ) => Effect.Effect<void>
  /** Record a model call's token usage: a `tokens_used` event and the job's running cost. */
  readonly tokensUsed: (usage: Usage) => Effect.Effect<void>
  /** Count one action (a completed step) in the job's cost. */
  readonly countAction: Effect.Effect<void>
  /** Set the step index / total carried by later events. */
  readonly setProgress: (progress: Progress) => Effect.Effect<void>
  /** Pause for a human; resumes with their resolution, or fails with `HitlTimeout`. */
  readonly needsHuman: (interaction: Interaction) => Effect.Effect<Resolution, HitlTimeout>
  /**
   * Record the job's browser session and the page it is on (`browser_session_id`,
   * `current_task_url` of the worker's registry row); cleared when the job ends.
   */
  readonly browserAt: (sessionId: string, url: string) => Effect.Effect<void>
}

/** The running job, for its handler. */
export class JobContext extends Context.Tag("troupe/runtime/JobContext")<JobContext, JobContextShape>() {}

/**
 * A handler: its result becomes the job's `result`. `R` is what else it needs that its worker
 * provides (`troupe/worker` provides `BrowserTag`, for `withPage` handlers).
 */
export type Handler<R = never> = Effect.Effect<unknown, JobError | HitlTimeout, JobContext | R>

/** Handlers by `job_type`. */
export type Handlers<R = never> = Readonly<Record<string, Handler<R>>>

/** Declare handlers by `job_type`. */
export const handlers = <R = never>(record: Handlers<R>): Handlers<R> => record

/** The payload, decoded with a Schema; a mismatch fails the job with `INVALID_PAYLOAD`. */
export const payload = <A, I>(schema: Schema.Schema<A, I, never>): Effect.Effect<A, JobError, JobContext> =>
  Effect.flatMap(JobContext, (ctx) =>
    Schema.decodeUnknown(schema)(ctx.payload).pipe(
      Effect.mapError(
        (e) =>
          new JobError({ code: "INVALID_PAYLOAD", message: ParseResult.TreeFormatter.formatErrorSync(e) })
      )
    )
  )

/** Write an event of any type for the running job. */
export const report = (eventType: string, message: string, metadata?: Record<string, unknown>) =>
  Effect.flatMap(JobContext, (ctx) => ctx.report(eventType, message, metadata))

const bracketed = <A, E, R>(
  kind: "step" | "cookbook_step" | "observation",
  message: string,
  effect: Effect.Effect<A, E, R>,
  progress?: Progress,
  done?: (a: A) => string
): Effect.Effect<A, E, R | JobContext> =>
  Effect.gen(function* () {
    const ctx = yield* JobContext
    if (progress) yield* ctx.setProgress(progress)
    yield* ctx.report(`${kind}_started`, message)
    const started = Date.now()
    const exit = yield* Effect.exit(effect)
    if (exit._tag === "Success") {
      if (kind !== "observation") yield* ctx.countAction
      yield* ctx.report(`${kind}_completed`, done ? done(exit.value) : message, {
        duration_ms: Date.now() - started
      })
    } else if (kind === "cookbook_step") {
      yield* ctx.report("cookbook_step_failed", `Recipe failed: ${message}`, {
        duration_ms: Date.now() - started
      })
    }
    return yield* exit
  })

/** Run an automation step between `step_started` and `step_completed` events. */
export const step = <A, E, R>(
  message: string,
  effect: Effect.Effect<A, E, R>,
  progress?: Progress,
  done?: (a: A) => string
) => bracketed("step", message, effect, progress, done)

/** Run a cookbook recipe step: `cookbook_step_started`, then `_completed` or `_failed`. */
export const cookbookStep = <A, E, R>(
  message: string,
  effect: Effect.Effect<A, E, R>,
  progress?: Progress,
  done?: (a: A) => string
) => bracketed("cookbook_step", message, effect, progress, done)

/** Capture page state between `observation_started` and `observation_completed`. */
export const observation = <A, E, R>(message: string, effect: Effect.Effect<A, E, R>) =>
  bracketed("observation", message, effect)

/** Record the job's browser session and current page in the worker's registry row. */
export const browserAt = (sessionId: string, url: string) =>
  Effect.flatMap(JobContext, (ctx) => ctx.browserAt(sessionId, url))

/** Record the model's reasoning (`thought`). */
export const thought = (message: string) => report("thought", message)

/** Record a switch between cookbook and AI mode (`mode_switched`). */
export const modeSwitched = (fromMode: string, toMode: string, reason: string) =>
  report("mode_switched", `${fromMode} → ${toMode}: ${reason}`, { fromMode, toMode, reason })

/** Record a model call's token usage (`tokens_used`, and the job's cost). */
export const tokensUsed = (usage: Usage) => Effect.flatMap(JobContext, (ctx) => ctx.tokensUsed(usage))

/** Pause the job for a human and wait for `resume` (or fail with `HitlTimeout`). */
export const needsHuman = (interaction: Interaction) =>
  Effect.flatMap(JobContext, (ctx) => ctx.needsHuman(interaction))

// --- Cost ---

/** Prices per million tokens. */
export interface Price {
  readonly input_per_mtok_usd: number
  readonly output_per_mtok_usd: number
}

/** A price table by model name. Unknown models cost 0 unless the handler gives `cost_usd`. */
export type PriceTable = Readonly<Record<string, Price>>

/** Default prices (USD per million tokens); override with `TROUPE_PRICES` (JSON of the same shape). */
export const defaultPrices: PriceTable = {
  "claude-sonnet-4-20250514": { input_per_mtok_usd: 3, output_per_mtok_usd: 15 },
  "claude-haiku-4-5-20251001": { input_per_mtok_usd: 1, output_per_mtok_usd: 5 },
  "claude-opus-4-20250514": { input_per_mtok_usd: 15, output_per_mtok_usd: 75 },
  "gpt-4o": { input_per_mtok_usd: 2.5, output_per_mtok_usd: 10 },
  "gpt-4o-mini": { input_per_mtok_usd: 0.15, output_per_mtok_usd: 0.6 }
}

/** A job's cost as callbacks carry it. */
export interface Cost {
  readonly total_cost_usd: number
  readonly action_count: number
  readonly total_tokens: number
  readonly breakdown: ReadonlyArray<{
    readonly model: string
    readonly tokens: number
    readonly cost_usd: number
  }>
}

/** No cost yet. */
export const emptyCost: Cost = { total_cost_usd: 0, action_count: 0, total_tokens: 0, breakdown: [] }

/** The cost of one usage report: its tokens and dollars. Tokens without a split are priced as input. */
export const priceUsage = (usage: Usage, prices: PriceTable): { tokens: number; cost_usd: number } => {
  const input = usage.input_tokens ?? (usage.output_tokens === undefined ? (usage.tokens ?? 0) : 0)
  const output = usage.output_tokens ?? 0
  const tokens = usage.tokens ?? input + output
  const price = prices[usage.model]
  const cost_usd =
    usage.cost_usd ??
    (price ? (input * price.input_per_mtok_usd + output * price.output_per_mtok_usd) / 1_000_000 : 0)
  return { tokens, cost_usd }
}

/** Add a usage report to a cost. */
export const addUsage = (cost: Cost, usage: Usage, prices: PriceTable): Cost => {
  const { tokens, cost_usd } = priceUsage(usage, prices)
  const breakdown = [...cost.breakdown]
  const i = breakdown.findIndex((b) => b.model === usage.model)
  if (i < 0) breakdown.push({ model: usage.model, tokens, cost_usd: round(cost_usd) })
  else {
    const b = breakdown[i]!
    breakdown[i] = { model: b.model, tokens: b.tokens + tokens, cost_usd: round(b.cost_usd + cost_usd) }
  }
  return {
    total_cost_usd: round(cost.total_cost_usd + cost_usd),
    action_count: cost.action_count,
    total_tokens: cost.total_tokens + tokens,
    breakdown
  }
}

/** Read a stored cost, tolerating missing fields. */
export const decodeCost = (value: unknown): Cost => {
  const v = (value ?? {}) as Partial<Cost>
  return {
    total_cost_usd: typeof v.total_cost_usd === "number" ? v.total_cost_usd : 0,
    action_count: typeof v.action_count === "number" ? v.action_count : 0,
    total_tokens: typeof v.total_tokens === "number" ? v.total_tokens : 0,
    breakdown: Array.isArray(v.breakdown) ? v.breakdown : []
  }
}

const round = (usd: number) => Math.round(usd * 1e8) / 1e8
