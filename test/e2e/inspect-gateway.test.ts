/**
 * `troupe inspect watch | submit | cancel` through a gateway, as processes: a `troupe start`
 * node (gateway + worker) on this file's database, and the inspector run as a separate
 * process that speaks the WebSocket protocol with the typed client. Also its errors (wrong
 * secret from the environment or from the secret file, no gateway at the url) and a watch
 * that outlives a restart of its gateway.
 */
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import { describe, expect, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as Database from "../../src/runtime/db/Database.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"

const secret = "inspect-gateway-secret-7d1e"
const bin = Path.join(Processes.root, "bin/troupe.js")

/** `troupe start` (gateway + worker) on this file's database; its socket url from the `edge` line. */
const gatewayProcess = (nodeId: string, workerId: string, env: Record<string, string> = {}) =>
  Effect.gen(function* () {
    const urls = yield* Database.DatabaseUrls
    const proc = yield* Processes.start(process.execPath, [bin, "start"], {
      env: Processes.cleanEnv({
        DATABASE_URL: Redacted.value(urls.url),
        TROUPE_NODE_ID: nodeId,
        TROUPE_HEARTBEAT_MS: "1000",
        GH_WORKER_ID: workerId,
        MAX_CONCURRENT_JOBS: "2",
        GH_SERVICE_SECRET: secret,
        ...env
      })
    })
    const url = yield* proc.waitFor(/ws:\/\/127\.0\.0\.1:\d+\/v1\/ws/, { within: "90 seconds" })
    return { proc, url }
  })

/** The environment of an inspector run against `url` with the gateway's secret. */
const cliEnv = (url: string, extra: Record<string, string> = {}) =>
  Processes.cleanEnv({ TROUPE_GATEWAY_URL: url, GH_SERVICE_SECRET: secret, ...extra })

/** Run `troupe inspect <args>` to its end. */
const inspect = (args: ReadonlyArray<string>, env: NodeJS.ProcessEnv) =>
  Processes.run(process.execPath, [bin, "inspect", ...args], { env, within: "90 seconds" })

/** Start `troupe inspect <args>` for the scope (a watch, or a submit that waits). */
const inspectProcess = (args: ReadonlyArray<string>, env: NodeJS.ProcessEnv) =>
  Processes.start(process.execPath, [bin, "inspect", ...args], { env })

/** A port nothing listens on (bound, then released). */
const freePort = Effect.async<number>((resume) => {
  const server = Net.createServer()
  server.listen(0, "127.0.0.1", () => {
    const port = (server.address() as Net.AddressInfo).port
    server.close(() => resume(Effect.succeed(port)))
  })
})

/** The JSON lines a `watch --json` printed. */
const jsonLines = (stdout: string): Array<Record<string, any>> =>
  stdout
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l))

describe("troupe inspect through a gateway", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped(
      "submit --wait, watch (live and --job), cancel, resume, drain, and the errors a user meets",
      () =>
        Effect.gen(function* () {
          const { url } = yield* gatewayProcess("inspect-gw", "w-inspect")
          const env = cliEnv(url)

          // A live watch of everything, as JSON lines; it is subscribed once it says so.
          const all = yield* inspectProcess(["watch", "--json"], env)
          yield* all.waitFor("watching every event", { stream: "stderr", within: "90 seconds" })

          // submit --wait: the job's events, then its result; exit 0.
          const echo = yield* inspect(["submit", "echo", "--payload", '{"text":"hello"}', "--wait"], env)
          expect(echo.code, echo.stderr).toBe(0)
          const echoId = /submitted job (\S+)/.exec(echo.stdout)![1]!
          expect(echo.stdout).toContain(
            `job ${echoId} completed on worker w-inspect (1/3 attempt(s)): result {"text":"hello"}`
          )
          expect(echo.stdout.indexOf("job_started")).toBeGreaterThan(0)
          expect(echo.stdout.indexOf("job_completed")).toBeGreaterThan(echo.stdout.indexOf("job_started"))
          expect(echo.stdout + echo.stderr).not.toContain(secret)

          // The live watch saw the same job, as JSON with its worker.
          yield* all.waitFor(new RegExp(`"job_id":"${echoId}"[^\\n]*"event_type":"job_completed"`))
          const seen = jsonLines(all.stdout()).filter((e) => e.job_id === echoId)
          expect(seen.map((e) => e.event_type)).toEqual(["job_started", "job_completed"])
          expect(seen.every((e) => e.worker_id === "w-inspect")).toBe(true)

          // The secret may come from the file `npm start` writes in the data directory.
          const dataDir = yield* Processes.tempDir("troupe-inspect-gw-")
          Fs.writeFileSync(Path.join(dataDir, "service-secret"), `${secret}\n`)
          const fromFile = Processes.cleanEnv({ TROUPE_GATEWAY_URL: url, TROUPE_DATA_DIR: dataDir })
          const badDir = yield* Processes.tempDir("troupe-inspect-gw-bad-")
          Fs.writeFileSync(Path.join(badDir, "service-secret"), "not-the-secret-from-a-file\n")
          const closed = `ws://127.0.0.1:${yield* freePort}/v1/ws`

          const [watchJob, waiting, asking, wrongEnv, wrongFile, unreachable] = yield* Effect.all(
            [
              // watch --job of a job that has ended: its whole history, from job_started.
              Effect.gen(function* () {
                const p = yield* inspectProcess(["watch", "--job", echoId], fromFile)
                yield* p.waitFor("job_completed", { within: "90 seconds" })
                p.signalGroup("SIGINT")
                return { ...(yield* p.exited("30 seconds")), stdout: p.stdout() }
              }),
              // A submit that waits for a long job, which the test then cancels.
              inspectProcess(["submit", "sleep", "--payload", '{"ms":600000}', "--wait"], env),
              // And one that waits for a job that needs a human.
              inspectProcess(["submit", "ask_human", "--payload", '{"message":"solve it"}', "--wait"], env),
              inspect(["cancel", echoId], cliEnv(url, { GH_SERVICE_SECRET: "not-the-secret" })),
              inspect(
                ["cancel", echoId],
                Processes.cleanEnv({ TROUPE_GATEWAY_URL: url, TROUPE_DATA_DIR: badDir })
              ),
              inspect(["submit", "noop"], cliEnv(closed))
            ],
            { concurrency: "unbounded" }
          )

          expect(watchJob.code).toBe(0)
          const lines = watchJob.stdout.split("\n")
          const started = lines.findIndex((l) => l.includes("job_started"))
          const completed = lines.findIndex((l) => l.includes("job_completed"))
          expect(started).toBeGreaterThanOrEqual(0)
          expect(completed).toBeGreaterThan(started)
          expect(lines[completed]).toMatch(
            new RegExp(`#\\d+\\s+job_completed\\s+job ${echoId}\\s+worker w-inspect`)
          )

          // cancel of the running job prints `cancelled` with the worker that ran it…
          yield* waiting.waitFor("job_started", { within: "90 seconds" })
          const sleepId = /submitted job (\S+)/.exec(waiting.stdout())![1]!
          const cancel = yield* inspect(["cancel", sleepId], env)
          expect(cancel.code, cancel.stderr).toBe(0)
          expect(cancel.stdout.trim()).toBe(`job ${sleepId} cancelled (worker w-inspect, node inspect-gw)`)
          // …and the submit that waited for it ends with exit 1.
          const ended = yield* waiting.exited("60 seconds")
          expect(ended.code).toBe(1)
          expect(waiting.stdout()).toContain("job_cancelled")
          expect(waiting.stdout()).toContain(`job ${sleepId} cancelled on worker w-inspect`)
          expect(waiting.stderr()).toContain(`job ${sleepId} did not complete: it ended cancelled`)

          // A wrong secret: UNAUTHORIZED, naming where the secret came from but never its value.
          expect(wrongEnv.code).toBe(1)
          expect(wrongEnv.stderr).toContain("UNAUTHORIZED")
          expect(wrongEnv.stderr).toContain("the environment (GH_SERVICE_SECRET)")
          expect(wrongEnv.stdout + wrongEnv.stderr).not.toContain("not-the-secret")
          expect(wrongFile.code).toBe(1)
          expect(wrongFile.stderr).toContain("UNAUTHORIZED")
          expect(wrongFile.stderr).toContain(`the file ${Path.join(badDir, "service-secret")}`)
          expect(wrongFile.stdout + wrongFile.stderr).not.toContain("not-the-secret-from-a-file")

          // No gateway at the url: one line naming it and how to start one.
          expect(unreachable.code).toBe(1)
          expect(unreachable.stderr.trim().split("\n")).toHaveLength(1)
          expect(unreachable.stderr).toContain(`cannot reach the gateway at ${closed}`)
          expect(unreachable.stderr).toContain("npm start")

          // resume answers the job that waits for a human; its waiting submit then exits 0.
          yield* asking.waitFor("interaction_needed", { within: "90 seconds" })
          const askId = /submitted job (\S+)/.exec(asking.stdout())![1]!
          const resume = yield* inspect(["resume", askId, "--by", "ops", "--data", '{"ok":1}'], env)
          expect(resume.code, resume.stderr).toBe(0)
          expect(resume.stdout.trim()).toBe(
            `job ${askId} resumed by ops: running (worker w-inspect, node inspect-gw)`
          )
          expect((yield* asking.exited("60 seconds")).code).toBe(0)
          expect(asking.stdout()).toContain(
            `job ${askId} completed on worker w-inspect (1/3 attempt(s)): result {"resolved_by":"ops","resolution_data":{"ok":1}}`
          )

          // drain: the worker stops claiming, which a strict submit to it then reports.
          const drain = yield* inspect(["drain", "w-inspect", "--json"], env)
          expect(drain.code, drain.stderr).toBe(0)
          expect(JSON.parse(drain.stdout)).toMatchObject({ worker_id: "w-inspect", status: "draining" })
          const refused = yield* inspect(
            ["submit", "noop", "--target", "w-inspect", "--affinity", "strict"],
            env
          )
          expect(refused.code).toBe(1)
          expect(refused.stderr).toMatch(/^troupe: WORKER_UNAVAILABLE: .*w-inspect/)
        }),
      300_000
    )

    it.scoped(
      "watch survives a restart of its gateway: it says so and resumes without a gap or a duplicate",
      () =>
        Effect.gen(function* () {
          const port = String(yield* freePort)
          const first = yield* gatewayProcess("inspect-gw-a", "w-before", { TROUPE_HTTP_PORT: port })
          const env = cliEnv(first.url)
          const watch = yield* inspectProcess(["watch", "--all", "--json"], env)
          yield* watch.waitFor("watching every event", { stream: "stderr", within: "90 seconds" })

          first.proc.signalGroup("SIGTERM")
          expect((yield* first.proc.exited("60 seconds")).code).toBe(0)
          yield* watch.waitFor("lost the connection to the gateway", { stream: "stderr" })

          yield* gatewayProcess("inspect-gw-b", "w-after", { TROUPE_HTTP_PORT: port })
          yield* watch.waitFor("reconnected to the gateway", { stream: "stderr", within: "60 seconds" })
          const job = yield* inspect(["submit", "noop", "--target", "w-after", "--wait"], env)
          expect(job.code, job.stderr).toBe(0)
          const jobId = /submitted job (\S+)/.exec(job.stdout)![1]!
          yield* watch.waitFor(new RegExp(`"job_id":"${jobId}"[^\\n]*"event_type":"job_completed"`))

          const events = jsonLines(watch.stdout())
          // Nothing is lost around the restart: the old worker's stop and the new one's registration.
          expect(
            events.some((e) => e.worker_id === "w-before" && e.event_type === "worker_deregistered")
          ).toBe(true)
          expect(events.some((e) => e.worker_id === "w-after" && e.event_type === "worker_registered")).toBe(
            true
          )
          expect(events.filter((e) => e.job_id === jobId).map((e) => e.event_type)).toEqual([
            "job_started",
            "job_completed"
          ])
          const ids = events.map((e) => e.event_id)
          expect(new Set(ids).size).toBe(ids.length)
          watch.signalGroup("SIGINT")
          expect((yield* watch.exited("30 seconds")).code).toBe(0)
        }),
      300_000
    )
  })
})
