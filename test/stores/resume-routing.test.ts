// Resumable uploads through the edge's routers. A sharding store asks and
// resumes the shard the first part went to while it is still the owner and
// available; once the owner changed, the upload reports 0 and restarts
// cleanly elsewhere. A fallback pair asks the side(s) a write goes to.
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Code } from '@connectrpc/connect';
import type { Test } from 'tap';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf } from '../../src/digest.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { MetricsStore } from '../../src/stores/metrics-store.ts';
import { FallbackStore } from '../../src/stores/fallback-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';
import { collect, once } from '../../src/streams.ts';
import { Registry } from 'prom-client';

const NAMES = ['a', 'b', 'c'];

async function shardedDisks(t: Test): Promise<{ store: ShardingStore; disks: Map<string, DiskStore> }> {
  const dir = t.testdir();
  const disks = new Map<string, DiskStore>();
  for (const name of NAMES) {
    const disk = await DiskStore.open({ path: join(dir, name), maxSizeBytes: 64 << 20, contentAddressed: true, fsync: false });
    disks.set(name, disk);
  }
  const store = await ShardingStore.open({
    shards: NAMES.map((name) => ({ name, weight: 1, store: disks.get(name)!, check: async () => {} })),
    handoff: { dir: join(dir, 'handoff'), intervalMs: 20 },
    healthCheckIntervalMs: 20,
  });
  t.teardown(() => store.close());
  return { store, disks };
}

async function* breakingAfter(data: Uint8Array): AsyncIterable<Uint8Array> {
  yield data;
  throw new Error('the client stream broke');
}

function randomBlob(size: number): { digest: Digest; data: Buffer } {
  const data = randomBytes(size);
  return { digest: digestOf(data), data };
}

/** The shards that keep a prefix of upload `id`, with its size. */
async function keptBy(disks: Map<string, DiskStore>, d: Digest, id: string): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [name, disk] of disks) {
    const n = await disk.uploadStatus(d, id);
    if (n > 0) out[name] = n;
  }
  return out;
}

t.test('resumes on the shard that kept the prefix while it is the owner', async (t) => {
  const { store, disks } = await shardedDisks(t);
  const b = randomBlob(500_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 200_000)), { upload: { id: 'u', offset: 0 } }), /broke/);
  const kept = await keptBy(disks, b.digest, 'u');
  t.equal(Object.keys(kept).length, 1, 'one shard kept it');
  t.same(Object.values(kept), [200_000]);
  t.equal(await store.uploadStatus(b.digest, 'u'), 200_000);
  await store.put(b.digest, once(b.data.subarray(200_000)), { upload: { id: 'u', offset: 200_000 } });
  const owner = Object.keys(kept)[0]!;
  t.same(await disks.get(owner)!.findMissing([b.digest]), [], 'the blob is on the shard that kept the prefix');
  t.same(Buffer.from(await collect(await store.get(b.digest))), b.data);
});

t.test('once the owner changed the upload reports 0 and restarts cleanly', async (t) => {
  const { store, disks } = await shardedDisks(t);
  const b = randomBlob(300_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 100_000)), { upload: { id: 'u', offset: 0 } }));
  const owner = Object.keys(await keptBy(disks, b.digest, 'u'))[0]!;
  store.drain(owner);
  t.equal(await store.uploadStatus(b.digest, 'u'), 0, 'the shard now in charge keeps nothing');
  // A client that resumes anyway is told precisely, and nothing is retried elsewhere.
  await t.rejects(store.put(b.digest, once(b.data.subarray(100_000)), { upload: { id: 'u', offset: 100_000 } }), { code: Code.OutOfRange });
  await store.put(b.digest, once(b.data), { upload: { id: 'u', offset: 0 } });
  t.same(await store.findMissing([b.digest]), []);
  t.same(await disks.get(owner)!.findMissing([b.digest]), [b.digest], 'the old owner did not get it');
  t.equal(await disks.get(owner)!.uploadStatus(b.digest, 'u'), 100_000, 'its prefix stays until it expires');
});

t.test('memory shards keep no partial uploads; metrics wrappers pass the capability through', async (t) => {
  const mem = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const wrapped = new MetricsStore(mem, { registry: new Registry(), tree: 'cas' });
  const b = randomBlob(1000);
  t.equal(await wrapped.uploadStatus(b.digest, 'u'), 0);
  await t.rejects(wrapped.put(b.digest, once(b.data.subarray(10)), { upload: { id: 'u', offset: 10 } }), { code: Code.OutOfRange });
  await wrapped.put(b.digest, once(b.data), { upload: { id: 'u', offset: 0 } });
  t.same(await mem.findMissing([b.digest]), []);

  const disk = await DiskStore.open({ path: t.testdir(), maxSizeBytes: 1 << 20, contentAddressed: true, fsync: false });
  t.teardown(() => disk.close());
  const overDisk = new MetricsStore(disk, { registry: new Registry(), tree: 'cas' });
  await t.rejects(overDisk.put(b.digest, breakingAfter(b.data.subarray(0, 400)), { upload: { id: 'v', offset: 0 } }));
  t.equal(await overDisk.uploadStatus(b.digest, 'v'), 400);
});

t.test('a sync fallback pair resumes when both sides kept the same prefix, else reports 0', async (t) => {
  const dir = t.testdir();
  const open = (name: string) => DiskStore.open({ path: join(dir, name), maxSizeBytes: 64 << 20, contentAddressed: true, fsync: false });
  const primary = await open('p');
  const secondary = await open('s');
  const pair = await FallbackStore.open({
    primary,
    secondary,
    journalDir: join(dir, 'journal'),
    durability: 'sync',
    primaryHealthCheck: async () => {},
    secondaryHealthCheck: async () => {},
    healthCheckIntervalMs: 20,
  });
  t.teardown(() => pair.close());
  const b = randomBlob(400_000);
  await t.rejects(pair.put(b.digest, breakingAfter(b.data.subarray(0, 150_000)), { upload: { id: 'u', offset: 0 } }), /broke/);
  t.same([await primary.uploadStatus(b.digest, 'u'), await secondary.uploadStatus(b.digest, 'u')], [150_000, 150_000], 'both sides kept it');
  t.equal(await pair.uploadStatus(b.digest, 'u'), 150_000);
  await pair.put(b.digest, once(b.data.subarray(150_000)), { upload: { id: 'u', offset: 150_000 } });
  t.same([await primary.findMissing([b.digest]), await secondary.findMissing([b.digest])], [[], []], 'both sides hold the blob');

  // Prefixes of different lengths: nothing to resume; a restart at 0 clears both.
  const c = randomBlob(400_000);
  await t.rejects(pair.put(c.digest, breakingAfter(c.data.subarray(0, 100_000)), { upload: { id: 'v', offset: 0 } }));
  await t.rejects(primary.put(c.digest, breakingAfter(c.data.subarray(100_000, 120_000)), { upload: { id: 'v', offset: 100_000 } }));
  t.same([await primary.uploadStatus(c.digest, 'v'), await secondary.uploadStatus(c.digest, 'v')], [120_000, 100_000]);
  t.equal(await pair.uploadStatus(c.digest, 'v'), 0);
  await pair.put(c.digest, once(c.data), { upload: { id: 'v', offset: 0 } });
  t.same([await primary.uploadStatus(c.digest, 'v'), await secondary.uploadStatus(c.digest, 'v')], [0, 0]);
  t.same([await primary.findMissing([c.digest]), await secondary.findMissing([c.digest])], [[], []]);
});
