// The ByteStream Read/Write fast path (src/server/bytestream-fast-path.ts),
// against a real listening app, spoken to with a raw node:http2 client that
// frames application/grpc by hand: what it serves, each error it answers
// (exact gRPC code and message), and that the server keeps serving after.
import { once } from 'node:events';
import http2 from 'node:http2';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { gzipSync } from 'node:zlib';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Test } from 'tap';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import {
  ByteStream,
  ReadRequestSchema,
  ReadResponseSchema,
  WriteRequestSchema,
  WriteResponseSchema,
} from '../../gen/google/bytestream/bytestream_pb.ts';
import { createMetricsRegistry, metricsInterceptor } from '../../src/admin/metrics.ts';
import { DEFAULT_LIMITS } from '../../src/config.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import type { Digest } from '../../src/digest.ts';
import { buildApp } from '../../src/server/app.ts';
import { readResourceName, writeResourceName } from '../../src/services/resource-name.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';

const MiB = 1024 * 1024;
const READ_PATH = '/google.bytestream.ByteStream/Read';
const WRITE_PATH = '/google.bytestream.ByteStream/Write';
// buildApp's message limit: limits.maxMessageBytes, here the default.
const MAX_MESSAGE_BYTES = DEFAULT_LIMITS.maxMessageBytes;

// ---- one app for the whole file, with a log we can read and the metrics interceptor ----

const lines: Record<string, unknown>[] = [];
const sink = new Writable({
  write(chunk: Buffer, _enc, done) {
    for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
    done();
  },
});
const logger = pino({ level: 'debug' }, sink);
const registry = createMetricsRegistry({ defaultMetrics: false });
const cas = new MemoryStore({ maxSizeBytes: 512 * MiB, contentAddressed: true });
// The app's CAS, which a test can make hang (blackhole) to hold a call inside the store.
const faulty = new FaultyStore(cas);
const app = await buildApp({
  deps: {
    cas: faulty,
    ac: new MemoryStore({ maxSizeBytes: 16 * MiB, contentAddressed: false }),
    logger,
    maxBatchTotalSizeBytes: 4 * MiB,
    isReady: () => true,
  },
  logger,
  shutdownTimeoutMs: 1000,
  interceptors: [metricsInterceptor(registry)],
});
await app.listen({ host: '127.0.0.1', port: 0 });
const address = app.server.address();
const url = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
const session = http2.connect(url);
t.teardown(async () => {
  session.close();
  await app.close();
});

// ---- helpers ----

let seed = 1;
/** Deterministic, incompressible-looking bytes, distinct per call. */
function blobOf(size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  let x = (seed++ * 0x9e3779b1) >>> 0;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function frame(body: Uint8Array, compressed = false): Buffer {
  const out = Buffer.alloc(5 + body.byteLength);
  out[0] = compressed ? 1 : 0;
  out.writeUInt32BE(body.byteLength, 1);
  out.set(body, 5);
  return out;
}

function writeRequest(fields: { resourceName?: string; writeOffset?: bigint; finishWrite?: boolean; data?: Uint8Array }): Buffer {
  return frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, fields)));
}

function readRequest(resourceName: string, readOffset = 0n, readLimit = 0n): Buffer {
  return frame(toBinary(ReadRequestSchema, create(ReadRequestSchema, { resourceName, readOffset, readLimit })));
}

/** A whole upload as framed WriteRequests of `chunk` bytes. */
function upload(name: string, blob: Buffer, chunk = 64 * 1024): Buffer[] {
  const out: Buffer[] = [];
  for (let off = 0; off < blob.length || off === 0; off += chunk) {
    const end = Math.min(blob.length, off + chunk);
    out.push(
      writeRequest({
        resourceName: off === 0 ? name : '',
        writeOffset: BigInt(off),
        finishWrite: end === blob.length,
        data: blob.subarray(off, end),
      }),
    );
    if (end === blob.length) break;
  }
  return out;
}

/** Splits a gRPC response body into its messages (the test's own parser, independent of src/grpc). */
function messagesOf(body: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  while (pos < body.length) {
    if (body[pos] !== 0) throw new Error(`response message flagged ${body[pos]}`);
    const len = body.readUInt32BE(pos + 1);
    out.push(body.subarray(pos + 5, pos + 5 + len));
    pos += 5 + len;
  }
  if (pos !== body.length) throw new Error('response ends inside a message');
  return out;
}

interface RawResult {
  readonly httpStatus: number;
  readonly contentType: string | undefined;
  readonly trailersOnly: boolean;
  readonly code: number;
  readonly message: string;
  readonly body: Buffer;
}

/**
 * One gRPC call on `sess`: `drive` writes the request (and may end it);
 * resolves once the stream closes, with the status from the trailers (or
 * the headers, for a trailers-only answer).
 */
function rawCall(
  path: string,
  drive: (stream: http2.ClientHttp2Stream) => void | Promise<void>,
  headers: Record<string, string> = {},
  sess: http2.ClientHttp2Session = session,
): Promise<RawResult> {
  const stream = sess.request({
    ':method': 'POST',
    ':path': path,
    'content-type': 'application/grpc',
    te: 'trailers',
    ...headers,
  });
  return new Promise((resolve, reject) => {
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders | undefined;
    const chunks: Buffer[] = [];
    stream.on('response', (h) => (head = h));
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('trailers', (h) => (trailers = h));
    stream.on('error', () => {}); // the outcome is judged from what arrived
    let done = false;
    // The call is over at the end of the response (as for any gRPC client),
    // even if the request side is still open; or when the stream closes.
    const finish = () => {
      if (done) return;
      done = true;
      if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      const status = trailers ?? head;
      resolve({
        httpStatus: Number(head[':status']),
        contentType: head['content-type'],
        trailersOnly: trailers === undefined && head['grpc-status'] !== undefined,
        code: status['grpc-status'] === undefined ? -1 : Number(status['grpc-status']),
        message: decodeURIComponent(String(status['grpc-message'] ?? '')),
        body: Buffer.concat(chunks),
      });
    };
    stream.on('end', finish);
    stream.on('close', finish);
    Promise.resolve(drive(stream)).catch(reject);
  });
}

function sendAll(messages: readonly Buffer[], end = true): (s: http2.ClientHttp2Stream) => Promise<void> {
  return async (s) => {
    for (const m of messages) if (!s.write(m)) await new Promise((r) => s.once('drain', r));
    if (end) s.end();
  };
}

function expectStatus(t: Test, res: RawResult, code: Code, message: string | RegExp): void {
  t.equal(res.httpStatus, 200, 'HTTP 200, as gRPC answers errors');
  t.equal(Code[res.code] ?? `status ${res.code}`, Code[code], `grpc-status ${Code[code]} (${res.message})`);
  if (typeof message === 'string') t.equal(res.message, message, 'grpc-message');
  else t.match(res.message, message, 'grpc-message');
}

/** A Write of `blob` through the fast path; returns the committed_size. */
async function fastWrite(t: Test, blob: Buffer, sess = session): Promise<bigint> {
  const name = writeResourceName('', `u${seed}`, digestOf(blob));
  const res = await rawCall(WRITE_PATH, sendAll(upload(name, blob)), {}, sess);
  t.equal(res.code, 0, `Write OK (${res.message})`);
  const msgs = messagesOf(res.body);
  t.equal(msgs.length, 1, 'one WriteResponse');
  return fromBinary(WriteResponseSchema, msgs[0] ?? new Uint8Array()).committedSize;
}

/** A Read through the fast path; the bytes and the status. */
async function fastRead(digest: Digest, sess = session): Promise<{ res: RawResult; data: Buffer; messages: number }> {
  const res = await rawCall(READ_PATH, sendAll([readRequest(readResourceName('', digest))]), {}, sess);
  const msgs = res.code === 0 ? messagesOf(res.body) : [];
  return { res, data: Buffer.concat(msgs.map((m) => fromBinary(ReadResponseSchema, m).data)), messages: msgs.length };
}

async function* chunksOf(blob: Buffer): AsyncGenerator<Uint8Array> {
  yield blob;
}

const KNOWN = blobOf(300_000);
const KNOWN_DIGEST = digestOf(KNOWN);
await cas.put(KNOWN_DIGEST, chunksOf(KNOWN));

/** The server still answers on the shared connection (and a new one): a fast-path Read of a stored blob. */
async function stillServes(t: Test): Promise<void> {
  t.notOk(session.destroyed || session.closed, 'the connection is still open');
  const { res, data } = await fastRead(KNOWN_DIGEST);
  t.equal(res.code, 0, 'a Read on the same connection succeeds');
  t.ok(data.equals(KNOWN), 'with every byte');
  const fresh = http2.connect(url);
  try {
    const again = await fastRead(KNOWN_DIGEST, fresh);
    t.ok(again.res.code === 0 && again.data.equals(KNOWN), 'a Read on a new connection succeeds');
  } finally {
    fresh.close();
  }
}

async function metric(name: string, labels: Record<string, string>): Promise<number> {
  const m = registry.getSingleMetric(name);
  if (m === undefined) return 0;
  const { values } = await m.get();
  let sum = 0;
  for (const v of values) {
    if (Object.entries(labels).every(([k, want]) => String((v.labels as Record<string, unknown>)[k]) === want)) sum += v.value;
  }
  return sum;
}

const rpcLines = (method: string) => lines.filter((l) => l.rpc === `google.bytestream.ByteStream/${method}`);

/** True if `p` settles within `ms`; the timer never outlives the wait. */
async function within(ms: number, p: Promise<unknown>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([p.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

// ---- the fast path serves gRPC Read and Write ----

t.test('gRPC Write and Read over HTTP/2 are served by the fast path, through the interceptors', async (t) => {
  const blob = blobOf(1_000_000);
  const d = digestOf(blob);
  const labels = { service: 'google.bytestream.ByteStream', method: 'Write', code: 'OK' };
  const writesBefore = await metric('reapi_edge_rpc_requests_total', labels);
  const receivedBefore = await metric('reapi_edge_rpc_received_bytes_total', { method: 'Write' });
  const linesBefore = rpcLines('Write').length;

  t.equal(await fastWrite(t, blob), BigInt(blob.length), 'committed_size is the blob size');
  t.same(await cas.findMissing([d]), [], 'the blob is stored');

  // Observable proof that the fast path (not Connect) served it: its calls
  // carry request ids "bs-N" in the per-RPC log line; Connect's do not.
  const writeLine = rpcLines('Write').slice(linesBefore);
  t.equal(writeLine.length, 1, 'one log line for the Write');
  t.match(writeLine[0], { code: 'ok', reqId: /^bs-\d+$/ }, 'logged by the fast path');
  t.equal(await metric('reapi_edge_rpc_requests_total', labels), writesBefore + 1, 'the metrics interceptor counted it');
  t.equal(
    await metric('reapi_edge_rpc_received_bytes_total', { method: 'Write' }),
    receivedBefore + blob.length,
    'and the blob bytes received',
  );

  const sentBefore = await metric('reapi_edge_rpc_sent_bytes_total', { method: 'Read' });
  const readLinesBefore = rpcLines('Read').length;
  const { res, data, messages } = await fastRead(d);
  t.equal(res.code, 0);
  t.equal(res.contentType, 'application/grpc');
  t.notOk(res.trailersOnly, 'status in trailers after the data');
  t.ok(data.equals(blob), 'Read returns every byte');
  t.ok(messages >= 4, `in ReadResponses of at most 256 KiB (${messages})`);
  t.match(rpcLines('Read').slice(readLinesBefore), [{ code: 'ok', reqId: /^bs-\d+$/ }], 'the Read was the fast path too');
  t.equal(await metric('reapi_edge_rpc_sent_bytes_total', { method: 'Read' }), sentBefore + blob.length);

  // Offset and limit go through the shared core.
  const part = await rawCall(READ_PATH, sendAll([readRequest(readResourceName('', d), 1000n, 5000n)]));
  t.equal(part.code, 0);
  t.ok(Buffer.concat(messagesOf(part.body).map((m) => fromBinary(ReadResponseSchema, m).data)).equals(blob.subarray(1000, 6000)));
});

// ---- each error, then the server keeps serving ----

t.test('a malformed grpc-timeout is INVALID_ARGUMENT', async (t) => {
  for (const value of ['1x', '123456789S', '-1S', 'S', '10 S']) {
    const res = await rawCall(READ_PATH, sendAll([readRequest(readResourceName('', KNOWN_DIGEST))]), { 'grpc-timeout': value });
    expectStatus(t, res, Code.InvalidArgument, `grpc-timeout header "${value}" is malformed`);
    t.ok(res.trailersOnly, 'a trailers-only answer');
  }
  // A well-formed one is fine.
  const ok = await rawCall(READ_PATH, sendAll([readRequest(readResourceName('', KNOWN_DIGEST))]), { 'grpc-timeout': '10S' });
  t.equal(ok.code, 0);
  await stillServes(t);
});

t.test('an expired deadline on a stalled upload is DEADLINE_EXCEEDED, and nothing is stored', async (t) => {
  const blob = blobOf(200_000);
  const d = digestOf(blob);
  const [first] = upload(writeResourceName('', 'stall', d), blob, 100_000);
  const started = Date.now();
  // The first message, then nothing: the client stalls with its side open.
  const res = await rawCall(WRITE_PATH, (s) => void s.write(first), { 'grpc-timeout': '300m' });
  const took = Date.now() - started;
  expectStatus(t, res, Code.DeadlineExceeded, /the deadline of 300m expired$/);
  t.ok(took >= 280 && took < 2500, `answered when the deadline expired (${took} ms)`);
  t.same(await cas.findMissing([d]), [d], 'the partial upload is not stored');
  t.match(rpcLines('Write').at(-1), { code: 'DeadlineExceeded', reqId: /^bs-/ });
  await stillServes(t);
});

t.test('an unknown grpc-encoding is UNIMPLEMENTED', async (t) => {
  const blob = blobOf(1000);
  const res = await rawCall(WRITE_PATH, sendAll(upload(writeResourceName('', 'br', digestOf(blob)), blob)), { 'grpc-encoding': 'br' });
  expectStatus(t, res, Code.Unimplemented, 'grpc-encoding "br" is not supported (use identity, gzip or deflate)');
  t.same(await cas.findMissing([digestOf(blob)]), [digestOf(blob)], 'nothing stored');
  await stillServes(t);
});

t.test('a gzip-compressed WriteRequest (grpc-encoding gzip, flag 1) is accepted and stored', async (t) => {
  const blob = Buffer.alloc(500_000, 'compressible '); // compressible, so gzip matters
  const d = digestOf(blob);
  const plain = writeRequest({ resourceName: writeResourceName('', 'gz', d), finishWrite: true, data: blob }).subarray(5);
  const compressed = frame(gzipSync(plain), true);
  t.ok(compressed.length < plain.length / 10, 'the message really is compressed');
  const res = await rawCall(WRITE_PATH, sendAll([compressed]), { 'grpc-encoding': 'gzip' });
  t.equal(res.code, 0, `OK (${res.message})`);
  t.equal(fromBinary(WriteResponseSchema, messagesOf(res.body)[0]!).committedSize, BigInt(blob.length));
  const { data } = await fastRead(d);
  t.ok(data.equals(blob), 'stored and read back intact');

  // A message flagged compressed without a grpc-encoding cannot be read.
  const other = blobOf(100);
  const flagged = frame(gzipSync(writeRequest({ resourceName: writeResourceName('', 'gz2', digestOf(other)), finishWrite: true, data: other }).subarray(5)), true);
  const bad = await rawCall(WRITE_PATH, sendAll([flagged]));
  expectStatus(t, bad, Code.Internal, 'a message is flagged compressed but the request names no grpc-encoding');
  await stillServes(t);
});

t.test('a request that ends inside a message is INVALID_ARGUMENT', async (t) => {
  const blob = blobOf(1000);
  const [whole] = upload(writeResourceName('', 'cut', digestOf(blob)), blob);
  // The prefix and 3 bytes of the message body, then END_STREAM.
  const res = await rawCall(WRITE_PATH, (s) => void s.end(whole!.subarray(0, 8)));
  expectStatus(t, res, Code.InvalidArgument, 'the request ended inside a message (3 bytes of it received)');
  // Inside the prefix.
  const res2 = await rawCall(READ_PATH, (s) => void s.end(Buffer.from([0, 0])));
  expectStatus(t, res2, Code.InvalidArgument, 'the request ended inside a message (2 bytes of it received)');
  await stillServes(t);
});

t.test('garbage protobuf is INVALID_ARGUMENT naming google.bytestream.WriteRequest', async (t) => {
  const garbage = frame(Buffer.from([0x0a, 0x7f, 0x61, 0x62]));
  const res = await rawCall(WRITE_PATH, sendAll([garbage]));
  expectStatus(t, res, Code.InvalidArgument, 'request is not a valid google.bytestream.WriteRequest message: truncated length-delimited field');
  const res2 = await rawCall(READ_PATH, sendAll([frame(Buffer.from([0xff]))]));
  expectStatus(t, res2, Code.InvalidArgument, 'request is not a valid google.bytestream.ReadRequest message: truncated varint');
  await stillServes(t);
});

t.test('a message over the size limit is RESOURCE_EXHAUSTED, before its bytes arrive', async (t) => {
  const prefix = Buffer.alloc(5);
  prefix.writeUInt32BE(MAX_MESSAGE_BYTES + 1, 1);
  // Only the prefix is sent, and the request is left open: the answer must not wait for the body.
  const res = await rawCall(WRITE_PATH, (s) => void s.write(prefix));
  expectStatus(
    t,
    res,
    Code.ResourceExhausted,
    `request message of ${MAX_MESSAGE_BYTES + 1} bytes is larger than limits.maxMessageBytes (${MAX_MESSAGE_BYTES} bytes)`,
  );
  await stillServes(t);
});

t.test('Read with zero or two ReadRequests is INVALID_ARGUMENT', async (t) => {
  const none = await rawCall(READ_PATH, sendAll([]));
  expectStatus(t, none, Code.InvalidArgument, 'Read: the request carried no ReadRequest');
  const r = readRequest(readResourceName('', KNOWN_DIGEST));
  const two = await rawCall(READ_PATH, sendAll([r, r]));
  expectStatus(t, two, Code.InvalidArgument, 'Read: the request carried more than one ReadRequest');
  t.equal(two.body.length, 0, 'no data was sent');
  await stillServes(t);
});

t.test('a bad resource name and a missing blob keep their precise errors', async (t) => {
  const missing = digestOf(Buffer.from('never stored'));
  const res = await rawCall(READ_PATH, sendAll([readRequest(readResourceName('', missing))]));
  expectStatus(t, res, Code.NotFound, new RegExp(missing.hash));
  const bad = await rawCall(READ_PATH, sendAll([readRequest(`../blobs/${missing.hash}/${missing.size}`)]));
  expectStatus(t, bad, Code.InvalidArgument, /"\.\."/);
  await stillServes(t);
});

t.test('a client that cancels (RST_STREAM) mid-read releases the call', async (t) => {
  const blob = blobOf(24 * MiB);
  const d = digestOf(blob);
  await cas.put(d, chunksOf(blob));
  const inFlight = () => metric('reapi_edge_rpc_in_flight', { method: 'Read' });
  const cancelledBefore = await metric('reapi_edge_rpc_requests_total', { method: 'Read', code: 'CANCELLED' });
  const stream = session.request({ ':method': 'POST', ':path': READ_PATH, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => {});
  stream.end(readRequest(readResourceName('', d)));
  let received = 0;
  await new Promise<void>((resolve) => {
    stream.on('data', (c: Buffer) => {
      received += c.length;
      if (received >= 256 * 1024) {
        stream.pause(); // stop reading: the server is held by flow control now
        resolve();
      }
    });
  });
  t.equal(await inFlight(), 1, 'the Read is in flight');
  stream.close(http2.constants.NGHTTP2_CANCEL);
  await until('the Read to be released', async () => (await inFlight()) === 0);
  t.pass('the call was released');
  t.equal(await metric('reapi_edge_rpc_requests_total', { method: 'Read', code: 'CANCELLED' }), cancelledBefore + 1, 'counted as CANCELLED');
  await until('the log line', () => rpcLines('Read').at(-1)?.code === 'Canceled');
  t.ok(received < blob.length, 'the client never got the whole blob');
  await stillServes(t);
});

t.test('a client that cancels (RST_STREAM) while the store holds its Read releases the call', async (t) => {
  const inFlight = () => metric('reapi_edge_rpc_in_flight', { method: 'Read' });
  faulty.mode = 'blackhole'; // the Read waits inside cas.get until its signal aborts
  t.teardown(() => {
    faulty.mode = 'ok';
  });
  const abortedBefore = faulty.aborted;
  const stream = session.request({ ':method': 'POST', ':path': READ_PATH, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => {});
  stream.end(readRequest(readResourceName('', KNOWN_DIGEST)));
  await until('the Read to reach the store', async () => (await inFlight()) === 1 && faulty.calls.get > 0);
  stream.close(http2.constants.NGHTTP2_CANCEL);
  await until('the Read to be released', async () => (await inFlight()) === 0);
  t.equal(faulty.aborted, abortedBefore + 1, "the store call's signal was aborted");
  faulty.mode = 'ok';
  await stillServes(t);
});

t.test('a client that cancels (RST_STREAM) mid-upload releases the call, and nothing is stored', async (t) => {
  const blob = blobOf(300_000);
  const d = digestOf(blob);
  const inFlight = () => metric('reapi_edge_rpc_in_flight', { method: 'Write' });
  const cancelledBefore = await metric('reapi_edge_rpc_requests_total', { method: 'Write', code: 'CANCELLED' });
  const stream = session.request({ ':method': 'POST', ':path': WRITE_PATH, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => {});
  const [first] = upload(writeResourceName('', 'gone', d), blob, 100_000);
  stream.write(first);
  await until('the Write to start', async () => (await inFlight()) === 1);
  stream.close(http2.constants.NGHTTP2_CANCEL);
  await until('the Write to be released', async () => (await inFlight()) === 0);
  t.pass('the call was released');
  // Node's client ends the request (END_STREAM) before it resets it, so the
  // upload first looks like one that ended without finish_write; the core
  // waits RESET_GRACE_MS for the reset and reports the cancellation.
  t.equal(
    await metric('reapi_edge_rpc_requests_total', { method: 'Write', code: 'CANCELLED' }),
    cancelledBefore + 1,
    `counted as CANCELLED (logged: ${String(rpcLines('Write').at(-1)?.code)})`,
  );
  t.match(rpcLines('Write').at(-1), { code: 'Canceled', reqId: /^bs-/ }, 'logged as CANCELLED');
  t.notOk(rpcLines('Write').at(-1)?.err, 'without an error object (no stack)');
  t.same(await cas.findMissing([d]), [d], 'nothing stored');
  await stillServes(t);
});

t.test('early completion: an already-stored blob is answered at once, without reading the rest, and the client is not stalled', async (t) => {
  const name = writeResourceName('', 'again', KNOWN_DIGEST);
  const messages = upload(name, KNOWN, 16 * 1024);
  const stream = session.request({ ':method': 'POST', ':path': WRITE_PATH, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => {});
  const chunks: Buffer[] = [];
  let trailers: http2.IncomingHttpHeaders | undefined;
  stream.on('data', (c: Buffer) => chunks.push(c));
  stream.on('trailers', (h) => (trailers = h));
  const closed = new Promise<void>((resolve) => stream.on('close', resolve));
  // Only the first message; the client's side stays open.
  stream.write(messages[0]);
  await until('the answer', () => trailers !== undefined);
  t.equal(trailers!['grpc-status'], '0', 'status OK before the upload was sent');
  const resp = messagesOf(Buffer.concat(chunks));
  t.equal(resp.length, 1);
  t.equal(fromBinary(WriteResponseSchema, resp[0]!).committedSize, BigInt(KNOWN.length), 'committed_size is the blob size');

  // The client, unaware, sends the rest and much more than any window: it must not stall.
  const started = Date.now();
  const filler = writeRequest({ writeOffset: 0n, data: Buffer.alloc(64 * 1024) });
  let sent = 0;
  let stalled = false;
  // More than the stream's window (8 MiB) and the request queue (4 MiB) together.
  for (let i = 0; i < 512 && !stalled; i++) {
    if (stream.destroyed || stream.closed) break;
    sent += filler.length;
    if (!stream.write(filler)) stalled = !(await within(3000, Promise.race([once(stream, 'drain'), closed])));
  }
  t.notOk(stalled, `the client was not stalled (${sent} bytes sent after the answer)`);
  stream.end();
  t.ok(await within(3000, closed), 'the stream closed');
  t.ok(Date.now() - started < 3000, `the client finished in ${Date.now() - started} ms`);
  t.match(rpcLines('Write').at(-1), { code: 'ok', reqId: /^bs-/ });
  await stillServes(t);
});

t.test('a Write whose data does not match the digest stores nothing', async (t) => {
  const blob = blobOf(100_000);
  const claimed = digestOf(blobOf(100_000)); // same size, other content
  const res = await rawCall(WRITE_PATH, sendAll(upload(writeResourceName('', 'liar', claimed), blob)));
  expectStatus(t, res, Code.InvalidArgument, /content hashes to [0-9a-f]{64}, not to the digest's hash/);
  t.same(await cas.findMissing([claimed]), [claimed], 'the store does not have it');
  const client = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: url }));
  const missing = await client.findMissingBlobs({ blobDigests: [toProtoDigest(claimed), toProtoDigest(KNOWN_DIGEST)] });
  t.same(
    missing.missingBlobDigests.map((m) => m.hash),
    [claimed.hash],
    'FindMissingBlobs reports it missing (and the stored one present)',
  );
  await stillServes(t);
});

t.test('Connect (JSON, HTTP/1.1) and gRPC-web ByteStream calls still work, through Connect', async (t) => {
  const transports = {
    'Connect JSON over HTTP/1.1': createConnectTransport({ baseUrl: url, httpVersion: '1.1', useBinaryFormat: false }),
    'Connect binary over HTTP/2': createConnectTransport({ baseUrl: url, httpVersion: '2' }),
    'gRPC-web over HTTP/1.1': createGrpcWebTransport({ baseUrl: url, httpVersion: '1.1' }),
    'gRPC-web over HTTP/2': createGrpcWebTransport({ baseUrl: url, httpVersion: '2' }),
  };
  for (const [what, transport] of Object.entries(transports)) {
    const client = createClient(ByteStream, transport);
    const readLines = rpcLines('Read').length;
    const chunks: Uint8Array[] = [];
    for await (const r of client.read({ resourceName: readResourceName('', KNOWN_DIGEST) })) chunks.push(r.data);
    t.ok(Buffer.concat(chunks).equals(KNOWN), `${what}: Read returns every byte`);
    const line = rpcLines('Read').slice(readLines);
    t.equal(line.length, 1);
    t.notMatch(String(line[0]?.reqId), /^bs-/, `${what}: served by Connect, not the fast path`);

    const blob = blobOf(70_000);
    const d = digestOf(blob);
    const name = writeResourceName('', 'c', d);
    const writeLines = rpcLines('Write').length;
    try {
      const res = await client.write(
        (async function* () {
          yield { resourceName: name, writeOffset: 0n, data: blob.subarray(0, 40_000) };
          yield { writeOffset: 40_000n, finishWrite: true, data: blob.subarray(40_000) };
        })(),
      );
      t.equal(res.committedSize, BigInt(blob.length), `${what}: Write stores`);
      t.same(await cas.findMissing([d]), [], `${what}: the blob is stored`);
      t.notMatch(String(rpcLines('Write').slice(writeLines)[0]?.reqId), /^bs-/, `${what}: Write served by Connect`);
    } catch (err) {
      // Client streaming needs a transport that can stream a request body.
      t.fail(`${what}: Write failed: ${ConnectError.from(err).message}`);
    }
  }
  await stillServes(t);
});
