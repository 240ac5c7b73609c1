/**
 * The typed client as Promises, for code that does not use Effect. Every method rejects
 * with a `TroupeClientError` (its `code` says what happened).
 */
import { Cause, Effect, ExecutionStrategy, Exit, Scope, Stream } from "effect"
import type * as Edge from "../protocol/Edge.ts"
import type { DeregisterResult, Job, JobState, WorkerState } from "../protocol/Jobs.ts"
import * as Client from "./Client.ts"

/** A live subscription of the Promise client. */
export interface PromiseSubscription {
  /** How many stored events the gateway replayed when it was made. */
  readonly replayed: number
  /** End it (no more `onEvent` calls once this resolves). */
  close(): Promise<void>
}

/** Options of a Promise subscription. */
export interface PromiseSubscribeOptions {
  /** Replay what came after this event first. */
  readonly sinceEventId?: string
  /** Called once if the subscription ends on an error (e.g. the client gave up reconnecting), or if `onEvent` throws. */
  readonly onError?: (error: unknown) => void
}

/** A connected client. */
export interface PromiseClient {
  submit(job: Client.SubmitInput): Promise<Job>
  cancel(jobId: string, reason?: string): Promise<JobState>
  resume(jobId: string, resolution: Client.ResumeInput): Promise<JobState>
  get(jobId: string): Promise<Job>
  events(jobId: string, sinceEventId?: string): Promise<ReadonlyArray<Edge.EventRecord>>
  /** Resolves once the gateway has confirmed the subscription; `onEvent` sees every event once, in order, across reconnects. */
  subscribe(
    filter: Client.Filter,
    options: PromiseSubscribeOptions,
    onEvent: (event: Edge.EventRecord) => void
  ): Promise<PromiseSubscription>
  workers(): Promise<ReadonlyArray<Edge.MonitoredWorker>>
  drain(workerId: string, reason?: string): Promise<WorkerState>
  deregister(request: Client.DeregisterInput): Promise<DeregisterResult>
  ping(): Promise<void>
  /** Close the connection and every subscription. */
  close(): Promise<void>
}

/**
 * Connect to a gateway: resolves once the first connection answered a ping, rejects with
 * a `TroupeClientError` (`UNAUTHORIZED`, `DISCONNECTED` …) otherwise.
 */
export const connect = async (options: Client.Options): Promise<PromiseClient> => {
  const scope = Effect.runSync(Scope.make())
  const closeScope = () => run(Scope.close(scope, Exit.void))
  const client = Effect.runSync(Scope.extend(Client.make(options), scope))
  try {
    await run(client.ping())
  } catch (error) {
    await closeScope()
    throw error
  }
  return {
    submit: (job) => run(client.submit(job)),
    cancel: (jobId, reason) => run(client.cancel(jobId, reason)),
    resume: (jobId, resolution) => run(client.resume(jobId, resolution)),
    get: (jobId) => run(client.get(jobId)),
    events: (jobId, sinceEventId) => run(client.events(jobId, sinceEventId)),
    workers: () => run(client.workers()),
    drain: (workerId, reason) => run(client.drain(workerId, reason)),
    deregister: (request) => run(client.deregister(request)),
    ping: () => run(client.ping()),
    subscribe: (filter, subscribeOptions, onEvent) =>
      run(
        Effect.gen(function* () {
          const child = yield* Scope.fork(scope, ExecutionStrategy.sequential)
          const subscription = yield* Scope.extend(
            client.subscription(
              filter,
              subscribeOptions.sinceEventId === undefined
                ? {}
                : { sinceEventId: subscribeOptions.sinceEventId }
            ),
            child
          ).pipe(Effect.onError(() => Scope.close(child, Exit.void)))
          yield* Stream.runForEach(subscription.events, (event) => Effect.try(() => onEvent(event))).pipe(
            Effect.catchAll((error) => Effect.sync(() => subscribeOptions.onError?.(error))),
            Effect.forkIn(child)
          )
          return { replayed: subscription.replayed, close: () => run(Scope.close(child, Exit.void)) }
        })
      ),
    close: closeScope
  }
}

// --- internal ---

/** Run an effect; reject with its error itself (not a wrapper). */
const run = <A, E>(effect: Effect.Effect<A, E>): Promise<A> =>
  Effect.runPromiseExit(effect).then((exit) =>
    Exit.isSuccess(exit) ? exit.value : Promise.reject(Cause.squash(exit.cause))
  )
