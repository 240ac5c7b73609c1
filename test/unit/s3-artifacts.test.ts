/**
 * Where screenshots go: the S3 store (on the real `S3Client`, its `send` answered by
 * aws-sdk-client-mock; presigning runs for real, with fixed fake credentials), the
 * filesystem store's tokens and URLs, and `TROUPE_ARTIFACTS` picking between them.
 */
import {
  GetObjectCommand,
  NoSuchKey,
  PutObjectCommand,
  S3Client,
  S3ServiceException
} from "@aws-sdk/client-s3"
import { sdkStreamMixin } from "@smithy/core/serde"
import { afterEach, describe, expect, it } from "@effect/vitest"
import { mockClient } from "aws-sdk-client-mock"
import "aws-sdk-client-mock-vitest/extend"
import { ConfigError, ConfigProvider, Effect, Option } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { Readable } from "node:stream"
import * as ArtifactStore from "../../src/browser/ArtifactStore.ts"
import * as S3ArtifactStore from "../../src/browser/S3ArtifactStore.ts"

const accessKeyId = "AKIAIOSFODNN7EXAMPLE"
const secretAccessKey = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
const bucket = "troupe-shots"
const region = "eu-west-1"

/** A real S3 client with fixed fake credentials, whose requests the returned stub answers. */
const mocked = () => {
  const client = new S3Client({ region, credentials: { accessKeyId, secretAccessKey } })
  const stub = mockClient(client)
  stubs.push(stub)
  return { client, stub }
}
const stubs: Array<{ restore: () => void }> = []
afterEach(() => {
  for (const s of stubs.splice(0)) s.restore()
})

/** The first bytes of a PNG and a few more: what a screenshot looks like to the store. */
const png = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3, 4, 5])

const tokenShape = /^[A-Za-z0-9_-]{32}$/

/** A GetObject body as the SDK returns one (a stream with `transformToByteArray`). */
const body = (bytes: Uint8Array) => sdkStreamMixin(Readable.from([Buffer.from(bytes)]))

const withEnv = (env: Record<string, string>) =>
  Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env))))

describe("the S3 artifact store", () => {
  it.effect(
    "put sends the PNG under the prefix as image/png and answers a presigned GET URL of that object",
    () =>
      Effect.gen(function* () {
        const { client, stub } = mocked()
        stub.on(PutObjectCommand).resolves({ ETag: '"etag"' })
        const store = S3ArtifactStore.s3({ bucket, prefix: "/shots/prod/", expiresInSeconds: 3600, client })
        // The worker's own address plays no part in S3 URLs.
        store.servedAt("http://10.0.0.5:3100")

        const { token, url } = yield* store.putPng(png)

        expect(token).toMatch(tokenShape)
        const key = `shots/prod/${token}.png`
        expect(stub).toHaveReceivedCommandOnce(PutObjectCommand)
        expect(stub).toHaveReceivedCommandWith(PutObjectCommand, {
          Bucket: bucket,
          Key: key,
          ContentType: "image/png",
          Body: png
        })

        const u = new URL(url)
        expect(u.protocol).toBe("https:")
        expect(u.host).toBe(`${bucket}.s3.${region}.amazonaws.com`)
        expect(u.pathname).toBe(`/${key}`)
        expect(u.searchParams.get("X-Amz-Algorithm")).toBe("AWS4-HMAC-SHA256")
        expect(u.searchParams.get("X-Amz-Expires")).toBe("3600")
        expect(u.searchParams.get("X-Amz-Credential")).toMatch(
          new RegExp(`^${accessKeyId}/\\d{8}/${region}/s3/aws4_request$`)
        )
        expect(u.searchParams.get("X-Amz-Signature")).toMatch(/^[0-9a-f]{64}$/)
        // S3 will accept it: the signature is SigV4's for this GET, recomputed here.
        expect(u.searchParams.get("X-Amz-Signature")).toBe(sigV4QuerySignature(u, secretAccessKey))
        expect(url).not.toContain(secretAccessKey)
        expect(url).not.toContain(encodeURIComponent(secretAccessKey))
      })
  )

  it.effect("the URL lives a day by default, and a store without a prefix keys at the bucket's root", () =>
    Effect.gen(function* () {
      const { client, stub } = mocked()
      stub.on(PutObjectCommand).resolves({})
      const { token, url } = yield* S3ArtifactStore.s3({ bucket, client }).putPng(png)
      expect(stub).toHaveReceivedCommandWith(PutObjectCommand, { Bucket: bucket, Key: `${token}.png` })
      const u = new URL(url)
      expect(u.pathname).toBe(`/${token}.png`)
      expect(u.searchParams.get("X-Amz-Expires")).toBe("86400")
    })
  )

  it.effect(
    "get returns the stored bytes, none for a key S3 does not have, and asks nothing for a non-token",
    () =>
      Effect.gen(function* () {
        const { client, stub } = mocked()
        const store = S3ArtifactStore.s3({ bucket, prefix: "shots", client })
        const token = ArtifactStore.newToken()
        stub.on(GetObjectCommand, { Bucket: bucket, Key: `shots/${token}.png` }).resolves({ Body: body(png) })

        expect(yield* store.getPng(token)).toEqual(Option.some(png))

        const missing = ArtifactStore.newToken()
        stub.on(GetObjectCommand, { Bucket: bucket, Key: `shots/${missing}.png` }).rejects(
          new NoSuchKey({
            message: "The specified key does not exist.",
            $metadata: { httpStatusCode: 404 }
          })
        )
        expect(yield* store.getPng(missing)).toEqual(Option.none())

        const before = stub.commandCalls(GetObjectCommand).length
        expect(yield* store.getPng("../../other-bucket/secret")).toEqual(Option.none())
        expect(stub.commandCalls(GetObjectCommand).length).toBe(before)
      })
  )

  it.effect("a refused put fails with an error naming the bucket and key, and no credentials", () =>
    Effect.gen(function* () {
      const { client, stub } = mocked()
      // S3's own error carries the access key id among its fields.
      const denied = Object.assign(
        new S3ServiceException({
          name: "AccessDenied",
          $fault: "client",
          $metadata: { httpStatusCode: 403 },
          message: "Access Denied"
        }),
        { AWSAccessKeyId: accessKeyId }
      )
      stub.on(PutObjectCommand).rejects(denied)

      const e = yield* Effect.flip(S3ArtifactStore.s3({ bucket, prefix: "shots", client }).putPng(png))

      expect(e).toBeInstanceOf(S3ArtifactStore.S3ArtifactError)
      expect(e.bucket).toBe(bucket)
      expect(e.key).toMatch(/^shots\/[A-Za-z0-9_-]{32}\.png$/)
      expect(e.message).toBe(
        `could not store the screenshot s3://${bucket}/${e.key}: AccessDenied (HTTP 403): Access Denied`
      )
      // Logs print an error's fields: the message is one of them.
      expect(JSON.parse(JSON.stringify(e))).toMatchObject({
        _tag: "S3ArtifactError",
        message: e.message,
        bucket
      })
      const everything = `${e.message} ${JSON.stringify(e)} ${String(e)}`
      expect(everything).not.toContain(accessKeyId)
      expect(everything).not.toContain(secretAccessKey)
    })
  )

  it.effect(
    "a get S3 fails (not a missing key) is an error naming the object, not a missing screenshot",
    () =>
      Effect.gen(function* () {
        const { client, stub } = mocked()
        stub.on(GetObjectCommand).rejects(
          new S3ServiceException({
            name: "InternalError",
            $fault: "server",
            $metadata: { httpStatusCode: 500 },
            message: "We encountered an internal error. Please try again."
          })
        )
        const token = ArtifactStore.newToken()
        const error = yield* Effect.flip(S3ArtifactStore.s3({ bucket, client }).getPng(token))
        expect(error.message).toBe(
          `could not read the screenshot s3://${bucket}/${token}.png: InternalError (HTTP 500): We encountered an internal error. Please try again.`
        )
      })
  )
})

describe("TROUPE_ARTIFACTS picks the store (ArtifactStore.fromConfig)", () => {
  const tempDir = Effect.acquireRelease(
    Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-artifacts-"))),
    (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )

  it.scoped(
    "unset: the filesystem under <data dir>/artifacts, served by the worker at /artifacts/<token>",
    () =>
      Effect.gen(function* () {
        const dataDir = yield* tempDir
        const store = yield* ArtifactStore.fromConfig(dataDir).pipe(withEnv({}))

        const first = yield* store.putPng(png)
        expect(first.token).toMatch(tokenShape)
        expect(first.url).toBe(`/artifacts/${first.token}`)
        const file = Path.join(dataDir, "artifacts", `${first.token}.png`)
        expect(new Uint8Array(Fs.readFileSync(file))).toEqual(png)
        expect(Fs.statSync(file).mode & 0o777).toBe(0o600)

        store.servedAt("http://10.0.0.5:3100")
        const second = yield* store.putPng(png)
        expect(second.url).toBe(`http://10.0.0.5:3100/artifacts/${second.token}`)
        expect(second.token).not.toBe(first.token)

        expect(yield* store.getPng(second.token)).toEqual(Option.some(png))
        expect(yield* store.getPng(ArtifactStore.newToken())).toEqual(Option.none())
        expect(yield* store.getPng("../../service-secret")).toEqual(Option.none())

        // `file` says the same.
        const named = yield* ArtifactStore.fromConfig(dataDir).pipe(withEnv({ TROUPE_ARTIFACTS: "file" }))
        expect(yield* named.getPng(first.token)).toEqual(Option.some(png))
      })
  )

  it.effect("s3://bucket/prefix: S3, with the TTL from TROUPE_ARTIFACTS_URL_TTL_S", () =>
    Effect.gen(function* () {
      const { client, stub } = mocked()
      stub.on(PutObjectCommand).resolves({})
      const store = yield* ArtifactStore.fromConfig("/nonexistent", { s3Client: client }).pipe(
        withEnv({ TROUPE_ARTIFACTS: `s3://${bucket}/shots/prod/`, TROUPE_ARTIFACTS_URL_TTL_S: "600" })
      )
      const { token, url } = yield* store.putPng(png)
      expect(stub).toHaveReceivedCommandWith(PutObjectCommand, {
        Bucket: bucket,
        Key: `shots/prod/${token}.png`,
        ContentType: "image/png"
      })
      expect(new URL(url).searchParams.get("X-Amz-Expires")).toBe("600")
      expect(Fs.existsSync("/nonexistent")).toBe(false)
    })
  )

  it.effect("s3 without a client of the caller's: the store makes its own S3Client for that bucket", () =>
    Effect.gen(function* () {
      // Every S3Client's requests are answered here, the one fromConfig makes included.
      const stub = mockClient(S3Client)
      stubs.push(stub)
      const token = ArtifactStore.newToken()
      stub.on(GetObjectCommand, { Bucket: bucket, Key: `p/${token}.png` }).resolves({ Body: body(png) })
      const store = yield* ArtifactStore.fromConfig("/nonexistent").pipe(
        withEnv({ TROUPE_ARTIFACTS: `s3://${bucket}/p`, AWS_REGION: region })
      )
      expect(yield* store.getPng(token)).toEqual(Option.some(png))
      expect(stub).toHaveReceivedCommandWith(GetObjectCommand, { Bucket: bucket, Key: `p/${token}.png` })
    })
  )

  it.effect(
    "the region: TROUPE_ARTIFACTS_REGION, else AWS_REGION, else the SDK's; the TTL a day by default",
    () =>
      Effect.gen(function* () {
        expect(
          yield* ArtifactStore.S3Config.pipe(
            withEnv({ TROUPE_ARTIFACTS_REGION: "us-east-2", AWS_REGION: region })
          )
        ).toEqual({ region: Option.some("us-east-2"), expiresInSeconds: 86_400 })
        expect(yield* ArtifactStore.S3Config.pipe(withEnv({ AWS_REGION: region }))).toEqual({
          region: Option.some(region),
          expiresInSeconds: 86_400
        })
        expect(yield* ArtifactStore.S3Config.pipe(withEnv({}))).toEqual({
          region: Option.none(),
          expiresInSeconds: 86_400
        })
        expect(
          yield* ArtifactStore.LocationConfig.pipe(withEnv({ TROUPE_ARTIFACTS: "s3://my.bucket-1" }))
        ).toEqual({
          _tag: "S3",
          bucket: "my.bucket-1",
          prefix: ""
        })
      })
  )

  it.effect("a bad TROUPE_ARTIFACTS is a config error that names the variable and the accepted forms", () =>
    Effect.gen(function* () {
      for (const value of [
        "s3://",
        "s3:///prefix",
        "s3://Bad_Bucket/x",
        "gs://bucket/prefix",
        "filesystem",
        "/var/troupe"
      ]) {
        const error = yield* Effect.flip(
          ArtifactStore.fromConfig("/tmp").pipe(withEnv({ TROUPE_ARTIFACTS: value }))
        )
        expect(ConfigError.isConfigError(error) && error._op).toBe("InvalidData")
        const text = String(error)
        expect(text).toContain("TROUPE_ARTIFACTS")
        expect(text).toContain('"s3://<bucket>/<prefix>"')
        expect(text).toContain(JSON.stringify(value))
      }
    })
  )

  it.effect("a TTL past a presigned URL's 7 days is refused, for S3 only", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        ArtifactStore.fromConfig("/tmp").pipe(
          withEnv({ TROUPE_ARTIFACTS: `s3://${bucket}/p`, TROUPE_ARTIFACTS_URL_TTL_S: "604801" })
        )
      )
      expect(String(error)).toContain("TROUPE_ARTIFACTS_URL_TTL_S must be between 1 and 604800")
      // The filesystem store has no URL to expire: the variable is not read.
      const dataDir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-artifacts-"))
      try {
        const store = yield* ArtifactStore.fromConfig(dataDir).pipe(
          withEnv({ TROUPE_ARTIFACTS_URL_TTL_S: "604801" })
        )
        expect((yield* store.putPng(png)).url).toMatch(/^\/artifacts\//)
      } finally {
        Fs.rmSync(dataDir, { recursive: true, force: true })
      }
    })
  )
})

// --- internal ---

/**
 * The SigV4 signature of a presigned S3 GET, computed from the URL itself (every query
 * parameter but the signature, the `host` header, an unsigned payload): what S3 checks.
 */
const sigV4QuerySignature = (u: URL, secret: string): string => {
  const params = [...u.searchParams.entries()].filter(([k]) => k !== "X-Amz-Signature")
  const enc = (s: string) =>
    encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`)
  const query = params
    .map(([k, v]) => [enc(k), enc(v)] as const)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`)
    .join("&")
  const signedHeaders = u.searchParams.get("X-Amz-SignedHeaders")
  const canonical = ["GET", u.pathname, query, `host:${u.host}`, "", signedHeaders, "UNSIGNED-PAYLOAD"].join(
    "\n"
  )
  const amzDate = u.searchParams.get("X-Amz-Date")!
  const scope = u.searchParams.get("X-Amz-Credential")!.split("/").slice(1).join("/")
  const toSign = ["AWS4-HMAC-SHA256", amzDate, scope, sha256(canonical)].join("\n")
  const [date, reg, service, term] = scope.split("/") as [string, string, string, string]
  let key: Buffer = Buffer.from(`AWS4${secret}`)
  for (const part of [date, reg, service, term]) key = hmac(key, part)
  return hmac(key, toSign).toString("hex")
}

const sha256 = (s: string) => Crypto.createHash("sha256").update(s).digest("hex")
const hmac = (key: Buffer, s: string) => Crypto.createHmac("sha256", key).update(s).digest()
