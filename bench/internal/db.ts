/**
 * The database of a benchmark run: a fresh database `troupe_bench_<pid>` on the server named
 * by `DATABASE_URL`, or on an embedded Postgres (dev profile) in a temporary directory. The
 * database is dropped, and the embedded server stopped and its directory removed, on close.
 */

import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import type { SqlClient } from "@effect/sql"
import type { PgClient } from "@effect/sql-pg"
import { Effect, Exit, Layer, Scope } from "effect"
import pg from "pg"
import * as Database from "../../src/runtime/db/Database.ts"
import * as EmbeddedPostgres from "../../src/runtime/db/EmbeddedPostgres.ts"

/** A benchmark database. */
export interface BenchDatabase {
  /** The url of the fresh database. */
  readonly url: string
  readonly name: string
  /** Human description of the server (no secrets). */
  readonly server: string
  readonly embedded: boolean
  /** The postmaster's pid when the server is the embedded one (to read its CPU time). */
  readonly serverPid: number | undefined
  /** Drop the database, stop the embedded server; idempotent. */
  readonly close: () => Promise<void>
}

/** The url with another database name. */
export const withDatabase = (url: string, database: string): string => {
  const u = new URL(url)
  u.pathname = `/${database}`
  return u.toString()
}

/** Open the benchmark database (see the module comment). */
export const open = async (log: (line: string) => void): Promise<BenchDatabase> => {
  const name = `troupe_bench_${process.pid}`
  const scope = Effect.runSync(Scope.make())
  let adminUrl = process.env.DATABASE_URL
  let server: string
  let tmpDir: string | undefined
  let serverPid: number | undefined
  let created = false
  let closed = false

  const close = async () => {
    if (closed) return
    closed = true
    process.off("SIGINT", onSignal)
    process.off("SIGTERM", onSignal)
    if (created && adminUrl) {
      const admin = new pg.Client({ connectionString: adminUrl })
      try {
        await admin.connect()
        await admin.query(`DROP DATABASE IF EXISTS ${admin.escapeIdentifier(name)} WITH (FORCE)`)
      } catch (e) {
        log(`warning: could not drop database ${name}: ${(e as Error).message}`)
      } finally {
        await admin.end().catch(() => undefined)
      }
    }
    await Effect.runPromise(Scope.close(scope, Exit.void))
    if (tmpDir) Fs.rmSync(tmpDir, { recursive: true, force: true })
  }
  const onSignal = () => {
    log("interrupted: cleaning up")
    void close().finally(() => process.exit(130))
  }
  process.once("SIGINT", onSignal)
  process.once("SIGTERM", onSignal)

  try {
    if (adminUrl) {
      const u = new URL(adminUrl)
      server = `DATABASE_URL (${u.hostname}:${u.port || "5432"})`
    } else {
      tmpDir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "troupe-bench-"))
      // The server may run as the `postgres` user (when we are root): it must reach its directory.
      Fs.chmodSync(tmpDir, 0o755)
      log(`starting an embedded Postgres (dev profile) in ${tmpDir}`)
      const pgServer = await Effect.runPromise(
        EmbeddedPostgres.start({ dataDir: Path.join(tmpDir, "pg"), profile: "dev" }).pipe(Scope.extend(scope))
      )
      adminUrl = pgServer.url
      serverPid = pgServer.pid
      server = `embedded, dev profile (synchronous_commit=off), port ${pgServer.port}`
    }
    const admin = new pg.Client({ connectionString: adminUrl })
    await admin.connect()
    try {
      await admin.query(`DROP DATABASE IF EXISTS ${admin.escapeIdentifier(name)} WITH (FORCE)`)
      await admin.query(`CREATE DATABASE ${admin.escapeIdentifier(name)}`)
      created = true
    } finally {
      await admin.end()
    }
    return {
      url: withDatabase(adminUrl, name),
      name,
      server,
      embedded: tmpDir !== undefined,
      serverPid,
      close
    }
  } catch (e) {
    await close()
    throw e
  }
}

/** A migrated `@effect/sql-pg` client (its own pool) with fixed urls: what one node process would have. */
export const clientLayer = (
  url: string,
  options?: { readonly applicationName?: string; readonly maxConnections?: number }
): Layer.Layer<Database.DatabaseUrls | SqlClient.SqlClient | PgClient.PgClient, unknown> =>
  Database.layerClient(options).pipe(Layer.provideMerge(Database.layerUrlsFixed(url)))

/** Run one query on a short-lived plain `pg` client. */
export const query = async <R extends Record<string, unknown>>(
  url: string,
  text: string,
  values?: ReadonlyArray<unknown>
): Promise<Array<R>> => {
  const c = new pg.Client({ connectionString: url })
  await c.connect()
  try {
    return (await c.query(text, values as Array<unknown>)).rows as Array<R>
  } finally {
    await c.end()
  }
}

/** The server's version (`server_version`) and its settings that matter for write latency. */
export const serverInfo = async (url: string) => {
  const [row] = await query<{
    version: string
    full: string
    sync: string
    fsync: string
    shared_buffers: string
  }>(
    url,
    `SELECT current_setting('server_version') AS version, version() AS full,
            current_setting('synchronous_commit') AS sync, current_setting('fsync') AS fsync,
            current_setting('shared_buffers') AS shared_buffers`
  )
  return row!
}

/** The `database` block of a benchmark's JSON: where it ran and the settings that matter. */
export const describeDatabase = (db: BenchDatabase, server: Awaited<ReturnType<typeof serverInfo>>) => ({
  server: db.server,
  embedded: db.embedded,
  version_full: server.full,
  synchronous_commit: server.sync,
  fsync: server.fsync,
  shared_buffers: server.shared_buffers
})
