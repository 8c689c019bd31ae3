import type { StoreDescription } from '../stores/blob-store.ts';
import { shardsOf, type TreeName } from './tree.ts';

/** What drain control needs of a sharding store (ShardingStore fits). */
export interface Drainable {
  describe(): StoreDescription;
  drain(name: string): void;
  undrain(name: string): void;
}

/**
 * Drains or undrains a shard: returns how many sharding stores of the tree
 * hold a shard of that name (0: unknown shard, answered 404).
 */
export type DrainFn = (tree: TreeName, name: string, drain: boolean) => number | Promise<number>;

/**
 * The admin app's `drain` callback over the sharding stores of each tree.
 * A shard name may appear in several of them (one nested under a fallback's
 * primary, another under its secondary): it is drained wherever it appears,
 * since an operator drains a backend, not one route to it.
 *
 * Pass the ShardingStore objects; a decorator that exposes what it wraps as
 * `.inner` (MetricsStore does) is looked through.
 */
export function shardControl(stores: { readonly cas: Iterable<Drainable | Wrapper>; readonly ac: Iterable<Drainable | Wrapper> }): DrainFn {
  return (tree, name, drain) => {
    let found = 0;
    for (const given of stores[tree]) {
      const store = unwrap(given);
      if (store === undefined) continue;
      if (!shardsOf(store.describe()).some((s) => s.name === name)) continue;
      if (drain) store.drain(name);
      else store.undrain(name);
      found++;
    }
    return found;
  };
}

/** A decorator that exposes the store it wraps. */
export interface Wrapper {
  readonly inner: unknown;
}

function unwrap(store: Drainable | Wrapper): Drainable | undefined {
  let s: unknown = store;
  for (let depth = 0; depth < 8 && typeof s === 'object' && s !== null; depth++) {
    if (typeof (s as Partial<Drainable>).drain === 'function' && typeof (s as Partial<Drainable>).undrain === 'function') return s as Drainable;
    s = (s as Partial<Wrapper>).inner;
  }
  return undefined;
}
