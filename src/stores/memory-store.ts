import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from '../digest.ts';
import { digestKey, digestString, isEmptyDigest } from '../digest.ts';
import { notFound, throwIfAborted } from '../errors.ts';
import { collect, resolveRange, verifying } from '../streams.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';
import { namespacedKey } from './blob-store.ts';

export interface MemoryStoreOptions {
  /** Evict least recently used blobs beyond this many bytes. */
  readonly maxSizeBytes: number;
  /**
   * True for the CAS: content is verified against its digest. False for the
   * AC, where the key is an action digest and the value an ActionResult.
   */
  readonly contentAddressed: boolean;
}

/**
 * Blobs in RAM with an LRU size cap: the same contract as the disk store, for
 * tests and small caches. FindMissing and reads refresh recency, since Bazel
 * treats FindMissing as a lease on the blob. In the AC, entries are keyed by
 * (namespace, digest) (see CallOptions.namespace), all under one size cap;
 * the CAS ignores namespaces.
 *
 * Config: `{"memory": {"maxSizeBytes": 1073741824}}`
 */
export class MemoryStore implements BlobStore {
  // Map iteration order is insertion order: re-inserting on use makes the
  // first entry the least recently used.
  readonly #blobs = new Map<string, Uint8Array>();
  readonly #opts: MemoryStoreOptions;
  #bytes = 0;
  #evictions = 0;

  constructor(opts: MemoryStoreOptions) {
    this.#opts = opts;
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    throwIfAborted(opts?.signal);
    const missing: Digest[] = [];
    for (const d of digests) {
      if (this.#opts.contentAddressed && isEmptyDigest(d)) continue;
      if (this.#touch(this.#key(d, opts)) === undefined) missing.push(d);
    }
    return missing;
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    throwIfAborted(opts?.signal);
    let data = this.#touch(this.#key(digest, opts));
    if (data === undefined) {
      if (!(this.#opts.contentAddressed && isEmptyDigest(digest))) throw notFound(digest);
      data = new Uint8Array(0);
    }
    const { start, end } = resolveRange(data.byteLength, opts?.offset, opts?.limit);
    const slice = data.subarray(start, end);
    return (async function* () {
      if (slice.byteLength > 0) yield slice;
    })();
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    throwIfAborted(opts?.signal);
    // Keeps no partial uploads (no uploadStatus): only a whole upload will do.
    if (opts?.upload !== undefined && opts.upload.offset !== 0) {
      throw new ConnectError(
        `upload ${opts.upload.id} of blob ${digestString(digest)}: write_offset ${opts.upload.offset} is beyond the 0 bytes ` +
          'this store holds of it (it keeps no partial uploads); restart at 0',
        Code.OutOfRange,
      );
    }
    const source = this.#opts.contentAddressed ? verifying(digest, chunks) : chunks;
    // Copy: callers may reuse their buffers after put() resolves.
    const data = Uint8Array.from(await collect(source));
    throwIfAborted(opts?.signal);
    const key = this.#key(digest, opts);
    const old = this.#blobs.get(key);
    if (old !== undefined) {
      this.#bytes -= old.byteLength;
      this.#blobs.delete(key);
    }
    this.#blobs.set(key, data);
    this.#bytes += data.byteLength;
    this.#evict(key);
  }

  describe(): StoreDescription {
    return {
      kind: 'memory',
      blobs: this.#blobs.size,
      bytes: this.#bytes,
      maxSizeBytes: this.#opts.maxSizeBytes,
      evictions: this.#evictions,
    };
  }

  async close(): Promise<void> {
    this.#blobs.clear();
    this.#bytes = 0;
  }

  #key(digest: Digest, opts: CallOptions | undefined): string {
    return this.#opts.contentAddressed ? digestKey(digest) : namespacedKey(digest, opts?.namespace);
  }

  #touch(key: string): Uint8Array | undefined {
    const data = this.#blobs.get(key);
    if (data !== undefined) {
      this.#blobs.delete(key);
      this.#blobs.set(key, data);
    }
    return data;
  }

  #evict(keep: string): void {
    for (const [key, data] of this.#blobs) {
      if (this.#bytes <= this.#opts.maxSizeBytes) break;
      if (key === keep) continue;
      this.#blobs.delete(key);
      this.#bytes -= data.byteLength;
      this.#evictions++;
    }
  }
}
