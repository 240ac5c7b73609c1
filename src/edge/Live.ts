/**
 * The live view's doors (see `docs/BROWSER.md`, "Live view", and `docs/PROTOCOL.md`):
 *
 * - on a worker node's HTTP port, `/live/<job_id>`: the WebSocket of one page held on this
 *   node, its screencast frames out and the viewer's input in (`LiveView.ts`);
 * - on a gateway, `GET /live/<job_id>`: a self-contained page that shows it, and
 *   `/live/<job_id>/ws`: the WebSocket that page opens, proxied frame for frame to the
 *   worker node the database names for the job (`gh_automation_jobs.worker_id`, then that
 *   worker's `http_url`). Frames never go through Postgres.
 *
 * Both authenticate with the service secret: an `auth` frame first (browsers cannot set
 * headers on a WebSocket; the page reads the secret from its URL fragment, which is never
 * sent in a request, or asks for it), or `Authorization: Bearer` on the upgrade. Compared in
 * constant time, never logged. Bad input is answered with an `error` frame; the socket stays.
 */
import type { SqlClient } from "@effect/sql"
import {
  Deferred,
  Duration,
  Effect,
  Either,
  FiberSet,
  Option,
  Queue,
  Redacted,
  Schema,
  type Scope
} from "effect"
import type * as Http from "node:http"
import type { Duplex } from "node:stream"
import WebSocket, { WebSocketServer } from "ws"
import type * as LiveView from "../browser/LiveView.ts"
import { isJobId } from "../protocol/Jobs.ts"
import * as Live from "../protocol/Live.ts"
import type * as WorkerStorage from "../runtime/jobs/WorkerStorage.ts"
import * as Auth from "./Auth.ts"

/** A door that takes the live view's WebSocket upgrades. */
export interface Door {
  /** Take the upgrade if its path is this door's; false leaves it to the server's other routes. */
  readonly upgrade: (req: Http.IncomingMessage, socket: Duplex, head: Buffer) => boolean
  /** Viewers connected now. */
  readonly connections: () => number
  /** Close every viewer's socket with 1001 (the server is stopping; its close waits for them). */
  readonly closeAll: () => void
}

/** How a worker node serves its pages. */
export interface WorkerOptions {
  readonly workerId: string
  /** The node's live view; none: the worker runs no browser. */
  readonly live: LiveView.LiveView | undefined
  /** The service secret; none or empty: the live view is refused (`UNAUTHORIZED`). */
  readonly secret: Redacted.Redacted<string> | undefined
  /** Bytes unsent to a viewer past which its next frames are skipped (default 1 MiB). */
  readonly maxBuffered?: number
}

/** The worker node's door: `/live/<job_id>`, until the scope closes. */
export const workerDoor = (options: WorkerOptions): Effect.Effect<Door, never, Scope.Scope> =>
  makeDoor(/^\/live\/([^/]+)$/, options.secret, (peer, jobId) => serveOnWorker(peer, jobId, options))

/** How a gateway reaches the workers. */
export interface GatewayOptions {
  /** The service secret, checked on the viewer's `auth` frame and shown to the worker. */
  readonly secret: Redacted.Redacted<string>
  readonly workers: WorkerStorage.WorkerStorage
  /** How long opening the worker's socket may take (default 5 s). */
  readonly connectTimeout?: Duration.DurationInput
}

/** The gateway's door: `/live/<job_id>/ws`, proxied to the job's worker node, until the scope closes. */
export const gatewayDoor = (
  options: GatewayOptions
): Effect.Effect<Door, never, SqlClient.SqlClient | Scope.Scope> =>
  makeDoor(/^\/live\/([^/]+)\/ws$/, options.secret, (peer, jobId) => proxy(peer, jobId, options))

/** Whether a request asks for the live view's page (`GET /live/<job_id>`); answers it if so. */
export const servePage = (req: Http.IncomingMessage, res: Http.ServerResponse): boolean => {
  const path = (req.url ?? "/").split("?")[0]!
  const match = /^\/live\/([^/]+)$/.exec(path)
  if (match === null) return false
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405, { allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" })
    res.end(`${path} answers GET: it is the live view's page\n`)
    return true
  }
  const jobId = decodeURIComponent(match[1]!)
  if (!/^[A-Za-z0-9-]{1,100}$/.test(jobId)) {
    res.writeHead(404, { "content-type": "text/plain; charset=utf-8" })
    res.end("no such job: a job id is a uuid, as in /live/7f3c2a9e-5b1d-4e8a-9c6f-2d4b8e1a3f70\n")
    return true
  }
  res.writeHead(200, {
    "content-type": "text/html; charset=utf-8",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "content-security-policy":
      "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; " +
      "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
  })
  res.end(req.method === "HEAD" ? undefined : page(jobId))
  return true
}

// --- internal ---

/** One side of a live socket: its messages in order, its close, and sends that never throw. */
interface Peer {
  readonly ws: WebSocket
  /** The next message (`undefined` for a binary one); fails once the socket has closed. */
  readonly next: Effect.Effect<string | undefined, Closed>
  readonly closed: Deferred.Deferred<Closed>
  readonly send: (frame: Live.ServerFrame) => void
  /** An `error` frame, then the close. */
  readonly fail: (code: Live.ErrorCode, message: string, closeCode: number) => void
}

interface Closed {
  readonly code: number
  readonly reason: string
}

const makeDoor = <R>(
  route: RegExp,
  secret: Redacted.Redacted<string> | undefined,
  serve: (peer: Peer, jobId: string) => Effect.Effect<void, never, R>
): Effect.Effect<Door, never, R | Scope.Scope> =>
  Effect.gen(function* () {
    const run = yield* FiberSet.makeRuntime<R>()
    const open = new Set<WebSocket>()
    const wss = new WebSocketServer({
      noServer: true,
      maxPayload: Live.maxClientFrameBytes,
      perMessageDeflate: false
    })
    const closeAll = () => {
      for (const ws of open) ws.close(Live.CloseCode.goingAway, "server shutting down")
      // A peer that does not answer the close is cut, so the server's close does not wait on it.
      if (open.size > 0)
        setTimeout(() => {
          for (const ws of open) ws.terminate()
        }, 2000).unref()
    }
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        closeAll()
        wss.close()
      })
    )
    const upgrade = (req: Http.IncomingMessage, socket: Duplex, head: Buffer): boolean => {
      const match = route.exec((req.url ?? "/").split("?")[0]!)
      if (match === null) return false
      const header = req.headers.authorization
      // A wrong secret on the upgrade is refused outright; no header means "auth frame follows".
      if (header !== undefined && (secret === undefined || !Auth.authorized(header, secret))) {
        socket.end("HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        return true
      }
      wss.handleUpgrade(req, socket, head, (ws) => {
        open.add(ws)
        ws.once("close", () => open.delete(ws))
        const jobId = safeDecode(match[1]!)
        // The fiber starts at once: the peer's listeners are on before any message can arrive.
        run(
          Effect.flatMap(makePeer(ws), (peer) =>
            Effect.gen(function* () {
              if (header === undefined && !(yield* authenticate(peer, secret))) return
              yield* serve(peer, jobId)
            }).pipe(
              Effect.catchAllCause((cause) =>
                Effect.zipRight(
                  Effect.logError("live view: a socket failed", cause),
                  Effect.sync(() => peer.fail("INTERNAL", "the live view failed; see the server's log", 1011))
                )
              )
            )
          ).pipe(
            // Whatever ended the conversation, the socket goes too (ws cuts it if the peer never answers the close).
            Effect.ensuring(
              Effect.sync(() => {
                if (ws.readyState === WebSocket.OPEN) ws.close(Live.CloseCode.normal, "done")
              })
            )
          )
        )
      })
      return true
    }
    return { upgrade, connections: () => open.size, closeAll }
  })

const makePeer = (ws: WebSocket): Effect.Effect<Peer> =>
  Effect.gen(function* () {
    const messages = yield* Queue.unbounded<string | undefined>()
    const closed = yield* Deferred.make<Closed>()
    ws.on("message", (data, isBinary) => {
      messages.unsafeOffer(isBinary ? undefined : String(data))
    })
    ws.on("close", (code, reason) => {
      Deferred.unsafeDone(closed, Effect.succeed({ code, reason: String(reason) }))
    })
    ws.on("error", () => undefined)
    const send = (frame: Live.ServerFrame) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame))
    }
    return {
      ws,
      closed,
      next: Effect.raceFirst(
        Queue.take(messages),
        Effect.flatMap(Deferred.await(closed), (c) => Effect.fail(c))
      ),
      send,
      fail: (code, message, closeCode) => {
        send(Live.error(code, message))
        if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) {
          ws.close(closeCode, closeReason(message))
        }
      }
    } satisfies Peer
  })

const decodeClient = Schema.decodeUnknownEither(Schema.parseJson(Live.ClientFrame))
const decodeAuth = Schema.decodeUnknownEither(Schema.parseJson(Live.Auth))
const authHint = `send {"v":1,"type":"auth","token":"<GH_SERVICE_SECRET>"} as the first frame`

/** Wait for the `auth` frame and check it; false (the socket closing with 4401) when it is not right. */
const authenticate = (peer: Peer, secret: Redacted.Redacted<string> | undefined): Effect.Effect<boolean> =>
  Effect.gen(function* () {
    const first = yield* peer.next.pipe(Effect.timeout(Live.authTimeoutMs), Effect.option)
    if (Option.isNone(first)) {
      if (peer.ws.readyState === WebSocket.OPEN) {
        peer.fail("UNAUTHORIZED", `no auth frame within ${Live.authTimeoutMs / 1000} s: ${authHint}`, 4401)
      }
      return false
    }
    const frame = first.value === undefined ? undefined : decodeAuth(first.value)
    if (frame === undefined || Either.isLeft(frame)) {
      peer.fail("UNAUTHORIZED", `not authenticated: ${authHint}`, Live.CloseCode.unauthorized)
      return false
    }
    if (secret === undefined || !Auth.sameSecret(frame.right.token, secret)) {
      peer.fail(
        "UNAUTHORIZED",
        secret === undefined
          ? "the live view is off here: no service secret is configured (set GH_SERVICE_SECRET)"
          : "wrong secret: send the service secret (GH_SERVICE_SECRET) in the auth frame",
        Live.CloseCode.unauthorized
      )
      return false
    }
    return true
  }).pipe(Effect.catchAll(() => Effect.succeed(false)))

/** Serve one viewer of a page held on this worker node. */
const serveOnWorker = (peer: Peer, jobId: string, options: WorkerOptions): Effect.Effect<void> =>
  Effect.scoped(
    Effect.gen(function* () {
      if (options.live === undefined) {
        return peer.fail(
          "NOT_FOUND",
          `worker ${options.workerId} runs no browser, so job ${jobId} has no page here`,
          Live.CloseCode.notFound
        )
      }
      const maxBuffered = options.maxBuffered ?? 1024 * 1024
      let seq = 0
      let ready = false
      let held: LiveView.Shot | undefined
      const sendShot = (shot: LiveView.Shot) => {
        // A viewer that reads slowly skips frames (the next one shows the page as it is now).
        if (peer.ws.bufferedAmount > maxBuffered) return
        peer.send({
          v: Live.version,
          type: "frame",
          seq: ++seq,
          format: "jpeg",
          data: shot.data,
          width: shot.width,
          height: shot.height,
          page_width: shot.pageWidth,
          page_height: shot.pageHeight,
          page_url: shot.pageUrl
        })
      }
      const ended = yield* Deferred.make<string>()
      const watching = yield* options.live
        .watch(jobId, {
          frame: (shot) => {
            if (ready) sendShot(shot)
            else held = shot
          },
          ended: (reason) => Deferred.unsafeDone(ended, Effect.succeed(reason))
        })
        .pipe(Effect.either)
      if (Either.isLeft(watching)) {
        const e = watching.left
        return peer.fail(e.code, e.message, e.code === "NOT_FOUND" ? Live.CloseCode.notFound : 1011)
      }
      const { session, input } = watching.right
      peer.send({
        v: Live.version,
        type: "ready",
        job_id: jobId,
        worker_id: options.workerId,
        page_url: session.page.url(),
        viewport: session.page.viewportSize()
      })
      ready = true
      if (held !== undefined) sendShot(held)

      const inputs = Effect.forever(
        Effect.gen(function* () {
          const message = yield* peer.next
          if (message === undefined) {
            return peer.send(Live.error("INVALID_FRAME", "send JSON text frames, not binary ones"))
          }
          const frame = decodeClient(message)
          if (Either.isLeft(frame)) {
            return peer.send(
              Live.error(
                "INVALID_FRAME",
                `not a live view frame (click, type, key or scroll): ${firstLines(frame.left.message)}`
              )
            )
          }
          if (frame.right.type === "auth") return
          const done = yield* Effect.either(input(frame.right))
          if (Either.isLeft(done)) peer.send(Live.error(done.left.code, done.left.message))
        })
      )
      const reason = yield* Effect.raceFirst(
        Deferred.await(ended),
        inputs.pipe(Effect.catchAll(() => Effect.never))
      ).pipe(Effect.raceFirst(Effect.flatMap(Deferred.await(peer.closed), () => Effect.succeed(undefined))))
      if (reason !== undefined) {
        peer.send({ v: Live.version, type: "ended", reason })
        peer.ws.close(Live.CloseCode.normal, closeReason(reason))
      }
    })
  )

/** Proxy a viewer's socket to the worker node that holds the job's page. */
const proxy = (
  peer: Peer,
  jobId: string,
  options: GatewayOptions
): Effect.Effect<void, never, SqlClient.SqlClient> =>
  Effect.gen(function* () {
    const noJob = `no job ${jobId}: check the job id`
    if (!isJobId(jobId)) return peer.fail("NOT_FOUND", noJob, Live.CloseCode.notFound)
    const found = yield* options.workers.pageOf(jobId).pipe(Effect.either)
    if (Either.isLeft(found)) {
      return peer.fail(
        "INTERNAL",
        "the gateway could not read the job (database unavailable): try again",
        1011
      )
    }
    const row = found.right
    if (row === undefined) return peer.fail("NOT_FOUND", noJob, Live.CloseCode.notFound)
    if ((row.status !== "running" && row.status !== "needs_human") || row.worker_id === null) {
      return peer.fail(
        "NOT_FOUND",
        `job ${jobId} is ${row.status}: only a running or needs_human job has a page to show`,
        Live.CloseCode.notFound
      )
    }
    const worker = row.worker_id
    if (row.http_url === null || row.worker_status === "offline") {
      return peer.fail(
        "WORKER_UNAVAILABLE",
        row.http_url === null
          ? `worker ${worker} has no HTTP address in the registry: its HTTP server is off (GH_WORKER_PORT)`
          : `worker ${worker} is offline`,
        Live.CloseCode.workerUnavailable
      )
    }
    const target = `${row.http_url.replace(/^http/, "ws")}/live/${encodeURIComponent(jobId)}`
    const upstream = yield* connect(target, options.secret).pipe(
      Effect.timeoutFail({
        duration: options.connectTimeout ?? "5 seconds",
        onTimeout: () => `no answer within ${Duration.format(options.connectTimeout ?? "5 seconds")}`
      }),
      Effect.either
    )
    if (Either.isLeft(upstream)) {
      return peer.fail(
        "WORKER_UNAVAILABLE",
        `could not reach worker ${worker} at ${row.http_url}: ${upstream.left}`,
        Live.CloseCode.workerUnavailable
      )
    }
    const up = upstream.right
    yield* Effect.addFinalizer(() => Effect.sync(() => up.terminate()))
    const upClosed = yield* Deferred.make<Closed>()
    // The worker's frames go to the viewer as they are; a viewer that reads slowly pauses
    // the worker's socket, whose own buffer then makes the worker skip frames.
    let pending = 0
    up.on("message", (data, isBinary) => {
      if (peer.ws.readyState !== WebSocket.OPEN) return
      const size = (data as Buffer).length
      pending += size
      if (pending > highWater && !up.isPaused) up.pause()
      peer.ws.send(data as Buffer, { binary: isBinary }, () => {
        pending -= size
        if (pending < highWater / 2 && up.isPaused) up.resume()
      })
    })
    up.on("close", (code, reason) =>
      Deferred.unsafeDone(upClosed, Effect.succeed({ code, reason: String(reason) }))
    )
    up.on("error", () => undefined)
    // The viewer's input, in order (also what it sent while the worker's socket was opening).
    const forward = Effect.forever(
      Effect.flatMap(peer.next, (message) =>
        Effect.sync(() => {
          if (up.readyState === WebSocket.OPEN && message !== undefined) up.send(message)
          else if (message === undefined)
            peer.send(Live.error("INVALID_FRAME", "send JSON text frames, not binary ones"))
        })
      )
    )
    const end = yield* Effect.raceFirst(
      Effect.map(Deferred.await(upClosed), (c) => ({ side: "worker" as const, ...c })),
      forward.pipe(Effect.catchAll((c) => Effect.succeed({ side: "viewer" as const, ...c })))
    )
    if (end.side === "worker") {
      if (peer.ws.readyState === WebSocket.OPEN) {
        const lost = end.code === 1006
        if (lost) peer.send(Live.error("WORKER_UNAVAILABLE", `lost the connection to worker ${worker}`))
        peer.ws.close(
          lost ? Live.CloseCode.workerUnavailable : closeCode(end.code),
          lost ? "lost the worker" : end.reason
        )
      }
    } else if (up.readyState === WebSocket.OPEN) {
      up.close(Live.CloseCode.normal, "the viewer left")
    }
  }).pipe(Effect.scoped)

/** Open the worker's socket with the service secret on the upgrade. */
const connect = (url: string, secret: Redacted.Redacted<string>): Effect.Effect<WebSocket, string> =>
  Effect.async<WebSocket, string>((resume) => {
    const ws = new WebSocket(url, {
      headers: { authorization: `Bearer ${Redacted.value(secret)}` },
      perMessageDeflate: false,
      maxPayload: 64 * 1024 * 1024
    })
    ws.once("open", () => resume(Effect.succeed(ws)))
    ws.once("unexpected-response", (_req, res) => {
      ws.terminate()
      resume(
        Effect.fail(
          res.statusCode === 401
            ? "it refused the gateway's secret (GH_SERVICE_SECRET must be the same on gateways and workers)"
            : `its HTTP server answered ${res.statusCode} to the live view's upgrade`
        )
      )
    })
    ws.once("error", (e) => resume(Effect.fail(e.message)))
    return Effect.sync(() => ws.terminate())
  })

/** Bytes the gateway holds for a viewer before it stops reading the worker. */
const highWater = 4 * 1024 * 1024

/** A close code that may be sent on (1005 and 1006 are only ever reported). */
const closeCode = (code: number): number => (code === 1005 || code === 1006 || code < 1000 ? 1000 : code)

/** A close reason fits in 123 bytes. */
const closeReason = (s: string): string => {
  let out = s
  while (Buffer.byteLength(out) > 123) out = out.slice(0, -1)
  return out
}

const firstLines = (s: string): string => s.split("\n").slice(0, 3).join(" ").slice(0, 500)

const safeDecode = (s: string): string => {
  try {
    return decodeURIComponent(s)
  } catch {
    return s
  }
}

/** The live view's page: a self-contained document (no CDN) that renders the frames and forwards input. */
const page = (jobId: string): string => `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Live view · job ${jobId}</title>
<style>
  :root { color-scheme: light dark; font: 14px system-ui, sans-serif; }
  body { margin: 0; }
  header { display: flex; gap: 1em; align-items: baseline; padding: .5em 1em; border-bottom: 1px solid #8884; flex-wrap: wrap; }
  header code { font-size: 12px; }
  #status.error { color: #c0392b; font-weight: 600; }
  #status.live { color: #1e8449; }
  #url { opacity: .7; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; max-width: 50vw; }
  main { padding: 1em; }
  #screen { display: block; max-width: 100%; height: auto; cursor: crosshair; outline: 1px solid #8886; user-select: none; }
  #screen:focus { outline: 2px solid #2e86c1; }
  #screen:not([src]) { display: none; }
  [hidden] { display: none !important; }
  form { display: flex; gap: .5em; align-items: center; }
</style>
</head>
<body data-job="${jobId}">
<header>
  <strong>troupe live view</strong>
  <code id="job">${jobId}</code>
  <span id="status">connecting…</span>
  <span id="url"></span>
</header>
<main>
  <form id="login" hidden>
    <label>Service secret <input id="secret" type="password" autocomplete="off" required></label>
    <button>Connect</button>
  </form>
  <img id="screen" alt="the job's page" tabindex="0" draggable="false">
  <p><small>Click, type, press keys and scroll on the picture: they go to the job's page. Then resume the job.</small></p>
</main>
<script>
"use strict";
(() => {
  const jobId = document.body.dataset.job;
  const screen = document.getElementById("screen");
  const statusEl = document.getElementById("status");
  const urlEl = document.getElementById("url");
  const login = document.getElementById("login");
  let frame = { width: 0, height: 0 };
  let frames = 0;
  let ws;
  let failed = false;
  const status = (text, kind) => { statusEl.textContent = text; statusEl.className = kind || ""; };
  const send = (f) => { if (ws && ws.readyState === 1) ws.send(JSON.stringify(Object.assign({ v: 1 }, f))); };
  const at = (e) => {
    const r = screen.getBoundingClientRect();
    const x = Math.min(frame.width, Math.max(0, (e.clientX - r.left) * frame.width / r.width));
    const y = Math.min(frame.height, Math.max(0, (e.clientY - r.top) * frame.height / r.height));
    return { x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100 };
  };
  const start = (secret) => {
    login.hidden = true;
    status("connecting…");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    ws = new WebSocket(scheme + location.host + "/live/" + encodeURIComponent(jobId) + "/ws");
    ws.onopen = () => ws.send(JSON.stringify({ v: 1, type: "auth", token: secret }));
    ws.onmessage = (e) => {
      const f = JSON.parse(e.data);
      if (f.type === "ready") status("live · worker " + f.worker_id, "live");
      else if (f.type === "frame") {
        frame = { width: f.width, height: f.height };
        screen.src = "data:image/jpeg;base64," + f.data;
        urlEl.textContent = f.page_url;
      } else if (f.type === "error") {
        failed = f.code === "UNAUTHORIZED" || f.code === "NOT_FOUND" || f.code === "WORKER_UNAVAILABLE";
        status(f.code + ": " + f.message, "error");
        if (f.code === "UNAUTHORIZED") login.hidden = false;
      } else if (f.type === "ended") {
        failed = true;
        status("ended: " + f.reason);
      }
    };
    ws.onclose = (e) => { if (!failed) status("disconnected (" + e.code + (e.reason ? ": " + e.reason : "") + ")", "error"); };
  };
  // data-frames counts the frames shown (decoded and on screen).
  screen.addEventListener("load", () => { screen.dataset.frames = String(++frames); });
  screen.addEventListener("click", (e) => { screen.focus(); send(Object.assign({ type: "click" }, at(e))); });
  screen.addEventListener("auxclick", (e) => {
    if (e.button === 1) send(Object.assign({ type: "click", button: "middle" }, at(e)));
  });
  screen.addEventListener("contextmenu", (e) => { e.preventDefault(); send(Object.assign({ type: "click", button: "right" }, at(e))); });
  screen.addEventListener("wheel", (e) => {
    e.preventDefault();
    send(Object.assign({ type: "scroll", delta_x: e.deltaX, delta_y: e.deltaY }, at(e)));
  }, { passive: false });
  screen.addEventListener("keydown", (e) => {
    if (e.isComposing) return;
    e.preventDefault();
    const chord = e.ctrlKey || e.metaKey || e.altKey;
    if (e.key.length === 1 && !chord) return send({ type: "type", text: e.key });
    const mods = (e.ctrlKey ? "Control+" : "") + (e.altKey ? "Alt+" : "") + (e.metaKey ? "Meta+" : "") + (e.shiftKey && e.key.length > 1 ? "Shift+" : "");
    if (["Control", "Alt", "Meta", "Shift"].includes(e.key)) return;
    send({ type: "key", key: mods + (e.key === " " ? "Space" : e.key) });
  });
  screen.addEventListener("paste", (e) => {
    const text = e.clipboardData && e.clipboardData.getData("text");
    if (text) { e.preventDefault(); send({ type: "type", text }); }
  });
  login.addEventListener("submit", (e) => { e.preventDefault(); start(document.getElementById("secret").value); });
  // The secret comes in the URL fragment (#secret=…), which browsers never send in a request;
  // it is taken off the address bar at once.
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get("secret");
  if (fromFragment) { history.replaceState(null, "", location.pathname); start(fromFragment); }
  else { login.hidden = false; status("enter the service secret"); }
})();
</script>
</body>
</html>
`
