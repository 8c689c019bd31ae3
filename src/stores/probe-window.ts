/**
 * Decides, per digest, whether a miss on its owner is worth probing on the
 * next-ranked shards, for the sharding store's reads and FindMissing alike.
 *
 * When can a probe find anything? A blob B sits on a shard X ranked below
 * its current owner O (the first shard in B's ranking that takes traffic)
 * only if whoever wrote it could not write to O at the time:
 * - this edge, while O was open or drained: every such write is a stand-in
 *   write with a durable hint, and hints are followed whether or not a probe
 *   window is open, until the handoff has put B on O. No probe is needed.
 * - another edge (or this edge's earlier life, or an edge with an older
 *   shard list) whose view of O differed. Writers seeing O down usually means
 *   this edge saw O change state too, and then the blob is on the stand-in
 *   until that writer's handoff copies it back, soon after O returns.
 *
 * So a miss is probed only when its owner O changed state (any breaker
 * transition) within `windowMs`, or within `windowMs` of this edge's start
 * (it cannot know what happened before). Transitions of other shards cannot
 * put B below O, so they no longer turn probing on for every digest: a shard
 * flapping no longer triples FindMissing for the whole key space, only for
 * the keys it owns. Outside these windows a blob written around an O this
 * edge never saw fail is reported missing, which is always safe: Bazel
 * uploads it again.
 */
export class ProbeWindows<S extends object> {
  readonly #windowMs: number;
  readonly #now: () => number;
  readonly #startedAt: number;
  readonly #changedAt = new Map<S, number>();
  #lastChangeAt = -Infinity;

  constructor(windowMs: number, now: () => number) {
    this.#windowMs = Math.max(0, windowMs);
    this.#now = now;
    this.#startedAt = now();
  }

  /** A breaker transition of `shard` at `at`. */
  noteChange(shard: S, at: number): void {
    this.#changedAt.set(shard, at);
    this.#lastChangeAt = Math.max(this.#lastChangeAt, at);
  }

  /** Whether misses on `owner` are probed now; `now` may be passed to read the clock once per call. */
  covers(owner: S, now = this.#now()): boolean {
    if (now - this.#startedAt < this.#windowMs) return true;
    return now - (this.#changedAt.get(owner) ?? -Infinity) < this.#windowMs;
  }

  /** Whether any window is open (for describe()). */
  anyOpen(now = this.#now()): boolean {
    return now - Math.max(this.#startedAt, this.#lastChangeAt) < this.#windowMs;
  }

  /** The shards whose window is open now, by name (for describe()). */
  openFor(name: (s: S) => string, now = this.#now()): string[] {
    if (now - this.#startedAt < this.#windowMs) return ['*'];
    return [...this.#changedAt].filter(([, at]) => now - at < this.#windowMs).map(([s]) => name(s));
  }
}
