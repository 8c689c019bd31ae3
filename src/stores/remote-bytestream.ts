// ByteStream Read and Write to a shard, framed by hand on the shard's HTTP/2
// session (src/grpc/), the client half of the fast path: a read yields views
// of the bytes HTTP/2 delivered, a write sends each chunk behind a few header
// bytes, so relaying a blob through the edge copies nothing and builds no
// protobuf-es object per message. Every other shard call uses Connect.
import { randomUUID } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from '../digest.ts';
import { digestString } from '../digest.ts';
import { GrpcClientCall } from '../grpc/client-call.ts';
import { decodeWriteResponse, encodeReadRequest, writeRequestHeader } from '../grpc/bytestream-codec.ts';
import type { ShardTransport } from '../transport.ts';
import type { UploadRef } from './blob-store.ts';

const READ_METHOD = '/google.bytestream.ByteStream/Read';
const WRITE_METHOD = '/google.bytestream.ByteStream/Write';

/** Largest single response message accepted from a shard. */
const READ_MAX_BYTES = 64 * 1024 * 1024;

/** What the fast-path calls need from their RemoteStore. */
export interface ByteStreamDeps {
  readonly transport: ShardTransport;
  /** "" or "instance/" in front of every resource name. */
  readonly resourcePrefix: string;
  /** Deadline for the first message of a read and for the shard's answer to a write. */
  readonly timeoutMs: number;
  /** Longest wait for the shard to send (read) or accept (write) more data. */
  readonly stallMs: number;
  /** Data per WriteRequest; smaller chunks are coalesced. */
  readonly writeChunkBytes: number;
  begin(): void;
  end(): void;
  received(n: number): void;
  sent(n: number): void;
  /** Maps, counts and prefixes an error; the caller's cancellation stays CANCELED. */
  fail(err: unknown, callerSignal: AbortSignal | undefined): ConnectError;
}

/**
 * One ByteStream Read of [start, end) of a blob. open() resolves once the
 * first message (or the end of an empty range) arrived, so NOT_FOUND and
 * UNAVAILABLE reject before the caller commits to this shard. Then it hands
 * out data as the consumer asks: HTTP/2 flow control holds the shard back
 * meanwhile, so at most a window of data is buffered, never a whole blob.
 * A read that ends short of the range, or returns more, fails with INTERNAL.
 *
 * An iterator object rather than a generator, so that return() before the
 * first next() still cancels the call.
 */
export class ShardRead implements AsyncIterableIterator<Uint8Array> {
  readonly #deps: ByteStreamDeps;
  readonly #digest: Digest;
  readonly #start: number;
  readonly #expected: number;
  readonly #callerSignal: AbortSignal | undefined;
  #call: GrpcClientCall | undefined;
  #first: Buffer | null | undefined; // null: the response ended
  #received = 0;
  #done = false;
  #onAbort: (() => void) | undefined;

  constructor(deps: ByteStreamDeps, digest: Digest, start: number, end: number, callerSignal: AbortSignal | undefined) {
    this.#deps = deps;
    this.#digest = digest;
    this.#start = start;
    this.#expected = end - start;
    this.#callerSignal = callerSignal;
  }

  async open(): Promise<void> {
    this.#deps.begin();
    try {
      const signal = this.#callerSignal;
      if (signal?.aborted) throw signal.reason;
      const stream = await this.#deps.transport.openGrpcStream(READ_METHOD);
      // Data is handed up as views of the DATA frames (16 KiB from a node
      // shard). Joining them into larger chunks was measured and lost: the
      // copies into fresh buffers cost more than the extra passes up the tree.
      const call = new GrpcClientCall(stream, READ_MAX_BYTES, { readResponseData: true });
      this.#call = call;
      if (signal !== undefined) {
        this.#onAbort = () => call.cancel(new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, signal.reason));
        signal.addEventListener('abort', this.#onAbort, { once: true });
      }
      const digest = this.#digest;
      await call.send(
        encodeReadRequest({
          resourceName: `${this.#deps.resourcePrefix}blobs/${digest.hash}/${digest.size}`,
          readOffset: BigInt(this.#start),
          readLimit: BigInt(this.#expected),
        }),
      );
      call.endRequest();
      this.#first = (await this.#pull(this.#deps.timeoutMs, 'shard sent no data')) ?? null;
    } catch (err) {
      this.#finish();
      throw this.#deps.fail(err, this.#callerSignal);
    }
  }

  async next(): Promise<IteratorResult<Uint8Array>> {
    if (this.#done) return { done: true, value: undefined };
    try {
      for (;;) {
        let msg = this.#first;
        this.#first = undefined;
        if (msg === undefined) msg = (await this.#pull(this.#deps.stallMs, 'shard sent no data')) ?? null;
        if (msg === null) {
          if (this.#received !== this.#expected) {
            throw new ConnectError(
              `read of ${digestString(this.#digest)} at offset ${this.#start} ended after ${this.#received} of ${this.#expected} bytes`,
              Code.Internal,
            );
          }
          this.#finish();
          return { done: true, value: undefined };
        }
        const data = msg;
        if (data.byteLength === 0) continue;
        this.#received += data.byteLength;
        this.#deps.received(data.byteLength);
        if (this.#received > this.#expected) {
          throw new ConnectError(
            `read of ${digestString(this.#digest)} at offset ${this.#start} returned more than ${this.#expected} bytes`,
            Code.Internal,
          );
        }
        return { done: false, value: data };
      }
    } catch (err) {
      this.#call?.cancel(new ConnectError('read failed', Code.Canceled));
      this.#finish();
      throw this.#deps.fail(err, this.#callerSignal);
    }
  }

  async return(): Promise<IteratorResult<Uint8Array>> {
    if (!this.#done) {
      // The consumer stopped early: cancel the shard call.
      this.#call?.cancel(new ConnectError('consumer stopped reading', Code.Canceled));
      this.#finish();
    }
    return { done: true, value: undefined };
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Uint8Array> {
    return this;
  }

  /**
   * The next data, failing with DEADLINE_EXCEEDED after `ms` without any.
   * One timer per read, re-armed per pull: cheaper than a new one each time.
   */
  async #pull(ms: number, what: string): Promise<Buffer | undefined> {
    const call = this.#call!;
    if (this.#timer === undefined || this.#timerMs !== ms) {
      clearTimeout(this.#timer);
      this.#timerMs = ms;
      this.#timer = setTimeout(() => {
        if (this.#pulling) call.cancel(new ConnectError(`${what} for ${ms} ms`, Code.DeadlineExceeded));
      }, ms);
    } else {
      this.#timer.refresh();
    }
    this.#pulling = true;
    try {
      return await call.next();
    } finally {
      this.#pulling = false;
    }
  }

  #timer: NodeJS.Timeout | undefined;
  #timerMs = 0;
  /** True while waiting on the shard; the stall timer fires only then. */
  #pulling = false;

  #finish(): void {
    if (this.#done) return;
    this.#done = true;
    clearTimeout(this.#timer);
    if (this.#onAbort !== undefined) this.#callerSignal?.removeEventListener('abort', this.#onAbort);
    this.#deps.end();
  }
}

/**
 * Uploads a blob with ByteStream Write, in messages of at most writeChunkBytes
 * (see messageChunks).
 * finish_write goes out only once the source is known to be done, so a
 * source that turns out longer than the digest fails the upload before the
 * shard could commit it. An early answer (the shard already had the blob)
 * ends the upload at once. Errors of the caller's own stream win over
 * whatever the aborted call reports.
 *
 * With `upload` (a resumable upload, see PutOptions.upload) the resource name
 * carries the client's upload id instead of a fresh one, so the shard keeps
 * the prefix of an interrupted upload under the id the client will ask
 * about, and the chunks are the blob from `upload.offset` on, sent at that
 * write_offset (the shard refuses an offset that is not its kept prefix).
 */
export async function shardWrite(
  deps: ByteStreamDeps,
  digest: Digest,
  chunks: AsyncIterable<Uint8Array>,
  callerSignal: AbortSignal | undefined,
  upload?: UploadRef | undefined,
): Promise<void> {
  const resourceName = uploadResourceName(deps, upload?.id ?? randomUUID(), digest);
  const start = upload?.offset ?? 0;
  let call: GrpcClientCall | undefined;
  let timer: NodeJS.Timeout | undefined;
  const arm = (ms: number, what: string) => {
    clearTimeout(timer);
    timer = setTimeout(() => call?.cancel(new ConnectError(`${what} in ${ms} ms`, Code.DeadlineExceeded)), ms);
  };
  const disarm = () => clearTimeout(timer);
  const onAbort = () => call?.cancel(new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, callerSignal?.reason));
  let sourceError: unknown;
  const pieces = messageChunks(chunks, deps.writeChunkBytes)[Symbol.asyncIterator]();
  const pull = async () => {
    try {
      return await pieces.next();
    } catch (err) {
      sourceError = err;
      throw err;
    }
  };

  deps.begin();
  callerSignal?.addEventListener('abort', onAbort, { once: true });
  try {
    if (callerSignal?.aborted) throw callerSignal.reason;
    arm(deps.timeoutMs, 'shard did not accept the upload');
    const stream = await deps.transport.openGrpcStream(WRITE_METHOD);
    call = new GrpcClientCall(stream, READ_MAX_BYTES);
    if (callerSignal?.aborted) onAbort();
    let offset = start;
    let r = await pull();
    if (r.done && start === digest.size && start > 0) {
      // A resumption with nothing left to send: finish_write alone completes it.
      await call.send(writeRequestHeader(resourceName, offset, true, 0));
    }
    while (!r.done) {
      const data = r.value;
      const end = offset + data.byteLength;
      if (end > digest.size) throw (sourceError = tooLong(digest));
      const last = end === digest.size;
      if (last) {
        const more = await pull();
        if (!more.done) throw (sourceError = tooLong(digest));
      }
      if (call.statusReceived) break; // the shard answered early: it has the blob
      arm(deps.stallMs, 'shard accepted no upload data');
      await call.send(writeRequestHeader(offset === start ? resourceName : '', offset, last, data.byteLength), data);
      deps.sent(data.byteLength);
      offset = end;
      if (last) break;
      disarm();
      r = await pull();
    }
    if (offset !== digest.size && !call.statusReceived) {
      throw (sourceError = new ConnectError(
        `blob ${digestString(digest)}: received ${offset} bytes, digest says ${digest.size}`,
        Code.InvalidArgument,
      ));
    }
    call.endRequest();
    arm(deps.timeoutMs, 'shard did not confirm the upload');
    const msg = await call.next();
    if (msg === undefined) throw new ConnectError('the shard ended the upload without a WriteResponse', Code.Internal);
    const committed = decodeWriteResponse(msg);
    if ((await call.next()) !== undefined) throw new ConnectError('the shard sent more than one WriteResponse', Code.Internal);
    // committed_size is the blob size, also when the shard already had the
    // blob and answered early; -1 is allowed for compressed uploads only.
    if (committed !== BigInt(digest.size)) {
      throw new ConnectError(`upload of ${digestString(digest)} ended with committed_size ${committed}`, Code.Internal);
    }
  } catch (err) {
    call?.cancel(new ConnectError('upload failed', Code.Canceled));
    throw deps.fail(sourceError ?? err, callerSignal);
  } finally {
    disarm();
    callerSignal?.removeEventListener('abort', onAbort);
    deps.end();
    // After an early answer the source may still sit mid-stream; release
    // it. Not awaited: it may be blocked on the client.
    void pieces.return?.(undefined)?.catch(() => {});
  }
}

/** The shard-side resource name of upload `id` of `digest`. */
export function uploadResourceName(deps: Pick<ByteStreamDeps, 'resourcePrefix'>, id: string, digest: Digest): string {
  return `${deps.resourcePrefix}uploads/${id}/blobs/${digest.hash}/${digest.size}`;
}

function tooLong(digest: Digest): ConnectError {
  return new ConnectError(`blob ${digestString(digest)}: received more than ${digest.size} bytes`, Code.InvalidArgument);
}

/** Chunks at least this large are sent as they are (views); smaller ones are gathered. */
const MIN_VIEW_BYTES = 16 * 1024;

/**
 * Cuts an upload into WriteRequest payloads without copying what is already
 * large: a chunk of MIN_VIEW_BYTES or more goes out as views of itself, in
 * pieces of at most `max`; only runs of smaller chunks are gathered (copied)
 * into one buffer of up to MIN_VIEW_BYTES * 4, so a source of tiny chunks
 * does not cost a message each. Measured at the edge, 128 MiB uploads in
 * 16 KiB messages: gathering everything into 256 KiB buffers cost the edge
 * 0.5-0.76 s of CPU per upload, passing 16 KiB views on 0.34-0.64 s.
 */
export async function* messageChunks(chunks: AsyncIterable<Uint8Array>, max: number): AsyncGenerator<Uint8Array> {
  const gatherMax = MIN_VIEW_BYTES * 4;
  let buf: Uint8Array | undefined;
  let fill = 0;
  for await (const c of chunks) {
    if (c.byteLength >= MIN_VIEW_BYTES) {
      if (fill > 0) {
        yield buf!.subarray(0, fill);
        buf = undefined;
        fill = 0;
      }
      for (let off = 0; off < c.byteLength; off += max) yield c.subarray(off, Math.min(off + max, c.byteLength));
      continue;
    }
    if (c.byteLength === 0) continue;
    if (fill + c.byteLength > gatherMax) {
      yield buf!.subarray(0, fill);
      buf = undefined;
      fill = 0;
    }
    buf ??= new Uint8Array(gatherMax);
    buf.set(c, fill);
    fill += c.byteLength;
  }
  if (fill > 0) yield buf!.subarray(0, fill);
}
