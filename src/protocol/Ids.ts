/**
 * Actor and node ids. An actor id is `<kind>:<key>`; a node id is a short token used in
 * NOTIFY channel names (`node:<id>`), so it must stay within Postgres' 63-byte identifier limit.
 */
import { Schema } from "effect"

/** A node id: letters, digits, `-`, `_`, `.`, at most 48 characters. */
export const NodeId = Schema.String.pipe(Schema.pattern(/^[A-Za-z0-9._-]{1,48}$/), Schema.brand("NodeId"))
export type NodeId = typeof NodeId.Type

/** An actor id: `<kind>:<key>`. */
export const ActorId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9._-]+:.+$/),
  Schema.maxLength(512),
  Schema.brand("ActorId")
)
export type ActorId = typeof ActorId.Type

/** Build an actor id from a kind and a key. */
export const actorId = (kind: string, key: string): ActorId => `${kind}:${key}` as ActorId

/** Split an actor id into kind and key. */
export const parseActorId = (id: string): { readonly kind: string; readonly key: string } => {
  const i = id.indexOf(":")
  return i < 0 ? { kind: id, key: "" } : { kind: id.slice(0, i), key: id.slice(i + 1) }
}

/** The NOTIFY channel a node listens on. */
export const nodeChannel = (nodeId: string): string => `node:${nodeId}`

/** The NOTIFY channel that invalidates registry caches; its payload is an actor id. */
export const registryChannel = "registry:changed"
