/**
 * The edge's one error mapping, used by every door (the WebSocket connection, the REST
 * routes): a request a door refuses itself (`EdgeFailure`), a service's error, or a defect
 * becomes `{status, code, message, details}`, the same code and message on the socket and
 * over HTTP. Also the frame sanity check both doors run on parsed JSON (`malformedValue`),
 * and the masking of credentials in a logged cause.
 */
import type { HttpServerError } from "@effect/platform"
import { Cause, Data, Option } from "effect"
import type * as Edge from "../protocol/Edge.ts"
import type { PersistenceError } from "../protocol/Errors.ts"
import type {
  Conflict,
  InvalidRequest,
  NotFound,
  RequestTimeout,
  WorkerUnavailable
} from "../protocol/Jobs.ts"

/** A request a door refused, or any error as a door answers it: HTTP status, protocol code, message, details. */
export class EdgeFailure extends Data.TaggedError("EdgeFailure")<{
  readonly status: number
  readonly code: Edge.ErrorCode
  readonly message: string
  readonly details?: unknown
}> {}

/** The HTTP status of each code, unless a failure names its own (413 for a body too large). */
export const statusOf: Readonly<Record<Edge.ErrorCode, number>> = {
  INVALID_FRAME: 400,
  UNAUTHORIZED: 401,
  NOT_FOUND: 404,
  CONFLICT: 409,
  WORKER_UNAVAILABLE: 409,
  TIMEOUT: 504,
  OVERLOADED: 503,
  INTERNAL: 500
}

/** A refusal with the code's usual status (`statusOf`) unless `status` is given. */
export const refuse = (
  code: Edge.ErrorCode,
  message: string,
  details?: unknown,
  status: number = statusOf[code]
): EdgeFailure =>
  new EdgeFailure(details === undefined ? { status, code, message } : { status, code, message, details })

/** A bug or an error the caller cannot act on: the details stay in the log. */
export const internal = (): EdgeFailure =>
  refuse("INTERNAL", "internal error; the gateway's log has the details")

/** The errors of the job service, the event stream and the monitoring queries. */
export type ServiceError =
  | InvalidRequest
  | NotFound
  | Conflict
  | WorkerUnavailable
  | RequestTimeout
  | PersistenceError

/** Everything a door's request can fail with. */
export type DoorError = EdgeFailure | ServiceError | HttpServerError.RouteNotFound

/** How a door answers an error. */
export const fromError = (error: DoorError): EdgeFailure => {
  switch (error._tag) {
    case "EdgeFailure":
      return error
    case "InvalidRequest":
    case "NotFound":
    case "Conflict":
    case "WorkerUnavailable":
    case "RequestTimeout":
      return refuse(error.code, error.message, fieldsOf(error))
    case "RouteNotFound":
      return refuse(
        "NOT_FOUND",
        `no route ${error.request.method} ${error.request.url.split("?")[0]}: see docs/OPERATIONS.md`
      )
    case "PersistenceError":
      // The reason (a driver message) stays in the log: it may name hosts and users.
      return refuse("INTERNAL", "the database did not answer or refused the request; retry shortly")
    default:
      // An error outside the contract (a service whose type says less than it does) is a bug.
      return internal()
  }
}

/** How a door answers a failed request: its first failure, or `internal` for a defect. */
export const fromCause = (cause: Cause.Cause<DoorError>): EdgeFailure =>
  Option.match(Cause.failureOption(cause), { onNone: internal, onSome: fromError })

/** The protocol's error body of a failure (`details` only when there are some). */
export const errorBody = (failure: EdgeFailure): Edge.ErrorBody =>
  failure.details === undefined
    ? { code: failure.code, message: failure.message }
    : { code: failure.code, message: failure.message, details: failure.details }

/** A cause for the log, with any `scheme://user:password@` in its text masked. */
export const redactCause = (cause: Cause.Cause<unknown>): string =>
  Cause.pretty(cause).replace(/([a-z][a-z0-9+.-]*:\/\/[^:/@\s]+:)[^@\s]+@/gi, "$1***@")

/** The deepest nesting a frame or body may have (the Schema formatter and JSON.stringify recurse). */
export const maxDepth = 64

/**
 * Why a parsed frame (or REST body) cannot be handled, if it cannot: nested deeper than `maxDepth`, or a
 * string or key holding U+0000 or an unpaired surrogate (Postgres stores neither in text or
 * jsonb). Iterative, so a frame nested 100,000 deep cannot overflow the stack.
 */
export const malformedValue = (json: unknown): string | undefined => {
  const badString = (s: string) => s.includes("\u0000") || unpairedSurrogate.test(s)
  const stack: Array<readonly [unknown, number]> = [[json, 1]]
  while (stack.length > 0) {
    const [value, depth] = stack.pop()!
    if (typeof value === "string") {
      if (badString(value)) return "a string holds U+0000 or an unpaired surrogate; send well-formed text"
    } else if (typeof value === "object" && value !== null) {
      if (depth > maxDepth) return `nested deeper than ${maxDepth} levels`
      for (const [key, item] of Object.entries(value)) {
        if (badString(key)) return "a key holds U+0000 or an unpaired surrogate; send well-formed text"
        stack.push([item, depth + 1])
      }
    }
  }
  return undefined
}

// --- internal ---

const unpairedSurrogate = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

/** An error's own fields as `details`, without its tag and code. */
const fieldsOf = ({ _tag, code, ...fields }: { readonly _tag: string; readonly code: string }): object =>
  fields
