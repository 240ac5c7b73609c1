/**
 * `troupe start` (what `npm start` runs): a database (embedded unless DATABASE_URL is set)
 * and one node with the gateway and worker roles, until Ctrl-C. `--handlers <module>` adds
 * the handlers a module exports to the worker's built-in ones.
 */
import { Command, Options } from "@effect/cli"
import { type Config, Console, Data, Effect, Option } from "effect"
import * as Path from "node:path"
import * as Url from "node:url"
import { Probe } from "../actors/ProbeActor.ts"
import * as CallbackDispatcher from "../runtime/jobs/CallbackDispatcher.ts"
import { NodeConfig } from "../runtime/Config.ts"
import * as Database from "../runtime/db/Database.ts"
import * as EventStream from "../runtime/jobs/EventStream.ts"
import * as Auth from "../edge/Auth.ts"
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

/** The node of `run`, its roles started, until interrupted. */
const serve = (config: Config.Config.Success<typeof NodeConfig>, handlers: JobHandler.Handlers) =>
  Effect.gen(function* () {
    const urls = yield* Database.DatabaseUrls
    const node = yield* Node.make({
      nodeId: config.nodeId,
      role: config.role,
      actors: [Probe],
      heartbeat: `${config.heartbeatMs} millis`
    })
    yield* node.spawn(Probe, config.nodeId)
    const roles = config.role.split("+")
    const parts: Array<string> = []
    if (roles.includes("gateway")) {
      const jobs = yield* Jobs.make(node, yield* Jobs.OptionsConfig)
      yield* Reaper.make({ nodeId: node.id })
      yield* CallbackDispatcher.makeConfig({ node, nodeId: node.id })
      const edge = yield* Gateway.GatewayConfig
      const { secret, source } = yield* Auth.resolveSecret(edge.secret, config.dataDir)
      const events = yield* EventStream.make(node)
      const gateway = yield* Gateway.make(jobs, events, {
        port: edge.port,
        host: edge.host,
        secret,
        ...edge.deployment
      })
      const base = `${edge.host === "0.0.0.0" ? "127.0.0.1" : edge.host}:${gateway.port}`
      parts.push(
        "  gateway   job service, reaper and callback dispatcher",
        `  edge      ws://${base}/v1/ws (protocol v1), http://${base}/api/v1/…, /health, /metrics`,
        `            secret: ${source === "GH_SERVICE_SECRET" ? "GH_SERVICE_SECRET" : `generated, in ${displayPath(source)}`}`
      )
    }
    if (roles.includes("worker")) {
      const worker = yield* WorkerNode.make(node, { handlers })
      parts.push(
        `  worker    ${worker.workerId}: up to ${worker.maxConcurrent} job(s) at a time; job types ${worker.jobTypes.join(", ")}`,
        `            http on port ${worker.httpPort}: /health, /worker/health, /worker/status, POST /worker/drain (X-Deploy-Secret)`
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
    return yield* Effect.never
  }).pipe(Effect.scoped, Effect.provide(Database.layer))

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
