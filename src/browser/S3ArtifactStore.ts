/**
 * Screenshots in S3, for a fleet whose clients cannot reach the worker machines: each PNG is
 * put under `<prefix>/<token>.png` (the same unguessable 24-byte token as the filesystem
 * store), and its URL is a presigned GET for that object, valid for `expiresInSeconds`
 * (default 24 h). The bucket stays private: whoever has the URL can fetch that one object
 * until it expires, nobody can list or guess the others.
 *
 * Credentials come from the SDK's default chain (environment, profile, the instance's role).
 * A presigned URL is only as good as the credentials that signed it: one signed with an
 * instance role's temporary credentials stops working when they expire, whatever
 * `expiresInSeconds` says.
 */
import {
  GetObjectCommand,
  NoSuchKey,
  PutObjectCommand,
  S3Client,
  S3ServiceException
} from "@aws-sdk/client-s3"
import { getSignedUrl } from "@aws-sdk/s3-request-presigner"
import { Data, Effect, Option } from "effect"
import {
  type Artifact,
  type ArtifactStore,
  defaultUrlTtlSeconds,
  isToken,
  newToken
} from "./ArtifactStore.ts"

/** Where and how the screenshots are kept. */
export interface Options {
  readonly bucket: string
  /** A key prefix (`screenshots/prod`); none puts the objects at the bucket's root. */
  readonly prefix?: string
  /** The bucket's region; by default the SDK's (`AWS_REGION`, the profile). */
  readonly region?: string
  /** How long a screenshot's URL works (default 86,400 s, at most 604,800: SigV4's limit). */
  readonly expiresInSeconds?: number
  /** The client to use (tests pass one with fixed credentials); by default a new `S3Client`. */
  readonly client?: S3Client
}

/**
 * S3 refused or could not be reached: what was being done, to which object, and S3's reason
 * (`could not store the screenshot s3://<bucket>/<key>: AccessDenied (HTTP 403): Access Denied`).
 */
export class S3ArtifactError extends Data.TaggedError("S3ArtifactError")<{
  readonly message: string
  readonly action: "store" | "sign a URL for" | "read"
  readonly bucket: string
  readonly key: string
  /** The SDK error's name and message (never its other fields, which may name the access key). */
  readonly reason: string
}> {}

/** An artifact store in S3: its failures are `S3ArtifactError`s. */
export interface S3Store extends ArtifactStore {
  readonly putPng: (bytes: Uint8Array) => Effect.Effect<Artifact, S3ArtifactError>
  readonly getPng: (token: string) => Effect.Effect<Option.Option<Uint8Array>, S3ArtifactError>
}

/** A store in an S3 bucket, with presigned URLs. */
export const s3 = (options: Options): S3Store => {
  const { bucket } = options
  const prefix = trimSlashes(options.prefix ?? "")
  const expiresIn = options.expiresInSeconds ?? defaultUrlTtlSeconds
  const client =
    options.client ?? new S3Client(options.region === undefined ? {} : { region: options.region })
  const keyOf = (token: string) => (prefix === "" ? `${token}.png` : `${prefix}/${token}.png`)
  const failed = (action: S3ArtifactError["action"], key: string) => (e: unknown) => {
    const reason = reasonOf(e)
    // The message is a field, so that logs (which print an error's fields) show it.
    const message = `could not ${action} the screenshot s3://${bucket}/${key}: ${reason}`
    return new S3ArtifactError({ message, action, bucket, key, reason })
  }

  return {
    putPng: (bytes) =>
      Effect.gen(function* () {
        const token = newToken()
        const key = keyOf(token)
        yield* Effect.tryPromise({
          try: (signal) =>
            client.send(
              new PutObjectCommand({
                Bucket: bucket,
                Key: key,
                Body: bytes,
                ContentType: "image/png",
                CacheControl: "private, max-age=3600"
              }),
              { abortSignal: signal }
            ),
          catch: failed("store", key)
        })
        const url = yield* Effect.tryPromise({
          try: () => getSignedUrl(client, new GetObjectCommand({ Bucket: bucket, Key: key }), { expiresIn }),
          catch: failed("sign a URL for", key)
        })
        return { token, url }
      }),
    getPng: (token) => {
      if (!isToken(token)) return Effect.succeed(Option.none())
      const key = keyOf(token)
      return Effect.tryPromise({
        try: async (signal) => {
          const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }), {
            abortSignal: signal
          })
          return out.Body === undefined ? new Uint8Array() : await out.Body.transformToByteArray()
        },
        catch: (e) => e
      }).pipe(
        Effect.map(Option.some),
        Effect.catchAll((e) =>
          isNoSuchKey(e) ? Effect.succeed(Option.none()) : Effect.fail(failed("read", key)(e))
        )
      )
    },
    // The URLs are S3's own, whatever address the worker is reached at.
    servedAt: () => {}
  }
}

// --- internal ---

const trimSlashes = (s: string): string => s.replace(/^\/+|\/+$/g, "")

const isNoSuchKey = (e: unknown): boolean =>
  e instanceof NoSuchKey || (e instanceof Error && e.name === "NoSuchKey")

/** An SDK error as a line: its name and message only, never the error's other fields. */
const reasonOf = (e: unknown): string => {
  if (!(e instanceof Error)) return String(e)
  const status = e instanceof S3ServiceException ? e.$metadata.httpStatusCode : undefined
  const line = e.message.split("\n")[0] ?? ""
  return `${e.name}${status === undefined ? "" : ` (HTTP ${status})`}${line === "" || line === e.name ? "" : `: ${line}`}`
}
