// RemoteStore against a real gRPC server this project did not write: the
// python grpcio shard (test/fixtures/py-shard). Covers the CAS and AC trees,
// error codes, timeouts, cancellation and reconnecting.
import { createHash, randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { create, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError } from '@connectrpc/connect';
import t, { type Test } from 'tap';
import type { Digest } from '../../src/digest.ts';
import { EMPTY_DIGEST, digestOf } from '../../src/digest.ts';
import { isInfrastructureError } from '../../src/errors.ts';
import { collect } from '../../src/streams.ts';
import { messageChunks } from '../../src/stores/remote-bytestream.ts';
import { FIND_MISSING_BATCH, RemoteStore } from '../../src/stores/remote-store.ts';
import { ActionResultSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { startNode } from '../helpers/node.ts';
import { startPyShard, type PyShard } from '../helpers/py-shard.ts';

const MiB = 1024 * 1024;

async function* chunksOf(data: Uint8Array, size: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.byteLength; i += size) yield data.subarray(i, Math.min(i + size, data.byteLength));
}

function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Asserts that `p` rejects with a ConnectError of `code` and returns the error. */
async function rejectsCode(t: Asserts, p: Promise<unknown>, code: Code, msg = 'rejects'): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    t.type(err, ConnectError, msg);
    t.equal(Code[(err as ConnectError).code], Code[code], msg);
    return err as ConnectError;
  }
  t.fail(`${msg ?? 'call'}: expected ${Code[code]}, resolved`);
  return new ConnectError('resolved', Code.Unknown);
}

type Asserts = Pick<Test, 'type' | 'equal' | 'fail'>;

async function arrayFrom<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((res) => server.close(() => res()));
  return port;
}

const shards: PyShard[] = [];
const stores: RemoteStore[] = [];
t.teardown(async () => {
  await Promise.all(stores.map((s) => s.close()));
  await Promise.all(shards.map((s) => s.stop()));
});

async function shard(opts: Parameters<typeof startPyShard>[0] = {}): Promise<PyShard> {
  const s = await startPyShard(opts);
  shards.push(s);
  return s;
}

function store(opts: ConstructorParameters<typeof RemoteStore>[0]): RemoteStore {
  const s = new RemoteStore(opts);
  stores.push(s);
  return s;
}

const main = await shard();
const cas = store({ name: 'py', url: main.url, tree: 'cas', instanceName: 'main' });
const ac = store({ name: 'py-ac', url: main.url, tree: 'ac', instanceName: 'main' });

t.test('CAS: small blob round trip', async (t) => {
  const data = randomBytes(1000);
  const d = digestOf(data);
  t.same(await cas.findMissing([d]), [d], 'missing before put');
  await cas.put(d, chunksOf(data, 300));
  t.same(await cas.findMissing([d]), [], 'present after put');
  t.same(Buffer.from(await collect(await cas.get(d))), data);
  const other = store({ name: 'other', url: main.url, tree: 'cas', instanceName: 'elsewhere' });
  t.same(await other.findMissing([d]), [d], 'instance names are separate namespaces');
});

t.test('CAS: the empty blob never goes over the wire', async (t) => {
  const before = cas.describe().requests;
  t.same(await cas.findMissing([EMPTY_DIGEST]), []);
  await cas.put(EMPTY_DIGEST, chunksOf(new Uint8Array(0), 1));
  t.same((await collect(await cas.get(EMPTY_DIGEST))).byteLength, 0);
  t.equal(cas.describe().requests, before, 'no calls made');
  await rejectsCode(t, cas.put(EMPTY_DIGEST, chunksOf(new Uint8Array(1), 1)), Code.InvalidArgument, 'bytes for the empty digest');
});

t.test('CAS: 20 MiB streamed both ways; a second upload completes early', async (t) => {
  const data = randomBytes(20 * MiB);
  const d = digestOf(data);
  const out0 = cas.describe().bytesOut as number;
  await cas.put(d, chunksOf(data, 16 * 1024));
  t.equal((cas.describe().bytesOut as number) - out0, data.byteLength, 'every byte sent once');

  const stream = await cas.get(d);
  const h = createHash('sha256');
  let n = 0;
  let maxChunk = 0;
  for await (const c of stream) {
    h.update(c);
    n += c.byteLength;
    maxChunk = Math.max(maxChunk, c.byteLength);
  }
  t.equal(n, data.byteLength);
  t.equal(h.digest('hex'), d.hash);
  t.ok(maxChunk <= 1 * MiB, `streamed in messages, not one buffer (largest ${maxChunk})`);

  // The shard already has it: it answers committed_size at once and the
  // store stops sending.
  const out1 = cas.describe().bytesOut as number;
  await cas.put(d, chunksOf(data, 16 * 1024));
  const sent = (cas.describe().bytesOut as number) - out1;
  t.ok(sent < data.byteLength / 2, `early completion stopped the upload after ${sent} bytes`);
  t.equal(cas.describe().inFlight, 0);
});

t.test('CAS: a missing blob rejects NOT_FOUND before the first byte, with the shard prefix', async (t) => {
  const d = digestOf(randomBytes(10));
  const err = await rejectsCode(t, cas.get(d), Code.NotFound);
  t.match(err.rawMessage, /^remote py: /);
  t.equal(isInfrastructureError(err), false, 'a miss is not an infrastructure error');
  const failures = cas.describe().failures;
  await rejectsCode(t, cas.get(d, { offset: 0, limit: 0 }), Code.NotFound);
  t.equal(cas.describe().failures, failures, 'NOT_FOUND does not count as a failure');
});

t.test('CAS: offset and limit', async (t) => {
  const data = randomBytes(300_000);
  const d = digestOf(data);
  await cas.put(d, chunksOf(data, 100_000));
  t.same(Buffer.from(await collect(await cas.get(d, { offset: 10, limit: 100 }))), data.subarray(10, 110));
  t.same(Buffer.from(await collect(await cas.get(d, { offset: 200_000 }))), data.subarray(200_000));
  t.same(Buffer.from(await collect(await cas.get(d, { offset: 299_990, limit: 100 }))), data.subarray(299_990));
  t.equal((await collect(await cas.get(d, { offset: data.byteLength }))).byteLength, 0, 'empty range at the end');
  await rejectsCode(t, cas.get(d, { offset: data.byteLength + 1 }), Code.OutOfRange);
  await rejectsCode(t, cas.get(digestOf(randomBytes(5)), { offset: 5 }), Code.NotFound, 'empty range still checks existence');
});

t.test('CAS: content that does not match the digest is INVALID_ARGUMENT', async (t) => {
  const data = randomBytes(100_000);
  const d = digestOf(data);
  const wrong = randomBytes(100_000);
  const err = await rejectsCode(t, cas.put(d, chunksOf(wrong, 30_000)), Code.InvalidArgument, 'hash mismatch (from the shard)');
  t.match(err.rawMessage, /^remote py: .*hashes to/);
  await rejectsCode(t, cas.put(d, chunksOf(data.subarray(0, 99_999), 30_000)), Code.InvalidArgument, 'too short');
  await rejectsCode(t, cas.put(d, chunksOf(Buffer.concat([data, Buffer.from('x')]), 30_000)), Code.InvalidArgument, 'too long');
  t.same(await cas.findMissing([d]), [d], 'nothing stored');
  t.equal(cas.describe().inFlight, 0);
});

t.test('CAS: findMissing batches large requests and keeps duplicates', async (t) => {
  const present: Digest[] = [];
  for (let i = 0; i < 3; i++) {
    const data = randomBytes(64);
    const d = digestOf(data);
    await cas.put(d, chunksOf(data, 64));
    present.push(d);
  }
  const absent = Array.from({ length: FIND_MISSING_BATCH * 2 + 500 }, () => digestOf(randomBytes(16)));
  const before = cas.describe().requests as number;
  const missing = await cas.findMissing([...present, ...absent, absent[0]!, EMPTY_DIGEST]);
  t.equal(missing.length, absent.length + 1);
  t.equal((cas.describe().requests as number) - before, 3, 'three FindMissingBlobs calls');
  const keys = new Set(missing.map((d) => d.hash));
  t.notOk(present.some((d) => keys.has(d.hash)));
});

t.test('AC: ActionResult round trip; findMissing maps NOT_FOUND', async (t) => {
  const result = create(ActionResultSchema, {
    exitCode: 3,
    stdoutRaw: new TextEncoder().encode('hello'),
    outputFiles: [{ path: 'out/a', digest: { hash: 'a'.repeat(64), sizeBytes: 7n }, isExecutable: true }],
  });
  const bytes = toBinary(ActionResultSchema, result);
  const action = digestOf(randomBytes(40));
  const absent = digestOf(randomBytes(40));
  await rejectsCode(t, ac.get(action), Code.NotFound);
  await ac.put(action, chunksOf(bytes, 10));
  t.same(Buffer.from(await collect(await ac.get(action))), Buffer.from(bytes));
  t.same(Buffer.from(await collect(await ac.get(action, { offset: 2, limit: 3 }))), Buffer.from(bytes.subarray(2, 5)));
  t.same(await ac.findMissing([action, absent]), [absent]);
  await rejectsCode(t, ac.put(absent, chunksOf(new Uint8Array([0xff, 0xff, 0xff]), 3)), Code.InvalidArgument, 'not an ActionResult');
});

t.test('a shard that is down fails fast with UNAVAILABLE', async (t) => {
  const port = await freePort();
  const down = store({ name: 'down', url: `http://127.0.0.1:${port}`, tree: 'cas' });
  const started = Date.now();
  const err = await rejectsCode(t, down.get(digestOf(randomBytes(3))), Code.Unavailable);
  t.ok(Date.now() - started < 2000, `failed in ${Date.now() - started} ms`);
  t.ok(isInfrastructureError(err));
  t.match(err.rawMessage, /^remote down: /);
  await rejectsCode(t, down.findMissing([digestOf(randomBytes(3))]), Code.Unavailable);
  await rejectsCode(t, down.put(digestOf(Buffer.from('abc')), chunksOf(Buffer.from('abc'), 3)), Code.Unavailable);
  await rejectsCode(t, down.healthCheck(), Code.Unavailable);
  t.equal(down.describe().failures, 3, 'three data-path failures counted');
  t.equal(down.describe().inFlight, 0);
});

t.test('health check: SERVING, fallback to GetCapabilities, and a blackholed shard', async (t) => {
  await cas.healthCheck();
  const noHealth = await shard({ noHealth: true });
  const s = store({ name: 'nohealth', url: noHealth.url, tree: 'cas' });
  await s.healthCheck();
  await s.healthCheck();

  const victim = await shard();
  const v = store({ name: 'stopped', url: victim.url, tree: 'cas', timeoutMs: 800, healthTimeoutMs: 500 });
  await v.healthCheck();
  const data = randomBytes(1000);
  await v.put(digestOf(data), chunksOf(data, 1000));
  victim.pause();
  try {
    let started = Date.now();
    const err = await rejectsCode(t, v.healthCheck(), Code.Unavailable, 'SIGSTOPped shard');
    const took = Date.now() - started;
    t.ok(took >= 400 && took < 2000, `health check gave up after ${took} ms`);
    t.ok(isInfrastructureError(err));
    t.match(err.rawMessage, /DeadlineExceeded/);

    started = Date.now();
    await rejectsCode(t, v.get(digestOf(data)), Code.DeadlineExceeded, 'read of a blackholed shard');
    t.ok(Date.now() - started < 2500, `read gave up after ${Date.now() - started} ms`);
    await rejectsCode(t, v.findMissing([digestOf(data)]), Code.DeadlineExceeded, 'FindMissing of a blackholed shard');

    // A health check for a caller that gives up first is CANCELED.
    await rejectsCode(t, v.healthCheck(AbortSignal.timeout(100)), Code.Canceled, 'caller gave up');
  } finally {
    victim.resume();
  }
  await v.healthCheck();
  t.same(Buffer.from(await collect(await v.get(digestOf(data)))), data, 'works again after SIGCONT');
});

t.test('stall timeout: a shard that stops mid-read fails the read with DEADLINE_EXCEEDED', async (t) => {
  const victim = await shard();
  const v = store({ name: 'stall', url: victim.url, tree: 'cas', stallTimeoutMs: 500 });
  const data = randomBytes(24 * MiB);
  const d = digestOf(data);
  await v.put(d, chunksOf(data, MiB));
  const it = (await v.get(d))[Symbol.asyncIterator]();
  t.notOk((await it.next()).done);
  victim.pause();
  try {
    let n = 0;
    const started = Date.now();
    const err = await rejectsCode(
      t,
      (async () => {
        for (;;) {
          const r = await it.next();
          if (r.done) break;
          n += r.value.byteLength;
        }
      })(),
      Code.DeadlineExceeded,
    );
    t.ok(n < data.byteLength, `read ${n} buffered bytes before stalling`);
    t.ok(Date.now() - started < 3000, `gave up after ${Date.now() - started} ms`);
    t.ok(isInfrastructureError(err));
  } finally {
    victim.resume();
  }
  t.equal(v.describe().inFlight, 0);
});

t.test('the caller signal cancels a read mid-stream; stopping early cancels too', async (t) => {
  const data = randomBytes(16 * MiB);
  const d = digestOf(data);
  await cas.put(d, chunksOf(data, MiB));

  const ctl = new AbortController();
  const inBefore = cas.describe().bytesIn as number;
  const it = (await cas.get(d, { signal: ctl.signal }))[Symbol.asyncIterator]();
  t.notOk((await it.next()).done);
  t.equal(cas.describe().inFlight, 1);
  await sleep(20);
  ctl.abort();
  const err = await rejectsCode(
    t,
    (async () => {
      for (;;) if ((await it.next()).done) return;
    })(),
    Code.Canceled,
  );
  t.equal(isInfrastructureError(err), false, 'cancellation is not a shard failure');
  t.equal(cas.describe().inFlight, 0);
  t.ok((cas.describe().bytesIn as number) - inBefore < data.byteLength, 'did not read the whole blob');

  // break out of for-await: return() cancels the call.
  for await (const c of await cas.get(d)) {
    t.ok(c.byteLength > 0);
    break;
  }
  t.equal(cas.describe().inFlight, 0);
  // return() before the first next() also releases the call.
  const unread = (await cas.get(d))[Symbol.asyncIterator]();
  await unread.return?.();
  t.equal(cas.describe().inFlight, 0);

  // An already aborted signal fails at once.
  await rejectsCode(t, cas.get(d, { signal: AbortSignal.abort() }), Code.Canceled);
  // Aborting an upload.
  const up = new AbortController();
  const big = randomBytes(8 * MiB);
  const slow = async function* () {
    for await (const c of chunksOf(big, 64 * 1024)) {
      yield c;
      await sleep(1);
      if (!up.signal.aborted) up.abort();
    }
  };
  await rejectsCode(t, cas.put(digestOf(big), slow(), { signal: up.signal }), Code.Canceled);
  t.equal(cas.describe().inFlight, 0);
  t.same(await cas.findMissing([digestOf(big)]), [digestOf(big)], 'cancelled upload not stored');
});

t.test('a shard killed mid-read fails the read with UNAVAILABLE', async (t) => {
  const victim = await shard();
  const v = store({ name: 'killed', url: victim.url, tree: 'cas' });
  const data = randomBytes(24 * MiB);
  const d = digestOf(data);
  await v.put(d, chunksOf(data, MiB));
  const it = (await v.get(d))[Symbol.asyncIterator]();
  t.notOk((await it.next()).done);
  await victim.kill('SIGKILL');
  const err = await rejectsCode(
    t,
    (async () => {
      for (;;) if ((await it.next()).done) return;
    })(),
    Code.Unavailable,
  );
  t.ok(isInfrastructureError(err));
  t.equal(v.describe().inFlight, 0);
});

t.test('reconnects after the shard restarts on the same port', async (t) => {
  const first = await shard();
  const s = store({ name: 'restart', url: first.url, tree: 'cas' });
  const data = randomBytes(5000);
  const d = digestOf(data);
  await s.put(d, chunksOf(data, 5000));
  t.same(await s.findMissing([d]), []);
  await first.kill('SIGKILL');
  const err = await rejectsCode(t, s.findMissing([d]), Code.Unavailable, 'while down');
  t.ok(isInfrastructureError(err));
  await shard({ port: first.port });
  t.same(await s.findMissing([d]), [d], 'new process answers (and is empty)');
  await s.put(d, chunksOf(data, 1000));
  t.same(Buffer.from(await collect(await s.get(d))), data);
  await s.healthCheck();
});

t.test('close() is idempotent and later calls fail UNAVAILABLE', async (t) => {
  const s = store({ url: main.url, tree: 'cas' });
  await s.healthCheck();
  t.match(s.describe(), { kind: 'remote', name: `127.0.0.1:${main.port}`, url: main.url, instanceName: '' });
  await s.close();
  await s.close();
  await rejectsCode(t, s.findMissing([digestOf(randomBytes(3))]), Code.Unavailable);
});

t.test("against this project's storage node", async (t) => {
  const node = await startNode({ ac: { kind: 'memory', maxSizeBytes: 16 * MiB } });
  const ncas = new RemoteStore({ name: 'node', url: node.url, tree: 'cas' });
  const nac = new RemoteStore({ name: 'node-ac', url: node.url, tree: 'ac' });
  // Sessions first: the node's close() waits for idle HTTP/2 sessions.
  t.teardown(async () => {
    await Promise.all([ncas.close(), nac.close()]);
    await node.close();
  });

  await ncas.healthCheck();
  const small = randomBytes(1000);
  const big = randomBytes(20 * MiB);
  for (const data of [small, big]) {
    const d = digestOf(data);
    t.same(await ncas.findMissing([d, EMPTY_DIGEST]), [d]);
    await ncas.put(d, chunksOf(data, 16 * 1024));
    t.same(await ncas.findMissing([d]), []);
    const got = await collect(await ncas.get(d));
    t.equal(sha256(got), d.hash, `${data.byteLength} bytes round trip`);
  }
  t.same(Buffer.from(await collect(await ncas.get(digestOf(small), { offset: 100, limit: 10 }))), small.subarray(100, 110));
  await rejectsCode(t, ncas.get(digestOf(randomBytes(9))), Code.NotFound);
  const fresh = digestOf(randomBytes(1000));
  await rejectsCode(t, ncas.put(fresh, chunksOf(randomBytes(1000), 1000)), Code.InvalidArgument, 'hash mismatch from the node');

  const action = digestOf(randomBytes(30));
  const bytes = toBinary(ActionResultSchema, create(ActionResultSchema, { exitCode: 1 }));
  await nac.put(action, chunksOf(bytes, bytes.byteLength));
  t.same(Buffer.from(await collect(await nac.get(action))), Buffer.from(bytes));
  t.same(await nac.findMissing([action, digestOf(small)]), [digestOf(small)]);

  node.setReady(false);
  await rejectsCode(t, ncas.healthCheck(), Code.Unavailable, 'NOT_SERVING');
  node.setReady(true);
  await ncas.healthCheck();
});

t.test('messageChunks passes large chunks on as views and gathers only small ones', async (t) => {
  const data = randomBytes(300 * 1024);
  const big = await arrayFrom(messageChunks(chunksOf(data, 100 * 1024), 64 * 1024));
  t.same(
    big.map((p) => p.byteLength),
    [64, 36, 64, 36, 64, 36].map((k) => k * 1024),
  );
  t.ok(big.every((p) => p.buffer === data.buffer), 'chunks of 16 KiB or more are sliced, never copied');
  t.equal(sha256(Buffer.concat(big)), sha256(data));

  const small = await arrayFrom(messageChunks(chunksOf(data, 7), 64 * 1024));
  t.ok(small.length <= Math.ceil(data.byteLength / (64 * 1024)) + 1, `${small.length} messages for 7-byte chunks`);
  t.ok(small.every((p) => p.byteLength <= 64 * 1024));
  t.equal(sha256(Buffer.concat(small)), sha256(data), 'gathered small chunks keep every byte in order');

  // A large chunk after small ones sends what was gathered first.
  const mixed = await arrayFrom(
    messageChunks(
      (async function* () {
        yield data.subarray(0, 10);
        yield data.subarray(10, 20);
        yield data.subarray(20, 20 + 32 * 1024);
      })(),
      64 * 1024,
    ),
  );
  t.same(
    mixed.map((p) => p.byteLength),
    [20, 32 * 1024],
  );
  t.equal(sha256(Buffer.concat(mixed)), sha256(data.subarray(0, 20 + 32 * 1024)));
});
