import type { Digest } from '../../src/digest.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from '../../src/stores/blob-store.ts';

/**
 * Test-only pass-through whose backend can be replaced, e.g. by a fresh
 * empty MemoryStore to play a shard that comes back without its data.
 * `keepOnClose` leaves the backend open, to simulate a process restart in
 * front of stores that outlive it.
 */
export class SwappableStore implements BlobStore {
  target: BlobStore;
  keepOnClose = false;

  constructor(target: BlobStore) {
    this.target = target;
  }

  findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    return this.target.findMissing(digests, opts);
  }

  get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    return this.target.get(digest, opts);
  }

  put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    return this.target.put(digest, chunks, opts);
  }

  describe(): StoreDescription {
    return { kind: 'swappable', children: [this.target.describe()] };
  }

  async close(): Promise<void> {
    if (!this.keepOnClose) await this.target.close();
  }
}
