// An anchor for bench/wire.ts, not product code: the runtime's limit for an
// edge. A bare node:http2 h2c relay that forwards every gRPC call to one
// upstream server on one HTTP/2 session: request headers, body, response
// headers, body and trailers pass through as they come, with no parsing, no
// routing and no checks. Whatever an edge does on top of this (sharding,
// breakers, digest checks, metrics) costs more; the gap between this relay's
// edge/direct ratio and ours is what our relay adds, the rest is the price of
// a second HTTP/2 hop on the same two cores.
//
// Usage: node bench/anchors/bare-relay.ts --upstream http://127.0.0.1:PORT [--port 0]
// Announces "LISTENING <port>" on stdout.
import http2 from 'node:http2';

const args = process.argv.slice(2);
const arg = (name: string) => {
  const i = args.indexOf(name);
  return i === -1 ? undefined : args[i + 1];
};
const upstreamUrl = arg('--upstream');
if (upstreamUrl === undefined) {
  console.error('usage: bare-relay.ts --upstream http://HOST:PORT [--port N]');
  process.exit(2);
}
const WINDOW = 8 * 1024 * 1024;

let upstream: http2.ClientHttp2Session | undefined;
function session(): http2.ClientHttp2Session {
  if (upstream === undefined || upstream.destroyed || upstream.closed) {
    upstream = http2.connect(upstreamUrl!, { settings: { initialWindowSize: WINDOW } });
    upstream.on('error', () => {});
    upstream.on('connect', (s) => s.setLocalWindowSize(4 * WINDOW));
  }
  return upstream;
}

const HOP_HEADERS = new Set([':status', 'connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'date']);

const server = http2.createServer({ settings: { initialWindowSize: WINDOW } });
server.on('session', (s) => s.setLocalWindowSize(4 * WINDOW));
server.on('stream', (down, headers) => {
  const out: http2.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!k.startsWith(':') || k === ':path' || k === ':method') out[k] = v;
  const up = session().request(out);
  down.pipe(up);
  up.on('response', (h) => {
    const resp: http2.OutgoingHttpHeaders = { ':status': h[':status'] };
    for (const [k, v] of Object.entries(h)) if (!HOP_HEADERS.has(k) && !k.startsWith(':')) resp[k] = v;
    down.respond(resp, { waitForTrailers: true });
    up.pipe(down);
  });
  let trailers: http2.OutgoingHttpHeaders = {};
  up.on('trailers', (t) => {
    trailers = { ...t };
  });
  down.on('wantTrailers', () => down.sendTrailers(trailers));
  up.on('error', () => down.destroyed || down.close(http2.constants.NGHTTP2_INTERNAL_ERROR));
  down.on('error', () => up.destroyed || up.close(http2.constants.NGHTTP2_CANCEL));
});
server.listen(Number(arg('--port') ?? 0), '127.0.0.1', () => {
  const address = server.address();
  console.log(`LISTENING ${typeof address === 'object' && address !== null ? address.port : address}`);
});
