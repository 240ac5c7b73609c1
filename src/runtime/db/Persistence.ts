/**
 * Where `SqlError` becomes the domain's `PersistenceError`: once, at the edge of each storage
 * module, so nothing above storage handles a driver error or maps one by hand.
 */
import type { SqlError } from "@effect/sql/SqlError"
import { Effect } from "effect"
import { PersistenceError } from "../../protocol/Errors.ts"
import { describe } from "./Database.ts"

/** Turn a `SqlError` into a `PersistenceError` (other failures pass through). */
export const refail = <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, Refailed<E>, R> =>
  Effect.mapError(self, (e) =>
    isSqlError(e) ? new PersistenceError({ reason: describe(e) }) : e
  ) as Effect.Effect<A, Refailed<E>, R>

/** A storage record whose statements fail with `PersistenceError` instead of `SqlError`. */
export type Refailing<T> = {
  readonly [K in keyof T]: T[K] extends (...args: infer Args) => Effect.Effect<infer A, infer E, infer R>
    ? (...args: Args) => Effect.Effect<A, Refailed<E>, R>
    : T[K]
}

/** Refail every statement of a storage record (its functions that return an Effect). */
export const refailAll = <T extends Record<string, unknown>>(storage: T): Refailing<T> => {
  const out: Record<string, unknown> = {}
  for (const [name, value] of Object.entries(storage)) {
    out[name] =
      typeof value === "function"
        ? (...args: Array<unknown>) => {
            const result = (value as (...a: Array<unknown>) => unknown)(...args)
            return Effect.isEffect(result) ? refail(result) : result
          }
        : value
  }
  return out as Refailing<T>
}

// --- internal ---

type Refailed<E> = Exclude<E, SqlError> | (SqlError extends E ? PersistenceError : never)

const isSqlError = (e: unknown): e is SqlError =>
  typeof e === "object" && e !== null && (e as { _tag?: unknown })._tag === "SqlError"
