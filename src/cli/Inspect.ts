/**
 * `troupe inspect`: look inside a running system through its database. Readable tables by
 * default, `--json` for scripts.
 */
import { Args, Command, Options } from "@effect/cli"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Console, Data, Duration, Effect, Layer, Option, Redacted, Schema } from "effect"
import * as Crypto from "node:crypto"
import pg from "pg"
import { ActorId } from "../protocol/Ids.ts"
import { DatabaseUrls, describe } from "../runtime/Database.ts"
import * as EmbeddedPostgres from "../runtime/EmbeddedPostgres.ts"
import * as MailboxStorage from "../runtime/MailboxStorage.ts"
import * as Node from "../runtime/Node.ts"
import { aliveSql } from "../runtime/NodeMembership.ts"
import { ago, table } from "./internal/table.ts"

/** The inspector cannot do what it was asked; the message says why and what to do. */
export class InspectError extends Data.TaggedError("InspectError")<{ readonly message: string }> {}

// --- Database ---

/** The url to inspect: `DATABASE_URL`, or the embedded server of a troupe running from here. */
const resolveUrl = Effect.suspend(() => {
  const fromEnv = process.env.DATABASE_URL
  if (fromEnv) return Effect.succeed({ url: fromEnv, directUrl: process.env.DATABASE_DIRECT_URL ?? fromEnv })
  const dataDir = process.env.TROUPE_DATA_DIR ?? ".troupe"
  const embedded = EmbeddedPostgres.runningUrl(`${dataDir}/pg`)
  return embedded
    ? Effect.succeed({ url: embedded, directUrl: embedded })
    : Effect.fail(
        new InspectError({
          message: `no database to inspect: DATABASE_URL is not set and no troupe is running from ${dataDir}/ (start one with \`npm start\`, or set DATABASE_URL)`
        })
      )
})

/** Where a url points, without its password. */
const whereIs = (url: string) => {
  try {
    const u = new URL(url)
    return `${u.hostname}:${u.port || 5432}${u.pathname}`
  } catch {
    return "the configured database"
  }
}

/** Check the database answers (with a clear error if not), then provide a client on it. */
const DatabaseLive = Layer.unwrapEffect(
  Effect.gen(function* () {
    const { url, directUrl } = yield* resolveUrl
    yield* Effect.tryPromise({
      try: async () => {
        const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 })
        await c.connect()
        try {
          const r = await c.query("SELECT to_regclass('actor_registry') IS NOT NULL AS ok")
          if (!r.rows[0]?.ok)
            throw new Error("troupe's tables are missing: start a node once to apply its migrations")
        } finally {
          await c.end().catch(() => undefined)
        }
      },
      catch: (cause) =>
        new InspectError({ message: `cannot reach the database at ${whereIs(url)}: ${describe(cause)}` })
    })
    return PgClient.layer({
      url: Redacted.make(url),
      maxConnections: 4,
      applicationName: "troupe-inspect"
    }).pipe(
      Layer.merge(
        Layer.succeed(DatabaseUrls, {
          url: Redacted.make(url),
          directUrl: Redacted.make(directUrl),
          embedded: Option.none()
        })
      )
    )
  })
)

const json = Options.boolean("json").pipe(Options.withDescription("print JSON instead of a table"))

const print = (asJson: boolean, rows: unknown, render: () => string) =>
  Console.log(asJson ? JSON.stringify(rows, null, 2) : render())

// --- nodes ---

interface NodeRow {
  readonly id: string
  readonly role: string
  readonly address: string | null
  readonly pid: number | null
  readonly hostname: string | null
  readonly status: string
  readonly alive: boolean
  readonly started_at: Date
  readonly last_heartbeat: Date
  readonly pending: string
  readonly in_flight: string
  readonly actors: string
}

const nodesCommand = Command.make("nodes", { json }, ({ json }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const rows = yield* sql.unsafe<NodeRow>(`
      SELECT n.id, n.role, n.address, n.pid, n.hostname, n.status, ${aliveSql} AS alive, n.started_at, n.last_heartbeat,
        (SELECT count(*) FROM actor_mailbox m WHERE m.node_id = n.id AND m.claim IS NULL)::text AS pending,
        (SELECT count(*) FROM actor_mailbox m WHERE m.node_id = n.id AND m.claim IS NOT NULL)::text AS in_flight,
        (SELECT count(*) FROM actor_registry r WHERE r.node_id = n.id)::text AS actors
      FROM nodes n ORDER BY n.id`)
    const out = rows.map((r) => ({
      ...r,
      state: r.status === "stopped" ? "stopped" : r.alive ? "up" : "dead",
      pending: Number(r.pending),
      in_flight: Number(r.in_flight),
      actors: Number(r.actors)
    }))
    yield* print(json, out, () =>
      table(
        out.map((r) => ({ ...r, heartbeat: ago(r.last_heartbeat), started: ago(r.started_at) })),
        [
          "id",
          "state",
          "role",
          "hostname",
          "pid",
          "address",
          "actors",
          "pending",
          "in_flight",
          "heartbeat",
          "started"
        ]
      )
    )
  })
).pipe(
  Command.withDescription("list nodes: up (holds its lock), dead (lock gone) or stopped, with mailbox depth")
)

// --- actors ---

const actorsCommand = Command.make(
  "actors",
  {
    json,
    kind: Options.text("kind").pipe(Options.optional, Options.withDescription("only this kind")),
    node: Options.text("node").pipe(
      Options.optional,
      Options.withDescription("only actors placed on this node")
    ),
    status: Options.choice("status", ["active", "failed"]).pipe(Options.optional),
    limit: Options.integer("limit").pipe(
      Options.withDefault(100),
      Options.withDescription("at most this many rows")
    )
  },
  ({ json, kind, node, status, limit }) =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const rows = yield* sql<{
        actor_id: string
        kind: string
        node_id: string
        epoch: string
        status: string
        depth: string
        updated_at: Date
      }>`
        SELECT r.actor_id, r.kind, r.node_id, r.epoch::text AS epoch, r.status, r.updated_at,
          (SELECT count(*) FROM actor_mailbox m WHERE m.actor_id = r.actor_id)::text AS depth
        FROM actor_registry r
        WHERE (${Option.getOrNull(kind)}::text IS NULL OR r.kind = ${Option.getOrNull(kind)})
          AND (${Option.getOrNull(node)}::text IS NULL OR r.node_id = ${Option.getOrNull(node)})
          AND (${Option.getOrNull(status)}::text IS NULL OR r.status = ${Option.getOrNull(status)})
        ORDER BY r.actor_id LIMIT ${limit}`
      const out = rows.map((r) => ({ ...r, epoch: Number(r.epoch), depth: Number(r.depth) }))
      yield* print(json, out, () =>
        table(
          out.map((r) => ({ ...r, updated: ago(r.updated_at) })),
          ["actor_id", "kind", "node_id", "epoch", "status", "depth", "updated"]
        )
      )
    })
).pipe(Command.withDescription("list registered actors (placed, in memory or passivated)"))

// --- actor <id> ---

const actorCommand = Command.make("actor", { json, id: Args.text({ name: "actor-id" }) }, ({ json, id }) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const [reg] = yield* sql.unsafe<{
      actor_id: string
      kind: string
      node_id: string
      epoch: string
      status: string
      node_state: string | null
      created_at: Date
      updated_at: Date
    }>(
      `SELECT r.actor_id, r.kind, r.node_id, r.epoch::text AS epoch, r.status, r.created_at, r.updated_at,
        (SELECT CASE WHEN n.status = 'stopped' THEN 'stopped' WHEN ${aliveSql} THEN 'up' ELSE 'dead' END
           FROM nodes n WHERE n.id = r.node_id) AS node_state
       FROM actor_registry r WHERE r.actor_id = $1`,
      [id]
    )
    if (reg === undefined) {
      return yield* new InspectError({
        message: `no actor is registered as "${id}" (list them with \`troupe inspect actors\`)`
      })
    }
    const [depth] = yield* sql<{ pending: string; in_flight: string }>`
      SELECT count(*) FILTER (WHERE claim IS NULL)::text AS pending, count(*) FILTER (WHERE claim IS NOT NULL)::text AS in_flight
      FROM actor_mailbox WHERE actor_id = ${id}`
    const queued = yield* sql`
      SELECT id::text AS id, kind, sender, body, created_at, claim IS NOT NULL AS claimed
      FROM actor_mailbox WHERE actor_id = ${id} ORDER BY id LIMIT 10`
    const handled = yield* sql`
      SELECT id::text AS id, kind, sender, body, sent_at, handled_at
      FROM actor_message_log WHERE actor_id = ${id} ORDER BY id DESC LIMIT 10`
    const deadLetters = yield* sql`
      SELECT id::text AS id, error_tag, reason, sender, body, created_at
      FROM actor_dead_letters WHERE actor_id = ${id} ORDER BY id DESC LIMIT 5`
    const events = yield* sql`
      SELECT event_type, message, node_id, created_at FROM actor_events WHERE actor_id = ${id} ORDER BY id DESC LIMIT 10`
    const out = {
      actor_id: reg.actor_id,
      kind: reg.kind,
      node_id: reg.node_id,
      node_state: reg.node_state ?? "unknown",
      epoch: Number(reg.epoch),
      status: reg.status,
      mailbox: { pending: Number(depth?.pending ?? 0), in_flight: Number(depth?.in_flight ?? 0) },
      queued,
      last_messages: handled,
      dead_letters: deadLetters,
      events
    }
    yield* print(json, out, () =>
      [
        `${out.actor_id}  (kind ${out.kind})`,
        `  node     ${out.node_id} (${out.node_state})`,
        `  epoch    ${out.epoch}`,
        `  status   ${out.status}`,
        `  mailbox  ${out.mailbox.pending} pending, ${out.mailbox.in_flight} in flight`,
        "",
        "Queued (oldest first):",
        table(queued as any, ["id", "kind", "sender", "body", "claimed"]),
        "",
        "Last handled (newest first):",
        table(handled as any, ["id", "kind", "sender", "body", "handled_at"]),
        "",
        "Dead letters (newest first):",
        table(deadLetters as any, ["id", "error_tag", "reason", "body", "created_at"]),
        "",
        "Events (newest first):",
        table(events as any, ["event_type", "message", "node_id", "created_at"])
      ].join("\n")
    )
  })
).pipe(
  Command.withDescription(
    "one actor: node, epoch, status, mailbox depth, last messages, dead letters, events"
  )
)

// --- send <id> <json> ---

const sendCommand = Command.make(
  "send",
  {
    json,
    id: Args.text({ name: "actor-id" }),
    message: Args.text({ name: "message-json" }),
    ask: Options.boolean("ask").pipe(Options.withDescription("wait for the reply and print it")),
    timeout: Options.integer("timeout-ms").pipe(Options.withDefault(10_000))
  },
  ({ json, id, message, ask, timeout }) =>
    Effect.gen(function* () {
      if (!Schema.is(ActorId)(id)) {
        return yield* new InspectError({
          message: `"${id}" is not an actor id: expected <kind>:<key>, e.g. probe:local`
        })
      }
      const body = yield* Effect.try({
        try: () => JSON.parse(message) as unknown,
        catch: (e) => new InspectError({ message: `the message is not valid JSON: ${(e as Error).message}` })
      })
      if (ask) {
        const nodeId = `cli-${process.pid}-${Crypto.randomBytes(3).toString("hex")}`
        const sql = yield* SqlClient.SqlClient
        const reply = yield* Effect.scoped(
          Effect.gen(function* () {
            const node = yield* Node.make({ nodeId, role: "cli", messageLog: false })
            return yield* node.askRaw(id, body, { timeout: Duration.millis(timeout) })
          })
        ).pipe(
          Effect.ensuring(sql`DELETE FROM nodes WHERE id = ${nodeId}`.pipe(Effect.ignore)),
          Effect.mapError((e) => new InspectError({ message: (e as Error).message ?? String(e) }))
        )
        return yield* Console.log(JSON.stringify(reply, null, json ? 2 : undefined))
      }
      const storage = yield* MailboxStorage.make
      const messageId = Crypto.randomUUID()
      const inserted = yield* storage.insert([
        {
          messageId,
          actorId: id,
          kind: "tell",
          sender: "cli",
          replyTo: null,
          correlationId: null,
          body: JSON.stringify(body),
          nodeId: null
        }
      ])
      if (inserted.length === 0) {
        return yield* new InspectError({
          message: `no actor is registered as "${id}" (list them with \`troupe inspect actors\`)`
        })
      }
      const out = { message_id: messageId, actor_id: id, node_id: inserted[0]!.node_id }
      yield* print(json, out, () => `sent ${messageId} to ${id} on node ${out.node_id}`)
    })
).pipe(Command.withDescription("send a JSON message to an actor (with --ask, wait for its reply)"))

// --- tail ---

const tailCommand = Command.make(
  "tail",
  {
    json,
    actor: Options.text("actor").pipe(Options.optional, Options.withDescription("only this actor's traffic")),
    intervalMs: Options.integer("interval-ms").pipe(Options.withDefault(200))
  },
  ({ json, actor, intervalMs }) =>
    Effect.gen(function* () {
      const sql = yield* SqlClient.SqlClient
      const only = Option.getOrNull(actor)
      const start = yield* sql<{ m: string; l: string; d: string }>`
        SELECT COALESCE((SELECT max(id) FROM actor_mailbox), 0)::text AS m,
               COALESCE((SELECT max(id) FROM actor_message_log), 0)::text AS l,
               COALESCE((SELECT max(id) FROM actor_dead_letters), 0)::text AS d`
      let sent = start[0]!.m
      let handled = start[0]!.l
      let dead = start[0]!.d
      const seen = new Set<string>()
      if (!json) yield* Console.error(`tailing mailbox traffic${only ? ` of ${only}` : ""} (Ctrl-C to stop)`)
      const emit = (event: Record<string, unknown>) =>
        Console.log(
          json
            ? JSON.stringify(event)
            : `${String(event.at).slice(11, 23)}  ${String(event.event).padEnd(8)} ${event.actor_id ?? "(reply)"}  from ${event.sender}  ${JSON.stringify(event.body)}${event.reason ? `  ${String(event.reason).split("\n")[0]}` : ""}`
        )
      const round = Effect.gen(function* () {
        const fresh = yield* sql<{
          id: string
          message_id: string
          actor_id: string
          sender: string
          node_id: string
          kind: string
          body: unknown
          at: Date
        }>`
          SELECT id::text AS id, message_id::text AS message_id, actor_id, sender, node_id, kind, body, created_at AS at
          FROM actor_mailbox WHERE id > ${sent}::bigint AND kind <> 'reply'
            AND (${only}::text IS NULL OR actor_id = ${only}) ORDER BY id LIMIT 1000`
        const done = yield* sql<{
          id: string
          message_id: string
          actor_id: string
          sender: string
          node_id: string
          kind: string
          body: unknown
          sent_at: Date
          handled_at: Date
        }>`
          SELECT id::text AS id, message_id::text AS message_id, actor_id, sender, node_id, kind, body, sent_at, handled_at
          FROM actor_message_log WHERE id > ${handled}::bigint AND (${only}::text IS NULL OR actor_id = ${only})
          ORDER BY id LIMIT 1000`
        const letters = yield* sql<{
          id: string
          message_id: string
          actor_id: string
          sender: string
          body: unknown
          error_tag: string
          reason: string
          created_at: Date
        }>`
          SELECT id::text AS id, message_id::text AS message_id, actor_id, sender, body, error_tag, reason, created_at
          FROM actor_dead_letters WHERE id > ${dead}::bigint AND (${only}::text IS NULL OR actor_id = ${only})
          ORDER BY id LIMIT 1000`
        const message = (event: string, at: Date, r: (typeof fresh)[number] | (typeof done)[number]) =>
          emit({
            event,
            at: new Date(at).toISOString(),
            message_id: r.message_id,
            actor_id: r.actor_id,
            node_id: r.node_id,
            kind: r.kind,
            sender: r.sender,
            body: r.body
          })
        for (const r of fresh) {
          sent = r.id
          seen.add(r.message_id)
          yield* message("sent", r.at, r)
        }
        for (const r of done) {
          handled = r.id
          if (!seen.has(r.message_id)) yield* message("sent", r.sent_at, r)
          seen.delete(r.message_id)
          yield* message("handled", r.handled_at, r)
        }
        for (const r of letters) {
          dead = r.id
          yield* emit({
            event: "dead",
            at: new Date(r.created_at).toISOString(),
            message_id: r.message_id,
            actor_id: r.actor_id,
            sender: r.sender,
            body: r.body,
            error_tag: r.error_tag,
            reason: r.reason
          })
        }
        if (seen.size > 100_000) seen.clear()
      })
      // A diagnostic tail polls: it must not add a NOTIFY to every message of the hot path.
      yield* round.pipe(Effect.zipRight(Effect.sleep(Duration.millis(intervalMs))), Effect.forever)
    })
).pipe(Command.withDescription("follow mailbox traffic live: sent, handled and dead-lettered messages"))

/** `troupe inspect …` */
export const command = Command.make("inspect").pipe(
  Command.withDescription(
    "look inside a running troupe through its database (DATABASE_URL, or the embedded one started here)"
  ),
  Command.withSubcommands([nodesCommand, actorsCommand, actorCommand, sendCommand, tailCommand]),
  Command.provide(DatabaseLive)
)
