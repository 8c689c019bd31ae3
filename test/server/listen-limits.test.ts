// Connection limits and deadlines of the one-port server (issue 11): header,
// request and idle deadlines on HTTP/1.1 and HTTP/2, the protocol sniff and
// TLS handshake under one absolute deadline, SETTINGS_MAX_CONCURRENT_STREAMS,
// maxConnections. Each test runs createOnePortServer with a small handler and
// real clients speaking (or failing to speak) the protocols byte by byte.
import { once } from 'node:events';
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { Registry } from 'prom-client';
import t from 'tap';
import { registerConnectionMetrics } from '../../src/admin/metrics.ts';
import type { Test } from 'tap';
import { DEFAULT_LIMITS } from '../../src/config.ts';
import { createOnePortServer } from '../../src/server/listen.ts';
import type { ConnectionLimits, OnePortServer, RequestHandler } from '../../src/server/listen.ts';
import { TlsContext } from '../../src/server/tls.ts';
import { createPki, opensslMissing } from '../helpers/certs.ts';

const HTTP2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');

interface Served {
  readonly server: OnePortServer;
  readonly port: number;
  /** Requests the handler has seen. */
  readonly requests: { method: string; url: string; httpVersion: string }[];
}

/** A one-port server whose handler answers "ok" (after reading the body), or holds /hold/... until `release()`. */
async function serve(
  t: Test,
  limits: Partial<ConnectionLimits>,
  opts: { tls?: TlsContext; handler?: RequestHandler } = {},
): Promise<Served & { release(): void; held(): number }> {
  const requests: Served['requests'] = [];
  const waiting: (() => void)[] = [];
  let held = 0;
  let released = false;
  const handler: RequestHandler =
    opts.handler ??
    ((req, res) => {
      requests.push({ method: req.method ?? '', url: req.url ?? '', httpVersion: req.httpVersion });
      const answer = () => {
        (res as http.ServerResponse).writeHead(200, { 'content-type': 'text/plain' });
        res.end('ok');
      };
      req.resume();
      req.once('end', () => {
        if (!(req.url ?? '').startsWith('/hold') || released) return answer();
        held++;
        waiting.push(() => {
          held--;
          answer();
        });
      });
    });
  const server = createOnePortServer(handler, { limits: { ...DEFAULT_LIMITS, ...limits }, tls: opts.tls });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return {
    server,
    port: (server.address() as AddressInfo).port,
    requests,
    release() {
      released = true;
      for (const w of waiting.splice(0)) w();
    },
    held: () => held,
  };
}

/** Connects and resolves with the raw socket once connected. */
async function connect(port: number): Promise<net.Socket> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  await once(socket, 'connect');
  return socket;
}

/** Writes `bytes` one byte every `everyMs` until done or the socket closes; resolves with the bytes written. */
async function dribble(socket: net.Socket, bytes: Buffer, everyMs: number): Promise<number> {
  let i = 0;
  for (; i < bytes.length && !socket.destroyed && socket.writable; i++) {
    socket.write(bytes.subarray(i, i + 1));
    await sleep(everyMs);
  }
  return i;
}

/** Resolves with ms from `started` when the socket closes, and what it received. */
function closed(socket: net.Socket, started: number): Promise<{ ms: number; received: string }> {
  let received = '';
  socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
  return new Promise((resolve) => socket.once('close', () => resolve({ ms: performance.now() - started, received })));
}

t.test('HTTP/1.1: headers sent one byte per 200 ms are cut off at headersTimeoutMs after connecting', async (t) => {
  const { server, port, requests } = await serve(t, { headersTimeoutMs: 1000 });
  const started = performance.now();
  const socket = await connect(port);
  const done = closed(socket, started);
  const request = Buffer.from('POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-Slow: 0123456789012345678901234567890123456789\r\n\r\n');
  const sent = await dribble(socket, request, 200);
  const { ms } = await done;
  t.ok(ms >= 950 && ms < 1600, `closed ${Math.round(ms)} ms after connecting (headersTimeoutMs 1000)`);
  t.ok(sent < request.length, `only ${sent} of ${request.length} header bytes went out`);
  t.equal(requests.length, 0, 'the handler never saw the request');
  t.equal(server.connectionStats().headersTimeouts, 1, 'counted as a headers timeout');
});

t.test('HTTP/1.1: a keep-alive connection\'s later request with slow headers gets 408 in time; a slow body hits requestTimeoutMs', async (t) => {
  const { server, port, requests } = await serve(t, { headersTimeoutMs: 1000, requestTimeoutMs: 1500 });
  // First request in full, then the second one's headers dribbled.
  const socket = await connect(port);
  const first = Buffer.from('GET /one HTTP/1.1\r\nHost: a\r\n\r\n');
  socket.write(first);
  let received = '';
  socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
  while (!received.includes('ok')) await sleep(10);
  const started = performance.now();
  const done = closed(socket, started);
  await dribble(socket, Buffer.from('GET /two HTTP/1.1\r\nHost: a\r\nX-Slow: 01234567890123456789\r\n\r\n'), 200);
  const { ms } = await done;
  t.ok(ms >= 950 && ms < 2200, `second request cut off ${Math.round(ms)} ms after its first byte (headersTimeoutMs 1000)`);
  t.match(received, /HTTP\/1\.1 408 Request Timeout/, 'the client is told 408');
  t.same(requests.map((r) => r.url), ['/one']);

  // Headers at once, the body one byte per 200 ms: requestTimeoutMs bounds the whole request.
  const slowBody = await connect(port);
  const bodyStarted = performance.now();
  const bodyDone = closed(slowBody, bodyStarted);
  slowBody.write('POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n');
  await dribble(slowBody, Buffer.alloc(100, 0x61), 200);
  const body = await bodyDone;
  t.ok(body.ms >= 1400 && body.ms < 2700, `slow body cut off after ${Math.round(body.ms)} ms (requestTimeoutMs 1500)`);
  t.equal(server.connectionStats().requestTimeouts, 2, 'both counted as request timeouts');
});

t.test('HTTP/1.1: an idle keep-alive connection is closed after idleTimeoutMs', async (t) => {
  const { port } = await serve(t, { idleTimeoutMs: 1500 });
  // A raw client: node's own Agent would close the socket first, on the server's keep-alive hint.
  const socket = await connect(port);
  let received = '';
  socket.on('data', (d: Buffer) => (received += d.toString('latin1')));
  socket.write('GET / HTTP/1.1\r\nHost: a\r\n\r\n');
  while (!received.includes('ok')) await sleep(5);
  const started = performance.now();
  await once(socket, 'close');
  const ms = performance.now() - started;
  t.match(received, /keep-alive/i, 'the response kept the connection open');
  // The response advertises idleTimeoutMs (Keep-Alive: timeout=1); node closes
  // its side 1 s later (keepAliveTimeoutBuffer), so that a client acting on
  // the hint closes first and never sends into a closing connection.
  t.match(received, /Keep-Alive: timeout=1\r\n/i, 'the hint names idleTimeoutMs');
  t.ok(ms >= 1400 && ms < 3200, `idle keep-alive connection closed after ${Math.round(ms)} ms (idleTimeoutMs 1500, plus node's 1 s buffer)`);
});

t.test('the protocol sniff is an absolute deadline: an HTTP/2 preface sent one byte per 100 ms is cut off', async (t) => {
  const { server, port } = await serve(t, { headersTimeoutMs: 1000 });
  const started = performance.now();
  const socket = await connect(port);
  const done = closed(socket, started);
  // 24 bytes at 100 ms each would take 2.4 s; every byte used to reset the timer.
  const sent = await dribble(socket, HTTP2_PREFACE, 100);
  const { ms } = await done;
  t.ok(ms >= 950 && ms < 1600, `closed ${Math.round(ms)} ms after connecting`);
  t.ok(sent < HTTP2_PREFACE.length, `after ${sent} of 24 preface bytes`);
  t.equal(server.connectionStats().headersTimeouts, 1);
});

t.test('HTTP/2: a connection that sends the preface but never SETTINGS is closed at headersTimeoutMs', async (t) => {
  const { server, port } = await serve(t, { headersTimeoutMs: 800 });
  const started = performance.now();
  const socket = await connect(port);
  const done = closed(socket, started);
  socket.write(HTTP2_PREFACE);
  const { ms } = await done;
  t.ok(ms >= 750 && ms < 1400, `closed ${Math.round(ms)} ms after connecting (headersTimeoutMs 800)`);
  t.equal(server.connectionStats().headersTimeouts, 1);
  await sleep(50);
  t.same(server.connectionCounts(), { http1: 0, http2: 0, sniffing: 0 }, 'nothing left open');
});

t.test('HTTP/2: a session with no open stream for idleTimeoutMs gets GOAWAY; one with a stream in flight does not', async (t) => {
  const served = await serve(t, { idleTimeoutMs: 600 });
  const session = http2.connect(`http://127.0.0.1:${served.port}`);
  session.on('error', () => undefined);
  const goaway = new Promise<number>((resolve) => session.once('goaway', () => resolve(performance.now())));
  const request = async (path: string) => {
    const stream = session.request({ ':method': 'POST', ':path': path });
    stream.end();
    stream.setEncoding('utf8');
    let body = '';
    for await (const chunk of stream) body += chunk as string;
    return body;
  };
  t.equal(await request('/a'), 'ok');
  // A stream held open for 3x idleTimeoutMs keeps the session.
  const held = request('/hold/1');
  await sleep(1800);
  t.equal(served.held(), 1, 'the held stream is still open');
  t.notOk(session.closed || session.destroyed, 'no GOAWAY while a stream is open');
  const releasedAt = performance.now();
  served.release();
  t.equal(await held, 'ok');
  const at = await goaway;
  const ms = at - releasedAt;
  t.ok(ms >= 500 && ms < 1500, `GOAWAY ${Math.round(ms)} ms after the last stream ended (idleTimeoutMs 600)`);
  await once(session, 'close');
  t.equal(served.server.connectionStats().idleSessionsClosed, 1);
});

t.test('HTTP/2: SETTINGS_MAX_CONCURRENT_STREAMS bounds the streams the server takes at once', async (t) => {
  const served = await serve(t, { maxConcurrentStreams: 4 });
  const session = http2.connect(`http://127.0.0.1:${served.port}`);
  session.on('error', () => undefined);
  t.teardown(() => session.destroy());
  const settings = await new Promise<http2.Settings>((resolve) => session.once('remoteSettings', resolve));
  t.equal(settings.maxConcurrentStreams, 4, 'advertised in SETTINGS');
  const outcomes = Array.from({ length: 12 }, (_, i) => {
    const stream = session.request({ ':method': 'POST', ':path': `/hold/${i}` });
    stream.end();
    return new Promise<string>((resolve) => {
      let body = '';
      stream.setEncoding('utf8');
      stream.on('data', (d: string) => (body += d));
      stream.on('end', () => resolve(body));
      stream.on('error', (err: NodeJS.ErrnoException) => resolve(`error ${err.code}`));
    });
  });
  await sleep(500);
  t.equal(served.held(), 4, 'the server holds exactly 4 streams; the other 8 wait (client-side queue)');
  t.equal(served.requests.length, 4);
  served.release();
  const results = await Promise.all(outcomes);
  t.equal(results.filter((r) => r === 'ok').length, 12, 'all 12 complete as streams free up');
});

t.test('HTTP/2: streams opened before the client saw SETTINGS beyond the limit are refused (REFUSED_STREAM)', async (t) => {
  const served = await serve(t, { maxConcurrentStreams: 3 });
  // A client that assumes 100 streams until told otherwise, and opens 10 at once.
  const session = http2.connect(`http://127.0.0.1:${served.port}`, { peerMaxConcurrentStreams: 100 });
  session.on('error', () => undefined);
  t.teardown(() => session.destroy());
  const outcomes = Array.from({ length: 10 }, (_, i) => {
    const stream = session.request({ ':method': 'POST', ':path': `/hold/${i}` });
    stream.end();
    stream.on('error', () => undefined);
    return new Promise<string>((resolve) => {
      stream.on('close', () => resolve(stream.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM ? 'refused' : `closed ${stream.rstCode}`));
      stream.resume();
    });
  });
  await sleep(500);
  t.ok(served.held() <= 3, `the server took ${served.held()} streams at once (limit 3)`);
  served.release();
  const results = await Promise.all(outcomes);
  const refused = results.filter((r) => r === 'refused').length;
  t.equal(served.requests.length + refused, 10, `${served.requests.length} served, ${refused} refused with REFUSED_STREAM`);
  t.ok(served.requests.length < 10 || refused === 0, 'the server never took more than its limit in flight');
});

t.test('maxConnections: connections beyond the limit are closed at accept and counted; freed slots are reused', async (t) => {
  const { server, port } = await serve(t, { maxConnections: 3 });
  // One of each kind: HTTP/1.1, HTTP/2, and one still being sniffed.
  const agent = new http.Agent({ keepAlive: true });
  t.teardown(() => agent.destroy());
  const res = await new Promise<http.IncomingMessage>((resolve, reject) =>
    http.get({ host: '127.0.0.1', port, path: '/', agent }, resolve).on('error', reject),
  );
  res.resume();
  await once(res, 'end');
  const session = http2.connect(`http://127.0.0.1:${port}`);
  session.on('error', () => undefined);
  await once(session, 'remoteSettings');
  const quiet = await connect(port);
  await sleep(100);
  t.same(server.connectionCounts(), { http1: 1, http2: 1, sniffing: 1 });

  const started = performance.now();
  const extra = await connect(port);
  const { ms, received } = await closed(extra, started);
  t.ok(ms < 500, `the 4th connection was closed at once (${Math.round(ms)} ms)`);
  t.equal(received, '', 'without a byte');
  t.equal(server.connectionStats().refused, 1, 'counted');
  const registry = new Registry();
  registerConnectionMetrics(registry, server);
  const exposition = await registry.metrics();
  t.match(exposition, /reapi_edge_connection_events_total\{event="refused"\} 1\n/, 'and exposed in /metrics');
  t.match(exposition, /reapi_edge_open_connections\{protocol="http2"\} 1\n/, 'with the open connections by protocol');

  // Freeing the HTTP/2 slot (the session's socket was taken over by the session) lets a new one in.
  session.close();
  await once(session, 'close');
  await sleep(100);
  const again = http2.connect(`http://127.0.0.1:${port}`);
  again.on('error', () => undefined);
  const settings = await Promise.race([once(again, 'remoteSettings').then(() => 'settings'), once(again, 'close').then(() => 'closed')]);
  t.equal(settings, 'settings', 'a new HTTP/2 connection is accepted once one closed');
  again.destroy();
  quiet.destroy();
});

const skipTls = opensslMissing;

t.test('TLS: the handshake is under the same deadline; maxConnections counts TLS connections', { skip: skipTls }, async (t) => {
  const pki = await createPki();
  t.teardown(pki.remove);
  const context = await TlsContext.load({ certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCert: 'require' });
  const { server, port } = await serve(t, { headersTimeoutMs: 800, maxConnections: 2 }, { tls: context });

  // A TCP connection that never starts its handshake.
  const started = performance.now();
  const silent = await connect(port);
  const { ms } = await closed(silent, started);
  t.ok(ms >= 750 && ms < 1400, `closed ${Math.round(ms)} ms after connecting (headersTimeoutMs 800)`);
  t.equal(server.connectionStats().headersTimeouts, 1);

  // A handshake that completes, then nothing: still the one deadline from connect.
  const handshakeStarted = performance.now();
  const quiet = tls.connect({ host: '127.0.0.1', port, ca: pki.ca, ALPNProtocols: ['http/1.1'] });
  quiet.on('error', () => undefined);
  await once(quiet, 'secureConnect');
  const quietClosed = closed(quiet as unknown as net.Socket, handshakeStarted);

  // Two TLS sessions fill maxConnections (the quiet one and an HTTP/2 one); a third is refused.
  const session = http2.connect(`https://127.0.0.1:${port}`, { ca: pki.ca });
  session.on('error', () => undefined);
  await once(session, 'remoteSettings');
  const extra = await connect(port);
  const refused = await closed(extra, performance.now());
  t.ok(refused.ms < 500, 'a third connection is closed at accept');
  t.equal(server.connectionStats().refused, 1);

  const q = await quietClosed;
  t.ok(q.ms >= 750 && q.ms < 1400, `a TLS connection that sends no request is closed ${Math.round(q.ms)} ms after connecting`);
  session.close();
  await once(session, 'close');
  await sleep(100);
  // Both slots free again.
  const a = http2.connect(`https://127.0.0.1:${port}`, { ca: pki.ca });
  const b = http2.connect(`https://127.0.0.1:${port}`, { ca: pki.ca });
  for (const s of [a, b]) s.on('error', () => undefined);
  await Promise.all([once(a, 'remoteSettings'), once(b, 'remoteSettings')]);
  t.pass('two new TLS HTTP/2 connections accepted after the old ones closed');
  a.destroy();
  b.destroy();
});

t.test('close() still drains: a held HTTP/2 stream over TLS finishes, then the server closes', { skip: skipTls }, async (t) => {
  const pki = await createPki();
  t.teardown(pki.remove);
  const context = await TlsContext.load({ certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCert: 'require' });
  const served = await serve(t, {}, { tls: context });
  const session = http2.connect(`https://127.0.0.1:${served.port}`, { ca: pki.ca });
  session.on('error', () => undefined);
  const stream = session.request({ ':method': 'POST', ':path': '/hold/drain' });
  stream.end();
  stream.setEncoding('utf8');
  let body = '';
  stream.on('data', (d: string) => (body += d));
  while (served.held() === 0) await sleep(10);
  const closedServer = new Promise<void>((resolve) => served.server.close(() => resolve()));
  const goaway = once(session, 'goaway');
  await goaway;
  t.pass('GOAWAY sent at close');
  served.release();
  await once(stream, 'end');
  t.equal(body, 'ok', 'the in-flight stream finished');
  await closedServer;
  t.pass('the server closed once the session was gone');
});
