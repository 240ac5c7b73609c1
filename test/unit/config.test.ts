import { describe, expect, it } from "@effect/vitest"
import { ConfigProvider, Effect } from "effect"
import { DeploymentConfig } from "../../src/runtime/Config.ts"

const read = (env: Record<string, string>) =>
  DeploymentConfig.pipe(Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(env)))))

describe("DeploymentConfig (what /health reports, gateway and worker alike)", () => {
  it.effect("TROUPE_ENV wins over NODE_ENV; COMMIT_SHA as given", () =>
    Effect.gen(function* () {
      expect(yield* read({ TROUPE_ENV: "staging", NODE_ENV: "production", COMMIT_SHA: "0123abcd" })).toEqual({
        environment: "staging",
        commitSha: "0123abcd"
      })
      expect(yield* read({ NODE_ENV: "production" })).toEqual({
        environment: "production",
        commitSha: "unknown"
      })
      expect(yield* read({})).toEqual({ environment: "development", commitSha: "unknown" })
    })
  )
})
