import type { Digest } from '../digest.ts';
import { digestKey } from '../digest.ts';

export interface CallOptions {
  /** Cancels the operation and any downstream shard call. */
  readonly signal?: AbortSignal | undefined;
  /**
   * Action-cache namespace of the call (see acNamespace() in
   * services/instance-name.ts): the same action digest holds a separate
   * entry in each namespace. "" or absent is the default namespace, where
   * every entry written before namespaces existed lives. Only the AC tree
   * honours it; CAS stores ignore it (content-addressed blobs are the same
   * bytes whoever asks). Routers pass it down and carry it in everything
   * they queue or record for later (hints, journal, copies); the remote
   * store sends it as the REAPI instance name. Must be "" or a valid
   * instance name (no control characters).
   */
  readonly namespace?: string | undefined;
}

export interface GetOptions extends CallOptions {
  /** First byte to return; 0 when absent. Must be <= the blob size. */
  readonly offset?: number | undefined;
  /** Maximum number of bytes to return; 0 or absent means "to the end". */
  readonly limit?: number | undefined;
}

export type PutOptions = CallOptions;

/**
 * What a store reports about itself for the admin page and metrics. `kind` is
 * the config key that built it; `children` mirrors the config tree.
 */
export interface StoreDescription {
  readonly kind: string;
  readonly name?: string;
  readonly [key: string]: unknown;
  readonly children?: readonly StoreDescription[];
}

/**
 * The one interface every store implements, for the CAS tree and the AC tree
 * alike. Stores compose as decorators (sharding, fallback, completeness
 * checking) over leaves (memory, disk, remote).
 *
 * Errors are ConnectErrors carrying the gRPC code that the client should see:
 * NOT_FOUND for a miss, INVALID_ARGUMENT for data that does not match its
 * digest, UNAVAILABLE/INTERNAL/UNKNOWN/DEADLINE_EXCEEDED for infrastructure
 * failures (see isInfrastructureError).
 */
export interface BlobStore {
  /** Returns the subset of `digests` this store cannot serve. Order is not significant. */
  findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]>;

  /**
   * Opens a blob for reading. Rejects with NOT_FOUND (or an infrastructure
   * error) before the first byte, so that routers can decide early; once the
   * promise resolves, the stream yields the requested range. The stream may
   * still fail mid-way on an infrastructure error.
   */
  get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>>;

  /**
   * Stores a blob. For the CAS, content is verified against the digest and a
   * mismatch rejects with INVALID_ARGUMENT; nothing partial ever becomes
   * visible. Resolves only once the blob is durable and readable.
   */
  put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void>;

  /** State for the admin page and metrics. Cheap and synchronous. */
  describe(): StoreDescription;

  /** Stops background work and releases resources. Idempotent. */
  close(): Promise<void>;
}

/**
 * A string key for `digest` within an action-cache namespace, for routers'
 * maps, queues and logs: digestKey(digest) in the default namespace (so keys
 * recorded before namespaces existed keep their meaning), else the digest key,
 * a NUL and the namespace. Unambiguous: digest keys are hex, digits and "/",
 * and namespaces contain no control characters.
 */
export function namespacedKey(digest: Digest, namespace: string | undefined): string {
  return namespace === undefined || namespace === '' ? digestKey(digest) : `${digestKey(digest)}\u0000${namespace}`;
}

/** A digest named for logs, with its namespace when it is not the default one. */
export function namespacedName(digestName: string, namespace: string | undefined): string {
  return namespace === undefined || namespace === '' ? digestName : `${digestName} (namespace ${JSON.stringify(namespace)})`;
}
