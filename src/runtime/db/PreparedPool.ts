/**
 * A node's pool for its hot statements, run as named (prepared) statements, and `runHot`,
 * which runs a statement there when the pool exists and on the `SqlClient` otherwise.
 */
import { SqlError, type Statement } from "@effect/sql"
import { Duration, Effect, Redacted, type Scope } from "effect"
import pg from "pg"

/** Statements run as named (prepared) statements on a pool of their own. */
export interface PreparedPool {
  /**
   * Run a statement under a name: parsed and planned once per connection, not on every call.
   * One name must always carry the same statement text.
   */
  readonly execute: <A extends object>(
    name: string,
    statement: Statement.Statement<A>
  ) => Effect.Effect<ReadonlyArray<A>, SqlError.SqlError>
}

/**
 * A small `pg` pool for a node's hot statements, run as named statements: `@effect/sql-pg`
 * sends every statement unnamed, so Postgres parses and plans it on every call (measured:
 * the mailbox insert 0.61 → 0.27 ms, the claim 0.32 → 0.18 ms when prepared). Open for the
 * lifetime of the scope; a connection that breaks is dropped and the next statement opens
 * another (and prepares again). Each statement is traced as `sql.execute`, as `@effect/sql` does.
 */
export const make = (
  url: Redacted.Redacted<string>,
  options: { readonly applicationName: string; readonly maxConnections?: number }
): Effect.Effect<PreparedPool, never, Scope.Scope> =>
  Effect.gen(function* () {
    const pool = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const p = new pg.Pool({
          connectionString: Redacted.value(url),
          application_name: options.applicationName,
          max: options.maxConnections ?? 4,
          // Kept open: a new connection costs a connect and a prepare on the latency path.
          idleTimeoutMillis: 0,
          connectionTimeoutMillis: 5_000,
          keepAlive: true
        })
        // An idle connection that breaks (server restart, terminated backend) is dropped by the pool.
        p.on("error", () => undefined)
        return p
      }),
      (p) =>
        Effect.promise(() => p.end().catch(() => undefined)).pipe(Effect.timeoutOption(Duration.seconds(1)))
    )
    const run = (name: string, text: string, values: ReadonlyArray<unknown>) =>
      Effect.async<ReadonlyArray<any>, SqlError.SqlError>((resume) => {
        pool.query(
          { name, text, values: values as Array<unknown> },
          (err: Error | undefined, result: pg.QueryResult) => {
            if (err)
              resume(
                Effect.fail(new SqlError.SqlError({ cause: err, message: "Failed to execute statement" }))
              )
            else resume(Effect.succeed(result.rows))
          }
        )
      })
    return {
      execute: (name, statement) =>
        Effect.useSpan("sql.execute", { kind: "client", captureStackTrace: false }, (span) => {
          const [text, values] = statement.compile(true)
          span.attribute("db.operation.name", "executePrepared")
          span.attribute("db.query.text", text)
          return run(name, text, values)
        })
    } satisfies PreparedPool
  })

/**
 * Run a statement as a named statement on `prepared` when there is one, else as an unnamed
 * statement on the `SqlClient` (rows as Postgres returns them, no transforms either way).
 */
export const runHot =
  (prepared: PreparedPool | undefined) =>
  <A extends object>(
    name: string,
    statement: Statement.Statement<A>
  ): Effect.Effect<ReadonlyArray<A>, SqlError.SqlError> =>
    prepared === undefined ? statement.withoutTransform : prepared.execute(name, statement)
