/**
 * `/metrics` as prom-client renders it, without a database: the routing-latency histogram
 * read from the core histogram at each scrape, and the door's own gauge text in the same
 * format as the registry's gauges.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Prometheus from "prom-client"
import * as Histogram from "../../src/runtime/core/Histogram.ts"
import * as Monitoring from "../../src/runtime/jobs/Monitoring.ts"

const scrape = (registry: Prometheus.Registry) => Effect.promise(() => registry.metrics())

describe("Monitoring's Prometheus exporter", () => {
  it.effect("a core histogram is served as it stands at each scrape, as its own renderer writes it", () =>
    Effect.gen(function* () {
      const h = Histogram.make([0.001, 0.0025, 1])
      const help = "Latency with a \\ and a\nnewline."
      const registry = new Prometheus.Registry()
      Monitoring.registerHistogram(registry, "t_latency_seconds", help, h)

      const empty = yield* scrape(registry)
      expect(empty).toContain('t_latency_seconds_bucket{le="+Inf"} 0\n')
      expect(empty).toContain("t_latency_seconds_count 0\n")

      for (const v of [0.0005, 0.002, 0.002, 0.5, 3]) h.observe(v)
      const text = yield* scrape(registry)
      // The core's renderer escapes nothing in HELP; prom-client escapes \ and newline.
      expect(text).toBe(
        Histogram.render("t_latency_seconds", help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n"), h)
      )
      expect(text).toContain('t_latency_seconds_bucket{le="0.0025"} 3\n')
      expect(text).toContain('t_latency_seconds_bucket{le="+Inf"} 5\n')
      expect(text).toContain("t_latency_seconds_count 5\n")
      // Nothing leaks into prom-client's global registry.
      expect(yield* Effect.promise(() => Prometheus.register.metrics())).not.toContain("t_latency_seconds")
    })
  )

  it.effect("the door's gauge text matches a registry gauge's, escapes included", () =>
    Effect.gen(function* () {
      const registry = new Prometheus.Registry()
      const labels = { node: 'ghost "node"\\with\nnewline' }
      new Prometheus.Gauge({
        name: "t_depth",
        help: "Depth\\per\nnode.",
        labelNames: ["node"],
        registers: [registry]
      }).set(labels, 2)
      expect(Monitoring.gauge("t_depth", "Depth\\per\nnode.", [[labels, 2]])).toBe(yield* scrape(registry))
    })
  )
})
