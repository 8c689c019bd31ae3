// The disk store's FindMissing index (a hash -> key map for the CAS) and its
// cache of small AC values: both must agree with the index at every step.
import { unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Code } from '@connectrpc/connect';
import type { Test } from 'tap';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString, EMPTY_DIGEST } from '../../src/digest.ts';
import type { DiskStoreOptions } from '../../src/stores/disk-store.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { collect, once } from '../../src/streams.ts';

async function openStore(t: Test, opts: Partial<DiskStoreOptions> = {}): Promise<{ store: DiskStore; path: string }> {
  const path = t.testdir();
  const store = await DiskStore.open({ maxSizeBytes: 1 << 20, contentAddressed: true, ...opts, path });
  t.teardown(() => store.close());
  return { store, path };
}

function blob(text: string): { digest: Digest; data: Uint8Array } {
  const data = Buffer.from(text);
  return { digest: digestOf(data), data };
}

async function read(store: DiskStore, d: Digest, offset?: number, limit?: number): Promise<string> {
  return Buffer.from(await collect(await store.get(d, { offset, limit }))).toString();
}

t.test('CAS findMissing: a stored hash asked with another size is missing; eviction and reopening keep the hash map in step', async (t) => {
  const { store, path } = await openStore(t, { maxSizeBytes: 30 });
  const a = blob('a'.repeat(10));
  const b = blob('b'.repeat(10));
  const c = blob('c'.repeat(10));
  for (const x of [a, b, c]) await store.put(x.digest, once(x.data));
  const wrongSize = { hash: a.digest.hash, size: 11 };
  t.same(await store.findMissing([a.digest, wrongSize, EMPTY_DIGEST, b.digest]), [wrongSize]);
  // a and b were just used: c is the least recently used and goes first.
  const d = blob('d'.repeat(10));
  await store.put(d.digest, once(d.data));
  t.same(await store.findMissing([a.digest, b.digest, c.digest, d.digest]), [c.digest], 'the evicted blob is missing');
  await store.put(c.digest, once(c.data));
  t.same(await store.findMissing([c.digest]), [], 'and present again once rewritten');
  await store.close();

  const reopened = await DiskStore.open({ maxSizeBytes: 30, contentAddressed: true, path });
  t.teardown(() => reopened.close());
  const present = await reopened.findMissing([a.digest, b.digest, c.digest, d.digest]);
  t.equal(present.length, 1, 'reopened: three of four fit');
  t.same(await reopened.findMissing([wrongSize]), [wrongSize]);
});

t.test('CAS findMissing: a blob removed behind the store stays present until a read forgets it', async (t) => {
  const { store, path } = await openStore(t);
  const a = blob('doomed');
  await store.put(a.digest, once(a.data));
  await unlink(join(path, a.digest.hash.slice(0, 2), digestString(a.digest)));
  t.same(await store.findMissing([a.digest]), []);
  await t.rejects(store.get(a.digest), { code: Code.NotFound });
  t.same(await store.findMissing([a.digest]), [a.digest]);
});

t.test('AC value cache: reads after an overwrite return the new value, ranges work, eviction forgets', async (t) => {
  const { store } = await openStore(t, { contentAddressed: false, maxSizeBytes: 64 });
  const key = digestOf(Buffer.from('action'));
  await store.put(key, once(Buffer.from('first value')));
  t.equal(await read(store, key), 'first value');
  t.equal(await read(store, key), 'first value', 'second read (cached)');
  t.match(store.describe(), { cachedValues: 1, cachedValueBytes: 11 });
  t.equal(await read(store, key, 6), 'value', 'offset');
  t.equal(await read(store, key, 0, 5), 'first', 'limit');
  t.equal(await read(store, key, 11), '', 'offset at the end');

  await store.put(key, once(Buffer.from('second value!')));
  t.equal(await read(store, key), 'second value!', 'the overwrite is seen at once');
  t.equal(await read(store, key), 'second value!');
  t.match(store.describe(), { cachedValues: 1, cachedValueBytes: 13 });

  // Fill the store past its cap: the entry is evicted and leaves the cache.
  const other = digestOf(Buffer.from('other action'));
  await store.put(other, once(Buffer.alloc(60, 'x')));
  await t.rejects(store.get(key), { code: Code.NotFound }, 'evicted, not served from the cache');
  t.match(store.describe(), { cachedValues: 0, cachedValueBytes: 0 });
});

t.test('AC value cache: bounded by valueCacheBytes, least recently read dropped first; 0 turns it off', async (t) => {
  const { store } = await openStore(t, { contentAddressed: false, valueCacheBytes: 25 });
  const keys = ['k1', 'k2', 'k3'].map((k) => digestOf(Buffer.from(k)));
  for (const [i, k] of keys.entries()) await store.put(k, once(Buffer.alloc(10, String(i))));
  for (const k of keys) await read(store, k);
  t.match(store.describe(), { cachedValues: 2, cachedValueBytes: 20 });
  t.equal(await read(store, keys[0]!), '0'.repeat(10), 'a value dropped from the cache is read from disk');

  const { store: off } = await openStore(t, { contentAddressed: false, valueCacheBytes: 0 });
  await off.put(keys[0]!, once(Buffer.from('v')));
  t.equal(await read(off, keys[0]!), 'v');
  t.notOk('cachedValues' in off.describe());
});

t.test('AC value cache: a value file removed behind the store is NOT_FOUND when it was never cached', async (t) => {
  const { store, path } = await openStore(t, { contentAddressed: false });
  const key = digestOf(Buffer.from('gone action'));
  await store.put(key, once(Buffer.from('v')));
  await unlink(join(path, key.hash.slice(0, 2), digestString(key)));
  await t.rejects(store.get(key), { code: Code.NotFound });
  t.same(await store.findMissing([key]), [key], 'and forgotten');
});
