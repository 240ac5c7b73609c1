/**
 * `troupe/worker`: what an author of job handlers needs. `JobHandler` is the handler API
 * (`handlers`, `payload`, `step`, `needsHuman`, `JobError` …). A worker node runs your
 * handlers beside the built-in ones (yours win on a shared job type): as a Layer (`layer`,
 * for `Layer.launch`), as one call (`runWorker`, a Promise of a handle), or as a scoped
 * Effect (`start`). What the options leave out comes from the environment, as for
 * `troupe start` (`DATABASE_URL`, else the embedded Postgres; `GH_WORKER_ID`, …).
 */
import type { SqlClient } from "@effect/sql"
import { Cause, Context, Effect, Exit, Layer, Option, Schema, Scope } from "effect"
import * as ArtifactStore from "../browser/ArtifactStore.ts"
import * as Browser from "../browser/Browser.ts"
import * as Recipe from "../browser/Recipe.ts"
import { builtinHandlers } from "../handlers/Builtin.ts"
import { Probe } from "../actors/ProbeActor.ts"
import * as Worker from "../actors/WorkerActor.ts"
import * as WorkerHttp from "../edge/WorkerHttp.ts"
import { NodeConfig, PricesConfig, WorkerConfig } from "../runtime/Config.ts"
import * as Database from "../runtime/db/Database.ts"
import * as Node from "../runtime/core/Node.ts"
import * as JobHandler from "../runtime/jobs/JobHandler.ts"

export * as JobHandler from "../runtime/jobs/JobHandler.ts"
export { builtinHandlers } from "../handlers/Builtin.ts"
/** The page of a job, for TypeScript handlers: `withPage(handler)` gives it `BrowserSession`. */
export { BrowserSession, BrowserTag, type Session, usePage, withPage } from "../browser/Browser.ts"
export type { Interaction, Resolution } from "../protocol/Jobs.ts"

/** A worker's settings; each one left out comes from the environment variable it names. */
export interface Options {
  /**
   * Your handlers by job type (`JobHandler.handlers({...})`), added to the built-in ones. A
   * handler may need `BrowserTag` (`withPage` handlers): the worker provides its browser.
   */
  readonly handlers: JobHandler.Handlers<Browser.BrowserTag>
  /** `TROUPE_NODE_ID` (default: the host name); `make` runs on the node it is given instead. */
  readonly nodeId?: string
  /** `GH_WORKER_ID` (default `worker-<node id>`). */
  readonly workerId?: string
  /** `TARGET_WORKER_ID`: the sandbox id the client app targets this worker by. */
  readonly targetWorkerId?: string
  /** `MAX_CONCURRENT_JOBS` (default 1). */
  readonly maxConcurrent?: number
  /** Model prices, over `TROUPE_PRICES` and the defaults. */
  readonly prices?: JobHandler.PriceTable
  /** The worker's HTTP server (`/health`, `/worker/*`, drain) on this port (`GH_WORKER_PORT`, default 3101; 0 picks a free one), or `false` for none. */
  readonly httpPort?: number | false
}

/** A worker that is up. */
export interface RunningWorker {
  readonly nodeId: string
  readonly workerId: string
  readonly maxConcurrent: number
  /** The job types it runs: the built-in ones and yours. */
  readonly jobTypes: ReadonlyArray<string>
  /** The port of its HTTP server (null without one). */
  readonly httpPort: number | null
}

/** A worker started by `runWorker`. */
export interface WorkerHandle extends RunningWorker {
  /** Stop it: running jobs are abandoned (the reaper requeues them), the node leaves, the database closes. */
  stop(): Promise<void>
}

/** Run the worker role on a node for the lifetime of the scope, with its HTTP server unless `httpPort: false` (`troupe start` runs it so). */
export const make = (
  node: Node.TroupeNode,
  options: Options
): Effect.Effect<RunningWorker, unknown, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const config = yield* WorkerConfig
    const fromEnv = yield* PricesConfig
    const prices: JobHandler.PriceTable = {
      ...JobHandler.defaultPrices,
      ...(Option.isSome(fromEnv)
        ? yield* Schema.decodeUnknown(Schema.parseJson(PriceTable))(fromEnv.value)
        : {}),
      ...options.prices
    }
    // Launched on the first browser job only; closed after the worker (made before it).
    const browser = yield* Browser.make(yield* Browser.OptionsConfig)
    // TROUPE_ARTIFACTS: under the data dir (default) or s3://bucket/prefix.
    const artifacts = yield* ArtifactStore.fromConfig((yield* NodeConfig).dataDir)
    const yours = Object.fromEntries(
      Object.entries(options.handlers).map(([type, h]) => [type, Effect.provideService(h, Browser.BrowserTag, browser)])
    )
    const handlers = { ...builtinHandlers, ...Recipe.handlers(browser, artifacts), ...yours }
    const maxConcurrent = options.maxConcurrent ?? config.maxConcurrent
    const worker = yield* Worker.make(node, {
      workerId: options.workerId ?? Option.getOrUndefined(config.workerId),
      targetWorkerId: options.targetWorkerId ?? Option.getOrNull(config.targetWorkerId),
      ec2InstanceId: Option.getOrNull(config.ec2InstanceId),
      ec2Ip: Option.getOrNull(config.ec2Ip),
      maxConcurrent,
      heartbeat: `${config.heartbeatMs} millis`,
      handlers,
      prices
    })
    const httpOptions = yield* WorkerHttp.OptionsConfig
    const http =
      options.httpPort === false
        ? undefined
        : yield* WorkerHttp.make(worker, {
            ...httpOptions,
            artifacts,
            browser,
            ...(options.httpPort === undefined ? {} : { port: options.httpPort })
          })
    // Screenshot URLs name the address a client reaches this machine at.
    if (http !== undefined) {
      const host = http.host === "0.0.0.0" ? (Option.getOrUndefined(config.ec2Ip) ?? "127.0.0.1") : http.host
      artifacts.servedAt(`http://${host}:${http.port}`)
    }
    return {
      nodeId: node.id,
      workerId: worker.workerId,
      maxConcurrent,
      jobTypes: Object.keys(handlers),
      httpPort: http?.port ?? null
    }
  })

/** The worker of this process (provided by `layerOnNode`). */
export class Running extends Context.Tag("troupe/worker/Running")<Running, RunningWorker>() {}

/** The worker role on the process's node (`Node.layer`), as a layer: what `troupe start` composes. */
export const layerOnNode = (options: Options): Layer.Layer<Running, unknown, Node.Node | SqlClient.SqlClient> =>
  Layer.scoped(Running, Effect.flatMap(Node.Node, (node) => make(node, options)))

/** A worker node for the lifetime of the scope: the database, a node with its probe, and the worker (`make`). */
export const start = (options: Options): Effect.Effect<RunningWorker, unknown, Scope.Scope> =>
  Effect.gen(function* () {
    const database = yield* Layer.build(Database.layer)
    return yield* Effect.gen(function* () {
      const config = yield* NodeConfig
      const node = yield* Node.make({
        nodeId: options.nodeId ?? config.nodeId,
        role: "worker",
        actors: [Probe],
        heartbeat: `${config.heartbeatMs} millis`
      })
      yield* node.spawn(Probe, node.id)
      return yield* make(node, options)
    }).pipe(Effect.provide(database))
  })

/** A worker node as a Layer (`Layer.launch(layer({ handlers }))` under `NodeRuntime.runMain`); logs a line once it is up. */
export const layer = (options: Options): Layer.Layer<never, unknown> =>
  Layer.scopedDiscard(
    Effect.tap(start(options), (w) =>
      Effect.logInfo(
        `troupe worker ${w.workerId} is up on node ${w.nodeId}: job types ${w.jobTypes.join(", ")}`
      )
    )
  )

/**
 * Start a worker node; resolves once it is up. Unless `stopOnSignal: false`, SIGINT and
 * SIGTERM stop it, and then, when nothing else listens for the signal, end the process
 * with it as Node would have.
 */
export const runWorker = async (
  options: Options & { readonly stopOnSignal?: boolean }
): Promise<WorkerHandle> => {
  const scope = Effect.runSync(Scope.make())
  const exit = await Effect.runPromiseExit(Scope.extend(start(options), scope))
  if (Exit.isFailure(exit)) {
    await Effect.runPromise(Scope.close(scope, exit))
    return Promise.reject(Cause.squash(exit.cause))
  }
  const signals = options.stopOnSignal === false ? [] : (["SIGINT", "SIGTERM"] as const)
  let stopped: Promise<void> | undefined
  const stop = () => {
    for (const signal of signals) process.off(signal, onSignal)
    stopped ??= Effect.runPromise(Scope.close(scope, Exit.void))
    return stopped
  }
  const onSignal = (signal: NodeJS.Signals) =>
    void stop().then(() => {
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal)
    })
  for (const signal of signals) process.once(signal, onSignal)
  return { ...exit.value, stop }
}

// --- internal ---

const PriceTable = Schema.Record({
  key: Schema.String,
  value: Schema.Struct({ input_per_mtok_usd: Schema.Number, output_per_mtok_usd: Schema.Number })
})
