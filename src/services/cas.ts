import { create, fromBinary } from '@bufbuild/protobuf';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import type {
  BatchReadBlobsResponse_ResponseSchema,
  BatchUpdateBlobsResponse_ResponseSchema,
  Digest as ProtoDigest,
  Directory,
  DigestFunction_Value,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import {
  Compressor_Value,
  Compressor_ValueSchema,
  ContentAddressableStorage,
  DigestFunction_Value as DigestFunctionValue,
  DigestFunction_ValueSchema,
  DirectorySchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { StatusSchema } from '../../gen/google/rpc/status_pb.ts';
import { DEFAULT_LIMITS } from '../config.ts';
import type { Digest } from '../digest.ts';
import { digestKey, digestString, fromProtoDigest, isEmptyDigest, sha256Hex, toProtoDigest, validProtoDigest } from '../digest.ts';
import { isCode, isInfrastructureError, toConnectError } from '../errors.ts';
import type { BlobStore } from '../stores/blob-store.ts';
import { mapLimit } from '../concurrency.ts';
import { once, readAtMost } from '../streams.ts';
import type { ServiceDeps } from './deps.ts';
import { validateInstanceName } from './instance-name.ts';

/** Blobs of one BatchUpdateBlobs / BatchReadBlobs call that are written or read at once. */
const BATCH_PARALLELISM = 8;
/** Directories GetTree fetches at once; the BFS order stays deterministic. */
const TREE_FETCH_PARALLELISM = 16;
/** GetTree page size when the client sends page_size 0, and the most we honour. */
export const GET_TREE_DEFAULT_PAGE_SIZE = 1000;
export const GET_TREE_MAX_PAGE_SIZE = 10_000;
/**
 * Serialized Directory bytes per GetTree response. Clients usually cap
 * received messages at 4 MiB; 3 MiB leaves room for framing.
 */
export const GET_TREE_MAX_PAGE_BYTES = 3 * 1024 * 1024;

/**
 * The ContentAddressableStorage service over the CAS store tree: validates
 * requests, calls the tree, and reports per-blob outcomes of batch calls as
 * google.rpc.Status entries.
 *
 * Decisions worth knowing:
 * - Only SHA-256 is served; digest_function UNKNOWN (unset) means SHA-256.
 * - A malformed digest anywhere in a request fails the whole call with
 *   INVALID_ARGUMENT naming its index; data that does not match its (well
 *   formed) digest fails only that blob in BatchUpdateBlobs.
 * - Batch uploads are verified here (size and SHA-256) before the store sees
 *   them, so the per-blob error does not depend on which backend is behind
 *   the tree; the stores verify again.
 * - BatchReadBlobs always answers IDENTITY: the spec allows it whatever the
 *   client lists in acceptable_compressors. Compressed batch uploads are
 *   refused per blob (capabilities do not advertise them).
 * - GetTree streams every page from page_token on. The token is the position
 *   in a deterministic, deduplicated BFS; resuming re-walks the tree up to that
 *   position, which costs reads only on resumption. A blob that is not a
 *   Directory is INVALID_ARGUMENT (the CAS verified its content, so the tree
 *   the client uploaded is wrong, not our storage). As the spec asks, a tree
 *   that is partly missing returns the portion present: a subdirectory the
 *   CAS does not hold is left out, with everything below it, and the walk
 *   goes on; only a missing root is NOT_FOUND. Other read failures
 *   (UNAVAILABLE and the like) fail the call rather than pass for absence.
 * - SplitBlob / SpliceBlob are UNIMPLEMENTED (capabilities say so).
 * - Limits (config "limits"): more digests in one FindMissingBlobs than
 *   maxFindMissingDigests, or in one BatchReadBlobs / BatchUpdateBlobs than
 *   maxBatchBlobs, fail the call with INVALID_ARGUMENT naming the count and
 *   the limit, before any digest is parsed or looked up. INVALID_ARGUMENT and
 *   not RESOURCE_EXHAUSTED: the request can never succeed as sent, and Bazel
 *   retries RESOURCE_EXHAUSTED with backoff (the same request, to fail again)
 *   but reports INVALID_ARGUMENT at once with its message, which then says
 *   what to change. A BatchUpdateBlobs entry whose digest is larger than
 *   maxBlobSizeBytes fails that entry with INVALID_ARGUMENT (it cannot be in
 *   a batch anyway while maxBlobSizeBytes exceeds the batch limit, which the
 *   defaults make so).
 */
export function createCasService(deps: ServiceDeps): ServiceImpl<typeof ContentAddressableStorage> {
  const { cas } = deps;
  const { maxFindMissingDigests, maxBatchBlobs, maxBlobSizeBytes, maxMessageBytes } = deps.limits ?? DEFAULT_LIMITS;
  // A GetTree page must fit in one response message with room for framing.
  const maxPageBytes = Math.min(GET_TREE_MAX_PAGE_BYTES, Math.floor((maxMessageBytes * 3) / 4));

  return {
    async findMissingBlobs(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      checkCount('FindMissingBlobs', 'blob_digests', req.blobDigests.length, maxFindMissingDigests, 'limits.maxFindMissingDigests');
      // Hot path (10,000 digests a call from Bazel): one pass, no per-digest
      // strings. Digests are deduplicated by hash (a string whose hash code
      // V8 caches), with a digestKey set only for the pathological case of
      // one hash under several sizes. Each entry keeps the request's own
      // Digest message, which is what the response lists.
      const protos = req.blobDigests;
      const unique: Digest[] = [];
      const uniqueProtos: ProtoDigest[] = [];
      const byHash = new Map<string, Digest>();
      let sizeVariants: Set<string> | undefined;
      for (let i = 0; i < protos.length; i++) {
        const pd = protos[i]!;
        const d = validProtoDigest(pd) ?? fromProtoDigest(pd, `blob_digests[${i}]`);
        // The empty blob is always present, whatever the tree says.
        if (d.size === 0) continue;
        const seen = byHash.get(d.hash);
        if (seen === undefined) {
          byHash.set(d.hash, d);
        } else {
          if (seen.size === d.size) continue;
          sizeVariants ??= new Set([digestKey(seen)]);
          const key = digestKey(d);
          if (sizeVariants.has(key)) continue;
          sizeVariants.add(key);
        }
        unique.push(d);
        uniqueProtos.push(pd);
      }
      if (unique.length === 0) return { missingBlobDigests: [] };
      let missing: Digest[];
      try {
        missing = await cas.findMissing(unique, { signal: ctx.signal });
      } catch (err) {
        throw toConnectError(err);
      }
      return { missingBlobDigests: inRequestOrder(unique, uniqueProtos, missing) };
    },

    async batchUpdateBlobs(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      checkCount('BatchUpdateBlobs', 'requests', req.requests.length, maxBatchBlobs, 'limits.maxBatchBlobs');
      const digests = req.requests.map((r, i) => fromProtoDigest(r.digest, `requests[${i}].digest`));
      const total = req.requests.reduce((sum, r) => sum + r.data.byteLength, 0);
      if (total > deps.maxBatchTotalSizeBytes) {
        throw new ConnectError(
          `BatchUpdateBlobs: ${req.requests.length} blobs total ${total} bytes, more than max_batch_total_size_bytes ` +
            `${deps.maxBatchTotalSizeBytes}; upload large blobs with ByteStream Write`,
          Code.InvalidArgument,
        );
      }
      const responses = await mapLimit(req.requests, BATCH_PARALLELISM, async (r, i) => {
        const d = digests[i]!;
        const digest = toProtoDigest(d);
        try {
          if (r.compressor !== Compressor_Value.IDENTITY) {
            throw new ConnectError(
              `requests[${i}]: compressor ${compressorName(r.compressor)} is not supported by BatchUpdateBlobs, send IDENTITY`,
              Code.InvalidArgument,
            );
          }
          if (d.size > maxBlobSizeBytes) {
            throw new ConnectError(
              `requests[${i}]: blob ${digestString(d)} is larger than limits.maxBlobSizeBytes (${maxBlobSizeBytes} bytes) on this server`,
              Code.InvalidArgument,
            );
          }
          if (r.data.byteLength !== d.size) {
            throw new ConnectError(
              `requests[${i}]: blob ${digestString(d)} has ${r.data.byteLength} bytes of data, digest says ${d.size}`,
              Code.InvalidArgument,
            );
          }
          const got = sha256Hex(r.data);
          if (got !== d.hash) {
            throw new ConnectError(
              `requests[${i}]: blob ${digestString(d)} content hashes to ${got}, not to the digest's hash`,
              Code.InvalidArgument,
            );
          }
          if (!isEmptyDigest(d)) await cas.put(d, once(r.data), { signal: ctx.signal });
          return okResponse(digest);
        } catch (err) {
          const ce = toConnectError(err);
          if (isInfrastructureError(ce)) {
            deps.logger.warn({ err: ce, digest: digestString(d) }, 'BatchUpdateBlobs: write failed');
          }
          return errorResponse(digest, ce);
        }
      });
      return { responses };
    },

    async batchReadBlobs(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      checkCount('BatchReadBlobs', 'digests', req.digests.length, maxBatchBlobs, 'limits.maxBatchBlobs');
      // acceptable_compressors is ignored on purpose: IDENTITY is always
      // acceptable, and it is the only encoding we return.
      const digests = req.digests.map((pd, i) => fromProtoDigest(pd, `digests[${i}]`));
      const total = digests.reduce((sum, d) => sum + d.size, 0);
      if (total > deps.maxBatchTotalSizeBytes) {
        throw new ConnectError(
          `BatchReadBlobs: ${digests.length} blobs total ${total} bytes, more than max_batch_total_size_bytes ` +
            `${deps.maxBatchTotalSizeBytes}; read large blobs with ByteStream Read`,
          Code.InvalidArgument,
        );
      }
      // A digest asked for twice is read once.
      const reads = new Map<string, Promise<Uint8Array>>();
      const responses = await mapLimit(digests, BATCH_PARALLELISM, async (d) => {
        const key = digestKey(d);
        let read = reads.get(key);
        if (read === undefined) {
          read = readSmallBlob(cas, d, ctx.signal);
          reads.set(key, read);
        }
        const digest = toProtoDigest(d);
        try {
          const data = await read;
          return {
            digest,
            data,
            compressor: Compressor_Value.IDENTITY,
            status: create(StatusSchema, { code: 0, message: '' }),
          } satisfies MessageInitShape<typeof BatchReadBlobsResponse_ResponseSchema>;
        } catch (err) {
          const ce = toConnectError(err);
          if (isInfrastructureError(ce)) {
            deps.logger.warn({ err: ce, digest: digestString(d) }, 'BatchReadBlobs: read failed');
          }
          return {
            digest,
            status: create(StatusSchema, { code: ce.code, message: ce.rawMessage }),
          } satisfies MessageInitShape<typeof BatchReadBlobsResponse_ResponseSchema>;
        }
      });
      return { responses };
    },

    async *getTree(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      const root = fromProtoDigest(req.rootDigest, 'root_digest');
      if (req.pageSize < 0) {
        throw new ConnectError(`page_size ${req.pageSize} is negative`, Code.InvalidArgument);
      }
      const pageSize = req.pageSize === 0 ? GET_TREE_DEFAULT_PAGE_SIZE : Math.min(req.pageSize, GET_TREE_MAX_PAGE_SIZE);
      const skip = req.pageToken === '' ? 0 : decodePageToken(req.pageToken, root);

      let position = 0; // BFS position of the directory at hand
      let page: Directory[] = [];
      let pageBytes = 0;
      for await (const { directory, size } of walkDirectories(cas, root, ctx.signal)) {
        const at = position++;
        if (at < skip) continue;
        if (page.length > 0 && (page.length >= pageSize || pageBytes + size > maxPageBytes)) {
          // Emitted only once the next directory is known to exist, so the
          // last page is the one with an empty token.
          yield { directories: page, nextPageToken: encodePageToken(root, at) };
          page = [];
          pageBytes = 0;
        }
        page.push(directory);
        pageBytes += size;
      }
      if (skip > 0 && position <= skip) {
        throw new ConnectError(`page_token points past the end of tree ${digestString(root)}`, Code.InvalidArgument);
      }
      yield { directories: page, nextPageToken: '' };
    },

    async splitBlob() {
      throw new ConnectError('SplitBlob is not implemented', Code.Unimplemented);
    },

    async spliceBlob() {
      throw new ConnectError('SpliceBlob is not implemented', Code.Unimplemented);
    },
  };
}

/**
 * The request's Digest messages for `missing`, in request order, whatever
 * order the tree answered in. Stores that hand back the very objects they
 * were given, in order (the disk store does), are matched in one pass by
 * identity; stores that reorder by identity; stores that build new objects
 * (remote shards) by key.
 */
function inRequestOrder(asked: readonly Digest[], protos: readonly ProtoDigest[], missing: readonly Digest[]): ProtoDigest[] {
  const out: ProtoDigest[] = [];
  let j = 0;
  for (let i = 0; i < asked.length && j < missing.length; i++) {
    if (asked[i] === missing[j]) {
      out.push(protos[i]!);
      j++;
    }
  }
  if (j === missing.length) return out;
  const missingSet = new Set<Digest>(missing);
  out.length = 0;
  for (let i = 0; i < asked.length; i++) if (missingSet.has(asked[i]!)) out.push(protos[i]!);
  if (out.length === missingSet.size) return out;
  const missingKeys = new Set(missing.map(digestKey));
  return protos.filter((_, i) => missingKeys.has(digestKey(asked[i]!)));
}

/** INVALID_ARGUMENT when a request lists more entries than a limit allows (see createCasService). */
function checkCount(rpc: string, field: string, count: number, limit: number, limitName: string): void {
  if (count <= limit) return;
  throw new ConnectError(
    `${rpc}: ${field} has ${count} entries, more than ${limitName} (${limit}) allows in one request; split it into several requests`,
    Code.InvalidArgument,
  );
}

/**
 * Rejects digest functions other than SHA-256. UNKNOWN (the proto default)
 * means "the server's default", which is SHA-256.
 */
export function checkDigestFunction(fn: DigestFunction_Value): void {
  if (fn === DigestFunctionValue.UNKNOWN || fn === DigestFunctionValue.SHA256) return;
  const name = DigestFunction_ValueSchema.value[fn]?.name ?? String(fn);
  throw new ConnectError(`digest_function ${name} is not supported, this server only uses SHA256`, Code.InvalidArgument);
}

function compressorName(c: Compressor_Value): string {
  return Compressor_ValueSchema.value[c]?.name ?? String(c);
}

function okResponse(digest: { hash: string; sizeBytes: bigint }): MessageInitShape<typeof BatchUpdateBlobsResponse_ResponseSchema> {
  return { digest, status: create(StatusSchema, { code: 0, message: '' }) };
}

function errorResponse(
  digest: { hash: string; sizeBytes: bigint },
  err: ConnectError,
): MessageInitShape<typeof BatchUpdateBlobsResponse_ResponseSchema> {
  return { digest, status: create(StatusSchema, { code: err.code, message: err.rawMessage }) };
}

/**
 * Reads a whole blob that is known to be small (batch or Directory sized).
 * A store that returns a different length than the digest says has lost
 * data; that is DATA_LOSS, never a silent short read.
 */
async function readSmallBlob(store: BlobStore, d: Digest, signal: AbortSignal): Promise<Uint8Array> {
  if (isEmptyDigest(d)) return new Uint8Array(0);
  const data = await readAtMost(await store.get(d, { signal }), d.size);
  if (data === undefined || data.byteLength !== d.size) {
    const got = data === undefined ? `more than ${d.size}` : String(data.byteLength);
    throw new ConnectError(`blob ${digestString(d)}: store returned ${got} bytes, digest says ${d.size}`, Code.DataLoss);
  }
  return data;
}

interface WalkedDirectory {
  readonly digest: Digest;
  readonly directory: Directory;
  /** Serialized size, for page budgeting. */
  readonly size: number;
}

/**
 * Yields every directory reachable from `root` once, in breadth-first order
 * with children in the order the parent lists them. The order depends only
 * on the tree, which is what makes a position usable as a page token.
 */
async function* walkDirectories(cas: BlobStore, root: Digest, signal: AbortSignal): AsyncGenerator<WalkedDirectory> {
  const queue: Array<{ digest: Digest; path: string }> = [{ digest: root, path: '' }];
  const seen = new Set<string>([digestKey(root)]);
  let head = 0;
  while (head < queue.length) {
    const batch = queue.slice(head, head + TREE_FETCH_PARALLELISM);
    head += batch.length;
    if (head > 4096) {
      // Drop what was already walked so a huge tree does not keep it all.
      queue.splice(0, head);
      head = 0;
    }
    const directories = await Promise.all(batch.map((e) => fetchDirectory(cas, e.digest, e.path, root, signal, e.digest === root)));
    for (let i = 0; i < batch.length; i++) {
      const { digest, path } = batch[i]!;
      const directory = directories[i];
      // Not in the CAS: left out of the tree, with its subtree.
      if (directory === undefined) continue;
      directory.directories.forEach((node, j) => {
        const childPath = path === '' ? node.name : `${path}/${node.name}`;
        const child = fromProtoDigest(
          node.digest,
          `directory ${describePath(path)} (${digestString(digest)}) directories[${j}] "${node.name}"`,
        );
        const key = digestKey(child);
        if (seen.has(key)) return;
        seen.add(key);
        queue.push({ digest: child, path: childPath });
      });
      yield { digest, directory, size: digest.size };
    }
  }
}

/** A directory of the tree; undefined for a subdirectory the CAS does not hold (a missing root is NOT_FOUND). */
async function fetchDirectory(
  cas: BlobStore,
  d: Digest,
  path: string,
  root: Digest,
  signal: AbortSignal,
  isRoot: boolean,
): Promise<Directory | undefined> {
  const what = isRoot ? `root directory ${digestString(d)}` : `directory ${digestString(d)} at "${path}" under ${digestString(root)}`;
  let bytes: Uint8Array;
  try {
    bytes = await readSmallBlob(cas, d, signal);
  } catch (err) {
    if (isCode(err, Code.NotFound)) {
      if (isRoot) throw new ConnectError(`${what} not found`, Code.NotFound);
      return undefined;
    }
    throw toConnectError(err);
  }
  try {
    return fromBinary(DirectorySchema, bytes);
  } catch (err) {
    throw new ConnectError(
      `${what} is not a valid Directory message: ${err instanceof Error ? err.message : String(err)}`,
      Code.InvalidArgument,
    );
  }
}

function describePath(path: string): string {
  return path === '' ? '(root)' : `"${path}"`;
}

interface PageToken {
  readonly v: 1;
  /** The root the token was issued for, so a token is not reused for another tree. */
  readonly root: string;
  /** BFS position of the first directory of the next page. */
  readonly position: number;
}

function encodePageToken(root: Digest, position: number): string {
  const token: PageToken = { v: 1, root: digestString(root), position };
  return Buffer.from(JSON.stringify(token)).toString('base64url');
}

function decodePageToken(token: string, root: Digest): number {
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(token, 'base64url').toString('utf8'));
  } catch {
    parsed = undefined;
  }
  const t = parsed as Partial<PageToken> | undefined;
  if (
    typeof t !== 'object' ||
    t === null ||
    t.v !== 1 ||
    typeof t.root !== 'string' ||
    typeof t.position !== 'number' ||
    !Number.isSafeInteger(t.position) ||
    t.position < 0
  ) {
    throw new ConnectError('page_token is not a token returned by GetTree', Code.InvalidArgument);
  }
  if (t.root !== digestString(root)) {
    throw new ConnectError(`page_token was issued for root_digest ${t.root}, not ${digestString(root)}`, Code.InvalidArgument);
  }
  return t.position;
}
