export interface ExistenceCacheOptions {
  /** Most digests remembered; 0 turns the cache off. Default 100000 (~16 MB). */
  readonly maxEntries?: number | undefined;
  /** How long a confirmation is believed; 0 turns the cache off. Default 10 s. */
  readonly ttlMs?: number | undefined;
  /** Clock in ms; injectable for tests. Default Date.now. */
  readonly now?: (() => number) | undefined;
}

export const DEFAULT_EXISTENCE_CACHE_MAX_ENTRIES = 100_000;
export const DEFAULT_EXISTENCE_CACHE_TTL_MS = 10_000;

interface Entry<H> {
  readonly holder: H;
  /** The holder's epoch when the confirming call started. */
  readonly epoch: number;
  readonly expiresAt: number;
}

/**
 * Remembers, for a short while, which holder (a shard) last CONFIRMED that it
 * has a digest: it answered FindMissing "present", served a read, or
 * acknowledged a write. Only positives are kept; a miss is never remembered.
 * The sharding store asks it before asking shards, so repeated FindMissing
 * calls and the completeness check of GetActionResult skip the shard hop.
 *
 * An entry is believed only while all of these hold (the caller checks the
 * last one, since only it knows where a read would go):
 * - it is younger than `ttlMs`, counted from the confirmation, never renewed
 *   by a hit;
 * - the holder's epoch has not moved since the confirming call STARTED:
 *   invalidate() bumps it on any breaker transition (drains included), so
 *   every entry of that holder dies at once, and so does a late answer of a
 *   call that was in flight across the transition;
 * - the holder has not said NOT_FOUND for it since (forget());
 * - the holder is still one a read would ask (owner, hinted stand-in or
 *   probed shard).
 *
 * The catch, bounded by `ttlMs`: a storage node treats FindMissing (and
 * reads) as a lease and refreshes the blob's LRU recency; an answer from here
 * skips that refresh, so a blob's recency on its shard may lag by up to
 * `ttlMs`, and a blob the shard evicts (or loses in a restart too quick for
 * its breaker to notice) within `ttlMs` of its confirmation is still reported
 * present until the entry expires. Both need a shard that churns its whole
 * LRU in seconds, where every FindMissing answer is already that short-lived.
 * The default of 10 s covers the bursts that repeat questions (many clients
 * asking for the same action results, an upload followed by its
 * UpdateActionResult and GetActionResult) and is far below any sane
 * eviction horizon.
 *
 * Bounded: at most `maxEntries`; a confirmation moves its digest to the
 * young end and the oldest confirmations are dropped first (with one TTL for
 * all, those are also the soonest to expire), a sixteenth of the bound at a
 * time. Expired entries are dropped when looked up or evicted.
 */
export class ExistenceCache<H extends object> {
  readonly #maxEntries: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry<H>>();
  readonly #epochs = new Map<H, number>();
  #hits = 0;
  #confirmations = 0;
  #invalidations = 0;

  constructor(opts: ExistenceCacheOptions = {}) {
    this.#maxEntries = Math.max(0, Math.floor(opts.maxEntries ?? DEFAULT_EXISTENCE_CACHE_MAX_ENTRIES));
    this.#ttlMs = Math.max(0, opts.ttlMs ?? DEFAULT_EXISTENCE_CACHE_TTL_MS);
    this.#now = opts.now ?? Date.now;
  }

  get enabled(): boolean {
    return this.#maxEntries > 0 && this.#ttlMs > 0;
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The holder's current epoch: take it before a call whose answer may confirm(). */
  epoch(holder: H): number {
    return this.#epochs.get(holder) ?? 0;
  }

  /**
   * Records that `holder` has `key`, as answered by a call that started at
   * `epoch`; ignored if the holder's epoch moved since (the answer predates
   * a breaker transition).
   */
  confirm(key: string, holder: H, epoch: number): void {
    if (!this.enabled || epoch !== this.epoch(holder)) return;
    const now = this.#now();
    this.#entries.delete(key);
    this.#entries.set(key, { holder, epoch, expiresAt: now + this.#ttlMs });
    this.#confirmations++;
    if (this.#entries.size > this.#maxEntries) this.#evict(now);
  }

  // Drops the oldest entries, and any expired ones after them, down to 15/16
  // of the bound: one sweep per many inserts, not an iterator per insert.
  #evict(now: number): void {
    const target = this.#maxEntries - (this.#maxEntries >>> 4);
    for (const [k, e] of this.#entries) {
      if (this.#entries.size <= target && e.expiresAt > now) break;
      this.#entries.delete(k);
    }
  }

  /** The holder that confirmed `key`, if that confirmation is still believed (see the class comment). */
  holder(key: string): H | undefined {
    const e = this.#entries.get(key);
    if (e === undefined) return undefined;
    if (e.expiresAt <= this.#now() || e.epoch !== this.epoch(e.holder)) {
      this.#entries.delete(key);
      return undefined;
    }
    return e.holder;
  }

  /** Counts an answer given from the cache (for describe()). */
  hit(): void {
    this.#hits++;
  }

  /** `holder` said NOT_FOUND for `key`: its confirmation, if any, is void. */
  forget(key: string, holder: H): void {
    if (this.#entries.size > 0 && this.#entries.get(key)?.holder === holder) this.#entries.delete(key);
  }

  /** Voids every confirmation by `holder` (its breaker changed state). */
  invalidate(holder: H): void {
    this.#epochs.set(holder, this.epoch(holder) + 1);
    this.#invalidations++;
    if (!this.enabled) return;
    // The epoch already voids them; dropping them now frees the memory.
    for (const [k, e] of this.#entries) if (e.holder === holder) this.#entries.delete(k);
  }

  describe(): Record<string, number> {
    return {
      entries: this.#entries.size,
      maxEntries: this.#maxEntries,
      ttlMs: this.#ttlMs,
      hits: this.#hits,
      confirmations: this.#confirmations,
      invalidations: this.#invalidations,
    };
  }
}
