import { join } from 'node:path';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Logger } from 'pino';
import type { Digest } from '../digest.ts';
import { digestKey, digestString } from '../digest.ts';
import { DurableLog, DurableLogFullError } from '../durable-log.ts';
import { isCode, isInfrastructureError, throwIfAborted, toConnectError, withPrefix } from '../errors.ts';
import { allShardsClosed } from '../readiness.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';
import { namespacedKey, namespacedName } from './blob-store.ts';
import type { BreakerTransition, CircuitBreakerOptions } from './circuit-breaker.ts';
import { CircuitBreaker } from './circuit-breaker.ts';
import type { CopyJob, CopyOutcome, CopyQueueOptions, OverflowPolicy } from './copy-queue.ts';
import { CopyQueue } from './copy-queue.ts';
import { ReplayableUpload, TeeUpload } from './replayable-upload.ts';

export type { OverflowPolicy } from './copy-queue.ts';

/**
 * When a write is acknowledged. `async`: once the primary holds it (the
 * secondary gets it by background replication). `sync`: once both sides hold
 * it, or, while one side is down, once the other holds it and the write is
 * journaled durably for the missing side. See FallbackStore.
 */
export type Durability = 'sync' | 'async';

export interface ReplicationOptions {
  /** Most items waiting (in flight not counted). Default 10,000. */
  readonly maxQueue?: number | undefined;
  /** Copies running at once. Default 4. */
  readonly concurrency?: number | undefined;
  /** Default 'drop-oldest'. */
  readonly overflow?: OverflowPolicy | undefined;
  /** Attempts per blob before it is counted failed. Default 8. */
  readonly maxAttempts?: number | undefined;
  /** First retry delay; doubles per attempt, with jitter. Default 500 ms. */
  readonly retryInitialMs?: number | undefined;
  /** Cap on the retry delay. Default 30 s. */
  readonly retryMaxMs?: number | undefined;
}

export interface RepairOptions {
  /** Most read repairs waiting; further ones are dropped (and counted). Default 1,000. */
  readonly maxQueue?: number | undefined;
  /** Default 2. */
  readonly concurrency?: number | undefined;
}

export interface ReplayOptions {
  /** Journal entries replayed to the primary at once. Default 4. */
  readonly concurrency?: number | undefined;
  /** Default 500 ms, doubling to retryMaxMs. Infrastructure errors retry forever. */
  readonly retryInitialMs?: number | undefined;
  /** Default 30 s. */
  readonly retryMaxMs?: number | undefined;
  /**
   * Times the secondary may answer NOT_FOUND for a journaled blob (which the
   * primary lacks too) before the entry is given up and counted `lost`.
   * Default 3.
   */
  readonly maxNotFound?: number | undefined;
}

/** What the journal records per write accepted by the secondary while the primary was down. */
export interface JournalRecord {
  readonly hash: string;
  readonly size: number;
  /** When the secondary accepted it (ms since the epoch). */
  readonly at: number;
  /**
   * The AC namespace it was written in; absent for the default namespace ""
   * (and in every record written before namespaces existed, which so replay
   * as ""). The record's key is namespacedKey(digest, ns).
   */
  readonly ns?: string | undefined;
}

export interface FallbackStoreOptions {
  readonly primary: BlobStore;
  readonly secondary: BlobStore;
  /** The catch-up journal; owned (closed by close()). See FallbackStore.open(). */
  readonly journal: DurableLog<JournalRecord>;
  /**
   * Sync mode: the journal of writes only the primary holds (the secondary
   * was down or failed them), replayed to the secondary; owned. Required
   * when durability is 'sync'.
   */
  readonly secondaryJournal?: DurableLog<JournalRecord> | undefined;
  readonly replication?: ReplicationOptions | undefined;
  readonly repair?: RepairOptions | undefined;
  readonly replay?: ReplayOptions | undefined;
  /** Options of the primary's breaker. */
  readonly breaker?: CircuitBreakerOptions | undefined;
  /**
   * Active health check of the primary (e.g. the remote store's
   * healthCheck()); resolves when healthy. Without one, a FindMissing of a
   * digest nobody has serves as the probe: any answer proves the primary up.
   */
  readonly primaryHealthCheck?: ((signal: AbortSignal) => Promise<unknown>) | undefined;
  /** Default 'async'. See FallbackStore, "Durability". */
  readonly durability?: Durability | undefined;
  /**
   * Sync mode only: the secondary's active health check, as primaryHealthCheck
   * (default: a FindMissing probe). Its breaker uses the `breaker` options too.
   */
  readonly secondaryHealthCheck?: ((signal: AbortSignal) => Promise<unknown>) | undefined;
  /**
   * Sync mode: bytes the faster side of a dual write may read ahead of the
   * slower one (what the tee holds at most, plus a chunk). Default 1 MiB.
   */
  readonly teeWindowBytes?: number | undefined;
  /** Default 2 s. */
  readonly healthCheckIntervalMs?: number | undefined;
  /** Default 2 s. */
  readonly healthCheckTimeoutMs?: number | undefined;
  /**
   * Bytes of an upload held in memory so that it can be replayed to the
   * secondary if the primary fails after it began consuming it. Uploads
   * larger than this are not failed over mid-stream. 0 disables. Default 1 MiB.
   */
  readonly failoverBufferBytes?: number | undefined;
  /** Deadline of one background copy (replication, replay, repair). Default 5 min. */
  readonly backgroundTimeoutMs?: number | undefined;
  /**
   * Deadline for asking the secondary, with the primary healthy, about what
   * the primary lacks (FindMissing). On failure or timeout the secondary is
   * left out of FindMissing for `secondaryLookupCooldownMs`. Default 2 s.
   */
  readonly secondaryLookupTimeoutMs?: number | undefined;
  /** Default 5 s. */
  readonly secondaryLookupCooldownMs?: number | undefined;
  readonly logger?: Logger | undefined;
}

export interface FallbackStoreOpenOptions extends Omit<FallbackStoreOptions, 'journal'> {
  /** Directory of the catch-up journal. Give the CAS and AC trees different ones. */
  readonly journalDir: string;
  /** Bound on the journal; further failover writes are refused. Default 1,000,000. */
  readonly maxJournalEntries?: number | undefined;
}

export const JOURNAL_FILE = 'fallback-journal.jsonl';
/** Sync mode: writes the secondary is owed (only the primary holds them). */
export const SECONDARY_JOURNAL_FILE = 'fallback-journal-secondary.jsonl';

/** At most one replication-overflow log line per this interval (the first is logged at once). */
export const OVERFLOW_LOG_INTERVAL_MS = 10_000;

// No store holds this (its size does not match the hash of any content we
// know), so a FindMissing for it is a cheap, answer-only probe.
const PROBE_DIGEST: Digest = Object.freeze({ hash: '0'.repeat(64), size: 1 });

/**
 * A primary and a secondary backend (any store trees: sharding, remote,
 * disk) that keep serving while the primary is down, as it is during every
 * StatefulSet rollout, without losing an acknowledged blob.
 *
 * - Healthy primary: reads and writes go to it, and every write it accepted
 *   is queued for replication to the secondary. The queue is bounded and
 *   deduplicated by digest, runs `concurrency` copies at once, streams each
 *   blob from the primary when its turn comes (it never holds blob bytes),
 *   retries with backoff, and drops (counting `vanished`) a blob the primary
 *   no longer has. Overflow follows `replication.overflow` and is counted.
 * - Primary unavailable (its breaker open, or an infrastructure error on the
 *   call itself): the request goes to the secondary within the same call
 *   where that is safe. Reads: always, since get() rejects before the first
 *   byte; a stream that fails later fails (we do not splice a stream from
 *   two backends: for the AC they may hold different values). FindMissing:
 *   always. Writes: see "Write failover" below.
 * - Catch-up: a write the secondary accepted on the primary's behalf is
 *   journaled durably (fsync'd, group-committed) before put() resolves, and
 *   replayed to the primary (secondary -> primary) once it is healthy again,
 *   also after an edge restart. An entry leaves the journal only once the
 *   primary accepted the blob (or, counted as `lost`, when neither backend
 *   has it any more, or the blob is rejected as invalid).
 * - Read repair: NOT_FOUND on the primary falls back to the secondary, and a
 *   blob found there is copied back to the primary in the background
 *   (bounded, deduplicated). With the journal this refills a primary that
 *   came back empty: the journal for what was written while it was down,
 *   read repair for what it had lost from before.
 * - Health: every primary outcome feeds a CircuitBreaker (only
 *   infrastructure errors count against it). A periodic active check (the
 *   given primaryHealthCheck, else a FindMissing probe) catches a primary
 *   that is dead or blackholed before clients find out, and is the half-open
 *   probe: client traffic returns only after `closeAfterProbes` successes.
 *
 * Write failover: a put fails over to the secondary only if nothing the
 * primary consumed would be lost, i.e. the primary pulled no chunk, or every
 * chunk it pulled is still held in a small per-upload buffer
 * (`failoverBufferBytes`, 1 MiB: BatchUpdateBlobs entries and most ByteStream
 * uploads). Otherwise the infrastructure error propagates and the client
 * retries the upload (Bazel retries UNAVAILABLE), which lands on the
 * secondary once the breaker has opened. We do not spool uploads to disk for
 * this: every write would pay for a rare failure, and the client already
 * holds the bytes.
 *
 * FindMissing rule: a blob is reported present only if a read through this
 * store returns it.
 * - Primary healthy: missing = missing(primary) ∩ missing(secondary). Reads
 *   fall back to the secondary on NOT_FOUND, so a blob only the secondary
 *   has is readable; it is queued for read repair, since Bazel may now skip
 *   uploading it and rely on it. The secondary is asked only about what the
 *   primary lacks, so the usual (all present) case costs one call. If the
 *   secondary cannot answer, what the primary lacks is reported missing:
 *   an extra upload is cheap, a false "present" breaks a build.
 * - Primary unavailable: the secondary alone answers, since reads go there.
 * - The catch: a blob the primary vouched for but had not yet replicated
 *   becomes unreadable if the primary dies right after (until it returns);
 *   reads then answer NOT_FOUND, on which Bazel re-uploads or reruns the
 *   action. Durability "sync" (below) closes that window.
 *
 * Durability "sync": a put goes to both sides at once, teed from one read of
 * the client's stream (TeeUpload: the slower side sets the pace, at most
 * `teeWindowBytes` held), and is acknowledged only when both hold it. With
 * one side's breaker open (the secondary has its own breaker and health
 * check in this mode) the put goes to the other alone and is journaled
 * durably for the missing side before it is acknowledged: the existing
 * journal for the primary, a second one for the secondary, each replayed
 * when its side is back. A side that fails mid-write with an infrastructure
 * error (or is cut off because its breaker opened) while the other succeeded
 * is treated the same way: journaled, then acknowledged. An acknowledged
 * write is thus on both sides, or on one side plus a journal entry for the
 * other; describe() reports `copies` and `oneCopy` (why only one), which
 * /readyz and the admin page show.
 *
 * For the AC (mutable values) the copies can race: a replay or repair in
 * flight can overwrite a newer value with an older one. A write the primary
 * accepts removes the key's pending journal entry to keep that window small;
 * an older ActionResult for the same action is still a valid one. AC
 * namespaces (CallOptions.namespace) are kept apart throughout: replication,
 * repair and replay jobs, and journal records (`ns`, absent for the default
 * namespace, so journals of earlier versions replay as ""), each carry the
 * namespace of the write they copy.
 *
 * Config (the CAS and AC trees each need their own journalDir):
 * ```json
 * {"fallback": {
 *   "primary": {"sharding": {...}},
 *   "secondary": {"remote": {...}},
 *   "replication": {"maxQueue": 10000, "concurrency": 4, "overflow": "drop-oldest"},
 *   "journalDir": "data/edge/journal"
 * }}
 * ```
 */
export class FallbackStore implements BlobStore {
  readonly #primary: BlobStore;
  readonly #secondary: BlobStore;
  readonly #journal: DurableLog<JournalRecord>;
  readonly #breaker: CircuitBreaker;
  readonly #check: (signal: AbortSignal) => Promise<unknown>;
  readonly #healthIntervalMs: number;
  readonly #healthTimeoutMs: number;
  readonly #failoverBufferBytes: number;
  readonly #log: Logger | undefined;
  readonly #closing = new AbortController();
  readonly #replication: CopyQueue;
  readonly #replay: CopyQueue;
  readonly #repairs: CopyQueue;
  #healthTimer: NodeJS.Timeout | undefined;
  // Replication overflows not yet reported in a log line, and when the last line went out.
  #overflowUnlogged = 0;
  #overflowLoggedAt = Number.NEGATIVE_INFINITY;
  #overflowLast: string | undefined;
  #overflowTimer: NodeJS.Timeout | undefined;
  #healthRunning: Promise<void> | undefined;
  #closePromise: Promise<void> | undefined;
  #failovers = 0;
  readonly #secondaryLookupTimeoutMs: number;
  readonly #secondaryLookupCooldownMs: number;
  #secondaryLookupSkipUntil = 0;
  #secondaryLookupFailures = 0;
  #secondaryLookupsSkipped = 0;
  readonly #durability: Durability;
  // Sync mode only (undefined in async mode).
  readonly #secondaryJournal: DurableLog<JournalRecord> | undefined;
  readonly #secondaryBreaker: CircuitBreaker | undefined;
  readonly #secondaryCheck: (signal: AbortSignal) => Promise<unknown>;
  readonly #secondaryReplay: CopyQueue | undefined;
  readonly #teeWindowBytes: number;
  // Dual writes in flight, by side: aborted when that side's breaker opens,
  // so a side that went silent mid-write does not hold the other back.
  readonly #inFlight = { primary: new Set<AbortController>(), secondary: new Set<AbortController>() };
  #dualWrites = 0;
  #oneCopyWrites = 0;

  constructor(opts: FallbackStoreOptions) {
    this.#primary = opts.primary;
    this.#secondary = opts.secondary;
    this.#journal = opts.journal;
    this.#log = opts.logger;
    this.#breaker = new CircuitBreaker(opts.breaker);
    this.#healthIntervalMs = positive(opts.healthCheckIntervalMs ?? 2000, 'healthCheckIntervalMs');
    this.#healthTimeoutMs = positive(opts.healthCheckTimeoutMs ?? 2000, 'healthCheckTimeoutMs');
    this.#failoverBufferBytes = Math.max(0, opts.failoverBufferBytes ?? 1024 * 1024);
    this.#secondaryLookupTimeoutMs = positive(opts.secondaryLookupTimeoutMs ?? 2000, 'secondaryLookupTimeoutMs');
    this.#secondaryLookupCooldownMs = Math.max(0, opts.secondaryLookupCooldownMs ?? 5000);
    this.#check = opts.primaryHealthCheck
      ?? (async (signal) => this.#primary.findMissing([PROBE_DIGEST], { signal }));
    this.#durability = opts.durability ?? 'async';
    if (this.#durability !== 'sync' && this.#durability !== 'async') {
      throw new RangeError(`fallback store: durability ${JSON.stringify(this.#durability)} must be "sync" or "async"`);
    }
    this.#secondaryCheck = opts.secondaryHealthCheck
      ?? (async (signal) => this.#secondary.findMissing([PROBE_DIGEST], { signal }));
    this.#teeWindowBytes = Math.max(0, opts.teeWindowBytes ?? 1024 * 1024);
    const backgroundTimeoutMs = positive(opts.backgroundTimeoutMs ?? 300_000, 'backgroundTimeoutMs');
    const primaryUp = () => this.#primaryUp();

    const rep = opts.replication ?? {};
    this.#replication = new CopyQueue({
      maxQueue: positive(rep.maxQueue ?? 10_000, 'replication.maxQueue'),
      concurrency: positive(rep.concurrency ?? 4, 'replication.concurrency'),
      overflow: overflowPolicy(rep.overflow ?? 'drop-oldest'),
      maxAttempts: positive(rep.maxAttempts ?? 8, 'replication.maxAttempts'),
      retryInitialMs: rep.retryInitialMs ?? 500,
      retryMaxMs: rep.retryMaxMs ?? 30_000,
      timeoutMs: backgroundTimeoutMs,
      signal: this.#closing.signal,
      canRun: primaryUp,
      run: (job, signal) => this.#replicate(job, signal),
      onGiveUp: (job, err) => this.#log?.warn({ blob: jobName(job), err: describe(err) }, 'fallback: replication to the secondary failed'),
      onOverflow: (given, namespace) => this.#replicationOverflowed(given, namespace),
    });
    const replay = opts.replay ?? {};
    const maxNotFound = positive(replay.maxNotFound ?? 3, 'replay.maxNotFound');
    // A journal's replay queue: bounded by the journal, which refuses writes
    // beyond its size; retried until the entry is copied or given up.
    const replayQueue = (journal: DurableLog<JournalRecord>, to: string, canRun: () => boolean, run: CopyQueueOptions['run']) =>
      new CopyQueue({
        maxQueue: Number.POSITIVE_INFINITY,
        concurrency: positive(replay.concurrency ?? 4, 'replay.concurrency'),
        overflow: 'reject-new',
        maxAttempts: Number.POSITIVE_INFINITY,
        retryInitialMs: replay.retryInitialMs ?? 500,
        retryMaxMs: replay.retryMaxMs ?? 30_000,
        timeoutMs: backgroundTimeoutMs,
        signal: this.#closing.signal,
        canRun,
        run,
        onGiveUp: (job, err) => {
          this.#log?.error({ blob: jobName(job), err: describe(err) }, `fallback: journaled blob cannot be replayed to the ${to}; giving it up`);
          void journal.delete(job.key, job.seq).catch(() => {});
        },
      });
    this.#replay = replayQueue(this.#journal, 'primary', primaryUp, (job, signal) => this.#replayOne(job, signal, maxNotFound));
    if (this.#durability === 'sync') {
      if (opts.secondaryJournal === undefined) throw new RangeError('fallback store: durability "sync" needs a secondaryJournal');
      this.#secondaryJournal = opts.secondaryJournal;
      this.#secondaryBreaker = new CircuitBreaker(opts.breaker);
      this.#secondaryReplay = replayQueue(opts.secondaryJournal, 'secondary', () => this.#secondaryUp(), (job, signal) =>
        this.#replayToSecondary(job, signal, maxNotFound),
      );
    } else if (opts.secondaryJournal !== undefined) {
      throw new RangeError('fallback store: a secondaryJournal is for durability "sync" only');
    }
    const repair = opts.repair ?? {};
    this.#repairs = new CopyQueue({
      maxQueue: positive(repair.maxQueue ?? 1000, 'repair.maxQueue'),
      concurrency: positive(repair.concurrency ?? 2, 'repair.concurrency'),
      // Opportunistic: the next read or FindMissing queues it again.
      overflow: 'reject-new',
      maxAttempts: 3,
      retryInitialMs: 500,
      retryMaxMs: 5000,
      timeoutMs: backgroundTimeoutMs,
      signal: this.#closing.signal,
      canRun: primaryUp,
      run: (job, signal) => this.#repairOne(job, signal),
      onGiveUp: (job, err) => this.#log?.warn({ blob: jobName(job), err: describe(err) }, 'fallback: read repair failed'),
    });

    this.#breaker.on('transition', (t: BreakerTransition) => {
      const level = t.to === 'closed' ? 'info' : 'warn';
      this.#log?.[level]({ from: t.from, to: t.to, reason: t.reason, backoffMs: t.backoffMs }, `fallback: primary breaker ${t.from} -> ${t.to}`);
      if (t.to === 'closed') this.#pumpAll();
      if (t.to === 'open' || t.to === 'drained') this.#abortInFlight('primary', t.reason);
    });
    this.#secondaryBreaker?.on('transition', (t: BreakerTransition) => {
      const level = t.to === 'closed' ? 'info' : 'warn';
      this.#log?.[level](
        { from: t.from, to: t.to, reason: t.reason, backoffMs: t.backoffMs },
        t.to === 'closed'
          ? `fallback: secondary breaker ${t.from} -> ${t.to}; writes go to both sides again`
          : `fallback: secondary breaker ${t.from} -> ${t.to}; writes go to the primary alone and are journaled for the secondary`,
      );
      if (t.to === 'closed') this.#secondaryReplay?.pump();
      if (t.to === 'open' || t.to === 'drained') this.#abortInFlight('secondary', t.reason);
    });

    // Whatever a previous run journaled is replayed once the primary is up.
    for (const e of this.#journal.entries()) {
      const ns = typeof e.value.ns === 'string' ? e.value.ns : '';
      this.#replay.add({ hash: e.value.hash, size: e.value.size }, e.seq, ns);
    }
    for (const e of this.#secondaryJournal?.entries() ?? []) {
      const ns = typeof e.value.ns === 'string' ? e.value.ns : '';
      this.#secondaryReplay!.add({ hash: e.value.hash, size: e.value.size }, e.seq, ns);
    }
    this.#scheduleHealthCheck();
  }

  /** Opens the journal under `journalDir`, then builds the store. */
  static async open(opts: FallbackStoreOpenOptions): Promise<FallbackStore> {
    const { journalDir, maxJournalEntries, ...rest } = opts;
    const journal = await DurableLog.open<JournalRecord>(join(journalDir, JOURNAL_FILE), { maxEntries: maxJournalEntries });
    if (rest.durability !== 'sync') return new FallbackStore({ ...rest, journal });
    let secondaryJournal: DurableLog<JournalRecord>;
    try {
      secondaryJournal = await DurableLog.open<JournalRecord>(join(journalDir, SECONDARY_JOURNAL_FILE), { maxEntries: maxJournalEntries });
    } catch (err) {
      await journal.close().catch(() => {});
      throw err;
    }
    return new FallbackStore({ ...rest, journal, secondaryJournal });
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    if (digests.length === 0) return [];
    if (this.#primaryUp()) {
      let onPrimary: Digest[] | undefined;
      try {
        onPrimary = await this.#primary.findMissing(digests, opts);
        this.#breaker.recordSuccess();
      } catch (err) {
        this.#primaryFailed(err, opts?.signal, 'primary');
      }
      if (onPrimary !== undefined) {
        if (onPrimary.length === 0) return onPrimary;
        // Every new blob is one the primary lacks (ByteStream Write asks
        // before each upload), so a hung secondary must not hold up the
        // healthy path: its answer is bounded, and after a failure it is
        // left out for a while. Reporting more missing only costs an upload.
        if (Date.now() < this.#secondaryLookupSkipUntil) {
          this.#secondaryLookupsSkipped++;
          return onPrimary;
        }
        let onSecondary: Digest[];
        try {
          const timeout = AbortSignal.timeout(this.#secondaryLookupTimeoutMs);
          const signal = opts?.signal === undefined ? timeout : AbortSignal.any([opts.signal, timeout]);
          onSecondary = await this.#secondary.findMissing(onPrimary, { ...opts, signal });
        } catch (err) {
          throwIfAborted(opts?.signal);
          this.#secondaryLookupFailures++;
          this.#secondaryLookupSkipUntil = Date.now() + this.#secondaryLookupCooldownMs;
          this.#log?.warn(
            { err: describe(err), skipMs: this.#secondaryLookupCooldownMs },
            'fallback: secondary FindMissing failed; reporting what the primary lacks, and not asking the secondary for a while',
          );
          return onPrimary;
        }
        const stillMissing = new Set(onSecondary.map(digestKey));
        for (const d of onPrimary) {
          if (!stillMissing.has(digestKey(d))) this.#queueRepair(d, opts?.namespace ?? '');
        }
        return onSecondary;
      }
    }
    try {
      return await this.#secondary.findMissing(digests, opts);
    } catch (err) {
      throw withPrefix('secondary', err);
    }
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    if (this.#primaryUp()) {
      let primaryMiss = false;
      try {
        const stream = await this.#primary.get(digest, opts);
        this.#breaker.recordSuccess();
        return this.#watchPrimaryStream(stream);
      } catch (err) {
        if (isCode(err, Code.NotFound)) {
          this.#breaker.recordSuccess();
          primaryMiss = true;
        } else {
          this.#primaryFailed(err, opts?.signal, 'primary');
        }
      }
      let stream: AsyncIterable<Uint8Array>;
      try {
        stream = await this.#secondary.get(digest, opts);
      } catch (err) {
        throw withPrefix('secondary', err);
      }
      if (primaryMiss) this.#queueRepair(digest, opts?.namespace ?? '');
      return stream;
    }
    try {
      return await this.#secondary.get(digest, opts);
    } catch (err) {
      throw withPrefix('secondary', err);
    }
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    if (!this.#primaryUp()) {
      await this.#putOnSecondary(digest, chunks, opts);
      return;
    }
    if (this.#durability === 'sync' && this.#secondaryUp()) {
      await this.#putOnBoth(digest, chunks, opts);
      return;
    }
    // Async mode; or sync mode with the secondary down, where the write is
    // journaled for the secondary below before it is acknowledged.
    if (this.#secondaryJournal !== undefined) this.#checkJournalRoom(this.#secondaryJournal, namespacedKey(digest, opts?.namespace ?? ''), 'secondary');
    const source = new ReplayableUpload(chunks, this.#failoverBufferBytes);
    try {
      await this.#primary.put(digest, source.stream(), opts);
    } catch (err) {
      // Stop the primary's view of the upload, and wait for a pull it left
      // in flight, before judging what can be handed over.
      await source.detach();
      // A failing client stream or a cancelled call says nothing about the primary.
      if (source.failed) {
        source.dispose();
        throw toConnectError(err);
      }
      if (opts?.signal?.aborted || !isInfrastructureError(err)) {
        source.dispose();
        throwIfAborted(opts?.signal);
        this.#breaker.recordSuccess(); // an answer, such as INVALID_ARGUMENT
        throw withPrefix('primary', err);
      }
      this.#breaker.recordFailure(err);
      // A resumed upload's rest is no use to a side that holds no prefix (see uploadStatus).
      if (!source.replayable || (opts?.upload?.offset ?? 0) !== 0) {
        source.dispose();
        throw withPrefix('primary', err);
      }
      this.#failovers++;
      this.#log?.warn({ blob: digestString(digest), err: describe(err) }, 'fallback: primary failed a write; writing to the secondary');
      try {
        await this.#putOnSecondary(digest, source.stream(), opts);
      } finally {
        source.dispose();
      }
      return;
    }
    source.dispose();
    this.#breaker.recordSuccess();
    const namespace = opts?.namespace ?? '';
    this.#primaryHolds(namespacedKey(digest, namespace));
    if (this.#durability === 'sync') {
      await this.#journalForSecondary(digest, namespace);
      return;
    }
    this.#replication.add(digest, 0, namespace);
  }

  /**
   * Sync mode, both sides up: one read of the client's stream, teed to both
   * puts (each verifies the digest itself); acknowledged when both hold the
   * blob. A side that fails with an infrastructure error (or whose breaker
   * opens meanwhile) while the other succeeds makes this a one-copy write:
   * it is journaled for the failed side before it is acknowledged, exactly
   * as if that side's breaker had been open when the write began.
   */
  async #putOnBoth(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    const namespace = opts?.namespace ?? '';
    const key = namespacedKey(digest, namespace);
    // Either side may end up alone with it: make sure the journal could
    // take the write before taking it.
    this.#checkJournalRoom(this.#journal, key, 'primary');
    this.#checkJournalRoom(this.#secondaryJournal!, key, 'secondary');
    const tee = new TeeUpload(chunks, 2, { windowBytes: this.#teeWindowBytes });
    const write = async (side: Side, store: BlobStore, branch: number): Promise<SideOutcome> => {
      const ctrl = new AbortController();
      this.#inFlight[side].add(ctrl);
      const signal = opts?.signal === undefined ? ctrl.signal : AbortSignal.any([opts.signal, ctrl.signal]);
      try {
        await store.put(digest, tee.branch(branch), { ...opts, signal });
        return { ok: true };
      } catch (err) {
        return { ok: false, err, cutOff: ctrl.signal.aborted };
      } finally {
        this.#inFlight[side].delete(ctrl);
        tee.release(branch);
      }
    };
    const [p, s] = await Promise.all([write('primary', this.#primary, 0), write('secondary', this.#secondary, 1)]);
    tee.dispose();
    // A failing client stream or a cancelled call says nothing about either side.
    if (tee.failed) throw toConnectError(tee.error);
    throwIfAborted(opts?.signal);
    const secondaryBreaker = this.#secondaryBreaker!;
    const pDown = !p.ok && (p.cutOff || isInfrastructureError(p.err));
    const sDown = !s.ok && (s.cutOff || isInfrastructureError(s.err));
    if (p.ok) this.#breaker.recordSuccess();
    else if (pDown) this.#breaker.recordFailure(p.err);
    else this.#breaker.recordSuccess(); // an answer, such as INVALID_ARGUMENT
    if (s.ok) secondaryBreaker.recordSuccess();
    else if (sDown) secondaryBreaker.recordFailure(s.err);
    else secondaryBreaker.recordSuccess();
    // An answer (not an outage) from either side is the client's to see: the
    // write is not acknowledged. A side that did store it keeps a copy no one
    // was promised, which is harmless.
    if (!p.ok && !pDown) throw withPrefix('primary', p.err);
    if (!s.ok && !sDown) throw withPrefix('secondary', s.err);
    if (p.ok && s.ok) {
      this.#dualWrites++;
      this.#primaryHolds(key);
      this.#secondaryHolds(key);
      return;
    }
    if (p.ok && !s.ok) {
      this.#log?.warn({ blob: namespacedName(digestString(digest), namespace), err: describe(s.err) }, 'fallback: secondary failed a dual write; journaling it for the secondary');
      this.#primaryHolds(key);
      await this.#journalForSecondary(digest, namespace);
      return;
    }
    if (s.ok && !p.ok) {
      this.#failovers++;
      this.#log?.warn({ blob: namespacedName(digestString(digest), namespace), err: describe(p.err) }, 'fallback: primary failed a dual write; journaling it for the primary');
      this.#secondaryHolds(key);
      await this.#journalForPrimary(digest, namespace);
      return;
    }
    throw withPrefix('primary', p.ok ? undefined : p.err);
  }

  /** The primary holds the current value of `key`: a pending replay of an older one to it would at best be redundant. */
  #primaryHolds(key: string): void {
    if (this.#journal.has(key)) {
      this.#replay.remove(key);
      void this.#journal.delete(key).catch(() => {});
    }
  }

  /** As #primaryHolds, for the secondary (sync mode). */
  #secondaryHolds(key: string): void {
    if (this.#secondaryJournal?.has(key) === true) {
      this.#secondaryReplay!.remove(key);
      void this.#secondaryJournal.delete(key).catch(() => {});
    }
  }

  /** Refuses a write that could end up on one side only when that side's journal is full. */
  #checkJournalRoom(journal: DurableLog<JournalRecord>, key: string, owedTo: Side): void {
    if (!journal.has(key) && journal.size >= journal.maxEntries) {
      throw new ConnectError(
        `fallback: the catch-up journal for the ${owedTo} is full (${journal.maxEntries} entries); refusing the write`,
        Code.Unavailable,
      );
    }
  }

  /** Sync mode: the primary alone holds the write; journal it (fsync'd) for the secondary before it is acknowledged. */
  async #journalForSecondary(digest: Digest, namespace: string): Promise<void> {
    const seq = await this.#appendJournal(this.#secondaryJournal!, digest, namespace, 'secondary');
    this.#oneCopyWrites++;
    this.#secondaryReplay!.add(digest, seq, namespace);
  }

  /** The secondary alone holds the write; journal it (fsync'd) for the primary before it is acknowledged. */
  async #journalForPrimary(digest: Digest, namespace: string): Promise<void> {
    const seq = await this.#appendJournal(this.#journal, digest, namespace, 'primary');
    this.#oneCopyWrites++;
    this.#replay.add(digest, seq, namespace);
  }

  async #appendJournal(journal: DurableLog<JournalRecord>, digest: Digest, namespace: string, owedTo: Side): Promise<number> {
    try {
      const record: JournalRecord = { hash: digest.hash, size: digest.size, at: Date.now(), ...(namespace === '' ? {} : { ns: namespace }) };
      return await journal.append(namespacedKey(digest, namespace), record);
    } catch (err) {
      const why = err instanceof DurableLogFullError ? 'the catch-up journal is full' : `journaling failed: ${describe(err)}`;
      throw new ConnectError(`fallback: the ${owedTo} is unavailable and ${why}; refusing the write`, Code.Unavailable, undefined, undefined, err);
    }
  }

  /**
   * Resumable uploads (see BlobStore.uploadStatus), passed through to the
   * side(s) a put would go to now, which put() hands the upload to: the
   * secondary while the primary is down; in sync mode with both up, both,
   * and only a prefix both sides kept alike is resumable (each side resumes
   * its own; prefixes that differ, because the cut reached the two at
   * different bytes, count as 0 and the client restarts); otherwise the
   * primary. A resumed upload is not failed over to the other side (that
   * side holds no prefix): the client restarts it.
   */
  async uploadStatus(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    const status = async (store: BlobStore): Promise<number> => (await store.uploadStatus?.(digest, uploadId, opts)) ?? 0;
    if (!this.#primaryUp()) return status(this.#secondary);
    if (this.#durability === 'sync' && this.#secondaryUp()) {
      const [p, s] = await Promise.all([status(this.#primary), status(this.#secondary)]);
      return p === s ? p : 0;
    }
    return status(this.#primary);
  }

  describe(): StoreDescription {
    const replication = this.#replication.stats();
    const replay = this.#replay.stats();
    const repairs = this.#repairs.stats();
    const oneCopy = this.#oneCopyReason();
    let sync: Record<string, unknown> = {};
    if (this.#secondaryJournal !== undefined && this.#secondaryBreaker !== undefined && this.#secondaryReplay !== undefined) {
      const sr = this.#secondaryReplay.stats();
      sync = {
        secondaryBreaker: this.#secondaryBreaker.snapshot(),
        dualWrites: this.#dualWrites,
        secondaryJournal: {
          backlog: this.#secondaryJournal.size,
          inFlight: sr.inFlight,
          replayed: sr.done,
          lost: sr.failed + sr.vanished,
          maxEntries: this.#secondaryJournal.maxEntries,
          lagMs: sr.lagMs,
        },
      };
    }
    return {
      kind: 'fallback',
      durability: this.#durability,
      serving: this.#primaryUp() ? 'primary' : 'secondary',
      // How many sides a write acknowledged now lands on (sync mode: 2 while
      // both are up), and why only one when so.
      copies: oneCopy === undefined && this.#durability === 'sync' ? 2 : 1,
      ...(oneCopy === undefined ? {} : { oneCopy }),
      oneCopyWrites: this.#oneCopyWrites,
      breaker: this.#breaker.snapshot(),
      ...sync,
      failovers: this.#failovers,
      secondaryLookups: { failed: this.#secondaryLookupFailures, skipped: this.#secondaryLookupsSkipped },
      replication: {
        queued: replication.queued,
        inFlight: replication.inFlight,
        done: replication.done,
        failed: replication.failed,
        vanished: replication.vanished,
        overflow: replication.overflow,
        overflowPolicy: this.#replication.overflowPolicy,
        lagMs: replication.lagMs,
      },
      journal: {
        backlog: this.#journal.size,
        inFlight: replay.inFlight,
        replayed: replay.done,
        lost: replay.failed + replay.vanished,
        maxEntries: this.#journal.maxEntries,
        lagMs: replay.lagMs,
      },
      repairs: {
        queued: repairs.queued,
        inFlight: repairs.inFlight,
        done: repairs.done,
        failed: repairs.failed + repairs.vanished,
        dropped: repairs.overflow,
      },
      children: [
        { ...this.#primary.describe(), role: 'primary' },
        { ...this.#secondary.describe(), role: 'secondary' },
      ],
    };
  }

  /**
   * Stops the health loop and background copies (copies in flight are
   * aborted; replication and repair items still queued are forgotten, journal
   * entries stay on disk for the next start), closes the journal, then the
   * children. Idempotent.
   */
  close(): Promise<void> {
    this.#closePromise ??= this.#close();
    return this.#closePromise;
  }

  async #close(): Promise<void> {
    this.#closing.abort(new ConnectError('fallback store is closing', Code.Unavailable));
    clearTimeout(this.#healthTimer);
    this.#healthTimer = undefined;
    clearTimeout(this.#overflowTimer);
    this.#overflowTimer = undefined;
    this.#logOverflow();
    await this.#healthRunning;
    await Promise.all([this.#replication.close(), this.#replay.close(), this.#repairs.close(), this.#secondaryReplay?.close()]);
    const results = await Promise.allSettled([
      this.#journal.close(),
      this.#secondaryJournal?.close(),
      this.#primary.close(),
      this.#secondary.close(),
    ]);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }

  #checkOpen(): void {
    if (this.#closing.signal.aborted) throw new ConnectError('fallback store is closed', Code.Unavailable);
  }

  #primaryUp(): boolean {
    return this.#breaker.allowsTraffic();
  }

  /** Sync mode: whether writes go to the secondary too. Async mode: always true (no breaker). */
  #secondaryUp(): boolean {
    return this.#secondaryBreaker?.allowsTraffic() ?? true;
  }

  /** Why a write acknowledged now would be held by one side only (plus a journal entry), or undefined. */
  #oneCopyReason(): string | undefined {
    if (!this.#primaryUp()) {
      return 'primary is down: writes go to the secondary alone and are journaled for the primary';
    }
    if (!this.#secondaryUp()) {
      return 'secondary is down: writes go to the primary alone and are journaled for the secondary';
    }
    return undefined;
  }

  /** Cuts off the dual writes still waiting on a side whose breaker just opened; they finish on the other side. */
  #abortInFlight(side: Side, reason: string): void {
    if (this.#inFlight[side].size === 0) return;
    const err = new ConnectError(`fallback: the ${side}'s breaker opened during the write (${reason})`, Code.Unavailable);
    for (const ctrl of this.#inFlight[side]) ctrl.abort(err);
    this.#inFlight[side].clear();
  }

  /**
   * Feeds a failed primary call to the breaker. Returns (so the caller falls
   * back to the secondary) for an infrastructure error; throws otherwise.
   */
  #primaryFailed(err: unknown, signal: AbortSignal | undefined, prefix: string): void {
    throwIfAborted(signal);
    this.#breaker.recordFailure(err);
    if (!isInfrastructureError(err)) throw withPrefix(prefix, err);
    this.#failovers++;
  }

  async *#watchPrimaryStream(stream: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
    try {
      yield* stream;
    } catch (err) {
      this.#breaker.recordFailure(err);
      throw withPrefix('primary', err);
    }
  }

  /** Writes to the secondary and journals the write before acknowledging it. */
  async #putOnSecondary(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    const namespace = opts?.namespace ?? '';
    const key = namespacedKey(digest, namespace);
    if (!this.#journal.has(key) && this.#journal.size >= this.#journal.maxEntries) {
      throw new ConnectError(
        `fallback: primary is unavailable and the catch-up journal is full (${this.#journal.maxEntries} entries); refusing the write`,
        Code.Unavailable,
      );
    }
    try {
      await this.#secondary.put(digest, chunks, opts);
    } catch (err) {
      throw withPrefix('secondary', err);
    }
    // Sync mode: the secondary now holds this value; an older one owed to it is moot.
    this.#secondaryHolds(key);
    await this.#journalForPrimary(digest, namespace);
  }

  /**
   * Overflow loses a blob's backup silently unless someone watches
   * describe(), so it is also logged, rate-limited: the first at once, the
   * rest summed into at most one line per OVERFLOW_LOG_INTERVAL_MS (a
   * trailing line reports the end of a burst).
   */
  #replicationOverflowed(given: Digest, namespace: string): void {
    this.#overflowUnlogged++;
    this.#overflowLast = namespacedName(digestString(given), namespace);
    if (this.#overflowTimer !== undefined) return;
    const wait = this.#overflowLoggedAt + OVERFLOW_LOG_INTERVAL_MS - Date.now();
    if (wait <= 0) {
      this.#logOverflow();
      return;
    }
    this.#overflowTimer = setTimeout(() => {
      this.#overflowTimer = undefined;
      this.#logOverflow();
    }, wait);
    this.#overflowTimer.unref();
  }

  #logOverflow(): void {
    if (this.#overflowUnlogged === 0) return;
    const stats = this.#replication.stats();
    const policy = this.#replication.overflowPolicy;
    this.#log?.warn(
      {
        overflow: this.#overflowUnlogged,
        overflowTotal: stats.overflow,
        policy,
        queued: stats.queued,
        lastGivenUp: this.#overflowLast,
      },
      `fallback: replication queue full; ${this.#overflowUnlogged} blob(s) will not be copied to the secondary (${policy})`,
    );
    this.#overflowUnlogged = 0;
    this.#overflowLoggedAt = Date.now();
  }

  #queueRepair(digest: Digest, namespace: string): void {
    // A journaled blob is on its way to the primary already.
    if (this.#journal.has(namespacedKey(digest, namespace))) return;
    this.#repairs.add(digest, 0, namespace);
  }

  async #replicate(job: CopyJob, signal: AbortSignal): Promise<CopyOutcome> {
    let stream: AsyncIterable<Uint8Array>;
    try {
      stream = await this.#primary.get(job.digest, { signal, namespace: job.namespace });
      this.#breaker.recordSuccess();
    } catch (err) {
      if (isCode(err, Code.NotFound)) return 'vanished';
      if (!signal.aborted) this.#breaker.recordFailure(err);
      throw withPrefix('primary', err);
    }
    try {
      await this.#secondary.put(job.digest, stream, { signal, namespace: job.namespace });
    } catch (err) {
      throw withPrefix('secondary', err);
    }
    return 'done';
  }

  async #replayOne(job: CopyJob, signal: AbortSignal, maxNotFound: number): Promise<CopyOutcome> {
    const { namespace } = job;
    let stream: AsyncIterable<Uint8Array>;
    try {
      stream = await this.#secondary.get(job.digest, { signal, namespace });
    } catch (err) {
      if (!isCode(err, Code.NotFound)) throw withPrefix('secondary', err);
      // Replayed before a crash but the removal was not yet durable?
      const missing = await this.#primary.findMissing([job.digest], { signal, namespace });
      if (missing.length === 0) {
        void this.#journal.delete(job.key, job.seq).catch(() => {});
        return 'done';
      }
      if (!this.#notFoundCounts(job, this.#secondary, maxNotFound)) throw withPrefix('secondary', err);
      this.#log?.error({ blob: jobName(job) }, 'fallback: journaled blob is on neither backend any more; giving it up');
      void this.#journal.delete(job.key, job.seq).catch(() => {});
      return 'vanished';
    }
    await this.#copyToPrimary(job.digest, namespace, stream, signal);
    // Only now, with the primary holding the blob, does the entry go. The
    // removal need not be durable before we go on: losing it to a crash only
    // means one more (idempotent) replay after the restart.
    this.#journal.delete(job.key, job.seq).catch((err: unknown) => {
      this.#log?.warn({ err: describe(err) }, 'fallback: removing a replayed journal entry failed; it will be replayed again');
    });
    return 'done';
  }

  /**
   * Whether a replay whose source said NOT_FOUND (and whose target lacks
   * the blob too) may now give the entry up: after `maxNotFound` such
   * answers, counting only those given while every shard of the source was
   * taking traffic. A sharded source with a shard open or drained skips the
   * blob's owner and asks next-ranked shards, so its NOT_FOUND says nothing
   * about the blob: giving up on it lost acknowledged writes in the chaos
   * soak (a shard down while the secondary's journal replayed, then wiped).
   * Such an answer is retried later with the queue's backoff instead.
   */
  #notFoundCounts(job: CopyJob, source: BlobStore, maxNotFound: number): boolean {
    if (!allShardsClosed(source.describe())) return false;
    job.notFound++;
    return job.notFound >= maxNotFound;
  }

  /** Sync mode: copies a blob only the primary holds to the secondary, then drops its journal entry. */
  async #replayToSecondary(job: CopyJob, signal: AbortSignal, maxNotFound: number): Promise<CopyOutcome> {
    const { namespace } = job;
    const journal = this.#secondaryJournal!;
    let stream: AsyncIterable<Uint8Array>;
    try {
      stream = await this.#primary.get(job.digest, { signal, namespace });
    } catch (err) {
      if (!isCode(err, Code.NotFound)) throw withPrefix('primary', err);
      // The primary lost it (came back empty): fine if the secondary has it.
      const missing = await this.#secondary.findMissing([job.digest], { signal, namespace });
      if (missing.length === 0) {
        void journal.delete(job.key, job.seq).catch(() => {});
        return 'done';
      }
      if (!this.#notFoundCounts(job, this.#primary, maxNotFound)) throw withPrefix('primary', err);
      this.#log?.error({ blob: jobName(job) }, 'fallback: blob journaled for the secondary is on neither backend any more; giving it up');
      void journal.delete(job.key, job.seq).catch(() => {});
      return 'vanished';
    }
    try {
      await this.#secondary.put(job.digest, stream, { signal, namespace });
      this.#secondaryBreaker?.recordSuccess();
    } catch (err) {
      if (!signal.aborted) this.#secondaryBreaker?.recordFailure(err);
      throw withPrefix('secondary', err);
    }
    journal.delete(job.key, job.seq).catch((err: unknown) => {
      this.#log?.warn({ err: describe(err) }, 'fallback: removing a replayed journal entry failed; it will be replayed again');
    });
    return 'done';
  }

  async #repairOne(job: CopyJob, signal: AbortSignal): Promise<CopyOutcome> {
    let stream: AsyncIterable<Uint8Array>;
    try {
      stream = await this.#secondary.get(job.digest, { signal, namespace: job.namespace });
    } catch (err) {
      if (isCode(err, Code.NotFound)) return 'vanished';
      throw withPrefix('secondary', err);
    }
    await this.#copyToPrimary(job.digest, job.namespace, stream, signal);
    return 'done';
  }

  /** The last step of a replay or repair; its outcome feeds the primary's breaker. */
  async #copyToPrimary(digest: Digest, namespace: string, stream: AsyncIterable<Uint8Array>, signal: AbortSignal): Promise<void> {
    try {
      await this.#primary.put(digest, stream, { signal, namespace });
      this.#breaker.recordSuccess();
    } catch (err) {
      if (!signal.aborted) this.#breaker.recordFailure(err);
      throw withPrefix('primary', err);
    }
  }

  #pumpAll(): void {
    this.#replay.pump();
    this.#repairs.pump();
    this.#replication.pump();
    this.#secondaryReplay?.pump();
  }

  #scheduleHealthCheck(): void {
    if (this.#closing.signal.aborted) return;
    this.#healthTimer = setTimeout(() => {
      this.#healthRunning = this.#runHealthCheck().finally(() => {
        this.#healthRunning = undefined;
        this.#scheduleHealthCheck();
      });
    }, this.#healthIntervalMs);
    this.#healthTimer.unref();
  }

  async #runHealthCheck(): Promise<void> {
    await Promise.all([
      this.#checkOne(this.#breaker, this.#check),
      this.#secondaryBreaker === undefined ? undefined : this.#checkOne(this.#secondaryBreaker, this.#secondaryCheck),
    ]);
    // Also retries queued work that waited for the primary (or the secondary).
    this.#pumpAll();
  }

  async #checkOne(breaker: CircuitBreaker, check: (signal: AbortSignal) => Promise<unknown>): Promise<void> {
    const state = breaker.state;
    // Open: waiting out the backoff. Drained: held by an operator.
    if (state !== 'closed' && state !== 'half-open') return;
    const signal = AbortSignal.any([this.#closing.signal, AbortSignal.timeout(this.#healthTimeoutMs)]);
    try {
      await check(signal);
      if (!this.#closing.signal.aborted) breaker.recordHealthCheck(true);
    } catch (err) {
      if (!this.#closing.signal.aborted) breaker.recordHealthCheck(false, describe(err));
    }
  }
}

type Side = 'primary' | 'secondary';

type SideOutcome = { readonly ok: true } | { readonly ok: false; readonly err: unknown; readonly cutOff: boolean };

function positive(n: number, what: string): number {
  if (!(n > 0)) throw new RangeError(`fallback store: ${what} ${n} must be positive`);
  return n;
}

function overflowPolicy(p: string): OverflowPolicy {
  if (p === 'drop-oldest' || p === 'reject-new') return p;
  throw new RangeError(`fallback store: replication.overflow ${JSON.stringify(p)} must be "drop-oldest" or "reject-new"`);
}

function jobName(job: CopyJob): string {
  return namespacedName(digestString(job.digest), job.namespace);
}

function describe(err: unknown): string {
  return toConnectError(err).message;
}
