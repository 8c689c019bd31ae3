// Action-cache namespaces (issue 11, instance isolation) through every store
// kind: an entry written in one namespace is NOT_FOUND in every other, on the
// leaves (memory, disk, remote) and through the routers (sharding with its
// hints, handoff and existence cache; fallback with its replication, repair
// and journal; completeness checking; metrics). Records written before
// namespaces existed (hint lines, journal entries, disk files) are read as
// the default namespace "".
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { toBinary } from '@bufbuild/protobuf';
import { create } from '@bufbuild/protobuf';
import { Code, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import t, { type Test } from 'tap';
import { ActionCache, ActionResultSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { digestKey, digestOf, toProtoDigest } from '../../src/digest.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { namespacedKey } from '../../src/stores/blob-store.ts';
import { CompletenessCheckingStore } from '../../src/stores/completeness-checking-store.ts';
import { CopyQueue } from '../../src/stores/copy-queue.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { FallbackStore, JOURNAL_FILE } from '../../src/stores/fallback-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { MetricsStore } from '../../src/stores/metrics-store.ts';
import { RemoteStore } from '../../src/stores/remote-store.ts';
import { rank } from '../../src/stores/rendezvous.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';
import { collect, once } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';
import { startNode } from '../helpers/node.ts';

const enc = new TextEncoder();
const dec = new TextDecoder();

async function tempDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ac-namespaces-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function entry(label: string): { digest: Digest; value: Uint8Array } {
  return { digest: digestOf(enc.encode(`action ${label}`)), value: enc.encode(`result ${label}`) };
}

async function put(store: BlobStore, d: Digest, value: string | Uint8Array, namespace?: string): Promise<void> {
  await store.put(d, once(typeof value === 'string' ? enc.encode(value) : value), { namespace });
}

/** The value as text, or 'not-found', or the error code. */
async function read(store: BlobStore, d: Digest, namespace?: string): Promise<string> {
  try {
    return dec.decode(await collect(await store.get(d, { namespace })));
  } catch (err) {
    const code = (err as { code?: number }).code;
    return code === Code.NotFound ? 'not-found' : `error ${Code[code ?? Code.Unknown]}: ${String(err)}`;
  }
}

async function present(store: BlobStore, d: Digest, namespace?: string): Promise<boolean> {
  return (await store.findMissing([d], { namespace })).length === 0;
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Every namespace a test looks at, and what a store should hold in each. */
async function views(store: BlobStore, d: Digest, namespaces: readonly string[] = ['a', 'b', '']): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const ns of namespaces) out[ns] = `${await read(store, d, ns)} / ${(await present(store, d, ns)) ? 'present' : 'missing'}`;
  return out;
}

const nsDir = (ns: string) => createHash('sha256').update(ns, 'utf8').digest('hex');

// --- leaves ------------------------------------------------------------------

t.test('memory AC: entries are keyed by (namespace, digest); the CAS ignores namespaces', async (t) => {
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const x = entry('mem');
  await put(ac, x.digest, 'in a', 'a');
  t.same(await views(ac, x.digest), { a: 'in a / present', b: 'not-found / missing', '': 'not-found / missing' });
  await put(ac, x.digest, 'in default');
  await put(ac, x.digest, 'in b', 'b');
  t.same(await views(ac, x.digest), { a: 'in a / present', b: 'in b / present', '': 'in default / present' });
  t.equal(await read(ac, x.digest, undefined), 'in default', 'absent namespace is the default one');
  t.equal(ac.describe().blobs, 3);

  const cas = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const data = enc.encode('shared blob');
  const d = digestOf(data);
  await put(cas, d, data, 'a');
  t.same(await views(cas, d), { a: 'shared blob / present', b: 'shared blob / present', '': 'shared blob / present' });
});

t.test('disk AC: namespaces apart on disk; "" keeps the old layout; a restart rebuilds both', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'ac');
  const x = entry('disk');
  const old = entry('written before namespaces');
  // A store directory as an earlier version left it: one file per entry in the fan-out directory.
  mkdirSync(join(path, old.digest.hash.slice(0, 2)), { recursive: true });
  writeFileSync(join(path, old.digest.hash.slice(0, 2), `${old.digest.hash}-${old.digest.size}`), 'old result');

  const first = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: false, fsync: false });
  t.same(await views(first, old.digest), { a: 'not-found / missing', b: 'not-found / missing', '': 'old result / present' }, 'old entries are the default namespace');
  await put(first, x.digest, 'in a', 'a');
  await put(first, x.digest, 'in default', '');
  const unicode = 'ci/linux-日本語 x';
  await put(first, x.digest, 'in unicode', unicode);
  t.same(await views(first, x.digest, ['a', 'b', '', unicode]), {
    a: 'in a / present',
    b: 'not-found / missing',
    '': 'in default / present',
    [unicode]: 'in unicode / present',
  });

  const name = `${x.digest.hash}-${x.digest.size}`;
  t.equal(readFileSync(join(path, name.slice(0, 2), name), 'utf8'), 'in default', 'the default namespace is where entries always were');
  t.equal(readFileSync(join(path, 'ns', nsDir('a'), name.slice(0, 2), name), 'utf8'), 'in a', 'other namespaces under ns/<sha256>/');
  t.equal(readFileSync(join(path, 'ns', nsDir('a'), 'name'), 'utf8'), 'a', 'with a name file for operators');
  t.equal(readFileSync(join(path, 'ns', nsDir(unicode), 'name'), 'utf8'), unicode);
  t.equal(first.describe().blobs, 4);
  await first.close();

  const second = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: false, fsync: false });
  t.equal(second.describe().blobs, 4, 'the index is rebuilt from both trees');
  t.equal(second.describe().junkRemovedAtOpen, 0);
  t.same(await views(second, x.digest, ['a', 'b', '', unicode]), {
    a: 'in a / present',
    b: 'not-found / missing',
    '': 'in default / present',
    [unicode]: 'in unicode / present',
  }, 'namespaces stay apart after a restart');
  t.same(await views(second, old.digest), { a: 'not-found / missing', b: 'not-found / missing', '': 'old result / present' });
  await second.close();
});

t.test('disk AC: one LRU and one size cap over all namespaces, kept across a restart', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'ac');
  const value = new Uint8Array(100).fill(7);
  const opts = { path, maxSizeBytes: 350, contentAddressed: false, fsync: false, touchIntervalMs: 0 };
  const store = await DiskStore.open(opts);
  const xs = [entry('lru 0'), entry('lru 1'), entry('lru 2')];
  await put(store, xs[0]!.digest, value, 'a');
  await sleep(5);
  await put(store, xs[1]!.digest, value, '');
  await sleep(5);
  await put(store, xs[2]!.digest, value, 'b');
  await sleep(5);
  t.ok(await present(store, xs[0]!.digest, 'a'), 'a lease on the oldest entry');
  await sleep(5);
  await put(store, xs[1]!.digest, value, 'c'); // 400 bytes: evicts the least recently used, in any namespace
  t.equal(store.describe().evictions, 1);
  t.equal(store.describe().bytes, 300);
  t.notOk(await present(store, xs[1]!.digest, ''), 'the LRU entry went, though another namespace was written');
  // Each check is a lease (with touchIntervalMs 0 persisted in the mtime): b, then a, then c.
  t.ok(await present(store, xs[2]!.digest, 'b'));
  await sleep(5);
  t.ok(await present(store, xs[0]!.digest, 'a'));
  await sleep(5);
  t.ok(await present(store, xs[1]!.digest, 'c'));
  await waitFor('the evicted file to be removed', () => !existsSync(join(path, xs[1]!.digest.hash.slice(0, 2), `${xs[1]!.digest.hash}-100`)));
  await store.close();

  const again = await DiskStore.open({ ...opts, maxSizeBytes: 250 });
  t.equal(again.describe().blobs, 2, 'a smaller cap on restart evicts across namespaces, oldest first');
  t.notOk(await present(again, xs[2]!.digest, 'b'), 'b was the least recently used');
  t.ok(await present(again, xs[0]!.digest, 'a'));
  t.ok(await present(again, xs[1]!.digest, 'c'));
  await again.close();
});

t.test('disk AC: the value cache never answers for another namespace; junk in ns/ is removed', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'ac');
  const x = entry('cached');
  const store = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: false, fsync: false });
  await put(store, x.digest, 'in a', 'a');
  t.equal(await read(store, x.digest, 'a'), 'in a');
  t.equal(await read(store, x.digest, 'a'), 'in a', 'served from the value cache');
  t.equal(await read(store, x.digest, 'b'), 'not-found');
  t.equal(await read(store, x.digest, ''), 'not-found');
  await store.close();

  const fan = join(path, 'ns', nsDir('a'), x.digest.hash.slice(0, 2));
  writeFileSync(join(fan, 'not-a-blob'), 'junk');
  mkdirSync(join(path, 'ns', 'not-a-namespace-dir'));
  const again = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: false, fsync: false });
  t.equal(again.describe().junkRemovedAtOpen, 1);
  t.notOk(existsSync(join(fan, 'not-a-blob')));
  t.equal(await read(again, x.digest, 'a'), 'in a');
  await again.close();
});

t.test('disk CAS ignores namespaces and never creates ns/', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'cas');
  const store = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: true, fsync: false });
  const data = enc.encode('cas blob');
  const d = digestOf(data);
  await put(store, d, data, 'a');
  t.same(await views(store, d), { a: 'cas blob / present', b: 'cas blob / present', '': 'cas blob / present' });
  t.notOk(readdirSync(path).includes('ns'));
  await store.close();
});

t.test('remote AC: the namespace is sent as the instance name, joined with the configured one', async (t) => {
  // A real storage node with its default instance config (isolation on).
  const node = await startNode({ ac: { kind: 'memory', maxSizeBytes: 1 << 20 } });
  t.teardown(node.close);
  const result = create(ActionResultSchema, { exitCode: 7 });
  const bytes = toBinary(ActionResultSchema, result);
  const x = entry('remote');

  const plain = new RemoteStore({ url: node.url, tree: 'ac' });
  t.teardown(() => plain.close());
  await put(plain, x.digest, bytes, 'a');
  t.ok(await present(node.ac, x.digest, 'a'), 'stored under instance "a" on the node');
  t.notOk(await present(node.ac, x.digest, ''));
  t.notOk(await present(plain, x.digest, 'b'), 'an AC findMissing asks in its namespace');
  t.notOk(await present(plain, x.digest, ''));
  t.ok(await present(plain, x.digest, 'a'));
  t.equal((await failure(plain.get(x.digest, { namespace: 'b' }))).code, Code.NotFound);
  t.same(await collect(await plain.get(x.digest, { namespace: 'a' })), bytes);

  const prefixed = new RemoteStore({ url: node.url, tree: 'ac', instanceName: 'cfg' });
  t.teardown(() => prefixed.close());
  t.equal(prefixed.acInstanceName(''), 'cfg');
  t.equal(prefixed.acInstanceName('a'), 'cfg/a');
  t.equal(plain.acInstanceName('a'), 'a');
  t.equal(plain.acInstanceName(undefined), '');
  await put(prefixed, x.digest, bytes, 'b');
  t.ok(await present(node.ac, x.digest, 'cfg/b'), 'stored under "cfg/b"');
  t.notOk(await present(node.ac, x.digest, 'b'));
  t.notOk(await present(prefixed, x.digest, 'a'), '"cfg/a" is not "a"');
  await put(prefixed, x.digest, bytes);
  t.ok(await present(node.ac, x.digest, 'cfg'), 'the default namespace is the configured instance name');

  // Over gRPC as any client sees it.
  const client = createClient(ActionCache, createGrpcTransport({ baseUrl: node.url }));
  const got = await client.getActionResult({ instanceName: 'cfg/b', actionDigest: toProtoDigest(x.digest) });
  t.equal(got.exitCode, 7);
  t.equal((await failure(client.getActionResult({ instanceName: 'cfg/c', actionDigest: toProtoDigest(x.digest) }))).code, Code.NotFound);
});

// --- sharding ----------------------------------------------------------------

const SHARDS = ['a', 'b', 'c'];

async function sharding(t: Test, dir: string, inner?: Map<string, MemoryStore>) {
  const shards = new Map(
    SHARDS.map((name) => [name, new FaultyStore(inner?.get(name) ?? new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }))]),
  );
  const store = await ShardingStore.open({
    shards: SHARDS.map((name) => ({ name, weight: 1, store: shards.get(name)!, check: shards.get(name)!.check })),
    handoff: { dir, intervalMs: 20 },
    healthCheckIntervalMs: 20,
    healthCheckTimeoutMs: 100,
    breaker: { consecutiveFailures: 3, healthCheckFailures: 2, closeAfterProbes: 2, backoffInitialMs: 40, backoffMaxMs: 400 },
  });
  t.teardown(() => store.close());
  const mem = (name: string) => shards.get(name)!.inner as MemoryStore;
  return { store, shards, mem };
}

/** An action digest whose ranking over SHARDS starts with `prefix`. */
function ranked(prefix: string[], from = 0): { digest: Digest; label: number } {
  for (let i = from; ; i++) {
    const x = entry(`ranked ${i}`);
    const r = rank(x.digest.hash, SHARDS.map((name) => ({ name, weight: 1 })));
    if (prefix.every((n, j) => r[j] === n)) return { digest: x.digest, label: i };
  }
}

t.test('sharding: placement by digest, the namespace goes to the shard; the existence cache is per namespace', async (t) => {
  const c = await sharding(t, await tempDir(t));
  const x = ranked(['b']);
  await put(c.store, x.digest, 'in a', 'a');
  t.equal(await read(c.mem('b'), x.digest, 'a'), 'in a', 'on its owner, in its namespace');
  t.equal(await read(c.mem('b'), x.digest, ''), 'not-found');
  // put() confirmed (digest, "a") in the existence cache: it must not answer for another namespace.
  const calls = c.shards.get('b')!.calls.findMissing;
  t.ok(await present(c.store, x.digest, 'a'));
  t.equal(c.shards.get('b')!.calls.findMissing, calls, 'answered from the cache');
  t.notOk(await present(c.store, x.digest, 'b'));
  t.notOk(await present(c.store, x.digest, ''));
  t.same(await views(c.store, x.digest), { a: 'in a / present', b: 'not-found / missing', '': 'not-found / missing' });
  // The same digest in several namespaces, in one findMissing each.
  await put(c.store, x.digest, 'in b', 'b');
  t.same(await views(c.store, x.digest), { a: 'in a / present', b: 'in b / present', '': 'not-found / missing' });
});

t.test('sharding: a stand-in write carries its namespace in the hint, the read plan and the handoff', async (t) => {
  const dir = await tempDir(t);
  const c = await sharding(t, dir);
  const x = ranked(['a', 'c']);
  c.store.drain('a');
  await put(c.store, x.digest, 'in ns1', 'ns1');
  await put(c.store, x.digest, 'in default', '');
  t.equal(await read(c.mem('c'), x.digest, 'ns1'), 'in ns1', 'on the stand-in, in its namespace');
  const lines = readFileSync(join(dir, 'hints.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  t.same(lines, [
    { op: 'add', hash: x.digest.hash, size: x.digest.size, owner: 'a', standIn: 'c', ns: 'ns1' },
    { op: 'add', hash: x.digest.hash, size: x.digest.size, owner: 'a', standIn: 'c' },
  ], 'two hints: one per namespace; the default namespace is written as before');
  t.equal(c.store.describe().hintsPending, 2);
  t.same(await views(c.store, x.digest, ['ns1', 'ns2', '']), {
    ns1: 'in ns1 / present',
    ns2: 'not-found / missing',
    '': 'in default / present',
  }, 'the hints are followed per namespace');

  c.store.undrain('a');
  await waitFor('handoff', () => c.store.describe().hintsPending === 0);
  t.equal(await read(c.mem('a'), x.digest, 'ns1'), 'in ns1', 'handed off in its namespace');
  t.equal(await read(c.mem('a'), x.digest, ''), 'in default');
  t.equal(await read(c.mem('a'), x.digest, 'ns2'), 'not-found');
});

t.test('sharding: hints survive a restart with their namespace; old hint lines hand off as ""', async (t) => {
  const dir = await tempDir(t);
  const x = ranked(['b', 'a']);
  const y = ranked(['b', 'a'], x.label + 1);
  // A hint line as an earlier version wrote it (no "ns"), for a blob on its stand-in.
  writeFileSync(join(dir, 'hints.jsonl'), `${JSON.stringify({ op: 'add', hash: y.digest.hash, size: y.digest.size, owner: 'b', standIn: 'a' })}\n`);
  const inner = new Map(SHARDS.map((n) => [n, new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false })]));
  await put(inner.get('a')!, y.digest, 'old hinted');

  const first = await sharding(t, dir, inner);
  for (const s of first.shards.values()) s.closeInner = false;
  first.store.drain('b');
  await put(first.store, x.digest, 'hinted in q', 'q');
  t.equal(first.store.describe().hintsPending, 2);
  await first.store.close();

  const second = await sharding(t, dir, inner);
  t.equal(second.store.describe().hintsPending, 2, 'both hints loaded');
  t.equal(await read(second.store, x.digest, 'q'), 'hinted in q', 'the stand-in is asked in the hint\'s namespace');
  await waitFor('handoff after restart', () => second.store.describe().hintsPending === 0);
  t.equal(await read(inner.get('b')!, x.digest, 'q'), 'hinted in q');
  t.equal(await read(inner.get('b')!, x.digest, ''), 'not-found');
  t.equal(await read(inner.get('b')!, y.digest, ''), 'old hinted', 'the old-format hint handed off in the default namespace');
  t.equal(second.store.describe().handoffLost, 0);
});

// --- fallback ----------------------------------------------------------------

async function fallback(t: Test, journalDir: string, mems?: { primary: MemoryStore; secondary: MemoryStore }) {
  const primaryMem = mems?.primary ?? new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const secondaryMem = mems?.secondary ?? new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const primary = new FaultyStore(primaryMem);
  const secondary = new FaultyStore(secondaryMem);
  const store = await FallbackStore.open({
    primary,
    secondary,
    journalDir,
    primaryHealthCheck: primary.check,
    healthCheckIntervalMs: 20,
    healthCheckTimeoutMs: 100,
    breaker: { consecutiveFailures: 3, healthCheckFailures: 2, closeAfterProbes: 2, backoffInitialMs: 50, backoffMaxMs: 200 },
    replication: { retryInitialMs: 10, retryMaxMs: 50 },
    replay: { retryInitialMs: 10, retryMaxMs: 50 },
    logger: pino({ level: 'silent' }),
  });
  t.teardown(() => store.close());
  const stats = () => store.describe() as unknown as { serving: string; replication: { done: number }; journal: { backlog: number; replayed: number }; repairs: { done: number } };
  return { store, primary, secondary, primaryMem, secondaryMem, stats };
}

t.test('fallback: replication and read repair copy in the namespace of the write', async (t) => {
  const f = await fallback(t, await tempDir(t));
  const x = entry('replicated');
  await put(f.store, x.digest, 'in a', 'a');
  await waitFor('replication', () => f.stats().replication.done === 1);
  t.equal(await read(f.secondaryMem, x.digest, 'a'), 'in a', 'replicated in its namespace');
  t.equal(await read(f.secondaryMem, x.digest, ''), 'not-found');

  // The same action in two namespaces: two replication jobs, not one deduplicated.
  await put(f.store, x.digest, 'in b', 'b');
  await put(f.store, x.digest, 'in c', 'c');
  await waitFor('replication', () => f.stats().replication.done === 3);
  t.equal(await read(f.secondaryMem, x.digest, 'b'), 'in b');
  t.equal(await read(f.secondaryMem, x.digest, 'c'), 'in c');

  // Only on the secondary: served there and repaired to the primary, in its namespace.
  const y = entry('repaired');
  await put(f.secondaryMem, y.digest, 'secondary only', 'r');
  t.ok(await present(f.store, y.digest, 'r'));
  t.notOk(await present(f.store, y.digest, 's'), 'findMissing asks the secondary in the namespace too');
  t.equal(await read(f.store, y.digest, 's'), 'not-found');
  t.equal(await read(f.store, y.digest, 'r'), 'secondary only');
  await waitFor('read repair', async () => (await read(f.primaryMem, y.digest, 'r')) === 'secondary only');
  t.equal(await read(f.primaryMem, y.digest, ''), 'not-found');
});

t.test('fallback: journaled writes keep their namespace through a restart; old journal records replay as ""', async (t) => {
  const journalDir = await tempDir(t);
  const x = entry('journaled');
  const old = entry('journaled by an earlier version');
  // A journal record as an earlier version wrote it: key = digestKey, no "ns".
  mkdirSync(journalDir, { recursive: true });
  writeFileSync(
    join(journalDir, JOURNAL_FILE),
    `${JSON.stringify({ k: digestKey(old.digest), s: 1, v: { hash: old.digest.hash, size: old.digest.size, at: 1 } })}\n`,
  );
  const mems = {
    primary: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }),
    secondary: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }),
  };
  await put(mems.secondary, old.digest, 'old journaled');

  const first = await fallback(t, journalDir, mems);
  first.primary.closeInner = false;
  first.secondary.closeInner = false;
  first.primary.mode = 'unavailable';
  await waitFor('the primary breaker to open', () => first.stats().serving === 'secondary');
  await put(first.store, x.digest, 'in j', 'j');
  t.equal(await read(first.store, x.digest, 'j'), 'in j');
  t.equal(await read(first.store, x.digest, 'k'), 'not-found');
  const records = readFileSync(join(journalDir, JOURNAL_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  t.match(records.at(-1), { k: namespacedKey(x.digest, 'j'), v: { hash: x.digest.hash, size: x.digest.size, ns: 'j' } }, 'the journal records the namespace');
  t.equal(first.stats().journal.backlog, 2);
  await first.store.close();

  const second = await fallback(t, journalDir, mems);
  await waitFor('the replay', () => second.stats().journal.backlog === 0);
  t.equal(await read(mems.primary, x.digest, 'j'), 'in j', 'replayed to the primary in its namespace');
  t.equal(await read(mems.primary, x.digest, ''), 'not-found');
  t.equal(await read(mems.primary, old.digest, ''), 'old journaled', 'the old record replayed as the default namespace');
  t.equal(second.stats().journal.replayed, 2);
  await second.store.close();
  t.same(liveJournalKeys(journalDir), [], 'both entries left the journal');
});

t.test('fallback: a write the primary accepts clears only its own namespace\'s journal entry', async (t) => {
  const journalDir = await tempDir(t);
  const f = await fallback(t, journalDir);
  const x = entry('clears');
  f.primary.mode = 'unavailable';
  await waitFor('the primary breaker to open', () => f.stats().serving === 'secondary');
  await put(f.store, x.digest, 'j1 while down', 'j1');
  await put(f.store, x.digest, 'j2 while down', 'j2');
  t.equal(f.stats().journal.backlog, 2);
  // Replays read the secondary: hold them there, so only the write below can clear an entry.
  f.secondary.mode = 'blackhole';
  f.primary.mode = 'ok';
  await waitFor('the primary to serve again', () => f.stats().serving === 'primary');
  await put(f.store, x.digest, 'j1 new', 'j1');
  t.equal(f.stats().journal.backlog, 1);
  await waitFor('the removal on disk', () => liveJournalKeys(journalDir).length === 1);
  t.same(liveJournalKeys(journalDir), [namespacedKey(x.digest, 'j2')], 'j2\'s entry stays');
  t.equal(await read(f.primaryMem, x.digest, 'j1'), 'j1 new');
});

/** Keys of the live entries in a journal file. */
function liveJournalKeys(dir: string): string[] {
  const live = new Map<string, number>();
  for (const line of readFileSync(join(dir, JOURNAL_FILE), 'utf8').split('\n')) {
    if (line === '') continue;
    const r = JSON.parse(line) as { k: string; s: number; d?: number };
    if (r.d === undefined) live.set(r.k, r.s);
    else if (live.get(r.k) === r.s) live.delete(r.k);
  }
  return [...live.keys()];
}

// --- decorators and queues -------------------------------------------------

t.test('completeness checking and metrics pass the namespace to the AC and read the CAS shared', async (t) => {
  const cas = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const acMem = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const output = enc.encode('output');
  await put(cas, digestOf(output), output, 'whatever'); // the CAS ignores it
  const result = toBinary(ActionResultSchema, create(ActionResultSchema, { outputFiles: [{ path: 'out', digest: toProtoDigest(digestOf(output)) }] }));
  const store = new MetricsStore(new CompletenessCheckingStore({ backend: acMem, cas }), { registry: new Registry(), tree: 'ac' });
  const x = entry('checked');
  await put(store, x.digest, result, 'a');
  t.same(await collect(await store.get(x.digest, { namespace: 'a' })), result);
  t.equal((await failure(store.get(x.digest, { namespace: 'b' }))).code, Code.NotFound);
  t.equal((await failure(store.get(x.digest))).code, Code.NotFound);
  t.same(await store.findMissing([x.digest], { namespace: 'a' }), []);
  t.same(await store.findMissing([x.digest], { namespace: 'b' }), [x.digest]);
  t.ok(await present(acMem, x.digest, 'a'));
});

t.test('copy queue: one job per (digest, namespace)', async (t) => {
  const ctl = new AbortController();
  t.teardown(() => ctl.abort());
  const ran: string[] = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const q = new CopyQueue({
    maxQueue: 10,
    concurrency: 1,
    overflow: 'reject-new',
    maxAttempts: 1,
    retryInitialMs: 1,
    retryMaxMs: 1,
    timeoutMs: 10_000,
    signal: ctl.signal,
    canRun: () => true,
    run: async (job) => {
      await gate;
      ran.push(`${job.namespace}:${job.key === namespacedKey(job.digest, job.namespace)}`);
      return 'done';
    },
    onGiveUp: () => {},
  });
  const x = entry('queued');
  q.add(x.digest, 0); // in flight
  q.add(x.digest, 0, 'a');
  q.add(x.digest, 0, 'a'); // deduplicated
  q.add(x.digest, 0, 'b');
  t.equal(q.stats().queued, 2);
  release();
  await waitFor('the jobs', () => q.stats().done === 3);
  t.same(ran, [':true', 'a:true', 'b:true']);
  await q.close();
});
