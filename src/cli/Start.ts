/**
 * `troupe start` (what `npm start` runs): a database (embedded unless DATABASE_URL is set)
 * and one node with the gateway and worker roles, until Ctrl-C.
 */
import { Command } from "@effect/cli"
import { Console, Effect, Option } from "effect"
import * as Path from "node:path"
import { Probe } from "../actors/Probe.ts"
import { NodeConfig } from "../runtime/Config.ts"
import * as Database from "../runtime/Database.ts"
import * as Node from "../runtime/Node.ts"

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
      `  inspect   npx troupe inspect nodes | actors | actor <id> | send <id> <json> [--ask] | tail`,
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

const displayPath = (dir: string) => {
  const rel = Path.relative(process.cwd(), dir)
  return rel.startsWith("..") || Path.isAbsolute(rel) ? dir : rel
}
