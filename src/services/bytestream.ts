import { Readable, pipeline } from 'node:stream';
import { constants as zlibConstants, createZstdCompress, createZstdDecompress } from 'node:zlib';
import type { Transform } from 'node:stream';
import { Code, ConnectError } from '@connectrpc/connect';
import type { ServiceImpl } from '@connectrpc/connect';
import type { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import type { ReadRequestFields, WriteRequestFields } from '../grpc/bytestream-codec.ts';
import type { Digest } from '../digest.ts';
import { digestString, isEmptyDigest } from '../digest.ts';
import { DEFAULT_LIMITS } from '../config.ts';
import { abortedWithin, RESET_GRACE_MS, toConnectError, withPrefix } from '../errors.ts';
import type { ServiceDeps } from './deps.ts';
import { quote } from './instance-name.ts';
import { parseReadResourceName, parseWriteResourceName } from './resource-name.ts';

/**
 * Largest `data` in one ReadResponse. Bazel 4.2.3 rejects gRPC messages over
 * 4 MiB. Reading 128 MiB over loopback HTTP/2 (connect-node client, busy
 * 2-core machine, so only the ratios mean anything) gave 64 KiB: 0.9x,
 * 256 KiB: 1x, 1 MiB: 1.05x; 256 KiB keeps nearly all of the gain at a
 * sixteenth of the limit. Larger store chunks are split, never copied.
 */
export const READ_CHUNK_BYTES = 256 * 1024;

/** Output buffer size for zstd (de)compression; zlib's default is 16 KiB. */
const ZSTD_CHUNK_BYTES = 64 * 1024;

/**
 * The google.bytestream.ByteStream service over the CAS tree, with the REAPI
 * resource names (see resource-name.ts).
 *
 * - Read streams the store's bytes in messages of at most READ_CHUNK_BYTES.
 *   `compressed-blobs/zstd/...` compresses on the fly; as the spec says, the
 *   offset then counts uncompressed bytes and read_limit must be 0.
 * - Write streams the incoming data straight into `cas.put` (which verifies
 *   it against the digest and commits atomically), so a blob is never held
 *   in full here and nothing unverified becomes visible. Zstd uploads are
 *   decompressed on the fly and verified against the uncompressed digest.
 *   If the blob is already stored, Write answers at once without reading the
 *   rest of the stream: committed_size is the blob size, or -1 for a
 *   compressed upload (both as the REAPI spec prescribes). A compressed
 *   upload that runs to the end reports the compressed bytes received, i.e.
 *   the next write_offset, which is what Bazel's uploader checks for.
 * - Resumable uploads (uncompressed ones): every Write passes its upload
 *   (the resource name's uuid, with the digest) down to the CAS tree
 *   (PutOptions.upload). A store that keeps partial uploads (the disk store;
 *   through an edge, the shard the upload went to: see BlobStore.uploadStatus)
 *   keeps the prefix of a Write that was cancelled or broke. QueryWriteStatus
 *   reports it as committed_size (complete=false), or the blob size and
 *   complete=true once the blob is stored; a Write at write_offset =
 *   committed_size sends only the rest. A Write at 0 restarts (dropping the
 *   prefix); at any other offset it fails before any byte is stored:
 *   OUT_OF_RANGE beyond the prefix (or the blob), INVALID_ARGUMENT behind it.
 *   A tree that keeps no partials (memory) reports 0, so clients restart,
 *   which the protocol allows. Compressed uploads are not resumable (the
 *   decoder's state would have to be kept too): they start at 0 and report 0.
 * - Limits (config "limits"): a Write whose resource name declares a blob
 *   larger than maxBlobSizeBytes is INVALID_ARGUMENT before any byte is
 *   read: the size is a property of the request, and a retry (which
 *   RESOURCE_EXHAUSTED would invite from Bazel) could only fail the same
 *   way. A zstd upload whose frame asks for a window larger than
 *   2^maxZstdWindowLog bytes is INVALID_ARGUMENT as soon as its frame header
 *   arrives, before the decoder allocates the window (zstd --long=27 asks for
 *   128 MiB; the default cap, 2^23 = 8 MiB, is the largest window zstd's
 *   standard levels 1-19 use); decompressed bytes past the digest's size are
 *   refused by the store's verification as they come.
 */
export function createByteStreamService(deps: ServiceDeps, core = createByteStreamCore(deps)): ServiceImpl<typeof ByteStream> {
  return {
    async *read(req, ctx) {
      for await (const data of core.read(req, ctx.signal)) yield { data };
    },
    async write(requests, ctx) {
      return { committedSize: await core.write(requests, ctx.signal) };
    },
    async queryWriteStatus(req, ctx) {
      return core.queryWriteStatus(req.resourceName, ctx.signal);
    },
  };
}

/**
 * What the ByteStream RPCs do, apart from how messages travel: the Connect
 * service above and the gRPC fast path (src/server/bytestream-fast-path.ts)
 * both call this, so offsets, limits, zstd, early completion, resource-name
 * errors and verified writes behave the same on either.
 */
export interface ByteStreamCore {
  /** The blob's bytes for a ReadRequest, in pieces of at most READ_CHUNK_BYTES. */
  read(req: ReadRequestFields, signal: AbortSignal): AsyncGenerator<Uint8Array>;
  /** Consumes a Write stream into the CAS; resolves to the committed_size to answer. */
  write(requests: AsyncIterable<WriteRequestFields>, signal: AbortSignal): Promise<bigint>;
  queryWriteStatus(resourceName: string, signal: AbortSignal): Promise<{ committedSize: bigint; complete: boolean }>;
}

export function createByteStreamCore(deps: Pick<ServiceDeps, 'cas' | 'logger' | 'limits'>): ByteStreamCore {
  const { cas, logger } = deps;
  const { maxBlobSizeBytes, maxZstdWindowLog } = deps.limits ?? DEFAULT_LIMITS;

  /** Whether the CAS already holds `digest`. With `lenient`, a failing lookup counts as "no". */
  async function isStored(digest: Digest, signal: AbortSignal, lenient: boolean): Promise<boolean> {
    if (isEmptyDigest(digest)) return true;
    try {
      return (await cas.findMissing([digest], { signal })).length === 0;
    } catch (err) {
      if (!lenient || signal.aborted) throw toConnectError(err);
      // The put that follows reaches the same backend and reports the failure
      // properly if it persists; the lookup was only a shortcut.
      logger.debug({ err, digest: digestString(digest) }, 'ByteStream.Write: existence check failed');
      return false;
    }
  }

  /**
   * Bytes of upload `uuid` the CAS tree keeps (0 when it keeps none). A
   * failing lookup counts as 0: the client then restarts the upload, which
   * is always correct.
   */
  async function keptPrefix(digest: Digest, uuid: string, signal: AbortSignal): Promise<number> {
    if (cas.uploadStatus === undefined) return 0;
    try {
      return await cas.uploadStatus(digest, uuid, { signal });
    } catch (err) {
      if (signal.aborted) throw toConnectError(err);
      logger.debug({ err, digest: digestString(digest) }, 'ByteStream: partial upload lookup failed');
      return 0;
    }
  }

  return {
    async *read(req, signal) {
      const { digest, compressor } = parseReadResourceName(req.resourceName);
      const { readOffset, readLimit } = req;
      if (readOffset < 0n) {
        throw new ConnectError(`read_offset ${readOffset} is negative`, Code.OutOfRange);
      }
      if (readLimit < 0n) {
        throw new ConnectError(`read_limit ${readLimit} is negative`, Code.OutOfRange);
      }
      if (readOffset > BigInt(digest.size)) {
        throw new ConnectError(
          `read_offset ${readOffset} is past the end of blob ${digestString(digest)}`,
          Code.OutOfRange,
        );
      }
      if (compressor !== 'identity' && readLimit !== 0n) {
        throw new ConnectError(
          `read_limit must be 0 when reading compressed-blobs (got ${readLimit})`,
          Code.InvalidArgument,
        );
      }
      const offset = Number(readOffset);
      // A limit reaching past the end means "to the end"; this also keeps a
      // huge int64 from turning into an imprecise number.
      const limit = readLimit >= BigInt(digest.size - offset) ? 0 : Number(readLimit);

      let source: AsyncIterable<Uint8Array>;
      if (isEmptyDigest(digest)) {
        source = noChunks();
      } else {
        try {
          source = await cas.get(digest, { offset, limit, signal });
        } catch (err) {
          throw toConnectError(err);
        }
      }
      if (compressor === 'zstd') source = zstdCompress(source);
      try {
        yield* splitChunks(source, READ_CHUNK_BYTES);
      } catch (err) {
        throw toConnectError(err);
      }
    },

    async write(requests, signal) {
      const it = requests[Symbol.asyncIterator]();
      const first = await it.next();
      if (first.done === true) {
        throw new ConnectError('Write: the request stream carried no message', Code.InvalidArgument);
      }
      const name = first.value.resourceName;
      if (name === '') {
        throw new ConnectError('Write: the first message must set resource_name', Code.InvalidArgument);
      }
      const resource = parseWriteResourceName(name);
      if (resource.digest.size > maxBlobSizeBytes) {
        throw new ConnectError(
          `Write ${quote(clip(name))}: the blob is ${resource.digest.size} bytes, larger than limits.maxBlobSizeBytes ` +
            `(${maxBlobSizeBytes} bytes) on this server`,
          Code.InvalidArgument,
        );
      }
      const compressed = resource.compressor !== 'identity';
      // What the spec says to answer when the blob was already there.
      const alreadyStored = compressed ? -1n : BigInt(resource.digest.size);

      if (await isStored(resource.digest, signal, true)) {
        stopReading(it);
        return alreadyStored;
      }

      // Resuming: the first message's write_offset must be what QueryWriteStatus reports.
      const offset = first.value.writeOffset;
      if (offset !== 0n) {
        if (offset < 0n || compressed || offset > BigInt(resource.digest.size)) {
          const problem =
            offset < 0n
              ? 'is negative'
              : compressed
                ? 'must be 0 for a compressed upload (compressed uploads are not resumable; QueryWriteStatus reports 0)'
                : `is past the end of the ${resource.digest.size}-byte blob`;
          throw new ConnectError(`Write ${quote(clip(name))}: write_offset ${offset} ${problem}`, Code.OutOfRange);
        }
        const kept = BigInt(await keptPrefix(resource.digest, resource.uuid, signal));
        if (kept !== offset) {
          throw new ConnectError(
            `Write ${quote(clip(name))}: write_offset ${offset} is ${offset > kept ? 'beyond' : 'behind'} the ${kept} bytes ` +
              `this server holds of the upload; resume at write_offset ${kept} (what QueryWriteStatus reports) or restart at 0`,
            offset > kept ? Code.OutOfRange : Code.InvalidArgument,
          );
        }
      }
      const upload = new IncomingUpload(name, it, first.value, signal);
      let data = upload.chunks();
      if (compressed) data = zstdDecompress(data, maxZstdWindowLog);
      try {
        await cas.put(resource.digest, data, compressed ? { signal } : { signal, upload: { id: resource.uuid, offset: Number(offset) } });
      } catch (err) {
        // Our own complaint about the stream is more precise than whatever a
        // store made of it on the way back up.
        throw upload.error ?? withPrefix(`Write ${quote(clip(name))}`, err);
      }
      if (!upload.completed) {
        // The store stopped consuming before the end: it already had the blob.
        stopReading(it);
        return alreadyStored;
      }
      // In write_offset terms: for a compressed upload, the compressed bytes.
      return compressed ? upload.received : BigInt(resource.digest.size);
    },

    async queryWriteStatus(resourceName, signal) {
      const resource = parseWriteResourceName(resourceName);
      if (await isStored(resource.digest, signal, false)) {
        return {
          committedSize: resource.compressor === 'identity' ? BigInt(resource.digest.size) : -1n,
          complete: true,
        };
      }
      // The prefix a store kept of an interrupted upload (see createByteStreamService).
      if (resource.compressor !== 'identity') return { committedSize: 0n, complete: false };
      return { committedSize: BigInt(await keptPrefix(resource.digest, resource.uuid, signal)), complete: false };
    },
  };
}

/**
 * The data of one Write stream, checked message by message as the store
 * pulls it: resource_name may only repeat the first one, write_offset must be
 * contiguous from 0, finish_write must end the stream. A violation throws
 * from the iterator, so the store's put fails and commits nothing.
 */
class IncomingUpload {
  readonly #name: string;
  readonly #it: AsyncIterator<WriteRequestFields>;
  readonly #first: WriteRequestFields;
  readonly #signal: AbortSignal;
  /** Bytes received so far (from the first write_offset on), as they came over the wire (compressed or not). */
  received: bigint;
  /** True once finish_write was seen and the stream ended cleanly after it. */
  completed = false;
  /** The first protocol violation found, if any. */
  error: ConnectError | undefined;

  constructor(name: string, it: AsyncIterator<WriteRequestFields>, first: WriteRequestFields, signal: AbortSignal) {
    this.#name = name;
    this.#it = it;
    this.#first = first;
    this.#signal = signal;
    // Checked by the caller: 0, or the prefix a store kept.
    this.received = first.writeOffset;
  }

  async *chunks(): AsyncGenerator<Uint8Array> {
    let msg = this.#first;
    for (;;) {
      this.#check(msg);
      if (msg.data.byteLength > 0) {
        this.received += BigInt(msg.data.byteLength);
        yield msg.data;
      }
      if (msg.finishWrite) break;
      const next = await this.#it.next();
      if (next.done === true) {
        // A cancelling Node client ends the stream before it resets it (see
        // RESET_GRACE_MS): give the reset a moment to arrive, and report the
        // cancellation rather than a client error if it does.
        if (await abortedWithin(this.#signal, RESET_GRACE_MS)) {
          throw new ConnectError('client cancelled', Code.Canceled, undefined, undefined, this.#signal.reason);
        }
        throw this.#fail(`the stream ended after ${this.received} bytes without finish_write`);
      }
      msg = next.value;
    }
    // Wait for the client to close its side before the store may commit:
    // anything sent after finish_write means the client and we disagree.
    const extra = await this.#it.next();
    if (extra.done !== true) {
      throw this.#fail(
        `a message (write_offset ${extra.value.writeOffset}, ${extra.value.data.byteLength} bytes) followed finish_write`,
      );
    }
    this.completed = true;
  }

  #check(msg: WriteRequestFields): void {
    if (msg.resourceName !== '' && msg.resourceName !== this.#name) {
      throw this.#fail(`resource_name changed mid-stream to ${quote(clip(msg.resourceName))}`);
    }
    if (msg.writeOffset !== this.received) {
      throw this.#fail(`write_offset ${msg.writeOffset} is not contiguous: expected ${this.received}`);
    }
  }

  #fail(problem: string): ConnectError {
    this.error = new ConnectError(`Write ${quote(clip(this.#name))}: ${problem}`, Code.InvalidArgument);
    return this.error;
  }
}

/** Tells the transport we will read no further; errors there are moot. */
function stopReading(it: AsyncIterator<unknown>): void {
  it.return?.().catch(() => {});
}

async function* noChunks(): AsyncGenerator<Uint8Array> {}

/** Splits chunks larger than `max` into views of at most `max` bytes; no copies. */
async function* splitChunks(source: AsyncIterable<Uint8Array>, max: number): AsyncGenerator<Uint8Array> {
  for await (const chunk of source) {
    for (let i = 0; i < chunk.byteLength; i += max) {
      yield chunk.subarray(i, Math.min(i + max, chunk.byteLength));
    }
  }
}

/**
 * Runs `source` through a zlib transform. Errors from the source come out
 * unchanged; errors of the transform itself go through `mapError`. Stopping
 * the returned iterator early tears down the transform and the source.
 */
async function* throughTransform(
  source: AsyncIterable<Uint8Array>,
  transform: Transform,
  mapError: (err: unknown) => unknown,
): AsyncGenerator<Uint8Array> {
  let sourceFailed = false;
  const marked = (async function* () {
    try {
      yield* source;
    } catch (err) {
      sourceFailed = true;
      throw err;
    }
  })();
  const out = pipeline(Readable.from(marked, { objectMode: false }), transform, () => {});
  try {
    for await (const chunk of out as AsyncIterable<Buffer>) yield chunk;
  } catch (err) {
    throw sourceFailed ? err : mapError(err);
  }
}

function zstdCompress(source: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  const z = createZstdCompress({
    chunkSize: ZSTD_CHUNK_BYTES,
    // Level 1: the edge compresses on every read; ratio matters less than speed.
    params: { [zlibConstants.ZSTD_c_compressionLevel]: 1 },
  });
  return throughTransform(source, z, (err) => toConnectError(err));
}

function zstdDecompress(source: AsyncIterable<Uint8Array>, maxWindowLog: number): AsyncGenerator<Uint8Array> {
  // The decoder refuses a frame whose window is larger than this before it
  // allocates it (the window is the memory a frame costs to decode).
  const z = createZstdDecompress({ chunkSize: ZSTD_CHUNK_BYTES, params: { [zlibConstants.ZSTD_d_windowLogMax]: maxWindowLog } });
  return throughTransform(source, z, (err) => {
    if ((err as { code?: unknown }).code === 'ZSTD_error_frameParameter_windowTooLarge') {
      return new ConnectError(
        `the uploaded zstd frame needs a window larger than 2^${maxWindowLog} bytes (limits.maxZstdWindowLog ${maxWindowLog}); ` +
          `compress with a window of at most 2^${maxWindowLog} bytes (e.g. zstd --long=${maxWindowLog} or less)`,
        Code.InvalidArgument,
        undefined,
        undefined,
        err,
      );
    }
    return new ConnectError(
      `the uploaded data is not valid zstd: ${err instanceof Error ? err.message : String(err)}`,
      Code.InvalidArgument,
      undefined,
      undefined,
      err,
    );
  });
}

function clip(s: string): string {
  return s.length > 200 ? `${s.slice(0, 197)}...` : s;
}
