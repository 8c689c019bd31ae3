import { join } from 'node:path';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Logger } from 'pino';
import { abortable, mapLimit } from '../concurrency.ts';
import { noteShard } from '../request-context.ts';
import type { Digest } from '../digest.ts';
import { digestKey, digestOf, digestString, parseDigest } from '../digest.ts';
import { DurableLog, type DurableLogFormat, type LogEntry } from '../durable-log.ts';
import { isCode, isInfrastructureError, notFound, throwIfAborted, toConnectError, withPrefix } from '../errors.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';
import { namespacedKey, namespacedName } from './blob-store.ts';
import { CircuitBreaker, type BreakerTransition, type CircuitBreakerOptions } from './circuit-breaker.ts';
import { ExistenceCache, type ExistenceCacheOptions } from './existence-cache.ts';
import { ProbeWindows } from './probe-window.ts';
import { Placement, rank, validateShards } from './rendezvous.ts';
import { ReplayableUpload } from './replayable-upload.ts';

export interface ShardOptions {
  /** Unique, stable name: it is the rendezvous hashing key, so renaming moves data. */
  readonly name: string;
  /** Positive integer; a shard's share of keys is weight / sum(weights). */
  readonly weight: number;
  readonly store: BlobStore;
  /**
   * Active health check: resolves when the shard is healthy, rejects
   * otherwise, and should give up when `signal` aborts. The remote store
   * provides one (grpc.health.v1). Default: FindMissing of one probe digest,
   * a cheap real round trip.
   */
  readonly check?: ((signal: AbortSignal) => Promise<void>) | undefined;
}

export interface HandoffOptions {
  /** Directory of the durable hint log (hints.jsonl); created if missing. */
  readonly dir: string;
  /** Most hints held at once; stand-in writes beyond it are refused. Default 100000. */
  readonly maxHints?: number | undefined;
  /** Hinted blobs copied at once. Default 4. */
  readonly concurrency?: number | undefined;
  /** How often pending hints are retried. Default 1 s (and at once when a shard closes). */
  readonly intervalMs?: number | undefined;
}

export interface ShardingStoreOptions {
  readonly shards: readonly ShardOptions[];
  readonly handoff: HandoffOptions;
  /** Default 1000. */
  readonly healthCheckIntervalMs?: number | undefined;
  /** A check slower than this fails (catches blackholed shards). Default 500. */
  readonly healthCheckTimeoutMs?: number | undefined;
  readonly breaker?: CircuitBreakerOptions | undefined;
  /** Further ranked shards asked when the owner says NOT_FOUND. Default 2. */
  readonly probeDepth?: number | undefined;
  /**
   * Misses whose owner changed state this recently (and every miss this soon
   * after start) are probed by rank (see ProbeWindows). Default 10 min.
   */
  readonly probeWindowMs?: number | undefined;
  /** Digests recently confirmed present, answered without a shard hop (see ExistenceCache). */
  readonly existenceCache?: Omit<ExistenceCacheOptions, 'now'> | undefined;
  /** Upload prefix kept in memory so a failed write can be replayed elsewhere. Default 1 MiB. */
  readonly maxReplayBytes?: number | undefined;
  readonly logger?: Logger | undefined;
  /** Clock for breakers and the probe window; injectable for tests. Default Date.now. */
  readonly now?: (() => number) | undefined;
}

interface Shard {
  readonly name: string;
  readonly weight: number;
  readonly store: BlobStore;
  readonly check: (signal: AbortSignal) => Promise<void>;
  readonly breaker: CircuitBreaker;
  inFlight: number;
  bytesIn: number;
  bytesOut: number;
  lastHealthCheckMs: number | null;
  lastHealthCheckOk: boolean | null;
  lastHealthCheckError: string | null;
  checking: Promise<void> | null;
  /** Calls that have not had their answer yet (see #call). */
  readonly waiting: Set<WaitingCall>;
}

/** A shard call still waiting for its answer (a get's stream, a findMissing's list, a put's ack). */
interface WaitingCall {
  readonly ctl: AbortController;
  /**
   * Whether the call may still be cancelled and retried elsewhere when the
   * shard's breaker opens: false once that could lose data (a put whose
   * upload outgrew its replay buffer).
   */
  readonly retryable: () => boolean;
}

/** A pending handoff, keyed in the hint log by hintKey(digest, standIn, namespace). */
interface Hint {
  readonly digest: Digest;
  /** The AC namespace the blob was written in; "" for the CAS and the default namespace. */
  readonly namespace: string;
  /** The shard the blob belongs to (top of the ranking, whatever its state). */
  readonly owner: string;
  /** The shard that holds it until the handoff copies it to the owner. */
  readonly standIn: string;
}

/** One digest's progress through findMissing. */
interface MissingEntry {
  readonly key: string;
  readonly digest: Digest;
  /** Every shard, ranked for the digest (computed once per call). */
  readonly ranked: Shard[];
  /** Shards to ask, in order (see readPlan). */
  readonly plan: Shard[];
  /** Index in plan of the next shard to ask. */
  next: number;
  /** Ask every shard of the plan at once (probing), not one after another. */
  readonly fanOut: boolean;
  /** Shards asked about it that have not answered yet. */
  pending: number;
  found: boolean;
  /** Its owner (plan[0]) said present; otherwise a find is a probe hit. */
  onOwner: boolean;
  /** Some shard gave a definitive answer for it. */
  answered: boolean;
  error: ConnectError | undefined;
}

// Marks the errors #abortWaiting cancels calls with.
const OPENED = Symbol('opened while the call waited');

// A digest no one stores: asking for it is a cheap real round trip.
const PROBE_DIGEST = digestOf(new TextEncoder().encode('reapi-edge shard health probe'));

/**
 * Weighted rendezvous sharding over named shards, each behind a circuit
 * breaker fed by request outcomes and active health checks. Use it on an
 * edge in front of `remote` shards, for the CAS and the AC tree alike (the
 * key is the digest's hash).
 *
 * Routing: the owner of a digest is the highest-ranked shard whose breaker is
 * closed. Open, drained and half-open shards get no client traffic: a
 * half-open shard is probed only by its health checks, which close it after
 * enough successes, so a shard never takes client load before it is proven.
 * A request that fails with an infrastructure error on a closed shard is
 * retried once on the next-ranked available shard, so clients see no error
 * while the breaker is still learning. When a breaker opens (or the shard is
 * drained), the calls still waiting on that shard for their answer are
 * cancelled and go the same way at once, instead of waiting out the remote
 * timeout on a shard that went silent (counted in `abortedOnOpen`); an upload
 * that can no longer be replayed is left to finish or fail on its own.
 *
 * Writes: the upload is pulled through a replay buffer (`maxReplayBytes`); a
 * write that fails with an infrastructure error is retried once elsewhere if
 * everything pulled so far is still buffered, otherwise the error goes up and
 * the client retries the whole upload (content-addressed writes are
 * idempotent). A write that lands anywhere but the top-ranked shard records a
 * durable hint (fsync'd before put() resolves) and the handoff loop copies the
 * blob to its owner once that owner is closed again, then forgets the hint.
 * When `maxHints` are pending, writes that would need a hint are refused with
 * UNAVAILABLE and counted (`hintOverflows`): accepting them unhinted could
 * let FindMissing vouch for a blob that a later read, once probing stops,
 * would not find; a refused upload is only a retried upload.
 *
 * AC namespaces (CallOptions.namespace): placement is by digest alone, so an
 * action's entries in every namespace live on the same shards; the
 * namespace goes down with every shard call, and the hints, existence cache
 * and handoff copies are keyed by (digest, namespace).
 *
 * Reads and FindMissing: ask the owner; on NOT_FOUND ask the stand-ins a
 * pending hint names for that digest, and, only while probing can matter
 * (within `probeWindowMs` of start or of a breaker transition of the
 * digest's owner, see ProbeWindows), up to `probeDepth` further available
 * shards by rank. get() and findMissing() ask the same shards, so a blob
 * reported present is one a read returns. FindMissing asks a probed digest's
 * shards all at once: one round instead of one per rank. That asks the
 * probes about blobs the owner has too, which on a 2-core machine running
 * shards and edge costs about what it saves (10k digests, half present:
 * 138 vs 125 ms sequential), but with shards on their own machines it is one
 * round trip instead of three, and for misses (which need every probe
 * anyway) it is the same work in one round. It also answers first from
 * an ExistenceCache of recent confirmations (a shard said present, served a
 * read or took a write), believed only while the confirming shard is one
 * this read plan asks and its breaker has not changed state since. A shard
 * that dies with its breaker still closed keeps its entries until the
 * breaker opens (about a second with health checks), the same race as an
 * answer it gave just before dying.
 * A miss we cannot vouch for is not reported as one: if a shard that might
 * hold the blob failed, get() rejects with that infrastructure error, while
 * findMissing() (for which "missing" is always safe) reports it missing.
 * The catch: a drained shard's blobs are unreachable until it is undrained.
 *
 * Build it with ShardingStore.open(), which loads the hint log.
 *
 * Config: `{"sharding": {"shards": [{"name": "a", "weight": 1, "store": {...}}],
 *   "handoff": {"dir": "/var/lib/reapi-edge/hints-cas"}}}`
 */
export class ShardingStore implements BlobStore {
  readonly #shards: Shard[];
  readonly #placement: Placement;
  readonly #byName = new Map<string, Shard>();
  readonly #hints: DurableLog<Hint>;
  readonly #log: Logger | undefined;
  readonly #now: () => number;
  readonly #probeDepth: number;
  readonly #windows: ProbeWindows<Shard>;
  readonly #exists: ExistenceCache<Shard>;
  readonly #maxReplayBytes: number;
  readonly #healthTimeoutMs: number;
  readonly #handoffConcurrency: number;
  readonly #closer = new AbortController();
  readonly #timers: NodeJS.Timeout[] = [];
  // Errors that came out of a stream we fed to a shard (the client's upload,
  // a stand-in's read): they say nothing about the shard that relayed them.
  readonly #foreignErrors = new WeakSet<object>();
  #handoffRun: Promise<void> | null = null;
  #handoffAgain = false;
  #closing: Promise<void> | null = null;
  // Hint slots claimed by stand-in writes in flight (see #reserveHint).
  #hintsReserved = 0;
  #hintOverflows = 0;
  #handoffCopied = 0;
  #handoffLost = 0;
  #probeHits = 0;
  #retries = 0;
  #abortedOnOpen = 0;

  private constructor(opts: ShardingStoreOptions, hints: DurableLog<Hint>) {
    this.#hints = hints;
    this.#log = opts.logger;
    this.#now = opts.now ?? Date.now;
    this.#probeDepth = Math.max(0, Math.floor(opts.probeDepth ?? 2));
    this.#windows = new ProbeWindows(opts.probeWindowMs ?? 600_000, this.#now);
    this.#exists = new ExistenceCache({ ...opts.existenceCache, now: this.#now });
    this.#maxReplayBytes = Math.max(0, opts.maxReplayBytes ?? 1024 * 1024);
    this.#healthTimeoutMs = Math.max(1, opts.healthCheckTimeoutMs ?? 500);
    this.#handoffConcurrency = Math.max(1, Math.floor(opts.handoff.concurrency ?? 4));
    this.#shards = opts.shards.map((s) => {
      const breaker = new CircuitBreaker({ ...opts.breaker, now: this.#now });
      const shard: Shard = {
        name: s.name,
        weight: s.weight,
        store: s.store,
        check: s.check ?? (async (signal) => void (await s.store.findMissing([PROBE_DIGEST], { signal }))),
        breaker,
        inFlight: 0,
        bytesIn: 0,
        bytesOut: 0,
        lastHealthCheckMs: null,
        lastHealthCheckOk: null,
        lastHealthCheckError: null,
        checking: null,
        waiting: new Set(),
      };
      breaker.on('transition', (t) => this.#onTransition(shard, t));
      this.#byName.set(s.name, shard);
      return shard;
    });
    this.#placement = new Placement(this.#shards);

    const interval = Math.max(1, opts.healthCheckIntervalMs ?? 1000);
    for (const shard of this.#shards) {
      this.#timers.push(setInterval(() => this.#runCheck(shard), interval).unref());
    }
    const handoffInterval = Math.max(1, opts.handoff.intervalMs ?? 1000);
    this.#timers.push(setInterval(() => this.#kickHandoff(), handoffInterval).unref());
  }

  /** Loads the hint log from `handoff.dir`, then builds the store. */
  static async open(opts: ShardingStoreOptions): Promise<ShardingStore> {
    validateShards(opts.shards);
    const hints = await DurableLog.open<Hint>(join(opts.handoff.dir, HINT_FILE), {
      maxEntries: Math.max(1, opts.handoff.maxHints ?? 100_000),
      // Compact as soon as dead records outnumber live ones, so a log whose
      // handoffs are all done shrinks to nothing.
      compactMinRecords: 1,
      format: HINT_FORMAT,
    });
    try {
      await retargetHints(hints, opts.shards, opts.logger);
    } catch (err) {
      await hints.close().catch(() => {});
      throw err;
    }
    return new ShardingStore(opts, hints);
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    if (digests.length === 0) return [];
    const namespace = opts?.namespace ?? '';
    const avail = this.#available();
    const now = this.#now();
    const cache = this.#exists.size > 0 ? this.#exists : undefined;
    // One entry per distinct digest, each with the same plan get() would
    // follow; null: answered present from the cache by a shard in that plan.
    const entries = new Map<string, MissingEntry | null>();
    for (const d of digests) {
      const key = namespacedKey(d, namespace);
      if (entries.has(key)) continue;
      const ranked = this.#ranked(d);
      const { plan, probing } = this.#readPlan(d, namespace, ranked, avail, now);
      const holder = cache?.holder(key);
      if (holder !== undefined && plan.includes(holder)) {
        cache!.hit();
        entries.set(key, null);
        continue;
      }
      entries.set(key, { key, digest: d, ranked, plan, next: 0, fanOut: probing, pending: 0, found: false, onOwner: false, answered: false, error: undefined });
    }
    const asked: MissingEntry[] = [];
    for (const e of entries.values()) if (e !== null) asked.push(e);
    if (asked.length === 0) return [];

    const ctl = new AbortController();
    const signal = opts?.signal === undefined ? ctl.signal : AbortSignal.any([opts.signal, ctl.signal]);
    // Asks one shard about a group, then sends what is still unsettled on to
    // each entry's next planned shard (retry or probe) at once: a slow shard
    // delays only the digests it was asked about.
    const ask = async (shard: Shard, group: MissingEntry[]): Promise<void> => {
      const epoch = this.#exists.epoch(shard);
      try {
        const missing = await this.#call(shard, signal, (s) =>
          shard.store.findMissing(group.map((e) => e.digest), { signal: s, namespace: opts?.namespace }),
        );
        const isMissing = missingTest(group, missing);
        for (const e of group) {
          e.pending--;
          e.answered = true;
          if (isMissing(e)) {
            this.#exists.forget(e.key, shard);
            continue;
          }
          this.#exists.confirm(e.key, shard, epoch);
          e.found = true;
          if (e.plan[0] === shard) e.onOwner = true;
        }
      } catch (err) {
        throwIfAborted(opts?.signal);
        if (!isInfrastructureError(err)) throw this.#blame(shard, err);
        const prefixed = this.#blame(shard, err);
        for (const e of group) {
          e.pending--;
          e.error ??= prefixed;
          this.#addRetry(e, avail, shard);
          // No shard can answer for it any more: fail rather than guess.
          if (!e.answered && !e.found && e.pending === 0 && e.next >= e.plan.length) throw e.error;
        }
      }
      await Promise.all([...groupByNext(group)].map(([next, g]) => ask(next, g)));
    };
    try {
      await Promise.all([...groupByNext(asked)].map(([shard, group]) => ask(shard, group)));
    } catch (err) {
      ctl.abort(err); // the first failure cancels the sibling calls
      throwIfAborted(opts?.signal);
      throw toConnectError(err);
    }
    const missing: Digest[] = [];
    for (const e of asked) {
      if (!e.found) missing.push(e.digest);
      else if (!e.onOwner) this.#probeHits++;
    }
    return missing;
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    this.#checkOpen();
    const signal = opts?.signal;
    throwIfAborted(signal);
    const avail = this.#available();
    const ranked = this.#ranked(digest);
    const { plan, unreachable } = this.#readPlan(digest, opts?.namespace ?? '', ranked, avail, this.#now());
    const key = namespacedKey(digest, opts?.namespace);
    let infraError: ConnectError | undefined;
    let notFoundError: ConnectError | undefined;
    for (let i = 0; i < plan.length; i++) {
      const shard = plan[i]!;
      const epoch = this.#exists.epoch(shard);
      try {
        const stream = await this.#call(shard, signal, (s) =>
          shard.store.get(digest, { offset: opts?.offset, limit: opts?.limit, signal: s, namespace: opts?.namespace }),
        );
        if (i > 0) this.#probeHits++;
        this.#exists.confirm(key, shard, epoch);
        return this.#readStream(shard, stream, signal);
      } catch (err) {
        throwIfAborted(signal);
        if (isCode(err, Code.NotFound)) {
          this.#exists.forget(key, shard);
          notFoundError ??= this.#blame(shard, err);
        } else if (isInfrastructureError(err)) {
          infraError ??= this.#blame(shard, err);
          if (i === 0) this.#addRetry({ ranked, plan, next: 1 }, avail, shard);
        } else {
          throw this.#blame(shard, err);
        }
      }
    }
    if (infraError !== undefined) throw infraError;
    if (unreachable.length > 0) {
      throw new ConnectError(
        `blob ${namespacedName(digestString(digest), opts?.namespace)} is held by shard ${unreachable.join(', ')}, which is not taking traffic`,
        Code.Unavailable,
      );
    }
    throw notFoundError ?? notFound(digest);
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    this.#checkOpen();
    const signal = opts?.signal;
    throwIfAborted(signal);
    const namespace = opts?.namespace ?? '';
    const avail = this.#available();
    const ranked = this.#ranked(digest);
    const owner = ranked[0]!; // the true owner, whatever its state
    const candidates = ranked.filter((s) => avail.has(s));
    const source = new ReplayableUpload(chunks, this.#maxReplayBytes, { clientErrors: this.#foreignErrors });
    // Resuming an upload (see uploadStatus): only the shard that kept its
    // prefix can take the rest; no other shard is tried.
    const resuming = (opts?.upload?.offset ?? 0) !== 0;
    try {
      let target = candidates[0]!;
      for (let attempt = 0; ; attempt++) {
        const needsHint = target !== owner && !this.#hints.has(hintKey(digest, target.name, namespace));
        if (needsHint && !this.#reserveHint()) {
          this.#hintOverflows++;
          throw new ConnectError(
            `blob ${digestString(digest)} belongs to shard ${owner.name}, which cannot take it now, and the hint log ` +
              `is full (${this.#hints.size} hints): refusing to write it to a stand-in`,
            Code.Unavailable,
          );
        }
        const epoch = this.#exists.epoch(target);
        // Cancelled if the shard's breaker opens meanwhile, as long as the
        // write could still be retried (the same rule as below).
        const retryable = () => attempt === 0 && !resuming && source.replayable && candidates[attempt + 1] !== undefined;
        try {
          await this.#call(
            target,
            signal,
            (s) =>
              target.store.put(digest, this.#writeStream(target, source.stream()), {
                signal: s,
                namespace: opts?.namespace,
                ...(opts?.upload === undefined ? {} : { upload: opts.upload }),
              }),
            retryable,
          );
        } catch (err) {
          if (needsHint) this.#hintsReserved--;
          throwIfAborted(signal);
          const next = candidates[attempt + 1];
          if (attempt === 0 && !resuming && isInfrastructureError(err) && !this.#isForeign(err) && source.replayable && next !== undefined) {
            this.#retries++;
            this.#log?.debug({ shard: target.name, digest: digestString(digest), err: toConnectError(err).message }, 'write failed, retrying on next shard');
            target = next;
            continue;
          }
          // A failure of the client's own stream is not the shard's to explain.
          throw this.#isForeign(err) ? toConnectError(err) : this.#blame(target, err);
        }
        if (needsHint) {
          this.#hintsReserved--;
          try {
            await this.#hints.append(hintKey(digest, target.name, namespace), { digest, namespace, owner: owner.name, standIn: target.name });
          } catch (err) {
            throw new ConnectError(
              `blob ${digestString(digest)} stored on shard ${target.name}, but its hint could not be made durable: ${toConnectError(err).message}`,
              Code.Unavailable,
            );
          }
        }
        this.#exists.confirm(namespacedKey(digest, namespace), target, epoch);
        return;
      }
    } finally {
      source.dispose();
    }
  }

  /**
   * Resumable uploads (see BlobStore.uploadStatus): what the shard a put of
   * `digest` would go to now (the top-ranked available one) keeps of the
   * upload. That is the shard the interrupted part went to as long as it is
   * still the owner and healthy; if the owner changed (a breaker opened or
   * closed, a drain) the new one keeps nothing, so the client restarts from
   * 0 and the old shard's prefix expires there. put() sends a resumed upload
   * (offset > 0) to that shard only.
   */
  async uploadStatus(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    const avail = this.#available();
    const target = this.#ranked(digest).find((s) => avail.has(s));
    const status = target?.store.uploadStatus?.bind(target.store);
    if (target === undefined || status === undefined) return 0;
    return this.#call(target, opts?.signal, (s) => status(digest, uploadId, { signal: s }));
  }

  /** Holds a shard's breaker open until undrain(). Unknown name: NOT_FOUND. */
  drain(name: string): void {
    this.#shard(name).breaker.drain();
  }

  /** Ends a drain; the shard is half-open and closes after passing health checks. */
  undrain(name: string): void {
    const shard = this.#shard(name);
    shard.breaker.undrain();
    this.#runCheck(shard);
  }

  describe(): StoreDescription {
    const byOwner = new Map<string, number>();
    const byStandIn = new Map<string, number>();
    for (const { value: h } of this.#hints.entries()) {
      byOwner.set(h.owner, (byOwner.get(h.owner) ?? 0) + 1);
      byStandIn.set(h.standIn, (byStandIn.get(h.standIn) ?? 0) + 1);
    }
    return {
      kind: 'sharding',
      shards: this.#shards.map((s) => {
        const b = s.breaker.snapshot();
        return {
          name: s.name,
          weight: s.weight,
          state: b.state,
          manual: b.manual,
          since: b.since,
          reason: b.reason,
          consecutiveFailures: b.consecutiveFailures,
          recentFailures: b.recentFailures,
          recentRequests: b.recentRequests,
          backoffMs: b.backoffMs,
          halfOpenAt: b.halfOpenAt,
          lastHealthCheckMs: s.lastHealthCheckMs,
          lastHealthCheckOk: s.lastHealthCheckOk,
          lastHealthCheckError: s.lastHealthCheckError,
          inFlight: s.inFlight,
          hintsPending: byOwner.get(s.name) ?? 0,
          hintsHeld: byStandIn.get(s.name) ?? 0,
          bytesIn: s.bytesIn,
          bytesOut: s.bytesOut,
        };
      }),
      hintsPending: this.#hints.size,
      maxHints: this.#hints.maxEntries,
      hintOverflows: this.#hintOverflows,
      handoffCopied: this.#handoffCopied,
      handoffLost: this.#handoffLost,
      probing: this.#windows.anyOpen(),
      probingFor: this.#windows.openFor((s) => s.name),
      existenceCache: this.#exists.describe(),
      probeHits: this.#probeHits,
      retries: this.#retries,
      abortedOnOpen: this.#abortedOnOpen,
      children: this.#shards.map((s) => ({ ...s.store.describe(), name: s.name })),
    };
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    for (const t of this.#timers) clearInterval(t);
    this.#closer.abort(new ConnectError('sharding store is closing', Code.Unavailable));
    await Promise.allSettled([this.#handoffRun, ...this.#shards.map((s) => s.checking)]);
    await this.#hints.close();
    await Promise.all(this.#shards.map((s) => s.store.close()));
  }

  /**
   * Claims room for one more hint before a stand-in write, so that its hint
   * can always be recorded once the write succeeds; false when full.
   */
  #reserveHint(): boolean {
    if (this.#hints.size + this.#hintsReserved >= this.#hints.maxEntries) return false;
    this.#hintsReserved++;
    return true;
  }

  #checkOpen(): void {
    if (this.#closing !== null) throw new ConnectError('sharding store is closed', Code.Unavailable);
  }

  #shard(name: string): Shard {
    const shard = this.#byName.get(name);
    if (shard === undefined) throw new ConnectError(`shard ${name} not found`, Code.NotFound);
    return shard;
  }

  #ranked(digest: Digest): Shard[] {
    return this.#placement.order(digest.hash).map((i) => this.#shards[i]!);
  }

  // The shards that take client traffic (closed breakers); rejects with
  // UNAVAILABLE when none is left.
  #available(): Set<Shard> {
    const avail = new Set(this.#shards.filter((s) => s.breaker.allowsTraffic()));
    if (avail.size === 0) throw this.#noShards();
    return avail;
  }

  #noShards(): ConnectError {
    const states = this.#shards.map((s) => `${s.name}: ${s.breaker.state}`).join(', ');
    return new ConnectError(`no shard is taking traffic (${states})`, Code.Unavailable);
  }

  /**
   * The shards a read of `digest` asks, in order: the owner, the stand-ins
   * pending hints name, then (if the owner's probe window is open, see
   * ProbeWindows) the next `probeDepth` available shards by rank.
   * `unreachable` lists hinted stand-ins not taking traffic; `probing` says
   * whether probes were added. `all` is #ranked(digest).
   */
  #readPlan(
    digest: Digest,
    namespace: string,
    all: Shard[],
    avail: Set<Shard>,
    now: number,
  ): { plan: Shard[]; unreachable: string[]; probing: boolean } {
    let i = 0;
    while (!avail.has(all[i]!)) i++; // avail is never empty (#available)
    const owner = all[i]!;
    const plan = [owner];
    const unreachable: string[] = [];
    if (this.#hints.size > 0) {
      for (const shard of all) {
        if (!this.#hints.has(hintKey(digest, shard.name, namespace))) continue;
        if (!avail.has(shard)) unreachable.push(shard.name);
        else if (!plan.includes(shard)) plan.push(shard);
      }
    }
    const probing = this.#probeDepth > 0 && this.#windows.covers(owner, now);
    if (probing) {
      for (let j = i + 1, n = 0; j < all.length && n < this.#probeDepth; j++) {
        const shard = all[j]!;
        if (!avail.has(shard)) continue;
        n++;
        if (!plan.includes(shard)) plan.push(shard);
      }
    }
    return { plan, unreachable, probing };
  }

  // The owner failed with an infrastructure error: make sure its runner-up
  // among available shards is asked next (the retry-once).
  #addRetry(e: { ranked: Shard[]; plan: Shard[]; next: number }, avail: Set<Shard>, failed: Shard): void {
    if (e.plan[0] !== failed) return;
    const next = e.ranked.find((s) => s !== failed && avail.has(s));
    if (next !== undefined && !e.plan.includes(next)) e.plan.splice(e.next, 0, next);
  }

  /**
   * Runs one shard call, feeding its breaker and in-flight count. Until it
   * settles the call is in `shard.waiting`: if the breaker opens meanwhile
   * (say health checks found the shard blackholed), the call is cancelled at
   * once and rejects with UNAVAILABLE, which the callers' retry-once sends
   * to the next shard, instead of waiting out the remote timeout. `retryable`
   * says whether cancelling is still safe (see WaitingCall).
   */
  async #call<T>(
    shard: Shard,
    signal: AbortSignal | undefined,
    fn: (signal: AbortSignal) => Promise<T>,
    retryable: () => boolean = () => true,
  ): Promise<T> {
    noteShard(shard.name);
    shard.inFlight++;
    const waiting: WaitingCall = { ctl: new AbortController(), retryable };
    const opened = waiting.ctl.signal;
    shard.waiting.add(waiting);
    try {
      // Raced as well, for a store that does not honour its signal.
      const result = await abortable(fn(signal === undefined ? opened : AbortSignal.any([signal, opened])), opened);
      shard.waiting.delete(waiting);
      shard.breaker.recordSuccess();
      return result;
    } catch (err) {
      shard.waiting.delete(waiting);
      // Cancelled because the breaker opened: that open already counted.
      if (opened.aborted && !signal?.aborted) throw opened.reason;
      // A call we cancelled, or an error from a stream we fed it, says
      // nothing about the shard's health.
      if (!signal?.aborted && !this.#isForeign(err)) shard.breaker.recordFailure(err);
      throw err;
    } finally {
      shard.inFlight--;
    }
  }

  /** Cancels the calls waiting on a shard whose breaker just opened (see #call). */
  #abortWaiting(shard: Shard, t: BreakerTransition): void {
    let aborted = 0;
    for (const w of shard.waiting) {
      if (!w.retryable()) continue;
      shard.waiting.delete(w);
      aborted++;
      w.ctl.abort(
        Object.assign(
          new ConnectError(`shard ${shard.name} was ${t.to === 'drained' ? 'drained' : 'opened'} while the call waited: ${t.reason}`, Code.Unavailable),
          { [OPENED]: true },
        ),
      );
    }
    if (aborted === 0) return;
    this.#abortedOnOpen += aborted;
    this.#log?.info({ shard: shard.name, aborted }, `shard ${shard.name}: cancelled ${aborted} waiting calls, to be retried elsewhere`);
  }

  /** Prefixes a shard's error with its name (errors from #abortWaiting name it already). */
  #blame(shard: Shard, err: unknown): ConnectError {
    if (err instanceof ConnectError && OPENED in err) return err;
    return withPrefix(`shard ${shard.name}`, err);
  }

  #isForeign(err: unknown): boolean {
    for (let e = err, depth = 0; typeof e === 'object' && e !== null && depth < 8; depth++) {
      if (this.#foreignErrors.has(e)) return true;
      e = (e as { cause?: unknown }).cause;
    }
    return false;
  }

  // Counts bytes read from a shard; failures mid-stream feed its breaker and
  // are tagged so a shard we relay them to is not blamed.
  async *#readStream(shard: Shard, stream: AsyncIterable<Uint8Array>, signal: AbortSignal | undefined): AsyncIterable<Uint8Array> {
    shard.inFlight++;
    try {
      for await (const chunk of stream) {
        shard.bytesOut += chunk.byteLength;
        yield chunk;
      }
    } catch (err) {
      if (!signal?.aborted) shard.breaker.recordFailure(err);
      const prefixed = withPrefix(`shard ${shard.name}`, err);
      this.#foreignErrors.add(prefixed);
      throw prefixed;
    } finally {
      shard.inFlight--;
    }
  }

  async *#writeStream(shard: Shard, chunks: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
    for await (const chunk of chunks) {
      shard.bytesIn += chunk.byteLength;
      yield chunk;
    }
  }

  #onTransition(shard: Shard, t: BreakerTransition): void {
    // Before anything else: from here on no answer of this shard's may be
    // served from the cache, and misses it owns are probed for a while.
    this.#exists.invalidate(shard);
    this.#windows.noteChange(shard, t.at);
    const fields = { shard: shard.name, from: t.from, to: t.to, reason: t.reason, manual: t.manual, backoffMs: t.backoffMs };
    if (t.to === 'closed') this.#log?.info(fields, `shard ${shard.name} is back`);
    else this.#log?.warn(fields, `shard ${shard.name} is ${t.to}`);
    if (t.to === 'closed') queueMicrotask(() => this.#kickHandoff());
    if (t.to === 'open' || t.to === 'drained') this.#abortWaiting(shard, t);
  }

  #runCheck(shard: Shard): void {
    if (shard.checking !== null || this.#closing !== null) return;
    void shard.breaker.state; // lets an elapsed backoff turn open into half-open
    const timeout = AbortSignal.timeout(this.#healthTimeoutMs);
    const signal = AbortSignal.any([this.#closer.signal, timeout]);
    const start = performance.now();
    shard.checking = (async () => {
      let error: string | null = null;
      try {
        // Race the signal too: a check that ignores it must still time out.
        await abortable(shard.check(signal), signal);
      } catch (err) {
        error = timeout.aborted ? `health check timed out after ${this.#healthTimeoutMs} ms` : toConnectError(err).message;
      }
      if (this.#closer.signal.aborted) return;
      shard.lastHealthCheckMs = Math.round(performance.now() - start);
      shard.lastHealthCheckOk = error === null;
      shard.lastHealthCheckError = error;
      shard.breaker.recordHealthCheck(error === null, error ?? '');
    })().finally(() => {
      shard.checking = null;
    });
  }

  #kickHandoff(): void {
    if (this.#closing !== null) return;
    if (this.#handoffRun !== null) {
      this.#handoffAgain = true;
      return;
    }
    this.#handoffRun = this.#handoffRound().finally(() => {
      this.#handoffRun = null;
      if (this.#handoffAgain) {
        this.#handoffAgain = false;
        this.#kickHandoff();
      }
    });
  }

  async #handoffRound(): Promise<void> {
    const ready = [...this.#hints.entries()].filter(({ value: h }) => {
      const owner = this.#byName.get(h.owner);
      const standIn = this.#byName.get(h.standIn);
      return owner !== undefined && standIn !== undefined && owner.breaker.allowsTraffic() && standIn.breaker.allowsTraffic();
    });
    await mapLimit(ready, this.#handoffConcurrency, (e) => this.#handOff(e));
  }

  /** Copies one hinted blob to its owner; never rejects. */
  async #handOff({ key, seq, value: h }: LogEntry<Hint>): Promise<void> {
    const signal = this.#closer.signal;
    if (signal.aborted) return;
    const owner = this.#byName.get(h.owner)!;
    const standIn = this.#byName.get(h.standIn)!;
    const what = { digest: namespacedName(digestString(h.digest), h.namespace), owner: owner.name, standIn: standIn.name };
    const epoch = this.#exists.epoch(owner);
    const namespace = h.namespace;
    try {
      const missing = await this.#call(owner, signal, (s) => owner.store.findMissing([h.digest], { signal: s, namespace }));
      if (missing.length > 0) {
        const stream = await this.#call(standIn, signal, (s) => standIn.store.get(h.digest, { signal: s, namespace }));
        await this.#call(owner, signal, (s) =>
          owner.store.put(h.digest, this.#writeStream(owner, this.#readStream(standIn, stream, s)), { signal: s, namespace }),
        );
      }
      this.#handoffCopied++;
      this.#exists.confirm(namespacedKey(h.digest, namespace), owner, epoch);
      this.#log?.debug(what, 'handoff: blob is on its owner');
    } catch (err) {
      if (signal.aborted) return;
      if (isInfrastructureError(err)) {
        this.#log?.debug({ ...what, err: toConnectError(err).message }, 'handoff: will retry');
        return;
      }
      // NOT_FOUND (evicted from the stand-in) or a corrupt copy: retrying
      // cannot help; the owner will get the blob from the next upload.
      this.#handoffLost++;
      this.#log?.warn({ ...what, err: toConnectError(err).message }, 'handoff: giving up on hinted blob');
    }
    try {
      // Only this version: a write that hinted the blob again meanwhile keeps its hint.
      await this.#hints.delete(key, seq);
    } catch (err) {
      this.#log?.error({ err: toConnectError(err).message }, 'hint log: could not record a completed handoff');
    }
  }
}

/**
 * Groups unsettled entries by the next shard in their plan, advancing them;
 * a fan-out entry joins the group of every shard left in its plan.
 */
function groupByNext(entries: Iterable<MissingEntry>): Map<Shard, MissingEntry[]> {
  const groups = new Map<Shard, MissingEntry[]>();
  for (const e of entries) {
    if (e.found) continue;
    const end = e.fanOut ? e.plan.length : Math.min(e.next + 1, e.plan.length);
    while (e.next < end) {
      const shard = e.plan[e.next++]!;
      e.pending++;
      const group = groups.get(shard);
      if (group === undefined) groups.set(shard, [e]);
      else group.push(e);
    }
  }
  return groups;
}

/**
 * Which entries of a group a shard's findMissing answer lists. Stores hand
 * back the digest objects they were given (remote and memory stores do),
 * which is matched by identity without building a key per digest; any other
 * answer falls back to keys.
 */
function missingTest(group: readonly MissingEntry[], missing: readonly Digest[]): (e: MissingEntry) => boolean {
  if (missing.length === 0) return () => false;
  const refs = new Set<Digest>(missing);
  let matched = 0;
  for (const e of group) if (refs.has(e.digest)) matched++;
  if (matched === refs.size) return (e) => refs.has(e.digest);
  const keys = new Set(missing.map(digestKey));
  return (e) => keys.has(digestKey(e.digest));
}

const HINT_FILE = 'hints.jsonl';

/**
 * "<hash>/<size> <standIn>" in the default namespace (as before namespaces
 * existed), "<hash>/<size>\0<namespace>\0 <standIn>" in any other: a
 * namespace has no NUL, so the key is unambiguous whatever the names hold.
 */
function hintKey(digest: Digest, standIn: string, namespace: string): string {
  return namespace === '' ? `${digestKey(digest)} ${standIn}` : `${namespacedKey(digest, namespace)}\u0000 ${standIn}`;
}

/**
 * The hint log's lines: {"op":"add"|"done", hash, size, owner, standIn, ns},
 * no sequence numbers (see DurableLogFormat). `ns`, the AC namespace, is left
 * out for the default namespace, so hint logs written before namespaces
 * existed read as "".
 */
const HINT_FORMAT: DurableLogFormat<Hint> = {
  put: (e) => hintLine('add', e.value),
  delete: (e) => hintLine('done', e.value),
  decode(line) {
    const v = JSON.parse(line) as Record<string, unknown>;
    if ((v.op !== 'add' && v.op !== 'done') || typeof v.owner !== 'string' || typeof v.standIn !== 'string') {
      return 'not a hint';
    }
    if (v.ns !== undefined && typeof v.ns !== 'string') return 'not a hint (ns is not a string)';
    const namespace = v.ns ?? '';
    const digest = parseDigest(String(v.hash), Number(v.size));
    const key = hintKey(digest, v.standIn, namespace);
    return v.op === 'add' ? { key, value: { digest, namespace, owner: v.owner, standIn: v.standIn } } : { key, deleted: true };
  },
};

function hintLine(op: 'add' | 'done', h: Hint): string {
  const ns = h.namespace === '' ? {} : { ns: h.namespace };
  return JSON.stringify({ op, hash: h.digest.hash, size: h.digest.size, owner: h.owner, standIn: h.standIn, ...ns });
}

/**
 * Re-targets loaded hints to the current ranking: after a config change a
 * blob belongs to whoever is top-ranked now; a hint whose stand-in is gone or
 * is now the owner has nothing left to do.
 */
async function retargetHints(hints: DurableLog<Hint>, shards: readonly ShardOptions[], log: Logger | undefined): Promise<void> {
  const names = new Set(shards.map((s) => s.name));
  const writes: Promise<unknown>[] = [];
  let dropped = 0;
  for (const { key, value: h } of [...hints.entries()]) {
    const owner = rank(h.digest.hash, shards)[0]!;
    if (!names.has(h.standIn) || owner === h.standIn) {
      dropped++;
      writes.push(hints.delete(key));
    } else if (owner !== h.owner) {
      writes.push(hints.append(key, { ...h, owner }));
    }
  }
  const { tornTailBytes } = hints.stats();
  if (dropped > 0 || tornTailBytes > 0) {
    log?.warn({ dropped, tornTailBytes }, 'hint log: dropped a torn tail or obsolete hints');
  }
  await Promise.all(writes);
}
