/**
 * `npm run protocol:schema`: writes `docs/protocol.schema.json`, the JSON Schema of protocol
 * v1 for clients not written in TypeScript, from the Schemas in `src/protocol/Edge.ts` and
 * the live view's in `src/protocol/Live.ts` (their `documented`).
 * `test/unit/protocol-schema.test.ts` fails when the committed file is stale.
 */
import { fileURLToPath, pathToFileURL } from "node:url"
import { FileSystem } from "@effect/platform"
import { NodeFileSystem, NodeRuntime } from "@effect/platform-node"
import { Console, Effect, JSONSchema } from "effect"
import * as Edge from "../src/protocol/Edge.ts"
import * as Live from "../src/protocol/Live.ts"

/** Where the generated document lives. */
export const outputPath = fileURLToPath(new URL("../docs/protocol.schema.json", import.meta.url))

/**
 * The document: one `$defs` entry per documented Schema, in the order of `documented`, then
 * the definitions they share (`Int` …) by name. 2-space indent, trailing newline.
 */
export const render = (): string => {
  const defs: Record<string, unknown> = {}
  const shared: Record<string, unknown> = {}
  for (const [name, schema] of Object.entries({ ...Edge.documented, ...Live.documented })) {
    // A document's own `$defs` are referenced as `#/$defs/<ref>`: hoisted to the root, they
    // resolve the same.
    const { $schema: _, $defs = {}, ...body } = JSONSchema.make(schema as Schema)
    defs[name] = withoutBuiltinIds(body)
    for (const [ref, raw] of Object.entries($defs)) {
      const def = withoutBuiltinIds(raw)
      if (ref in shared && JSON.stringify(shared[ref]) !== JSON.stringify(def)) {
        throw new Error(`two Schemas define "${ref}" differently: give one of them another identifier`)
      }
      shared[ref] = def
    }
  }
  for (const ref of Object.keys(shared).sort()) {
    if (ref in defs) {
      throw new Error(`"${ref}" is both a documented Schema and a shared definition: rename one of them`)
    }
    defs[ref] = shared[ref]
  }
  const document = {
    $schema: "http://json-schema.org/draft-07/schema#",
    title: `troupe protocol v${Edge.version}`,
    description:
      "Generated from src/protocol/Edge.ts and src/protocol/Live.ts by `npm run protocol:schema`; do not edit. See docs/PROTOCOL.md.",
    $defs: defs
  }
  return `${JSON.stringify(document, null, 2)}\n`
}

/** Write the document. */
export const write = Effect.gen(function* () {
  const fs = yield* FileSystem.FileSystem
  yield* fs.writeFileString(outputPath, render())
  yield* Console.log(`wrote ${outputPath}`)
})

// --- internal ---

type Schema = Parameters<typeof JSONSchema.make>[0]

/**
 * Effect marks its built-in schemas with a fixed `$id` (`Schema.Unknown` becomes
 * `{"$id": "/schemas/unknown", "title": "unknown"}`). Repeated in one document, ajv refuses
 * it ("reference resolves to more than one schema"), so those ids are dropped: without its
 * `$id` the schema accepts the same values.
 */
const withoutBuiltinIds = (value: unknown): unknown => {
  if (Array.isArray(value)) return value.map(withoutBuiltinIds)
  if (typeof value !== "object" || value === null) return value
  return Object.fromEntries(
    Object.entries(value)
      .filter(([key, v]) => !(key === "$id" && typeof v === "string" && v.startsWith("/schemas/")))
      .map(([key, v]) => [key, withoutBuiltinIds(v)])
  )
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  write.pipe(Effect.provide(NodeFileSystem.layer), NodeRuntime.runMain)
}
