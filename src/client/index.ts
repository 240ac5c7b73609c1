/**
 * `troupe/client`: the typed client of the gateway's protocol v1. `Client` is the Effect
 * API (`Client.make`, `Client.layer`); `connect` is the Promise facade. See `docs/CLIENT.md`.
 */
export * as Client from "./Client.ts"
export {
  type DeregisterInput,
  type Filter,
  type Options,
  type ResumeInput,
  type SubmitInput,
  type Subscription,
  TroupeClient,
  TroupeClientError
} from "./Client.ts"
export {
  connect,
  type PromiseClient,
  type PromiseSubscribeOptions,
  type PromiseSubscription
} from "./Promise.ts"
export type { EventRecord, MonitoredWorker } from "../protocol/Edge.ts"
export type { DeregisterResult, Job, JobState, WorkerState } from "../protocol/Jobs.ts"
