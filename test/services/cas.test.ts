import { create, toBinary } from '@bufbuild/protobuf';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { Client } from '@connectrpc/connect';
import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Directory } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import {
  Compressor_Value,
  ContentAddressableStorage,
  DigestFunction_Value,
  DirectorySchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { EMPTY_DIGEST, digestOf, digestString, toProtoDigest } from '../../src/digest.ts';
import { createCasService } from '../../src/services/cas.ts';
import type { BlobStore, CallOptions, GetOptions } from '../../src/stores/blob-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { once } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';
import { startNode } from '../helpers/node.ts';

const enc = new TextEncoder();

function setup(opts: { maxBatchTotalSizeBytes?: number; cas?: BlobStore } = {}): {
  client: Client<typeof ContentAddressableStorage>;
  cas: BlobStore;
} {
  const cas = opts.cas ?? new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: true });
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const service = createCasService({
    cas,
    ac,
    logger: pino({ level: 'silent' }),
    maxBatchTotalSizeBytes: opts.maxBatchTotalSizeBytes ?? 4 * 1024 * 1024,
    isReady: () => true,
  });
  const transport = createRouterTransport((router) => {
    router.service(ContentAddressableStorage, service);
  });
  return { client: createClient(ContentAddressableStorage, transport), cas };
}

async function putBlob(cas: BlobStore, data: Uint8Array): Promise<Digest> {
  const d = digestOf(data);
  await cas.put(d, once(data));
  return d;
}

const HASH_A = 'a'.repeat(64);

t.test('FindMissingBlobs returns each missing digest once, in request order; the empty blob is never missing', async (t) => {
  const { client, cas } = setup();
  const present = await putBlob(cas, enc.encode('present'));
  const missing1 = digestOf(enc.encode('missing one'));
  const missing2 = digestOf(enc.encode('missing two'));
  const res = await client.findMissingBlobs({
    blobDigests: [missing2, present, EMPTY_DIGEST, missing1, missing2].map(toProtoDigest),
  });
  t.same(
    res.missingBlobDigests.map((d) => `${d.hash}-${d.sizeBytes}`),
    [digestString(missing2), digestString(missing1)],
  );
});

t.test('FindMissingBlobs passes the call signal and deduplicated digests to the store', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const calls: Array<{ digests: readonly Digest[]; signal: AbortSignal | undefined }> = [];
  const spy: BlobStore = {
    findMissing: (digests, opts?: CallOptions) => {
      calls.push({ digests, signal: opts?.signal });
      return inner.findMissing(digests, opts);
    },
    get: (d, o) => inner.get(d, o),
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  const { client } = setup({ cas: spy });
  const d = digestOf(enc.encode('x'));
  await client.findMissingBlobs({ blobDigests: [d, d, EMPTY_DIGEST].map(toProtoDigest) });
  t.equal(calls.length, 1);
  t.same(calls[0]!.digests, [d]);
  t.ok(calls[0]!.signal instanceof AbortSignal);

  // Only empty digests: the store is not asked at all.
  await client.findMissingBlobs({ blobDigests: [toProtoDigest(EMPTY_DIGEST)] });
  t.equal(calls.length, 1);
});

t.test('FindMissingBlobs: one hash under two sizes is two digests; duplicates of each are answered once', async (t) => {
  const { client, cas } = setup();
  const present = await putBlob(cas, enc.encode('present'));
  const otherSize = { hash: present.hash, size: present.size + 1 };
  const res = await client.findMissingBlobs({
    blobDigests: [otherSize, present, otherSize, present].map(toProtoDigest),
  });
  t.same(res.missingBlobDigests.map((d) => `${d.hash}-${d.sizeBytes}`), [digestString(otherSize)]);
});

t.test('FindMissingBlobs answers in request order whatever objects and order the store answers with', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const digests = ['m1', 'p1', 'm2', 'm3', 'p2'].map((s) => digestOf(enc.encode(s)));
  for (const [i, d] of digests.entries()) if (i === 1 || i === 4) await inner.put(d, once(enc.encode(i === 1 ? 'p1' : 'p2')));
  const want = [digests[0]!, digests[2]!, digests[3]!].map(digestString);
  const variants: Array<[string, (missing: Digest[]) => Digest[]]> = [
    ['same objects, same order', (m) => m],
    ['same objects, reversed', (m) => [...m].reverse()],
    ['new objects, reversed', (m) => m.map((d) => ({ hash: d.hash, size: d.size })).reverse()],
  ];
  for (const [name, answer] of variants) {
    const store: BlobStore = {
      findMissing: async (ds, o) => answer(await inner.findMissing(ds, o)),
      get: (d, o) => inner.get(d, o),
      put: (d, c, o) => inner.put(d, c, o),
      describe: () => inner.describe(),
      close: () => inner.close(),
    };
    const { client } = setup({ cas: store });
    const res = await client.findMissingBlobs({ blobDigests: digests.map(toProtoDigest) });
    t.same(res.missingBlobDigests.map((d) => `${d.hash}-${d.sizeBytes}`), want, name);
  }
});

t.test('FindMissingBlobs rejects hashes with any character outside 0-9a-f', async (t) => {
  const { client } = setup();
  // Neighbours of the accepted ranges, uppercase, and non-ASCII.
  for (const c of ['/', ':', '`', 'g', 'A', 'F', '\u00e9', '\u0130', '\u{1F600}'.slice(0, 1)]) {
    const hash = `${'0'.repeat(40)}${c}${'0'.repeat(23)}`;
    const err = await failure(client.findMissingBlobs({ blobDigests: [{ hash, sizeBytes: 1n }] }));
    t.equal(err.code, Code.InvalidArgument, JSON.stringify(c));
    t.match(err.rawMessage, /^blob_digests\[0\]: hash ".*" is not lowercase hexadecimal$/, JSON.stringify(c));
  }
  const ok = await client.findMissingBlobs({ blobDigests: [{ hash: '0123456789abcdef'.repeat(4), sizeBytes: 1n }] });
  t.equal(ok.missingBlobDigests.length, 1, 'every hex digit is accepted');
});

t.test('FindMissingBlobs rejects malformed digests naming their index', async (t) => {
  const { client } = setup();
  const good = toProtoDigest(digestOf(enc.encode('ok')));
  const cases: Array<[string, { hash: string; sizeBytes: bigint }, string]> = [
    ['bad hex', { hash: 'G'.repeat(64), sizeBytes: 1n }, `blob_digests[1]: hash "${'G'.repeat(64)}" is not lowercase hexadecimal`],
    ['wrong length', { hash: 'abc', sizeBytes: 1n }, 'blob_digests[1]: hash "abc" has length 3, SHA-256 needs 64 hex characters'],
    ['empty hash', { hash: '', sizeBytes: 1n }, 'blob_digests[1]: hash is empty'],
    ['negative size', { hash: HASH_A, sizeBytes: -1n }, 'blob_digests[1]: size -1 is negative'],
    [
      'size above MAX_SAFE_INTEGER',
      { hash: HASH_A, sizeBytes: BigInt(Number.MAX_SAFE_INTEGER) + 1n },
      'blob_digests[1]: size 9007199254740992 is too large',
    ],
    ['size 0 with a non-empty hash', { hash: HASH_A, sizeBytes: 0n }, 'blob_digests[1]: size 0 but hash is not the SHA-256 of the empty blob'],
  ];
  for (const [name, bad, message] of cases) {
    const err = await failure(client.findMissingBlobs({ blobDigests: [good, bad] }));
    t.equal(err.code, Code.InvalidArgument, name);
    t.equal(err.rawMessage, message, name);
  }
});

t.test('FindMissingBlobs accepts UNKNOWN and SHA256 digest functions and rejects others', async (t) => {
  const { client } = setup();
  const d = toProtoDigest(digestOf(enc.encode('x')));
  t.equal((await client.findMissingBlobs({ blobDigests: [d], digestFunction: DigestFunction_Value.UNKNOWN })).missingBlobDigests.length, 1);
  t.equal((await client.findMissingBlobs({ blobDigests: [d], digestFunction: DigestFunction_Value.SHA256 })).missingBlobDigests.length, 1);
  const err = await failure(client.findMissingBlobs({ blobDigests: [d], digestFunction: DigestFunction_Value.SHA1 }));
  t.equal(err.code, Code.InvalidArgument);
  t.equal(err.rawMessage, 'digest_function SHA1 is not supported, this server only uses SHA256');
});

t.test('every call validates the instance name', async (t) => {
  const { client } = setup();
  const message = 'instance_name "/main" starts with "/"';
  const calls: Array<[string, Promise<unknown>]> = [
    ['FindMissingBlobs', client.findMissingBlobs({ instanceName: '/main' })],
    ['BatchUpdateBlobs', client.batchUpdateBlobs({ instanceName: '/main' })],
    ['BatchReadBlobs', client.batchReadBlobs({ instanceName: '/main' })],
    ['GetTree', collectTree(client, { instanceName: '/main', rootDigest: toProtoDigest(EMPTY_DIGEST) })],
  ];
  for (const [name, p] of calls) {
    const err = await failure(p);
    t.equal(err.code, Code.InvalidArgument, name);
    t.equal(err.rawMessage, message, name);
  }
  // A valid non-empty instance name is accepted.
  t.same((await client.findMissingBlobs({ instanceName: 'main/linux' })).missingBlobDigests, []);
});

t.test('BatchUpdateBlobs rejects the whole batch when it exceeds max_batch_total_size_bytes', async (t) => {
  const { client, cas } = setup({ maxBatchTotalSizeBytes: 100 });
  const a = new Uint8Array(60).fill(1);
  const b = new Uint8Array(60).fill(2);
  const err = await failure(
    client.batchUpdateBlobs({
      requests: [
        { digest: toProtoDigest(digestOf(a)), data: a },
        { digest: toProtoDigest(digestOf(b)), data: b },
      ],
    }),
  );
  t.equal(err.code, Code.InvalidArgument);
  t.equal(
    err.rawMessage,
    'BatchUpdateBlobs: 2 blobs total 120 bytes, more than max_batch_total_size_bytes 100; upload large blobs with ByteStream Write',
  );
  t.equal((await cas.findMissing([digestOf(a), digestOf(b)])).length, 2, 'nothing was stored');

  // Exactly at the limit is fine.
  const c = new Uint8Array(100).fill(3);
  const res = await client.batchUpdateBlobs({ requests: [{ digest: toProtoDigest(digestOf(c)), data: c }] });
  t.equal(res.responses[0]!.status!.code, 0);
});

t.test('BatchUpdateBlobs fails only the bad blobs and stores none of them', async (t) => {
  const { client, cas } = setup();
  const good1 = enc.encode('good one');
  const good2 = enc.encode('good two');
  const claimed = enc.encode('what the digest says');
  const sent = enc.encode('what the client sent');
  t.equal(claimed.byteLength, sent.byteLength);
  const shortDigest = digestOf(enc.encode('twelve bytes'));
  const zstd = enc.encode('compressed?');
  const res = await client.batchUpdateBlobs({
    requests: [
      { digest: toProtoDigest(digestOf(good1)), data: good1 },
      { digest: toProtoDigest(digestOf(claimed)), data: sent },
      { digest: toProtoDigest(shortDigest), data: enc.encode('short') },
      { digest: toProtoDigest(digestOf(zstd)), data: zstd, compressor: Compressor_Value.ZSTD },
      { digest: toProtoDigest(EMPTY_DIGEST), data: new Uint8Array(0) },
      { digest: toProtoDigest(digestOf(good2)), data: good2 },
    ],
  });
  t.same(
    res.responses.map((r) => [`${r.digest!.hash}-${r.digest!.sizeBytes}`, r.status!.code, r.status!.message]),
    [
      [digestString(digestOf(good1)), 0, ''],
      [
        digestString(digestOf(claimed)),
        Code.InvalidArgument,
        `requests[1]: blob ${digestString(digestOf(claimed))} content hashes to ${digestOf(sent).hash}, not to the digest's hash`,
      ],
      [
        digestString(shortDigest),
        Code.InvalidArgument,
        `requests[2]: blob ${digestString(shortDigest)} has 5 bytes of data, digest says 12`,
      ],
      [
        digestString(digestOf(zstd)),
        Code.InvalidArgument,
        'requests[3]: compressor ZSTD is not supported by BatchUpdateBlobs, send IDENTITY',
      ],
      [digestString(EMPTY_DIGEST), 0, ''],
      [digestString(digestOf(good2)), 0, ''],
    ],
  );
  const missing = await cas.findMissing([digestOf(good1), digestOf(good2), digestOf(claimed), digestOf(sent), shortDigest, digestOf(zstd)]);
  t.same(missing.map(digestString).sort(), [digestOf(claimed), digestOf(sent), shortDigest, digestOf(zstd)].map(digestString).sort());
});

t.test('BatchUpdateBlobs rejects a malformed digest for the whole call', async (t) => {
  const { client } = setup();
  const err = await failure(
    client.batchUpdateBlobs({
      requests: [
        { digest: toProtoDigest(digestOf(enc.encode('ok'))), data: enc.encode('ok') },
        { digest: { hash: HASH_A, sizeBytes: -5n }, data: new Uint8Array(0) },
      ],
    }),
  );
  t.equal(err.code, Code.InvalidArgument);
  t.equal(err.rawMessage, 'requests[1].digest: size -5 is negative');
  const err2 = await failure(client.batchUpdateBlobs({ requests: [{ data: enc.encode('no digest') }] }));
  t.equal(err2.rawMessage, 'requests[0].digest: missing');
});

t.test('BatchUpdateBlobs reports a store failure per blob, keeping its code', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const flaky = enc.encode('flaky');
  const failing: BlobStore = {
    findMissing: (d, o) => inner.findMissing(d, o),
    get: (d, o) => inner.get(d, o),
    put: async (d, c, o) => {
      if (d.hash === digestOf(flaky).hash) throw new ConnectError('shard b: connection refused', Code.Unavailable);
      return inner.put(d, c, o);
    },
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  const { client } = setup({ cas: failing });
  const fine = enc.encode('fine');
  const res = await client.batchUpdateBlobs({
    requests: [
      { digest: toProtoDigest(digestOf(flaky)), data: flaky },
      { digest: toProtoDigest(digestOf(fine)), data: fine },
    ],
  });
  t.same(
    res.responses.map((r) => [r.status!.code, r.status!.message]),
    [
      [Code.Unavailable, 'shard b: connection refused'],
      [0, ''],
    ],
  );
});

t.test('BatchReadBlobs returns data, per-blob NOT_FOUND and the empty blob', async (t) => {
  const { client, cas } = setup();
  const data = enc.encode('hello');
  const present = await putBlob(cas, data);
  const missing = digestOf(enc.encode('nobody uploaded this'));
  const res = await client.batchReadBlobs({
    digests: [present, missing, EMPTY_DIGEST, present].map(toProtoDigest),
    // We answer IDENTITY whatever the client lists: the spec always allows it.
    acceptableCompressors: [Compressor_Value.ZSTD],
  });
  t.same(
    res.responses.map((r) => [
      `${r.digest!.hash}-${r.digest!.sizeBytes}`,
      r.status!.code,
      r.status!.message,
      Buffer.from(r.data).toString(),
      r.compressor,
    ]),
    [
      [digestString(present), 0, '', 'hello', Compressor_Value.IDENTITY],
      [digestString(missing), Code.NotFound, `blob ${digestString(missing)} not found`, '', Compressor_Value.IDENTITY],
      [digestString(EMPTY_DIGEST), 0, '', '', Compressor_Value.IDENTITY],
      [digestString(present), 0, '', 'hello', Compressor_Value.IDENTITY],
    ],
  );
});

t.test('BatchReadBlobs rejects requests whose sizes sum over the limit', async (t) => {
  const { client } = setup({ maxBatchTotalSizeBytes: 1000 });
  const err = await failure(
    client.batchReadBlobs({
      digests: [
        { hash: HASH_A, sizeBytes: 600n },
        { hash: 'b'.repeat(64), sizeBytes: 401n },
      ],
    }),
  );
  t.equal(err.code, Code.InvalidArgument);
  t.equal(
    err.rawMessage,
    'BatchReadBlobs: 2 blobs total 1001 bytes, more than max_batch_total_size_bytes 1000; read large blobs with ByteStream Read',
  );
  const err2 = await failure(client.batchReadBlobs({ digests: [{ hash: 'abc', sizeBytes: 1n }] }));
  t.equal(err2.rawMessage, 'digests[0]: hash "abc" has length 3, SHA-256 needs 64 hex characters');
});

t.test('BatchReadBlobs keeps the code of an infrastructure error per blob', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const ok = await putBlob(inner, enc.encode('ok'));
  const broken = await putBlob(inner, enc.encode('broken'));
  const truncated = await putBlob(inner, enc.encode('truncated'));
  const store: BlobStore = {
    findMissing: (d, o) => inner.findMissing(d, o),
    get: async (d, o?: GetOptions) => {
      if (d.hash === broken.hash) throw new ConnectError('shard c: deadline exceeded', Code.DeadlineExceeded);
      if (d.hash === truncated.hash) return once(enc.encode('trunc'));
      return inner.get(d, o);
    },
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  const { client } = setup({ cas: store });
  const res = await client.batchReadBlobs({ digests: [ok, broken, truncated].map(toProtoDigest) });
  t.same(
    res.responses.map((r) => [r.status!.code, r.status!.message]),
    [
      [0, ''],
      [Code.DeadlineExceeded, 'shard c: deadline exceeded'],
      [Code.DataLoss, `blob ${digestString(truncated)}: store returned 5 bytes, digest says 9`],
    ],
  );
});

// A tree with shared and empty subdirectories:
//   root: file "top", dirs e (empty), x, y
//   x: dir z        y: dirs w, z (shared with x)
//   z: file "f1"    w: file "f2"
async function buildTree(cas: BlobStore): Promise<{ root: Digest; order: Directory[]; digests: Record<string, Digest> }> {
  const fileTop = await putBlob(cas, enc.encode('top'));
  const f1 = await putBlob(cas, enc.encode('f1'));
  const f2 = await putBlob(cas, enc.encode('f2'));
  const putDir = async (init: MessageInitShape<typeof DirectorySchema>): Promise<{ dir: Directory; digest: Digest }> => {
    const dir = create(DirectorySchema, init);
    return { dir, digest: await putBlob(cas, toBinary(DirectorySchema, dir)) };
  };
  const z = await putDir({ files: [{ name: 'f1', digest: toProtoDigest(f1) }] });
  const w = await putDir({ files: [{ name: 'f2', digest: toProtoDigest(f2) }] });
  const e = { dir: create(DirectorySchema), digest: EMPTY_DIGEST };
  const x = await putDir({ directories: [{ name: 'z', digest: toProtoDigest(z.digest) }] });
  const y = await putDir({
    directories: [
      { name: 'w', digest: toProtoDigest(w.digest) },
      { name: 'z', digest: toProtoDigest(z.digest) },
    ],
  });
  const root = await putDir({
    files: [{ name: 'top', digest: toProtoDigest(fileTop) }],
    directories: [
      { name: 'e', digest: toProtoDigest(e.digest) },
      { name: 'x', digest: toProtoDigest(x.digest) },
      { name: 'y', digest: toProtoDigest(y.digest) },
    ],
  });
  // BFS follows the parent's listing order: root lists e, x, y; x lists z;
  // y lists w and z (z already seen).
  return {
    root: root.digest,
    order: [root.dir, e.dir, x.dir, y.dir, z.dir, w.dir],
    digests: { root: root.digest, x: x.digest, y: y.digest, z: z.digest, w: w.digest },
  };
}

async function collectTree(
  client: Client<typeof ContentAddressableStorage>,
  req: Parameters<Client<typeof ContentAddressableStorage>['getTree']>[0],
): Promise<Array<{ directories: Directory[]; nextPageToken: string }>> {
  const pages: Array<{ directories: Directory[]; nextPageToken: string }> = [];
  for await (const res of client.getTree(req)) pages.push({ directories: res.directories, nextPageToken: res.nextPageToken });
  return pages;
}

function asBinary(dirs: Directory[]): string[] {
  return dirs.map((d) => Buffer.from(toBinary(DirectorySchema, d)).toString('hex'));
}

t.test('GetTree returns every directory once, in BFS order, in one page by default', async (t) => {
  const { client, cas } = setup();
  const { root, order } = await buildTree(cas);
  const pages = await collectTree(client, { rootDigest: toProtoDigest(root) });
  t.equal(pages.length, 1);
  t.same(asBinary(pages[0]!.directories), asBinary(order));
  t.equal(pages[0]!.nextPageToken, '');
});

t.test('GetTree pages by page_size and resumes from a page token', async (t) => {
  const { client, cas } = setup();
  const { root, order } = await buildTree(cas);
  const pages = await collectTree(client, { rootDigest: toProtoDigest(root), pageSize: 2 });
  t.same(
    pages.map((p) => asBinary(p.directories)),
    [asBinary(order.slice(0, 2)), asBinary(order.slice(2, 4)), asBinary(order.slice(4, 6))],
  );
  t.not(pages[0]!.nextPageToken, '');
  t.not(pages[1]!.nextPageToken, '');
  t.equal(pages[2]!.nextPageToken, '');

  const resumed = await collectTree(client, { rootDigest: toProtoDigest(root), pageSize: 4, pageToken: pages[0]!.nextPageToken });
  t.same(
    resumed.map((p) => asBinary(p.directories)),
    [asBinary(order.slice(2, 6))],
  );
  t.equal(resumed[0]!.nextPageToken, '');

  // A page size that divides the tree exactly still ends with an empty token on the last page.
  const three = await collectTree(client, { rootDigest: toProtoDigest(root), pageSize: 3 });
  t.same(three.map((p) => p.directories.length), [3, 3]);
  t.equal(three[1]!.nextPageToken, '');
});

t.test('GetTree rejects foreign, garbled and past-the-end page tokens', async (t) => {
  const { client, cas } = setup();
  const { root, digests } = await buildTree(cas);
  const pages = await collectTree(client, { rootDigest: toProtoDigest(root), pageSize: 1 });
  t.equal(pages.length, 6);

  const foreign = await failure(collectTree(client, { rootDigest: toProtoDigest(digests.x!), pageToken: pages[0]!.nextPageToken }));
  t.equal(foreign.code, Code.InvalidArgument);
  t.equal(foreign.rawMessage, `page_token was issued for root_digest ${digestString(root)}, not ${digestString(digests.x!)}`);

  const garbled = await failure(collectTree(client, { rootDigest: toProtoDigest(root), pageToken: 'not a token' }));
  t.equal(garbled.code, Code.InvalidArgument);
  t.equal(garbled.rawMessage, 'page_token is not a token returned by GetTree');

  const forged = Buffer.from(JSON.stringify({ v: 1, root: digestString(root), position: 6 })).toString('base64url');
  const past = await failure(collectTree(client, { rootDigest: toProtoDigest(root), pageToken: forged }));
  t.equal(past.code, Code.InvalidArgument);
  t.equal(past.rawMessage, `page_token points past the end of tree ${digestString(root)}`);

  const negative = await failure(collectTree(client, { rootDigest: toProtoDigest(root), pageSize: -1 }));
  t.equal(negative.code, Code.InvalidArgument);
  t.equal(negative.rawMessage, 'page_size -1 is negative');
});

t.test('GetTree: a missing root is NOT_FOUND naming the digest', async (t) => {
  const { client } = setup();
  const absent = digestOf(toBinary(DirectorySchema, create(DirectorySchema, { files: [{ name: 'gone' }] })));
  const missingRoot = await failure(collectTree(client, { rootDigest: toProtoDigest(absent) }));
  t.equal(missingRoot.code, Code.NotFound);
  t.equal(missingRoot.rawMessage, `root directory ${digestString(absent)} not found`);
});

/** A memory CAS whose blobs can be made to vanish behind GetTree's back (NOT_FOUND). */
function vanishing(): { store: BlobStore; forget: (d: Digest) => void } {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: true });
  const gone = new Set<string>();
  const store: BlobStore = {
    findMissing: async (ds, o) => [...ds.filter((d) => gone.has(d.hash)), ...(await inner.findMissing(ds.filter((d) => !gone.has(d.hash)), o))],
    get: async (d, o) => {
      if (gone.has(d.hash)) throw new ConnectError(`blob ${digestString(d)} not found`, Code.NotFound);
      return inner.get(d, o);
    },
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  return { store, forget: (d) => gone.add(d.hash) };
}

t.test('GetTree: a partly missing tree returns the portion present, missing subtrees left out', async (t) => {
  const { store, forget } = vanishing();
  const { client, cas } = setup({ cas: store });
  const { root, order, digests } = await buildTree(cas);
  // order: root, e, x, y, z, w; x lists z; y lists w and z. Without y, w is
  // unreachable, z still comes through x.
  forget(digests.y!);
  const pages = await collectTree(client, { rootDigest: toProtoDigest(root) });
  t.same(asBinary(pages.flatMap((p) => p.directories)), asBinary([order[0]!, order[1]!, order[2]!, order[4]!]));
  t.equal(pages.at(-1)!.nextPageToken, '');

  // Pages and tokens count the directories present.
  const paged = await collectTree(client, { rootDigest: toProtoDigest(root), pageSize: 3 });
  t.same(paged.map((p) => asBinary(p.directories)), [asBinary(order.slice(0, 3)), asBinary([order[4]!])]);

  // Every subdirectory gone: the root alone.
  forget(digests.x!);
  forget(digests.z!);
  const rootOnly = await collectTree(client, { rootDigest: toProtoDigest(root) });
  t.same(asBinary(rootOnly.flatMap((p) => p.directories)), asBinary([order[0]!, order[1]!]), 'the root and the empty directory');
});

t.test('GetTree: failures other than NOT_FOUND still fail the call', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: true });
  let broken: Digest | undefined;
  const flaky: BlobStore = {
    findMissing: (d, o) => inner.findMissing(d, o),
    get: async (d, o) => {
      if (broken !== undefined && d.hash === broken.hash) throw new ConnectError('shard down', Code.Unavailable);
      return inner.get(d, o);
    },
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  const { client, cas } = setup({ cas: flaky });
  const { root, digests } = await buildTree(cas);
  broken = digests.y!;
  const err = await failure(collectTree(client, { rootDigest: toProtoDigest(root) }));
  t.equal(err.code, Code.Unavailable, 'an unreadable directory is not taken for a missing one');
});

t.test('GetTree over gRPC with connect-node: a partial tree, then NOT_FOUND for a missing root', async (t) => {
  const { store, forget } = vanishing();
  const node = await startNode({ trees: { cas: store, ac: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }) } });
  t.teardown(() => node.close());
  const grpc = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: node.url }));
  const { root, order, digests } = await buildTree(node.cas);
  forget(digests.y!);
  const pages = await collectTree(grpc, { rootDigest: toProtoDigest(root), pageSize: 2 });
  t.same(
    pages.map((p) => asBinary(p.directories)),
    [asBinary(order.slice(0, 2)), asBinary([order[2]!, order[4]!])],
  );
  t.equal(pages[1]!.nextPageToken, '');
  forget(root);
  const missing = await failure(collectTree(grpc, { rootDigest: toProtoDigest(root) }));
  t.equal(missing.code, Code.NotFound);
  t.equal(missing.rawMessage, `root directory ${digestString(root)} not found`);
});

t.test('GetTree: a blob that is not a Directory is INVALID_ARGUMENT', async (t) => {
  const { client, cas } = setup();
  const junk = await putBlob(cas, new Uint8Array([0xff, 0xff, 0xff]));
  const err = await failure(collectTree(client, { rootDigest: toProtoDigest(junk) }));
  t.equal(err.code, Code.InvalidArgument);
  t.match(err.rawMessage, new RegExp(`^root directory ${digestString(junk)} is not a valid Directory message: `));
});

t.test('GetTree of the empty root returns one empty directory', async (t) => {
  const { client } = setup();
  const pages = await collectTree(client, { rootDigest: toProtoDigest(EMPTY_DIGEST) });
  t.equal(pages.length, 1);
  t.equal(pages[0]!.directories.length, 1);
  t.same(asBinary(pages[0]!.directories), ['']);
});

t.test('SplitBlob and SpliceBlob are UNIMPLEMENTED', async (t) => {
  const { client } = setup();
  t.equal((await failure(client.splitBlob({}))).code, Code.Unimplemented);
  t.equal((await failure(client.spliceBlob({}))).code, Code.Unimplemented);
});
