import { Code, ConnectError } from '@connectrpc/connect';

export interface ReplayableUploadOptions {
  /**
   * Errors thrown by the client's own stream are added here, so that a store
   * which sees one come back from a child can tell that the child is not to
   * blame (the error may come back wrapped: look along its `cause` chain).
   */
  readonly clientErrors?: WeakSet<object> | undefined;
}

/**
 * Lets a single-use upload be written again, whole, to another store when the
 * first one fails: the sharding store retries a failed shard's write on the
 * next shard, the fallback store hands a failed primary's write to the
 * secondary. Chunks pulled from the client's stream are kept (up to `limit`
 * bytes) and replayed to the next consumer, which then continues pulling from
 * the client's stream. Once more than `limit` bytes were pulled, the upload
 * can no longer be replayed (`replayable` is false).
 *
 * A consumer that was given up on (its call cancelled) may still be waiting
 * on the client's stream when the next one starts; pulls are therefore
 * shared: at most one is in flight, each pulled chunk is recorded before any
 * consumer sees it, and every consumer reads the chunks by position, so none
 * is skipped or sent twice (a cancelled consumer cannot steal a chunk the
 * retry needs). Each stream() (and detach()) cuts off the consumers before
 * it: their next read fails with ABORTED.
 *
 * The catch: the client's stream is pulled only as fast as the current
 * consumer reads; call dispose() once the upload is settled, or the client's
 * stream is never released.
 */
export class ReplayableUpload {
  readonly #it: AsyncIterator<Uint8Array>;
  readonly #limit: number;
  readonly #clientErrors: WeakSet<object> | undefined;
  // Chunks 0..#pulled-1 while not overflowed.
  readonly #kept: Uint8Array[] = [];
  #keptBytes = 0;
  #pulled = 0;
  // Chunk #pulled-1, kept even after an overflow for the consumer waiting on it.
  #last: Uint8Array | undefined;
  #overflowed = false;
  #done = false;
  #error: { readonly err: unknown } | undefined;
  #pull: Promise<void> | null = null;
  #epoch = 0;

  constructor(source: AsyncIterable<Uint8Array>, limit: number, opts?: ReplayableUploadOptions) {
    this.#it = source[Symbol.asyncIterator]();
    this.#limit = limit;
    this.#clientErrors = opts?.clientErrors;
  }

  /** True while everything pulled so far can be handed to a new consumer. */
  get replayable(): boolean {
    return !this.#overflowed;
  }

  /** True when the client's own stream failed: no consumer is to blame. */
  get failed(): boolean {
    return this.#error !== undefined;
  }

  /**
   * The whole upload from its start, for a new consumer; cuts off the ones
   * before it. Ending it early (return()) does not end the client's stream.
   */
  stream(): AsyncIterable<Uint8Array> {
    const epoch = ++this.#epoch;
    return (async function* (self: ReplayableUpload) {
      for (let pos = 0; ; ) {
        if (epoch !== self.#epoch) throw new ConnectError('upload was handed to another store', Code.Aborted);
        if (pos < self.#pulled) {
          const chunk = !self.#overflowed ? self.#kept[pos] : pos === self.#pulled - 1 ? self.#last : undefined;
          if (chunk === undefined) throw new ConnectError('upload can no longer be replayed', Code.Aborted);
          pos++;
          yield chunk;
          continue;
        }
        if (self.#error !== undefined) throw self.#error.err;
        if (self.#done) return;
        await (self.#pull ??= self.#next());
      }
    })(this);
  }

  /**
   * Cuts off every consumer and waits for a pull left in flight to land, so
   * that `failed` and `replayable` account for everything pulled.
   */
  async detach(): Promise<void> {
    this.#epoch++;
    await this.#pull?.catch(() => {});
  }

  /** Releases the client's stream if no consumer read it to its end. Idempotent. */
  dispose(): void {
    this.#kept.length = 0;
    this.#last = undefined;
    if (!this.#done) {
      this.#done = true;
      this.#it.return?.()?.catch(() => {});
    }
  }

  async #next(): Promise<void> {
    try {
      const r = await this.#it.next();
      if (r.done === true) {
        this.#done = true;
        return;
      }
      this.#pulled++;
      this.#last = r.value;
      if (!this.#overflowed) {
        this.#keptBytes += r.value.byteLength;
        if (this.#keptBytes > this.#limit) {
          this.#overflowed = true;
          this.#kept.length = 0;
        } else {
          this.#kept.push(r.value);
        }
      }
    } catch (err) {
      // The client's own upload failed: no consumer is to blame.
      if (typeof err === 'object' && err !== null) this.#clientErrors?.add(err);
      this.#error = { err };
      throw err;
    } finally {
      this.#pull = null;
    }
  }
}

export interface TeeUploadOptions {
  /**
   * Bytes the fastest branch may read ahead of the slowest one. Pulled chunks
   * are held only until every branch still reading has taken them, so this
   * (plus one chunk) bounds what the tee keeps. 0: lockstep. Default 1 MiB.
   */
  readonly windowBytes?: number | undefined;
  /** As ReplayableUploadOptions.clientErrors: errors of the client's own stream are added here. */
  readonly clientErrors?: WeakSet<object> | undefined;
}

/**
 * One read of a client's upload handed to several consumers at once (the
 * fallback store's synchronous mode writes it to the primary and the
 * secondary in parallel). Each branch() sees every chunk, in order; the
 * client's stream is pulled once per chunk, only when the slowest branch
 * still reading is within `windowBytes` of the fastest, so the slower
 * consumer sets the pace and the blob is never held whole.
 *
 * A branch stops counting once release()d (call it when that consumer's
 * write settled, whatever the outcome: a store may finish early, or fail,
 * without reading its stream to the end), or when its iterator is returned;
 * the others then go on at their own pace. An error of the client's stream
 * reaches every branch (`failed` is then true).
 *
 * The catch: a consumer that neither reads nor settles (a hung backend)
 * holds the others back once they are a window ahead; the caller bounds that
 * with the consumers' own deadlines or by aborting them.
 */
export class TeeUpload {
  readonly #it: AsyncIterator<Uint8Array>;
  readonly #window: number;
  readonly #clientErrors: WeakSet<object> | undefined;
  // Chunks #base..#pulled-1, held until every live branch has taken them.
  readonly #held: Uint8Array[] = [];
  #heldBytes = 0;
  #base = 0;
  #pulled = 0;
  // Per branch: the index of its next chunk; Infinity once released.
  readonly #pos: number[];
  #done = false;
  #error: { readonly err: unknown } | undefined;
  #pull: Promise<void> | null = null;
  #wake: Wake = wake();

  constructor(source: AsyncIterable<Uint8Array>, branches: number, opts?: TeeUploadOptions) {
    this.#it = source[Symbol.asyncIterator]();
    this.#window = Math.max(0, opts?.windowBytes ?? 1024 * 1024);
    this.#clientErrors = opts?.clientErrors;
    this.#pos = Array.from({ length: branches }, () => 0);
  }

  /** True when the client's own stream failed: no consumer is to blame. */
  get failed(): boolean {
    return this.#error !== undefined;
  }

  /** The client's error, when `failed`. */
  get error(): unknown {
    return this.#error?.err;
  }

  /** Bytes held for branches that have not taken them yet (for tests). */
  get heldBytes(): number {
    return this.#heldBytes;
  }

  /** Branch `i` (0 <= i < branches): the whole upload, once. */
  branch(i: number): AsyncIterable<Uint8Array> {
    if (!(i >= 0 && i < this.#pos.length)) throw new RangeError(`tee: no branch ${i}`);
    return (async function* (self: TeeUpload) {
      try {
        for (;;) {
          const pos = self.#pos[i]!;
          if (pos === Number.POSITIVE_INFINITY) throw new ConnectError('upload branch was released', Code.Aborted);
          if (pos < self.#pulled) {
            const chunk = self.#held[pos - self.#base]!;
            self.#pos[i] = pos + 1;
            self.#trim();
            yield chunk;
            continue;
          }
          if (self.#error !== undefined) throw self.#error.err;
          if (self.#done) return;
          if (self.#pull === null && self.#held.length > 0 && self.#heldBytes >= self.#window) {
            // A window ahead of the slowest branch: wait for it to take chunks.
            await self.#wake.promise;
            continue;
          }
          await (self.#pull ??= self.#next()).catch(() => {});
        }
      } finally {
        self.release(i);
      }
    })(this);
  }

  /** Branch `i` no longer reads; the others stop waiting for it. Idempotent. */
  release(i: number): void {
    if (this.#pos[i] === Number.POSITIVE_INFINITY) return;
    this.#pos[i] = Number.POSITIVE_INFINITY;
    this.#trim();
    this.#notify();
    if (this.#pos.every((p) => p === Number.POSITIVE_INFINITY)) this.dispose();
  }

  /** Releases every branch and the client's stream if it was not read to its end. Idempotent. */
  dispose(): void {
    for (let i = 0; i < this.#pos.length; i++) this.#pos[i] = Number.POSITIVE_INFINITY;
    this.#held.length = 0;
    this.#heldBytes = 0;
    this.#base = this.#pulled;
    if (!this.#done) {
      this.#done = true;
      this.#it.return?.()?.catch(() => {});
    }
    this.#notify();
  }

  #trim(): void {
    const slowest = Math.min(...this.#pos);
    let dropped = false;
    while (this.#base < slowest && this.#held.length > 0) {
      this.#heldBytes -= this.#held.shift()!.byteLength;
      this.#base++;
      dropped = true;
    }
    if (dropped) this.#notify();
  }

  #notify(): void {
    const w = this.#wake;
    this.#wake = wake();
    w.resolve();
  }

  async #next(): Promise<void> {
    try {
      const r = await this.#it.next();
      if (this.#done) return; // disposed meanwhile
      if (r.done === true) {
        this.#done = true;
        return;
      }
      this.#held.push(r.value);
      this.#heldBytes += r.value.byteLength;
      this.#pulled++;
      this.#trim(); // every branch may have been released meanwhile
    } catch (err) {
      if (typeof err === 'object' && err !== null) this.#clientErrors?.add(err);
      this.#error = { err };
      throw err;
    } finally {
      this.#pull = null;
      this.#notify();
    }
  }
}

interface Wake {
  readonly promise: Promise<void>;
  readonly resolve: () => void;
}

function wake(): Wake {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}
