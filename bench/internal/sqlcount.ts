/**
 * Count the SQL statements a node runs, by kind, without touching the runtime: `@effect/sql`
 * opens a `sql.execute` span per statement and sets its text as the `db.query.text`
 * attribute, so a tracer that wraps the current one sees every statement. A node started
 * under `Effect.withTracer(counter.tracer)` passes the tracer on to every fiber it forks.
 */
import { Effect, type Tracer } from "effect"

/** Statement kinds of the routing path (by their text). */
const classify = (sql: string): string => {
  if (/INSERT INTO actor_mailbox/.test(sql)) return "insert"
  if (/UPDATE actor_mailbox m SET claim/.test(sql)) return "claim"
  if (/DELETE FROM actor_mailbox WHERE id = ANY/.test(sql)) return "ack"
  if (/SELECT actor_id, kind, node_id, epoch/.test(sql)) return "registry_lookup"
  if (/UPDATE nodes SET last_heartbeat/.test(sql)) return "heartbeat"
  return "other"
}

export interface StatementCounter {
  /** Wrap the current tracer; provide the result with `Effect.withTracer`. */
  readonly tracer: Effect.Effect<Tracer.Tracer>
  readonly snapshot: () => Record<string, number>
}

export const make = (): StatementCounter => {
  const counts: Record<string, number> = {}
  const tracer = Effect.map(
    Effect.tracer,
    (native): Tracer.Tracer => ({
      ...native,
      span: (name, parent, context, links, startTime, kind, options) => {
        const span = native.span(name, parent, context, links, startTime, kind, options)
        if (name !== "sql.execute") return span
        const attribute = span.attribute.bind(span)
        return Object.assign(span, {
          attribute: (key: string, value: unknown) => {
            if (key === "db.query.text") {
              const k = classify(String(value))
              counts[k] = (counts[k] ?? 0) + 1
            }
            attribute(key, value)
          }
        })
      },
      context: native.context
    })
  )
  return { tracer, snapshot: () => ({ ...counts }) }
}

/** What was counted between two snapshots. */
export const diff = (
  after: Record<string, number>,
  before: Record<string, number>
): Record<string, number> => {
  const out: Record<string, number> = {}
  for (const [k, v] of Object.entries(after)) if (v - (before[k] ?? 0) > 0) out[k] = v - (before[k] ?? 0)
  return out
}
