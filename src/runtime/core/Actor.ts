/**
 * Actor kinds: a name, the Schema of their messages (a union of `Schema.TaggedRequest`s, so
 * each message carries its reply's Schema), and a behaviour that builds the handlers when an
 * actor of the kind is activated.
 *
 * The behaviour runs in a Scope that closes when the actor is passivated, restarted or
 * shut down: fibers it forks there (a job's handler, say) live exactly as long as the
 * activation. State that must survive a crash belongs in Postgres; the behaviour rebuilds
 * itself from its rows on activation.
 */
import { Duration, type Effect, type Exit, Schema, type Scope } from "effect"
import { type ActorId, actorId } from "../../protocol/Ids.ts"

/** When and how a crashed actor is restarted. */
export interface RestartPolicy {
  /** Restarts allowed within `window`; one more and the actor is marked `failed`. */
  readonly maxRestarts: number
  readonly window: Duration.Duration
  /** Backoff before the first restart; doubles per restart in the window, up to `maxBackoff`. */
  readonly minBackoff: Duration.Duration
  readonly maxBackoff: Duration.Duration
}

/** 5 restarts a minute, 100 ms backoff doubling up to 10 s. */
export const defaultRestartPolicy: RestartPolicy = {
  maxRestarts: 5,
  window: Duration.minutes(1),
  minBackoff: Duration.millis(100),
  maxBackoff: Duration.seconds(10)
}

/** Who an activation is. */
export interface Address {
  readonly id: ActorId
  readonly kind: string
  readonly key: string
  /** Bumped each time the actor is placed on a node; fences a stale owner. */
  readonly epoch: number
  readonly nodeId: string
}

type Msg = Schema.TaggedRequest.All

/** One handler per message tag, returning that message's success or failure. */
export type Handlers<M extends Msg> = {
  readonly [K in M["_tag"]]: (
    message: Extract<M, { readonly _tag: K }>
  ) => Effect.Effect<
    Schema.WithResult.Success<Extract<M, { readonly _tag: K }>>,
    Schema.WithResult.Failure<Extract<M, { readonly _tag: K }>>,
    never
  >
}

/**
 * An actor kind's protocol: what anyone needs to address its actors (`node.ref`). It holds
 * no behaviour, so a front desk can send to a job without building a stand-in for the
 * worker that runs it (as `Entity.make` in Effect cluster).
 */
export interface Actor<M extends Msg> {
  readonly kind: string
  readonly schema: Schema.Schema<M, any, never>
  /** Messages queued in memory for one actor before new ones go to dead letters (`MailboxFull`). */
  readonly capacity: number
  /** Idle time after which the actor is passivated (dropped from memory, kept registered). */
  readonly idleTimeout: Duration.Duration
  readonly restart: RestartPolicy
  /** The id of this kind's actor with the given key. */
  readonly id: (key: string) => ActorId
}

/** Builds an activation's handlers; runs in the activation's Scope. */
export type Behavior<M extends Msg, R = never> = (
  address: Address
) => Effect.Effect<Handlers<M>, unknown, R | Scope.Scope>

/** A kind together with its behaviour: what a node hosts (`node.register`, `node.spawn`). */
export interface Hosted<M extends Msg, R = never> extends Actor<M> {
  readonly behavior: Behavior<M, R>
}

/** Any hosted kind (for registries). */
export type Any = Hosted<any, any>

/** Options of a kind. */
export interface Options<M extends Msg> {
  readonly schema: Schema.Schema<M, any, never>
  readonly capacity?: number
  readonly idleTimeout?: Duration.DurationInput
  readonly restart?: {
    readonly maxRestarts?: number
    readonly window?: Duration.DurationInput
    readonly minBackoff?: Duration.DurationInput
    readonly maxBackoff?: Duration.DurationInput
  }
}

/**
 * Define an actor kind: its protocol, or with `behavior` a kind ready to host (tests and
 * small kinds that need nothing from outside).
 */
export function make<M extends Msg, R = never>(
  kind: string,
  options: Options<M> & { readonly behavior: Behavior<M, R> }
): Hosted<M, R>
export function make<M extends Msg>(kind: string, options: Options<M>): Actor<M>
export function make<M extends Msg, R = never>(
  kind: string,
  options: Options<M> & { readonly behavior?: Behavior<M, R> }
): Actor<M> | Hosted<M, R> {
  if (!/^[A-Za-z0-9._-]+$/.test(kind)) throw new Error(`actor kind "${kind}" must match [A-Za-z0-9._-]+`)
  const actor: Actor<M> = {
    kind,
    schema: options.schema,
    capacity: options.capacity ?? 10_000,
    idleTimeout: Duration.decode(options.idleTimeout ?? "5 minutes"),
    restart: {
      maxRestarts: options.restart?.maxRestarts ?? defaultRestartPolicy.maxRestarts,
      window: Duration.decode(options.restart?.window ?? defaultRestartPolicy.window),
      minBackoff: Duration.decode(options.restart?.minBackoff ?? defaultRestartPolicy.minBackoff),
      maxBackoff: Duration.decode(options.restart?.maxBackoff ?? defaultRestartPolicy.maxBackoff)
    },
    id: (key) => actorId(kind, key)
  }
  return options.behavior === undefined ? actor : host(actor, options.behavior)
}

/** Give a kind its behaviour, for the node that hosts it (as `entity.toLayer` in Effect cluster). */
export const host = <M extends Msg, R>(actor: Actor<M>, behavior: Behavior<M, R>): Hosted<M, R> => ({
  ...actor,
  behavior
})

/** The Schema of the exit of a request (its success, its failure, defects): what a reply carries. */
export const exitSchema = (message: Schema.TaggedRequest.All) =>
  Schema.exitSchema(message as unknown as Schema.WithResult<any, any, any, any, never>) as Schema.Schema<
    Exit.Exit<any, any>,
    unknown,
    never
  >
