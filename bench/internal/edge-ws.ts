/**
 * The client side of the edge benchmark: a minimal protocol-v1 WebSocket client on plain `ws`
 * (one `performance.now()` at send and at receipt, nothing in between), and the fan-out
 * measurement, which runs in a child process of its own (bench/internal/edge-fanout-child.ts)
 * or in the benchmark process (`--in-process`), and its baseline: a bare `ws` server that
 * broadcasts one frame to every socket.
 */
import * as Crypto from "node:crypto"
import pg from "pg"
import WebSocket, { WebSocketServer } from "ws"
import { type Summary, sleep, summarize } from "./stats.ts"

/** A frame as received: parsed JSON, fields read with checks. */
export type Frame = { readonly [key: string]: unknown }

const str = (f: Frame, key: string): string | undefined => {
  const v = f[key]
  return typeof v === "string" ? v : undefined
}

const isFrame = (u: unknown): u is Frame => typeof u === "object" && u !== null && !Array.isArray(u)

/** A reply with the times its request was sent and it arrived. */
export interface Timed {
  readonly reply: Frame
  readonly sentAt: number
  readonly at: number
}

/** A protocol-v1 client on one socket, authenticated with `Authorization: Bearer`. */
export class WsClient {
  private next = 0
  private readonly pending = new Map<string, (frame: Frame, at: number) => void>()
  /** Called for every `event` frame with its receipt time. */
  onEvent: ((frame: Frame, at: number) => void) | undefined = undefined
  /**
   * Sees every frame first, unparsed, with its receipt time; returning true skips the parse.
   * The fan-out clients read their events here: a thousand sockets share this process, so
   * every microsecond spent on one frame delays the receipt time of the next socket's.
   */
  onRaw: ((data: Buffer, at: number) => boolean) | undefined = undefined

  private constructor(
    readonly ws: WebSocket,
    private readonly prefix: string
  ) {
    ws.on("message", (data: Buffer) => {
      const at = performance.now()
      if (this.onRaw?.(data, at) === true) return
      const frame: unknown = JSON.parse(String(data))
      if (!isFrame(frame)) return
      const type = str(frame, "type")
      if (type === "event") this.onEvent?.(frame, at)
      else if (type === "reply" || type === "pong") {
        const id = str(frame, "id")
        const waiter = id === undefined ? undefined : this.pending.get(id)
        if (id !== undefined && waiter !== undefined) {
          this.pending.delete(id)
          waiter(frame, at)
        }
      }
    })
  }

  /** Open a socket to `url`. */
  static open(url: string, secret: string, prefix = "r"): Promise<WsClient> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, {
        headers: { authorization: `Bearer ${secret}` },
        perMessageDeflate: false
      })
      ws.once("open", () => {
        ws.off("error", reject)
        ws.on("error", () => undefined)
        resolve(new WsClient(ws, prefix))
      })
      ws.once("error", reject)
      ws.once("unexpected-response", (_req, res) =>
        reject(new Error(`upgrade refused: HTTP ${res.statusCode}`))
      )
    })
  }

  /** A fresh request id. */
  id(): string {
    return `${this.prefix}${this.next++}`
  }

  /** Send a request (`v` and `id` added unless given) and wait for its reply (or pong). */
  request(frame: Record<string, unknown>, timeoutMs = 10_000): Promise<Timed> {
    const id = typeof frame.id === "string" ? frame.id : this.id()
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id)
        reject(new Error(`no reply to ${String(frame.type)} ${id} within ${timeoutMs} ms`))
      }, timeoutMs)
      this.pending.set(id, (reply, at) => {
        clearTimeout(timer)
        resolve({ reply, sentAt, at })
      })
      const text = JSON.stringify({ v: 1, id, ...frame })
      const sentAt = performance.now()
      this.ws.send(text)
    })
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      if (this.ws.readyState === WebSocket.CLOSED) return resolve()
      this.ws.once("close", () => resolve())
      this.ws.close(1000)
      setTimeout(() => {
        this.ws.terminate()
        resolve()
      }, 2000).unref()
    })
  }
}

/** Fail with the reply's error when a request did not succeed. */
export const ok = (t: Timed, what: string): Frame => {
  if (t.reply.ok !== true) throw new Error(`${what} failed: ${JSON.stringify(t.reply.error ?? t.reply)}`)
  const result = t.reply.result
  return isFrame(result) ? result : {}
}

// --- Fan-out ---

/** What the fan-out measurement needs. */
export interface FanoutOptions {
  readonly url: string
  readonly secret: string
  /** The benchmark database (the writer inserts into `gh_job_events` there). */
  readonly dbUrl: string
  readonly subscribers: number
  /** Sockets; the subscriptions are spread evenly over them. */
  readonly connections: number
  /** Events written before the measured ones (not counted). */
  readonly warmupEvents: number
  readonly events: number
  readonly ratePerSecond: number
  /** Sockets opened at once while connecting. */
  readonly connectBatch: number
  /** A bare `ws` broadcast server (`rawBroadcastServer`) to measure the same fan-out against, if any. */
  readonly rawUrl?: string
}

/** Latencies in ms over every (subscriber, measured event) delivery, and per event. */
export interface Deliveries {
  readonly subscribers: number
  readonly connections: number
  readonly events: number
  readonly expected_deliveries: number
  readonly deliveries: number
  readonly missing: number
  readonly duplicates: number
  /** Receipt − the moment the event was out of the writer's hands (INSERT returned; trigger sent). */
  readonly latency: Summary
  /** Receipt − the moment the writer started (INSERT sent), for context. */
  readonly latency_from_send: Summary
  /** Per event: the first subscriber's latency (the path to the first socket). */
  readonly first_delivery: Summary
  /** Per event: the last subscriber's latency (the first plus the fan-out itself). */
  readonly last_delivery: Summary
  /** The writer's own step (INSERT round trip; 0 for the raw trigger). */
  readonly insert: Summary
  /** Bytes of one event frame as received. */
  readonly frame_bytes: number
  readonly connect_s: number
  readonly subscribe_s: number
  /** This (client) process's CPU while events were written and delivered, in % of one core. */
  readonly client_cpu_pct_of_core: number
  readonly write_window_s: number
}

/** The fan-out figures: through the gateway, and the bare `ws` baseline when it ran. */
export interface FanoutResult extends Deliveries {
  readonly raw: Deliveries | undefined
}

type Hooks = { readonly writing?: () => void; readonly written?: () => void }

/**
 * Open `connections` sockets, subscribe `subscribers` times to `all`, then write events into
 * `gh_job_events` at `ratePerSecond` from a plain `pg` client in this process and time each
 * delivery against the moment the writer's INSERT returned (autocommit: it has committed).
 * Then, with `rawUrl`, the same through a bare `ws` broadcast server.
 */
export const runFanout = async (
  o: FanoutOptions,
  log: (line: string) => void,
  hooks: Hooks = {}
): Promise<FanoutResult> => {
  const writer = new pg.Client({ connectionString: o.dbUrl, application_name: "bench-edge-writer" })
  await writer.connect()
  let gateway: Deliveries
  try {
    const jobId = Crypto.randomUUID()
    gateway = await measureFanout(
      o,
      log,
      hooks,
      (url) => WsClient.open(url, o.secret),
      async (clients, index) => {
        const perConnection = Math.ceil(o.subscribers / o.connections)
        let subscriber = 0
        await Promise.all(
          clients.map(async (client, c) => {
            const mine: Array<Promise<Timed>> = []
            for (let k = 0; k < perConnection && subscriber < o.subscribers; k++) {
              const id = client.id()
              index[c]!.set(id, subscriber++)
              mine.push(client.request({ id, type: "subscribe", all: true }))
            }
            for (const t of await Promise.all(mine)) ok(t, "subscribe")
          })
        )
      },
      async (seq, elapsedMs) => {
        // jsonb orders keys by length: `seq` comes first in the metadata the gateway sends.
        const metadata = JSON.stringify({
          seq,
          step: "fill_basic_info",
          index: seq % 10,
          total: 10,
          elapsed_ms: elapsedMs
        })
        const sentAt = performance.now()
        await writer.query(
          "INSERT INTO gh_job_events (job_id, event_type, message, actor, metadata) VALUES ($1, 'bench_fanout', $2, 'bench-edge-writer', $3)",
          [jobId, `Step ${(seq % 10) + 1}/10: filling the application form`, metadata]
        )
        return { sentAt, outAt: performance.now() }
      },
      o.url
    )
  } finally {
    await writer.end().catch(() => undefined)
  }
  if (o.rawUrl === undefined) return { ...gateway, raw: undefined }
  let trigger: WebSocket | undefined
  log("  baseline: the same fan-out from a bare ws server")
  const raw = await measureFanout(
    { ...o, subscribers: o.connections },
    log,
    {},
    (url) => WsClient.open(url, o.secret),
    async (clients, index) => {
      for (let c = 0; c < clients.length; c++) index[c]!.set("r0", c)
    },
    async (seq) => {
      const at = performance.now()
      trigger?.send(`{"go":${seq}}`)
      return { sentAt: at, outAt: at }
    },
    o.rawUrl,
    (clients) => {
      trigger = clients[0]?.ws
    }
  )
  return { ...gateway, raw }
}

/** A bare `ws` server that, on `{"go":n}` from any socket, sends one event-shaped frame to every socket. */
export const rawBroadcastServer = async (): Promise<{
  readonly url: string
  readonly close: () => Promise<void>
}> => {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false })
  await new Promise<void>((resolve) => wss.once("listening", () => resolve()))
  const sockets = new Set<WebSocket>()
  wss.on("connection", (ws) => {
    sockets.add(ws)
    ws.on("close", () => sockets.delete(ws))
    ws.on("message", (data: Buffer) => {
      const seq = Number(/^\{"go":(\d+)\}$/.exec(String(data))?.[1] ?? Number.NaN)
      if (!Number.isInteger(seq)) return
      const text = rawFrame(seq)
      for (const s of sockets) s.send(text)
    })
  })
  const address = wss.address()
  const port = typeof address === "object" && address !== null ? address.port : 0
  return {
    url: `ws://127.0.0.1:${port}`,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.terminate()
        wss.close(() => resolve())
      })
  }
}

/** A frame the size and shape of a gateway event frame (see `probeOf`). */
const rawFrame = (seq: number) =>
  `{"v":1,"type":"event","subscription":"r0","event_id":"${1000 + seq}","source":"job","job_id":"00000000-0000-4000-8000-000000000000","worker_id":null,"valet_task_id":null,"event_type":"bench_fanout","message":"Step ${(seq % 10) + 1}/10: filling the application form","actor":"bench-edge-writer","metadata":{"seq":${seq},"step":"fill_basic_info","index":${seq % 10},"total":10,"elapsed_ms":0},"created_at":"${new Date().toISOString()}"}`

/** Connect, subscribe, emit events at the rate, collect every delivery, close. */
const measureFanout = async (
  o: FanoutOptions,
  log: (line: string) => void,
  hooks: Hooks,
  open: (url: string) => Promise<WsClient>,
  subscribe: (clients: ReadonlyArray<WsClient>, index: ReadonlyArray<Map<string, number>>) => Promise<void>,
  emit: (seq: number, elapsedMs: number) => Promise<{ sentAt: number; outAt: number }>,
  url: string,
  ready?: (clients: ReadonlyArray<WsClient>) => void
): Promise<Deliveries> => {
  const total = o.warmupEvents + o.events
  const S = o.subscribers
  /** Receipt time by seq * S + subscriber; NaN until delivered. */
  const received = new Float64Array(total * S).fill(Number.NaN)
  let deliveries = 0
  let duplicates = 0
  let frameBytes = 0
  const expected = total * S
  let allIn: (() => void) | undefined

  // --- Connect ---
  const connectStart = performance.now()
  const clients: Array<WsClient> = []
  for (let i = 0; i < o.connections; i += o.connectBatch) {
    const batch = Math.min(o.connectBatch, o.connections - i)
    clients.push(...(await Promise.all(Array.from({ length: batch }, () => open(url)))))
  }
  const connectS = (performance.now() - connectStart) / 1000
  log(`  ${clients.length} sockets open in ${connectS.toFixed(1)} s`)
  try {
    // --- Subscribe ---
    const subscribeStart = performance.now()
    const index = clients.map(() => new Map<string, number>())
    await subscribe(clients, index)
    clients.forEach((client, c) => {
      const mine = index[c]!
      client.onRaw = (data, at) => {
        const probe = probeOf(data)
        if (probe === undefined) return false
        const sub = mine.get(probe.subscription)
        if (probe.seq >= total || sub === undefined) return true
        const slot = probe.seq * S + sub
        if (!Number.isNaN(received[slot]!)) {
          duplicates++
          return true
        }
        received[slot] = at
        if (frameBytes === 0) frameBytes = data.length
        if (++deliveries === expected) allIn?.()
        return true
      }
    })
    ready?.(clients)
    const subscribeS = (performance.now() - subscribeStart) / 1000
    log(`  ${S} subscriptions in ${subscribeS.toFixed(1)} s`)

    // --- Emit ---
    const sentAt = new Float64Array(total)
    const outAt = new Float64Array(total)
    const interval = 1000 / o.ratePerSecond
    hooks.writing?.()
    const cpu0 = process.cpuUsage()
    const writeStart = performance.now()
    for (let seq = 0; seq < total; seq++) {
      const wait = writeStart + seq * interval - performance.now()
      if (wait > 0) await sleep(wait)
      const t = await emit(seq, Math.round(performance.now() - writeStart))
      sentAt[seq] = t.sentAt
      outAt[seq] = t.outAt
    }
    const writeWindowS = (performance.now() - writeStart) / 1000
    // Everything should be in within a moment; give it 10 s before counting what is missing.
    if (deliveries < expected) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 10_000)
        allIn = () => {
          clearTimeout(timer)
          resolve()
        }
      })
    }
    const cpu = process.cpuUsage(cpu0)
    const cpuWindowS = (performance.now() - writeStart) / 1000
    hooks.written?.()
    log(
      `  ${total} events in ${writeWindowS.toFixed(1)} s; ${deliveries === expected ? "all delivered" : `${expected - deliveries} deliveries missing`} ${(cpuWindowS - writeWindowS).toFixed(2)} s later`
    )

    // --- Summaries (measured events only) ---
    const latency: Array<number> = []
    const fromSend: Array<number> = []
    const first: Array<number> = []
    const last: Array<number> = []
    let missing = 0
    for (let seq = o.warmupEvents; seq < total; seq++) {
      let lo = Number.POSITIVE_INFINITY
      let hi = Number.NEGATIVE_INFINITY
      for (let s = 0; s < S; s++) {
        const at = received[seq * S + s]!
        if (Number.isNaN(at)) {
          missing++
          continue
        }
        const l = at - outAt[seq]!
        latency.push(l)
        fromSend.push(at - sentAt[seq]!)
        if (l < lo) lo = l
        if (l > hi) hi = l
      }
      if (Number.isFinite(lo)) {
        first.push(lo)
        last.push(hi)
      }
    }
    const insert = Array.from(
      { length: o.events },
      (_, i) => outAt[o.warmupEvents + i]! - sentAt[o.warmupEvents + i]!
    )
    return {
      subscribers: S,
      connections: clients.length,
      events: o.events,
      expected_deliveries: o.events * S,
      deliveries: latency.length,
      missing,
      duplicates,
      latency: summarize(latency),
      latency_from_send: summarize(fromSend),
      first_delivery: summarize(first),
      last_delivery: summarize(last),
      insert: summarize(insert),
      frame_bytes: frameBytes,
      connect_s: connectS,
      subscribe_s: subscribeS,
      client_cpu_pct_of_core: ((cpu.user + cpu.system) / 1e6 / cpuWindowS) * 100,
      write_window_s: writeWindowS
    }
  } finally {
    const closing = performance.now()
    await Promise.all(clients.map((c) => c.close()))
    log(`  ${clients.length} sockets closed in ${((performance.now() - closing) / 1000).toFixed(1)} s`)
  }
}

// --- internal ---

const eventPrefix = Buffer.from('{"v":1,"type":"event","subscription":"')
const probeType = Buffer.from('"event_type":"bench_fanout"')
const seqKey = Buffer.from('"metadata":{"seq":')
const quote = 0x22

/**
 * The subscription and `metadata.seq` of a fan-out probe event, read from the frame's bytes
 * without parsing it (the gateway writes the prefix and the record's fields in a fixed
 * order; the writer puts `seq` first in the metadata). `undefined` for any other frame.
 */
const probeOf = (data: Buffer): { subscription: string; seq: number } | undefined => {
  if (
    data.length < eventPrefix.length ||
    data.compare(eventPrefix, 0, eventPrefix.length, 0, eventPrefix.length) !== 0
  )
    return undefined
  const end = data.indexOf(quote, eventPrefix.length)
  if (end < 0 || data.indexOf(probeType, end) < 0) return undefined
  const at = data.indexOf(seqKey, end)
  if (at < 0) return undefined
  let seq = 0
  let i = at + seqKey.length
  for (; i < data.length && data[i]! >= 0x30 && data[i]! <= 0x39; i++) seq = seq * 10 + (data[i]! - 0x30)
  if (i === at + seqKey.length) return undefined
  return { subscription: data.toString("latin1", eventPrefix.length, end), seq }
}
