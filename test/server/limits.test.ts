// Limits on every input (config "limits"), against a listening app with real
// clients: connect-node (gRPC, gRPC-web, Connect), node:http2 framing by
// hand, plain HTTP/1.1 for Connect/JSON, and python3-grpcio (C-core) when
// installed. Each limit gets its exact code and message, and the server
// keeps serving after each.
import { execFile, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import http from 'node:http';
import { constants as zlibConstants, createZstdCompress } from 'node:zlib';
import { create, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import type { Transport } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from '@connectrpc/connect-node';
import t from 'tap';
import type { Test } from 'tap';
import {
  ContentAddressableStorage,
  FindMissingBlobsRequestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { digestOf, digestString, toProtoDigest } from '../../src/digest.ts';
import type { Digest } from '../../src/digest.ts';
import { writeResourceName } from '../../src/services/resource-name.ts';
import { blobOf, frame, prefix, rawCall, sendAll, startApp } from '../helpers/raw-grpc.ts';
import type { RawResult, TestApp } from '../helpers/raw-grpc.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const FIND_MISSING = '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs';
const WRITE = '/google.bytestream.ByteStream/Write';

// Small limits, so that the tests send little; the defaults are in config.ts
// (DEFAULT_LIMITS) and the README's table.
const limits = {
  maxMessageBytes: 256 * KiB,
  maxJsonBodyBytes: 512 * KiB,
  maxFindMissingDigests: 100,
  maxBatchBlobs: 10,
  maxBlobSizeBytes: 1 * MiB,
};


/** digests() calls so far, so that each call names digests of its own. */
let digestCalls = 0;
function digests(n: number): ReturnType<typeof toProtoDigest>[] {
  const call = ++digestCalls;
  return Array.from({ length: n }, (_, i) => toProtoDigest(digestOf(Buffer.from(`digest ${i} ${call}`))));
}

function expectStatus(t: Test, res: RawResult, code: Code, message: string | RegExp): void {
  t.equal(Code[res.code] ?? `status ${res.code}`, Code[code], `grpc-status ${Code[code]} (${res.message})`);
  if (typeof message === 'string') t.equal(res.message, message, 'grpc-message');
  else t.match(res.message, message, 'grpc-message');
}

async function expectConnectError(t: Test, p: Promise<unknown>, code: Code, message: string | RegExp, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: expected ${Code[code]}`);
  } catch (err) {
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], Code[code], `${what}: ${Code[code]} (${ce.rawMessage})`);
    if (typeof message === 'string') t.equal(ce.rawMessage, message, `${what}: message`);
    else t.match(ce.rawMessage, message, `${what}: message`);
  }
}

/** The app still answers a small FindMissingBlobs on `transport` (and so on its connection). */
async function stillServes(t: Test, transport: Transport, what: string): Promise<void> {
  const res = await createClient(ContentAddressableStorage, transport).findMissingBlobs({ blobDigests: digests(3) });
  t.equal(res.missingBlobDigests.length, 3, `${what}: the next call is served`);
}

/** POSTs `body` as Connect/JSON over HTTP/1.1; chunked (no Content-Length) when asked. */
async function postJson(url: string, path: string, body: string, chunked = false): Promise<{ status: number; json: Record<string, unknown> }> {
  const req = http.request(`${url}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(chunked ? {} : { 'content-length': String(Buffer.byteLength(body)) }) },
    agent: false,
  });
  const response = new Promise<http.IncomingMessage>((resolve, reject) => {
    req.on('response', resolve);
    req.on('error', reject);
  });
  if (chunked) {
    for (let i = 0; i < body.length; i += 64 * KiB) req.write(body.slice(i, i + 64 * KiB));
    req.end();
  } else {
    req.end(body);
  }
  const res = await response;
  let text = '';
  for await (const c of res) text += String(c);
  return { status: res.statusCode ?? 0, json: JSON.parse(text) as Record<string, unknown> };
}

function findMissingJson(n: number, padding = 0): string {
  const list = digests(n).map((d) => ({ hash: d.hash, sizeBytes: String(d.sizeBytes) }));
  return `{"blobDigests":${JSON.stringify(list)}${' '.repeat(padding)}}`;
}

let app: TestApp;
t.before(async () => {
  app = await startApp(t, { limits });
});

t.test('a gRPC message over limits.maxMessageBytes is RESOURCE_EXHAUSTED on every route, naming the limit', async (t) => {
  const tooBig = limits.maxMessageBytes + 1;
  const want = `request message of ${tooBig} bytes is larger than limits.maxMessageBytes (${limits.maxMessageBytes} bytes)`;

  // Only the prefix is sent, and the request left open: the answer must not wait for the body.
  const direct = await rawCall(app.session, FIND_MISSING, (s) => void s.write(prefix(tooBig)));
  expectStatus(t, direct, Code.ResourceExhausted, want);
  const fast = await rawCall(app.session, WRITE, (s) => void s.write(prefix(tooBig)));
  expectStatus(t, fast, Code.ResourceExhausted, want);

  // Real clients, whole messages: 4,000 digests are ~290 KB of protobuf.
  const big = { blobDigests: digests(4000) };
  t.ok(toBinary(FindMissingBlobsRequestSchema, create(FindMissingBlobsRequestSchema, big)).byteLength > limits.maxMessageBytes);
  const transports: Record<string, Transport> = {
    'gRPC over HTTP/2 (the direct route)': createGrpcTransport({ baseUrl: app.url }),
    'gRPC-web over HTTP/1.1 (fastify)': createGrpcWebTransport({ baseUrl: app.url, httpVersion: '1.1' }),
    'Connect binary over HTTP/1.1 (fastify)': createConnectTransport({ baseUrl: app.url, httpVersion: '1.1' }),
    'Connect binary over HTTP/2 (fastify)': createConnectTransport({ baseUrl: app.url, httpVersion: '2' }),
  };
  for (const [what, transport] of Object.entries(transports)) {
    const client = createClient(ContentAddressableStorage, transport);
    await expectConnectError(t, client.findMissingBlobs(big), Code.ResourceExhausted, /^request (message of \d+ bytes|body) is larger than limits\.maxMessageBytes \(262144 bytes\)$/, what);
    await stillServes(t, transport, what);
  }
  t.match(app.rpcLines('FindMissingBlobs').at(-2), { code: 'ResourceExhausted' }, 'logged');
});

t.test('Connect/JSON bodies are held to limits.maxJsonBodyBytes, not to the binary message limit', async (t) => {
  // Between the two limits: fine as JSON.
  const mid = findMissingJson(3, 400 * KiB);
  t.ok(mid.length > limits.maxMessageBytes && mid.length < limits.maxJsonBodyBytes);
  for (const chunked of [false, true]) {
    const ok = await postJson(app.url, FIND_MISSING, mid, chunked);
    t.equal(ok.status, 200, `a ${mid.length}-byte JSON body is served (${chunked ? 'chunked' : 'Content-Length'})`);
    t.equal((ok.json.missingBlobDigests as unknown[]).length, 3);
  }
  const over = findMissingJson(3, limits.maxJsonBodyBytes);
  const withLength = await postJson(app.url, FIND_MISSING, over);
  t.equal(withLength.status, 429, 'HTTP 429, as Connect maps RESOURCE_EXHAUSTED');
  t.same(withLength.json, {
    code: 'resource_exhausted',
    message: `request message of ${over.length} bytes is larger than limits.maxJsonBodyBytes (${limits.maxJsonBodyBytes} bytes)`,
  });
  const chunked = await postJson(app.url, FIND_MISSING, over, true);
  t.equal(chunked.status, 429);
  t.same(chunked.json, { code: 'resource_exhausted', message: `request body is larger than limits.maxJsonBodyBytes (${limits.maxJsonBodyBytes} bytes)` });
  const again = await postJson(app.url, FIND_MISSING, findMissingJson(2));
  t.equal(again.status, 200, 'the next JSON call is served');
});

t.test('more digests than limits.maxFindMissingDigests / maxBatchBlobs is INVALID_ARGUMENT naming count and limit', async (t) => {
  const transport = createGrpcTransport({ baseUrl: app.url });
  const client = createClient(ContentAddressableStorage, transport);
  const atLimit = await client.findMissingBlobs({ blobDigests: digests(limits.maxFindMissingDigests) });
  t.equal(atLimit.missingBlobDigests.length, limits.maxFindMissingDigests, 'exactly the limit is served');
  await expectConnectError(
    t,
    client.findMissingBlobs({ blobDigests: digests(limits.maxFindMissingDigests + 1) }),
    Code.InvalidArgument,
    'FindMissingBlobs: blob_digests has 101 entries, more than limits.maxFindMissingDigests (100) allows in one request; split it into several requests',
    'FindMissingBlobs',
  );
  const findsBefore = app.cas.calls.findMissing;
  await expectConnectError(
    t,
    client.batchReadBlobs({ digests: digests(limits.maxBatchBlobs + 1) }),
    Code.InvalidArgument,
    'BatchReadBlobs: digests has 11 entries, more than limits.maxBatchBlobs (10) allows in one request; split it into several requests',
    'BatchReadBlobs',
  );
  const blobs = Array.from({ length: limits.maxBatchBlobs + 1 }, () => blobOf(10));
  const putsBefore = app.cas.calls.put;
  await expectConnectError(
    t,
    client.batchUpdateBlobs({ requests: blobs.map((data) => ({ digest: toProtoDigest(digestOf(data)), data })) }),
    Code.InvalidArgument,
    'BatchUpdateBlobs: requests has 11 entries, more than limits.maxBatchBlobs (10) allows in one request; split it into several requests',
    'BatchUpdateBlobs',
  );
  t.equal(app.cas.calls.put, putsBefore, 'no blob of the rejected batch was stored');
  t.equal(app.cas.calls.findMissing, findsBefore, 'nor looked up');
  const ten = await client.batchUpdateBlobs({ requests: blobs.slice(0, 10).map((data) => ({ digest: toProtoDigest(digestOf(data)), data })) });
  t.same(ten.responses.map((r) => r.status?.code), blobs.slice(0, 10).map(() => 0), 'a batch of exactly the limit is stored');
});

t.test('a blob over limits.maxBlobSizeBytes is INVALID_ARGUMENT before any byte is stored', async (t) => {
  const size = limits.maxBlobSizeBytes + 1;
  const d: Digest = { hash: digestOf(Buffer.from('large')).hash, size };
  const name = writeResourceName('', 'big', d);
  const want = `Write "${name}": the blob is ${size} bytes, larger than limits.maxBlobSizeBytes (${limits.maxBlobSizeBytes} bytes) on this server`;
  const putsBefore = app.cas.calls.put;
  const findsBefore = app.cas.calls.findMissing;
  // Fast path: the first message only, the stream left open: answered at once.
  const first = frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: name, data: Buffer.alloc(1000) })));
  const res = await rawCall(app.session, WRITE, (s) => void s.write(first));
  expectStatus(t, res, Code.InvalidArgument, want);
  // Connect (binary, HTTP/2), through fastify and the Connect ByteStream service.
  const bs = createClient(ByteStream, createConnectTransport({ baseUrl: app.url, httpVersion: '2' }));
  await expectConnectError(
    t,
    bs.write(
      (async function* () {
        yield { resourceName: name, data: Buffer.alloc(1000) };
      })(),
    ),
    Code.InvalidArgument,
    want,
    'Connect Write',
  );
  t.equal(app.cas.calls.put, putsBefore, 'the store was never asked to write');
  t.equal(app.cas.calls.findMissing, findsBefore, 'nor to look the blob up');

  // In a batch: that blob fails, the others are stored.
  const small = blobOf(100);
  const batch = await createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: app.url })).batchUpdateBlobs({
    requests: [
      { digest: toProtoDigest(d), data: Buffer.alloc(10) },
      { digest: toProtoDigest(digestOf(small)), data: small },
    ],
  });
  t.equal(batch.responses[0]?.status?.code, Code.InvalidArgument);
  t.equal(
    batch.responses[0]?.status?.message,
    `requests[0]: blob ${digestString(d)} is larger than limits.maxBlobSizeBytes (${limits.maxBlobSizeBytes} bytes) on this server`,
  );
  t.equal(batch.responses[1]?.status?.code, 0, 'the other blob is stored');
});

/** zstd frames of `data` made by node's streaming compressor (no pledged size, so the frame keeps the window it asks for). */
async function zstdFrame(data: Buffer, windowLog: number): Promise<Buffer> {
  const z = createZstdCompress({
    params: { [zlibConstants.ZSTD_c_windowLog]: windowLog, [zlibConstants.ZSTD_c_enableLongDistanceMatching]: 1 },
  });
  const out: Buffer[] = [];
  z.on('data', (c: Buffer) => out.push(c));
  const ended = new Promise((resolve) => z.on('end', resolve));
  z.end(data);
  await ended;
  return Buffer.concat(out);
}

/** The same with the zstd command line tool (`zstd --long=N` reading stdin), if installed. */
async function zstdCli(data: Buffer, windowLog: number): Promise<Buffer | undefined> {
  if (!existsSync('/usr/bin/zstd')) return undefined;
  const r = spawnSync('/usr/bin/zstd', ['-q', '-c', `--long=${windowLog}`], { input: data, maxBuffer: 64 * MiB });
  return r.status === 0 ? r.stdout : undefined;
}

t.test('a zstd upload whose window passes limits.maxZstdWindowLog is INVALID_ARGUMENT at once, without the memory', async (t) => {
  const data = blobOf(4096);
  const d = digestOf(data);
  const frames: Record<string, Buffer> = { 'node zlib, windowLog 27': await zstdFrame(data, 27) };
  const cli = await zstdCli(data, 27);
  if (cli !== undefined) frames['zstd --long=27'] = cli;
  for (const [what, compressed] of Object.entries(frames)) {
    t.ok(compressed.length < 4200, `${what}: a ${compressed.length}-byte upload`);
    const name = writeResourceName('', 'z', d, 'zstd');
    const message = frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: name, finishWrite: true, data: compressed })));
    const rssBefore = process.memoryUsage().rss;
    const started = performance.now();
    const res = await rawCall(app.session, WRITE, sendAll([message]));
    const ms = performance.now() - started;
    const grew = (process.memoryUsage().rss - rssBefore) / MiB;
    expectStatus(
      t,
      res,
      Code.InvalidArgument,
      `Write "${name}": the uploaded zstd frame needs a window larger than 2^23 bytes (limits.maxZstdWindowLog 23); ` +
        'compress with a window of at most 2^23 bytes (e.g. zstd --long=23 or less)',
    );
    t.ok(ms < 1000, `${what}: answered in ${ms.toFixed(1)} ms`);
    t.ok(grew < 32, `${what}: RSS grew ${grew.toFixed(1)} MiB (a 2^27 window is 128 MiB)`);
    t.same(await app.memory.findMissing([d]), [d], `${what}: nothing stored`);
  }
  // A window within the limit is fine.
  const okName = writeResourceName('', 'z2', d, 'zstd');
  const okMessage = frame(
    toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: okName, finishWrite: true, data: await zstdFrame(data, 23) })),
  );
  const ok = await rawCall(app.session, WRITE, sendAll([okMessage]));
  t.equal(ok.code, 0, `a 2^23 window is accepted (${ok.message})`);
  t.same(await app.memory.findMissing([d]), [], 'and stored');
});

const python = '/usr/bin/python3';
const missingGrpcio =
  !existsSync(python) ? `${python} not found` : spawnSync(python, ['-c', 'import grpc']).status !== 0 ? 'python3-grpcio not installed' : undefined;

// The C-core client sends the request as Bazel's would; stubs are not
// needed, the request bytes are built here and sent as they are.
const GRPCIO_SCRIPT = `
import grpc, json, sys
requests = json.load(sys.stdin)
ch = grpc.insecure_channel(sys.argv[1])
fm = ch.unary_unary('${FIND_MISSING}')
out = {}
for name in ('big', 'many', 'small'):
    req = bytes.fromhex(requests[name])
    try:
        fm(req, timeout=10)
        out[name] = {'code': 'OK'}
    except grpc.RpcError as e:
        out[name] = {'code': e.code().name, 'message': e.details()}
print(json.dumps(out))
`;

t.test('python grpcio (C-core) sees the same codes and messages', { skip: missingGrpcio !== undefined && process.env.CI !== 'true' ? missingGrpcio : false }, async (t) => {
  if (missingGrpcio !== undefined) {
    t.fail(`${missingGrpcio}, but CI=true requires this test`);
    return;
  }
  const hex = (n: number) => Buffer.from(toBinary(FindMissingBlobsRequestSchema, create(FindMissingBlobsRequestSchema, { blobDigests: digests(n) }))).toString('hex');
  const target = app.url.replace('http://', '');
  const child = execFile(python, ['-c', GRPCIO_SCRIPT, target], { maxBuffer: 16 * MiB, timeout: 60_000 });
  let stdout = '';
  child.stdout?.on('data', (c: Buffer) => (stdout += String(c)));
  child.stdin?.end(JSON.stringify({ big: hex(4000), many: hex(101), small: hex(3) }));
  const [exit] = (await once(child, 'close')) as [number | null];
  t.equal(exit, 0, 'the python client ran');
  const out = JSON.parse(stdout) as Record<string, { code: string; message?: string }>;
  t.match(out.big, { code: 'RESOURCE_EXHAUSTED', message: /^request message of \d+ bytes is larger than limits\.maxMessageBytes \(262144 bytes\)$/ });
  t.same(out.many, {
    code: 'INVALID_ARGUMENT',
    message: 'FindMissingBlobs: blob_digests has 101 entries, more than limits.maxFindMissingDigests (100) allows in one request; split it into several requests',
  });
  t.same(out.small, { code: 'OK' }, 'and the next call on the same channel is served');
});
