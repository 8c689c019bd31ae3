// REAPI requests for the surface tests (gRPC and Connect/JSON): for each
// method, protobuf messages of the right type whose values are right or
// wrong in every way (arbitraries.ts), with the blobs and action results
// each would store if it succeeded; and a ledger of what was named and
// whether it was ever stored, for the "nothing half-written is visible"
// check after a run.
import { create, toBinary } from '@bufbuild/protobuf';
import type { DescMessage, MessageShape } from '@bufbuild/protobuf';
import type { DigestFunction_Value } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Client } from '@connectrpc/connect';
import { zstdCompressSync } from 'node:zlib';
import fc from 'fast-check';
import type { Test } from 'tap';
import {
  ActionCache,
  BatchReadBlobsRequestSchema,
  BatchUpdateBlobsRequestSchema,
  Capabilities,
  ContentAddressableStorage,
  DirectorySchema,
  FindMissingBlobsRequestSchema,
  GetActionResultRequestSchema,
  GetCapabilitiesRequestSchema,
  GetTreeRequestSchema,
  UpdateActionResultRequestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, QueryWriteStatusRequestSchema, ReadRequestSchema, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { EMPTY_DIGEST, digestKey, digestOf, toProtoDigest } from '../../src/digest.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { once } from '../../src/streams.ts';
import { instanceName, offset, protoDigest, resourceName } from './arbitraries.ts';
import { hex64, nastyString } from './property.ts';

/** A blob every run stores first (seedStore), so reads and trees can succeed too. */
export const KNOWN = Buffer.from('a blob every property may read: '.repeat(40));
export const KNOWN_DIGEST = digestOf(KNOWN);
/** A Directory (one file: KNOWN) and its digest, for GetTree. */
export const DIR = Buffer.from(toBinary(DirectorySchema, create(DirectorySchema, { files: [{ name: 'known', digest: toProtoDigest(KNOWN_DIGEST) }] })));
export const DIR_DIGEST = digestOf(DIR);

/** Stores KNOWN and DIR in a node's CAS. */
export async function seedStore(cas: BlobStore): Promise<void> {
  await cas.put(KNOWN_DIGEST, once(KNOWN));
  await cas.put(DIR_DIGEST, once(DIR));
}

/** Codes a bad request may get: each says what was wrong with it. */
export const PRECISE: ReadonlySet<Code> = new Set<Code>([
  Code.InvalidArgument,
  Code.ResourceExhausted,
  Code.NotFound,
  Code.Unimplemented,
  Code.FailedPrecondition,
  Code.OutOfRange,
  Code.Unauthenticated,
  Code.PermissionDenied,
]);

export type Named = { readonly cas: readonly Digest[]; readonly ac: readonly { readonly instance: string; readonly digest: Digest }[] };
export const NONE: Named = { cas: [], ac: [] };

export interface Request {
  readonly schema: DescMessage;
  readonly messages: readonly MessageShape<DescMessage>[];
  /** Blobs (CAS) and action results (AC) the request would store if it succeeded. */
  readonly named: Named;
}

/** One REAPI method and requests for it. */
export interface RequestSpec {
  /** "FindMissingBlobs", "ByteStream.Read", ... */
  readonly name: string;
  /** "/{service}/{method}", the gRPC and Connect path. */
  readonly path: string;
  readonly request: fc.Arbitrary<Request>;
}

const blob = fc.uint8Array({ minLength: 16, maxLength: 3000 }).map((b) => Buffer.from(b));
const uniqueDigest = fc.record({ hash: hex64, size: fc.integer({ min: 1, max: 1 << 20 }) });
/** Mostly UNKNOWN (SHA-256 by default); sometimes another function, or a value no enum has. */
const digestFunction = fc
  .oneof({ weight: 5, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.constantFrom(1, 2, 3, 8, 999, -1) })
  .map((n) => n as DigestFunction_Value);
const outputPath = fc.oneof(fc.constantFrom('out/a.o', 'b', '', '/abs', '../up', 'a/../../b', 'a//b'), nastyString(8));

function unary<S extends DescMessage>(schema: S, init: fc.Arbitrary<Record<string, unknown>>, named: (m: Record<string, unknown>) => Named = () => NONE): fc.Arbitrary<Request> {
  return init.map((m) => ({ schema, messages: [create(schema, m as never)], named: named(m) }));
}

/** The WriteRequests of an upload of `data` named `name`, spoiled as `variant` says. */
function writeMessages(name: string, data: Buffer, variant: string, cuts: number): Record<string, unknown>[] {
  const n = Math.max(1, Math.min(cuts, data.length));
  const step = Math.ceil(data.length / n);
  const out: Record<string, unknown>[] = [];
  for (let off = 0; off < data.length; off += step) {
    const end = Math.min(data.length, off + step);
    out.push({ resourceName: off === 0 ? name : '', writeOffset: BigInt(off), finishWrite: end === data.length, data: data.subarray(off, end) });
  }
  const last = out[out.length - 1]!;
  switch (variant) {
    case 'no-finish':
      last.finishWrite = false;
      break;
    case 'after-finish':
      out.push({ resourceName: '', writeOffset: BigInt(data.length), finishWrite: false, data: Buffer.from('x') });
      break;
    case 'gap':
      if (out.length > 1) out[1]!.writeOffset = (out[1]!.writeOffset as bigint) + 1n;
      else out[0]!.writeOffset = 1n;
      break;
    case 'name-change':
      if (out.length > 1) out[1]!.resourceName = `${name}\u202ex`;
      else out.push({ resourceName: `${name}\nx`, writeOffset: BigInt(data.length), finishWrite: true, data: new Uint8Array() });
      break;
    case 'start-nonzero':
      out[0]!.writeOffset = 5n;
      break;
    case 'no-name':
      out[0]!.resourceName = '';
      break;
  }
  return out;
}

const writeRequest: fc.Arbitrary<Request> = fc
  .record({
    blob,
    instance: fc.oneof({ weight: 4, arbitrary: fc.constantFrom('', 'main') }, { weight: 1, arbitrary: instanceName }),
    // The upload id is opaque: any characters but "/".
    uuid: fc.oneof({ weight: 4, arbitrary: fc.uuid() }, { weight: 1, arbitrary: fc.constantFrom('', 'blobs', 'u\nv', 'u\u202ev', '\u0000') }),
    zstd: fc.boolean(),
    variant: fc.constantFrom('valid', 'valid', 'valid', 'wrong-data', 'short', 'long', 'no-finish', 'after-finish', 'gap', 'name-change', 'start-nonzero', 'no-name', 'bad-zstd', 'wrong-size', 'other-name'),
    cuts: fc.integer({ min: 1, max: 4 }),
    other: resourceName,
  })
  .map(({ blob, instance, uuid, zstd, variant, cuts, other }) => {
    const digest = digestOf(blob);
    const size = variant === 'wrong-size' ? digest.size + 1 : digest.size;
    const kind = zstd ? 'compressed-blobs/zstd' : 'blobs';
    let name = `${instance === '' ? '' : `${instance}/`}uploads/${uuid}/${kind}/${digest.hash}/${size}`;
    if (variant === 'other-name') name = other;
    let data: Buffer = blob;
    if (variant === 'wrong-data') {
      data = Buffer.from(blob);
      data[data.length >> 1]! ^= 0x5a;
    } else if (variant === 'short') data = blob.subarray(0, blob.length - 1);
    else if (variant === 'long') data = Buffer.concat([blob, Buffer.from('+')]);
    if (zstd) data = variant === 'bad-zstd' ? Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), data]) : zstdCompressSync(data);
    else if (variant === 'bad-zstd') data = Buffer.from(data.subarray(1));
    const messages = writeMessages(name, data, variant, cuts).map((m) => create(WriteRequestSchema, m as never));
    return { schema: WriteRequestSchema, messages, named: { cas: [digest], ac: [] } };
  });

/** Every REAPI method the surfaces serve, with requests of the right type and often wrong values. */
export const REQUESTS: readonly RequestSpec[] = [
  {
    name: 'FindMissingBlobs',
    path: `/${ContentAddressableStorage.typeName}/${ContentAddressableStorage.method.findMissingBlobs.name}`,
    request: unary(
      FindMissingBlobsRequestSchema,
      fc.record({ instanceName, blobDigests: fc.array(fc.oneof(protoDigest, fc.constant(toProtoDigest(KNOWN_DIGEST))), { maxLength: 6 }), digestFunction }),
    ),
  },
  {
    name: 'BatchUpdateBlobs',
    path: `/${ContentAddressableStorage.typeName}/${ContentAddressableStorage.method.batchUpdateBlobs.name}`,
    request: fc
      .record({
        instanceName,
        digestFunction,
        blobs: fc.array(fc.record({ blob, spoil: fc.constantFrom('none', 'none', 'data', 'size', 'hash', 'zstd') }), { minLength: 1, maxLength: 3 }),
        extra: fc.array(fc.record({ digest: fc.option(protoDigest, { nil: undefined }), data: fc.uint8Array({ maxLength: 40 }) }), { maxLength: 2 }),
      })
      .map(({ instanceName, digestFunction, blobs, extra }) => {
        const requests = blobs.map(({ blob, spoil }) => {
          const d = digestOf(blob);
          const data = spoil === 'data' ? Buffer.concat([blob.subarray(1), Buffer.from('!')]) : blob;
          return {
            digest: { hash: spoil === 'hash' ? d.hash.toUpperCase() : d.hash, sizeBytes: BigInt(d.size + (spoil === 'size' ? 1 : 0)) },
            data,
            compressor: spoil === 'zstd' ? 1 : 0,
          };
        });
        return {
          schema: BatchUpdateBlobsRequestSchema,
          messages: [create(BatchUpdateBlobsRequestSchema, { instanceName, digestFunction, requests: [...requests, ...extra] as never })],
          named: { cas: blobs.map(({ blob }) => digestOf(blob)), ac: [] },
        };
      }),
  },
  {
    name: 'BatchReadBlobs',
    path: `/${ContentAddressableStorage.typeName}/${ContentAddressableStorage.method.batchReadBlobs.name}`,
    request: unary(
      BatchReadBlobsRequestSchema,
      fc.record({
        instanceName,
        digestFunction,
        digests: fc.array(fc.oneof(protoDigest, fc.constant(toProtoDigest(KNOWN_DIGEST)), fc.constant(toProtoDigest(EMPTY_DIGEST))), { maxLength: 5 }),
        acceptableCompressors: fc.array(fc.constantFrom(0, 1, 2, 77), { maxLength: 2 }),
      }),
    ),
  },
  {
    name: 'GetTree',
    path: `/${ContentAddressableStorage.typeName}/${ContentAddressableStorage.method.getTree.name}`,
    request: unary(
      GetTreeRequestSchema,
      fc.record(
        {
          instanceName,
          digestFunction,
          rootDigest: fc.oneof(protoDigest, fc.constant(toProtoDigest(DIR_DIGEST)), fc.constant(toProtoDigest(KNOWN_DIGEST))),
          pageSize: fc.oneof(fc.constant(0), fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 })),
          pageToken: fc.oneof(fc.constant(''), nastyString(20), fc.base64String({ maxLength: 40 })),
        },
        { requiredKeys: ['instanceName', 'pageSize', 'pageToken'] },
      ),
    ),
  },
  {
    name: 'GetActionResult',
    path: `/${ActionCache.typeName}/${ActionCache.method.getActionResult.name}`,
    request: unary(
      GetActionResultRequestSchema,
      fc.record({ instanceName, digestFunction, actionDigest: fc.option(protoDigest, { nil: undefined }), inlineStdout: fc.boolean(), inlineOutputFiles: fc.array(nastyString(5), { maxLength: 2 }) }),
    ),
  },
  {
    name: 'UpdateActionResult',
    path: `/${ActionCache.typeName}/${ActionCache.method.updateActionResult.name}`,
    request: fc
      .record({
        instance: fc.oneof({ weight: 3, arbitrary: fc.constantFrom('', 'main') }, { weight: 1, arbitrary: instanceName }),
        digestFunction,
        action: fc.oneof({ weight: 4, arbitrary: uniqueDigest }, { weight: 1, arbitrary: protoDigest }),
        result: fc.option(
          fc.record({
            exitCode: fc.integer(),
            outputFiles: fc.array(fc.record({ path: outputPath, digest: fc.oneof(fc.constant(toProtoDigest(EMPTY_DIGEST)), protoDigest), isExecutable: fc.boolean() }), { maxLength: 3 }),
            outputDirectories: fc.array(fc.record({ path: outputPath, treeDigest: fc.option(fc.constant(toProtoDigest(EMPTY_DIGEST)), { nil: undefined }) }), { maxLength: 2 }),
            stdoutDigest: fc.option(protoDigest, { nil: undefined }),
          }),
          { freq: 8, nil: undefined },
        ),
      })
      .map(({ instance, digestFunction, action, result }) => {
        const actionDigest = 'sizeBytes' in action ? action : toProtoDigest(action);
        const named: Named = 'sizeBytes' in action ? NONE : { cas: [], ac: [{ instance, digest: action }] };
        return {
          schema: UpdateActionResultRequestSchema,
          messages: [create(UpdateActionResultRequestSchema, { instanceName: instance, digestFunction, actionDigest, actionResult: result })],
          named,
        };
      }),
  },
  {
    name: 'GetCapabilities',
    path: `/${Capabilities.typeName}/${Capabilities.method.getCapabilities.name}`,
    request: unary(GetCapabilitiesRequestSchema, fc.record({ instanceName })),
  },
  {
    name: 'ByteStream.Read',
    path: `/${ByteStream.typeName}/${ByteStream.method.read.name}`,
    request: unary(
      ReadRequestSchema,
      fc.record({
        resourceName: fc.oneof(resourceName, fc.constantFrom(`blobs/${KNOWN_DIGEST.hash}/${KNOWN_DIGEST.size}`, `main/compressed-blobs/zstd/${KNOWN_DIGEST.hash}/${KNOWN_DIGEST.size}`)),
        readOffset: offset,
        readLimit: offset,
      }),
    ),
  },
  {
    name: 'ByteStream.Write',
    path: `/${ByteStream.typeName}/${ByteStream.method.write.name}`,
    request: writeRequest,
  },
  {
    name: 'ByteStream.QueryWriteStatus',
    path: `/${ByteStream.typeName}/${ByteStream.method.queryWriteStatus.name}`,
    request: unary(QueryWriteStatusRequestSchema, fc.record({ resourceName })),
  },
];

// ---- what was named, and whether it was ever stored ----

/**
 * The blobs and action results requests named, and whether any request
 * that named one succeeded. A digest a success stored is exempt from the
 * check even if another, failed request named it too.
 */
export class Ledger {
  readonly #blobs = new Map<string, { digest: Digest; stored: boolean }>();
  readonly #results = new Map<string, { instance: string; digest: Digest; stored: boolean }>();

  /** Records what `named` names; `stored` says whether the request stored it (per blob, for batch uploads). */
  note(named: Named, stored: boolean | ((d: Digest) => boolean)): void {
    for (const d of named.cas) {
      const entry = this.#blobs.get(digestKey(d)) ?? { digest: d, stored: false };
      entry.stored ||= typeof stored === 'function' ? stored(d) : stored;
      this.#blobs.set(digestKey(d), entry);
    }
    for (const { instance, digest } of named.ac) {
      const key = `${instance}\0${digestKey(digest)}`;
      const entry = this.#results.get(key) ?? { instance, digest, stored: false };
      entry.stored ||= typeof stored === 'function' ? false : stored;
      this.#results.set(key, entry);
    }
  }

  /**
   * Asserts that every blob named only by failed requests is missing and
   * every stored one reads back whole, and that every action result named
   * only by failed updates is not served. Returns a one-line summary.
   */
  async verify(t: Test, cas: Client<typeof ContentAddressableStorage>, ac: Client<typeof ActionCache>): Promise<string> {
    const entries = [...this.#blobs.values()];
    const stored = entries.filter((e) => e.stored);
    const unstored = entries.filter((e) => !e.stored);
    const missing = new Set<string>();
    for (let i = 0; i < entries.length; i += 1000) {
      const res = await cas.findMissingBlobs({ blobDigests: entries.slice(i, i + 1000).map((e) => toProtoDigest(e.digest)) });
      for (const d of res.missingBlobDigests) missing.add(`${d.hash}/${d.sizeBytes}`);
    }
    const halfWritten = unstored.filter((e) => !missing.has(digestKey(e.digest)));
    t.same(halfWritten.map((e) => digestKey(e.digest)), [], `none of the ${unstored.length} blobs named only by failed uploads is visible`);
    const lost = stored.filter((e) => missing.has(digestKey(e.digest)));
    t.same(lost.map((e) => digestKey(e.digest)), [], `all ${stored.length} blobs whose upload succeeded are present`);
    let whole = 0;
    for (const e of stored) {
      const res = await cas.batchReadBlobs({ digests: [toProtoDigest(e.digest)] });
      const r = res.responses[0];
      if (r?.status?.code === 0 && digestKey(digestOf(r.data)) === digestKey(e.digest)) whole++;
    }
    t.equal(whole, stored.length, 'and each reads back with exactly its content');
    let visible = 0;
    let checked = 0;
    for (const e of this.#results.values()) {
      if (e.stored) continue;
      checked++;
      try {
        await ac.getActionResult({ instanceName: e.instance, actionDigest: toProtoDigest(e.digest) });
        visible++;
      } catch (err) {
        if (!(err instanceof ConnectError) || !PRECISE.has(err.code)) throw err;
      }
    }
    t.equal(visible, 0, `none of the ${checked} action results named only by failed updates is served`);
    return `${unstored.length} blobs named only by failed uploads all missing, ${stored.length} stored blobs whole; ${checked} action results of failed updates all NOT_FOUND`;
  }
}
