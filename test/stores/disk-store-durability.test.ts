// The disk store's durability and cap, from the issue 11 review: the
// directory is fsync'd after the rename that publishes a blob, uploads in
// flight count against maxSizeBytes, and no error a client can see names a
// server path (file system errors reach clients as "storage error: ...",
// with the detail in the log).
import { mkdir, rm, writeFile } from 'node:fs/promises';
import * as realFs from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Writable } from 'node:stream';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Test } from 'tap';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString, toProtoDigest } from '../../src/digest.ts';
import { writeResourceName } from '../../src/services/resource-name.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import type { DiskStoreOptions } from '../../src/stores/disk-store.ts';
import { once } from '../../src/streams.ts';
import { createMetricsRegistry, registerTreeMetrics } from '../../src/admin/metrics.ts';
import { startApp } from '../helpers/raw-grpc.ts';

function sized(seed: string, size: number): { digest: Digest; data: Buffer } {
  const data = Buffer.alloc(size, seed);
  return { digest: digestOf(data), data };
}

/** A source the test feeds by hand: push() a chunk, end() it, or fail() it. */
function handFed() {
  const queue: Uint8Array[] = [];
  let ended = false;
  let wake: (() => void) | undefined;
  let pulled = 0;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  return {
    get pulled() {
      return pulled;
    },
    push(c: Uint8Array) {
      queue.push(c);
      notify();
    },
    end() {
      ended = true;
      notify();
    },
    chunks: (async function* () {
      for (;;) {
        const c = queue.shift();
        if (c !== undefined) {
          pulled++;
          yield c;
          continue;
        }
        if (ended) return;
        await new Promise<void>((r) => (wake = r));
      }
    })(),
  };
}

async function until(cond: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 5));
  }
}

function logSink(): { logger: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: 'debug' }, sink), lines };
}

// ---- directory fsync after rename ----

interface FsEvent {
  readonly op: 'rename' | 'sync' | 'open';
  readonly path: string;
}

/** node:fs/promises with open() and rename() recorded, and sync() of every handle recorded with its path. */
function recordingFs(events: FsEvent[], failWrites?: NodeJS.ErrnoException) {
  return {
    ...realFs,
    rename: async (from: string, to: string) => {
      await realFs.rename(from, to);
      events.push({ op: 'rename', path: to });
    },
    open: async (path: string, flags?: string, mode?: number) => {
      const fh = await realFs.open(path, flags, mode);
      events.push({ op: 'open', path });
      return new Proxy(fh, {
        get(target, prop, receiver) {
          if (prop === 'sync') {
            return async () => {
              await target.sync();
              events.push({ op: 'sync', path });
            };
          }
          if (prop === 'write' && failWrites !== undefined) return async () => Promise.reject(failWrites);
          const v = Reflect.get(target, prop, receiver) as unknown;
          return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
        },
      }) as FileHandle;
    },
  };
}

async function mockedDiskStore(t: Test, fs: ReturnType<typeof recordingFs>): Promise<typeof DiskStore> {
  const mod = await t.mockImport<typeof import('../../src/stores/disk-store.ts')>('../../src/stores/disk-store.ts', {
    'node:fs/promises': fs,
  });
  return mod.DiskStore;
}

t.test('a blob is acknowledged only after its directory was fsync\'d after the rename', async (t) => {
  const events: FsEvent[] = [];
  const Store = await mockedDiskStore(t, recordingFs(events));
  const path = t.testdir();
  const store = await Store.open({ path, maxSizeBytes: 1 << 20, contentAddressed: true });
  t.teardown(() => store.close());
  const b = sized('a', 1000);
  events.length = 0;
  await store.put(b.digest, once(b.data));
  const blobPath = join(path, b.digest.hash.slice(0, 2), digestString(b.digest));
  const renamed = events.findIndex((e) => e.op === 'rename' && e.path === blobPath);
  t.ok(renamed >= 0, 'the blob was renamed into place');
  const fileSync = events.findIndex((e) => e.op === 'sync' && e.path.includes(`${join(path, 'tmp')}/`));
  t.ok(fileSync >= 0 && fileSync < renamed, 'its temp file was fsync\'d before the rename');
  const dirSync = events.findIndex((e, i) => i > renamed && e.op === 'sync' && e.path === dirname(blobPath));
  t.ok(dirSync > renamed, 'and its directory after it, before put() resolved');

  // Concurrent writes into one directory share directory fsyncs.
  const many = Array.from({ length: 40 }, (_, i) => sized(`m${i}`, 100));
  events.length = 0;
  await Promise.all(many.map((m) => store.put(m.digest, once(m.data))));
  const dirSyncs = events.filter((e) => e.op === 'sync' && !e.path.includes(`${join(path, 'tmp')}/`)).length;
  t.ok(dirSyncs > 0 && dirSyncs <= many.length, `${dirSyncs} directory fsyncs for ${many.length} blobs`);
  // Every blob's own directory was synced after its rename.
  for (const m of many) {
    const p = join(path, m.digest.hash.slice(0, 2), digestString(m.digest));
    const r = events.findIndex((e) => e.op === 'rename' && e.path === p);
    t.ok(events.some((e, i) => i > r && e.op === 'sync' && e.path === dirname(p)), `directory of ${m.digest.hash.slice(0, 8)} synced after its rename`);
  }
});

t.test('with fsync off, no directory is synced either', async (t) => {
  const events: FsEvent[] = [];
  const Store = await mockedDiskStore(t, recordingFs(events));
  const store = await Store.open({ path: t.testdir(), maxSizeBytes: 1 << 20, contentAddressed: true, fsync: false });
  t.teardown(() => store.close());
  const b = sized('b', 1000);
  events.length = 0;
  await store.put(b.digest, once(b.data));
  t.same(events.filter((e) => e.op === 'sync'), []);
});

t.test('a fan-out directory recreated under a write is synced into its parent too', async (t) => {
  const events: FsEvent[] = [];
  const Store = await mockedDiskStore(t, recordingFs(events));
  const path = t.testdir();
  const store = await Store.open({ path, maxSizeBytes: 1 << 20, contentAddressed: true });
  t.teardown(() => store.close());
  const b = sized('c', 500);
  await rm(join(path, b.digest.hash.slice(0, 2)), { recursive: true });
  events.length = 0;
  await store.put(b.digest, once(b.data));
  t.ok(events.some((e) => e.op === 'sync' && e.path === path), 'the store directory was synced');
  t.ok(events.some((e) => e.op === 'sync' && e.path === join(path, b.digest.hash.slice(0, 2))), 'and the new fan-out directory');
});

// ---- uploads in flight count against the cap ----

async function openStore(t: Test, opts: Partial<DiskStoreOptions> = {}): Promise<DiskStore> {
  const store = await DiskStore.open({ path: t.testdir(), maxSizeBytes: 1000, contentAddressed: true, ...opts });
  t.teardown(() => store.close());
  return store;
}

t.test('a CAS upload reserves its size when it starts: blobs are evicted to make room before its bytes land', async (t) => {
  const store = await openStore(t);
  const stored = ['a', 'b', 'c'].map((s) => sized(s, 300));
  for (const s of stored) await store.put(s.digest, once(s.data));
  t.match(store.describe(), { bytes: 900, uploadBytesInFlight: 0, evictions: 0 });

  const big = sized('B', 500);
  const feed = handFed();
  const upload = store.put(big.digest, feed.chunks);
  feed.push(big.data.subarray(0, 100));
  await until(() => feed.pulled === 1);
  t.match(store.describe(), { uploadBytesInFlight: 500, bytes: 300, evictions: 2 }, 'two LRU blobs evicted for the upload in flight');
  const registry = createMetricsRegistry({ defaultMetrics: false });
  registerTreeMetrics(registry, { describe: () => ({ cas: store.describe(), ac: store.describe() }) });
  t.match(await registry.metrics(), /^reapi_edge_store_upload_in_flight_bytes\{tree="cas",store="[^"]*"\} 500$/m, 'exported as a gauge');
  t.same(await store.findMissing(stored.map((s) => s.digest)), stored.slice(0, 2).map((s) => s.digest), 'the least recently used ones');

  // 500 in flight: another 600 can never fit, and evicts nothing.
  const other = sized('O', 600);
  await t.rejects(store.put(other.digest, once(other.data)), {
    code: Code.ResourceExhausted,
    rawMessage: `the disk store is full: uploads in flight hold 500 of its 1000 bytes (maxSizeBytes), too many to also hold 600 bytes of ${digestString(other.digest)}; retry later`,
  });
  t.match(store.describe(), { bytes: 300, uploadBytesInFlight: 500, evictions: 2 }, 'nothing evicted for it');
  // 200 more fit beside them.
  const small = sized('s', 200);
  await store.put(small.digest, once(small.data));
  t.match(store.describe(), { bytes: 500, uploadBytesInFlight: 500 });

  feed.push(big.data.subarray(100));
  feed.end();
  await upload;
  t.match(store.describe(), { bytes: 1000, uploadBytesInFlight: 0, blobs: 3 }, 'committed: the reservation became the blob');
});

t.test('a failed or cancelled upload gives its reservation back', async (t) => {
  const store = await openStore(t);
  const big = sized('X', 800);
  const ac = new AbortController();
  const feed = handFed();
  const upload = store.put(big.digest, feed.chunks, { signal: ac.signal });
  feed.push(big.data.subarray(0, 100));
  await until(() => feed.pulled === 1);
  t.equal(store.describe().uploadBytesInFlight, 800);
  ac.abort();
  await t.rejects(upload, { code: Code.Canceled });
  t.equal(store.describe().uploadBytesInFlight, 0, 'released on cancel');

  const wrong = sized('Y', 800);
  await t.rejects(store.put(wrong.digest, once(Buffer.alloc(800, 'Z'))), { code: Code.InvalidArgument });
  t.equal(store.describe().uploadBytesInFlight, 0, 'released when the content does not match');
  const ok = sized('W', 1000);
  await store.put(ok.digest, once(ok.data));
  t.match(store.describe(), { bytes: 1000, uploadBytesInFlight: 0 }, 'the whole cap is usable again');
});

t.test('an AC value reserves as its bytes arrive', async (t) => {
  const store = await openStore(t, { contentAddressed: false });
  const key = sized('key', 10).digest;
  const feed = handFed();
  const put = store.put(key, feed.chunks);
  feed.push(Buffer.alloc(100));
  await until(() => feed.pulled === 1);
  t.equal(store.describe().uploadBytesInFlight, 100);
  feed.push(Buffer.alloc(150));
  await until(() => feed.pulled === 2);
  t.equal(store.describe().uploadBytesInFlight, 250);
  feed.end();
  await put;
  t.match(store.describe(), { bytes: 250, uploadBytesInFlight: 0 });
});

// ---- no server paths in client-visible errors ----

t.test('a file system error reaches the caller as "storage error: ..." without the path; the log has the detail', async (t) => {
  const { logger, lines } = logSink();
  const path = t.testdir();
  const store = await DiskStore.open({ path, maxSizeBytes: 1 << 20, contentAddressed: true, logger });
  t.teardown(() => store.close());
  // tmp/ replaced by a file: every new temp file fails with ENOTDIR.
  await rm(join(path, 'tmp'), { recursive: true });
  await writeFile(join(path, 'tmp'), 'not a directory');
  const b = sized('e', 100);
  let err: ConnectError | undefined;
  try {
    await store.put(b.digest, once(b.data));
  } catch (e) {
    err = e as ConnectError;
  }
  t.ok(err instanceof ConnectError);
  t.equal(err?.code, Code.Internal);
  t.equal(err?.rawMessage, `storage error: creating temp file for blob ${digestString(b.digest)}: not a directory (ENOTDIR)`);
  t.notMatch(err?.rawMessage ?? '', path, 'no path in the message');
  t.match(String((err?.cause as Error | undefined)?.message), path, 'the cause keeps the detail');
  const logged = lines.find((l) => l.msg === `disk store: creating temp file for blob ${digestString(b.digest)} failed`);
  t.ok(logged, 'logged by the store');
  t.equal(logged?.path, path, 'with the store path');
  t.match((logged?.err as { message?: string } | undefined)?.message, path, "and the system's message");
});

t.test('ENOSPC is RESOURCE_EXHAUSTED "storage error: ...: no space left on device (ENOSPC)"', async (t) => {
  const path = t.testdir();
  const enospc = Object.assign(new Error(`ENOSPC: no space left on device, write '${path}/tmp/x'`), {
    code: 'ENOSPC',
    errno: -28,
    syscall: 'write',
    path: `${path}/tmp/x`,
  });
  const Store = await mockedDiskStore(t, recordingFs([], enospc));
  const store = await Store.open({ path, maxSizeBytes: 1 << 20, contentAddressed: true });
  t.teardown(() => store.close());
  const b = sized('f', 100);
  await t.rejects(store.put(b.digest, once(b.data)), {
    code: Code.ResourceExhausted,
    rawMessage: `storage error: writing blob ${digestString(b.digest)}: no space left on device (ENOSPC)`,
  });
  t.same(await store.findMissing([b.digest]), [b.digest], 'nothing stored');
});

t.test('through the server: clients see no server path, on gRPC and Connect, and the node keeps serving', async (t) => {
  const path = t.testdir();
  const store = await DiskStore.open({ path, maxSizeBytes: 64 << 20, contentAddressed: true });
  t.teardown(() => store.close());
  const app = await startApp(t, { cas: store });
  await rm(join(path, 'tmp'), { recursive: true });
  await writeFile(join(path, 'tmp'), 'not a directory');

  const b = sized('g', 1000);
  const cas = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: app.url }));
  const batch = await cas.batchUpdateBlobs({ requests: [{ digest: toProtoDigest(b.digest), data: b.data }] });
  const status = batch.responses[0]?.status;
  t.equal(status?.code, Code.Internal);
  t.equal(status?.message, `storage error: creating temp file for blob ${digestString(b.digest)}: not a directory (ENOTDIR)`);
  for (const [what, transport] of Object.entries({
    'gRPC (fast path)': createGrpcTransport({ baseUrl: app.url }),
    'Connect over HTTP/2': createConnectTransport({ baseUrl: app.url, httpVersion: '2' }),
  })) {
    const c = sized(`h${what}`, 1000);
    try {
      await createClient(ByteStream, transport).write(
        (async function* () {
          yield { resourceName: writeResourceName('', 'u', c.digest), finishWrite: true, data: c.data };
        })(),
      );
      t.fail(`${what}: the write should fail`);
    } catch (e) {
      const ce = ConnectError.from(e);
      t.equal(ce.code, Code.Internal, `${what}: INTERNAL`);
      t.match(ce.rawMessage, /storage error: creating temp file for blob [0-9a-f]{64}-1000: not a directory \(ENOTDIR\)$/, `${what}: ${ce.rawMessage}`);
      t.notMatch(ce.rawMessage, path, `${what}: no path`);
      t.notMatch(ce.rawMessage, /\/tmp\//, `${what}: no path at all`);
    }
  }
  // Fixed behind its back, the store works again; the node never stopped serving.
  await rm(join(path, 'tmp'));
  await mkdir(join(path, 'tmp'));
  const ok = await cas.batchUpdateBlobs({ requests: [{ digest: toProtoDigest(b.digest), data: b.data }] });
  t.equal(ok.responses[0]?.status?.code, 0, 'a later upload is stored');
});
