/**
 * A small map with a size cap (least recently used entries go first) and a
 * time to live per entry. A Map keeps insertion order, so re-inserting on
 * every hit makes its first key the least recently used.
 */
export class TtlLru<K, V> {
  readonly #max: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  readonly #map = new Map<K, { value: V; expires: number }>();

  constructor(opts: { readonly maxEntries: number; readonly ttlMs: number; readonly now?: (() => number) | undefined }) {
    this.#max = Math.max(0, Math.floor(opts.maxEntries));
    this.#ttlMs = opts.ttlMs;
    this.#now = opts.now ?? (() => performance.now());
  }

  get size(): number {
    return this.#map.size;
  }

  get(key: K): V | undefined {
    const e = this.#map.get(key);
    if (e === undefined) return undefined;
    this.#map.delete(key);
    if (e.expires <= this.#now()) return undefined;
    this.#map.set(key, e);
    return e.value;
  }

  set(key: K, value: V): void {
    if (this.#max === 0) return;
    this.#map.delete(key);
    this.#map.set(key, { value, expires: this.#now() + this.#ttlMs });
    while (this.#map.size > this.#max) this.#map.delete(this.#map.keys().next().value as K);
  }
}
