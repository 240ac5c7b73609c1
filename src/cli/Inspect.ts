/**
 * `troupe inspect`: look inside a running system through its database, or steer it through
 * a gateway with the typed client (watch, submit, cancel, resume, drain). Readable output by
 * default, `--json` for scripts.
 */
import { Args, Command, Options } from "@effect/cli"
import { SqlClient } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { Config, Console, Data, Duration, Effect, Layer, Option, Redacted, Schema, Stream } from "effect"
import * as Crypto from "node:crypto"
import pg from "pg"
import { EventId } from "../protocol/Edge.ts"
import { ActorId } from "../protocol/Ids.ts"
import type * as Client from "../client/Client.ts"
import { isTerminal, type Job, JobStatus } from "../protocol/Jobs.ts"
import { DatabaseUrls, describe } from "../runtime/db/Database.ts"
import * as EmbeddedPostgres from "../runtime/db/EmbeddedPostgres.ts"
import * as MailboxStorage from "../runtime/core/MailboxStorage.ts"
import * as Monitoring from "../runtime/jobs/Monitoring.ts"
import * as Node from "../runtime/core/Node.ts"
import { aliveSql } from "../runtime/core/NodeMembership.ts"
import * as Gateway from "./internal/gateway.ts"
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
      const body = yield* parseJson("the message", message)
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

// --- jobs ---

/** The statuses a job can be in (the CHECK of `gh_automation_jobs.status`, migration 3). */
const jobStatuses: ReadonlyArray<string> = JobStatus.literals

const jobsCommand = Command.make(
  "jobs",
  {
    json,
    status: Options.text("status").pipe(
      Options.optional,
      Options.withDescription(`only jobs in this status: ${jobStatuses.join(", ")}`)
    ),
    worker: Options.text("worker").pipe(
      Options.optional,
      Options.withDescription("only jobs of this worker_id")
    ),
    limit: Options.integer("limit").pipe(
      Options.withDefault(50),
      Options.withDescription("at most this many rows")
    )
  },
  ({ json, status, worker, limit }) =>
    Effect.gen(function* () {
      const only = Option.getOrNull(status)
      if (only !== null && !jobStatuses.includes(only)) {
        return yield* new InspectError({
          message: `--status "${only}" is not a job status: use one of ${jobStatuses.join(", ")}`
        })
      }
      if (limit < 1) return yield* new InspectError({ message: `--limit must be at least 1 (got ${limit})` })
      const sql = yield* SqlClient.SqlClient
      const rows = yield* sql<{
        id: string
        valet_task_id: string | null
        status: string
        job_type: string
        worker_affinity: string
        target_worker_id: string | null
        worker_id: string | null
        node_id: string | null
        priority: number
        attempts: number
        max_attempts: number
        created_at: Date
        started_at: Date | null
        finished_at: Date | null
      }>`
        SELECT id, valet_task_id, status, job_type, worker_affinity, target_worker_id, worker_id, node_id, priority,
          attempts, max_attempts, created_at, started_at, finished_at
        FROM gh_automation_jobs
        WHERE (${only}::text IS NULL OR status = ${only})
          AND (${Option.getOrNull(worker)}::text IS NULL OR worker_id = ${Option.getOrNull(worker)})
        ORDER BY created_at DESC, id DESC LIMIT ${limit}`
      yield* print(json, rows, () =>
        table(
          rows.map((r) => ({
            ...r,
            affinity: r.worker_affinity,
            target: r.target_worker_id,
            worker: r.worker_id,
            node: r.node_id,
            attempts: `${r.attempts}/${r.max_attempts}`,
            created: ago(r.created_at),
            started: ago(r.started_at),
            finished: ago(r.finished_at)
          })),
          [
            "id",
            "status",
            "job_type",
            "affinity",
            "target",
            "worker",
            "node",
            "attempts",
            "created",
            "started",
            "finished"
          ]
        )
      )
    })
).pipe(Command.withDescription("list jobs, newest first, with their status, worker, node and attempts"))

// --- job <id> ---

const jobCommand = Command.make("job", { json, id: Args.text({ name: "job-id" }) }, ({ json, id }) =>
  Effect.gen(function* () {
    if (!Schema.is(Schema.UUID)(id)) {
      return yield* new InspectError({
        message: `"${id}" is not a job id: expected a uuid, e.g. 0190c9d2-6f1e-4b7a-9d3c-2a5e8f1b7c44 (list them with \`troupe inspect jobs\`)`
      })
    }
    const sql = yield* SqlClient.SqlClient
    const [job] = yield* sql.unsafe<{
      id: string
      valet_task_id: string | null
      job_type: string
      status: string
      worker_affinity: string
      target_worker_id: string | null
      worker_id: string | null
      node_id: string | null
      node_alive: boolean | null
      node_state: string | null
      priority: number
      attempts: number
      max_attempts: number
      error_code: string | null
      error_message: string | null
      created_at: Date
      started_at: Date | null
      finished_at: Date | null
      payload: unknown
      result: unknown
      interaction: unknown
      cost: unknown
    }>(
      `SELECT j.*,
        (SELECT ${aliveSql} FROM nodes n WHERE n.id = j.node_id) AS node_alive,
        (SELECT CASE WHEN n.status = 'stopped' THEN 'stopped' WHEN ${aliveSql} THEN 'up' ELSE 'dead' END
           FROM nodes n WHERE n.id = j.node_id) AS node_state
       FROM gh_automation_jobs j WHERE j.id = $1::uuid`,
      [id]
    )
    if (job === undefined) {
      return yield* new InspectError({ message: `no job ${id} (list them with \`troupe inspect jobs\`)` })
    }
    const actorId = `job:${job.id}`
    const [placement] = yield* sql<{ actor_id: string; node_id: string; epoch: string; status: string }>`
      SELECT actor_id, node_id, epoch::text AS epoch, status FROM actor_registry WHERE actor_id = ${actorId}`
    const events = yield* sql`
      SELECT id::text AS id, event_type, message, actor, metadata, created_at
      FROM gh_job_events WHERE job_id = ${job.id}::uuid ORDER BY id`
    const callbacks = yield* sql`
      SELECT id::text AS id, url, status, attempts, next_attempt_at, delivered_at, failed_at, last_error, created_at,
        payload
      FROM callback_outbox WHERE job_id = ${job.id}::uuid ORDER BY id`
    const { node_alive, node_state, ...columns } = job
    const out = {
      ...columns,
      node_alive: node_alive === true,
      node_state: job.node_id === null ? null : (node_state ?? "unknown"),
      actor: placement === undefined ? null : { ...placement, epoch: Number(placement.epoch) },
      events,
      callbacks
    }
    yield* print(json, out, () =>
      [
        `${out.id}  (${out.job_type}, ${out.status})`,
        `  valet task   ${out.valet_task_id ?? "—"}`,
        `  affinity     ${out.worker_affinity}${out.target_worker_id === null ? "" : ` (target ${out.target_worker_id})`}`,
        `  worker       ${out.worker_id ?? "—"}`,
        `  node         ${out.node_id === null ? "—" : `${out.node_id} (${out.node_state})`}`,
        `  actor        ${out.actor === null ? "—" : `${out.actor.actor_id} on ${out.actor.node_id}, epoch ${out.actor.epoch} (${out.actor.status})`}`,
        `  attempts     ${out.attempts}/${out.max_attempts}`,
        `  priority     ${out.priority}`,
        `  created      ${when(out.created_at)}`,
        `  started      ${when(out.started_at)}`,
        `  finished     ${when(out.finished_at)}`,
        `  error        ${out.error_code === null && out.error_message === null ? "—" : `${out.error_code ?? "?"}: ${out.error_message ?? ""}`}`,
        `  payload      ${JSON.stringify(out.payload)}`,
        `  result       ${JSON.stringify(out.result)}`,
        `  interaction  ${JSON.stringify(out.interaction)}`,
        `  cost         ${JSON.stringify(out.cost)}`,
        "",
        "Events (oldest first):",
        table(events as any, ["event_type", "message", "actor", "metadata", "created_at"]),
        "",
        "Callbacks:",
        table(callbacks as any, [
          "id",
          "status",
          "attempts",
          "delivered_at",
          "failed_at",
          "last_error",
          "url"
        ])
      ].join("\n")
    )
  })
).pipe(
  Command.withDescription(
    "one job: state, payload, result, error, owner node (alive?), its actor, events and callbacks"
  )
)

// --- workers ---

const workersCommand = Command.make("workers", { json }, ({ json }) =>
  Effect.gen(function* () {
    const out = yield* Monitoring.workerRows
    yield* print(json, out, () =>
      table(
        out.map((r) => ({
          ...r,
          active: r.active_jobs,
          completed: r.jobs_completed,
          failed: r.jobs_failed,
          heartbeat: ago(r.last_heartbeat),
          registered: ago(r.registered_at),
          uptime: Duration.format(Duration.seconds(r.uptime_seconds))
        })),
        [
          "worker_id",
          "state",
          "status",
          "node_id",
          "active",
          "current_job_id",
          "target_worker_id",
          "ec2_instance_id",
          "ec2_ip",
          "completed",
          "failed",
          "heartbeat",
          "registered",
          "uptime"
        ]
      )
    )
  })
).pipe(
  Command.withDescription(
    "list workers: idle, busy, draining or offline (status offline or node dead), with active jobs and counters"
  )
)

// --- Through a gateway ---
// These commands speak the gateway's WebSocket protocol with the typed client, so they go
// through the edge's authentication and routing like any client app; they need no database.

const gateway = Options.text("gateway").pipe(
  Options.withDescription(
    `the gateway's socket (env TROUPE_GATEWAY_URL, else ${Gateway.defaultUrl}); the secret is GH_SERVICE_SECRET, else <TROUPE_DATA_DIR or .troupe>/service-secret`
  ),
  Options.withDefault(Gateway.defaultUrl),
  Options.withFallbackConfig(Config.string("TROUPE_GATEWAY_URL"))
)

/** Parse JSON the user typed, or say which input (`what`) is not JSON and why. */
const parseJson = (what: string, text: string) =>
  Effect.try({
    try: () => JSON.parse(text) as unknown,
    catch: (e) => new InspectError({ message: `${what} is not valid JSON: ${(e as Error).message}` })
  })

const eventId = (name: string, value: string) =>
  Schema.is(EventId)(value)
    ? Effect.succeed(value)
    : Effect.fail(
        new InspectError({
          message: `--${name} must be an event id (digits, 0 for the start), got "${value}"`
        })
      )

/** A job's line after it ended or changed. */
const jobSummary = (job: Job) => {
  const on = job.worker_id === null ? "" : ` on worker ${job.worker_id}`
  const attempts = `${job.attempts}/${job.max_attempts} attempt(s)`
  switch (job.status) {
    case "completed":
      return `job ${job.id} completed${on} (${attempts}): result ${JSON.stringify(job.result)}`
    case "failed":
    case "cancelled":
      return `job ${job.id} ${job.status}${on} (${attempts}): ${job.error_code ?? "?"}: ${job.error_message ?? ""}`
    default:
      return `job ${job.id} ${job.status}${on}`
  }
}

// --- watch ---

const watchCommand = Command.make(
  "watch",
  {
    gateway,
    json: Options.boolean("json").pipe(Options.withDescription("print one JSON object per event and line")),
    job: Options.text("job").pipe(
      Options.optional,
      Options.withDescription("only this job (from its first event, unless --since)")
    ),
    task: Options.text("task").pipe(
      Options.optional,
      Options.withDescription("only the jobs of this valet_task_id")
    ),
    worker: Options.text("worker").pipe(
      Options.optional,
      Options.withDescription("only this worker: its lifecycle events and the events of jobs it runs")
    ),
    all: Options.boolean("all").pipe(Options.withDescription("every event (the default)")),
    since: Options.text("since").pipe(
      Options.optional,
      Options.withDescription("first replay the events after this event id (0: from the start)")
    )
  },
  (o) =>
    Effect.gen(function* () {
      const chosen = [o.job, o.task, o.worker].filter(Option.isSome).length + (o.all ? 1 : 0)
      if (chosen > 1) {
        return yield* new InspectError({ message: "watch one thing: --job, --task, --worker or --all" })
      }
      const filter: Client.Filter = Option.isSome(o.job)
        ? { job_id: o.job.value }
        : Option.isSome(o.task)
          ? { valet_task_id: o.task.value }
          : Option.isSome(o.worker)
            ? { worker_id: o.worker.value }
            : { all: true }
      const what = Option.isSome(o.job)
        ? `job ${o.job.value}`
        : Option.isSome(o.task)
          ? `valet task ${o.task.value}`
          : Option.isSome(o.worker)
            ? `worker ${o.worker.value}`
            : "every event"
      // One job's history is short and its start is what one wants to see.
      const since = Option.isSome(o.since)
        ? yield* eventId("since", o.since.value)
        : Option.isSome(o.job)
          ? "0"
          : undefined
      const link = yield* Gateway.connect(o.gateway)
      const sub = yield* link.client
        .subscription(filter, since === undefined ? {} : { sinceEventId: since })
        .pipe(Effect.mapError(link.explain))
      yield* Console.error(
        `watching ${what} through ${link.url}${since === undefined ? "" : `, after event ${since} (${sub.replayed} replayed)`} (Ctrl-C to stop)`
      )
      yield* Effect.forkScoped(link.reportReconnects)
      yield* sub.events.pipe(
        Stream.mapError(link.explain),
        Stream.runForEach((e) => Console.log(o.json ? JSON.stringify(e) : Gateway.eventLine(e)))
      )
    }).pipe(Effect.scoped)
).pipe(
  Command.withDescription(
    "follow events live through a gateway until Ctrl-C (one job, a valet task, a worker or all); resumes across reconnects"
  )
)

// --- submit <job_type> ---

const submitCommand = Command.make(
  "submit",
  {
    gateway,
    json,
    jobType: Args.text({ name: "job_type" }).pipe(
      Args.withDescription("the handler to run: noop, sleep, echo, ask_human …")
    ),
    payload: Options.text("payload").pipe(
      Options.optional,
      Options.withDescription("the job's payload (JSON)")
    ),
    target: Options.text("target").pipe(
      Options.optional,
      Options.withDescription("target_worker_id: a worker id or the sandbox id it registered with")
    ),
    affinity: Options.choice("affinity", ["strict", "preferred", "any"]).pipe(
      Options.optional,
      Options.withDescription("worker_affinity (default: preferred with --target, else any)")
    ),
    task: Options.text("task").pipe(Options.optional, Options.withDescription("valet_task_id")),
    wait: Options.boolean("wait").pipe(
      Options.withDescription("follow the job's events until it ends; exit 0 only if it completed")
    )
  },
  (o) =>
    Effect.gen(function* () {
      const payload = Option.isSome(o.payload) ? yield* parseJson("--payload", o.payload.value) : undefined
      const link = yield* Gateway.connect(o.gateway)
      const { client, explain } = link
      const job = yield* client
        .submit({
          job_type: o.jobType,
          ...(payload === undefined ? {} : { payload }),
          ...(Option.isSome(o.task) ? { valet_task_id: o.task.value } : {}),
          ...(Option.isSome(o.target) ? { target_worker_id: o.target.value } : {}),
          ...(Option.isSome(o.affinity)
            ? { worker_affinity: o.affinity.value }
            : Option.isSome(o.target)
              ? { worker_affinity: "preferred" as const }
              : {})
        })
        .pipe(Effect.mapError(explain))
      if (!o.wait) {
        return yield* print(
          o.json,
          job,
          () =>
            `submitted job ${job.id} (${job.job_type}, ${job.worker_affinity}${job.target_worker_id === null ? "" : ` → ${job.target_worker_id}`}): ${job.status}`
        )
      }
      // With --json, stdout is the final job alone; the events go to stderr.
      const show = (line: string) => (o.json ? Console.error(line) : Console.log(line))
      yield* show(`submitted job ${job.id} (${job.job_type}); following its events`)
      yield* Effect.forkScoped(link.reportReconnects)
      const read = client
        .get(job.id)
        .pipe(
          Effect.retry({ times: 5, while: (e) => e.code === "DISCONNECTED" || e.code === "TIMEOUT" }),
          Effect.mapError(explain)
        )
      // The read that found the job ended is the one printed.
      let ended: Job | undefined
      yield* client.subscribe({ job_id: job.id }, { sinceEventId: "0" }).pipe(
        Stream.mapError(explain),
        Stream.runForEachWhile((e) =>
          Effect.gen(function* () {
            yield* show(Gateway.eventLine(e))
            if (!Gateway.endingEvents.has(e.event_type)) return true
            const now = yield* read
            if (!isTerminal(now.status)) return true
            ended = now
            return false
          })
        )
      )
      const final = ended ?? (yield* read)
      yield* print(o.json, final, () => jobSummary(final))
      if (final.status !== "completed") {
        return yield* new InspectError({
          message: `job ${final.id} did not complete: it ended ${final.status}`
        })
      }
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("submit a job through a gateway (with --wait, follow it until it ends)"))

// --- cancel <job_id> ---

const cancelCommand = Command.make(
  "cancel",
  {
    gateway,
    json,
    id: Args.text({ name: "job_id" }).pipe(Args.withDescription("the job's id (a uuid)")),
    reason: Options.text("reason").pipe(Options.optional, Options.withDescription("recorded with the cancel"))
  },
  (o) =>
    Effect.gen(function* () {
      const { client, explain } = yield* Gateway.connect(o.gateway)
      const state = yield* client.cancel(o.id, Option.getOrUndefined(o.reason)).pipe(Effect.mapError(explain))
      yield* print(
        o.json,
        state,
        () =>
          `job ${state.job_id} ${state.status}${state.worker_id === null ? " (it had not started)" : ` (worker ${state.worker_id}, node ${state.node_id})`}`
      )
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("cancel a job through a gateway; prints the worker that ran it"))

// --- resume <job_id> ---

const resumeCommand = Command.make(
  "resume",
  {
    gateway,
    json,
    id: Args.text({ name: "job_id" }).pipe(Args.withDescription("the job's id (a uuid)")),
    by: Options.text("by").pipe(Options.withDescription("resolved_by: who answered")),
    data: Options.text("data").pipe(Options.optional, Options.withDescription("resolution_data (JSON)"))
  },
  (o) =>
    Effect.gen(function* () {
      const data = Option.isSome(o.data) ? yield* parseJson("--data", o.data.value) : undefined
      const { client, explain } = yield* Gateway.connect(o.gateway)
      const state = yield* client
        .resume(o.id, { resolved_by: o.by, ...(data === undefined ? {} : { resolution_data: data }) })
        .pipe(Effect.mapError(explain))
      yield* print(
        o.json,
        state,
        () =>
          `job ${state.job_id} resumed by ${o.by}: ${state.status}${state.worker_id === null ? "" : ` (worker ${state.worker_id}, node ${state.node_id})`}`
      )
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("resume a needs_human job through a gateway with a human's resolution"))

// --- drain <worker_id> ---

const drainCommand = Command.make(
  "drain",
  {
    gateway,
    json,
    id: Args.text({ name: "worker_id" }).pipe(Args.withDescription("the worker's id")),
    reason: Options.text("reason").pipe(Options.optional, Options.withDescription("recorded with the drain"))
  },
  (o) =>
    Effect.gen(function* () {
      const { client, explain } = yield* Gateway.connect(o.gateway)
      const state = yield* client.drain(o.id, Option.getOrUndefined(o.reason)).pipe(Effect.mapError(explain))
      yield* print(
        o.json,
        state,
        () =>
          `worker ${state.worker_id} (node ${state.node_id}) ${state.status}: ${state.active_job_ids.length === 0 ? "no job running" : `finishing ${state.active_job_ids.join(", ")}`}`
      )
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("drain a worker through a gateway: it finishes its jobs and claims no more"))

/** `troupe inspect …` */
export const command = Command.make("inspect").pipe(
  Command.withDescription(
    "look inside a running troupe through its database (DATABASE_URL, or the embedded one started here), or steer it through a gateway (watch, submit, cancel, resume, drain)"
  ),
  // The database is opened only by the commands that read it: the gateway commands need none.
  Command.withSubcommands([
    Command.provide(nodesCommand, DatabaseLive),
    Command.provide(actorsCommand, DatabaseLive),
    Command.provide(actorCommand, DatabaseLive),
    Command.provide(sendCommand, DatabaseLive),
    Command.provide(tailCommand, DatabaseLive),
    Command.provide(jobsCommand, DatabaseLive),
    Command.provide(jobCommand, DatabaseLive),
    Command.provide(workersCommand, DatabaseLive),
    watchCommand,
    submitCommand,
    cancelCommand,
    resumeCommand,
    drainCommand
  ])
)

// --- internal ---

/** A timestamp for a detail line: `2024-05-01 12:00:00Z (3s ago)`, or `—`. */
const when = (d: unknown): string =>
  d === null || d === undefined
    ? "—"
    : `${new Date(d as Date)
        .toISOString()
        .replace("T", " ")
        .replace(/\.\d+Z$/, "Z")} (${ago(d as Date)})`
