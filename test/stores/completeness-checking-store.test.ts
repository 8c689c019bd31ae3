import { create, toBinary } from '@bufbuild/protobuf';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import type { Test } from 'tap';
import { ActionResultSchema, DirectorySchema, TreeSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { EMPTY_DIGEST, digestOf, digestString, toProtoDigest } from '../../src/digest.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { CompletenessCheckingStore } from '../../src/stores/completeness-checking-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { collect, once } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';

const enc = new TextEncoder();
const action = digestOf(enc.encode('action'));

function setup(opts: { cas?: BlobStore; maxTreeBytes?: number } = {}): {
  store: CompletenessCheckingStore;
  cas: BlobStore;
  backend: MemoryStore;
} {
  const cas = opts.cas ?? new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: true });
  const backend = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  return { store: new CompletenessCheckingStore({ backend, cas, maxTreeBytes: opts.maxTreeBytes }), cas, backend };
}

async function putBlob(cas: BlobStore, data: Uint8Array): Promise<Digest> {
  const d = digestOf(data);
  await cas.put(d, once(data));
  return d;
}

async function putResult(store: BlobStore, init: MessageInitShape<typeof ActionResultSchema>): Promise<Uint8Array> {
  const bytes = toBinary(ActionResultSchema, create(ActionResultSchema, init));
  await store.put(action, once(bytes));
  return bytes;
}

/** Asserts the result is hidden by both get() and findMissing(), with this message. */
async function assertHidden(t: Test, store: BlobStore, message: string): Promise<void> {
  const err = await failure(store.get(action));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, message);
  t.same(await store.findMissing([action]), [action], 'findMissing reports it missing');
}

async function assertServed(t: Test, store: BlobStore, bytes: Uint8Array): Promise<void> {
  t.same(Buffer.from(await collect(await store.get(action))), Buffer.from(bytes));
  t.same(await store.findMissing([action]), [], 'findMissing reports it present');
}

t.test('a missing output file hides the result until it is uploaded', async (t) => {
  const { store, cas } = setup();
  const file = enc.encode('output file');
  const bytes = await putResult(store, { outputFiles: [{ path: 'out/a', digest: toProtoDigest(digestOf(file)) }] });
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(file))} (output_files[0] "out/a")`,
  );
  await putBlob(cas, file);
  await assertServed(t, store, bytes);
});

t.test('a missing stdout or stderr hides the result', async (t) => {
  const { store, cas } = setup();
  const stdout = enc.encode('stdout');
  const stderr = enc.encode('stderr');
  const bytes = await putResult(store, { stdoutDigest: toProtoDigest(digestOf(stdout)), stderrDigest: toProtoDigest(digestOf(stderr)) });
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(stdout))} (stdout_digest) and 1 more`,
  );
  await putBlob(cas, stdout);
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(stderr))} (stderr_digest)`,
  );
  await putBlob(cas, stderr);
  await assertServed(t, store, bytes);
});

t.test('output directories: a missing Tree blob, or a file inside the Tree, hides the result', async (t) => {
  const { store, cas } = setup();
  const rootFile = enc.encode('root file');
  const childFile = enc.encode('child file');
  const child = create(DirectorySchema, { files: [{ name: 'c.txt', digest: toProtoDigest(digestOf(childFile)) }] });
  const childDigest = digestOf(toBinary(DirectorySchema, child));
  const tree = create(TreeSchema, {
    root: {
      files: [{ name: 'r.txt', digest: toProtoDigest(digestOf(rootFile)) }],
      directories: [{ name: 'sub', digest: toProtoDigest(childDigest) }],
    },
    children: [child],
  });
  const treeBytes = toBinary(TreeSchema, tree);
  const treeDigest = digestOf(treeBytes);
  const bytes = await putResult(store, { outputDirectories: [{ path: 'out/dir', treeDigest: toProtoDigest(treeDigest) }] });

  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing tree ${digestString(treeDigest)} (output_directories[0] "out/dir")`,
  );
  await putBlob(cas, treeBytes);
  await putBlob(cas, rootFile);
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(childFile))} ` +
      `(output_directories[0] "out/dir" children[0] file "c.txt")`,
  );
  await putBlob(cas, childFile);
  // The child Directory message itself is not needed: the Tree carries it.
  await assertServed(t, store, bytes);
});

t.test('directory-only outputs: every Directory and file under root_directory_digest must be readable', async (t) => {
  const { store, cas } = setup();
  const leafFile = enc.encode('leaf');
  const leaf = toBinary(DirectorySchema, create(DirectorySchema, { files: [{ name: 'leaf.txt', digest: toProtoDigest(digestOf(leafFile)) }] }));
  const root = toBinary(
    DirectorySchema,
    create(DirectorySchema, { directories: [{ name: 'nested', digest: toProtoDigest(digestOf(leaf)) }] }),
  );
  const bytes = await putResult(store, { outputDirectories: [{ path: 'gen', rootDirectoryDigest: toProtoDigest(digestOf(root)) }] });
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing directory ${digestString(digestOf(root))} at "" ` +
      `(output_directories[0] "gen")`,
  );
  await putBlob(cas, root);
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing directory ${digestString(digestOf(leaf))} at "nested" ` +
      `(output_directories[0] "gen")`,
  );
  await putBlob(cas, leaf);
  await assertHidden(
    t,
    store,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(leafFile))} ` +
      `(output_directories[0] "gen" "nested" file "leaf.txt")`,
  );
  await putBlob(cas, leafFile);
  await assertServed(t, store, bytes);
});

t.test('the empty blob is always present', async (t) => {
  const { store } = setup();
  const bytes = await putResult(store, {
    outputFiles: [{ path: 'empty', digest: toProtoDigest(EMPTY_DIGEST) }],
    stdoutDigest: toProtoDigest(EMPTY_DIGEST),
    outputDirectories: [{ path: 'd', rootDirectoryDigest: toProtoDigest(EMPTY_DIGEST) }],
  });
  await assertServed(t, store, bytes);
});

t.test('an absent result is a plain miss and is not counted as hidden', async (t) => {
  const { store } = setup();
  const err = await failure(store.get(action));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, `blob ${digestString(action)} not found`);
  t.same(await store.findMissing([action]), [action]);
  t.same(store.describe(), {
    kind: 'completenessChecking',
    hiddenResults: 0,
    children: [{ kind: 'memory', blobs: 0, bytes: 0, maxSizeBytes: 1 << 20, evictions: 0 }],
  });
});

t.test('findMissing mixes absent, incomplete and complete results', async (t) => {
  const { store, cas } = setup();
  const complete = digestOf(enc.encode('complete action'));
  const incomplete = digestOf(enc.encode('incomplete action'));
  const absent = digestOf(enc.encode('absent action'));
  const out = await putBlob(cas, enc.encode('here'));
  await store.put(complete, once(toBinary(ActionResultSchema, create(ActionResultSchema, { stdoutDigest: toProtoDigest(out) }))));
  await store.put(
    incomplete,
    once(toBinary(ActionResultSchema, create(ActionResultSchema, { stdoutDigest: toProtoDigest(digestOf(enc.encode('gone'))) }))),
  );
  const missing = await store.findMissing([complete, incomplete, absent]);
  t.same(missing.map(digestString).sort(), [incomplete, absent].map(digestString).sort());
  t.equal(store.describe()['hiddenResults'], 1);
});

t.test('a stored result that does not parse, or holds an invalid digest, is hidden', async (t) => {
  const { store } = setup();
  await store.put(action, once(new Uint8Array([0xff, 0xff, 0xff])));
  const err = await failure(store.get(action));
  t.equal(err.code, Code.NotFound);
  t.match(err.rawMessage, new RegExp(`^action result ${digestString(action)} does not parse: `));

  await putResult(store, { outputFiles: [{ path: 'x', digest: { hash: 'nothex', sizeBytes: 1n } }] });
  const err2 = await failure(store.get(action));
  t.equal(err2.code, Code.NotFound);
  t.equal(
    err2.rawMessage,
    `action result ${digestString(action)} is invalid: output_files[0] "x": hash "nothex" has length 6, SHA-256 needs 64 hex characters`,
  );
});

t.test('output trees over the budget hide the result without reading them', async (t) => {
  const { store } = setup({ maxTreeBytes: 100 });
  await putResult(store, {
    outputDirectories: [{ path: 'big', treeDigest: { hash: 'a'.repeat(64), sizeBytes: 101n } }],
  });
  const err = await failure(store.get(action));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, `action result ${digestString(action)} has output trees larger than 100 bytes and cannot be checked`);
});

t.test('CAS infrastructure errors propagate with their code', async (t) => {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  let failFindMissing = true;
  const cas: BlobStore = {
    findMissing: async (d, o) => {
      if (failFindMissing) throw new ConnectError('shard a: connection refused', Code.Unavailable);
      return inner.findMissing(d, o);
    },
    get: async () => {
      throw new ConnectError('shard b: deadline exceeded', Code.DeadlineExceeded);
    },
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  const { store } = setup({ cas });
  await putResult(store, { stdoutDigest: toProtoDigest(digestOf(enc.encode('out'))) });
  const err = await failure(store.get(action));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, `checking action result ${digestString(action)}: shard a: connection refused`);
  const err2 = await failure(store.findMissing([action]));
  t.equal(err2.code, Code.Unavailable, 'findMissing does not turn an outage into a miss');

  failFindMissing = false;
  await putResult(store, { outputDirectories: [{ path: 'd', treeDigest: toProtoDigest(digestOf(enc.encode('tree'))) }] });
  const err3 = await failure(store.get(action));
  t.equal(err3.code, Code.DeadlineExceeded);
  t.equal(err3.rawMessage, `checking action result ${digestString(action)}: shard b: deadline exceeded`);
});

t.test('get honours offset and limit after the check', async (t) => {
  const { store } = setup();
  const bytes = await putResult(store, { exitCode: 7, stdoutRaw: enc.encode('inline') });
  const part = await collect(await store.get(action, { offset: 2, limit: 3 }));
  t.same(Buffer.from(part), Buffer.from(bytes.subarray(2, 5)));
});

t.test('close closes the backend but not the shared CAS', async (t) => {
  const { store, cas, backend } = setup();
  const d = await putBlob(cas, enc.encode('kept'));
  await putResult(store, {});
  await store.close();
  t.same(await backend.findMissing([action]), [action]);
  t.same(await cas.findMissing([d]), []);
});
