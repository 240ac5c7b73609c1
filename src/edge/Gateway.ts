/**
 * The gateway's edge: one HTTP server (`TROUPE_HTTP_PORT`, default 3100) that serves the
 * client app's WebSocket protocol v1 at `/v1/ws` (with `ws`; each socket is a
 * `Connection.ts`), the REST compatibility routes, health and metrics (with
 * `@effect/platform`, see `Rest.ts`), and the live view of held pages at `/live/<job_id>`
 * (its page, and its socket proxied to the job's worker node: `Live.ts`). This file holds
 * the server, the upgrades and the keepalive. Every request is a thin translation onto the job service, the event stream and
 * the monitoring queries: the gateway keeps no job state of its own. See `docs/PROTOCOL.md`.
 */
import { NodeHttpServer } from "@effect/platform-node"
import type { SqlClient } from "@effect/sql"
import { Config, type ConfigError, Context, Duration, Effect, FiberSet, Layer, type Redacted, type Scope } from "effect"
import * as Http from "node:http"
import type { Duplex } from "node:stream"
import { WebSocketServer } from "ws"
import * as Edge from "../protocol/Edge.ts"
import { DeploymentConfig, listenHost, listenPort } from "../runtime/Config.ts"
import * as EventStream from "../runtime/jobs/EventStream.ts"
import * as Monitoring from "../runtime/jobs/Monitoring.ts"
import * as WorkerStorage from "../runtime/jobs/WorkerStorage.ts"
import * as Auth from "./Auth.ts"
import { Connection, type Limits, type Services } from "./Connection.ts"
import { Jobs, type JobService } from "./Jobs.ts"
import * as Live from "./Live.ts"
import * as Rest from "./Rest.ts"

/** How a gateway listens and protects itself. */
export interface Options {
  /** TCP port (default 3100; 0 picks a free one). */
  readonly port?: number
  /** Interface to bind (default `0.0.0.0`). */
  readonly host?: string
  /** The shared service secret (`GH_SERVICE_SECRET`). */
  readonly secret: Redacted.Redacted<string>
  /** How long a socket may stay unauthenticated (default 5 s). */
  readonly authTimeout?: Duration.DurationInput
  /** Unsent bytes a connection may hold before it counts as slow (default 8 MiB). */
  readonly sendBufferLimit?: number
  /** Frames a slow connection may have held back on top of that (default 8 MiB); past it, 1013 at once. */
  readonly maxHeldBytes?: number
  /** How long a slow connection may stay over its limit before it is closed with 1013 (default 5 s). */
  readonly slowConsumerGrace?: Duration.DurationInput
  /** WebSocket ping interval; a peer that misses a pong is dropped (default 30 s). */
  readonly keepalive?: Duration.DurationInput
  /** Requests one connection may have in flight (default 256). */
  readonly maxInflight?: number
  /** Subscriptions one connection may hold (default 1,000). */
  readonly maxSubscriptions?: number
  readonly version?: string
  readonly commitSha?: string
  readonly environment?: string
}

/** A running gateway. */
export interface Gateway {
  /** The bound port. */
  readonly port: number
  /** Open WebSocket connections (one the gateway is closing no longer counts). */
  readonly connections: () => number
}

/**
 * `TROUPE_HTTP_PORT` (default 3100), `TROUPE_HTTP_HOST` (default 0.0.0.0), `GH_SERVICE_SECRET`,
 * and the deployment `/health` reports (`DeploymentConfig`).
 */
export const GatewayConfig = Config.all({
  port: listenPort("TROUPE_HTTP_PORT", 3100),
  host: listenHost,
  secret: Config.option(Config.redacted("GH_SERVICE_SECRET")),
  deployment: DeploymentConfig
})

/** A gateway started from the environment, and where its secret came from. */
export interface Serving extends Gateway {
  /** `GH_SERVICE_SECRET`, or the file the generated secret is kept in. */
  readonly secretSource: string
  readonly host: string
}

/** The gateway of this process. */
export class GatewayService extends Context.Tag("troupe/edge/Gateway")<GatewayService, Serving>() {}

/**
 * The gateway on this process's job service and event stream, configured from the
 * environment (`GatewayConfig`; a generated secret is kept under `dataDir`).
 */
export const layerConfig = (
  dataDir: string
): Layer.Layer<GatewayService, Error | ConfigError.ConfigError, Jobs | EventStream.Events | SqlClient.SqlClient> =>
  Layer.scoped(
    GatewayService,
    Effect.gen(function* () {
      const config = yield* GatewayConfig
      const { secret, source } = yield* Auth.resolveSecret(config.secret, dataDir)
      const gateway = yield* make(yield* Jobs, yield* EventStream.Events, {
        port: config.port,
        host: config.host,
        secret,
        ...config.deployment
      })
      return { ...gateway, secretSource: source, host: config.host }
    })
  )

/** Start a gateway on a node; it serves until the scope closes. */
export const make = (
  jobs: JobService,
  events: EventStream.EventStream,
  options: Options
): Effect.Effect<Gateway, Error, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const monitoring = yield* Monitoring.make
    const connections = new Set<Connection>()
    const app = Rest.makeApp({
      secret: options.secret,
      jobs,
      events,
      monitoring,
      openConnections: () => connections.size,
      version: options.version,
      commitSha: options.commitSha,
      environment: options.environment
    })
    const httpHandler = yield* NodeHttpServer.makeHandler(app)
    const run = yield* FiberSet.makeRuntime<SqlClient.SqlClient>()
    const limits: Limits = {
      authTimeout: Duration.decode(options.authTimeout ?? "5 seconds"),
      sendBufferLimit: options.sendBufferLimit ?? 8 * 1024 * 1024,
      maxHeldBytes: options.maxHeldBytes ?? 8 * 1024 * 1024,
      graceMs: Duration.toMillis(options.slowConsumerGrace ?? "5 seconds"),
      maxInflight: options.maxInflight ?? 256,
      maxSubscriptions: options.maxSubscriptions ?? 1000
    }
    const services: Services = { jobs, events, monitoring, secret: options.secret, limits, run }

    const wss = new WebSocketServer({
      noServer: true,
      maxPayload: Edge.maxFrameBytes,
      perMessageDeflate: false
    })
    const live = yield* Live.gatewayDoor({ secret: options.secret, workers: yield* WorkerStorage.make })
    const server = Http.createServer((req, res) => {
      if (!Live.servePage(req, res)) httpHandler(req, res)
    })
    server.on("upgrade", (req: Http.IncomingMessage, socket: Duplex, head: Buffer) => {
      if (live.upgrade(req, socket, head)) return
      const path = (req.url ?? "/").split("?")[0]
      if (path !== "/v1/ws") return refuseUpgrade(socket, 404, "Not Found")
      const header = req.headers.authorization
      // A wrong secret on the upgrade is refused outright; no header means "auth frame follows".
      if (header !== undefined && !Auth.authorized(header, options.secret)) {
        return refuseUpgrade(socket, 401, "Unauthorized")
      }
      wss.handleUpgrade(req, socket, head, (ws) => {
        const connection = new Connection(ws, header !== undefined, services, () =>
          connections.delete(connection)
        )
        connections.add(connection)
      })
    })

    yield* Effect.async<void, Error>((resume) => {
      const onError = (e: Error) => resume(Effect.fail(e))
      server.once("error", onError)
      server.listen(options.port ?? 3100, options.host ?? "0.0.0.0", () => {
        server.off("error", onError)
        resume(Effect.void)
      })
    })
    yield* Effect.addFinalizer(() =>
      Effect.async<void>((resume) => {
        for (const c of connections) c.close(Edge.CloseCode.goingAway, "server shutting down")
        live.closeAll()
        wss.close()
        // Waits for the sockets too: each ends with its close handshake or is cut 2 s after
        // (by its connection's fiber, which the gateway's scope interrupts only after this).
        server.close(() => resume(Effect.void))
        server.closeAllConnections()
      })
    )
    yield* Effect.forkScoped(
      Effect.sync(() => {
        for (const c of connections) c.keepalive()
      }).pipe(Effect.delay(options.keepalive ?? "30 seconds"), Effect.forever)
    )
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : (options.port ?? 3100)
    return { port, connections: () => connections.size }
  })

// --- internal ---

const refuseUpgrade = (socket: Duplex, status: number, text: string) => {
  socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`)
}
