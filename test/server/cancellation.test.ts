// A client that cancels (RST_STREAM CANCEL, or closes its connection) is no
// server failure: every such RPC is logged once at debug, without a stack,
// and counted as CANCELLED, on every path (the ByteStream fast path, the
// direct gRPC routes, Connect and gRPC-web through fastify, HTTP/1.1). The
// issue's probe was 2,000 cancelled streams giving 3,999 error lines and
// INTERNAL in the metrics; here a few hundred per path, with several clients:
// node:http2 (which ends a stream before it resets it), python3-grpcio
// (C-core, which resets without ending), and plain sockets.
import { execFile, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { create, toBinary } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';
import { createConnectTransport } from '@connectrpc/connect-node';
import t from 'tap';
import { FindMissingBlobsRequestSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { readResourceName, writeResourceName } from '../../src/services/resource-name.ts';
import { blobOf, frame, startApp, until } from '../helpers/raw-grpc.ts';
import type { TestApp } from '../helpers/raw-grpc.ts';

const WRITE = '/google.bytestream.ByteStream/Write';
const FIND_MISSING = '/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs';
const N = 100;
/** Upload ids, unique per upload. */
let uploads = 0;


/** The first message of an upload of a fresh 100 KB blob: half its data, no finish_write. */
function firstWriteMessage(): Buffer {
  const blob = blobOf(100_000);
  const name = writeResourceName('', `c${++uploads}`, digestOf(blob));
  return frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: name, data: blob.subarray(0, 50_000) })));
}

/** A FindMissingBlobs request cut after 10 bytes: the call waits for the rest. */
function partialFindMissing(): Buffer {
  const req = create(FindMissingBlobsRequestSchema, { blobDigests: [toProtoDigest(digestOf(blobOf(10)))] });
  return frame(toBinary(FindMissingBlobsRequestSchema, req)).subarray(0, 10);
}

interface Opened {
  readonly session: http2.ClientHttp2Session;
  readonly streams: http2.ClientHttp2Stream[];
}

/** Opens `n` calls on a new session, each sent `body` and left open. */
async function openCalls(app: TestApp, path: string, contentType: string, body: () => Buffer, n = N): Promise<Opened> {
  const session = http2.connect(app.url);
  session.on('error', () => {});
  const streams: http2.ClientHttp2Stream[] = [];
  for (let i = 0; i < n; i++) {
    const s = session.request({ ':method': 'POST', ':path': path, 'content-type': contentType, te: 'trailers' });
    s.on('error', () => {});
    s.write(body());
    streams.push(s);
  }
  return { session, streams };
}

/** What the app logged and counted for `method` since `mark` (a line count), once `n` lines are in. */
async function outcome(app: TestApp, method: string, mark: number, n: number) {
  await until(`${n} ${method} lines`, () => app.rpcLines(method).length - mark >= n, 10_000);
  await sleep(100); // nothing more should come
  const lines = app.rpcLines(method).slice(mark);
  return {
    lines,
    codes: [...new Set(lines.map((l) => l.code))],
    levels: [...new Set(lines.map((l) => l.level))],
    withError: lines.filter((l) => l.err !== undefined).length,
  };
}

function loudLines(app: TestApp, since: number): Record<string, unknown>[] {
  return app.lines.slice(since).filter((l) => Number(l.level) >= 40);
}

const consoleErrors: unknown[][] = [];
const realConsoleError = console.error;
t.before(() => {
  // connect-fastify reports failed handlers with console.error: none may happen.
  console.error = (...args: unknown[]) => void consoleErrors.push(args);
});
t.teardown(() => {
  console.error = realConsoleError;
});

const paths: ReadonlyArray<{ what: string; path: string; contentType: string; method: string; body: () => Buffer; unary: boolean }> = [
  { what: 'ByteStream Write on the fast path', path: WRITE, contentType: 'application/grpc', method: 'Write', body: firstWriteMessage, unary: false },
  { what: 'a unary call on the direct route, mid-request', path: FIND_MISSING, contentType: 'application/grpc', method: 'FindMissingBlobs', body: partialFindMissing, unary: true },
  { what: 'ByteStream Write over Connect (fastify)', path: WRITE, contentType: 'application/connect+proto', method: 'Write', body: firstWriteMessage, unary: false },
  { what: 'ByteStream Write over gRPC-web (fastify)', path: WRITE, contentType: 'application/grpc-web+proto', method: 'Write', body: firstWriteMessage, unary: false },
];

for (const how of ['RST_STREAM CANCEL', 'connection closed'] as const) {
  for (const p of paths) {
    t.test(`${how}: ${p.what}: ${N} calls logged once each at debug, counted CANCELLED`, async (t) => {
      const app = await startApp(t);
      const mark = app.rpcLines(p.method).length;
      const linesMark = app.lines.length;
      const opened = await openCalls(app, p.path, p.contentType, p.body);
      if (!p.unary) await until('every call in flight', async () => (await app.metric('reapi_edge_rpc_in_flight', { method: p.method })) === N);
      else await sleep(200);
      if (how === 'RST_STREAM CANCEL') for (const s of opened.streams) s.close(http2.constants.NGHTTP2_CANCEL);
      else opened.session.destroy();
      const o = await outcome(app, p.method, mark, N);
      t.equal(o.lines.length, N, 'one line per call');
      t.same(o.codes, ['Canceled'], 'every one CANCELLED');
      t.same(o.levels, [20], 'at debug');
      t.equal(o.withError, 0, 'without an error object (no stack)');
      t.same(loudLines(app, linesMark), [], 'no line at warn or error');
      t.equal(await app.metric('reapi_edge_rpc_requests_total', { method: p.method, code: 'CANCELLED' }), N, `${N} CANCELLED in metrics`);
      t.equal(await app.metric('reapi_edge_rpc_requests_total', { method: p.method, code: 'INTERNAL' }), 0, 'none INTERNAL');
      t.equal(await app.metric('reapi_edge_rpc_in_flight', { method: p.method }), 0, 'none left in flight');
      t.same(consoleErrors, [], 'nothing on console.error');
      opened.session.destroy();
    });
  }
}

t.test('a Read cancelled mid-response (Connect over HTTP/2, through fastify) is CANCELLED', async (t) => {
  const app = await startApp(t);
  const blob = blobOf(8 << 20);
  const d = digestOf(blob);
  await app.memory.put(d, (async function* () {
    yield blob;
  })());
  const linesMark = app.lines.length;
  const client = createClient(ByteStream, createConnectTransport({ baseUrl: app.url, httpVersion: '2' }));
  const ac = new AbortController();
  let received = 0;
  try {
    for await (const r of client.read({ resourceName: readResourceName('', d) }, { signal: ac.signal })) {
      received += r.data.byteLength;
      if (received >= 512 * 1024) ac.abort();
    }
  } catch {
    // the client's own cancellation
  }
  const o = await outcome(app, 'Read', 0, 1);
  t.same(o.codes, ['Canceled']);
  t.same(o.levels, [20]);
  t.same(loudLines(app, linesMark), []);
  t.equal(await app.metric('reapi_edge_rpc_requests_total', { method: 'Read', code: 'CANCELLED' }), 1);
  // Left as it is: connect-fastify itself prints a response write that
  // failed on the reset stream ("write ECANCELED") with console.error, out
  // of the server's reach. gRPC reads (Bazel's) take the fast path instead.
  consoleErrors.length = 0;
});

t.test('HTTP/1.1: a Connect/JSON client that disconnects mid-body is CANCELLED', async (t) => {
  const app = await startApp(t);
  const linesMark = app.lines.length;
  const port = Number(new URL(app.url).port);
  const sockets: net.Socket[] = [];
  for (let i = 0; i < 20; i++) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    await once(s, 'connect');
    s.write(`POST ${FIND_MISSING} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"blobDigests":[`);
    sockets.push(s);
  }
  await sleep(200);
  for (const s of sockets) s.destroy();
  const o = await outcome(app, 'FindMissingBlobs', 0, 20);
  t.same(o.codes, ['Canceled']);
  t.same(o.levels, [20]);
  t.same(loudLines(app, linesMark), []);
  t.equal(await app.metric('reapi_edge_rpc_requests_total', { method: 'FindMissingBlobs', code: 'CANCELLED' }), 20);
  t.same(consoleErrors, []);
});

const python = '/usr/bin/python3';
const missingGrpcio =
  !existsSync(python) ? `${python} not found` : spawnSync(python, ['-c', 'import grpc']).status !== 0 ? 'python3-grpcio not installed' : undefined;

// C-core cancels with RST_STREAM alone (no END_STREAM first), as grpc-java
// (Bazel) does: Write streams that send one message each, then cancel.
const GRPCIO_SCRIPT = `
import grpc, sys, threading, time
target, n, first = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.stdin.read())
ch = grpc.insecure_channel(target)
write = ch.stream_unary('${WRITE}')
stop = threading.Event()
def requests():
    yield first
    stop.wait()
calls = [write.future(requests()) for _ in range(n)]
time.sleep(1.0)
for c in calls:
    c.cancel()
stop.set()
print(sum(1 for c in calls if c.cancelled()))
`;

t.test('python grpcio (C-core) cancelling Write streams: CANCELLED, at debug', { skip: missingGrpcio !== undefined && process.env.CI !== 'true' ? missingGrpcio : false }, async (t) => {
  if (missingGrpcio !== undefined) {
    t.fail(`${missingGrpcio}, but CI=true requires this test`);
    return;
  }
  const app = await startApp(t);
  const linesMark = app.lines.length;
  const n = 50;
  // One message for every call (they upload the same blob, which is never completed).
  const first = firstWriteMessage().subarray(5).toString('hex');
  const child = execFile(python, ['-c', GRPCIO_SCRIPT, app.url.replace('http://', ''), String(n)], { timeout: 60_000 });
  let stdout = '';
  child.stdout?.on('data', (c: Buffer) => (stdout += String(c)));
  child.stdin?.end(first);
  const [exit] = (await once(child, 'close')) as [number | null];
  t.equal(exit, 0, 'the python client ran');
  t.equal(Number(stdout.trim()), n, `${n} calls cancelled by the client`);
  const o = await outcome(app, 'Write', 0, n);
  t.same(o.codes, ['Canceled']);
  t.same(o.levels, [20]);
  t.equal(o.withError, 0);
  t.same(loudLines(app, linesMark), []);
  t.equal(await app.metric('reapi_edge_rpc_requests_total', { method: 'Write', code: 'CANCELLED' }), n);
});
