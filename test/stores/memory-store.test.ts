import { Code } from '@connectrpc/connect';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString, EMPTY_DIGEST } from '../../src/digest.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { collect, once } from '../../src/streams.ts';

function blob(text: string): { digest: Digest; data: Uint8Array } {
  const data = Buffer.from(text);
  return { digest: digestOf(data), data };
}

async function* chunked(data: Uint8Array, chunkSize: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.byteLength; i += chunkSize) yield data.subarray(i, i + chunkSize);
}

async function read(store: MemoryStore, digest: Digest, offset?: number, limit?: number): Promise<string> {
  return Buffer.from(await collect(await store.get(digest, { offset, limit }))).toString();
}

const cas = (maxSizeBytes = 1 << 20) => new MemoryStore({ maxSizeBytes, contentAddressed: true });

t.test('put then get returns the bytes, whole and by offset and limit', async (t) => {
  const store = cas();
  const b = blob('hello, memory store');
  await store.put(b.digest, chunked(b.data, 4));
  t.equal(await read(store, b.digest), 'hello, memory store');
  t.equal(await read(store, b.digest, 7), 'memory store');
  t.equal(await read(store, b.digest, 7, 6), 'memory');
  t.equal(await read(store, b.digest, 19), '');
  await t.rejects(store.get(b.digest, { offset: 20 }), {
    code: Code.OutOfRange,
    rawMessage: 'read offset 20 is past the end of a 19-byte blob',
  });
  t.same(await store.findMissing([b.digest]), []);
  t.match(store.describe(), { kind: 'memory', blobs: 1, bytes: 19 });
});

t.test('the stored copy does not alias the caller buffer', async (t) => {
  const store = cas();
  const b = blob('mutable');
  const mine = Buffer.from(b.data);
  await store.put(b.digest, once(mine));
  mine.fill(0);
  t.equal(await read(store, b.digest), 'mutable');
});

t.test('get of an absent blob rejects NOT_FOUND before the first byte', async (t) => {
  const store = cas();
  const b = blob('absent');
  await t.rejects(store.get(b.digest), { code: Code.NotFound, rawMessage: `blob ${digestString(b.digest)} not found` });
  t.same(await store.findMissing([b.digest]), [b.digest]);
});

t.test('a blob that does not match its digest is rejected and not stored', async (t) => {
  const store = cas();
  const b = blob('the real content');
  const key = digestString(b.digest);
  const wrong = Buffer.from('the fake content');
  await t.rejects(store.put(b.digest, once(wrong)), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: content hashes to ${digestOf(wrong).hash}, not to the digest's hash`,
  });
  await t.rejects(store.put(b.digest, once(b.data.subarray(0, 3))), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: received 3 bytes, digest says 16`,
  });
  await t.rejects(store.put(b.digest, chunked(Buffer.concat([b.data, Buffer.from('!')]), 5)), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${key}: received more than 16 bytes`,
  });
  t.same(await store.findMissing([b.digest]), [b.digest]);
  t.match(store.describe(), { blobs: 0, bytes: 0 });
});

t.test('eviction removes least recently used blobs; findMissing and get refresh recency', async (t) => {
  const store = cas(300);
  const [a, b, c, d, e] = ['a', 'b', 'c', 'd', 'e'].map((s) => blob(s.repeat(100)));
  for (const x of [a!, b!, c!]) await store.put(x.digest, once(x.data));
  t.same(await store.findMissing([a!.digest]), [], 'a is refreshed by findMissing');
  await store.put(d!.digest, once(d!.data));
  t.same(await store.findMissing([a!.digest, b!.digest, c!.digest, d!.digest]), [b!.digest], 'b was the LRU');
  // The query touched a, c, d in that order; reading c leaves a least recently used.
  await read(store, c!.digest);
  await store.put(e!.digest, once(e!.data));
  t.same(await store.findMissing([a!.digest]), [a!.digest], 'a was the LRU after c was read');
  t.match(store.describe(), { blobs: 3, bytes: 300, evictions: 2 });
});

t.test('the empty blob is always present in a CAS, not in an AC', async (t) => {
  const store = cas();
  t.same(await store.findMissing([EMPTY_DIGEST]), []);
  t.equal(await read(store, EMPTY_DIGEST), '');
  await t.rejects(store.get(EMPTY_DIGEST, { offset: 1 }), { code: Code.OutOfRange });
  await t.rejects(store.put(EMPTY_DIGEST, once(Buffer.from('x'))), {
    code: Code.InvalidArgument,
    rawMessage: `blob ${digestString(EMPTY_DIGEST)}: received more than 0 bytes`,
  });
  const ac = new MemoryStore({ maxSizeBytes: 100, contentAddressed: false });
  t.same(await ac.findMissing([EMPTY_DIGEST]), [EMPTY_DIGEST]);
});

t.test('AC entries are overwritten without hash verification', async (t) => {
  const store = new MemoryStore({ maxSizeBytes: 1000, contentAddressed: false });
  const key = blob('action digest').digest;
  await store.put(key, once(Buffer.from('first result, longer')));
  await store.put(key, chunked(Buffer.from('second'), 2));
  t.equal(await read(store, key), 'second');
  t.match(store.describe(), { blobs: 1, bytes: 6 });
});

t.test('a cancelled call rejects CANCELED', async (t) => {
  const store = cas();
  const b = blob('x');
  const signal = AbortSignal.abort();
  await t.rejects(store.put(b.digest, once(b.data), { signal }), { code: Code.Canceled });
  await t.rejects(store.findMissing([b.digest], { signal }), { code: Code.Canceled });
  await t.rejects(store.get(b.digest, { signal }), { code: Code.Canceled });
});
