/**
 * A node's configuration, from the environment, with defaults that work on a laptop.
 */
import { Config } from "effect"
import * as Os from "node:os"

/** The default node id: the host name, made safe for a NOTIFY channel name. */
export const defaultNodeId = (): string =>
  (
    Os.hostname()
      .replace(/[^A-Za-z0-9._-]/g, "-")
      .slice(0, 40) || "node"
  ).toLowerCase()

/** `TROUPE_NODE_ID`, `TROUPE_ROLE`, `TROUPE_DATA_DIR`, `TROUPE_HEARTBEAT_MS`. */
export const NodeConfig = Config.all({
  nodeId: Config.string("TROUPE_NODE_ID").pipe(
    Config.validate({
      message: "TROUPE_NODE_ID may hold letters, digits, '.', '_' and '-', at most 48 characters",
      validation: (s) => /^[A-Za-z0-9._-]{1,48}$/.test(s)
    }),
    Config.orElse(() => Config.succeed(defaultNodeId()))
  ),
  role: Config.literal(
    "gateway+worker",
    "gateway",
    "worker"
  )("TROUPE_ROLE").pipe(Config.withDefault("gateway+worker")),
  dataDir: Config.string("TROUPE_DATA_DIR").pipe(Config.withDefault(".troupe")),
  heartbeatMs: Config.integer("TROUPE_HEARTBEAT_MS").pipe(Config.withDefault(5000))
})
