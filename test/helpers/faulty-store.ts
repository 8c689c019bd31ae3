import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from '../../src/digest.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from '../../src/stores/blob-store.ts';

/**
 * ok: pass through. unavailable: every call rejects with UNAVAILABLE.
 * blackhole: every call hangs until its signal aborts (like a peer that
 * dropped off the network). slow: every call waits `delayMs` first.
 */
export type FaultMode = 'ok' | 'unavailable' | 'blackhole' | 'slow';

/**
 * Test-only decorator that injects shard failures in front of a real store.
 * `check` is a health check with the same fault behaviour, as the remote
 * store's grpc.health.v1 check would have.
 */
export class FaultyStore implements BlobStore {
  readonly inner: BlobStore;
  mode: FaultMode = 'ok';
  delayMs = 50;
  /** When set, put() pulls one chunk and then fails with UNAVAILABLE. */
  failPutMidStream = false;
  /** When set, put() pulls one chunk and then hangs until its signal aborts (a shard that went silent mid-upload). */
  hangPutMidStream = false;
  /** False: close() leaves the inner store open (to "restart" an edge over the same shards). */
  closeInner = true;
  readonly calls = { findMissing: 0, get: 0, put: 0, check: 0 };
  /** Blackholed calls that ended because their signal aborted. */
  aborted = 0;
  closed = false;

  constructor(inner: BlobStore) {
    this.inner = inner;
  }

  readonly check = async (signal: AbortSignal): Promise<void> => {
    this.calls.check++;
    await this.#fault(signal);
  };

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    this.calls.findMissing++;
    await this.#fault(opts?.signal);
    return this.inner.findMissing(digests, opts);
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    this.calls.get++;
    await this.#fault(opts?.signal);
    return this.inner.get(digest, opts);
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    this.calls.put++;
    await this.#fault(opts?.signal);
    if (this.failPutMidStream) {
      const it = chunks[Symbol.asyncIterator]();
      await it.next();
      throw new ConnectError('injected fault: connection reset mid-upload', Code.Unavailable);
    }
    if (this.hangPutMidStream) {
      await chunks[Symbol.asyncIterator]().next();
      await this.#fault(opts?.signal, 'blackhole');
    }
    return this.inner.put(digest, chunks, opts);
  }

  describe(): StoreDescription {
    return { kind: 'faulty', mode: this.mode, children: [this.inner.describe()] };
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.closeInner) await this.inner.close();
  }

  async #fault(signal: AbortSignal | undefined, mode: FaultMode = this.mode): Promise<void> {
    switch (mode) {
      case 'ok':
        return;
      case 'unavailable':
        throw new ConnectError('injected fault: shard is down', Code.Unavailable);
      case 'slow':
        await sleep(this.delayMs, undefined, { signal });
        return;
      case 'blackhole':
        await new Promise<never>((_, reject) => {
          const fail = () => {
            this.aborted++;
            reject(new ConnectError('injected fault: blackholed call aborted', Code.DeadlineExceeded));
          };
          if (signal === undefined) return; // hangs forever, like a real blackhole
          if (signal.aborted) fail();
          else signal.addEventListener('abort', fail, { once: true });
        });
    }
  }
}
