import { fromBinary, toBinary } from '@bufbuild/protobuf';
import type { Client } from '@connectrpc/connect';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import type * as http2 from 'node:http2';
import type { Logger } from 'pino';
import type { Digest } from '../digest.ts';
import { digestKey, digestString, isEmptyDigest, toProtoDigest } from '../digest.ts';
import { hasNetworkCause, isInfrastructureError, throwIfAborted, toConnectError, withPrefix } from '../errors.ts';
import { mapLimitCancelling } from '../concurrency.ts';
import { collect, resolveRange } from '../streams.ts';
import type { ShardTransport } from '../transport.ts';
import { createShardTransport } from '../transport.ts';
import type { ByteStreamDeps } from './remote-bytestream.ts';
import { ShardRead, shardWrite, uploadResourceName } from './remote-bytestream.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import {
  ActionCache,
  ActionResultSchema,
  Capabilities,
  ContentAddressableStorage,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { Health, HealthCheckResponse_ServingStatus } from '../../gen/grpc/health/v1/health_pb.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';

/**
 * Size of the data in each ByteStream WriteRequest; smaller input chunks
 * (Bazel sends 16 KiB) are coalesced. Measured with 64 MiB uploads to the
 * python grpcio shard on a loaded 2-core machine, medians of 5:
 * 16 KiB 97 MiB/s, 64 KiB 107, 256 KiB 157, 1 MiB 129. Well below the
 * 4 MiB message limit common REAPI servers (and Bazel) enforce.
 */
export const WRITE_CHUNK_BYTES = 256 * 1024;
/** Digests per FindMissingBlobs call (about 0.8 MB of request). */
export const FIND_MISSING_BATCH = 10_000;
/** FindMissingBlobs batches in flight at once for one findMissing(). */
const FIND_MISSING_PARALLEL = 4;
/** GetActionResult calls in flight at once for an AC findMissing(). */
const AC_PROBE_PARALLEL = 16;
/** Largest ActionResult put() accepts, serialized. */
const AC_MAX_BYTES = 16 * 1024 * 1024;

export interface RemoteStoreOptions {
  /** Shows in error prefixes, logs and describe(). Default: the url's host:port. */
  readonly name?: string | undefined;
  /** `http://host:port` (gRPC over h2c) or `https://host:port` (TLS). */
  readonly url: string;
  /** REAPI instance name sent with every call. Default ''. */
  readonly instanceName?: string | undefined;
  /** Which tree this store serves: blobs (CAS) or ActionResults (AC). */
  readonly tree: 'cas' | 'ac';
  /**
   * Deadline for each unary call (FindMissingBlobs, GetActionResult, ...),
   * for the first message of a read, and for the shard's answer after the
   * last chunk of a write. Default 30 s.
   */
  readonly timeoutMs?: number | undefined;
  /**
   * Stall timeout for streaming reads and writes: the call fails with
   * DEADLINE_EXCEEDED when the shard sends nothing (read) or accepts nothing
   * (write) for this long while we wait on it. Time spent waiting on our own
   * consumer or producer does not count, so a blob of any size streams as long
   * as it keeps moving. Default: timeoutMs.
   */
  readonly stallTimeoutMs?: number | undefined;
  /** Data per ByteStream WriteRequest, at most 1 MiB. Default WRITE_CHUNK_BYTES. */
  readonly writeChunkBytes?: number | undefined;
  /** Deadline of one health check (grpc.health.v1 Check or GetCapabilities). Default 1 s. */
  readonly healthTimeoutMs?: number | undefined;
  readonly logger?: Logger | undefined;
  /** Builds the transport; tests use it to watch the wire. Default createShardTransport with `tls` and `bearerToken`. */
  readonly transport?: ((url: string) => ShardTransport) | undefined;
  /** For https:// shards: CA, client certificate and key, server name (node:http2 connect options). */
  readonly tls?: http2.SecureClientSessionOptions | undefined;
  /** Sent as `authorization: Bearer <token>` on every call (see createShardTransport). */
  readonly bearerToken?: string | undefined;
}

/**
 * A shard reached over gRPC: any REAPI v2 server (this project's storage node,
 * bb-storage, bazel-remote, NativeLink). The CAS tree maps to FindMissingBlobs
 * and ByteStream Read/Write, the AC tree to GetActionResult and
 * UpdateActionResult, with ActionResults as their serialized bytes; an AC
 * call's namespace is sent as (part of) its instance name (acInstanceName()).
 *
 * Use it as the leaf under a sharding or fallback store. All calls share one
 * HTTP/2 session, re-opened after the shard restarts.
 *
 * Errors keep the shard's gRPC code and gain the prefix "remote NAME: ";
 * connection refused or reset becomes UNAVAILABLE and timeouts become
 * DEADLINE_EXCEEDED, which is what circuit breakers count.
 *
 * The catch: get() and put() stream, so a read can still fail after it
 * started (the shard dies mid-blob); a read that ends short of the requested
 * range fails with INTERNAL rather than returning a truncated blob. put()
 * checks the length but leaves hashing to the shard (every REAPI server
 * verifies uploads).
 *
 * Config: `{"remote": {"name": "a", "url": "http://10.0.0.5:8981", "instanceName": ""}}`
 */
export class RemoteStore implements BlobStore {
  readonly name: string;
  readonly url: string;
  readonly instanceName: string;
  readonly #tree: 'cas' | 'ac';
  readonly #timeoutMs: number;
  readonly #stallMs: number;
  readonly #healthTimeoutMs: number;
  readonly #writeChunkBytes: number;
  readonly #log: Logger | undefined;
  readonly #prefix: string;
  readonly #transport: ShardTransport;
  readonly #cas: Client<typeof ContentAddressableStorage>;
  readonly #ac: Client<typeof ActionCache>;
  readonly #health: Client<typeof Health>;
  readonly #capabilities: Client<typeof Capabilities>;
  readonly #byteStream: Client<typeof ByteStream>;
  /** What the ByteStream fast path (remote-bytestream.ts) needs from this store. */
  readonly #byteStreamDeps: ByteStreamDeps;
  /** Set once the shard answered UNIMPLEMENTED to grpc.health.v1. */
  #noHealthService = false;
  #closed = false;
  #inFlight = 0;
  #requests = 0;
  #failures = 0;
  #bytesIn = 0;
  #bytesOut = 0;
  #healthChecks = 0;
  #healthFailures = 0;

  constructor(opts: RemoteStoreOptions) {
    this.url = opts.url;
    this.name = opts.name ?? new URL(opts.url).host;
    this.instanceName = opts.instanceName ?? '';
    this.#tree = opts.tree;
    this.#timeoutMs = opts.timeoutMs ?? 30_000;
    this.#stallMs = opts.stallTimeoutMs ?? this.#timeoutMs;
    this.#healthTimeoutMs = opts.healthTimeoutMs ?? 1_000;
    this.#writeChunkBytes = Math.min(Math.max(opts.writeChunkBytes ?? WRITE_CHUNK_BYTES, 1024), 1024 * 1024);
    this.#log = opts.logger;
    this.#prefix = `remote ${this.name}`;
    this.#transport = (opts.transport ?? ((url) => createShardTransport({ url, tls: opts.tls, bearerToken: opts.bearerToken })))(opts.url);
    const t = this.#transport.transport;
    this.#cas = createClient(ContentAddressableStorage, t);
    this.#ac = createClient(ActionCache, t);
    this.#health = createClient(Health, t);
    this.#capabilities = createClient(Capabilities, t);
    this.#byteStream = createClient(ByteStream, t);
    this.#byteStreamDeps = {
      transport: this.#transport,
      resourcePrefix: this.#instancePrefix(),
      timeoutMs: this.#timeoutMs,
      stallMs: this.#stallMs,
      writeChunkBytes: this.#writeChunkBytes,
      begin: () => this.#begin(),
      end: () => this.#end(),
      received: (n) => {
        this.#bytesIn += n;
      },
      sent: (n) => {
        this.#bytesOut += n;
      },
      fail: (err, signal) => this.#fail(err, signal),
    };
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    this.#checkOpen(opts?.signal);
    // The empty blob is always present and never sent over the wire; for the
    // AC an action digest equal to it is an ordinary key.
    const byKey = new Map<string, Digest[]>();
    for (const d of digests) {
      if (this.#tree === 'cas' && isEmptyDigest(d)) continue;
      const key = digestKey(d);
      const same = byKey.get(key);
      if (same === undefined) byKey.set(key, [d]);
      else same.push(d);
    }
    const unique = [...byKey.values()].map((same) => same[0]!);
    if (unique.length === 0) return [];
    const missingKeys =
      this.#tree === 'cas'
        ? await this.#findMissingBlobs(unique, opts?.signal)
        : await this.#probeActions(unique, this.acInstanceName(opts?.namespace), opts?.signal);
    const missing: Digest[] = [];
    for (const key of missingKeys) missing.push(...(byKey.get(key) ?? []));
    return missing;
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    this.#checkOpen(opts?.signal);
    if (this.#tree === 'ac') {
      const result = await this.#unary(opts?.signal, (signal) =>
        this.#ac.getActionResult(
          { instanceName: this.acInstanceName(opts?.namespace), actionDigest: toProtoDigest(digest) },
          { signal, timeoutMs: this.#timeoutMs },
        ),
      );
      const bytes = toBinary(ActionResultSchema, result);
      this.#bytesIn += bytes.byteLength;
      const { start, end } = resolveRange(bytes.byteLength, opts?.offset, opts?.limit);
      return single(bytes.subarray(start, end));
    }
    if (isEmptyDigest(digest)) {
      resolveRange(0, opts?.offset, opts?.limit);
      return single(new Uint8Array(0));
    }
    // Checked here so a bad range fails without a round trip; the shard
    // would answer OUT_OF_RANGE as well.
    const { start, end } = resolveRange(digest.size, opts?.offset, opts?.limit);
    const read = new ShardRead(this.#byteStreamDeps, digest, start, end, opts?.signal);
    await read.open();
    return read;
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    this.#checkOpen(opts?.signal);
    if (this.#tree === 'ac') {
      const bytes = await collect(chunks, AC_MAX_BYTES);
      let actionResult;
      try {
        actionResult = fromBinary(ActionResultSchema, bytes);
      } catch (err) {
        throw new ConnectError(
          `action ${digestString(digest)}: value is not a serialized ActionResult: ${String(err)}`,
          Code.InvalidArgument,
        );
      }
      this.#bytesOut += bytes.byteLength;
      await this.#unary(opts?.signal, (signal) =>
        this.#ac.updateActionResult(
          { instanceName: this.acInstanceName(opts?.namespace), actionDigest: toProtoDigest(digest), actionResult },
          { signal, timeoutMs: this.#timeoutMs },
        ),
      );
      return;
    }
    if (isEmptyDigest(digest)) {
      // Always present; only check that the caller sent nothing.
      for await (const c of chunks) {
        if (c.byteLength > 0) throw tooLong(digest);
      }
      return;
    }
    await shardWrite(this.#byteStreamDeps, digest, chunks, opts?.signal, opts?.upload);
  }

  /**
   * Resumable uploads (see BlobStore.uploadStatus): the shard's
   * QueryWriteStatus for the upload's resource name (put() writes under the
   * same one). A shard that keeps no partials answers 0; one without
   * QueryWriteStatus (UNIMPLEMENTED), or that does not know the upload
   * (NOT_FOUND, as some servers answer), counts as 0 too.
   */
  async uploadStatus(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number> {
    this.#checkOpen(opts?.signal);
    if (this.#tree !== 'cas' || isEmptyDigest(digest)) return 0;
    try {
      const res = await this.#unary(opts?.signal, (signal) =>
        this.#byteStream.queryWriteStatus(
          { resourceName: uploadResourceName(this.#byteStreamDeps, uploadId, digest) },
          { signal, timeoutMs: this.#timeoutMs },
        ),
      );
      // complete: the shard has the blob; what is "kept" is all of it.
      const committed = res.complete ? digest.size : Number(res.committedSize);
      return Number.isSafeInteger(committed) && committed > 0 && committed <= digest.size ? committed : 0;
    } catch (err) {
      if (err instanceof ConnectError && (err.code === Code.Unimplemented || err.code === Code.NotFound)) return 0;
      throw err;
    }
  }

  /**
   * Resolves if the shard says it is SERVING. Uses grpc.health.v1 Check with
   * the health timeout; a shard without that service (UNIMPLEMENTED) is asked
   * GetCapabilities instead, from then on. Any other outcome (NOT_SERVING,
   * an error, no answer in time: a blackholed shard) throws UNAVAILABLE, with
   * the original code in the message. Only the caller's own cancellation
   * throws CANCELED.
   */
  async healthCheck(signal?: AbortSignal): Promise<void> {
    this.#checkOpen(signal);
    this.#healthChecks++;
    const options = { signal, timeoutMs: this.#healthTimeoutMs };
    try {
      if (!this.#noHealthService) {
        try {
          const res = await this.#health.check({ service: '' }, options);
          if (res.status !== HealthCheckResponse_ServingStatus.SERVING) {
            throw new ConnectError(
              `health status is ${servingStatusName(res.status)}`,
              Code.Unavailable,
            );
          }
          return;
        } catch (err) {
          if (!(err instanceof ConnectError && err.code === Code.Unimplemented)) throw err;
          this.#noHealthService = true;
          this.#log?.info({ shard: this.name }, 'shard has no grpc.health.v1; health checks use GetCapabilities');
        }
      }
      await this.#capabilities.getCapabilities({ instanceName: this.instanceName }, options);
    } catch (err) {
      this.#healthFailures++;
      const ce = this.#mapError(err, signal);
      if (ce.code === Code.Canceled && signal?.aborted) throw withPrefix(this.#prefix, ce);
      throw new ConnectError(
        `${this.#prefix}: health check failed: [${Code[ce.code]}] ${ce.rawMessage}`,
        Code.Unavailable,
        undefined,
        undefined,
        ce,
      );
    }
  }

  describe(): StoreDescription {
    return {
      kind: 'remote',
      name: this.name,
      url: this.url,
      instanceName: this.instanceName,
      tree: this.#tree,
      transport: this.#transport.kind,
      session: this.#closed ? 'closed' : this.#transport.state(),
      inFlight: this.#inFlight,
      requests: this.#requests,
      failures: this.#failures,
      bytesIn: this.#bytesIn,
      bytesOut: this.#bytesOut,
      healthChecks: this.#healthChecks,
      healthFailures: this.#healthFailures,
    };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#transport.close();
  }

  // --- CAS -----------------------------------------------------------------

  async #findMissingBlobs(digests: readonly Digest[], signal: AbortSignal | undefined): Promise<string[]> {
    const batches: Digest[][] = [];
    for (let i = 0; i < digests.length; i += FIND_MISSING_BATCH) batches.push(digests.slice(i, i + FIND_MISSING_BATCH));
    const results = await mapLimitCancelling(batches, FIND_MISSING_PARALLEL, signal, async (batch, batchSignal) => {
      const res = await this.#unary(batchSignal, (s) =>
        this.#cas.findMissingBlobs(
          { instanceName: this.instanceName, blobDigests: batch.map(toProtoDigest) },
          { signal: s, timeoutMs: this.#timeoutMs },
        ),
      );
      return res.missingBlobDigests.map((d) => `${d.hash}/${d.sizeBytes}`);
    });
    return results.flat();
  }

  // --- AC ------------------------------------------------------------------

  async #probeActions(digests: readonly Digest[], instanceName: string, signal: AbortSignal | undefined): Promise<string[]> {
    const found = await mapLimitCancelling(digests, AC_PROBE_PARALLEL, signal, async (d, s) => {
      try {
        await this.#unary(s, (s2) =>
          this.#ac.getActionResult(
            { instanceName, actionDigest: toProtoDigest(d) },
            { signal: s2, timeoutMs: this.#timeoutMs },
          ),
        );
        return undefined;
      } catch (err) {
        if (err instanceof ConnectError && err.code === Code.NotFound) return digestKey(d);
        throw err;
      }
    });
    return found.filter((k): k is string => k !== undefined);
  }

  /**
   * The instance name an AC call in `namespace` is sent under: the
   * configured instance name and the namespace joined by "/" ("cfg/ns"),
   * or whichever of the two is not empty. A storage node behind this edge,
   * isolating by instance name with its default config, so keeps every
   * namespace apart, and entries of the default namespace stay where they
   * were before namespaces existed.
   */
  acInstanceName(namespace: string | undefined): string {
    if (namespace === undefined || namespace === '') return this.instanceName;
    return this.instanceName === '' ? namespace : `${this.instanceName}/${namespace}`;
  }

  // --- plumbing ------------------------------------------------------------

  #instancePrefix(): string {
    return this.instanceName === '' ? '' : `${this.instanceName}/`;
  }

  #checkOpen(signal: AbortSignal | undefined): void {
    throwIfAborted(signal);
    if (this.#closed) throw new ConnectError(`${this.#prefix}: store is closed`, Code.Unavailable);
  }

  #begin(): void {
    this.#requests++;
    this.#inFlight++;
  }

  #end(): void {
    this.#inFlight--;
  }

  /** Runs one unary call with the counters and error mapping. */
  async #unary<T>(signal: AbortSignal | undefined, call: (signal: AbortSignal | undefined) => Promise<T>): Promise<T> {
    this.#begin();
    try {
      return await call(signal);
    } catch (err) {
      throw this.#fail(err, signal);
    } finally {
      this.#end();
    }
  }

  /** Maps, counts and prefixes an error from a shard call. */
  #fail(err: unknown, callerSignal: AbortSignal | undefined): ConnectError {
    const ce = this.#mapError(err, callerSignal);
    if (isInfrastructureError(ce)) {
      this.#failures++;
      this.#log?.debug({ shard: this.name, code: Code[ce.code] }, ce.rawMessage);
    }
    return withPrefix(this.#prefix, ce);
  }

  /**
   * Keeps the shard's code, except: the caller's cancellation is CANCELED;
   * CANCELED the caller did not ask for (a stream reset with CANCEL when the
   * shard's connection dies, or close() of this store) is UNAVAILABLE; socket
   * and HTTP/2 session failures, which connect-node reports as ABORTED or
   * INTERNAL, are UNAVAILABLE.
   */
  #mapError(err: unknown, callerSignal: AbortSignal | undefined): ConnectError {
    const ce = toConnectError(err);
    if (callerSignal?.aborted) {
      if (ce.code === Code.Canceled || ce.code === Code.Aborted) {
        return new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, ce);
      }
      return ce;
    }
    if (ce.code === Code.Canceled) {
      return new ConnectError(`${ce.rawMessage} (not cancelled by the caller)`, Code.Unavailable, ce.metadata, undefined, ce);
    }
    if ((ce.code === Code.Aborted || ce.code === Code.Internal || ce.code === Code.Unknown) && hasNetworkCause(ce)) {
      return new ConnectError(ce.rawMessage, Code.Unavailable, ce.metadata, undefined, ce.cause ?? ce);
    }
    return ce;
  }
}

function servingStatusName(status: number): string {
  const entry = Object.entries(HealthCheckResponse_ServingStatus).find(([, v]) => v === status);
  return entry?.[0] ?? String(status);
}

function single(data: Uint8Array): AsyncIterable<Uint8Array> {
  return (async function* () {
    if (data.byteLength > 0) yield data;
  })();
}

function tooLong(digest: Digest): ConnectError {
  return new ConnectError(`blob ${digestString(digest)}: received more than ${digest.size} bytes`, Code.InvalidArgument);
}
