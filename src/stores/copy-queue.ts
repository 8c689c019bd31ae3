import { Code } from '@connectrpc/connect';
import type { Digest } from '../digest.ts';
import { isCode, isInfrastructureError } from '../errors.ts';
import { namespacedKey } from './blob-store.ts';

/**
 * What a full CopyQueue does when one more item is added; the item given up
 * is counted as `overflow`. For replication, the write itself has already
 * succeeded on the primary either way; only its copy to the secondary is lost.
 * - drop-oldest: the oldest waiting item makes room. Recent blobs are the
 *   ones a build is most likely to read next, so they get the backup.
 * - reject-new: the new item is not queued; older ones keep their place.
 */
export type OverflowPolicy = 'drop-oldest' | 'reject-new';

/** Outcome of one background copy: copied, or the source no longer has it. */
export type CopyOutcome = 'done' | 'vanished';

export interface CopyJob {
  /** namespacedKey(digest, namespace). */
  readonly key: string;
  readonly digest: Digest;
  /** The AC namespace the copy reads and writes in ("" for the CAS and the default namespace). */
  readonly namespace: string;
  /** The journal version being replayed; 0 for replication and repair. */
  seq: number;
  /** The newest version added while this job was in flight. */
  nextSeq: number;
  readonly enqueuedAt: number;
  attempts: number;
  /** NOT_FOUND answers from a source whose every shard was taking traffic (see FallbackStore's replays). */
  notFound: number;
  /** Added again while in flight: run once more afterwards (AC values can change). */
  again: boolean;
  timer: NodeJS.Timeout | undefined;
}

export interface CopyQueueOptions {
  readonly maxQueue: number;
  readonly concurrency: number;
  readonly overflow: OverflowPolicy;
  readonly maxAttempts: number;
  readonly retryInitialMs: number;
  readonly retryMaxMs: number;
  readonly timeoutMs: number;
  readonly signal: AbortSignal;
  /** Jobs start only while this holds (the primary is up). */
  readonly canRun: () => boolean;
  readonly run: (job: CopyJob, signal: AbortSignal) => Promise<CopyOutcome>;
  readonly onGiveUp: (job: CopyJob, err: unknown) => void;
  /** Called once per item given up for overflow (the dropped oldest, or the rejected new one). */
  readonly onOverflow?: ((given: Digest, namespace: string) => void) | undefined;
}

export interface CopyQueueStats {
  readonly queued: number;
  readonly inFlight: number;
  readonly done: number;
  readonly failed: number;
  readonly vanished: number;
  readonly overflow: number;
  readonly lagMs: number;
}

/**
 * A bounded, deduplicated queue of background copies with a concurrency
 * limit and retries with backoff. Jobs name a digest (and, for the AC, its
 * namespace: the same action in two namespaces is two jobs) only: the bytes
 * are streamed from the source when the job runs.
 */
export class CopyQueue {
  readonly overflowPolicy: OverflowPolicy;
  readonly #o: CopyQueueOptions;
  // Every waiting job (ready or backing off), in the order queued.
  readonly #pending = new Map<string, CopyJob>();
  // The waiting jobs that may start now, oldest first.
  readonly #ready = new Map<string, CopyJob>();
  readonly #inFlight = new Map<string, CopyJob>();
  readonly #running = new Set<Promise<void>>();
  #done = 0;
  #failed = 0;
  #vanished = 0;
  #overflow = 0;

  constructor(o: CopyQueueOptions) {
    this.#o = o;
    this.overflowPolicy = o.overflow;
  }

  /** Queues a copy of `digest` in `namespace`; false if it was refused for overflow. */
  add(digest: Digest, seq: number, namespace = ''): boolean {
    if (this.#o.signal.aborted) return false;
    const key = namespacedKey(digest, namespace);
    const running = this.#inFlight.get(key);
    if (running !== undefined) {
      // Its copy may predate this version: it keeps deleting only its own
      // version, and the new one runs afterwards.
      running.again = true;
      if (seq > running.nextSeq) running.nextSeq = seq;
      return true;
    }
    const waiting = this.#pending.get(key);
    if (waiting !== undefined) {
      if (seq > waiting.seq) waiting.seq = seq;
      return true;
    }
    if (this.#pending.size >= this.#o.maxQueue) {
      this.#overflow++;
      if (this.#o.overflow === 'reject-new') {
        this.#o.onOverflow?.(digest, namespace);
        return false;
      }
      const oldest = this.#pending.values().next().value!;
      this.#unqueue(oldest);
      this.#o.onOverflow?.(oldest.digest, oldest.namespace);
    }
    const job: CopyJob = { key, digest, namespace, seq, nextSeq: seq, enqueuedAt: Date.now(), attempts: 0, notFound: 0, again: false, timer: undefined };
    this.#pending.set(key, job);
    this.#ready.set(key, job);
    this.pump();
    return true;
  }

  /** Forgets a waiting job (not one in flight); `key` as in CopyJob. */
  remove(key: string): void {
    const job = this.#pending.get(key);
    if (job !== undefined) this.#unqueue(job);
  }

  /** Starts ready jobs up to the concurrency limit. */
  pump(): void {
    while (
      !this.#o.signal.aborted
      && this.#inFlight.size < this.#o.concurrency
      && this.#ready.size > 0
      && this.#o.canRun()
    ) {
      const job = this.#ready.values().next().value!;
      this.#unqueue(job);
      this.#inFlight.set(job.key, job);
      const p = this.#runJob(job).finally(() => this.#running.delete(p));
      this.#running.add(p);
    }
  }

  stats(): CopyQueueStats {
    const now = Date.now();
    let oldest = now;
    for (const j of this.#pending.values()) oldest = Math.min(oldest, j.enqueuedAt);
    for (const j of this.#inFlight.values()) oldest = Math.min(oldest, j.enqueuedAt);
    return {
      queued: this.#pending.size,
      inFlight: this.#inFlight.size,
      done: this.#done,
      failed: this.#failed,
      vanished: this.#vanished,
      overflow: this.#overflow,
      lagMs: now - oldest,
    };
  }

  /** Waits for jobs in flight (aborted by the shared signal) and drops the rest. */
  async close(): Promise<void> {
    for (const job of this.#pending.values()) clearTimeout(job.timer);
    this.#pending.clear();
    this.#ready.clear();
    await Promise.allSettled([...this.#running]);
  }

  #unqueue(job: CopyJob): void {
    clearTimeout(job.timer);
    job.timer = undefined;
    this.#pending.delete(job.key);
    this.#ready.delete(job.key);
  }

  async #runJob(job: CopyJob): Promise<void> {
    job.attempts++;
    job.again = false;
    const signal = AbortSignal.any([this.#o.signal, AbortSignal.timeout(this.#o.timeoutMs)]);
    let retry = false;
    try {
      const outcome = await this.#o.run(job, signal);
      if (outcome === 'done') this.#done++;
      else this.#vanished++;
    } catch (err) {
      if (this.#o.signal.aborted) return;
      const retryable = isInfrastructureError(err) || isCode(err, Code.NotFound) || isCode(err, Code.Canceled);
      if (retryable && job.attempts < this.#o.maxAttempts) {
        retry = true;
      } else {
        this.#failed++;
        this.#o.onGiveUp(job, err);
      }
    } finally {
      this.#inFlight.delete(job.key);
    }
    if (this.#o.signal.aborted) return;
    if (retry) {
      // The retry reads the source afresh, so it covers any newer version.
      job.seq = Math.max(job.seq, job.nextSeq);
      job.again = false;
      this.#pending.set(job.key, job);
      job.timer = setTimeout(() => {
        job.timer = undefined;
        if (this.#pending.get(job.key) !== job) return;
        this.#ready.set(job.key, job);
        this.pump();
      }, backoffMs(job.attempts, this.#o.retryInitialMs, this.#o.retryMaxMs));
      job.timer.unref();
    } else if (job.again) {
      this.add(job.digest, job.nextSeq, job.namespace);
    }
    this.pump();
  }
}

function backoffMs(attempt: number, initialMs: number, maxMs: number): number {
  const base = Math.min(maxMs, initialMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(base * (0.5 + Math.random() / 2));
}
