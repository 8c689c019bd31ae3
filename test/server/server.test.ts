import { spawn } from 'node:child_process';
import { once } from 'node:events';
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { create, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import type { Test } from 'tap';
import {
  Capabilities,
  ContentAddressableStorage,
  DigestFunction_Value,
  Execution,
  FindMissingBlobsRequestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, ReadRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { Health, HealthCheckResponse_ServingStatus } from '../../gen/grpc/health/v1/health_pb.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';
import { startNode } from '../helpers/node.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { RunningNode } from '../helpers/node.ts';

const CAPABILITIES_PATH = '/build.bazel.remote.execution.v2.Capabilities/GetCapabilities';
const FIND_MISSING_PATH = '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs';
const { SERVING, NOT_SERVING } = HealthCheckResponse_ServingStatus;

function grpcClients(node: RunningNode) {
  const transport = createGrpcTransport({ baseUrl: node.url });
  return {
    capabilities: createClient(Capabilities, transport),
    cas: createClient(ContentAddressableStorage, transport),
    health: createClient(Health, transport),
    bytestream: createClient(ByteStream, transport),
    execution: createClient(Execution, transport),
  };
}

/** A plain HTTP/1.1 request (node:http never speaks HTTP/2). */
async function http1Post(
  url: string,
  path: string,
  body: Uint8Array | string,
  contentType = 'application/json',
): Promise<{ status: number; httpVersion: string; body: string }> {
  const req = http.request(`${url}${path}`, { method: 'POST', headers: { 'content-type': contentType }, agent: false });
  req.end(body);
  const [res] = (await once(req, 'response')) as [http.IncomingMessage];
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return { status: res.statusCode ?? 0, httpVersion: res.httpVersion, body: Buffer.concat(chunks).toString('utf8') };
}

/** One gRPC call with a raw request body over node:http2, returning the trailers. */
async function rawGrpc(url: string, path: string, payload: Uint8Array): Promise<{ status: string; message: string }> {
  const session = http2.connect(url);
  try {
    const frame = Buffer.alloc(5 + payload.byteLength);
    frame.writeUInt8(0, 0);
    frame.writeUInt32BE(payload.byteLength, 1);
    frame.set(payload, 5);
    const stream = session.request({
      ':method': 'POST',
      ':path': path,
      'content-type': 'application/grpc',
      te: 'trailers',
    });
    stream.end(frame);
    let headers: http2.IncomingHttpHeaders = {};
    stream.on('response', (h) => {
      headers = h;
    });
    const trailers = new Promise<http2.IncomingHttpHeaders>((resolve) => stream.once('trailers', resolve));
    stream.resume();
    await once(stream, 'end');
    // A trailers-only response carries the status in the headers.
    const all = { ...headers, ...(await Promise.race([trailers, sleep(50).then(() => ({}))])) };
    return {
      status: String(all['grpc-status']),
      message: decodeURIComponent(String(all['grpc-message'] ?? '')),
    };
  } finally {
    session.close();
  }
}

async function runCurl(args: string[]): Promise<{ code: number | null; stdout: string }> {
  const child = spawn('curl', args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let stdout = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  const [code] = (await once(child, 'close')) as [number | null];
  return { code, stdout };
}

async function curlAvailable(): Promise<boolean> {
  try {
    return (await runCurl(['--version'])).code === 0;
  } catch {
    return false;
  }
}

async function expectCode(t: Test, p: Promise<unknown>, code: Code, message?: RegExp): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], Code[code], `code is ${Code[code]} (${ce.rawMessage})`);
    if (message) t.match(ce.rawMessage, message);
    return ce;
  }
  t.fail(`expected ${Code[code]}, the call succeeded`);
  return new ConnectError('unexpected success');
}

t.test('one port: Connect JSON over HTTP/1.1 and gRPC over h2c', async (t) => {
  const node = await startNode();
  t.teardown(node.close);

  const res = await http1Post(node.url, CAPABILITIES_PATH, '{}');
  t.equal(res.httpVersion, '1.1');
  t.equal(res.status, 200, res.body);
  const json = JSON.parse(res.body) as { cacheCapabilities: { digestFunctions: string[] } };
  t.same(json.cacheCapabilities.digestFunctions, ['SHA256']);

  // Global fetch (undici) speaks HTTP/1.1 too.
  const fetched = await fetch(`${node.url}${CAPABILITIES_PATH}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ instanceName: 'main' }),
  });
  t.equal(fetched.status, 200);
  t.same(((await fetched.json()) as typeof json).cacheCapabilities.digestFunctions, ['SHA256']);

  const { capabilities } = grpcClients(node);
  const caps = await capabilities.getCapabilities({});
  t.same(caps.cacheCapabilities?.digestFunctions, [DigestFunction_Value.SHA256]);
  t.equal(caps.highApiVersion?.major, 2);
});

t.test('sniffing copes with a request line split across packets and with large first reads', async (t) => {
  const node = await startNode();
  t.teardown(node.close);

  // "P" is a prefix of both "POST" and the HTTP/2 preface "PRI * ...".
  const socket = net.connect(node.port, '127.0.0.1');
  await once(socket, 'connect');
  const body = '{}';
  socket.write('P');
  await sleep(50);
  socket.write(
    `OST ${CAPABILITIES_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
  );
  let response = '';
  socket.setEncoding('utf8').on('data', (d: string) => (response += d));
  await once(socket, 'end');
  t.match(response, /^HTTP\/1\.1 200/);
  t.match(response, /"digestFunctions":\["SHA256"\]/);

  // A 3 MiB HTTP/1.1 body arrives in large reads right after the request line.
  const blob = Buffer.alloc(3 * 1024 * 1024, 7);
  const d = digestOf(blob);
  const upload = await http1Post(
    node.url,
    '/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs',
    JSON.stringify({ requests: [{ digest: { hash: d.hash, sizeBytes: String(d.size) }, data: blob.toString('base64') }] }),
  );
  t.equal(upload.status, 200, upload.body.slice(0, 200));
  t.same(await node.cas.findMissing([d]), [], 'the 3 MiB blob arrived intact');

  // And the same size over gRPC/h2c (exercises the large HTTP/2 windows).
  const blob2 = Buffer.alloc(3 * 1024 * 1024, 9);
  const d2 = digestOf(blob2);
  const { cas } = grpcClients(node);
  const r = await cas.batchUpdateBlobs({ requests: [{ digest: toProtoDigest(d2), data: blob2 }] });
  t.equal(r.responses[0]?.status?.code, 0);
  const read = await cas.batchReadBlobs({ digests: [toProtoDigest(d2)] });
  t.equal(Buffer.compare(Buffer.from(read.responses[0]!.data), blob2), 0);
});

const skipCurl = (await curlAvailable()) ? false : 'curl is not installed';

t.test('real curl over HTTP/1.1 (and HTTP/2 prior knowledge)', { skip: skipCurl }, async (t) => {
  const node = await startNode();
  t.teardown(node.close);
  const url = `http://127.0.0.1:${node.port}${CAPABILITIES_PATH}`;
  for (const extra of [[], ['--http2-prior-knowledge']]) {
    const { code, stdout } = await runCurl(['-s', ...extra, '-H', 'Content-Type: application/json', '-d', '{}', url]);
    t.equal(code, 0, `curl ${extra.join(' ')} exit code`);
    const json = JSON.parse(stdout) as { cacheCapabilities: { digestFunctions: string[] } };
    t.same(json.cacheCapabilities.digestFunctions, ['SHA256'], `curl ${extra.join(' ')}`);
  }
});

t.test('garbage protobuf gets INVALID_ARGUMENT naming the message type, and the server keeps serving', async (t) => {
  const node = await startNode();
  t.teardown(node.close);

  // 0x0f: field 1 with wire type 7, which does not exist.
  const garbage = Uint8Array.of(0x0f, 0xff, 0xff);
  const unary = await rawGrpc(node.url, FIND_MISSING_PATH, garbage);
  t.equal(unary.status, String(Code.InvalidArgument), unary.message);
  t.match(unary.message, /^request is not a valid build\.bazel\.remote\.execution\.v2\.FindMissingBlobsRequest message: /);

  // Client streaming: the parse error surfaces inside the ByteStream Write handler.
  const write = await rawGrpc(node.url, '/google.bytestream.ByteStream/Write', garbage);
  t.equal(write.status, String(Code.InvalidArgument), write.message);
  t.match(write.message, /google\.bytestream\.WriteRequest/);

  // Connect protocol with binary protobuf over HTTP/1.1.
  const connect = await http1Post(node.url, FIND_MISSING_PATH, garbage, 'application/proto');
  t.equal(connect.status, 400);
  t.match(JSON.parse(connect.body), { code: 'invalid_argument', message: /not a valid .*FindMissingBlobsRequest/ });

  // A valid request on the same server still works, raw and via a client.
  const ok = await rawGrpc(node.url, FIND_MISSING_PATH, toBinary(FindMissingBlobsRequestSchema, create(FindMissingBlobsRequestSchema, {})));
  t.equal(ok.status, '0');
  const { cas } = grpcClients(node);
  const missing = await cas.findMissingBlobs({ blobDigests: [toProtoDigest(digestOf(Buffer.from('x')))] });
  t.equal(missing.missingBlobDigests.length, 1);
});

t.test('unimplemented services and bad instance names', async (t) => {
  const node = await startNode();
  t.teardown(node.close);
  const { capabilities, execution } = grpcClients(node);
  await expectCode(t, capabilities.getCapabilities({ instanceName: 'a//b' }), Code.InvalidArgument, /instance_name "a\/\/b"/);
  await expectCode(t, capabilities.getCapabilities({ instanceName: 'x/blobs' }), Code.InvalidArgument, /reserved segment "blobs"/);
  await expectCode(t, capabilities.getCapabilities({ instanceName: '../x' }), Code.InvalidArgument, /"\.\."/);
  await expectCode(t, capabilities.getCapabilities({ instanceName: 'main/' }), Code.InvalidArgument, /ends with/);
  t.ok(await capabilities.getCapabilities({ instanceName: 'team/main' }));
  const stream = execution.execute({ actionDigest: toProtoDigest(digestOf(Buffer.from('a'))) });
  await expectCode(
    t,
    (async () => {
      for await (const _ of stream) void _;
    })(),
    Code.Unimplemented,
  );
});

t.test('grpc.health.v1 Check and Watch over the real server', async (t) => {
  const node = await startNode();
  t.teardown(node.close);
  const { health } = grpcClients(node);

  t.equal((await health.check({ service: '' })).status, SERVING);
  t.equal((await health.check({ service: 'build.bazel.remote.execution.v2.ContentAddressableStorage' })).status, SERVING);
  await expectCode(t, health.check({ service: 'no.such.Service' }), Code.NotFound, /no\.such\.Service/);

  const ac = new AbortController();
  const seen: number[] = [];
  const watching = (async () => {
    for await (const res of health.watch({ service: '' }, { signal: ac.signal })) {
      seen.push(res.status);
      if (seen.length === 2) break;
    }
  })();
  await sleep(100);
  node.setReady(false);
  t.equal((await health.check({ service: '' })).status, NOT_SERVING);
  await watching;
  t.same(seen, [SERVING, NOT_SERVING], 'Watch sends the current status, then the change');
});

t.test('close finishes promptly while a client holds an idle HTTP/2 session', async (t) => {
  const node = await startNode();
  const { capabilities } = grpcClients(node);
  await capabilities.getCapabilities({});
  // Also an open Watch stream: it must end (with NOT_SERVING), not hold the close up.
  const { health } = grpcClients(node);
  const statuses: number[] = [];
  const watching = (async () => {
    for await (const res of health.watch({ service: '' })) statuses.push(res.status);
  })();
  await sleep(100);

  const started = Date.now();
  await node.close();
  const ms = Date.now() - started;
  t.ok(ms < 1500, `close took ${ms} ms`);
  await watching.catch(() => undefined);
  t.same(statuses, [SERVING, NOT_SERVING], 'Watch saw NOT_SERVING before the stream ended');
  await expectCode(t, capabilities.getCapabilities({}, { timeoutMs: 2000 }), Code.Unavailable);
});

t.test('close lets an in-flight RPC finish', async (t) => {
  const cas = new FaultyStore(new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }));
  cas.mode = 'slow';
  cas.delayMs = 400;
  const node = await startNode({ trees: { cas, ac: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }) } });
  const client = grpcClients(node).cas;
  const d = digestOf(Buffer.from('in flight'));
  const call = client.findMissingBlobs({ blobDigests: [toProtoDigest(d)] });
  await sleep(100);
  const closed = node.close();
  const res = await call;
  t.equal(res.missingBlobDigests.length, 1, 'the RPC in flight at close() completed normally');
  await closed;
});

t.test('close cancels RPCs still running after the shutdown timeout', async (t) => {
  const cas = new FaultyStore(new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }));
  cas.mode = 'blackhole';
  const node = await startNode({
    trees: { cas, ac: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }) },
    shutdownTimeoutMs: 300,
  });
  const client = grpcClients(node).cas;
  const call = client.findMissingBlobs({ blobDigests: [toProtoDigest(digestOf(Buffer.from('never')))] });
  await sleep(100);
  const started = Date.now();
  const closed = node.close();
  await expectCode(t, call, Code.Unavailable, /shutting down/);
  await closed;
  const ms = Date.now() - started;
  t.ok(ms < 3000, `close took ${ms} ms`);
});

t.test('node src/main.ts serves, logs its address, and exits 0 on SIGTERM with a client still connected', async (t) => {
  const node = await spawnNode();
  t.teardown(() => node.stop());
  const transport = createGrpcTransport({ baseUrl: node.url });
  const caps = await createClient(Capabilities, transport).getCapabilities({});
  t.same(caps.cacheCapabilities?.digestFunctions, [DigestFunction_Value.SHA256]);
  t.ok(
    node.logs().some((l) => /serving REAPI on 127\.0\.0\.1:\d+/.test(l)),
    'logs the address it listens on',
  );
  // The client's HTTP/2 session stays open (idle) while the node shuts down.
  const started = Date.now();
  const exit = await node.kill('SIGTERM');
  t.same(exit, { code: 0, signal: null });
  t.ok(Date.now() - started < 5000, `exited in ${Date.now() - started} ms`);
  t.ok(node.logs().some((l) => l.includes('"msg":"stopped"')), 'logs a clean stop');
});

t.test('responses are never gzip-compressed, even for clients that accept gzip', async (t) => {
  const node = await startNode();
  t.teardown(node.close);
  const data = Buffer.alloc(64 * 1024, 'a'); // highly compressible, well over any threshold
  const d = toProtoDigest(digestOf(data));
  const { cas } = grpcClients(node);
  await cas.batchUpdateBlobs({ requests: [{ digest: d, data }] });

  const session = http2.connect(node.url);
  t.teardown(() => session.close());
  const req = session.request({
    ':method': 'POST',
    ':path': `/google.bytestream.ByteStream/Read`,
    'content-type': 'application/grpc',
    te: 'trailers',
    'grpc-accept-encoding': 'gzip',
  });
  const body = toBinary(ReadRequestSchema, create(ReadRequestSchema, { resourceName: `blobs/${d.hash}/${d.sizeBytes}` }));
  const frame = Buffer.alloc(5 + body.length);
  frame.writeUInt32BE(body.length, 1);
  frame.set(body, 5);
  req.end(frame);
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const wire = Buffer.concat(chunks);
  // gRPC marks compression per message: the first byte of each frame.
  const flags: number[] = [];
  for (let off = 0; off + 5 <= wire.length; off += 5 + wire.readUInt32BE(off + 1)) flags.push(wire[off]!);
  t.ok(flags.length > 0, `${flags.length} response messages`);
  t.same(new Set(flags), new Set([0]), 'every response message is sent uncompressed');
  t.ok(wire.length > data.length, `the ${data.length} bytes came back uncompressed (${wire.length} bytes on the wire)`);
});
