/**
 * A node's configuration, from the environment, with defaults that work on a laptop.
 */
import { Config } from "effect"
import * as Os from "node:os"
import * as Path from "node:path"

/** The default node id: the host name, made safe for a NOTIFY channel name. */
export const defaultNodeId = (): string =>
  (
    Os.hostname()
      .replace(/[^A-Za-z0-9._-]/g, "-")
      .slice(0, 40) || "node"
  ).toLowerCase()

/** `TROUPE_DATA_DIR`: where the embedded Postgres and the generated service secret live (default `.troupe`). */
export const DataDirConfig = Config.string("TROUPE_DATA_DIR").pipe(Config.withDefault(".troupe"))

/** Where a node without `GH_SERVICE_SECRET` keeps the secret it generated (the inspector reads it there). */
export const secretFile = (dataDir: string): string => Path.join(dataDir, "service-secret")

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
  dataDir: DataDirConfig,
  heartbeatMs: Config.integer("TROUPE_HEARTBEAT_MS").pipe(Config.withDefault(5000))
})

/** A worker's settings: `GH_WORKER_ID`, `TARGET_WORKER_ID`, `EC2_INSTANCE_ID`, `EC2_IP`, `MAX_CONCURRENT_JOBS`, `GH_WORKER_HEARTBEAT_MS`. */
export const WorkerConfig = Config.all({
  workerId: Config.option(Config.string("GH_WORKER_ID")),
  targetWorkerId: Config.option(Config.string("TARGET_WORKER_ID")),
  ec2InstanceId: Config.option(Config.string("EC2_INSTANCE_ID")),
  ec2Ip: Config.option(Config.string("EC2_IP")),
  maxConcurrent: Config.integer("MAX_CONCURRENT_JOBS").pipe(
    Config.validate({
      message: "MAX_CONCURRENT_JOBS must be between 1 and 1000",
      validation: (n) => n >= 1 && n <= 1000
    }),
    Config.withDefault(1)
  ),
  heartbeatMs: Config.integer("GH_WORKER_HEARTBEAT_MS").pipe(Config.withDefault(10_000))
})

/** Model prices (`TROUPE_PRICES`, JSON: `{"model": {"input_per_mtok_usd": 3, "output_per_mtok_usd": 15}}`), merged over the defaults. */
export const PricesConfig = Config.option(Config.string("TROUPE_PRICES"))

/** A TCP port to listen on from `name` (0 picks a free one), else `fallback`. */
export const listenPort = (name: string, fallback: number): Config.Config<number> =>
  Config.integer(name).pipe(
    Config.validate({
      message: `${name} must be a port number from 0 to 65535 (0 picks a free one)`,
      validation: (n) => n >= 0 && n <= 65535
    }),
    Config.withDefault(fallback)
  )

/** `TROUPE_HTTP_HOST`: the interface HTTP servers bind (default all, 0.0.0.0). */
export const listenHost = Config.string("TROUPE_HTTP_HOST").pipe(Config.withDefault("0.0.0.0"))

/**
 * What `/health` reports of the deployment: `TROUPE_ENV` (else `NODE_ENV`, else
 * `development`) and `COMMIT_SHA` (else `unknown`).
 */
export const DeploymentConfig = Config.all({
  environment: Config.string("TROUPE_ENV").pipe(
    Config.orElse(() => Config.string("NODE_ENV")),
    Config.withDefault("development")
  ),
  commitSha: Config.string("COMMIT_SHA").pipe(Config.withDefault("unknown"))
})
