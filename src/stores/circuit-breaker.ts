import { EventEmitter } from 'node:events';
import { isInfrastructureError, toConnectError } from '../errors.ts';

/**
 * closed: takes traffic. open: tripped automatically, no traffic until the
 * backoff ends. half-open: no client traffic; health checks probe it.
 * drained: held open by an operator until undrained.
 */
export type BreakerState = 'closed' | 'open' | 'half-open' | 'drained';

export interface CircuitBreakerOptions {
  /** Open after this many infrastructure failures in a row. Default 5. */
  readonly consecutiveFailures?: number | undefined;
  /** Open when this fraction of the requests in the window failed. Default 0.5. */
  readonly failureRatio?: number | undefined;
  /** Length of the sliding window for the failure ratio. Default 30 s. */
  readonly windowMs?: number | undefined;
  /** The ratio is only judged once the window holds this many requests. Default 20. */
  readonly minRequests?: number | undefined;
  /** Open after this many failed health checks in a row. Default 2. */
  readonly healthCheckFailures?: number | undefined;
  /** Successful probes (health checks) in a row needed to close from half-open. Default 3. */
  readonly closeAfterProbes?: number | undefined;
  /**
   * Open -> half-open delay of a first open, and of every reopen after a
   * failed probe (the shard is still down: keep probing it at this pace).
   * Default 1 s.
   */
  readonly backoffInitialMs?: number | undefined;
  /** Cap on the grown delay. Default 60 s. */
  readonly backoffMaxMs?: number | undefined;
  /** Growth factor per flap (an open soon after a close). Default 2. */
  readonly backoffMultiplier?: number | undefined;
  /**
   * How long the breaker must stay closed before the backoff shrinks back to
   * its initial value. Until then, opening again from closed grows it (the
   * shard is flapping). Default 5 min.
   */
  readonly backoffResetMs?: number | undefined;
  /** Clock in ms since the epoch; injectable for tests. Default Date.now. */
  readonly now?: (() => number) | undefined;
}

export interface BreakerTransition {
  readonly from: BreakerState;
  readonly to: BreakerState;
  readonly reason: string;
  /** True when an operator caused it (drain, undrain). */
  readonly manual: boolean;
  readonly at: number;
  /** For transitions to open: how long until half-open. */
  readonly backoffMs?: number;
}

export interface BreakerSnapshot {
  readonly state: BreakerState;
  /** True while held by an operator (drained). */
  readonly manual: boolean;
  /** When the current state began (ms since the epoch). */
  readonly since: number;
  readonly reason: string;
  readonly consecutiveFailures: number;
  readonly recentFailures: number;
  readonly recentRequests: number;
  /**
   * The delay the current open state uses; otherwise the one the next open
   * would use (closed: grown while the shard is flapping; half-open or
   * drained: the initial backoff a failed probe reopens it for).
   */
  readonly backoffMs: number;
  /** When an open breaker turns half-open; null in other states. */
  readonly halfOpenAt: number | null;
  readonly probeSuccesses: number;
}

const BUCKETS = 10;

/**
 * A per-shard circuit breaker fed by both passive signals (the outcome of
 * real requests) and active ones (health checks):
 *
 * - closed -> open after `consecutiveFailures` infrastructure failures in a
 *   row, or a failure ratio of at least `failureRatio` over `windowMs` once the
 *   window holds `minRequests`, or `healthCheckFailures` failed checks in a
 *   row. Only errors for which isInfrastructureError() holds count; NOT_FOUND,
 *   INVALID_ARGUMENT and the like are answers and count as successes.
 * - open -> half-open once the backoff has elapsed (evaluated lazily against
 *   the injectable clock, so no timers are owned here).
 * - half-open -> closed after `closeAfterProbes` successful probes in a row;
 *   a failed probe reopens it for `backoffInitialMs` only. Probes are health
 *   checks, never client traffic, so probing a dead shard costs next to
 *   nothing, and a shard that was down for an hour takes traffic again within
 *   about backoffInitialMs + closeAfterProbes health-check intervals of its
 *   return, not an hour-long backoff later.
 * - Hysteresis against flapping: an open from closed within `backoffResetMs`
 *   of the last close (the shard fell over again soon after it was
 *   readmitted) holds it open `backoffMultiplier` times longer than the
 *   previous such open, capped at `backoffMaxMs`; the grown hold stays until
 *   the breaker has been closed for `backoffResetMs`. Every readmission of a
 *   flapping shard is thus followed by a longer hold, so it is readmitted
 *   less and less often instead of bouncing traffic.
 * - drain() holds it in 'drained' (manual) whatever the signals say;
 *   undrain() moves it to half-open so probes confirm the shard before
 *   traffic returns.
 *
 * Every transition is emitted as a 'transition' event with its reason.
 *
 * Why not cockatiel (or opossum): cockatiel's CircuitBreakerPolicy has
 * consecutive and sampling breakers, an isolate() hold and a backoff for
 * halfOpenAfter, but it learns only from calls run through execute(), lets a
 * single trial call through half-open and closes on its first success, and
 * reads the wall clock directly. Active health checks as the half-open probe,
 * an M-successes close with a backoff that stays grown after closing, a drain
 * reported distinctly from an automatic open, and a test clock would all be
 * built around it rather than with it, so this small state machine is ours.
 */
export class CircuitBreaker extends EventEmitter<{ transition: [BreakerTransition] }> {
  readonly #now: () => number;
  readonly #consecutiveLimit: number;
  readonly #ratio: number;
  readonly #minRequests: number;
  readonly #healthLimit: number;
  readonly #closeAfter: number;
  readonly #initialMs: number;
  readonly #maxMs: number;
  readonly #multiplier: number;
  readonly #resetMs: number;
  readonly #bucketMs: number;

  #state: BreakerState = 'closed';
  #since: number;
  #reason = 'started';
  #consecutive = 0;
  #healthFailures = 0;
  #probeSuccesses = 0;
  // Flap level: how many times the hold of an open from closed has grown.
  // -1: never opened, or closed long enough to forget.
  #level = -1;
  #openUntil = 0;
  // The delay of the current (or last) open state.
  #openBackoffMs = 0;
  // Sliding window: bucket i counts the requests of epoch #epochs[i].
  readonly #epochs = new Array<number>(BUCKETS).fill(-1);
  readonly #requests = new Array<number>(BUCKETS).fill(0);
  readonly #failures = new Array<number>(BUCKETS).fill(0);

  constructor(opts: CircuitBreakerOptions = {}) {
    super();
    this.#now = opts.now ?? Date.now;
    this.#consecutiveLimit = positive(opts.consecutiveFailures ?? 5, 'consecutiveFailures');
    this.#ratio = opts.failureRatio ?? 0.5;
    if (!(this.#ratio > 0 && this.#ratio <= 1)) throw new RangeError(`failureRatio ${this.#ratio} is not in (0, 1]`);
    this.#minRequests = positive(opts.minRequests ?? 20, 'minRequests');
    this.#healthLimit = positive(opts.healthCheckFailures ?? 2, 'healthCheckFailures');
    this.#closeAfter = positive(opts.closeAfterProbes ?? 3, 'closeAfterProbes');
    this.#initialMs = positive(opts.backoffInitialMs ?? 1000, 'backoffInitialMs');
    this.#maxMs = Math.max(this.#initialMs, opts.backoffMaxMs ?? 60_000);
    this.#multiplier = Math.max(1, opts.backoffMultiplier ?? 2);
    this.#resetMs = Math.max(0, opts.backoffResetMs ?? 300_000);
    this.#bucketMs = Math.max(1, Math.ceil(positive(opts.windowMs ?? 30_000, 'windowMs') / BUCKETS));
    this.#since = this.#now();
  }

  /** The current state, after applying an elapsed backoff. */
  get state(): BreakerState {
    this.#refresh();
    return this.#state;
  }

  /** True when client traffic may go to the shard: only when closed. */
  allowsTraffic(): boolean {
    return this.state === 'closed';
  }

  /** A request got an answer (any answer that is not an infrastructure error). */
  recordSuccess(): void {
    if (this.state !== 'closed') return; // late answers from before an open prove nothing
    this.#consecutive = 0;
    this.#count(false);
  }

  /**
   * A request failed. Returns true if the error counted against the shard
   * (an infrastructure error while closed); other errors count as answers.
   */
  recordFailure(err: unknown): boolean {
    if (!isInfrastructureError(err)) {
      this.recordSuccess();
      return false;
    }
    if (this.state !== 'closed') return false;
    this.#consecutive++;
    this.#count(true);
    const detail = describeError(err);
    if (this.#consecutive >= this.#consecutiveLimit) {
      this.#open(`${this.#consecutive} consecutive infrastructure failures, last: ${detail}`);
    } else {
      const { requests, failures } = this.#window();
      if (requests >= this.#minRequests && failures >= this.#ratio * requests) {
        this.#open(`${failures} of ${requests} recent requests failed, last: ${detail}`);
      }
    }
    return true;
  }

  /**
   * Outcome of an active health check (or any deliberate probe). Failures
   * open a closed breaker after `healthCheckFailures` in a row and reopen a
   * half-open one at once; successes close a half-open breaker after
   * `closeAfterProbes` in a row. Ignored while open or drained.
   */
  recordHealthCheck(ok: boolean, detail = ''): void {
    const state = this.state;
    if (state === 'closed') {
      if (ok) {
        this.#healthFailures = 0;
        return;
      }
      this.#healthFailures++;
      if (this.#healthFailures >= this.#healthLimit) {
        this.#open(`${this.#healthFailures} failed health checks${detail ? `, last: ${detail}` : ''}`);
      }
    } else if (state === 'half-open') {
      if (!ok) {
        this.#open(`probe failed in half-open${detail ? `: ${detail}` : ''}`);
        return;
      }
      this.#probeSuccesses++;
      if (this.#probeSuccesses >= this.#closeAfter) {
        this.#transition('closed', `${this.#probeSuccesses} successful probes`, false);
      }
    }
  }

  /** Holds the breaker open until undrain(), whatever the signals say. */
  drain(reason = 'drained by operator'): void {
    if (this.state === 'drained') return;
    this.#transition('drained', reason, true);
  }

  /** Ends a drain: the shard goes half-open and must pass probes to close. */
  undrain(reason = 'undrained by operator'): void {
    if (this.state !== 'drained') return;
    this.#transition('half-open', reason, true);
  }

  snapshot(): BreakerSnapshot {
    const state = this.state;
    const { requests, failures } = this.#window();
    return {
      state,
      manual: state === 'drained',
      since: this.#since,
      reason: this.#reason,
      consecutiveFailures: this.#consecutive,
      recentFailures: failures,
      recentRequests: requests,
      backoffMs: state === 'open' ? this.#openBackoffMs : state === 'closed' ? this.#backoffMs(this.#nextLevel()) : this.#initialMs,
      halfOpenAt: state === 'open' ? this.#openUntil : null,
      probeSuccesses: this.#probeSuccesses,
    };
  }

  #refresh(): void {
    if (this.#state === 'open' && this.#now() >= this.#openUntil) {
      this.#transition('half-open', `backoff of ${this.#openBackoffMs} ms elapsed`, false);
    }
  }

  #open(reason: string): void {
    let backoffMs: number;
    if (this.#state === 'closed') {
      this.#level = this.#nextLevel();
      backoffMs = this.#backoffMs(this.#level);
    } else {
      // A failed probe: the shard is still down, which is no reason to wait
      // longer for it (probes are cheap); the flap level is kept.
      backoffMs = this.#initialMs;
    }
    this.#openBackoffMs = backoffMs;
    this.#openUntil = this.#now() + backoffMs;
    this.#transition('open', reason, false, backoffMs);
  }

  // The flap level an open from closed would use now: the first open (or
  // one after a long quiet period closed) starts at 0; falling over again
  // soon after closing grows it.
  #nextLevel(): number {
    if (this.#level < 0) return 0;
    if (this.#now() - this.#since >= this.#resetMs) return 0;
    return this.#level + 1;
  }

  #backoffMs(level: number): number {
    return Math.min(this.#maxMs, Math.round(this.#initialMs * this.#multiplier ** Math.max(0, level)));
  }

  #transition(to: BreakerState, reason: string, manual: boolean, backoffMs?: number): void {
    const from = this.#state;
    const at = this.#now();
    this.#state = to;
    this.#since = at;
    this.#reason = reason;
    this.#probeSuccesses = 0;
    this.#healthFailures = 0;
    if (to === 'closed') {
      // Failures from before the open must not trip it again.
      this.#consecutive = 0;
      this.#epochs.fill(-1);
    }
    const event: BreakerTransition = backoffMs === undefined
      ? { from, to, reason, manual, at }
      : { from, to, reason, manual, at, backoffMs };
    this.emit('transition', event);
  }

  #count(failed: boolean): void {
    const epoch = Math.floor(this.#now() / this.#bucketMs);
    const i = epoch % BUCKETS;
    if (this.#epochs[i] !== epoch) {
      this.#epochs[i] = epoch;
      this.#requests[i] = 0;
      this.#failures[i] = 0;
    }
    this.#requests[i]!++;
    if (failed) this.#failures[i]!++;
  }

  #window(): { requests: number; failures: number } {
    const epoch = Math.floor(this.#now() / this.#bucketMs);
    let requests = 0;
    let failures = 0;
    for (let i = 0; i < BUCKETS; i++) {
      if (this.#epochs[i]! > epoch - BUCKETS) {
        requests += this.#requests[i]!;
        failures += this.#failures[i]!;
      }
    }
    return { requests, failures };
  }
}

function positive(n: number, what: string): number {
  if (!(n > 0)) throw new RangeError(`${what} ${n} must be positive`);
  return n;
}

function describeError(err: unknown): string {
  return toConnectError(err).message;
}
