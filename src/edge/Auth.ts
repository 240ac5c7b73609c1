/**
 * The edge's one secret check, used by every door (the WebSocket upgrade and auth frame,
 * the REST routes, a worker's drain route): constant-time comparison of a given secret
 * with the configured one, and where the service secret comes from when none is set.
 */
import { Effect, Option, Redacted } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import { secretFile } from "../runtime/Config.ts"

/**
 * Whether an `Authorization` header carries the secret (`Bearer <secret>`, scheme
 * case-insensitive). Constant time: the sha256 digests of both are compared with
 * `timingSafeEqual`, so neither the secret's length nor a matching prefix shows in timing.
 */
export const authorized = (header: string | undefined, secret: Redacted.Redacted<string>): boolean => {
  const match = header === undefined ? null : /^\s*bearer\s+(.+?)\s*$/i.exec(header)
  return match !== null && sameSecret(match[1]!, secret)
}

/**
 * Whether `given` is the secret (an empty secret matches nothing). Constant time: the
 * sha256 digests of both are compared with `timingSafeEqual`.
 */
export const sameSecret = (given: string, secret: Redacted.Redacted<string>): boolean => {
  const expected = Redacted.value(secret)
  return expected.length > 0 && Crypto.timingSafeEqual(digest(given), digest(expected))
}

/**
 * The service secret: `GH_SERVICE_SECRET`, or else one generated once and kept in
 * `secretFile(dataDir)` (mode 600), so a laptop needs no set-up. Never printed.
 */
export const resolveSecret = (
  fromEnv: Option.Option<Redacted.Redacted<string>>,
  dataDir: string
): Effect.Effect<{ readonly secret: Redacted.Redacted<string>; readonly source: string }, Error> =>
  Option.match(fromEnv, {
    onSome: (secret) => Effect.succeed({ secret, source: "GH_SERVICE_SECRET" }),
    onNone: () =>
      Effect.try({
        try: () => {
          const file = secretFile(dataDir)
          if (!Fs.existsSync(file)) {
            Fs.mkdirSync(dataDir, { recursive: true })
            Fs.writeFileSync(file, `${Crypto.randomBytes(32).toString("base64url")}\n`, {
              mode: 0o600,
              flag: "wx"
            })
          }
          return { secret: Redacted.make(Fs.readFileSync(file, "utf8").trim()), source: file }
        },
        catch: (e) => new Error(`cannot read or create the service secret file in ${dataDir}: ${String(e)}`)
      })
  })

// --- internal ---

/** The sha256 of a string: both sides of a comparison have the same length whatever was sent. */
const digest = (s: string) => Crypto.createHash("sha256").update(s, "utf8").digest()
