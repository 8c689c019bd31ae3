import { Code, ConnectError } from '@connectrpc/connect';
import { Counter, Histogram, type Registry } from 'prom-client';
import type { Digest } from '../digest.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';

/** Latency buckets (seconds) shared by store operations and RPCs: 0.5 ms to 2 min. */
export const LATENCY_BUCKETS: readonly number[] = [
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
];

/**
 * The gRPC code name of an outcome as Prometheus labels spell it ("OK",
 * "NOT_FOUND", "UNAVAILABLE"): undefined is OK, a ConnectError keeps its code,
 * an aborted operation is CANCELLED and anything else UNKNOWN.
 */
export function grpcCodeName(err: unknown): string {
  if (err === undefined) return 'OK';
  let code: Code = Code.Unknown;
  if (err instanceof ConnectError) code = err.code;
  else if (err instanceof Error && err.name === 'AbortError') code = Code.Canceled;
  if (code === Code.Canceled) return 'CANCELLED'; // gRPC's spelling
  return (Code[code] ?? 'Unknown').replace(/([a-z])([A-Z])/g, '$1_$2').toUpperCase();
}

type StoreLabel = 'tree' | 'kind' | 'name';
type OpLabel = StoreLabel | 'operation' | 'code';

interface StoreMetricFamilies {
  readonly operations: Counter<OpLabel>;
  readonly duration: Histogram<OpLabel>;
  readonly readBytes: Counter<StoreLabel>;
  readonly writtenBytes: Counter<StoreLabel>;
  readonly digests: Counter<StoreLabel | 'result'>;
}

const families = new WeakMap<Registry, StoreMetricFamilies>();

/** One set of metric families per registry, shared by every MetricsStore on it. */
function familiesFor(registry: Registry): StoreMetricFamilies {
  let f = families.get(registry);
  if (f === undefined) {
    const registers = [registry];
    f = {
      operations: new Counter({
        name: 'reapi_edge_store_operations_total',
        help: 'Store operations (find_missing, get, put) by store and gRPC code. A get counts when its stream ends.',
        labelNames: ['tree', 'kind', 'name', 'operation', 'code'],
        registers,
      }),
      duration: new Histogram({
        name: 'reapi_edge_store_operation_duration_seconds',
        help: 'Store operation latency; for get and put, until the last byte has flowed.',
        labelNames: ['tree', 'kind', 'name', 'operation', 'code'],
        buckets: [...LATENCY_BUCKETS],
        registers,
      }),
      readBytes: new Counter({
        name: 'reapi_edge_store_read_bytes_total',
        help: 'Bytes returned by the store\'s reads, counted as they flow.',
        labelNames: ['tree', 'kind', 'name'],
        registers,
      }),
      writtenBytes: new Counter({
        name: 'reapi_edge_store_written_bytes_total',
        help: 'Bytes handed to the store\'s writes, counted as they flow.',
        labelNames: ['tree', 'kind', 'name'],
        registers,
      }),
      digests: new Counter({
        name: 'reapi_edge_store_find_missing_digests_total',
        help: 'Digests asked about in successful find_missing calls, by result (present or missing).',
        labelNames: ['tree', 'kind', 'name', 'result'],
        registers,
      }),
    };
    families.set(registry, f);
  }
  return f;
}

export interface MetricsStoreOptions {
  /** Where the metric families live; one registry may hold many MetricsStores. */
  readonly registry: Registry;
  /** `kind` label: the config key of the wrapped node. Default: its describe().kind. */
  readonly kind?: string | undefined;
  /** `name` label, e.g. the shard name or the node's path in the tree. Default ''. */
  readonly name?: string | undefined;
  /** `tree` label: 'cas' or 'ac'. Default ''. */
  readonly tree?: string | undefined;
}

/**
 * Records metrics for every operation on the store it wraps: counts by
 * operation and gRPC code, latency histograms, bytes read and written
 * (counted as the streams flow, so a long transfer shows progress), and how
 * many digests find_missing found present or missing. Like bb-storage's
 * metrics decorator, the factory is meant to wrap every node of the tree in
 * one, labelled with the node's kind.
 *
 * describe() returns the child's description unchanged, so the admin page's
 * tree looks the same with or without the decorator.
 *
 * The catch: a get() is recorded when its stream ends (done, failed, or
 * abandoned by the consumer, which counts as CANCELLED), so a stream that is
 * opened and never iterated nor returned is never recorded.
 */
export class MetricsStore implements BlobStore {
  /** The wrapped store (for callers that need its own methods, e.g. drain()). */
  readonly inner: BlobStore;
  readonly #f: StoreMetricFamilies;
  readonly #labels: Record<StoreLabel, string>;

  constructor(inner: BlobStore, opts: MetricsStoreOptions) {
    this.inner = inner;
    this.#f = familiesFor(opts.registry);
    this.#labels = { tree: opts.tree ?? '', kind: opts.kind ?? inner.describe().kind, name: opts.name ?? '' };
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    const start = performance.now();
    let missing: Digest[];
    try {
      missing = await this.inner.findMissing(digests, opts);
    } catch (err) {
      this.#observe('find_missing', start, err);
      throw err;
    }
    this.#observe('find_missing', start, undefined);
    this.#f.digests.inc({ ...this.#labels, result: 'missing' }, missing.length);
    this.#f.digests.inc({ ...this.#labels, result: 'present' }, Math.max(0, digests.length - missing.length));
    return missing;
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    const start = performance.now();
    let stream: AsyncIterable<Uint8Array>;
    try {
      stream = await this.inner.get(digest, opts);
    } catch (err) {
      this.#observe('get', start, err);
      throw err;
    }
    const readBytes = this.#f.readBytes.labels(this.#labels);
    return observedStream(
      stream,
      (n) => readBytes.inc(n),
      (err) => this.#observe('get', start, err),
    );
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    const start = performance.now();
    const written = this.#f.writtenBytes.labels(this.#labels);
    async function* counted(): AsyncIterable<Uint8Array> {
      for await (const chunk of chunks) {
        written.inc(chunk.byteLength);
        yield chunk;
      }
    }
    try {
      await this.inner.put(digest, counted(), opts);
    } catch (err) {
      this.#observe('put', start, err);
      throw err;
    }
    this.#observe('put', start, undefined);
  }

  /** Passed through (see BlobStore.uploadStatus); 0 when the inner store keeps no partial uploads. */
  async uploadStatus(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number> {
    return (await this.inner.uploadStatus?.(digest, uploadId, opts)) ?? 0;
  }

  describe(): StoreDescription {
    return this.inner.describe();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  #observe(operation: string, start: number, err: unknown): void {
    const labels = { ...this.#labels, operation, code: grpcCodeName(err) };
    this.#f.operations.inc(labels);
    this.#f.duration.observe(labels, (performance.now() - start) / 1000);
  }
}

const CANCELLED = new ConnectError('consumer stopped reading', Code.Canceled);

/**
 * Passes a stream through, reporting each chunk's size and, exactly once,
 * how it ended: undefined when done, the error when it failed, CANCELLED when
 * the consumer returned early. Hand-written rather than an async generator so
 * that a return() before the first next() is still reported.
 */
function observedStream(
  stream: AsyncIterable<Uint8Array>,
  onChunk: (bytes: number) => void,
  onEnd: (err: unknown) => void,
): AsyncIterable<Uint8Array> {
  let ended = false;
  const end = (err: unknown): void => {
    if (ended) return;
    ended = true;
    onEnd(err);
  };
  return {
    [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
      const it = stream[Symbol.asyncIterator]();
      return {
        async next(): Promise<IteratorResult<Uint8Array>> {
          let r: IteratorResult<Uint8Array>;
          try {
            r = await it.next();
          } catch (err) {
            end(err);
            throw err;
          }
          if (r.done === true) end(undefined);
          else onChunk(r.value.byteLength);
          return r;
        },
        async return(value?: unknown): Promise<IteratorResult<Uint8Array>> {
          end(CANCELLED);
          const r = await it.return?.(value);
          return r ?? { done: true, value: undefined };
        },
      };
    },
  };
}
