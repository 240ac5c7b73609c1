/**
 * `troupe start` (what `npm start` runs): a database (embedded unless DATABASE_URL is set)
 * and one node with the gateway and worker roles, until Ctrl-C. `--handlers <module>` adds
 * the handlers a module exports to the worker's built-in ones.
 */
import { Command, Options } from "@effect/cli"
import { type Config, Console, Data, Effect, Layer, Option } from "effect"
import * as Path from "node:path"
import * as Url from "node:url"
import { Probe } from "../actors/ProbeActor.ts"
import * as CallbackDispatcher from "../runtime/jobs/CallbackDispatcher.ts"
import { NodeConfig } from "../runtime/Config.ts"
import * as Database from "../runtime/db/Database.ts"
import * as EventStream from "../runtime/jobs/EventStream.ts"
import * as Gateway from "../edge/Gateway.ts"
import type * as JobHandler from "../runtime/jobs/JobHandler.ts"
import * as Jobs from "../edge/Jobs.ts"
import * as Node from "../runtime/core/Node.ts"
import * as Reaper from "../runtime/jobs/Reaper.ts"
import * as WorkerNode from "../worker/index.ts"

/** A `--handlers` module that cannot be used: which one, and what was expected of it. */
export class HandlerModuleError extends Data.TaggedError("HandlerModuleError")<{
  readonly module: string
  readonly problem: string
}> {
  override get message() {
    return `--handlers ${this.module}: ${this.problem}`
  }
}

/** Run a node until interrupted; the worker runs the handlers of these modules too (later ones win). */
export const run = (handlerModules: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const config = yield* NodeConfig
    const roles = config.role.split("+")
    if (handlerModules.length > 0 && !roles.includes("worker")) {
      return yield* new HandlerModuleError({
        module: handlerModules[0]!,
        problem: `handlers need the worker role, and TROUPE_ROLE is ${config.role} (use worker or gateway+worker)`
      })
    }
    // Loaded before the database starts, so a broken module is reported at once.
    const handlers = yield* loadHandlers(handlerModules)
    return yield* serve(config, handlers)
  })

/** The node of `run`, its roles started (a layer per role), until interrupted. */
const serve = (config: Config.Config.Success<typeof NodeConfig>, handlers: JobHandler.Handlers) => {
  const roles = config.role.split("+")
  const node = Node.layer({
    nodeId: config.nodeId,
    role: config.role,
    actors: [Probe],
    heartbeat: `${config.heartbeatMs} millis`
  })
  const probe = Layer.effectDiscard(Effect.flatMap(Node.Node, (n) => n.spawn(Probe, n.id)))
  // The gateway role: the job service, the event stream, the reaper, the callback dispatcher and the edge.
  const gateway = Layer.mergeAll(
    Gateway.layerConfig(config.dataDir),
    Layer.scopedDiscard(Effect.flatMap(Node.Node, (n) => Reaper.make({ nodeId: n.id }))),
    CallbackDispatcher.layerConfig()
  ).pipe(Layer.provideMerge(Layer.merge(Jobs.layerConfig, EventStream.layer())))
  const worker = WorkerNode.layerOnNode({ handlers })
  const services = Layer.mergeAll(
    probe,
    roles.includes("gateway") ? gateway : Layer.empty,
    roles.includes("worker") ? worker : Layer.empty
  ).pipe(Layer.provideMerge(node), Layer.provideMerge(Database.layer))
  return announce(config).pipe(Effect.zipRight(Effect.never), Effect.scoped, Effect.provide(services))
}

/** Say what is up, and where. */
const announce = (config: Config.Config.Success<typeof NodeConfig>) =>
  Effect.gen(function* () {
    const node = yield* Node.Node
    const urls = yield* Database.DatabaseUrls
    const parts: Array<string> = []
    const gateway = yield* Effect.serviceOption(Gateway.GatewayService)
    if (Option.isSome(gateway)) {
      const { host, port, secretSource } = gateway.value
      const base = `${host === "0.0.0.0" ? "127.0.0.1" : host}:${port}`
      parts.push(
        "  gateway   job service, reaper and callback dispatcher",
        `  edge      ws://${base}/v1/ws (protocol v1), http://${base}/api/v1/…, /health, /metrics`,
        `            secret: ${secretSource === "GH_SERVICE_SECRET" ? "GH_SERVICE_SECRET" : `generated, in ${displayPath(secretSource)}`}`
      )
    }
    const worker = yield* Effect.serviceOption(WorkerNode.Running)
    if (Option.isSome(worker)) {
      const w = worker.value
      parts.push(
        `  worker    ${w.workerId}: up to ${w.maxConcurrent} job(s) at a time; job types ${w.jobTypes.join(", ")}`,
        `            http on port ${w.httpPort}: /health, /worker/health, /worker/status, POST /worker/drain (X-Deploy-Secret)`
      )
    }
    const database = Option.match(urls.embedded, {
      onNone: () => "the server named by DATABASE_URL",
      onSome: (pg) =>
        `embedded Postgres on 127.0.0.1:${pg.port}, data in ${displayPath(pg.dataDir)} (kept between runs)`
    })
    yield* Console.log(
      [
        `troupe node "${node.id}" is up (roles: ${config.role})`,
        `  database  ${database}`,
        `  probe     actor probe:${node.id} answers {"_tag":"Ping","text":"…"}`,
        ...parts,
        `  inspect   npx troupe inspect nodes | actors | actor <id> | send <id> <json> [--ask] | tail`,
        `            npx troupe inspect jobs | job <id> | workers`,
        `            npx troupe inspect watch | submit <type> [--wait] | cancel <id> | resume <id> | drain <worker>  (through the edge)`,
        "  stop      Ctrl-C"
      ].join("\n")
    )
    yield* Effect.addFinalizer(() => Console.log(`troupe node "${node.id}" stopping…`))
  })

/** `--handlers <module>`: repeatable. */
const handlersOption = Options.file("handlers", { exists: "yes" }).pipe(
  Options.repeated,
  Options.withDescription(
    "a module whose named export `handlers` (or else default export) is JobHandler.handlers({...}) from troupe/worker; its job types are added to the built-in ones (a path relative to the current directory; repeat for more, later ones win)"
  )
)

/** `troupe start` */
export const command = Command.make("start", { handlers: handlersOption }, ({ handlers }) =>
  run(handlers)
).pipe(
  Command.withDescription(
    "run a node (gateway + worker) on the database named by DATABASE_URL, or on an embedded Postgres under .troupe/pg"
  )
)

// --- internal ---

const expected =
  'a named export `handlers` (or a default export) made with JobHandler.handlers({ <job type>: <Effect> }) from "troupe/worker"'

/** The handlers of these modules, merged in order. */
const loadHandlers = (modules: ReadonlyArray<string>) =>
  Effect.map(Effect.forEach(modules, loadModule), (all): JobHandler.Handlers => Object.assign({}, ...all))

/** Import a handler module (relative to the current directory) and check what it exports. */
const loadModule = (module: string) =>
  Effect.gen(function* () {
    const fail = (problem: string) => Effect.fail(new HandlerModuleError({ module, problem }))
    const href = Url.pathToFileURL(Path.resolve(process.cwd(), module)).href
    const exports: Record<string, unknown> = yield* Effect.tryPromise({
      try: () => import(href),
      catch: (e) =>
        new HandlerModuleError({
          module,
          problem: `could not be loaded: ${e instanceof Error ? e.message : String(e)}`
        })
    })
    // The named export first: a CommonJS module's `default` is its whole exports object.
    const [which, value] =
      exports.handlers !== undefined
        ? ["its export `handlers`", exports.handlers]
        : exports.default !== undefined
          ? ["its default export", exports.default]
          : [undefined, undefined]
    if (which === undefined) {
      const names = Object.keys(exports)
      return yield* fail(
        `expected ${expected}, but it exports ${names.length === 0 ? "nothing" : names.join(", ")}`
      )
    }
    if (typeof value !== "object" || value === null || Array.isArray(value))
      return yield* fail(`${which} is not handlers by job type; expected ${expected}`)
    const entries = Object.entries(value)
    const bad = entries.filter(([, handler]) => !Effect.isEffect(handler)).map(([type]) => type)
    if (entries.length === 0) return yield* fail(`${which} has no job type; expected ${expected}`)
    if (bad.length > 0)
      return yield* fail(
        `${which} has job types whose handler is not an Effect (${bad.join(", ")}); expected ${expected}`
      )
    return value as JobHandler.Handlers
  })

const displayPath = (dir: string) => {
  const rel = Path.relative(process.cwd(), dir)
  return rel.startsWith("..") || Path.isAbsolute(rel) ? dir : rel
}
