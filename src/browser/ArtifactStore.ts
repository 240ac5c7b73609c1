/**
 * Where a job's screenshots go. The default store writes them under the worker's data dir
 * (`<TROUPE_DATA_DIR>/artifacts`), each under an unguessable token (24 random bytes), and
 * the worker node's HTTP server serves them at `/artifacts/<token>`: whoever has the URL
 * (the client app, from `needs_human`) can fetch it, nobody can list or guess the others.
 * An S3 store with presigned URLs comes later (issue 11).
 */
import { Context, Effect, Option } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import * as Path from "node:path"

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
  /** The PNG of a token, if there is one. */
  readonly getPng: (token: string) => Effect.Effect<Option.Option<Uint8Array>>
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
          const token = Crypto.randomBytes(24).toString("base64url")
          await Fs.mkdir(dir, { recursive: true, mode: 0o700 })
          await Fs.writeFile(Path.join(dir, `${token}.png`), bytes, { mode: 0o600 })
          return { token, url: `${base}/artifacts/${token}` }
        },
        catch: (e) => new Error(`could not store the screenshot in ${dir}: ${String(e)}`)
      }),
    getPng: (token) =>
      tokenPattern.test(token)
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

// --- internal ---

/** A token as `putPng` makes them (nothing else reaches the filesystem). */
const tokenPattern = /^[A-Za-z0-9_-]{32}$/
