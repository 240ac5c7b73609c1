/**
 * A worker's slot accounting, in one place: handlers running (`busy`), slots on offer to
 * submits (`offered`, and `spent` ones not yet taken off), attempts already started here
 * (`seen`), what the claim loop is asked to do next, and the worker's counters.
 *
 * Everything here is synchronous: the claim loop, a NOTIFY callback and a run's end all
 * change it without yielding in between, so two paths cannot start one attempt twice.
 */
import { type Duration, Effect } from "effect"
import { makeWake, type Wake } from "../../runtime/core/internal/loop.ts"

/** Counters of a worker. */
export interface Counters {
  /** Claim statements sent (each claims up to the free slots). */
  claims: number
  claimed: number
  /** Jobs a submit handed to this worker directly (a slot it had on offer), no claim. */
  handed: number
  completed: number
  failed: number
  cancelled: number
  abandoned: number
}

/** The slots of one worker. */
export class Slots {
  /**
   * Handlers running now: a slot frees when the handler returns, before its end is recorded,
   * so claiming overlaps with recording (measured: claim → run → record in series capped
   * no-op throughput at ~3.8k jobs/s).
   */
  busy = 0
  /**
   * Slots on offer (`job_offers`) and not yet withdrawn, or taken by a submit whose job has
   * not arrived here yet: busy + offered never exceeds `max`.
   */
  offered = 0
  /**
   * Offers spent by jobs started from their NOTIFY, not yet taken off `offered`: the claim
   * loop does that (`settleSpent`), after the bookkeeping of the claim that lent them, which
   * its reply may bring after the NOTIFY. Until then the slot counts twice (busy and
   * offered), so a claim asks for less, never more.
   */
  spent = 0
  /** The claim loop should claim. */
  claimWanted = false
  /** The claim loop should catch up (take back the offers, start what was handed here). */
  reconcileWanted = false
  readonly counters: Counters = {
    claims: 0,
    claimed: 0,
    handed: 0,
    completed: 0,
    failed: 0,
    cancelled: 0,
    abandoned: 0
  }
  // Attempts started here (or cancelled here before they started), newest last: a handed
  // job is started once, whether its NOTIFY or a catch-up brings it first.
  private readonly seen = new Set<string>()

  constructor(
    /** `MAX_CONCURRENT_JOBS`. */
    readonly max: number,
    private readonly wakeLatch: Wake
  ) {}

  /** Slots neither running a handler nor on offer. */
  free(): number {
    return this.max - this.busy - this.offered
  }

  /** Ask the claim loop to claim. */
  wake(): void {
    this.claimWanted = true
    this.wakeLatch.signal()
  }

  /** Ask the claim loop to catch up, then claim. */
  reconcile(): void {
    this.reconcileWanted = true
    this.wake()
  }

  /** Run the claim loop without asking for a claim (handed jobs to start, spent offers). */
  signal(): void {
    this.wakeLatch.signal()
  }

  /** Wait for the next signal, at most this long. */
  signalled(atMost: Duration.DurationInput): Effect.Effect<void> {
    return this.wakeLatch.awaitAtMost(atMost)
  }

  /** Take the spent offers off `offered` (the claim loop, between claims). */
  settleSpent(): void {
    this.offered = Math.max(0, this.offered - this.spent)
    this.spent = 0
  }

  /** Whether this attempt was started (or cancelled) here. */
  isSeen(jobId: string, epoch: number): boolean {
    return this.seen.has(`${jobId}:${epoch}`)
  }

  /** Remember this attempt as started (or cancelled) here. */
  markSeen(jobId: string, epoch: number): void {
    this.seen.add(`${jobId}:${epoch}`)
    if (this.seen.size > seenLimit) this.seen.delete(this.seen.values().next().value!)
  }
}

/** Slots for a worker of `max` concurrent jobs. */
export const make = (max: number): Effect.Effect<Slots> =>
  Effect.map(makeWake, (wake) => new Slots(Math.max(1, max), wake))

// --- internal ---

const seenLimit = 10_000
