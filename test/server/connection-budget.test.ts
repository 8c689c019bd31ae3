// limits.maxConnectionBufferBytes: the bytes of partly received request
// messages one HTTP/2 connection may make the server hold, over all its
// streams and every gRPC path (the ByteStream fast path, the direct routes,
// Connect through fastify). The review's probe: 10 streams each holding
// 16 MiB of a declared 17 MiB message. Here: a message's announced length is
// charged while it is assembled, a message past the budget fails its own
// call with RESOURCE_EXHAUSTED, the other calls and connections carry on, and
// the budget comes back when calls complete or are cancelled.
import http2 from 'node:http2';
import { setTimeout as sleep } from 'node:timers/promises';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { Code } from '@connectrpc/connect';
import t from 'tap';
import {
  BatchUpdateBlobsRequestSchema,
  BatchUpdateBlobsResponseSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { FrameDecoder } from '../../src/grpc/framing.ts';
import { ConnectionBudget, EnvelopeWatcher } from '../../src/server/input-limits.ts';
import { writeResourceName } from '../../src/services/resource-name.ts';
import { blobOf, frame, messagesOf, startApp, until } from '../helpers/raw-grpc.ts';
import type { TestApp } from '../helpers/raw-grpc.ts';

/** Upload ids, unique per upload. */
let uploads = 0;

const KiB = 1024;
const MiB = 1024 * KiB;
const WRITE = '/google.bytestream.ByteStream/Write';
const BATCH_UPDATE = '/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs';
const BLOB = 900 * KiB;


/** A whole-blob Write message (resource name, finish_write, the data). */
function writeMessage(blob: Buffer): Buffer {
  const name = writeResourceName('', `b${++uploads}`, digestOf(blob));
  return frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: name, finishWrite: true, data: blob })));
}

function batchMessage(blob: Buffer): Buffer {
  return frame(toBinary(BatchUpdateBlobsRequestSchema, create(BatchUpdateBlobsRequestSchema, { requests: [{ digest: toProtoDigest(digestOf(blob)), data: blob }] })));
}

interface Call {
  readonly stream: http2.ClientHttp2Stream;
  /** Resolves with the gRPC status once the response ends. */
  readonly status: Promise<{ code: number; message: string; body: Buffer }>;
  /** Sends the rest of the message and ends the request. */
  finish(): void;
}

/** Starts a call and sends its message's first `sent` bytes only. */
function partialCall(session: http2.ClientHttp2Session, path: string, contentType: string, message: Buffer, sent = 100 * KiB): Call {
  const stream = session.request({ ':method': 'POST', ':path': path, 'content-type': contentType, te: 'trailers' });
  stream.on('error', () => {});
  const chunks: Buffer[] = [];
  let head: http2.IncomingHttpHeaders = {};
  let trailers: http2.IncomingHttpHeaders | undefined;
  stream.on('response', (h) => (head = h));
  stream.on('trailers', (h) => (trailers = h));
  stream.on('data', (c: Buffer) => chunks.push(c));
  const status = new Promise<{ code: number; message: string; body: Buffer }>((resolve) => {
    const done = () => {
      const s = trailers ?? head;
      resolve({ code: Number(s['grpc-status'] ?? -1), message: decodeURIComponent(String(s['grpc-message'] ?? '')), body: Buffer.concat(chunks) });
    };
    stream.on('end', done);
    stream.on('close', done);
  });
  stream.write(message.subarray(0, sent));
  return { stream, status, finish: () => void stream.end(message.subarray(sent)) };
}

/** True if `p` settles within `ms`. */
async function settles(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

function connect(app: TestApp): http2.ClientHttp2Session {
  const s = http2.connect(app.url);
  s.on('error', () => {});
  t.teardown(() => s.destroy());
  return s;
}

// 1 MiB messages, 2 MiB per connection: two 900 KiB messages fit at once, a third does not.
const limits = { maxMessageBytes: 1 * MiB, maxConnectionBufferBytes: 2 * MiB };

t.test('a message past the connection budget fails alone with RESOURCE_EXHAUSTED; the budget is shared by every gRPC path', async (t) => {
  const app = await startApp(t, { limits, maxBatchTotalSizeBytes: 1 * MiB - 64 * KiB });
  const session = connect(app);
  const blobs = [blobOf(BLOB), blobOf(BLOB), blobOf(BLOB)];
  const fast = partialCall(session, WRITE, 'application/grpc', writeMessage(blobs[0]!));
  const direct = partialCall(session, BATCH_UPDATE, 'application/grpc', batchMessage(blobs[1]!));
  await sleep(200);
  t.notOk(await settles(fast.status, 100), 'the fast-path Write waits for the rest of its message');
  t.notOk(await settles(direct.status, 100), 'so does the BatchUpdateBlobs on the direct route');

  // The third, on the same connection (here through fastify, Connect streaming over HTTP/2).
  const connectCall = partialCall(session, WRITE, 'application/connect+proto', writeMessage(blobs[2]!));
  const third = await connectCall.status;
  t.equal(third.code, -1, 'Connect answers in its own end-of-stream message, not in trailers');
  const endOfStream = messagesOf(third.body).map((m) => JSON.parse(m.toString()) as { error?: { code: string; message: string } }).at(-1);
  // Charged: the announced lengths of the two messages held (the 5-byte prefixes are not).
  const held = writeMessage(blobs[0]!).length - 5 + (batchMessage(blobs[1]!).length - 5);
  const writeSize = writeMessage(blobs[2]!).length - 5;
  t.same(endOfStream?.error, {
    code: 'resource_exhausted',
    message:
      `this connection already holds ${held} bytes of partly received request messages; ` +
      `a further message of ${writeSize} bytes would pass limits.maxConnectionBufferBytes (${2 * MiB} bytes)`,
  });
  // And a gRPC one on the fast path, the same.
  const fourth = await partialCall(session, WRITE, 'application/grpc', writeMessage(blobOf(BLOB))).status;
  t.equal(fourth.code, Code.ResourceExhausted, `a fast-path Write too (${fourth.message})`);
  t.match(fourth.message, /limits\.maxConnectionBufferBytes \(2097152 bytes\)$/);

  // Another connection has its own budget.
  const other = connect(app);
  const elsewhere = partialCall(other, WRITE, 'application/grpc', writeMessage(blobOf(BLOB)));
  t.notOk(await settles(elsewhere.status, 200), 'a message on another connection is taken');
  elsewhere.finish();
  t.equal((await elsewhere.status).code, 0, 'and served');

  // The two held calls complete normally.
  fast.finish();
  direct.finish();
  t.equal((await fast.status).code, 0, 'the fast-path Write completes');
  const batch = await direct.status;
  t.equal(batch.code, 0, 'the BatchUpdateBlobs completes');
  t.equal(fromBinary(BatchUpdateBlobsResponseSchema, messagesOf(batch.body)[0]!).responses[0]?.status?.code, 0);
  t.same(await app.memory.findMissing(blobs.slice(0, 2).map((b) => digestOf(b))), [], 'both blobs stored');

  // Their budget is back: two more fit on the first connection.
  const again = [partialCall(session, WRITE, 'application/grpc', writeMessage(blobOf(BLOB))), partialCall(session, BATCH_UPDATE, 'application/grpc', batchMessage(blobOf(BLOB)))];
  t.notOk(await settles(Promise.race(again.map((c) => c.status)), 200), 'the budget was released when the calls completed');
  for (const c of again) c.finish();
  t.same((await Promise.all(again.map((c) => c.status))).map((s) => s.code), [0, 0]);
  t.match(app.rpcLines('Write').filter((l) => l.code === 'ResourceExhausted'), [{}, {}], 'the refused calls were logged');
});

t.test('cancelled and failed calls give their budget back', async (t) => {
  const app = await startApp(t, { limits, maxBatchTotalSizeBytes: 1 * MiB - 64 * KiB });
  const session = connect(app);
  for (let round = 0; round < 5; round++) {
    const held = [partialCall(session, WRITE, 'application/grpc', writeMessage(blobOf(BLOB))), partialCall(session, BATCH_UPDATE, 'application/grpc', batchMessage(blobOf(BLOB)))];
    t.notOk(await settles(Promise.race(held.map((c) => c.status)), 150), `round ${round}: two partial messages are held`);
    if (round % 2 === 0) {
      for (const c of held) c.stream.close(http2.constants.NGHTTP2_CANCEL);
    } else {
      // Ended inside the message: a client error (after the reset grace).
      for (const c of held) c.stream.end();
    }
    await Promise.all(held.map((c) => c.status));
  }
  await until('the calls to end', async () => (await app.metric('reapi_edge_rpc_in_flight', {})) === 0);
  const last = [partialCall(session, WRITE, 'application/grpc', writeMessage(blobOf(BLOB))), partialCall(session, WRITE, 'application/grpc', writeMessage(blobOf(BLOB)))];
  t.notOk(await settles(Promise.race(last.map((c) => c.status)), 200), 'after 5 rounds the whole budget is still there');
  for (const c of last) c.finish();
  t.same((await Promise.all(last.map((c) => c.status))).map((s) => s.code), [0, 0]);
});

t.test('FrameDecoder and EnvelopeWatcher charge only messages assembled from several chunks', (t) => {
  const budget = new ConnectionBudget(1000);
  const decoder = new FrameDecoder(800, { budget, limitName: 'limits.maxMessageBytes' });
  const frames: number[] = [];
  const msg = frame(Buffer.alloc(600, 1));
  decoder.push(msg, (f) => frames.push(f.data.length));
  t.equal(budget.used, 0, 'a message whole in one chunk is a view and costs nothing');
  decoder.push(msg.subarray(0, 100), (f) => frames.push(f.data.length));
  t.equal(budget.used, 600, 'a partial message is charged its announced length');
  t.throws(() => new FrameDecoder(800, { budget }).push(msg.subarray(0, 100), () => {}), { code: Code.ResourceExhausted }, 'a second one does not fit');
  decoder.push(msg.subarray(100), (f) => frames.push(f.data.length));
  t.equal(budget.used, 0, 'released when complete');
  t.same(frames, [600, 600]);
  decoder.push(msg.subarray(0, 50), () => {});
  decoder.dispose();
  t.equal(budget.used, 0, 'released on dispose');
  t.throws(() => decoder.push(frame(Buffer.alloc(801)), () => {}), { code: Code.ResourceExhausted, message: /request message of 801 bytes is larger than limits\.maxMessageBytes \(800 bytes\)/ });

  const watcher = new EnvelopeWatcher(800, 'limits.maxMessageBytes', budget);
  watcher.push(msg);
  t.equal(budget.used, 0);
  watcher.push(msg.subarray(0, 3));
  t.equal(budget.used, 0, 'not yet: the prefix is incomplete');
  watcher.push(msg.subarray(3, 10));
  t.equal(budget.used, 600, 'charged once the prefix is complete');
  for (let i = 10; i < msg.length; i += 7) watcher.push(msg.subarray(i, Math.min(i + 7, msg.length)));
  t.equal(budget.used, 0, 'released at its last byte');
  t.ok(watcher.idle);
  watcher.push(msg.subarray(0, 10));
  t.notOk(watcher.idle);
  watcher.release();
  t.equal(budget.used, 0);
  t.end();
});
