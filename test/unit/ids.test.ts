import { describe, expect, it } from "@effect/vitest"
import { Schema } from "effect"
import fc from "fast-check"
import { ActorId, NodeId, actorId, parseActorId } from "../../src/protocol/Ids.ts"
import { lockKey } from "../../src/runtime/core/NodeMembership.ts"

describe("ids", () => {
  it("an actor id splits back into its kind and key, whatever the key holds", () => {
    fc.assert(
      fc.property(
        fc.stringMatching(/^[A-Za-z0-9._-]{1,20}$/),
        fc.string({ minLength: 1, maxLength: 100 }),
        (kind, key) => {
          const id = actorId(kind, key)
          expect(parseActorId(id)).toEqual({ kind, key })
          expect(Schema.is(ActorId)(id)).toBe(true)
        }
      )
    )
  })

  it("a node id that would not fit a NOTIFY channel name is refused", () => {
    expect(Schema.is(NodeId)("worker-1")).toBe(true)
    expect(Schema.is(NodeId)("x".repeat(49))).toBe(false)
    expect(Schema.is(NodeId)("has space")).toBe(false)
  })

  it("a node's lock key is a positive 62-bit number, the same for the same id, different for different ids", () => {
    fc.assert(
      fc.property(
        fc.string({ minLength: 1, maxLength: 48 }),
        fc.string({ minLength: 1, maxLength: 48 }),
        (a, b) => {
          const ka = lockKey(a)
          expect(ka >= 0n && ka < 2n ** 62n).toBe(true)
          expect(lockKey(a)).toBe(ka)
          if (a !== b) expect(lockKey(b)).not.toBe(ka)
        }
      )
    )
  })
})
