/**
 * The typed client (`troupe/client`) against a real gateway in this process, over real
 * sockets and a real Postgres. Connection trouble is made by a loopback TCP proxy between
 * the client and the gateway that the test can cut, hold down, or stall.
 */
import { SqlClient } from "@effect/sql"
import { describe, expect, layer } from "@effect/vitest"
import { type Duration, Effect, Fiber, Schedule, type Scope, Stream } from "effect"
import * as Net from "node:net"
// Through the package name, as an application imports it (package.json "exports", resolved by self-reference).
import { Client, connect, type EventRecord, TroupeClientError } from "troupe/client"
import * as ClientSource from "../../src/client/index.ts"
import * as Db from "../fixtures/Db.ts"
import * as Processes from "../fixtures/Processes.ts"
import { secret, startEdge } from "../fixtures/Edge.ts"
import { eventually, key, startedOf, startWorker } from "../fixtures/Jobs.ts"

/** A loopback TCP proxy to `port` that a test can cut (drop every connection), hold down (refuse new ones) or stall (hold what the server sends). */
interface Proxy {
  readonly url: string
  /** TCP connections accepted so far (refused ones included). */
  readonly accepted: () => number
  readonly cut: () => void
  readonly down: () => void
  readonly up: () => void
  /** Hold what the server sends until `flow`. */
  readonly stall: () => void
  readonly flow: () => void
}

const tcpProxy = (port: number): Effect.Effect<Proxy, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.async<Proxy & { close: () => void }>((resume) => {
      const pairs = new Set<{
        readonly client: Net.Socket
        readonly upstream: Net.Socket
        readonly held: Array<Buffer>
      }>()
      let accepted = 0
      let refusing = false
      let stalled = false
      const server = Net.createServer((client) => {
        accepted++
        if (refusing) return client.destroy()
        const upstream = Net.connect(port, "127.0.0.1")
        const pair = { client, upstream, held: [] as Array<Buffer> }
        pairs.add(pair)
        client.on("data", (d) => upstream.write(d))
        upstream.on("data", (d) => {
          if (stalled) pair.held.push(d)
          else client.write(d)
        })
        const end = () => {
          pairs.delete(pair)
          client.destroy()
          upstream.destroy()
        }
        for (const s of [client, upstream]) {
          s.on("close", end)
          s.on("error", end)
        }
      })
      const cut = () => {
        stalled = false
        for (const p of [...pairs]) {
          p.client.destroy()
          p.upstream.destroy()
        }
      }
      server.listen(0, "127.0.0.1", () =>
        resume(
          Effect.succeed({
            url: `ws://127.0.0.1:${(server.address() as Net.AddressInfo).port}/v1/ws`,
            accepted: () => accepted,
            cut,
            down: () => {
              refusing = true
              cut()
            },
            up: () => {
              refusing = false
            },
            stall: () => {
              stalled = true
            },
            flow: () => {
              stalled = false
              for (const p of pairs) for (const d of p.held.splice(0)) p.client.write(d)
            },
            close: () => {
              cut()
              server.close()
            }
          })
        )
      )
    }),
    (p) => Effect.sync(() => p.close())
  )

/** Collect a stream's elements in the background (scoped). */
const collect = (events: Stream.Stream<EventRecord, TroupeClientError>) =>
  Effect.gen(function* () {
    const received: Array<EventRecord> = []
    yield* Stream.runForEach(events, (e) => Effect.sync(() => received.push(e))).pipe(Effect.forkScoped)
    return received
  })

const until = <A>(check: () => A | undefined, timeout: Duration.DurationInput = "15 seconds") =>
  eventually(Effect.sync(check), timeout)

describe("typed client", () => {
  layer(Db.layer, { excludeTestServices: true })((it) => {
    it.scoped("submits, reads, cancels and watches a job; errors carry the gateway's codes", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-c1")
        yield* startWorker("c1")
        const client = yield* Client.make({ url: `http://127.0.0.1:${edge.gateway.port}`, secret })
        const task = `task-${key()}`
        const received = yield* collect(client.subscribe({ valet_task_id: task }))
        // The stream subscribes when it starts: wait for the gateway to hold it before submitting.
        yield* eventually(Effect.sync(() => (edge.events.stats().subscriptions === 1 ? true : undefined)))

        const k = key()
        const job = yield* client.submit({ valet_task_id: task, job_type: "ctl", payload: { key: k } })
        // Queued, or already handed to the idle worker by the submit itself.
        expect(["queued", "running"]).toContain(job.status)
        expect(job).toMatchObject({
          valet_task_id: task,
          job_type: "ctl",
          worker_affinity: "any"
        })
        yield* startedOf(k)
        expect(yield* client.get(job.id)).toMatchObject({ id: job.id, status: "running", worker_id: "w-c1" })

        const state = yield* client.cancel(job.id, "user pressed stop")
        expect(state).toMatchObject({ job_id: job.id, status: "cancelled", worker_id: "w-c1" })
        yield* until(() => (received.some((e) => e.event_type === "job_cancelled") ? true : undefined))
        expect(received.map((e) => [e.job_id, e.event_type])).toEqual([
          [job.id, "job_started"],
          [job.id, "job_cancelled"]
        ])
        const history = yield* client.events(job.id)
        expect(history.map((e) => e.event_id)).toEqual(received.map((e) => e.event_id))
        expect(yield* client.events(job.id, history[0]!.event_id)).toEqual([history[1]])

        const again = yield* client.cancel(job.id).pipe(Effect.flip)
        expect(again).toBeInstanceOf(TroupeClientError)
        expect(again.code).toBe("CONFLICT")
        expect((yield* client.get(key()).pipe(Effect.flip)).code).toBe("NOT_FOUND")
        const bad = yield* client.submit({ job_type: "no spaces allowed" }).pipe(Effect.flip)
        expect(bad.code).toBe("INVALID_FRAME")
        expect(bad.message).not.toBe("")
        const workers = yield* client.workers()
        expect(workers.map((w) => w.worker_id)).toContain("w-c1")
        const unknownSince = yield* client
          .subscription({ all: true }, { sinceEventId: "999999999" })
          .pipe(Effect.flip)
        expect(unknownSince.code).toBe("NOT_FOUND")
        const drained = yield* client.drain("w-c1", "deploy")
        expect(drained).toMatchObject({ worker_id: "w-c1", status: "draining" })
      })
    )

    it.scoped("a job subscription sees job_started … job_completed in order", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-c2")
        const client = yield* Client.make({ url: edge.url, secret })
        const k = key()
        // No worker yet: the job waits, so the subscription is in place before its first event.
        const job = yield* client.submit({ job_type: "report", payload: { key: k } })
        const sub = yield* client.subscription({ job_id: job.id })
        expect(sub.replayed).toBe(0)
        const received = yield* collect(sub.events)
        yield* startWorker("c2")
        yield* until(() => (received.some((e) => e.event_type === "job_completed") ? true : undefined))
        const stored = yield* client.events(job.id)
        expect(stored.at(0)?.event_type).toBe("job_started")
        expect(stored.at(-1)?.event_type).toBe("job_completed")
        expect(stored.length).toBeGreaterThan(4)
        expect(received).toEqual(stored)
        expect((yield* client.get(job.id)).result).toEqual({ submitted: true })
      })
    )

    it.scoped("across dropped connections every event arrives exactly once and in order", () =>
      Effect.gen(function* () {
        const sql = yield* SqlClient.SqlClient
        const edge = yield* startEdge("gw-c3")
        yield* startWorker("c3", { maxConcurrent: 4 })
        const proxy = yield* tcpProxy(edge.gateway.port)
        const client = yield* Client.make({ url: proxy.url, secret, reconnect: Schedule.spaced("20 millis") })
        const task = `task-${key()}`
        const sub = yield* client.subscription({ valet_task_id: task })
        const received = yield* collect(sub.events)
        const completed = () => received.filter((e) => e.event_type === "job_completed").length
        const submit = (n: number) =>
          Effect.forEach(Array.from({ length: n }), () =>
            client.submit({ valet_task_id: task, job_type: "report", payload: {} })
          )

        // Live.
        yield* submit(2)
        yield* until(() => (completed() === 2 ? true : undefined))
        // Cut while events are flowing.
        const before = received.length
        yield* submit(6)
        yield* until(() => (received.length > before ? true : undefined))
        proxy.cut()
        // The jobs may all have finished before the cut landed: wait for the reconnect as well.
        yield* until(() => (completed() === 8 && client.connections() === 2 ? true : undefined))
        // Down for a while: the jobs run and finish while the client cannot connect.
        proxy.down()
        yield* Effect.forEach(Array.from({ length: 3 }), () =>
          edge.jobs.submit({ valet_task_id: task, job_type: "report" })
        )
        yield* eventually(
          Effect.map(
            sql<{ n: number }>`SELECT count(*)::int AS n FROM gh_automation_jobs
              WHERE valet_task_id = ${task} AND status = 'completed'`,
            (rows) => (rows[0]!.n === 11 ? true : undefined)
          )
        )
        expect(completed()).toBe(8)
        proxy.up()
        yield* until(() => (completed() === 11 ? true : undefined))
        // Live again on the new connection.
        yield* submit(1)
        yield* until(() => (completed() === 12 ? true : undefined))
        expect(client.connections()).toBe(3)

        const stored = yield* sql<{ event_id: string; job_id: string }>`
          SELECT e.id::text AS event_id, e.job_id::text AS job_id FROM gh_job_events e
          JOIN gh_automation_jobs j ON j.id = e.job_id WHERE j.valet_task_id = ${task} ORDER BY e.id`
        yield* until(() => (received.length >= stored.length ? true : undefined))
        const ids = received.map((e) => e.event_id)
        expect(new Set(ids).size).toBe(ids.length)
        expect([...ids].sort()).toEqual(stored.map((e) => e.event_id).sort())
        // Each job's events in the order they were written.
        for (const jobId of new Set(stored.map((e) => e.job_id))) {
          expect(received.filter((e) => e.job_id === jobId).map((e) => e.event_id)).toEqual(
            stored.filter((e) => e.job_id === jobId).map((e) => e.event_id)
          )
        }
      })
    )

    it.scoped(
      "a request in flight at a drop fails DISCONNECTED and is not sent again; one made while down waits",
      () =>
        Effect.gen(function* () {
          const sql = yield* SqlClient.SqlClient
          const edge = yield* startEdge("gw-c4")
          const proxy = yield* tcpProxy(edge.gateway.port)
          const client = yield* Client.make({
            url: proxy.url,
            secret,
            reconnect: Schedule.spaced("20 millis")
          })
          yield* client.ping()
          const task = `task-${key()}`
          const count = sql<{
            n: number
          }>`SELECT count(*)::int AS n FROM gh_automation_jobs WHERE valet_task_id = ${task}`

          // The gateway stores the job, but its reply never makes it back.
          proxy.stall()
          const inFlight = yield* client.submit({ valet_task_id: task, job_type: "noop" }).pipe(Effect.fork)
          yield* eventually(Effect.map(count, (rows) => (rows[0]!.n === 1 ? true : undefined)))
          proxy.cut()
          const lost = yield* Fiber.join(inFlight).pipe(Effect.flip)
          expect(lost.code).toBe("DISCONNECTED")
          yield* client.ping()
          expect(client.connections()).toBe(2)
          expect((yield* count)[0]!.n).toBe(1)

          // A request made while the gateway cannot be reached waits for the reconnect.
          const stored = (yield* sql<{
            id: string
          }>`SELECT id::text FROM gh_automation_jobs WHERE valet_task_id = ${task}`)[0]!
          proxy.down()
          const refused = proxy.accepted()
          yield* until(() => (proxy.accepted() >= refused + 2 ? true : undefined))
          const waiting = yield* client.get(stored.id).pipe(Effect.fork)
          yield* until(() => (proxy.accepted() >= refused + 4 ? true : undefined))
          proxy.up()
          expect(yield* Fiber.join(waiting)).toMatchObject({ id: stored.id, valet_task_id: task })
        })
    )

    it.scoped(
      "a request without a reply in time fails TIMEOUT; a later one on the same connection succeeds",
      () =>
        Effect.gen(function* () {
          const edge = yield* startEdge("gw-c5")
          const proxy = yield* tcpProxy(edge.gateway.port)
          const client = yield* Client.make({ url: proxy.url, secret, requestTimeout: "400 millis" })
          const job = yield* client.submit({ job_type: "noop" })
          proxy.stall()
          const slow = yield* client.get(job.id).pipe(Effect.flip)
          expect(slow.code).toBe("TIMEOUT")
          expect(slow.message).toContain("job.get")
          // The late reply arrives and is ignored; the connection goes on.
          proxy.flow()
          expect((yield* client.get(job.id)).id).toBe(job.id)
          expect(client.connections()).toBe(1)

          // Nothing listening at all: the request was never sent.
          const nowhere = yield* Client.make({
            url: "ws://127.0.0.1:1/v1/ws",
            secret,
            requestTimeout: "300 millis"
          })
          const unsent = yield* nowhere.get(job.id).pipe(Effect.flip)
          expect(unsent.code).toBe("DISCONNECTED")
          expect(unsent.message).toContain("was not sent")
        })
    )

    it.scoped("a wrong secret fails with UNAUTHORIZED and the client stops instead of reconnecting", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-c6")
        const proxy = yield* tcpProxy(edge.gateway.port)
        const wrong = `${secret}-wrong`
        // Every reconnection goes through the schedule: counting its steps counts the attempts.
        let retries = 0
        const client = yield* Client.make({
          url: proxy.url,
          secret: wrong,
          // Long enough that a request waiting for a reconnect would still be waiting when its
          // deadline below ends: "at once" means the client had already stopped.
          requestTimeout: "60 seconds",
          reconnect: Schedule.spaced("10 millis").pipe(
            Schedule.tapInput(() =>
              Effect.sync(() => {
                retries++
              })
            )
          )
        })
        const refused = yield* client.workers().pipe(Effect.flip)
        expect(refused.code).toBe("UNAUTHORIZED")
        expect(refused.message).not.toContain(wrong)
        // The client stopped before failing the request: it never asked its schedule for a retry.
        expect(retries).toBe(0)
        expect(proxy.accepted()).toBe(1)
        const atOnce = <A>(request: Effect.Effect<A, TroupeClientError, Scope.Scope>) =>
          request.pipe(
            Effect.flip,
            Effect.timeoutFail({
              duration: "5 seconds",
              onTimeout: () => new Error("the request waited for a connection: the client did not stop")
            }),
            Effect.scoped
          )
        expect((yield* atOnce(client.ping())).code).toBe("UNAUTHORIZED")
        expect((yield* atOnce(client.subscription({ all: true }))).code).toBe("UNAUTHORIZED")
        expect((yield* atOnce(client.submit({ job_type: "noop" }))).code).toBe("UNAUTHORIZED")
        expect(retries).toBe(0)
        expect(proxy.accepted()).toBe(1)

        // The same with an auth frame (close 4401), and an auth frame with the right secret works.
        const browser = yield* Client.make({ url: edge.url, secret: wrong, authFrame: true })
        expect((yield* browser.ping().pipe(Effect.flip)).code).toBe("UNAUTHORIZED")
        const good = yield* Client.make({ url: edge.url, secret, authFrame: true })
        const job = yield* good.submit({ job_type: "noop" })
        expect((yield* good.get(job.id)).id).toBe(job.id)
        expect(good.connections()).toBe(1)
      })
    )

    it.effect("troupe/client is this repository's client, for vitest and for node (through tsx)", () =>
      Effect.gen(function* () {
        // The same module, not a copy: errors from one are instances of the other's class.
        expect(Client).toBe(ClientSource.Client)
        expect(TroupeClientError).toBe(ClientSource.TroupeClientError)
        expect(connect).toBe(ClientSource.connect)
        // Node's own resolver: a package imports itself by its name through "exports".
        const run = yield* Processes.run(
          process.execPath,
          [
            "--import",
            "tsx",
            "--input-type=module",
            "-e",
            'const m = await import("troupe/client"); console.log(JSON.stringify(Object.keys(m).sort()))'
          ],
          { env: Processes.cleanEnv({}), cwd: Processes.root, within: "30 seconds" }
        )
        expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: "" })
        expect(JSON.parse(run.stdout)).toEqual(Object.keys(ClientSource).sort())
      })
    )

    it.scoped("the Promise facade: connect, submit, subscribe, get, close", () =>
      Effect.gen(function* () {
        const edge = yield* startEdge("gw-c7")
        yield* startWorker("c7")
        const task = `task-${key()}`
        yield* Effect.promise(async () => {
          const client = await connect({ url: edge.url, secret })
          try {
            const seen: Array<EventRecord> = []
            let finished: () => void = () => undefined
            const done = new Promise<void>((resolve) => {
              finished = resolve
            })
            const sub = await client.subscribe({ valet_task_id: task }, {}, (e) => {
              seen.push(e)
              if (e.event_type === "job_completed") finished()
            })
            expect(sub.replayed).toBe(0)
            const job = await client.submit({ valet_task_id: task, job_type: "noop" })
            await done
            expect(seen.map((e) => e.event_type)).toEqual(["job_started", "job_completed"])
            expect(await client.get(job.id)).toMatchObject({ status: "completed", result: { ok: true } })
            await sub.close()
            await Effect.runPromise(
              eventually(Effect.sync(() => (edge.events.stats().subscriptions === 0 ? true : undefined)))
            )
          } finally {
            await client.close()
          }
          const rejected = await connect({ url: edge.url, secret: "wrong" }).catch((e: unknown) => e)
          expect(rejected).toBeInstanceOf(TroupeClientError)
          expect((rejected as TroupeClientError).code).toBe("UNAUTHORIZED")
        })
        yield* eventually(Effect.sync(() => (edge.gateway.connections() === 0 ? true : undefined)))
      })
    )
  })
})
