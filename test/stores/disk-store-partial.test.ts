// Resumable uploads in the disk store: an interrupted put keeps its prefix,
// uploadStatus reports it, a put at that offset completes the blob.
import { randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Code } from '@connectrpc/connect';
import type { Test } from 'tap';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString } from '../../src/digest.ts';
import type { DiskStoreOptions } from '../../src/stores/disk-store.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { collect, once } from '../../src/streams.ts';

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function openStore(t: Test, opts: Partial<DiskStoreOptions> = {}): Promise<{ store: DiskStore; path: string }> {
  const path = t.testdir();
  const store = await DiskStore.open({ maxSizeBytes: 16 << 20, contentAddressed: true, fsync: false, ...opts, path });
  t.teardown(() => store.close());
  return { store, path };
}

function randomBlob(size: number): { digest: Digest; data: Buffer } {
  const data = randomBytes(size);
  return { digest: digestOf(data), data };
}

/** Yields `data` in `chunk`-byte pieces, then stalls for ever (a client that went quiet). */
function stallingAfter(data: Uint8Array, chunk: number): { source: AsyncIterable<Uint8Array>; sent: () => number } {
  let sent = 0;
  return {
    source: (async function* () {
      for (let off = 0; off < data.byteLength; off += chunk) {
        const piece = data.subarray(off, Math.min(off + chunk, data.byteLength));
        sent += piece.byteLength;
        yield piece;
      }
      await new Promise(() => {});
    })(),
    sent: () => sent,
  };
}

/** Yields `data`, then fails like a client stream that broke. */
async function* breakingAfter(data: Uint8Array): AsyncIterable<Uint8Array> {
  yield data;
  throw new Error('the client stream broke');
}

async function tmpFiles(path: string): Promise<string[]> {
  return readdir(join(path, 'tmp'));
}

/** Cancels a put once `n` bytes were handed to it, and waits for it to fail. */
async function cancelledPut(store: DiskStore, digest: Digest, data: Uint8Array, id: string, offset = 0): Promise<void> {
  const ac = new AbortController();
  const s = stallingAfter(data, 4096);
  const put = store.put(digest, s.source, { signal: ac.signal, upload: { id, offset } });
  while (s.sent() < data.byteLength) await sleep(1);
  await sleep(5);
  ac.abort();
  await put.catch(() => {});
}

t.test('a cancelled upload keeps its prefix; a put at that offset completes the blob', async (t) => {
  const { store, path } = await openStore(t);
  const b = randomBlob(1 << 20);
  const half = 400_000;
  const ac = new AbortController();
  const s = stallingAfter(b.data.subarray(0, half), 16_384);
  const put = store.put(b.digest, s.source, { signal: ac.signal, upload: { id: 'u1', offset: 0 } });
  while (s.sent() < half) await sleep(1);
  await sleep(5);
  ac.abort();
  await t.rejects(put, { code: Code.Canceled });
  t.equal(await store.uploadStatus(b.digest, 'u1'), half, 'the prefix is kept');
  t.equal(await store.uploadStatus(b.digest, 'other'), 0, 'under its own upload id only');
  t.same(await store.findMissing([b.digest]), [b.digest], 'a prefix is never a blob');
  await t.rejects(store.get(b.digest), { code: Code.NotFound });
  t.match(store.describe(), { partialUploads: 1, partialUploadBytes: half, uploadBytesInFlight: half });
  t.equal((await tmpFiles(path)).length, 1);

  // Only the rest is sent.
  await store.put(b.digest, once(b.data.subarray(half)), { upload: { id: 'u1', offset: half } });
  t.same(Buffer.from(await collect(await store.get(b.digest))), b.data, 'the blob is whole');
  t.equal(await store.uploadStatus(b.digest, 'u1'), 0, 'the prefix is used up');
  t.match(store.describe(), { partialUploads: 0, partialUploadBytes: 0, uploadBytesInFlight: 0, partialUploadsResumed: 1, bytes: 1 << 20 });
  t.same(await tmpFiles(path), []);
});

t.test('a broken source keeps its prefix too, and resumes more than once', async (t) => {
  const { store } = await openStore(t);
  const b = randomBlob(300_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 100_000)), { upload: { id: 'u', offset: 0 } }), /broke/);
  t.equal(await store.uploadStatus(b.digest, 'u'), 100_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(100_000, 200_000)), { upload: { id: 'u', offset: 100_000 } }), /broke/);
  t.equal(await store.uploadStatus(b.digest, 'u'), 200_000);
  await store.put(b.digest, once(b.data.subarray(200_000)), { upload: { id: 'u', offset: 200_000 } });
  t.same(Buffer.from(await collect(await store.get(b.digest))), b.data);
});

t.test('wrong offsets fail precisely and leave the prefix; offset 0 restarts', async (t) => {
  const { store, path } = await openStore(t);
  const b = randomBlob(200_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 50_000)), { upload: { id: 'u', offset: 0 } }));
  await t.rejects(store.put(b.digest, once(b.data.subarray(60_000)), { upload: { id: 'u', offset: 60_000 } }), {
    code: Code.OutOfRange,
    rawMessage: new RegExp(`write_offset 60000 is beyond the 50000 bytes this server holds of upload u of blob ${digestString(b.digest)}`),
  });
  await t.rejects(store.put(b.digest, once(b.data.subarray(40_000)), { upload: { id: 'u', offset: 40_000 } }), {
    code: Code.InvalidArgument,
    rawMessage: /write_offset 40000 is behind the 50000 bytes .*resume at write_offset 50000/,
  });
  await t.rejects(store.put(b.digest, once(b.data.subarray(10)), { upload: { id: 'none', offset: 10 } }), { code: Code.OutOfRange });
  t.equal(await store.uploadStatus(b.digest, 'u'), 50_000, 'the prefix survives wrong offsets');

  // Wrong data after the prefix: the blob is refused and the prefix is gone.
  const wrong = Buffer.from(b.data.subarray(50_000));
  wrong[0]! ^= 1;
  await t.rejects(store.put(b.digest, once(wrong), { upload: { id: 'u', offset: 50_000 } }), { code: Code.InvalidArgument, rawMessage: /hashes to/ });
  t.equal(await store.uploadStatus(b.digest, 'u'), 0);
  t.same(await store.findMissing([b.digest]), [b.digest]);

  // A restart at 0 discards what was kept.
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 70_000)), { upload: { id: 'u', offset: 0 } }));
  t.equal(await store.uploadStatus(b.digest, 'u'), 70_000);
  await store.put(b.digest, once(b.data), { upload: { id: 'u', offset: 0 } });
  t.same(await store.findMissing([b.digest]), []);
  t.match(store.describe(), { partialUploads: 0, uploadBytesInFlight: 0 });
  t.same(await tmpFiles(path), []);
});

t.test('a prefix longer than the digest says is never kept', async (t) => {
  const { store } = await openStore(t);
  const b = randomBlob(1000);
  await t.rejects(store.put(b.digest, breakingAfter(Buffer.concat([b.data, Buffer.alloc(10)])), { upload: { id: 'u', offset: 0 } }), {
    code: Code.InvalidArgument,
  });
  t.equal(await store.uploadStatus(b.digest, 'u'), 0);
});

t.test('a whole blob whose stream broke before the end resumes with nothing left to send', async (t) => {
  const { store } = await openStore(t);
  const b = randomBlob(10_000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data), { upload: { id: 'u', offset: 0 } }));
  t.equal(await store.uploadStatus(b.digest, 'u'), 10_000);
  await store.put(b.digest, once(new Uint8Array(0)), { upload: { id: 'u', offset: 10_000 } });
  t.same(await store.findMissing([b.digest]), []);
});

t.test('bounds: count and bytes (oldest first), expiry, room for uploads, close', async (t) => {
  const { store, path } = await openStore(t, { maxSizeBytes: 1_000_000, partialUploads: { maxCount: 2, maxBytes: 250_000, ttlMs: 300 } });
  const blobs = Array.from({ length: 4 }, () => randomBlob(400_000));
  const keep = async (i: number, bytes: number) =>
    t.rejects(store.put(blobs[i]!.digest, breakingAfter(blobs[i]!.data.subarray(0, bytes)), { upload: { id: `u${i}`, offset: 0 } }));
  await keep(0, 100_000);
  await keep(1, 100_000);
  await keep(2, 100_000); // count: u0 goes
  t.same(
    await Promise.all([0, 1, 2].map((i) => store.uploadStatus(blobs[i]!.digest, `u${i}`))),
    [0, 100_000, 100_000],
    'the oldest goes when the count is reached',
  );
  await keep(3, 120_000); // bytes: 100k + 100k + 120k > 250k, u1 goes
  t.same(
    await Promise.all([1, 2, 3].map((i) => store.uploadStatus(blobs[i]!.digest, `u${i}`))),
    [0, 100_000, 120_000],
    'the oldest goes when the bytes are reached',
  );
  t.match(store.describe(), { partialUploads: 2, partialUploadBytes: 220_000, uploadBytesInFlight: 220_000 });
  const big = randomBlob(300_000);
  await t.rejects(store.put(big.digest, breakingAfter(big.data.subarray(0, 260_000)), { upload: { id: 'big', offset: 0 } }));
  t.equal(await store.uploadStatus(big.digest, 'big'), 0, 'a prefix larger than maxBytes is not kept');
  t.equal((await tmpFiles(path)).length, 2);

  // An upload that needs the room the prefixes hold gets it.
  const room = randomBlob(900_000);
  await store.put(room.digest, once(room.data));
  t.same(await store.findMissing([room.digest]), []);
  t.match(store.describe(), { partialUploads: 0, uploadBytesInFlight: 0 }, 'prefixes were dropped to make room');

  await keep(2, 50_000);
  t.equal(await store.uploadStatus(blobs[2]!.digest, 'u2'), 50_000);
  await sleep(450);
  t.equal(await store.uploadStatus(blobs[2]!.digest, 'u2'), 0, 'expired');
  t.match(store.describe(), { partialUploads: 0, partialUploadsExpired: 1, uploadBytesInFlight: 0 });
  await sleep(20);
  t.same(await tmpFiles(path), [], 'its temp file is deleted');

  await keep(3, 10_000);
  await store.close();
  t.same(await tmpFiles(path), [], 'close deletes kept prefixes');
});

t.test('a newer put of an upload still being written supersedes it and resumes what it kept', async (t) => {
  const { store } = await openStore(t);
  const b = randomBlob(200_000);
  // The old write is still running (its cancellation has not arrived yet).
  const s = stallingAfter(b.data.subarray(0, 80_000), 8192);
  const old = store.put(b.digest, s.source, { upload: { id: 'u', offset: 0 } });
  const oldFailed = t.rejects(old, { code: Code.Aborted, rawMessage: /superseded by a newer Write of upload u/ });
  while (s.sent() < 80_000) await sleep(1);
  await sleep(5);
  await store.put(b.digest, once(b.data.subarray(80_000)), { upload: { id: 'u', offset: 80_000 } });
  await oldFailed;
  t.same(Buffer.from(await collect(await store.get(b.digest))), b.data);
});

t.test('uploadStatus of a write that keeps running reports what is kept after 2 s', async (t) => {
  const { store } = await openStore(t);
  const b = randomBlob(50_000);
  const s = stallingAfter(b.data.subarray(0, 10_000), 10_000);
  const ac = new AbortController();
  const put = store.put(b.digest, s.source, { signal: ac.signal, upload: { id: 'u', offset: 0 } });
  while (s.sent() < 10_000) await sleep(1);
  const t0 = Date.now();
  t.equal(await store.uploadStatus(b.digest, 'u'), 0);
  t.ok(Date.now() - t0 >= 1900, 'waited');
  // A cancellation that arrives while uploadStatus waits: it reports the prefix at once.
  const t1 = Date.now();
  const status = store.uploadStatus(b.digest, 'u');
  await sleep(50);
  ac.abort();
  await put.catch(() => {});
  t.equal(await status, 10_000);
  t.ok(Date.now() - t1 < 1500, 'without waiting the 2 s');
});

t.test('the AC keeps no partial uploads; uploads without an id keep nothing', async (t) => {
  const { store: ac } = await openStore(t, { contentAddressed: false });
  const key = randomBlob(10).digest;
  await t.rejects(ac.put(key, once(Buffer.from('x')), { upload: { id: 'u', offset: 5 } }), { code: Code.OutOfRange });
  t.equal(await ac.uploadStatus(key, 'u'), 0);
  const { store, path } = await openStore(t);
  const b = randomBlob(10_000);
  await cancelledPut(store, b.digest, b.data.subarray(0, 5000), 'u');
  t.equal(await store.uploadStatus(b.digest, 'u'), 5000);
  await t.rejects(store.put(b.digest, breakingAfter(b.data.subarray(0, 5000))));
  t.equal((await tmpFiles(path)).length, 1, 'only the resumable one');
});

t.test('a resumption that finds no room fails RESOURCE_EXHAUSTED and keeps the prefix', async (t) => {
  const { store, path } = await openStore(t, { maxSizeBytes: 1_000_000 });
  const a = randomBlob(600_000);
  await t.rejects(store.put(a.digest, breakingAfter(a.data.subarray(0, 100_000)), { upload: { id: 'a', offset: 0 } }));
  // Another upload in flight holds 500,000 bytes: A's remaining 500,000 do not fit.
  const b = randomBlob(500_000);
  const ac = new AbortController();
  const s = stallingAfter(b.data.subarray(0, 1000), 1000);
  const stalled = store.put(b.digest, s.source, { signal: ac.signal });
  while (s.sent() < 1000) await sleep(1);
  await t.rejects(store.put(a.digest, once(a.data.subarray(100_000)), { upload: { id: 'a', offset: 100_000 } }), { code: Code.ResourceExhausted });
  t.equal(await store.uploadStatus(a.digest, 'a'), 100_000, 'the prefix is kept');
  t.equal((await tmpFiles(path)).length, 2, "with its file (and the stalled upload's)");
  ac.abort();
  await stalled.catch(() => {});
  await store.put(a.digest, once(a.data.subarray(100_000)), { upload: { id: 'a', offset: 100_000 } });
  t.same(Buffer.from(await collect(await store.get(a.digest))), a.data);
  t.match(store.describe(), { partialUploads: 0, uploadBytesInFlight: 0 });
});
