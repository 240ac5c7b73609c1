/**
 * The layout's one rule, checked on the sources: imports run downward only,
 * protocol ← runtime (db ← core ← jobs) ← actors, browser, handlers ← edge ← worker, cli; `src/protocol/`
 * imports nothing but `effect`. A new import that runs upward fails here with its file and line.
 */
import { describe, expect, it } from "@effect/vitest"
import * as Fs from "node:fs"
import * as Path from "node:path"
import * as Url from "node:url"

const src = Path.resolve(Path.dirname(Url.fileURLToPath(import.meta.url)), "../../src")

/** The level of a file under src/ (higher may import lower, never the reverse). */
const levelOf = (file: string): number => {
  const rel = Path.relative(src, file).split(Path.sep)
  switch (rel[0]) {
    case "protocol":
      return 0
    case "runtime":
      return rel[1] === "db" ? 1 : rel[1] === "core" ? 2 : rel[1] === "jobs" ? 3 : 1
    case "actors":
    case "browser":
    case "handlers":
      return 4
    case "edge":
      return 5
    case "client":
      return 1
    case "worker":
      return 6
    case "cli":
      return 7
    default:
      return 8
  }
}

const sources = (dir: string): Array<string> =>
  Fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(Path.join(dir, e.name)) : e.name.endsWith(".ts") ? [Path.join(dir, e.name)] : []
  )

/** Every module a static `import … from` or `export … from` of the file names, with its line. */
const importsOf = (file: string) => {
  const lines = Fs.readFileSync(file, "utf8").split("\n")
  const found: Array<{ spec: string; line: number }> = []
  for (let i = 0; i < lines.length; i++) {
    if (!/^(import|export)\b/.test(lines[i]!)) continue
    // A statement over several lines (`import {` … `} from "x"`) ends at its closing brace.
    let j = i
    if (/\{$/.test(lines[i]!)) while (j < lines.length - 1 && !/^\}/.test(lines[j]!)) j++
    const m = /\bfrom\s+"([^"]+)"|^import\s+"([^"]+)"/.exec(lines[j]!)
    if (m !== null) found.push({ spec: (m[1] ?? m[2])!, line: i + 1 })
    i = j
  }
  return found
}

describe("layout", () => {
  it("no import runs upward", () => {
    const upward: Array<string> = []
    for (const file of sources(src)) {
      for (const { spec, line } of importsOf(file)) {
        if (!spec.startsWith(".")) continue
        const target = Path.resolve(Path.dirname(file), spec)
        if (!target.startsWith(src + Path.sep)) continue
        // Within one folder level (e.g. runtime/Config.ts beside runtime/db) only the named order counts.
        if (levelOf(target) > levelOf(file)) {
          upward.push(`${Path.relative(src, file)}:${line} imports ${Path.relative(src, target)}`)
        }
      }
    }
    expect(upward).toEqual([])
  })

  it("src/protocol imports nothing but effect and itself", () => {
    const foreign = sources(Path.join(src, "protocol")).flatMap((file) =>
      importsOf(file)
        .filter(({ spec }) => spec !== "effect" && !spec.startsWith("./"))
        .map(({ spec, line }) => `${Path.basename(file)}:${line} imports ${spec}`)
    )
    expect(foreign).toEqual([])
  })
})
