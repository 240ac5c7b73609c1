/**
 * Plain-text tables for the CLI.
 */

/** Render rows as an aligned table with a header; `—` for null. */
export const table = (
  rows: ReadonlyArray<Record<string, unknown>>,
  columns?: ReadonlyArray<string>
): string => {
  if (rows.length === 0) return "(none)"
  const cols = columns ?? Object.keys(rows[0]!)
  const cell = (v: unknown): string =>
    v === null || v === undefined
      ? "—"
      : v instanceof Date
        ? v
            .toISOString()
            .replace("T", " ")
            .replace(/\.\d+Z$/, "Z")
        : typeof v === "object"
          ? JSON.stringify(v)
          : String(v)
  const data = rows.map((r) => cols.map((c) => cell(r[c]).replace(/\s+/g, " ").slice(0, 120)))
  const widths = cols.map((c, i) => Math.max(c.length, ...data.map((d) => d[i]!.length)))
  const line = (cells: ReadonlyArray<string>) =>
    cells
      .map((s, i) => s.padEnd(widths[i]!))
      .join("  ")
      .trimEnd()
  return [line(cols.map((c) => c.toUpperCase())), ...data.map(line)].join("\n")
}

/** How long ago a timestamp was, e.g. `3s ago`. */
export const ago = (d: Date | string | null): string | null => {
  if (d === null) return null
  const ms = Date.now() - new Date(d).getTime()
  if (ms < 1000) return "just now"
  if (ms < 60_000) return `${Math.round(ms / 1000)}s ago`
  if (ms < 3_600_000) return `${Math.round(ms / 60_000)}m ago`
  return `${Math.round(ms / 3_600_000)}h ago`
}
