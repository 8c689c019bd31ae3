import { EventEmitter } from 'node:events';
import type { StoreDescription } from '../stores/blob-store.ts';
import { TREE_NAMES, rec, shardsOf, walkTree, type TreeDescriptions, type TreeName } from './tree.ts';

/** A breaker state change seen by comparing two describe() snapshots. */
export interface ObservedTransition {
  readonly tree: TreeName;
  /** Path of the sharding (or fallback) node in its tree; see walkTree. */
  readonly store: string;
  /** Shard name; 'primary' for a fallback store's breaker. */
  readonly shard: string;
  readonly from: string;
  readonly to: string;
  /** An operator's doing: a drain, or the undrain that ended one. */
  readonly manual: boolean;
  readonly reason: string;
  readonly at: number;
}

interface Seen {
  readonly state: string;
  readonly since: number;
}

/**
 * Polls describe() of both trees and reports every breaker whose state (or
 * `since`) changed, for the transitions counter and for pushing the admin
 * page at once rather than on its next 1 s tick.
 *
 * Why poll: the breakers live inside ShardingStore and FallbackStore, which
 * expose their state only through describe(); describe() is cheap and
 * synchronous, so a 250 ms poll costs little. The catch: changes that undo
 * each other between two polls (open -> half-open -> open) are seen as one
 * transition with from === to, and a counter can undercount under a storm.
 * Call poll() whenever something may have changed (a drain, an event from a
 * store) to see it without waiting.
 */
export class StateWatcher extends EventEmitter<{ transition: [ObservedTransition]; change: [] }> {
  readonly #describe: () => TreeDescriptions;
  readonly #seen = new Map<string, Seen>();
  #timer: NodeJS.Timeout | undefined;
  #primed = false;

  constructor(describe: () => TreeDescriptions, intervalMs: number) {
    super();
    this.#describe = describe;
    this.poll(); // the baseline: a change right after start is still seen
    if (intervalMs > 0) this.#timer = setInterval(() => this.poll(), intervalMs).unref();
  }

  /** Compares the current snapshot with the last one; emits what changed. */
  poll(): void {
    let trees: TreeDescriptions;
    try {
      trees = this.#describe();
    } catch {
      return; // a tree being closed; the next poll will tell
    }
    const found: ObservedTransition[] = [];
    const live = new Set<string>();
    for (const tree of TREE_NAMES) {
      walkTree(trees[tree], (node, path) => {
        for (const b of breakersOf(node)) {
          const key = `${tree}\u0000${path}\u0000${b.shard}`;
          live.add(key);
          const prev = this.#seen.get(key);
          this.#seen.set(key, { state: b.state, since: b.since });
          if (prev === undefined || !this.#primed) continue;
          if (prev.state === b.state && prev.since === b.since) continue;
          found.push({
            tree,
            store: path,
            shard: b.shard,
            from: prev.state,
            to: b.state,
            manual: b.state === 'drained' || (prev.state === 'drained' && b.state !== 'open'),
            reason: b.reason,
            at: b.since,
          });
        }
      });
    }
    for (const key of this.#seen.keys()) if (!live.has(key)) this.#seen.delete(key);
    this.#primed = true;
    for (const t of found) this.emit('transition', t);
    if (found.length > 0) this.emit('change');
  }

  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.removeAllListeners();
  }
}

interface BreakerView {
  readonly shard: string;
  readonly state: string;
  readonly since: number;
  readonly reason: string;
}

/** The breakers a node reports: one per shard of a sharding store, the primary's (and in sync mode the secondary's) of a fallback store. */
export function breakersOf(node: StoreDescription): BreakerView[] {
  if (node.kind === 'sharding') {
    return shardsOf(node).map((s) => ({ shard: s.name, state: s.state, since: s.since, reason: s.reason ?? '' }));
  }
  if (node.kind === 'fallback') {
    // The primary's breaker; in sync mode the secondary's too.
    const out: BreakerView[] = [];
    for (const [shard, field] of [['primary', 'breaker'], ['secondary', 'secondaryBreaker']] as const) {
      const b = rec(node, field);
      if (b !== undefined && typeof b.state === 'string' && typeof b.since === 'number') {
        out.push({ shard, state: b.state, since: b.since, reason: typeof b.reason === 'string' ? b.reason : '' });
      }
    }
    return out;
  }
  return [];
}
