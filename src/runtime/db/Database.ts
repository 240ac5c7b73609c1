/**
 * The database a node talks to: a server named by `DATABASE_URL`, or by default an embedded
 * Postgres under `<TROUPE_DATA_DIR>/pg` (default `.troupe/pg`). `DATABASE_DIRECT_URL`, when
 * set, is the direct session used for LISTEN and advisory locks (needed when `DATABASE_URL`
 * is a transaction pooler). Migrations are applied when the layer is built.
 */
import { PgClient } from "@effect/sql-pg"
import type { SqlClient } from "@effect/sql"
import { Config, Context, Effect, Layer, Option, Redacted } from "effect"
import * as Path from "node:path"
import * as EmbeddedPostgres from "./EmbeddedPostgres.ts"
import * as Migrations from "./Migrations.ts"
import { PersistenceError } from "../../protocol/Errors.ts"

/** Where the database is: the pooled URL for queries and the direct one for LISTEN and locks. */
export class DatabaseUrls extends Context.Tag("troupe/runtime/DatabaseUrls")<
  DatabaseUrls,
  {
    readonly url: Redacted.Redacted<string>
    readonly directUrl: Redacted.Redacted<string>
    /** Set when the server is the embedded one. */
    readonly embedded: Option.Option<EmbeddedPostgres.EmbeddedPostgres>
  }
>() {}

/** The urls from `DATABASE_URL` / `DATABASE_DIRECT_URL`, or an embedded server. */
export const layerUrls: Layer.Layer<
  DatabaseUrls,
  EmbeddedPostgres.EmbeddedPostgresError | import("effect/ConfigError").ConfigError
> = Layer.scoped(
  DatabaseUrls,
  Effect.gen(function* () {
    const url = yield* Config.option(Config.redacted("DATABASE_URL"))
    const direct = yield* Config.option(Config.redacted("DATABASE_DIRECT_URL"))
    if (Option.isSome(url)) {
      return { url: url.value, directUrl: Option.getOrElse(direct, () => url.value), embedded: Option.none() }
    }
    const dataDir = yield* Config.string("TROUPE_DATA_DIR").pipe(Config.withDefault(".troupe"))
    const server = yield* EmbeddedPostgres.start({ dataDir: Path.join(dataDir, "pg") })
    const embeddedUrl = Redacted.make(server.url)
    return { url: embeddedUrl, directUrl: embeddedUrl, embedded: Option.some(server) }
  })
)

/** A fixed set of urls (tests, benchmarks). */
export const layerUrlsFixed = (url: string, directUrl?: string): Layer.Layer<DatabaseUrls> =>
  Layer.succeed(DatabaseUrls, {
    url: Redacted.make(url),
    directUrl: Redacted.make(directUrl ?? url),
    embedded: Option.none()
  })

/** The `@effect/sql-pg` client on the pooled url, with migrations applied. */
export const layerClient = (options?: {
  readonly maxConnections?: number
  readonly applicationName?: string
}) =>
  Layer.unwrapEffect(
    Effect.map(DatabaseUrls, (urls) =>
      Layer.tap(
        PgClient.layer({
          url: urls.url,
          maxConnections: options?.maxConnections ?? 16,
          applicationName: options?.applicationName ?? "troupe",
          connectTimeout: "5 seconds",
          transformJson: false
        }),
        (ctx) =>
          Migrations.run.pipe(
            Effect.provide(ctx),
            Effect.mapError((e) => new PersistenceError({ reason: `migrations failed: ${describe(e)}` }))
          )
      )
    )
  )

/** Everything a node needs from the database: urls (from the environment) and a migrated client. */
export const layer = layerClient().pipe(Layer.provideMerge(layerUrls))

/** A short, secret-free description of a database error for users. */
export const describe = (error: unknown): string => {
  const cause = (error as { cause?: unknown })?.cause
  const inner = cause instanceof Error ? cause.message : undefined
  const own = error instanceof Error ? error.message : String(error)
  return inner && inner !== own ? `${own}: ${inner}` : own
}

export type { SqlClient }
