/**
 * A worker node's HTTP port (`GH_WORKER_PORT`, default 3101): what deploy tooling and load
 * balancers ask a worker machine directly. `GET /health` (a real database check; 200 when
 * ok, 503 when degraded), `GET /worker/health` (may this machine be redeployed now?),
 * `GET /worker/status` (with the browser's figures), `GET /metrics` (Prometheus text), and
 * `POST /worker/drain` behind `X-Deploy-Secret` = `GH_DEPLOY_SECRET`. The shapes are
 * `Health`, `WorkerHealth`, `WorkerStatus` and `RestError` of `src/protocol/Edge.ts`, and
 * `DrainResult` here. `/worker/health`, `/worker/status` and `/metrics` read the worker's
 * memory only, so they answer during a database outage.
 *
 * It also serves the live view of the pages its jobs hold (`/live/<job_id>`, a WebSocket
 * behind the service secret; see `Live.ts`), and once it listens it records its address in
 * the worker's registry row (`http_url`), where gateways find it to proxy the live view.
 */
import {
  Headers,
  HttpRouter,
  HttpServerError,
  HttpServerRequest,
  HttpServerResponse
} from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { SqlClient } from "@effect/sql"
import { Cause, Config, Duration, Effect, Fiber, Option, Redacted, Schedule, Schema, type Scope } from "effect"
import * as Http from "node:http"
import type { Duplex } from "node:stream"
import packageJson from "../../package.json" with { type: "json" }
import { type ErrorCode, Health, RestError, WorkerHealth, WorkerStatus } from "../protocol/Edge.ts"
import { DataDirConfig, DeploymentConfig, listenHost, listenPort } from "../runtime/Config.ts"
import { gauge } from "../runtime/jobs/Monitoring.ts"
import * as WorkerStorage from "../runtime/jobs/WorkerStorage.ts"
import { resolveSecret, sameSecret } from "./Auth.ts"
import * as Live from "./Live.ts"
import type { Worker } from "../actors/WorkerActor.ts"
import type { ArtifactStore } from "../browser/ArtifactStore.ts"
import type { Browser } from "../browser/Browser.ts"
import * as LiveView from "../browser/LiveView.ts"

/** Options of a worker node's HTTP server. */
export interface Options {
  /** `GH_WORKER_PORT` (default 3101); 0 binds an ephemeral port. */
  readonly port?: number
  /** `TROUPE_HTTP_HOST` (default `0.0.0.0`). */
  readonly host?: string
  /** `GH_DEPLOY_SECRET`; unset or empty, `POST /worker/drain` answers 503. */
  readonly deploySecret?: Redacted.Redacted<string> | undefined
  /** `NODE_ENV` (default `development`). */
  readonly environment?: string
  /** `COMMIT_SHA` (default `unknown`). */
  readonly commitSha?: string
  /** How long the `SELECT 1` of `GET /health` may take before the database counts as down (default 2 s). */
  readonly healthTimeout?: Duration.DurationInput
  /** Where the screenshots of held jobs are kept; served at `/artifacts/<token>`. */
  readonly artifacts?: ArtifactStore
  /** The node's browser: its figures in `/worker/status` and `/metrics`, and the live view of its pages. */
  readonly browser?: Browser
  /** The service secret (`GH_SERVICE_SECRET`) the live view is opened with. */
  readonly serviceSecret?: Redacted.Redacted<string> | undefined
  /** `TROUPE_DATA_DIR`: without `serviceSecret`, the secret generated there (as a gateway does) is used. */
  readonly dataDir?: string
  /** The address recorded for gateways (default `http://<host>:<port>`, `EC2_IP` or 127.0.0.1 for a wildcard host). */
  readonly advertisedUrl?: string
}

/**
 * `GH_WORKER_PORT`, `TROUPE_HTTP_HOST`, `GH_DEPLOY_SECRET`, `GH_SERVICE_SECRET`,
 * `TROUPE_DATA_DIR`, and the deployment (`DeploymentConfig`).
 */
export const OptionsConfig: Config.Config<Options> = Config.all({
  port: listenPort("GH_WORKER_PORT", 3101),
  host: listenHost,
  deploySecret: Config.option(Config.redacted("GH_DEPLOY_SECRET")).pipe(Config.map(Option.getOrUndefined)),
  serviceSecret: Config.option(Config.redacted("GH_SERVICE_SECRET")).pipe(Config.map(Option.getOrUndefined)),
  dataDir: DataDirConfig,
  deployment: DeploymentConfig
}).pipe(Config.map(({ deployment, ...rest }) => ({ ...rest, ...deployment })))

/** The answer to a successful `POST /worker/drain`. */
export const DrainResult = Schema.Struct({
  ok: Schema.Literal(true),
  worker_id: Schema.String,
  status: Schema.Literal("draining"),
  /** Jobs still running; they finish, nothing new is claimed. */
  active_jobs: Schema.Number
})
export type DrainResult = typeof DrainResult.Type

/** The optional body of `POST /worker/drain`. */
export const DrainRequest = Schema.Struct({
  reason: Schema.optional(Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200)))
})

/** The service name `GET /health` reports. */
export const service = "troupe-worker"

/** A running worker HTTP server. */
export interface WorkerHttp {
  /** The bound port (the ephemeral one when asked for port 0). */
  readonly port: number
  readonly host: string
  /** The address recorded in the registry (`http_url`) for gateways. */
  readonly url: string
}

/** Serve a worker's HTTP routes until the scope closes. */
export const make = (
  worker: Worker,
  options: Options = {}
): Effect.Effect<WorkerHttp, HttpServerError.ServeError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const workers = yield* WorkerStorage.make
    const host = options.host ?? "0.0.0.0"
    const environment = options.environment ?? "development"
    const commitSha = options.commitSha ?? "unknown"
    const healthTimeout = Duration.decode(options.healthTimeout ?? "2 seconds")
    const secret = options.deploySecret ?? Redacted.make("")

    // --- Routes ---

    const databaseHealthy = sql`SELECT 1`.pipe(
      Effect.timeout(healthTimeout),
      Effect.as(true),
      Effect.catchAllCause(() => Effect.succeed(false))
    )

    const health = Effect.gen(function* () {
      const apiHealthy = yield* databaseHealthy
      return yield* json(
        Health,
        {
          status: apiHealthy ? "ok" : "degraded",
          service,
          version: packageJson.version,
          environment,
          commit_sha: commitSha,
          api_healthy: apiHealthy,
          timestamp: new Date().toISOString()
        },
        apiHealthy ? 200 : 503
      )
    })

    const workerHealth = Effect.gen(function* () {
      const state = yield* worker.status
      const active = state.active_job_ids.length
      return yield* json(WorkerHealth, {
        status: state.status !== "active" ? "draining" : active > 0 ? "busy" : "idle",
        active_jobs: active,
        deploy_safe: active === 0
      })
    })

    const workerStatus = Effect.gen(function* () {
      const state = yield* worker.status
      return yield* json(WorkerStatus, {
        worker_id: worker.workerId,
        ec2_instance_id: worker.ec2InstanceId,
        ec2_ip: worker.ec2Ip,
        active_jobs: state.active_job_ids.length,
        max_concurrent: state.max_concurrent,
        is_running: state.status !== "offline",
        is_draining: state.status === "draining",
        uptime_ms: Date.now() - worker.startedAt,
        browser: browserFigures()
      })
    })

    const browserFigures = () => {
      if (options.browser === undefined) return null
      const stats = options.browser.stats()
      return {
        version: stats.version,
        open_contexts: stats.openContexts,
        launches: stats.launches,
        chromium_rss_mb: Math.round((stats.rssBytes / (1024 * 1024)) * 10) / 10
      }
    }

    const metrics = Effect.gen(function* () {
      const state = yield* worker.status
      const labels = { worker_id: worker.workerId }
      const families = [
        gauge("troupe_worker_active_jobs", "Jobs this worker is running now (waiting for a human included).", [
          [labels, state.active_job_ids.length]
        ]),
        gauge("troupe_worker_max_concurrent", "Jobs this worker runs at once at most (MAX_CONCURRENT_JOBS).", [
          [labels, state.max_concurrent]
        ]),
        gauge("troupe_worker_draining", "1 while the worker is draining (it claims no new jobs).", [
          [labels, state.status === "draining" ? 1 : 0]
        ]),
        gauge("troupe_worker_uptime_seconds", "Seconds since the worker registered.", [
          [labels, Math.floor((Date.now() - worker.startedAt) / 1000)]
        ])
      ]
      if (options.browser !== undefined) {
        const stats = options.browser.stats()
        families.push(
          gauge("troupe_browser_open_contexts", "Browser contexts open now (one per running browser job).", [
            [labels, stats.openContexts]
          ]),
          counter("troupe_browser_launches_total", "Times Chromium was launched (the first job, then after each crash).", [
            [labels, stats.launches]
          ]),
          gauge("troupe_browser_chromium_rss_bytes", "Resident memory of Chromium's processes (0 when not running).", [
            [labels, stats.rssBytes]
          ]),
          gauge("troupe_browser_info", "The running Chromium's version (1 once launched).", [
            [{ ...labels, version: stats.version ?? "" }, stats.version === null ? 0 : 1]
          ]),
          gauge("troupe_live_viewers", "Live view sockets open on this worker.", [[labels, door.connections()]])
        )
      }
      return HttpServerResponse.text(families.join(""), {
        contentType: "text/plain; version=0.0.4; charset=utf-8"
      })
    })

    const drain = Effect.gen(function* () {
      const request = yield* HttpServerRequest.HttpServerRequest
      if (Redacted.value(secret) === "") {
        return failure(
          503,
          "INTERNAL",
          "GH_DEPLOY_SECRET is not set on this worker, so /worker/drain is disabled: set it and restart the worker"
        )
      }
      const given = request.headers["x-deploy-secret"]
      if (given === undefined || !sameSecret(given, secret)) {
        return failure(
          401,
          "UNAUTHORIZED",
          `${given === undefined ? "missing" : "wrong"} X-Deploy-Secret header: send the worker's GH_DEPLOY_SECRET`
        )
      }
      const body = yield* request.text.pipe(
        Effect.flatMap((text) =>
          text.trim() === ""
            ? Effect.succeed<typeof DrainRequest.Type>({})
            : Schema.decodeUnknown(Schema.parseJson(DrainRequest))(text)
        ),
        Effect.either
      )
      if (body._tag === "Left") {
        return failure(
          400,
          "INVALID_FRAME",
          'the body must be empty or JSON {"reason": "…"} (1 to 200 characters)'
        )
      }
      const state = yield* worker.drain(body.right.reason ?? "drain requested over the worker's HTTP port")
      if (state.status === "offline") {
        return failure(
          409,
          "CONFLICT",
          `worker ${worker.workerId} is deregistered: it claims no jobs already`
        )
      }
      return yield* json(DrainResult, {
        ok: true,
        worker_id: worker.workerId,
        status: "draining",
        active_jobs: state.active_job_ids.length
      })
    })

    // A screenshot of a job held for a human, by its unguessable token (no secret: the
    // token is the capability, and it is only ever handed out in that job's needs_human).
    const artifact = Effect.gen(function* () {
      const { token } = yield* HttpRouter.params
      const png = options.artifacts === undefined ? Option.none() : yield* options.artifacts.getPng(token ?? "")
      if (Option.isNone(png)) return failure(404, "NOT_FOUND", "no such artifact on this worker")
      return HttpServerResponse.uint8Array(png.value, {
        contentType: "image/png",
        headers: { "cache-control": "private, max-age=3600", "x-content-type-options": "nosniff" }
      })
    })

    const router = HttpRouter.empty.pipe(
      HttpRouter.get("/artifacts/:token", artifact),
      HttpRouter.get("/health", health),
      HttpRouter.get("/worker/health", workerHealth),
      HttpRouter.get("/worker/status", workerStatus),
      HttpRouter.get("/metrics", metrics),
      HttpRouter.post("/worker/drain", drain)
    )

    const app = router.pipe(
      Effect.catchTag("RouteNotFound", (e) => Effect.succeed(notFound(e.request))),
      Effect.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause)
          ? Effect.failCause(cause)
          : Effect.as(
              Effect.logError("worker http: request failed", cause),
              failure(500, "INTERNAL", "the worker could not answer this request; see its log")
            )
      )
    )

    // --- Live view ---

    const serviceSecret =
      options.serviceSecret ??
      (options.dataDir === undefined
        ? undefined
        : // Two nodes of one machine may create the secret file at once: the second reads it.
          (yield* resolveSecret(Option.none(), options.dataDir).pipe(Effect.retry({ times: 1 }), Effect.orDie))
            .secret)
    const door = yield* Live.workerDoor({
      workerId: worker.workerId,
      live: options.browser === undefined ? undefined : LiveView.make(options.browser),
      secret: serviceSecret
    })

    // --- Serve ---

    const handler = yield* NodeHttpServer.makeHandler(app)
    const server = Http.createServer(handler)
    server.on("upgrade", (req: Http.IncomingMessage, socket: Duplex, head: Buffer) => {
      if (!door.upgrade(req, socket, head)) {
        socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
      }
    })
    yield* Effect.async<void, HttpServerError.ServeError>((resume) => {
      const onError = (cause: Error) => resume(Effect.fail(new HttpServerError.ServeError({ cause })))
      server.once("error", onError)
      server.listen(options.port ?? 3101, host, () => {
        server.off("error", onError)
        resume(Effect.void)
      })
    })
    yield* Effect.addFinalizer(() =>
      Effect.async<void>((resume) => {
        door.closeAll()
        server.close(() => resume(Effect.void))
        server.closeAllConnections()
      })
    )
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    const url =
      options.advertisedUrl ??
      `http://${host === "0.0.0.0" || host === "::" ? (worker.ec2Ip ?? "127.0.0.1") : host}:${port}`
    // Gateways proxy the live view here. Recorded in the background (retried through a
    // database outage, which must not keep the worker from serving), cleared on the way out.
    const recording = yield* workers.setHttpUrl(worker.workerId, url).pipe(
      Effect.timeout("5 seconds"),
      Effect.tapError((e) => Effect.logWarning(`worker http: could not record ${url} in the registry; retrying`, e)),
      Effect.retry(Schedule.union(Schedule.exponential("100 millis"), Schedule.spaced("10 seconds"))),
      Effect.forkDaemon
    )
    yield* Effect.addFinalizer(() =>
      Fiber.interruptFork(recording).pipe(
        Effect.zipRight(workers.setHttpUrl(worker.workerId, null, url)),
        // A finalizer is uninterruptible: without this the timeout could not stop the statement.
        Effect.interruptible,
        Effect.timeout("2 seconds"),
        Effect.ignore
      )
    )
    return { port, host, url }
  })

// --- internal ---

/** The methods each path answers (for 405 and its `Allow` header). */
const allowed: Record<string, string> = {
  "/health": "GET, HEAD",
  "/worker/health": "GET, HEAD",
  "/worker/status": "GET, HEAD",
  "/metrics": "GET, HEAD",
  "/worker/drain": "POST"
}

/** A counter family in the Prometheus text format. */
const counter = (
  name: string,
  help: string,
  samples: ReadonlyArray<readonly [Readonly<Record<string, string>>, number]>
): string => gauge(name, help, samples).replace(`# TYPE ${name} gauge`, `# TYPE ${name} counter`)

const json = <A, I>(schema: Schema.Schema<A, I>, body: NoInfer<A>, status = 200) =>
  HttpServerResponse.schemaJson(schema)(body, { status }).pipe(Effect.orDie)

const failure = (status: number, code: ErrorCode, message: string, headers?: Headers.Input) =>
  HttpServerResponse.unsafeJson(Schema.encodeSync(RestError)({ error: { code, message } }), {
    status,
    ...(headers ? { headers } : {})
  })

const notFound = (request: HttpServerRequest.HttpServerRequest) => {
  const query = request.url.indexOf("?")
  const path = query === -1 ? request.url : request.url.slice(0, query)
  const methods = allowed[path]
  if (methods === undefined) {
    return failure(
      404,
      "NOT_FOUND",
      `no route ${request.method} ${path}: a worker answers GET /health, GET /worker/health, GET /worker/status, GET /metrics and POST /worker/drain`
    )
  }
  return failure(
    405,
    "INVALID_FRAME",
    `${path} does not answer ${request.method}: use ${methods}`,
    Headers.fromInput({ allow: methods })
  )
}
