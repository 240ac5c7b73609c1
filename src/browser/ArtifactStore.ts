/**
 * Where a job's screenshots go, each under an unguessable token (24 random bytes): whoever
 * has its URL (the client app, from `needs_human`) can fetch it, nobody can list or guess the
 * others. `TROUPE_ARTIFACTS` picks the store (`fromConfig`):
 * - `file` (the default) writes them under the worker's data dir (`<TROUPE_DATA_DIR>/artifacts`),
 *   and the worker node's HTTP server serves them at `/artifacts/<token>`;
 * - `s3://<bucket>/<prefix>` puts them in S3 and hands out presigned URLs
 *   (`S3ArtifactStore.s3`), for clients that cannot reach the worker machines.
 */
import { Config, ConfigError, Context, Effect, Either, Option } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"
import type * as S3ArtifactStore from "./S3ArtifactStore.ts"

/** A stored artifact. */
export interface Artifact {
  readonly token: string
  /** Where a client fetches it (once the worker's HTTP server is up; else a path). */
  readonly url: string
}

/** A store of artifacts. */
export interface ArtifactStore {
  /** Keep a PNG; its token and URL. */
  readonly putPng: (bytes: Uint8Array) => Effect.Effect<Artifact, Error>
  /** The PNG of a token, if there is one (a store that cannot be read fails). */
  readonly getPng: (token: string) => Effect.Effect<Option.Option<Uint8Array>, Error>
  /** Tell the store where it is served (`http://<host>:<port>`), when the HTTP server is up. */
  readonly servedAt: (base: string) => void
}

/** The artifact store of this worker node. */
export class Artifacts extends Context.Tag("troupe/browser/ArtifactStore")<Artifacts, ArtifactStore>() {}

/** A store on the filesystem, under `dir`. */
export const filesystem = (dir: string): ArtifactStore => {
  let base = ""
  return {
    putPng: (bytes) =>
      Effect.tryPromise({
        try: async () => {
          const token = newToken()
          await Fs.mkdir(dir, { recursive: true, mode: 0o700 })
          await Fs.writeFile(Path.join(dir, `${token}.png`), bytes, { mode: 0o600 })
          return { token, url: `${base}/artifacts/${token}` }
        },
        catch: (e) => new Error(`could not store the screenshot in ${dir}: ${String(e)}`)
      }),
    getPng: (token) =>
      isToken(token)
        ? Effect.promise(() =>
            Fs.readFile(Path.join(dir, `${token}.png`)).then(
              (b) => Option.some(new Uint8Array(b)),
              () => Option.none()
            )
          )
        : Effect.succeed(Option.none()),
    servedAt: (at) => {
      base = at
    }
  }
}

/** A new token: 24 random bytes, base64url (32 characters). */
export const newToken = (): string => Crypto.randomBytes(24).toString("base64url")

/** Whether `token` is one `newToken` could have made (nothing else reaches a store). */
export const isToken = (token: string): boolean => tokenPattern.test(token)

/** The default lifetime of an S3 screenshot's URL: a day, long enough for a human to answer. */
export const defaultUrlTtlSeconds = 86_400

/** The longest a SigV4 presigned URL may live (7 days). */
export const maxUrlTtlSeconds = 604_800

/** Where `TROUPE_ARTIFACTS` says the screenshots go. */
export type Location =
  | { readonly _tag: "File" }
  | { readonly _tag: "S3"; readonly bucket: string; readonly prefix: string }

/** `TROUPE_ARTIFACTS`: `file` (the default) or `s3://<bucket>/<prefix>` (the prefix may be empty). */
export const LocationConfig: Config.Config<Location> = Config.string("TROUPE_ARTIFACTS").pipe(
  Config.mapOrFail(parseLocation),
  Config.withDefault<Location>({ _tag: "File" })
)

/**
 * The S3 store's settings: `TROUPE_ARTIFACTS_REGION` (else `AWS_REGION`, else the SDK's own
 * default: the profile) and `TROUPE_ARTIFACTS_URL_TTL_S` (default 86,400, at most 604,800).
 */
export const S3Config = Config.all({
  region: Config.option(
    Config.string("TROUPE_ARTIFACTS_REGION").pipe(Config.orElse(() => Config.string("AWS_REGION")))
  ),
  expiresInSeconds: Config.integer("TROUPE_ARTIFACTS_URL_TTL_S").pipe(
    Config.validate({
      message: `TROUPE_ARTIFACTS_URL_TTL_S must be between 1 and ${maxUrlTtlSeconds} seconds (7 days, the longest a presigned URL lives)`,
      validation: (n) => n >= 1 && n <= maxUrlTtlSeconds
    }),
    Config.withDefault(defaultUrlTtlSeconds)
  )
})

/**
 * The store `TROUPE_ARTIFACTS` names: the filesystem under `<dataDir>/artifacts`, or S3 (the
 * AWS SDK is loaded only then). A bad value fails with a `ConfigError` naming the variable.
 */
export const fromConfig = (
  dataDir: string,
  options: { readonly s3Client?: S3ArtifactStore.Options["client"] } = {}
): Effect.Effect<ArtifactStore, ConfigError.ConfigError> =>
  Effect.gen(function* () {
    const location = yield* LocationConfig
    if (location._tag === "File") return filesystem(Path.join(dataDir, "artifacts"))
    const settings = yield* S3Config
    const { s3 } = yield* Effect.promise(() => import("./S3ArtifactStore.ts"))
    return s3({
      bucket: location.bucket,
      prefix: location.prefix,
      expiresInSeconds: settings.expiresInSeconds,
      ...(Option.isSome(settings.region) ? { region: settings.region.value } : {}),
      ...(options.s3Client === undefined ? {} : { client: options.s3Client })
    })
  })

// --- internal ---

/** A token as `putPng` makes them (nothing else reaches the filesystem). */
const tokenPattern = /^[A-Za-z0-9_-]{32}$/

/** A bucket name as S3 allows them: 3 to 63 lowercase letters, digits, dots and hyphens. */
const bucketPattern = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/

function parseLocation(value: string): Either.Either<Location, ConfigError.ConfigError> {
  const v = value.trim()
  if (v === "file") return Either.right({ _tag: "File" })
  const m = /^s3:\/\/([^/]+)(?:\/(.*))?$/.exec(v)
  if (m !== null && bucketPattern.test(m[1]!)) {
    return Either.right({ _tag: "S3", bucket: m[1]!, prefix: (m[2] ?? "").replace(/^\/+|\/+$/g, "") })
  }
  return Either.left(
    ConfigError.InvalidData(
      [],
      `TROUPE_ARTIFACTS must be "file" (screenshots under the data dir, served by the worker) or "s3://<bucket>/<prefix>" (screenshots in S3, presigned URLs); got ${JSON.stringify(value)}`
    )
  )
}
