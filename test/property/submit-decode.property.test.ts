import { describe, expect, it } from "@effect/vitest"
import { Either, Schema } from "effect"
import fc from "fast-check"
import { decodeSubmitJobFast, SubmitJobStruct } from "../../src/protocol/Jobs.ts"

/** What `SubmitJob`'s schema answers: the decoded job, or that it refuses the input. */
const bySchema = (input: unknown) =>
  Schema.decodeUnknownEither(SubmitJobStruct)(input, { onExcessProperty: "error" })

/** Values of every field: valid ones, edges and wrong types. */
const anyValue = fc.oneof(
  fc.constantFrom(
    null,
    undefined,
    "",
    "a",
    "x".repeat(200),
    "x".repeat(201),
    "noop",
    "bad type!",
    "strict",
    "preferred",
    "any",
    "STRICT",
    "http://127.0.0.1:9/cb",
    "https://example.test/a?b=c",
    "http://has space",
    "ftp://x",
    `http://${"x".repeat(1994)}`,
    0,
    1,
    -1000,
    1000,
    1001,
    -1001,
    100,
    101,
    604_800,
    604_801,
    1.5,
    Number.NaN,
    Number.POSITIVE_INFINITY,
    2 ** 53,
    true,
    [],
    {},
    { nested: [1, "two"] }
  ),
  fc.string({ maxLength: 12 }),
  fc.integer({ min: -2000, max: 700_000 }),
  fc.double()
)

const fields = [
  "valet_task_id",
  "job_type",
  "payload",
  "target_worker_id",
  "worker_affinity",
  "callback_url",
  "priority",
  "max_attempts",
  "timeout_seconds"
] as const

/** Objects of those fields (any subset), sometimes with a key the schema does not know. */
const anyInput = fc
  .record(
    Object.fromEntries(fields.map((f) => [f, anyValue])) as Record<(typeof fields)[number], typeof anyValue>,
    {
      requiredKeys: []
    }
  )
  .chain((r) =>
    fc.oneof(
      { weight: 4, arbitrary: fc.constant<unknown>(r) },
      { weight: 1, arbitrary: fc.constant<unknown>({ ...r, extra: 1 }) },
      {
        weight: 1,
        arbitrary: fc.constantFrom<unknown>(
          null,
          "job",
          7,
          [r],
          Object.assign(Object.create({ inherited: 1 }), r)
        )
      }
    )
  )

/** Valid submissions, in the shapes clients send. */
const validInput = fc.record(
  {
    valet_task_id: fc.option(fc.string({ minLength: 1, maxLength: 200 })),
    job_type: fc.stringMatching(/^[A-Za-z0-9._:-]{1,100}$/),
    payload: fc.jsonValue(),
    target_worker_id: fc.option(fc.string({ minLength: 1, maxLength: 200 })),
    worker_affinity: fc.constantFrom("strict", "preferred", "any"),
    callback_url: fc.option(fc.webUrl().filter((u) => u.length <= 2000 && /^https?:\/\/\S+$/.test(u))),
    priority: fc.integer({ min: -1000, max: 1000 }),
    max_attempts: fc.integer({ min: 1, max: 100 }),
    timeout_seconds: fc.option(fc.integer({ min: 1, max: 604_800 }))
  },
  { requiredKeys: ["job_type"] }
)

/** A valid submission with one field changed to any value, removed, or an unknown key added. */
const nearValid = fc
  .tuple(validInput, fc.constantFrom<string>(...fields, "extra"), anyValue, fc.boolean())
  .map(([valid, field, value, remove]) => {
    const input: Record<string, unknown> = { ...valid }
    if (remove) delete input[field]
    else input[field] = value
    return input
  })

describe("submission decoding", () => {
  it("the hand-checked path accepts only what the schema accepts, and decodes it as the schema does", () => {
    fc.assert(
      fc.property(fc.oneof(nearValid, anyInput), (input) => {
        const fast = decodeSubmitJobFast(input)
        if (fast === undefined) return
        const schema = bySchema(input)
        expect(Either.isRight(schema)).toBe(true)
        expect(fast).toEqual(Either.getOrThrow(schema))
      }),
      { numRuns: 20_000 }
    )
  })

  it("every valid submission takes the hand-checked path, with the schema's defaults", () => {
    fc.assert(
      fc.property(validInput, (input) => {
        const fast = decodeSubmitJobFast(input)
        expect(fast).toEqual(Either.getOrThrow(bySchema(input)))
      }),
      { numRuns: 5_000 }
    )
    expect(decodeSubmitJobFast({ job_type: "noop" })).toEqual({
      valet_task_id: null,
      job_type: "noop",
      payload: {},
      target_worker_id: null,
      worker_affinity: "any",
      callback_url: null,
      priority: 0,
      max_attempts: 3,
      timeout_seconds: null
    })
  })
})
