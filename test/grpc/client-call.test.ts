// GrpcClientCall (src/grpc/client-call.ts), the raw HTTP/2 gRPC client call
// the shard client uses, against small node:http2 servers written here to
// misbehave in each way a shard or a proxy can: the behaviour under test is
// the client's (exact codes and messages, no lost bytes).
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import type { Test } from 'tap';
import { GrpcClientCall } from '../../src/grpc/client-call.ts';

const MiB = 1024 * 1024;

type Handler = (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void;

/** A node:http2 server whose every stream goes to `handler`; closed at the end of the test. */
async function server(t: Test, handler: Handler): Promise<{ url: string; sessions: Set<http2.ServerHttp2Session> }> {
  const srv = http2.createServer();
  const sessions = new Set<http2.ServerHttp2Session>();
  srv.on('session', (s) => {
    sessions.add(s);
    s.on('close', () => sessions.delete(s));
    s.on('error', () => {});
  });
  srv.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    handler(stream, headers);
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  t.teardown(async () => {
    for (const s of sessions) s.destroy();
    await new Promise((r) => srv.close(r));
  });
  return { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`, sessions };
}

/** A client call on a fresh connection (closed at the end of the test). */
function call(
  t: Test,
  url: string,
  opts?: { readResponseData?: boolean; windowBytes?: number; maxMessageBytes?: number },
): { call: GrpcClientCall; stream: http2.ClientHttp2Stream; session: http2.ClientHttp2Session } {
  const window = opts?.windowBytes;
  const session = http2.connect(url, window === undefined ? {} : { settings: { initialWindowSize: window } });
  session.on('error', () => {});
  if (window !== undefined) session.on('connect', () => session.setLocalWindowSize(window * 2));
  t.teardown(() => session.destroy());
  const stream = session.request({
    ':method': 'POST',
    ':path': '/google.bytestream.ByteStream/Read',
    'content-type': 'application/grpc',
    te: 'trailers',
  });
  const c = new GrpcClientCall(stream, opts?.maxMessageBytes ?? 4 * MiB, { readResponseData: opts?.readResponseData ?? false });
  return { call: c, stream, session };
}

function frame(body: Uint8Array): Buffer {
  const out = Buffer.alloc(5 + body.byteLength);
  out.writeUInt32BE(body.byteLength, 1);
  out.set(body, 5);
  return out;
}

/** A ReadResponse with `data` (field 10), framed: tag, length varint, data. */
function readResponse(data: Buffer): Buffer {
  const len: number[] = [];
  let n = data.length;
  while (n >= 0x80) {
    len.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  len.push(n);
  return frame(Buffer.concat([Buffer.from([0x52, ...len]), data]));
}

const GRPC_HEADERS = { ':status': 200, 'content-type': 'application/grpc' };

/** Drains the call; returns the messages and how it ended. */
async function drain(c: GrpcClientCall): Promise<{ messages: Buffer[]; error: ConnectError | undefined }> {
  const messages: Buffer[] = [];
  try {
    for (;;) {
      const m = await c.next();
      if (m === undefined) return { messages, error: undefined };
      messages.push(Buffer.from(m));
    }
  } catch (err) {
    return { messages, error: err as ConnectError };
  }
}

function expectError(t: Test, err: unknown, code: Code, message: string | RegExp): void {
  if (err === undefined) {
    t.fail(`expected ${Code[code]}, the call succeeded`);
    return;
  }
  t.ok(err instanceof ConnectError, 'a ConnectError');
  const ce = ConnectError.from(err);
  t.equal(Code[ce.code], Code[code], `code ${Code[code]} (${ce.rawMessage})`);
  if (typeof message === 'string') t.equal(ce.rawMessage, message);
  else t.match(ce.rawMessage, message);
}

let seed = 7;
function bytes(n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  let x = (seed++ * 0x9e3779b1) >>> 0;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

t.test('a normal call: every message in order, then the end with status OK', async (t) => {
  const msgs = [Buffer.from('one'), Buffer.alloc(0), bytes(100_000), Buffer.from('last')];
  const { url } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    for (const m of msgs) stream.write(frame(m));
    stream.end();
  });
  const { call: c } = call(t, url);
  const { messages, error } = await drain(c);
  t.equal(error, undefined);
  t.same(messages.map((m) => m.toString('hex')), msgs.map((m) => m.toString('hex')));
  t.ok(c.statusReceived);
  t.notOk(c.trailersOnly);
  t.equal(await c.next(), undefined, 'next() after the end keeps answering the end');
});

t.test('a trailers-only error status: that code and the decoded grpc-message', async (t) => {
  const text = 'blob "abc/5" not found: 100% gone, ünïcödé ✓\nsecond line';
  // gRPC percent-encodes grpc-message (bytes outside printable ASCII, and '%').
  const encoded = Array.from(Buffer.from(text, 'utf8'), (b) =>
    b < 0x20 || b > 0x7e || b === 0x25 ? `%${b.toString(16).toUpperCase().padStart(2, '0')}` : String.fromCharCode(b),
  ).join('');
  const { url } = await server(t, (stream) => {
    stream.respond({ ...GRPC_HEADERS, 'grpc-status': String(Code.NotFound), 'grpc-message': encoded }, { endStream: true });
  });
  const { call: c } = call(t, url);
  const { messages, error } = await drain(c);
  t.same(messages, []);
  expectError(t, error, Code.NotFound, text);
  t.ok(c.trailersOnly, 'trailersOnly');
  t.ok(c.statusReceived, 'statusReceived');

  // A status in trailers after messages, just as well.
  const s2 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': String(Code.OutOfRange), 'grpc-message': 'read_offset 9 is past the end' }));
    stream.end(frame(Buffer.from('partial')));
  });
  const second = call(t, s2.url);
  const r2 = await drain(second.call);
  t.same(r2.messages.map(String), ['partial'], 'the message before the status is delivered');
  expectError(t, r2.error, Code.OutOfRange, 'read_offset 9 is past the end');
  t.notOk(second.call.trailersOnly);
});

t.test('an invalid grpc-status is INTERNAL', async (t) => {
  const { url } = await server(t, (stream) => {
    stream.respond({ ...GRPC_HEADERS, 'grpc-status': 'banana' }, { endStream: true });
  });
  expectError(t, (await drain(call(t, url).call)).error, Code.Internal, 'invalid grpc-status "banana"');
});

t.test('an HTTP error status maps to the gRPC code for it (503 -> UNAVAILABLE)', async (t) => {
  const cases: [number, Code][] = [
    [503, Code.Unavailable],
    [502, Code.Unavailable],
    [429, Code.Unavailable],
    [404, Code.Unimplemented],
    [401, Code.Unauthenticated],
    [500, Code.Unknown],
  ];
  for (const [status, code] of cases) {
    const { url } = await server(t, (stream) => {
      stream.respond({ ':status': status, 'content-type': 'text/plain' });
      stream.end('upstream unavailable');
    });
    const { error } = await drain(call(t, url).call);
    expectError(t, error, code, `HTTP status ${status} instead of a gRPC response`);
  }
});

t.test('a 200 that is not gRPC (content-type text/html) is INTERNAL', async (t) => {
  const { url } = await server(t, (stream) => {
    stream.respond({ ':status': 200, 'content-type': 'text/html; charset=utf-8' });
    stream.end('<html><body>a captive portal</body></html>');
  });
  const { messages, error } = await drain(call(t, url).call);
  t.same(messages, [], 'the HTML is not taken for messages');
  expectError(t, error, Code.Internal, 'response content-type "text/html; charset=utf-8" is not gRPC');

  const s2 = await server(t, (stream) => {
    stream.respond({ ':status': 200 });
    stream.end();
  });
  expectError(t, (await drain(call(t, s2.url).call)).error, Code.Internal, 'response content-type "" is not gRPC');
});

t.test('RST_STREAM mid-response is UNAVAILABLE', async (t) => {
  const { url } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.write(frame(Buffer.from('first')), () => {
      setTimeout(() => stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR), 20);
    });
  });
  const { call: c } = call(t, url);
  const first = await c.next();
  t.equal(first?.toString(), 'first', 'the message before the reset arrives');
  const { error } = await drain(c);
  // node reports the reset as a stream error (before 'close' could name the code).
  expectError(t, error, Code.Unavailable, /^(HTTP\/2 stream failed: Stream closed with error code NGHTTP2_INTERNAL_ERROR|HTTP\/2 stream reset by the server \(code 2\))$/);

  // ENHANCE_YOUR_CALM is the server shedding load: RESOURCE_EXHAUSTED.
  const s2 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.write(frame(Buffer.from('x')), () => setTimeout(() => stream.close(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM), 20));
  });
  expectError(t, (await drain(call(t, s2.url).call)).error, Code.ResourceExhausted, /NGHTTP2_ENHANCE_YOUR_CALM|reset by the server \(code 11\)/);

  // A reset with NO_ERROR before any status is the server ending without one
  // (gRPC maps RST_STREAM NO_ERROR to INTERNAL), not a failure of the connection.
  const s3 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.write(frame(Buffer.from('x')), () => setTimeout(() => stream.close(http2.constants.NGHTTP2_NO_ERROR), 20));
  });
  expectError(t, (await drain(call(t, s3.url).call)).error, Code.Internal, 'the response ended without a grpc-status');
});

t.test('a response that ends without grpc-status, or inside a message, is INTERNAL', async (t) => {
  const { url } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.end(frame(Buffer.from('complete message')));
  });
  const r = await drain(call(t, url).call);
  t.same(r.messages.map(String), ['complete message']);
  expectError(t, r.error, Code.Internal, 'the response ended without a grpc-status');

  const s2 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    // Trailers say OK, but the body stops 10 bytes into a 20-byte message.
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(frame(Buffer.alloc(20)).subarray(0, 15));
  });
  const r2 = await drain(call(t, s2.url).call);
  expectError(t, r2.error, Code.Internal, 'the response ended inside a message (10 bytes of it received)');

  const s3 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(Buffer.from([2, 0, 0, 0, 1, 0]));
  });
  expectError(t, (await drain(call(t, s3.url).call)).error, Code.Internal, 'gRPC message prefix has unknown flags 0x2');

  const s4 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(Buffer.from([1, 0, 0, 0, 1, 0]));
  });
  expectError(t, (await drain(call(t, s4.url).call)).error, Code.Internal, 'the server sent a compressed message though none was offered');

  const s5 = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(frame(Buffer.alloc(101)));
  });
  expectError(t, (await drain(call(t, s5.url, { maxMessageBytes: 100 }).call)).error, Code.ResourceExhausted, 'gRPC message of 101 bytes exceeds the limit of 100 bytes');
});

t.test('the connection killed mid-read is UNAVAILABLE', async (t) => {
  const { url, sessions } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.write(frame(Buffer.from('before the crash')));
  });
  const { call: c } = call(t, url);
  t.equal((await c.next())?.toString(), 'before the crash');
  for (const s of sessions) s.socket.destroy(); // the TCP connection drops, no GOAWAY, no RST_STREAM
  const { error } = await drain(c);
  expectError(t, error, Code.Unavailable, /^(the connection to the server was lost mid-call|HTTP\/2 stream failed: .*)$/);
});

t.test('the server process killed mid-read is UNAVAILABLE', async (t) => {
  // A separate process streaming ReadResponses for ever, SIGKILLed mid-read.
  const script = `
    const http2 = require('node:http2');
    const srv = http2.createServer();
    srv.on('stream', (stream) => {
      stream.on('error', () => {});
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' });
      const msg = Buffer.alloc(5 + 16384, 7);
      msg[0] = 0;
      msg.writeUInt32BE(16384, 1);
      const pump = () => { while (!stream.destroyed && stream.write(msg)); };
      stream.on('drain', pump);
      pump();
    });
    srv.listen(0, '127.0.0.1', () => console.log(srv.address().port));
  `;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const [line] = (await once(child.stdout, 'data')) as [Buffer];
  const { call: c } = call(t, `http://127.0.0.1:${Number(line.toString().trim())}`);
  let received = 0;
  for (let i = 0; i < 8; i++) received += (await c.next())!.length;
  t.equal(received, 8 * 16384, 'messages flowed');
  child.kill('SIGKILL');
  await once(child, 'exit');
  const started = Date.now();
  let error: unknown;
  try {
    for (;;) if ((await c.next()) === undefined) break;
  } catch (err) {
    error = err;
  }
  expectError(t, error, Code.Unavailable, /^(the connection to the server was lost mid-call|HTTP\/2 stream failed: .*)$/);
  t.ok(Date.now() - started < 2000, 'promptly');
});

/**
 * A server that sends `total` bytes of ReadResponses and its OK trailers at
 * once: with a window large enough, all of it (trailers included) reaches
 * the client while the consumer is not reading.
 */
async function eagerServer(t: Test, data: Buffer, messageBytes: number): Promise<{ url: string; trailersSent: Promise<void> }> {
  let sent!: () => void;
  const trailersSent = new Promise<void>((resolve) => (sent = resolve));
  const { url } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS, { waitForTrailers: true });
    stream.on('wantTrailers', () => {
      stream.sendTrailers({ 'grpc-status': '0' });
      sent();
    });
    for (let off = 0; off < data.length; off += messageBytes) stream.write(readResponse(data.subarray(off, off + messageBytes)));
    stream.end();
  });
  return { url, trailersSent };
}

t.test('trailers arriving while the consumer is paused lose no buffered data (whole messages)', async (t) => {
  const data = bytes(6 * MiB);
  const { url, trailersSent } = await eagerServer(t, data, 64 * 1024);
  const { call: c, stream } = call(t, url, { windowBytes: 16 * MiB });
  let trailersAt = -1;
  let consumed = 0;
  stream.on('trailers', () => (trailersAt = consumed));
  await trailersSent;
  await until(() => trailersAt !== -1);
  t.equal(trailersAt, 0, 'the trailers arrived before the consumer took anything');
  t.ok(stream.isPaused(), 'the call paused the stream: data waits in its buffer behind the trailers');
  // A slow consumer.
  const parts: Buffer[] = [];
  for (;;) {
    const m = await c.next();
    if (m === undefined) break;
    // Each message is a ReadResponse: 0x52, a 3-byte length, the data.
    parts.push(Buffer.from(m.subarray(4)));
    consumed += m.length;
    if (parts.length % 16 === 0) await sleep(1);
  }
  const got = Buffer.concat(parts);
  t.equal(got.length, data.length, 'every byte arrived');
  t.ok(got.equals(data), 'in order, unchanged');
  t.equal(await c.next(), undefined, 'status OK, after the last byte');
});

t.test('trailers arriving while the consumer is paused lose no buffered data (ReadResponse pieces)', async (t) => {
  const data = bytes(6 * MiB);
  const { url, trailersSent } = await eagerServer(t, data, 256 * 1024);
  const { call: c, stream } = call(t, url, { windowBytes: 16 * MiB, readResponseData: true });
  let trailers = false;
  stream.on('trailers', () => (trailers = true));
  await trailersSent;
  await until(() => trailers);
  const parts: Buffer[] = [];
  for (;;) {
    const m = await c.next();
    if (m === undefined) break;
    parts.push(Buffer.from(m));
    if (parts.length % 8 === 0) await sleep(1);
  }
  const got = Buffer.concat(parts);
  t.equal(got.length, data.length, 'every byte arrived');
  t.ok(got.equals(data), 'in order, unchanged');
});

t.test('cancel(): a pending next() fails with the reason and the server sees the stream reset', async (t) => {
  let serverClosed!: (rst: number) => void;
  const serverSaw = new Promise<number>((resolve) => (serverClosed = resolve));
  const { url } = await server(t, (stream) => {
    stream.respond(GRPC_HEADERS);
    stream.on('close', () => serverClosed(stream.rstCode));
  });
  const { call: c } = call(t, url);
  const pending = c.next();
  await sleep(30);
  c.cancel(new ConnectError('operation was cancelled', Code.Canceled));
  let error: unknown;
  try {
    await pending;
  } catch (err) {
    error = err;
  }
  expectError(t, error, Code.Canceled, 'operation was cancelled');
  t.equal(await serverSaw, http2.constants.NGHTTP2_CANCEL, 'the server saw RST_STREAM CANCEL');
  await t.rejects(c.next(), { code: Code.Canceled }, 'later next() calls fail the same way');
});

async function until(cond: () => boolean, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await sleep(5);
  }
}
