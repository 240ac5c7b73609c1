/**
 * The live view of a held page: a CDP screencast of a job's page (`Page.startScreencast`,
 * JPEG, each frame acknowledged), shared by every viewer of that page and stopped when the
 * last one leaves or the page closes; and the viewers' input (click, type, key, scroll)
 * forwarded onto that page. A click's coordinates are in the frames' pixels and are scaled
 * onto the page's viewport. Bad input fails with a typed `LiveViewError`; nothing else
 * breaks. The doors (`src/edge/Live.ts`) carry frames and input over WebSockets.
 */
import { Data, Effect, type Scope } from "effect"
import type { CDPSession } from "playwright-core"
import type * as Live from "../protocol/Live.ts"
import { type Browser, firstLine, isGone, type Session } from "./Browser.ts"

/** A screencast frame of a page, as every viewer of it gets it. */
export interface Shot {
  /** The JPEG, base64. */
  readonly data: string
  /** The image's size in pixels. */
  readonly width: number
  readonly height: number
  /** The page's viewport in CSS pixels when it was taken. */
  readonly pageWidth: number
  readonly pageHeight: number
  readonly pageUrl: string
}

/** What a viewer is told. Called synchronously from the screencast: keep them quick. */
export interface Viewer {
  /** A new frame (the last one at once when the viewer joins a running screencast). */
  readonly frame: (shot: Shot) => void
  /** The page is gone: no more frames. */
  readonly ended: (reason: string) => void
}

/** Why a viewer cannot watch or operate a page. */
export class LiveViewError extends Data.TaggedError("LiveViewError")<{
  readonly code: Live.ErrorCode
  readonly message: string
}> {}

/** A viewer's hold on a page. */
export interface Watching {
  readonly session: Session
  /** Forward one input onto the page (inputs of one viewer are applied in order). */
  readonly input: (input: Live.Input) => Effect.Effect<void, LiveViewError>
}

/** The live view of a worker node's pages. */
export interface LiveView {
  /** Watch the page of the job `jobId` running on this node until the scope closes (or the page does). */
  readonly watch: (jobId: string, viewer: Viewer) => Effect.Effect<Watching, LiveViewError, Scope.Scope>
  /** Viewers watching now, over all pages. */
  readonly viewers: () => number
}

/** How a screencast is taken. */
export interface Options {
  /** JPEG quality, 0 to 100 (default 60). */
  readonly quality?: number
  /** How long one input may take before it fails (default 5 s). */
  readonly inputTimeoutMs?: number
}

/** The live view of the pages of `browser`. */
export const make = (browser: Browser, options: Options = {}): LiveView => {
  const quality = options.quality ?? 60
  const inputTimeoutMs = options.inputTimeoutMs ?? 5000
  const casts = new Map<string, Screencast>()

  /** The screencast of a session, started on its first viewer. */
  const castOf = (session: Session): Screencast => {
    const existing = casts.get(session.id)
    if (existing !== undefined) return existing
    const cast: Screencast = {
      session,
      viewers: new Set(),
      last: undefined,
      cdp: undefined,
      started: undefined
    }
    casts.set(session.id, cast)
    const onClose = () => end(cast, "the job's page was closed (the job ended or was cancelled)")
    session.page.once("close", onClose)
    cast.started = (async () => {
      const cdp = await session.context.newCDPSession(session.page)
      cast.cdp = cdp
      cdp.on("Page.screencastFrame", (event) => {
        cdp.send("Page.screencastFrameAck", { sessionId: event.sessionId }).catch(() => undefined)
        if (casts.get(session.id) !== cast) return
        const size = jpegSize(event.data)
        const shot: Shot = {
          data: event.data,
          width: size?.width ?? event.metadata.deviceWidth,
          height: size?.height ?? event.metadata.deviceHeight,
          pageWidth: Math.round(event.metadata.deviceWidth),
          pageHeight: Math.round(event.metadata.deviceHeight),
          pageUrl: session.page.url()
        }
        cast.last = shot
        for (const viewer of [...cast.viewers]) viewer.frame(shot)
      })
      await cdp.send("Page.startScreencast", { format: "jpeg", quality, everyNthFrame: 1 })
    })()
    cast.stop = () => {
      session.page.off("close", onClose)
      if (casts.get(session.id) === cast) casts.delete(session.id)
      void cast.started
        ?.catch(() => undefined)
        .then(async () => {
          await cast.cdp?.send("Page.stopScreencast").catch(() => undefined)
          await cast.cdp?.detach().catch(() => undefined)
        })
    }
    return cast
  }

  const end = (cast: Screencast, reason: string) => {
    const viewers = [...cast.viewers]
    cast.viewers.clear()
    cast.stop?.()
    for (const viewer of viewers) viewer.ended(reason)
  }

  const watch = (jobId: string, viewer: Viewer) =>
    Effect.gen(function* () {
      const session = browser.sessionOf(jobId)
      if (session === undefined || session.page.isClosed()) {
        return yield* new LiveViewError({
          code: "NOT_FOUND",
          message: `job ${jobId} has no open page on this worker: it is not running here, or it has no browser session`
        })
      }
      const cast = yield* Effect.acquireRelease(
        Effect.sync(() => {
          const cast = castOf(session)
          cast.viewers.add(viewer)
          if (cast.last !== undefined) viewer.frame(cast.last)
          return cast
        }),
        (cast) =>
          Effect.sync(() => {
            if (cast.viewers.delete(viewer) && cast.viewers.size === 0) cast.stop?.()
          })
      )
      yield* Effect.tryPromise({
        try: () => cast.started ?? Promise.resolve(),
        catch: (e) =>
          isGone(e) || session.page.isClosed()
            ? new LiveViewError({ code: "NOT_FOUND", message: `job ${jobId}'s page was closed` })
            : new LiveViewError({
                code: "INTERNAL",
                message: `the screencast did not start: ${firstLine(e)}`
              })
      })
      const lock = yield* Effect.makeSemaphore(1)
      const input = (frame: Live.Input) =>
        lock.withPermits(1)(
          Effect.tryPromise({
            try: () => apply(session, cast.last, frame),
            catch: (e) =>
              e instanceof LiveViewError
                ? e
                : new LiveViewError({
                    code: "INPUT_FAILED",
                    message: session.page.isClosed()
                      ? "the page is closed: the job has ended"
                      : `the page did not take the ${frame.type}: ${firstLine(e)}`
                  })
          }).pipe(
            Effect.timeoutFail({
              duration: inputTimeoutMs,
              onTimeout: () =>
                new LiveViewError({
                  code: "INPUT_FAILED",
                  message: `the page did not take the ${frame.type} within ${inputTimeoutMs} ms (a dialog may be open)`
                })
            })
          )
        )
      return { session, input } satisfies Watching
    })

  return {
    watch,
    viewers: () => {
      let n = 0
      for (const cast of casts.values()) n += cast.viewers.size
      return n
    }
  }
}

// --- internal ---

interface Screencast {
  readonly session: Session
  readonly viewers: Set<Viewer>
  last: Shot | undefined
  cdp: CDPSession | undefined
  started: Promise<void> | undefined
  stop?: () => void
}

/** Apply one input to the page; coordinates are in the last frame's pixels. */
const apply = async (session: Session, last: Shot | undefined, input: Live.Input): Promise<void> => {
  const page = session.page
  switch (input.type) {
    case "click": {
      const { x, y } = onPage(page.viewportSize(), last, input.x, input.y)
      await page.mouse.click(x, y, { button: input.button ?? "left", clickCount: input.click_count ?? 1 })
      return
    }
    case "type":
      await page.keyboard.type(input.text)
      return
    case "key":
      await page.keyboard.press(input.key)
      return
    case "scroll": {
      const width = last?.width ?? page.viewportSize()?.width ?? 0
      const height = last?.height ?? page.viewportSize()?.height ?? 0
      const { x, y } = onPage(page.viewportSize(), last, input.x ?? width / 2, input.y ?? height / 2)
      await page.mouse.move(x, y)
      await page.mouse.wheel(input.delta_x ?? 0, input.delta_y ?? 0)
      return
    }
  }
}

/** A point of a frame (its pixels) on the page (CSS pixels of the viewport). */
const onPage = (
  viewport: { width: number; height: number } | null,
  last: Shot | undefined,
  x: number,
  y: number
): { x: number; y: number } => {
  const width = last?.width ?? viewport?.width
  const height = last?.height ?? viewport?.height
  if (width === undefined || height === undefined) return { x, y }
  if (x > width || y > height) {
    throw new LiveViewError({
      code: "INVALID_FRAME",
      message: `(${x}, ${y}) is outside the frame (${width}×${height} pixels): send coordinates in the frame's pixels`
    })
  }
  const pageWidth = last?.pageWidth ?? width
  const pageHeight = last?.pageHeight ?? height
  return { x: (x * pageWidth) / width, y: (y * pageHeight) / height }
}

/** The size of a base64 JPEG, from its start-of-frame segment. */
const jpegSize = (base64: string): { width: number; height: number } | undefined => {
  // The SOF segment comes after the headers; the first few KiB hold it.
  const bytes = Buffer.from(base64.slice(0, 8192 * 4), "base64")
  if (bytes[0] !== 0xff || bytes[1] !== 0xd8) return undefined
  let i = 2
  while (i + 9 < bytes.length) {
    if (bytes[i] !== 0xff) return undefined
    const marker = bytes[i + 1]!
    const length = bytes.readUInt16BE(i + 2)
    // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      return { height: bytes.readUInt16BE(i + 5), width: bytes.readUInt16BE(i + 7) }
    }
    i += 2 + length
  }
  return undefined
}
