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
