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

/**
 * A resumable upload (a ByteStream Write, keyed by its resource name's
 * upload id and digest): see BlobStore.uploadStatus.
 */
export interface UploadRef {
  /** The client's upload id (the `{uuid}` of `uploads/{uuid}/blobs/...`); opaque, never empty. */
  readonly id: string;
  /**
   * The blob byte the put's chunks start at: 0 for a new upload (which
   * discards any prefix kept for the same id), else the size of the prefix
   * the store kept, as uploadStatus() reported it.
   */
  readonly offset: number;
}

export interface PutOptions extends CallOptions {
  /**
   * CAS only: makes the put a resumable upload. A store that keeps partial
   * uploads (one with uploadStatus) keeps the prefix it received when the
   * put fails because its source failed or the caller cancelled, and
   * continues that prefix when a later put names the same upload at
   * offset = the kept size. Routers pass it down to the store the put
   * goes to. A store that keeps none ignores it at offset 0 and must refuse
   * a put at any other offset (OUT_OF_RANGE): its chunks are only the rest.
   */
  readonly upload?: UploadRef | undefined;
}

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

  /**
   * Optional capability, CAS only: resumable uploads. The number of bytes of
   * upload `uploadId` of `digest` that this store keeps from an interrupted
   * put (see PutOptions.upload), 0 when it keeps none. A put with
   * `upload: {id: uploadId, offset: n}` continues them; nothing partial is
   * ever visible as a blob (findMissing and get never see it). Kept prefixes
   * are bounded in count and bytes, and expire. Decorators forward it to
   * the store their puts go to; a store without it keeps no partials, which
   * callers treat as 0.
   */
  uploadStatus?(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number>;

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
