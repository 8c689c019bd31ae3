// gRPC calls over HTTP/2 go straight to Connect's handlers (app.ts,
// directRoutes/grpcRequest): a client's reset reaches the handler's signal
// with its gRPC code, a normal end reads as an AbortError, every call is
// logged once with an "rpc-N" id, and Connect JSON still goes through fastify.
import http from 'node:http';
import http2 from 'node:http2';
import { once } from 'node:events';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Test } from 'tap';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { DEFAULT_LIMITS } from '../../src/config.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { buildApp } from '../../src/server/app.ts';
import type { BlobStore, CallOptions } from '../../src/stores/blob-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';

async function start(t: Test, cas: BlobStore, maxBatchTotalSizeBytes = 1 << 20, maxMessageBytes = DEFAULT_LIMITS.maxMessageBytes) {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  const logger = pino({ level: 'debug' }, sink);
  const app = await buildApp({
    deps: { cas, ac: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }), logger, maxBatchTotalSizeBytes, isReady: () => true },
    logger,
    shutdownTimeoutMs: 1000,
    limits: { ...DEFAULT_LIMITS, maxMessageBytes, maxConnectionBufferBytes: Math.max(maxMessageBytes, DEFAULT_LIMITS.maxConnectionBufferBytes) },
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => app.close());
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : 0;
  const url = `http://127.0.0.1:${port}`;
  const rpcLines = (method = 'FindMissingBlobs') => lines.filter((l) => typeof l.rpc === 'string' && String(l.rpc).endsWith(`/${method}`));
  return { url, rpcLines, client: createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: url })) };
}

/** A CAS whose findMissing waits for its signal (or answers at once when `hang` is false). */
function watchedStore(hang: boolean) {
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const seen: AbortSignal[] = [];
  const store: BlobStore = {
    findMissing: (digests: readonly Digest[], opts?: CallOptions) => {
      seen.push(opts!.signal!);
      if (!hang) return inner.findMissing(digests, opts);
      return new Promise((_, reject) => opts!.signal!.addEventListener('abort', () => reject(opts!.signal!.reason), { once: true }));
    },
    get: (d, o) => inner.get(d, o),
    put: (d, c, o) => inner.put(d, c, o),
    describe: () => inner.describe(),
    close: () => inner.close(),
  };
  return { store, seen };
}

const digests = [toProtoDigest(digestOf(Buffer.from('x')))];

t.test('a client that cancels a unary call: the handler sees CANCELED, the call is logged CANCELED once', async (t) => {
  const { store, seen } = watchedStore(true);
  const { client, rpcLines } = await start(t, store);
  const ac = new AbortController();
  const call = client.findMissingBlobs({ blobDigests: digests }, { signal: ac.signal });
  while (seen.length === 0) await sleep(5);
  ac.abort();
  await t.rejects(call);
  for (let i = 0; i < 100 && rpcLines().length === 0; i++) await sleep(10);
  t.ok(seen[0]!.aborted);
  t.ok(seen[0]!.reason instanceof ConnectError, 'the reason is a ConnectError');
  t.equal((seen[0]!.reason as ConnectError).code, Code.Canceled);
  t.equal(rpcLines().length, 1, 'one line');
  t.match(rpcLines()[0], { code: 'Canceled', reqId: /^rpc-\d+$/ });
});

t.test('a call that ends normally: its signal ends with an AbortError, logged ok', async (t) => {
  const { store, seen } = watchedStore(false);
  const { client, rpcLines } = await start(t, store);
  const res = await client.findMissingBlobs({ blobDigests: digests });
  t.equal(res.missingBlobDigests.length, 1);
  for (let i = 0; i < 100 && !seen[0]!.aborted; i++) await sleep(10);
  t.ok(seen[0]!.aborted, 'aborted once the call ended');
  t.equal((seen[0]!.reason as Error).name, 'AbortError');
  t.match(rpcLines(), [{ code: 'ok', reqId: /^rpc-\d+$/ }]);
});

t.test('Connect JSON over HTTP/1.1 is still served by fastify', async (t) => {
  const { store } = watchedStore(false);
  const { url, rpcLines } = await start(t, store);
  const req = http.request(`${url}/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    agent: false,
  });
  req.end(JSON.stringify({ blobDigests: [{ hash: digests[0]!.hash, sizeBytes: String(digests[0]!.sizeBytes) }] }));
  const [res] = (await once(req, 'response')) as [http.IncomingMessage];
  let body = '';
  for await (const c of res) body += String(c);
  t.equal(res.statusCode, 200, body);
  t.match(rpcLines(), [{ code: 'ok', reqId: /^req-\d+$/ }]);
});

t.test('a large request body arrives whole (the stream is paused and resumed on the way)', async (t) => {
  const cas = new MemoryStore({ maxSizeBytes: 64 << 20, contentAddressed: true });
  // A 12 MiB message: above the default message limit, so the limit is raised.
  const { client } = await start(t, cas, 32 << 20, 33 << 20);
  const blobs = Array.from({ length: 12 }, (_, i) => Buffer.alloc(1 << 20, `blob ${i}`));
  const res = await client.batchUpdateBlobs({ requests: blobs.map((data) => ({ digest: toProtoDigest(digestOf(data)), data })) });
  t.same(res.responses.map((r) => r.status?.code), blobs.map(() => 0));
  t.same(await cas.findMissing(blobs.map((b) => digestOf(b))), [], 'every blob stored');
});

t.test('a client that resets its stream mid-request: logged once, and the server keeps serving', async (t) => {
  const { store } = watchedStore(false);
  const { url, client, rpcLines } = await start(t, store);
  const session = http2.connect(url);
  t.teardown(() => session.close());
  const stream = session.request({
    ':method': 'POST',
    ':path': '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs',
    'content-type': 'application/grpc',
    te: 'trailers',
  });
  stream.on('error', () => {});
  // A frame header promising 1000 bytes, then only a few of them.
  const head = Buffer.alloc(5);
  head.writeUInt32BE(1000, 1);
  stream.write(Buffer.concat([head, Buffer.alloc(10)]));
  await sleep(100);
  stream.close(http2.constants.NGHTTP2_CANCEL);
  for (let i = 0; i < 100 && rpcLines().length === 0; i++) await sleep(10);
  // Node's client ends the stream (END_STREAM) before it resets it; the
  // server waits RESET_GRACE_MS for the reset before it calls the short
  // message a client error, so this is a cancellation.
  t.match(rpcLines(), [{ code: 'Canceled', reqId: /^rpc-\d+$/ }], 'logged once, as CANCELLED');
  const res = await client.findMissingBlobs({ blobDigests: digests });
  t.equal(res.missingBlobDigests.length, 1, 'the next call is served');
});
