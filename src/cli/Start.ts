/**
 * `troupe start` (what `npm start` runs): a database (embedded unless DATABASE_URL is set)
 * and one node with the gateway and worker roles, until Ctrl-C.
 */
import { Command } from "@effect/cli"
import { Console, Effect, Option, Schema } from "effect"
import * as Path from "node:path"
import { builtinHandlers } from "../actors/handlers/Builtin.ts"
import { Probe } from "../actors/ProbeActor.ts"
import * as CallbackDispatcher from "../runtime/jobs/CallbackDispatcher.ts"
import { NodeConfig, PricesConfig, WorkerConfig } from "../runtime/Config.ts"
import * as Database from "../runtime/db/Database.ts"
import * as EventStream from "../runtime/jobs/EventStream.ts"
import * as Gateway from "../edge/Gateway.ts"
import { defaultPrices } from "../runtime/jobs/JobHandler.ts"
import * as Jobs from "../edge/Jobs.ts"
import * as Node from "../runtime/core/Node.ts"
import * as Reaper from "../runtime/jobs/Reaper.ts"
import * as Worker from "../actors/Worker.ts"
import * as WorkerHttp from "../edge/WorkerHttp.ts"

/** Run a node until interrupted. */
export const run = Effect.gen(function* () {
  const config = yield* NodeConfig
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
    const { secret, source } = yield* Gateway.resolveSecret(edge.secret, config.dataDir)
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
    const wc = yield* WorkerConfig
    const prices = yield* Effect.flatMap(PricesConfig, (raw) =>
      Option.match(raw, {
        onNone: () => Effect.succeed(defaultPrices),
        onSome: (json) =>
          Effect.map(Schema.decodeUnknown(Schema.parseJson(PriceTable))(json), (table) => ({
            ...defaultPrices,
            ...table
          }))
      })
    )
    const worker = yield* Worker.make(node, {
      workerId: Option.getOrUndefined(wc.workerId),
      targetWorkerId: Option.getOrNull(wc.targetWorkerId),
      ec2InstanceId: Option.getOrNull(wc.ec2InstanceId),
      ec2Ip: Option.getOrNull(wc.ec2Ip),
      maxConcurrent: wc.maxConcurrent,
      heartbeat: `${wc.heartbeatMs} millis`,
      handlers: builtinHandlers,
      prices
    })
    const http = yield* WorkerHttp.make(worker, yield* WorkerHttp.OptionsConfig)
    parts.push(
      `  worker    ${worker.workerId}: up to ${wc.maxConcurrent} job(s) at a time; job types ${Object.keys(builtinHandlers).join(", ")}`,
      `            http on port ${http.port}: /health, /worker/health, /worker/status, POST /worker/drain (X-Deploy-Secret)`
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

/** `troupe start` */
export const command = Command.make("start", {}, () => run).pipe(
  Command.withDescription(
    "run a node (gateway + worker) on the database named by DATABASE_URL, or on an embedded Postgres under .troupe/pg"
  )
)

// --- internal ---

const PriceTable = Schema.Record({
  key: Schema.String,
  value: Schema.Struct({ input_per_mtok_usd: Schema.Number, output_per_mtok_usd: Schema.Number })
})

const displayPath = (dir: string) => {
  const rel = Path.relative(process.cwd(), dir)
  return rel.startsWith("..") || Path.isAbsolute(rel) ? dir : rel
}
