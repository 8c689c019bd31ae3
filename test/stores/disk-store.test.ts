import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readdir, unlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Code } from '@connectrpc/connect';
import type { Test } from 'tap';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString, EMPTY_DIGEST } from '../../src/digest.ts';
import type { DiskStoreOptions } from '../../src/stores/disk-store.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { collect, once } from '../../src/streams.ts';

function blob(text: string): { digest: Digest; data: Uint8Array } {
  const data = Buffer.from(text);
  return { digest: digestOf(data), data };
}

/** A blob of exactly `size` bytes, distinct per `seed`. */
function sized(seed: string, size: number): { digest: Digest; data: Uint8Array } {
  const data = Buffer.alloc(size, seed);
  return { digest: digestOf(data), data };
}

async function* chunked(data: Uint8Array, chunkSize: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.byteLength; i += chunkSize) {
    await new Promise((resolve) => setImmediate(resolve));
    yield data.subarray(i, i + chunkSize);
  }
}

async function read(store: DiskStore, digest: Digest, offset?: number, limit?: number): Promise<string> {
  return Buffer.from(await collect(await store.get(digest, { offset, limit }))).toString();
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function openStore(
  t: Test,
  opts: Partial<DiskStoreOptions> & { path?: string } = {},
): Promise<{ store: DiskStore; path: string }> {
  const path = opts.path ?? t.testdir();
  const store = await DiskStore.open({ maxSizeBytes: 1 << 20, contentAddressed: true, ...opts, path });
  t.teardown(() => store.close());
  return { store, path };
}

/** Every file under the store, relative to it, sorted. */
async function files(path: string): Promise<string[]> {
  const out = await readdir(path, { recursive: true, withFileTypes: true });
  return out
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath.slice(path.length + 1), e.name))
    .sort();
}

function blobFile(d: Digest): string {
  return join(d.hash.slice(0, 2), digestString(d));
}

t.test('put then get returns the bytes, whole and by offset and limit', async (t) => {
  const { store, path } = await openStore(t);
  const b = blob('hello, disk store');
  await store.put(b.digest, chunked(b.data, 4));
  t.equal(await read(store, b.digest), 'hello, disk store');
  t.equal(await read(store, b.digest, 7), 'disk store');
  t.equal(await read(store, b.digest, 7, 4), 'disk');
  t.equal(await read(store, b.digest, 0, 1000), 'hello, disk store');
  t.equal(await read(store, b.digest, 17), '', 'offset == size reads nothing');
  await t.rejects(store.get(b.digest, { offset: 18 }), {
    code: Code.OutOfRange,
    rawMessage: 'read offset 18 is past the end of a 17-byte blob',
  });
  await t.rejects(store.get(b.digest, { offset: -1 }), { code: Code.OutOfRange });
  t.same(await store.findMissing([b.digest]), []);
  t.same(await files(path), [blobFile(b.digest)], 'one file, in its fan-out directory, tmp/ empty');
  t.match(store.describe(), { kind: 'disk', path, blobs: 1, bytes: 17, writes: 1, reads: 5 });
});

t.test('get of an absent blob rejects NOT_FOUND before the first byte', async (t) => {
  const { store } = await openStore(t);
  const b = blob('absent');
  await t.rejects(store.get(b.digest), {
    code: Code.NotFound,
    rawMessage: `blob ${digestString(b.digest)} not found`,
  });
  t.same(await store.findMissing([b.digest]), [b.digest]);
});

t.test('a blob that does not match its digest is rejected and leaves nothing behind', async (t) => {
  const { store, path } = await openStore(t);
  const b = blob('the real content');
  const key = digestString(b.digest);
  const wrong = Buffer.from('the fake content');
  await t.rejects(store.put(b.digest, chunked(wrong, 5)), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: content hashes to ${digestOf(wrong).hash}, not to the digest's hash`,
  });
  await t.rejects(store.put(b.digest, once(b.data.subarray(0, 10))), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: received 10 bytes, digest says 16`,
  });
  await t.rejects(store.put(b.digest, chunked(Buffer.concat([b.data, Buffer.from('!')]), 4)), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: received more than 16 bytes`,
  });
  t.same(await store.findMissing([b.digest]), [b.digest]);
  await t.rejects(store.get(b.digest), { code: Code.NotFound });
  t.same(await files(path), [], 'no blob file and no temp file');
  t.match(store.describe(), { blobs: 0, bytes: 0, writes: 0 });
});

t.test('an aborted write rejects CANCELED and leaves nothing behind', async (t) => {
  const { store, path } = await openStore(t);
  const b = sized('a', 1000);
  const ac = new AbortController();
  let sent = false;
  // Sends half the blob, then stalls like a client that went quiet.
  async function* stalling(): AsyncIterable<Uint8Array> {
    yield b.data.subarray(0, 500);
    sent = true;
    await new Promise(() => {});
  }
  const put = store.put(b.digest, stalling(), { signal: ac.signal });
  while (!sent) await sleep(1);
  t.equal((await readdir(join(path, 'tmp'))).length, 1, 'the write is in progress in tmp/');
  ac.abort();
  await t.rejects(put, { code: Code.Canceled, rawMessage: `write of blob ${digestString(b.digest)} was cancelled` });
  t.same(await files(path), []);
  t.same(await store.findMissing([b.digest]), [b.digest]);
  await t.rejects(store.put(b.digest, once(b.data), { signal: AbortSignal.abort() }), { code: Code.Canceled });
});

t.test('close aborts writes in flight with UNAVAILABLE and is idempotent', async (t) => {
  const { store, path } = await openStore(t);
  const b = sized('c', 100);
  let sent = false;
  async function* stalling(): AsyncIterable<Uint8Array> {
    yield b.data.subarray(0, 50);
    sent = true;
    await new Promise(() => {});
  }
  const put = store.put(b.digest, stalling());
  while (!sent) await sleep(1);
  await Promise.all([store.close(), store.close()]);
  await t.rejects(put, {
    code: Code.Unavailable,
    rawMessage: `the disk store is closing; write of blob ${digestString(b.digest)} aborted`,
  });
  t.same(await files(path), [], 'the temp file is gone once close() resolves');
  await t.rejects(store.findMissing([b.digest]), { code: Code.Unavailable, rawMessage: 'the disk store is closed' });
  await t.rejects(store.get(b.digest), { code: Code.Unavailable });
  await t.rejects(store.put(b.digest, once(b.data)), { code: Code.Unavailable });
  await store.close();
});

t.test('concurrent writers of the same digest all succeed and leave one intact blob', async (t) => {
  const { store, path } = await openStore(t);
  const b = sized('x', 64 * 1024);
  await Promise.all(Array.from({ length: 8 }, (_, i) => store.put(b.digest, chunked(b.data, 1000 + i * 777))));
  const got = await collect(await store.get(b.digest));
  t.equal(digestOf(got).hash, b.digest.hash);
  t.same(await files(path), [blobFile(b.digest)]);
  t.match(store.describe(), { blobs: 1, bytes: 64 * 1024, writes: 8 });
});

t.test('eviction removes least recently used blobs; findMissing and get refresh recency', async (t) => {
  const { store, path } = await openStore(t, { maxSizeBytes: 300 });
  const [a, b, c, d, e] = ['a', 'b', 'c', 'd', 'e'].map((s) => sized(s, 100));
  for (const x of [a!, b!, c!]) await store.put(x.digest, once(x.data));
  t.same(await store.findMissing([a!.digest]), [], 'a is refreshed by findMissing');
  await store.put(d!.digest, once(d!.data));
  t.same(await store.findMissing([a!.digest, b!.digest, c!.digest, d!.digest]), [b!.digest], 'b was the LRU');
  // The query touched a, c, d in that order; reading c leaves a least recently used.
  await read(store, c!.digest);
  await store.put(e!.digest, once(e!.data));
  t.same(await store.findMissing([a!.digest]), [a!.digest], 'a was the LRU after c was read');
  t.match(store.describe(), { blobs: 3, bytes: 300, evictions: 2 });
  await store.close();
  t.same(await files(path), [c!, d!, e!].map((x) => blobFile(x.digest)).sort(), 'evicted files are unlinked');
});

t.test('a blob larger than maxSizeBytes is rejected RESOURCE_EXHAUSTED', async (t) => {
  const { store } = await openStore(t, { maxSizeBytes: 100 });
  const big = sized('z', 101);
  await t.rejects(store.put(big.digest, once(big.data)), {
    code: Code.ResourceExhausted,
    rawMessage: `blob ${digestString(big.digest)} is 101 bytes, larger than the disk store's maxSizeBytes (100)`,
  });
  const fits = sized('y', 100);
  await store.put(fits.digest, once(fits.data));
  t.same(await store.findMissing([fits.digest]), [], 'a blob of exactly maxSizeBytes fits');

  const ac = await openStore(t, { maxSizeBytes: 100, contentAddressed: false });
  const key = blob('action').digest;
  await t.rejects(ac.store.put(key, chunked(Buffer.alloc(150), 60)), {
    code: Code.ResourceExhausted,
    rawMessage: `entry ${digestString(key)}: value is larger than the disk store's maxSizeBytes (100)`,
  });
  t.same(await files(ac.path), [], 'nothing left of the rejected AC value');
});

t.test('reopening rebuilds the index: blobs, sizes and recency survive', async (t) => {
  const path = t.testdir();
  const [a, b, c, d] = ['a', 'b', 'c', 'd'].map((s) => sized(s, 100));
  const first = await DiskStore.open({ path, maxSizeBytes: 300, contentAddressed: true, touchIntervalMs: 0 });
  for (const x of [a!, b!, c!]) {
    await first.put(x.digest, once(x.data));
    await sleep(5);
  }
  await read(first, a!.digest); // Recency: b, c, a; persisted in a's mtime.
  await first.close();

  const { store } = await openStore(t, { path, maxSizeBytes: 300 });
  t.match(store.describe(), { blobs: 3, bytes: 300, tempFilesRemovedAtOpen: 0, junkRemovedAtOpen: 0 });
  t.equal(await read(store, b!.digest, 99), 'b', 'size comes from the file');
  // Recency now: c, a, b.
  await store.put(d!.digest, once(d!.data));
  t.same(await store.findMissing([a!.digest, b!.digest, c!.digest, d!.digest]), [c!.digest], 'c was the LRU');
});

t.test('reopening with a smaller cap evicts the oldest blobs', async (t) => {
  const path = t.testdir();
  const blobs = ['a', 'b', 'c'].map((s) => sized(s, 100));
  const first = await DiskStore.open({ path, maxSizeBytes: 1000, contentAddressed: true });
  for (const [i, x] of blobs.entries()) {
    await first.put(x.digest, once(x.data));
    const when = 1_700_000_000 + i * 100; // Distinct, ordered mtimes.
    await utimes(join(path, blobFile(x.digest)), when, when);
  }
  await first.close();
  const { store } = await openStore(t, { path, maxSizeBytes: 200 });
  t.same(await store.findMissing(blobs.map((x) => x.digest)), [blobs[0]!.digest]);
  t.match(store.describe(), { blobs: 2, bytes: 200, evictions: 1 });
});

t.test('open empties tmp/ and removes invalid blob files', async (t) => {
  const good = sized('g', 10);
  const truncated = sized('t', 10);
  const fixture: Record<string, Record<string, string> | string> = {
    tmp: { 'leftover-1': 'partial', 'leftover-2': 'partial' },
    'README.txt': 'left alone',
  };
  const add = (dir: string, name: string, content: string) => {
    fixture[dir] = { ...(fixture[dir] as Record<string, string> | undefined), [name]: content };
  };
  add(good.digest.hash.slice(0, 2), digestString(good.digest), 'g'.repeat(10));
  add(truncated.digest.hash.slice(0, 2), digestString(truncated.digest), 'short');
  add('ab', 'not-a-blob', 'junk');
  add('ab', `cd${'0'.repeat(62)}-3`, 'bad'); // Valid name in the wrong fan-out directory.
  const path = t.testdir(fixture);
  const { store } = await openStore(t, { path });
  t.match(store.describe(), { blobs: 1, bytes: 10, tempFilesRemovedAtOpen: 2, junkRemovedAtOpen: 3 });
  t.same(await files(path), ['README.txt', blobFile(good.digest)].sort());
  t.same(await store.findMissing([good.digest, truncated.digest]), [truncated.digest]);
  t.equal(await read(store, good.digest), 'g'.repeat(10));
  t.equal((await readdir(path)).filter((n) => /^[0-9a-f]{2}$/.test(n)).length, 256, 'fan-out dirs exist');
});

t.test('a 64 MiB blob streams through put and get without being buffered', async (t) => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const CHUNK = 1 << 20;
  const CHUNKS = 64;
  const chunk = (i: number) => Buffer.alloc(CHUNK, i & 0xff);
  const h = createHash('sha256');
  for (let i = 0; i < CHUNKS; i++) h.update(chunk(i));
  const digest = { hash: h.digest('hex'), size: CHUNK * CHUNKS };

  // A store that buffered the blob would hold all 64 MiB; a streaming one
  // holds a few chunks (plus whatever V8 has not yet swept after gc()).
  const LIMIT = 32 * CHUNK;
  const { store } = await openStore(t, { maxSizeBytes: 1 << 30 });
  gc();
  const base = process.memoryUsage().arrayBuffers;
  let peak = 0;
  const sample = () => {
    gc();
    peak = Math.max(peak, process.memoryUsage().arrayBuffers - base);
  };
  // Fresh buffers each time: a store that kept them would keep 64 MiB alive.
  async function* source(): AsyncIterable<Uint8Array> {
    for (let i = 0; i < CHUNKS; i++) {
      if (i % 8 === 7) sample();
      yield chunk(i);
    }
  }
  await store.put(digest, source());
  t.ok(peak < LIMIT, `put held at most ${(peak / CHUNK).toFixed(1)} MiB of buffers`);

  peak = 0;
  const rh = createHash('sha256');
  let n = 0;
  for await (const c of await store.get(digest)) {
    rh.update(c);
    if (n++ % 64 === 63) sample(); // 256 KiB chunks
  }
  t.equal(rh.digest('hex'), digest.hash, 'reads back intact');
  t.ok(peak < LIMIT, `get held at most ${(peak / CHUNK).toFixed(1)} MiB of buffers`);
});

t.test('AC entries are overwritten and sized by their value', async (t) => {
  const { store, path } = await openStore(t, { contentAddressed: false });
  const key = blob('action digest').digest;
  await store.put(key, once(Buffer.from('first result, longer')));
  await store.put(key, chunked(Buffer.from('second'), 2));
  t.equal(await read(store, key), 'second');
  t.match(store.describe(), { blobs: 1, bytes: 6, writes: 2 });
  await store.close();
  const reopened = await openStore(t, { path, contentAddressed: false });
  t.match(reopened.store.describe(), { blobs: 1, bytes: 6 });
  t.equal(await read(reopened.store, key, 3), 'ond');
  t.same(await reopened.store.findMissing([EMPTY_DIGEST]), [EMPTY_DIGEST], 'no implicit empty entry in the AC');
});

t.test('the empty blob is always present in a CAS', async (t) => {
  const { store, path } = await openStore(t);
  t.same(await store.findMissing([EMPTY_DIGEST]), []);
  t.equal(await read(store, EMPTY_DIGEST), '');
  await t.rejects(store.get(EMPTY_DIGEST, { offset: 1 }), { code: Code.OutOfRange });
  await store.put(EMPTY_DIGEST, once(new Uint8Array(0)));
  await t.rejects(store.put(EMPTY_DIGEST, once(Buffer.from('x'))), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${digestString(EMPTY_DIGEST)}: received more than 0 bytes`,
  });
  t.same(await files(path), []);
});

t.test('a blob file removed behind the store reads NOT_FOUND and is forgotten', async (t) => {
  const { store, path } = await openStore(t);
  const b = blob('doomed');
  await store.put(b.digest, once(b.data));
  await unlink(join(path, blobFile(b.digest)));
  t.same(await store.findMissing([b.digest]), [], 'findMissing trusts the index');
  await t.rejects(store.get(b.digest), { code: Code.NotFound, rawMessage: `blob ${digestString(b.digest)} not found` });
  t.same(await store.findMissing([b.digest]), [b.digest], 'the read dropped it from the index');
  t.match(store.describe(), { blobs: 0, bytes: 0 });
});

t.test('a reader keeps streaming a blob that is evicted mid-read', async (t) => {
  const { store, path } = await openStore(t, { maxSizeBytes: 3 << 20 });
  const big = sized('r', 2 << 20);
  const other = sized('s', 2 << 20);
  await store.put(big.digest, once(big.data));
  const it = (await store.get(big.digest))[Symbol.asyncIterator]();
  const first = await it.next();
  t.notOk(first.done);
  await store.put(other.digest, once(other.data));
  while (existsSync(join(path, blobFile(big.digest)))) await sleep(1);
  const parts = [first.value as Uint8Array];
  for (let r = await it.next(); !r.done; r = await it.next()) parts.push(r.value);
  t.equal(digestOf(Buffer.concat(parts)).hash, big.digest.hash, 'the unlinked file still reads in full');
  t.same(await store.findMissing([big.digest]), [big.digest]);
});

t.test('an aborted read stops with CANCELED', async (t) => {
  const { store } = await openStore(t);
  const b = sized('q', 800 * 1024);
  await store.put(b.digest, once(b.data));
  const ac = new AbortController();
  const it = (await store.get(b.digest, { signal: ac.signal }))[Symbol.asyncIterator]();
  await it.next();
  ac.abort();
  await t.rejects(
    (async () => {
      for (let r = await it.next(); !r.done; r = await it.next());
    })(),
    { code: Code.Canceled, rawMessage: `read of blob ${digestString(b.digest)} was cancelled` },
  );
});

t.test('open rejects a bad configuration', async (t) => {
  await t.rejects(DiskStore.open({ path: t.testdir(), maxSizeBytes: 0, contentAddressed: true }), {
    code: Code.InvalidArgument,
  });
  const file = join(t.testdir(), 'a-file');
  await writeFile(file, 'x');
  await t.rejects(DiskStore.open({ path: file, maxSizeBytes: 10, contentAddressed: true }), { code: Code.Internal });
  await t.rejects(DiskStore.open({ path: '', maxSizeBytes: 10, contentAddressed: true }), {
    code: Code.InvalidArgument,
    rawMessage: 'disk store: path must be a non-empty string',
  });
});
