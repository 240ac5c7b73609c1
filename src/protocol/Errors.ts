/**
 * Errors that cross the wire between nodes (ask replies) or are stored (dead letters).
 * Schemas only: this module imports nothing but `effect`.
 */
import { Schema } from "effect"

/** No actor is registered under this id. */
export class ActorNotFound extends Schema.TaggedError<ActorNotFound>()("ActorNotFound", {
  actorId: Schema.String
}) {
  override get message() {
    return `no actor is registered as "${this.actorId}": spawn it first, or list actors with \`troupe inspect actors\``
  }
}

/** An ask got no reply within its timeout. The message may still be handled later. */
export class AskTimeout extends Schema.TaggedError<AskTimeout>()("AskTimeout", {
  actorId: Schema.String,
  timeoutMs: Schema.Number
}) {
  override get message() {
    return `no reply from "${this.actorId}" within ${this.timeoutMs} ms: the actor may be busy or its node down (troupe inspect actor ${this.actorId})`
  }
}

/** The actor's bounded mailbox was full; the message went to dead letters. */
export class MailboxFull extends Schema.TaggedError<MailboxFull>()("MailboxFull", {
  actorId: Schema.String,
  capacity: Schema.Number
}) {
  override get message() {
    return `the mailbox of "${this.actorId}" is full (${this.capacity} messages): slow down or raise the kind's capacity`
  }
}

/** The database could not be reached or refused a statement. */
export class PersistenceError extends Schema.TaggedError<PersistenceError>()("PersistenceError", {
  reason: Schema.String
}) {
  override get message() {
    return `database error: ${this.reason}`
  }
}

/** A message did not match the receiving actor's Schema; it is in dead letters. */
export class MalformedMessage extends Schema.TaggedError<MalformedMessage>()("MalformedMessage", {
  actorId: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `message for "${this.actorId}" does not match its schema: ${this.reason}`
  }
}

/** The actor is marked failed (it crashed past its restart limit) or its handler died on this message. */
export class ActorFailed extends Schema.TaggedError<ActorFailed>()("ActorFailed", {
  actorId: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `actor "${this.actorId}" failed: ${this.reason}`
  }
}

/** Every error the runtime itself can answer an ask with. */
export const RuntimeError = Schema.Union(
  ActorNotFound,
  AskTimeout,
  MailboxFull,
  PersistenceError,
  MalformedMessage,
  ActorFailed
)
export type RuntimeError = typeof RuntimeError.Type

/** The body of a reply row: the handler's exit, or an error of the runtime. */
export const ReplyBody = Schema.Union(
  Schema.Struct({ _tag: Schema.Literal("Exit"), exit: Schema.Unknown }),
  Schema.Struct({ _tag: Schema.Literal("RuntimeError"), error: RuntimeError })
)
export type ReplyBody = typeof ReplyBody.Type
