import { readFileSync } from "node:fs"
import { describe, expect, it } from "@effect/vitest"
import { Either, ParseResult, Schema } from "effect"
import { outputPath, render } from "../../scripts/protocol-schema.ts"
import * as Edge from "../../src/protocol/Edge.ts"
import * as Live from "../../src/protocol/Live.ts"
import { DeregisterRequest, Resolution } from "../../src/protocol/Jobs.ts"

const protocolMd = readFileSync(new URL("../../docs/PROTOCOL.md", import.meta.url), "utf8")

/** The REST bodies PROTOCOL.md shows, by the name its `<!-- body: Name -->` markers use. */
const bodies: Record<string, Schema.Schema.AnyNoContext> = {
  ...Edge.documented,
  Workers: Edge.Results["workers.list"],
  Events: Edge.Results["job.events"],
  DeregisterRequest,
  Resolution,
  CancelBody: Schema.Struct({ reason: Edge.JobCancel.fields.reason })
}

interface Example {
  readonly kind: "frame" | "body"
  readonly name: string
  readonly line: number
  readonly value: unknown
}

/** Every ```json block of PROTOCOL.md right after a `<!-- frame: … -->` or `<!-- body: … -->` marker. */
const examples: ReadonlyArray<Example> = [
  ...protocolMd.matchAll(/<!-- (frame|body): ([A-Za-z.-]+) -->\n```json\n([\s\S]*?)\n```/g)
].map((m) => ({
  kind: m[1] as Example["kind"],
  name: m[2]!,
  line: protocolMd.slice(0, m.index).split("\n").length,
  value: JSON.parse(m[3]!)
}))

const strict = { onExcessProperty: "error", errors: "all" } as const
/** Why `value` does not decode with `schema`, or "" when it does. */
const decodeError = (schema: Schema.Schema.AnyNoContext, value: unknown): string =>
  Either.match(Schema.decodeUnknownEither(schema)(value, strict), {
    onLeft: (e) => ParseResult.TreeFormatter.formatErrorSync(e),
    onRight: () => ""
  })

const frames = (name: string) => examples.filter((e) => e.kind === "frame" && e.name === name)
const field = (value: unknown, key: string): unknown => (value as Record<string, unknown>)[key]

describe("docs/protocol.schema.json", () => {
  it("is what `npm run protocol:schema` generates from the Schemas", () => {
    let committed = ""
    try {
      committed = readFileSync(outputPath, "utf8")
    } catch {
      // a missing file is stale too
    }
    expect(committed, "docs/protocol.schema.json is stale: run `npm run protocol:schema`").toBe(render())
  })
})

describe("docs/PROTOCOL.md examples", () => {
  it("every marker is followed by a ```json block", () => {
    const markers = protocolMd.match(/<!-- (frame|body): /g) ?? []
    expect(examples.length).toBe(markers.length)
    expect(examples.length).toBeGreaterThan(30)
  })

  it("every client frame decodes with ClientFrame, and every frame marked invalid does not", () => {
    for (const e of frames("client")) {
      expect(decodeError(Edge.ClientFrame, e.value), `PROTOCOL.md:${e.line}`).toBe("")
    }
    const invalid = frames("invalid")
    expect(invalid.length).toBeGreaterThan(0)
    for (const e of invalid) {
      expect(decodeError(Edge.ClientFrame, e.value), `PROTOCOL.md:${e.line} decodes`).not.toBe("")
    }
  })

  it("every server frame decodes with ServerFrame, and a successful reply's result with its request's result Schema", () => {
    const requests = new Map<string, Edge.RequestType>()
    for (const e of examples) {
      if (e.kind !== "frame") continue
      if (e.name === "client")
        requests.set(field(e.value, "id") as string, field(e.value, "type") as Edge.RequestType)
      if (e.name !== "server") continue
      expect(decodeError(Edge.ServerFrame, e.value), `PROTOCOL.md:${e.line}`).toBe("")
      if (field(e.value, "type") === "reply" && field(e.value, "ok") === true) {
        const type = requests.get(field(e.value, "id") as string)
        expect(type, `PROTOCOL.md:${e.line}: no client frame above with this id`).toBeDefined()
        expect(decodeError(Edge.Results[type!], field(e.value, "result")), `PROTOCOL.md:${e.line}`).toBe("")
      }
      if (field(e.value, "type") === "pong") {
        expect(requests.get(field(e.value, "id") as string), `PROTOCOL.md:${e.line}`).toBe("ping")
      }
    }
  })

  it("every REST body decodes with its Schema", () => {
    for (const e of examples.filter((x) => x.kind === "body")) {
      const schema = bodies[e.name]
      expect(schema, `PROTOCOL.md:${e.line}: no Schema named ${e.name}`).toBeDefined()
      expect(decodeError(schema!, e.value), `PROTOCOL.md:${e.line}`).toBe("")
    }
  })

  it("shows every request type, every server frame type and every error code", () => {
    const requestTypes = new Set(frames("client").map((e) => field(e.value, "type")))
    expect(
      [...Edge.requestTypes].filter((t) => !requestTypes.has(t)),
      "request types without an example"
    ).toEqual([])
    const serverTypes = new Set(frames("server").map((e) => field(e.value, "type")))
    expect([...serverTypes].sort()).toEqual(["event", "pong", "reply"])
    const codes = new Set(
      frames("server")
        .map((e) => field(e.value, "error"))
        .filter((error) => error !== undefined)
        .map((error) => field(error, "code"))
    )
    expect(
      Edge.ErrorCode.literals.filter((c) => !codes.has(c)),
      "error codes without an example reply"
    ).toEqual([])
  })

  it("the live view's frames decode with Live.ClientFrame and Live.ServerFrame, and every type is shown", () => {
    const client = frames("live-client")
    const server = frames("live-server")
    for (const e of client) expect(decodeError(Live.ClientFrame, e.value), `PROTOCOL.md:${e.line}`).toBe("")
    for (const e of server) expect(decodeError(Live.ServerFrame, e.value), `PROTOCOL.md:${e.line}`).toBe("")
    expect([...new Set(client.map((e) => field(e.value, "type")))].sort()).toEqual(
      ["auth", "click", "key", "scroll", "type"]
    )
    expect([...new Set(server.map((e) => field(e.value, "type")))].sort()).toEqual(["ended", "error", "frame", "ready"])
    const codes = new Set(server.map((e) => field(e.value, "code")).filter((c) => c !== undefined))
    // INTERNAL is in the table of refusals; every other code has an example frame.
    expect(Live.ErrorCode.literals.filter((c) => c !== "INTERNAL" && !codes.has(c))).toEqual([])
  })
})
