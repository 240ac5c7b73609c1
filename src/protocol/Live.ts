/**
 * The live view's protocol, v1: the frames a human's browser exchanges with a held job's
 * page, over the WebSocket a gateway serves at `/live/<job_id>/ws` (and proxies, frame for
 * frame, to the worker node that holds the page, at `/live/<job_id>` on its HTTP port).
 * Frames never go through Postgres. Schemas only: this module imports nothing but `effect`.
 * `docs/PROTOCOL.md` ("Live view") shows an example of each; `docs/protocol.schema.json`
 * carries them as `LiveClientFrame` and `LiveServerFrame`.
 */
import { Schema } from "effect"

/** The protocol version every live frame carries as `v`. */
export const version = 1 as const

/** The largest frame a viewer may send (64 KiB); a larger one closes the socket with 1009. */
export const maxClientFrameBytes = 64 * 1024

/** How long a viewer may take to send its `auth` frame before it is closed with 4401. */
export const authTimeoutMs = 5000

/** WebSocket close codes of the live view. */
export const CloseCode = {
  /** The job's page was closed (the job ended) or the viewer left. */
  normal: 1000,
  /** The gateway or the worker is shutting down. */
  goingAway: 1001,
  /** A frame over `maxClientFrameBytes`. */
  tooBig: 1009,
  /** No `auth` frame within 5 s, or a wrong secret. */
  unauthorized: 4401,
  /** No such job, or it holds no open page (it is not running, or it runs no browser). */
  notFound: 4404,
  /** The job's worker node could not be reached. */
  workerUnavailable: 4503
} as const

/** The codes an `error` frame carries. */
export const ErrorCode = Schema.Literal(
  "UNAUTHORIZED",
  "NOT_FOUND",
  "INVALID_FRAME",
  "INPUT_FAILED",
  "WORKER_UNAVAILABLE",
  "INTERNAL"
)
export type ErrorCode = typeof ErrorCode.Type

const V = Schema.Literal(version)
/** A position in a frame's pixels (`frame.width` × `frame.height`), from its top left corner. */
const Coordinate = Schema.Number.pipe(Schema.finite(), Schema.between(0, 100_000))
const Delta = Schema.Number.pipe(Schema.finite(), Schema.between(-100_000, 100_000))
const Pixels = Schema.Number.pipe(Schema.int(), Schema.nonNegative())

// --- viewer → page ---

/** The first frame: the service secret (`GH_SERVICE_SECRET`). Nothing else is read before it. */
export const Auth = Schema.Struct({
  v: V,
  type: Schema.Literal("auth"),
  token: Schema.String.pipe(Schema.maxLength(4096))
})
/** A click at `x`, `y` in the pixels of the frames (scaled onto the page's viewport by the worker). */
export const Click = Schema.Struct({
  v: V,
  type: Schema.Literal("click"),
  x: Coordinate,
  y: Coordinate,
  button: Schema.optional(Schema.Literal("left", "middle", "right")),
  click_count: Schema.optional(Schema.Int.pipe(Schema.between(1, 3)))
})
/** Type text into the focused element, as key strokes. */
export const Type = Schema.Struct({
  v: V,
  type: Schema.Literal("type"),
  text: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(10_000))
})
/** Press a key: a name such as `Enter`, `Tab`, `ArrowDown`, `a`, or a chord such as `Control+A`. */
export const Key = Schema.Struct({
  v: V,
  type: Schema.Literal("key"),
  key: Schema.String.pipe(Schema.minLength(1), Schema.maxLength(100))
})
/** Turn the mouse wheel by `delta_x`, `delta_y` CSS pixels, over `x`, `y` of the frame (default: its centre). */
export const Scroll = Schema.Struct({
  v: V,
  type: Schema.Literal("scroll"),
  x: Schema.optional(Coordinate),
  y: Schema.optional(Coordinate),
  delta_x: Schema.optional(Delta),
  delta_y: Schema.optional(Delta)
})

/** The input a viewer forwards onto the page. */
export const Input = Schema.Union(Click, Type, Key, Scroll)
export type Input = typeof Input.Type

/** Every frame a viewer may send. */
export const ClientFrame = Schema.Union(Auth, Click, Type, Key, Scroll)
export type ClientFrame = typeof ClientFrame.Type

// --- page → viewer ---

/** After `auth`: the page is found and frames follow. */
export const Ready = Schema.Struct({
  v: V,
  type: Schema.Literal("ready"),
  job_id: Schema.String,
  /** The worker that holds the page. */
  worker_id: Schema.String,
  page_url: Schema.String,
  /** The page's viewport in CSS pixels (null when the page has none set). */
  viewport: Schema.NullOr(Schema.Struct({ width: Pixels, height: Pixels }))
})
export type Ready = typeof Ready.Type

/** One screencast frame of the page: a JPEG, base64. Sent when the page repaints; the last one at once to a new viewer. */
export const Frame = Schema.Struct({
  v: V,
  type: Schema.Literal("frame"),
  /** Counts the frames of this viewer's stream from 1; a frame skipped for a slow viewer leaves a gap. */
  seq: Pixels,
  format: Schema.Literal("jpeg"),
  data: Schema.String,
  /** The image's size in pixels: the space of `click` and `scroll` coordinates. */
  width: Pixels,
  height: Pixels,
  /** The page's viewport in CSS pixels when the frame was taken. */
  page_width: Pixels,
  page_height: Pixels,
  page_url: Schema.String
})
export type Frame = typeof Frame.Type

/** Something went wrong; after `UNAUTHORIZED`, `NOT_FOUND` and `WORKER_UNAVAILABLE` the socket closes. */
export const ErrorFrame = Schema.Struct({
  v: V,
  type: Schema.Literal("error"),
  code: ErrorCode,
  message: Schema.String
})
export type ErrorFrame = typeof ErrorFrame.Type

/** The page is gone (the job ended, or was cancelled); the socket closes with 1000. */
export const Ended = Schema.Struct({
  v: V,
  type: Schema.Literal("ended"),
  reason: Schema.String
})
export type Ended = typeof Ended.Type

/** Every frame a viewer may receive. */
export const ServerFrame = Schema.Union(Ready, Frame, ErrorFrame, Ended)
export type ServerFrame = typeof ServerFrame.Type

/** An `error` frame. */
export const error = (code: ErrorCode, message: string): ErrorFrame => ({
  v: version,
  type: "error",
  code,
  message
})

/** What `docs/protocol.schema.json` describes of the live view. */
export const documented = {
  LiveClientFrame: ClientFrame,
  LiveServerFrame: ServerFrame
} as const
