/**
 * The inspector's link to a gateway: where it is, which secret to present, a typed client
 * (`troupe/client`) that gives up quickly when the gateway cannot be reached at first and
 * reconnects for ever once it was up, and the one-line errors the commands print.
 */
import { Config, Console, Data, Effect, Option, Queue, Redacted, Schedule, type Scope } from "effect"
import * as Fs from "node:fs"
import * as Client from "../../client/Client.ts"
import type { EventRecord } from "../../protocol/Edge.ts"
import { DataDirConfig, secretFile } from "../../runtime/Config.ts"

/** Where `npm start` serves the socket on a laptop. */
export const defaultUrl = "ws://127.0.0.1:3100/v1/ws"

/** A gateway command failed; the message is the one line the user sees. */
export class GatewayError extends Data.TaggedError("GatewayError")<{ readonly message: string }> {}

/** The service secret and where it came from: `GH_SERVICE_SECRET`, or a file's path. Never the value. */
export interface Secret {
  readonly secret: Redacted.Redacted<string>
  readonly source: string
}

/**
 * `GH_SERVICE_SECRET`, else the `service-secret` file `npm start` generates in
 * `<TROUPE_DATA_DIR or .troupe>/`. Unlike the gateway, the inspector never creates the file.
 */
export const resolveSecret: Effect.Effect<Secret, GatewayError> = Effect.gen(function* () {
  const fromEnv = yield* Config.option(Config.redacted("GH_SERVICE_SECRET"))
  if (Option.isSome(fromEnv)) return { secret: fromEnv.value, source: "GH_SERVICE_SECRET" }
  const file = secretFile(yield* DataDirConfig)
  return yield* Effect.try({
    try: () => ({ secret: Redacted.make(Fs.readFileSync(file, "utf8").trim()), source: file }),
    catch: (e) =>
      new GatewayError({
        message:
          (e as NodeJS.ErrnoException).code === "ENOENT"
            ? `no service secret: GH_SERVICE_SECRET is not set and ${file} does not exist (\`npm start\` writes it on its first run: run the inspector from the same directory, or set GH_SERVICE_SECRET to the gateway's secret)`
            : `cannot read the service secret from ${file}: ${(e as Error).message}`
      })
  })
}).pipe(Effect.catchTag("ConfigError", (e) => new GatewayError({ message: String(e) })))

/** A connected client and what the commands need to explain its failures. */
export interface Link {
  readonly client: Client.TroupeClient
  readonly url: string
  /** Where the secret came from (`GH_SERVICE_SECRET` or a file path), for error messages. */
  readonly source: string
  /** A client error as the line the user sees: code and message, the secret's source for `UNAUTHORIZED`. */
  readonly explain: (error: Client.TroupeClientError) => GatewayError
  /** Say on stderr when the connection drops and when it is back, for as long as it runs. */
  readonly reportReconnects: Effect.Effect<never>
}

/**
 * Connect to the gateway at `url` for the lifetime of the scope, and check it answers (a
 * `ping`). Until the first connection, the client tries a few times (about a second), so
 * an unreachable gateway is reported at once; afterwards it reconnects for ever (the
 * client's backoff) and resumes its subscriptions.
 */
export const connect = (url: string): Effect.Effect<Link, GatewayError, Scope.Scope> =>
  Effect.gen(function* () {
    if (!isGatewayUrl(url)) {
      return yield* new GatewayError({
        message: `--gateway "${url}" is not a gateway url: expected ws://host:port/v1/ws (or http://host:port), e.g. ${defaultUrl}`
      })
    }
    const { secret, source } = yield* resolveSecret
    const drops = yield* Queue.sliding<void>(1)
    let everUp = false
    let up = false
    let triesBeforeUp = 0
    const reconnect = Client.defaultReconnect.pipe(
      Schedule.check(() => everUp || ++triesBeforeUp <= initialTries),
      Schedule.tapInput(() => {
        if (!up) return Effect.void
        up = false
        return Queue.offer(drops, undefined)
      })
    )
    const client = yield* Client.make({ url, secret, reconnect })

    const explain = (error: Client.TroupeClientError): GatewayError =>
      new GatewayError({
        message:
          error.code === "UNAUTHORIZED"
            ? `UNAUTHORIZED: the gateway at ${url} refused the service secret from ${describeSource(source)}: use the secret the gateway runs with (its GH_SERVICE_SECRET, or the service-secret file \`npm start\` wrote in its data directory)`
            : `${error.code}: ${error.message}`
      })

    yield* client.ping().pipe(
      Effect.mapError((error) =>
        error.code === "DISCONNECTED"
          ? new GatewayError({
              message: `cannot reach the gateway at ${url}${problemOf(error)}: start one with \`npm start\`, or point --gateway (or TROUPE_GATEWAY_URL) at a running one`
            })
          : explain(error)
      )
    )
    everUp = true
    up = true

    /** A read that waits for the connection to be back, for as long as the client keeps trying. */
    const back = client
      .ping()
      .pipe(Effect.retry({ while: (e) => e.code === "DISCONNECTED" || e.code === "TIMEOUT" }), Effect.ignore)
    const reportReconnects = Effect.forever(
      Effect.gen(function* () {
        yield* Queue.take(drops)
        yield* Console.error(`troupe: lost the connection to the gateway at ${url}; reconnecting…`)
        yield* back
        up = true
        yield* Console.error(
          `troupe: reconnected to the gateway at ${url}; the stream resumes after the last event shown`
        )
      })
    )
    return { client, url, source, explain, reportReconnects }
  })

/** Terminal event types: after one of them, a job may be over (`job_failed` with attempts left is not). */
export const endingEvents: ReadonlySet<string> = new Set(["job_completed", "job_failed", "job_cancelled"])

/** One event as a readable line: time, event id, type, job, worker, message. */
export const eventLine = (e: EventRecord): string =>
  [
    clock(e.created_at),
    `#${e.event_id}`.padEnd(8),
    e.event_type.padEnd(20),
    `job ${e.job_id ?? "—"}`,
    `worker ${e.worker_id ?? "—"}`,
    e.message ?? ""
  ]
    .join("  ")
    .trimEnd()

// --- internal ---

/** Attempts after the first before giving up on a gateway that was never reached (about 0.7 s of backoff). */
const initialTries = 3

const isGatewayUrl = (url: string) => {
  try {
    return ["ws:", "wss:", "http:", "https:"].includes(new URL(url).protocol)
  } catch {
    return false
  }
}

const describeSource = (source: string) =>
  source === "GH_SERVICE_SECRET" ? "the environment (GH_SERVICE_SECRET)" : `the file ${source}`

/** ` (connect ECONNREFUSED 127.0.0.1:3100)`: the last problem the client met, if any. */
const problemOf = (error: Client.TroupeClientError) => {
  const last = (error.details as { readonly last_problem?: unknown } | undefined)?.last_problem
  return typeof last === "string" ? ` (${last})` : ""
}

/** `14:03:21.452` of an ISO timestamp. */
const clock = (iso: string) => (/T(\d\d:\d\d:\d\d\.\d{3})/.exec(iso)?.[1] ?? iso).padEnd(12)
