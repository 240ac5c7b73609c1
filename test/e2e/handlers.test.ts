/**
 * A handler module outside `src/` (test/fixtures/handlers/my-handlers.ts, importing only
 * `troupe/worker`) run the two ways a worker author can: `troupe start --handlers <module>`
 * as a child process, and a script of its own that starts a worker node through
 * `troupe/worker` (as a Layer, and with `runWorker`). Jobs go in through a gateway with the
 * typed client (`troupe/client`) and come back with the module's result.
 */
import * as Path from "node:path"
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted, Stream } from "effect"
import { Client, type EventRecord } from "troupe/client"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import { secret, startEdge } from "../fixtures/Edge.ts"
import { key } from "../fixtures/Jobs.ts"
import * as Processes from "../fixtures/Processes.ts"

const fixtures = "test/fixtures/handlers"

/** Submit a job aimed at one worker and follow it to its end; the job as read afterwards, and its event types. */
const runJob = (client: Client.TroupeClient, workerId: string, job_type: string, payload: unknown) =>
  Effect.scoped(
    Effect.gen(function* () {
      const task = `task-${key()}`
      const sub = yield* client.subscription({ valet_task_id: task })
      const submitted = yield* client.submit({
        valet_task_id: task,
        job_type,
        payload,
        target_worker_id: workerId,
        worker_affinity: "strict"
      })
      const events = yield* sub.events.pipe(
        Stream.takeUntil(
          (e: EventRecord) => e.event_type === "job_completed" || e.event_type === "job_failed"
        ),
        Stream.runCollect,
        Effect.timeoutFail({
          duration: "60 seconds",
          onTimeout: () => new Error(`job ${submitted.id} (${job_type}) did not end`)
        })
      )
      const job = yield* client.get(submitted.id)
      return { job, events: [...events].map((e) => e.event_type) }
    })
  )

describe("handler modules outside src/", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "troupe start --handlers <module> runs the module's job types beside the built-in ones",
      () =>
        Effect.gen(function* () {
          const urls = yield* Database.DatabaseUrls
          const dir = yield* Processes.tempDir("troupe-e2e-handlers-")
          const nodeId = `e2e-handlers-${process.pid}`
          const workerId = `worker-${nodeId}`
          const env = Processes.cleanEnv({
            DATABASE_URL: Redacted.value(urls.url),
            TROUPE_DATA_DIR: dir,
            TROUPE_NODE_ID: nodeId,
            TROUPE_HTTP_HOST: "127.0.0.1",
            GH_SERVICE_SECRET: secret
          })
          // A path relative to the current directory (the project root).
          const proc = yield* Processes.start(
            process.execPath,
            ["bin/troupe.js", "start", "--handlers", `${fixtures}/my-handlers.ts`],
            { env }
          )
          yield* proc.waitFor("is up", { within: "90 seconds" })
          expect(proc.stdout()).toContain("job types noop, sleep, echo, ask_human, recipe, greet")
          const port = /ws:\/\/127\.0\.0\.1:(\d+)\/v1\/ws/.exec(proc.stdout())?.[1]
          expect(port).toBeDefined()

          const client = yield* Client.make({ url: `ws://127.0.0.1:${port}/v1/ws`, secret })
          const greet = yield* runJob(client, workerId, "greet", { name: "Ada" })
          expect(greet.job).toMatchObject({
            status: "completed",
            worker_id: workerId,
            result: { greeting: "hello, Ada", worker_id: workerId }
          })
          expect(greet.events).toEqual(["job_started", "step_started", "step_completed", "job_completed"])
          // The built-in handlers are still there.
          const echo = yield* runJob(client, workerId, "echo", { said: "hi" })
          expect(echo.job).toMatchObject({ status: "completed", result: { said: "hi" } })

          proc.signalGroup("SIGINT")
          expect(yield* proc.exited("30 seconds")).toEqual({ code: 0, signal: null })
          expect(proc.stderr()).toBe("")
        }),
      180_000
    )

    it.scoped(
      "a script of its own runs a worker node with the module's handlers, as a Layer and with runWorker",
      () =>
        Effect.gen(function* () {
          const urls = yield* Database.DatabaseUrls
          const sql = yield* SqlClient.SqlClient
          const edge = yield* startEdge("gw-handlers")
          const script = (way: "layer" | "promise") =>
            Processes.start(process.execPath, ["--import", "tsx", Path.join(fixtures, `worker-${way}.ts`)], {
              env: Processes.cleanEnv({
                DATABASE_URL: Redacted.value(urls.url),
                TROUPE_NODE_ID: `node-${way}`,
                GH_WORKER_ID: `worker-${way}`
              })
            })
          const [byLayer, byPromise] = yield* Effect.all([script("layer"), script("promise")])
          yield* Effect.all(
            [
              byLayer.waitFor("troupe worker worker-layer is up on node node-layer", {
                within: "90 seconds"
              }),
              byPromise.waitFor("ready worker-promise on node-promise: noop, sleep, echo, ask_human, recipe, greet", {
                within: "90 seconds"
              })
            ],
            { concurrency: 2 }
          )

          const client = yield* Client.make({ url: edge.url, secret })
          for (const way of ["layer", "promise"] as const) {
            const { job, events } = yield* runJob(client, `worker-${way}`, "greet", { name: way })
            expect(job).toMatchObject({
              status: "completed",
              worker_id: `worker-${way}`,
              result: { greeting: `hello, ${way}`, worker_id: `worker-${way}` }
            })
            expect(events).toEqual(["job_started", "step_started", "step_completed", "job_completed"])
          }

          // SIGTERM stops both gracefully: each node leaves as stopped, not dead.
          process.kill(byLayer.pid, "SIGTERM")
          process.kill(byPromise.pid, "SIGTERM")
          expect(yield* byLayer.exited("30 seconds")).toEqual({ code: 0, signal: null })
          expect(yield* byPromise.exited("30 seconds")).toEqual({ code: null, signal: "SIGTERM" })
          const nodes = yield* sql<{ id: string; status: string }>`
            SELECT id, status FROM nodes WHERE id IN ('node-layer', 'node-promise') ORDER BY id`
          expect(nodes).toEqual([
            { id: "node-layer", status: "stopped" },
            { id: "node-promise", status: "stopped" }
          ])
        }),
      180_000
    )

    it.effect(
      "troupe start --handlers names the module and what it expected when it exports no handlers",
      () =>
        Effect.gen(function* () {
          const env = Processes.cleanEnv({ TROUPE_NODE_ID: `e2e-bad-handlers-${process.pid}` })
          const help = yield* Processes.troupe(["start", "--help"], env)
          expect(Processes.stripAnsi(help.stdout)).toContain("--handlers")

          const module = `${fixtures}/not-handlers.ts`
          const bad = yield* Processes.troupe(["start", "--handlers", module], env)
          expect(bad.code).toBe(1)
          expect(bad.stderr.trim()).toBe(
            `troupe: --handlers ${module}: expected a named export \`handlers\` (or a default export) made with ` +
              'JobHandler.handlers({ <job type>: <Effect> }) from "troupe/worker", but it exports version'
          )
          // Refused before any database was started.
          expect(bad.stdout).toBe("")
        })
    )
  })
})
