import http from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import http2 from 'node:http2';
import type { Http2ServerRequest, Http2ServerResponse, Http2Session, ServerHttp2Stream } from 'node:http2';
import net from 'node:net';
import type { Socket } from 'node:net';
import { constants as cryptoConstants } from 'node:crypto';
import tls from 'node:tls';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { DEFAULT_LIMITS } from '../config.ts';
import type { LimitsConfig } from '../config.ts';
import type { PeerInfo } from './peer.ts';
import type { TlsContext } from './tls.ts';

/** The client connection preface every HTTP/2 connection starts with (RFC 9113 §3.4). */
const HTTP2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');

const MiB = 1024 * 1024;

/**
 * Largest HTTP/2 frame we accept (the protocol's default is 16 KiB). Larger
 * DATA frames mean fewer frames, callbacks and 'data' events per MiB.
 */
const MAX_FRAME_BYTES = 1024 * 1024;

const REQUEST_TIMEOUT_RESPONSE = 'HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n';

export type RequestHandler = (
  req: IncomingMessage | Http2ServerRequest,
  res: ServerResponse | Http2ServerResponse,
) => void;

/** The connection-level limits (config.json `limits`). */
export type ConnectionLimits = Pick<
  LimitsConfig,
  'maxConcurrentStreams' | 'maxConnections' | 'headersTimeoutMs' | 'idleTimeoutMs' | 'requestTimeoutMs'
>;

export interface OnePortServerOptions {
  /** Per-stream HTTP/2 flow-control window we advertise. Default 8 MiB. */
  readonly initialWindowSize?: number | undefined;
  /** Connection-level HTTP/2 receive window. Default 32 MiB. */
  readonly connectionWindowSize?: number | undefined;
  /**
   * After close() starts, connections still open after this long are
   * destroyed. Should exceed the RPC shutdown timeout, so that cancelled
   * RPCs can still send their status. Default 12 s.
   */
  readonly drainTimeoutMs?: number | undefined;
  /** Streams per HTTP/2 connection, connections, header/request/idle deadlines. Default DEFAULT_LIMITS. */
  readonly limits?: ConnectionLimits | undefined;
  /** TLS material: the port then speaks TLS only (ALPN h2 and http/1.1). Absent: cleartext. */
  readonly tls?: TlsContext | undefined;
  readonly logger?: Logger | undefined;
}

/** What the server refused or cut off so far, for tests, logs and metrics. */
export interface ConnectionStats {
  /** Connections closed at accept because maxConnections were open. */
  readonly refused: number;
  /** Connections that did not finish the TLS handshake and send their first request headers (HTTP/1.1) or preface and SETTINGS (HTTP/2) within headersTimeoutMs. */
  readonly headersTimeouts: number;
  /** HTTP/1.1 requests cut off by node's own checks: a body not in within requestTimeoutMs, or a keep-alive connection's later request headers not in within headersTimeoutMs. */
  readonly requestTimeouts: number;
  /** HTTP/2 sessions closed (GOAWAY) after idleTimeoutMs without an open stream. */
  readonly idleSessionsClosed: number;
  /** TLS handshakes that failed (bad protocol, no shared cipher, no or bad client certificate under "require", ...). */
  readonly tlsHandshakeFailures: number;
  /** Connections that presented a client certificate the client CA does not vouch for ("optional" mode). */
  readonly rejectedClientCertificates: number;
}

/**
 * A net.Server that serves HTTP/2 (gRPC, for Bazel) and HTTP/1.1
 * (Connect/JSON, for curl) on one port, cleartext or TLS, for fastify's
 * `serverFactory`.
 */
export interface OnePortServer extends net.Server {
  /** Closes HTTP/1.1 connections that have no request in flight. */
  closeIdleConnections(): void;
  /** Starts the graceful drain (fastify calls this on close; close() does too). */
  closeHttp2Sessions(): void;
  /** Open connections by protocol, for tests and the admin page ("sniffing": protocol not known yet, TLS handshakes included). */
  connectionCounts(): { http1: number; http2: number; sniffing: number };
  /** Counters of refused and cut-off connections. */
  connectionStats(): ConnectionStats;
  /**
   * Re-reads the TLS files (SIGHUP). New connections use the new material,
   * open ones keep theirs. Resolves false when there is no TLS or the new
   * files are unusable (logged; the old material stays).
   */
  reloadTls(reason: string): Promise<boolean>;
}

/** Who is on a connection, by the object a request reaches us through (the HTTP/2 session or the HTTP/1.1 socket). */
const peers = new WeakMap<object, PeerInfo>();

/**
 * The peer of a request served by a one-port server, computed once per
 * connection: its address, whether it came over TLS and, only when the
 * client certificate was verified against the configured client CA, the
 * certificate's subject CN. A request that did not come through a one-port
 * server (fastify.inject in tests) gets its socket's address only.
 */
export function peerOf(req: IncomingMessage | Http2ServerRequest): PeerInfo {
  const key = 'stream' in req ? req.stream.session : req.socket;
  const peer = key === undefined ? undefined : peers.get(key);
  if (peer !== undefined) return peer;
  return { address: req.socket?.remoteAddress, tls: false, certCommonName: undefined };
}

/**
 * A connection from accept until it has sent its first request headers
 * (HTTP/1.1) or its preface and SETTINGS (HTTP/2): one absolute deadline,
 * headersTimeoutMs from accept, over the TLS handshake, the protocol sniff
 * and the headers alike. Destroying the raw socket also ends a TLS socket or
 * HTTP/2 session built on it.
 */
interface Pending {
  readonly raw: Socket;
  timer: NodeJS.Timeout | undefined;
  phase: 'tls handshake' | 'protocol sniff' | 'HTTP/1.1 request headers' | 'HTTP/2 preface and SETTINGS';
}

interface SessionState {
  open: number;
  /** performance.now() when the last stream closed (or the session opened). */
  idleSince: number;
}

/**
 * Creates the one-port server.
 *
 * Cleartext (no `tls`): each accepted connection is read until its first
 * bytes either match the HTTP/2 preface ("PRI * HTTP/2.0...", 24 bytes) or
 * diverge from it (an HTTP/1.1 request line diverges by the second byte at
 * the latest); the bytes read are pushed back onto the socket (unshift) and
 * the socket is handed to an internal http2 server (h2c, with large
 * flow-control windows) or http server.
 *
 * TLS: every connection is a TLS handshake (an internal tls.Server, never
 * listening, takes the socket), offering ALPN h2 and http/1.1; the TLS
 * socket then goes to the http2 server for h2 and to the http server
 * otherwise (http/1.1 or no ALPN). With a client CA, "require" refuses a
 * handshake without a valid client certificate and "optional" accepts one
 * without a certificate but closes one with a certificate the CA does not
 * vouch for. Session resumption is off then, so every connection's identity
 * comes from a certificate verified on that connection. `tls` reloads are
 * applied to new handshakes (setSecureContext); open connections keep going.
 *
 * Both protocol servers emit 'request' into `handler`, i.e. fastify's.
 *
 * Limits: at most maxConnections open (more are closed at accept); the TLS
 * handshake, protocol sniff and first request headers (or HTTP/2 preface and
 * SETTINGS) within headersTimeoutMs of accept, as one absolute deadline;
 * HTTP/1.1 requests after the first under node's own headersTimeout and
 * requestTimeout checks (which node only runs for a server that listens:
 * started here by hand); idle HTTP/1.1 keep-alive connections closed after
 * idleTimeoutMs, and HTTP/2 sessions with no open stream for idleTimeoutMs
 * closed with GOAWAY; maxConcurrentStreams advertised in SETTINGS (nghttp2
 * refuses streams beyond it with REFUSED_STREAM).
 *
 * close() is graceful: it stops accepting, sends GOAWAY to every HTTP/2
 * session (idle ones close at once, busy ones after their streams end),
 * closes idle HTTP/1.1 connections (and the others as they become idle),
 * and destroys whatever is still open after drainTimeoutMs. Its callback
 * runs once every connection is gone.
 */
export function createOnePortServer(handler: RequestHandler, opts: OnePortServerOptions = {}): OnePortServer {
  const logger = opts.logger;
  const limits = opts.limits ?? DEFAULT_LIMITS;
  const headersTimeoutMs = limits.headersTimeoutMs;
  const idleTimeoutMs = limits.idleTimeoutMs;
  const drainTimeoutMs = opts.drainTimeoutMs ?? 12_000;
  const connectionWindowSize = opts.connectionWindowSize ?? 32 * MiB;
  const tlsContext = opts.tls;
  const stats = {
    refused: 0,
    headersTimeouts: 0,
    requestTimeouts: 0,
    idleSessionsClosed: 0,
    tlsHandshakeFailures: 0,
    rejectedClientCertificates: 0,
  };

  const h2 = http2.createServer(
    {
      settings: {
        initialWindowSize: opts.initialWindowSize ?? 8 * MiB,
        maxFrameSize: MAX_FRAME_BYTES,
        maxConcurrentStreams: limits.maxConcurrentStreams,
      },
      // Large windows mean more data buffered per session than the 10 MB default allows.
      maxSessionMemory: 128,
    },
    handler as (req: Http2ServerRequest, res: Http2ServerResponse) => void,
  );

  /** HTTP/1.1 sockets: the deadline still pending on their first request, and the response in flight. */
  const http1State = new WeakMap<Socket, { pending: Pending | undefined; res: ServerResponse | undefined }>();
  const h1 = http.createServer(
    {
      // node insists on headersTimeout <= requestTimeout.
      headersTimeout: Math.min(headersTimeoutMs, limits.requestTimeoutMs),
      requestTimeout: limits.requestTimeoutMs,
      // Advertised in Keep-Alive: timeout=; node closes its side 1 s later
      // (keepAliveTimeoutBuffer), so a client acting on the hint goes first.
      keepAliveTimeout: idleTimeoutMs,
      // How often node looks for requests past those deadlines.
      connectionsCheckingInterval: Math.min(1000, Math.max(50, Math.floor(headersTimeoutMs / 10))),
    },
    (req: IncomingMessage, res: ServerResponse) => {
      const state = http1State.get(req.socket);
      if (state !== undefined) {
        if (state.pending !== undefined) {
          settle(state.pending);
          state.pending = undefined;
        }
        state.res = res;
      }
      handler(req, res);
    },
  );
  h1.keepAliveTimeout = idleTimeoutMs;
  // node's http server tracks connections and enforces headersTimeout and
  // requestTimeout (and makes closeIdleConnections() work) only from its
  // 'listening' event on. This one never listens: sockets are handed to it.
  // Its listener only starts that tracking (an unref'd interval, stopped by
  // h1.close() below).
  h1.emit('listening');

  const sniffing = new Set<Socket>();
  const http1Sockets = new Set<Socket>();
  const sessions = new Map<Http2Session, SessionState>();
  /** TLS connections in their handshake, by address 4-tuple (the TLS socket node builds is not handed to us until it is done). */
  const handshaking = new Map<string, Pending>();
  let draining = false;
  let idleTimer: NodeJS.Timeout | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  /** Set while a socket is being handed to the http2 server, which emits 'session' synchronously. */
  let handoff: { pending: Pending | undefined; peer: PeerInfo } | undefined;

  function settle(pending: Pending): void {
    clearTimeout(pending.timer);
    pending.timer = undefined;
  }

  function onDeadline(pending: Pending): void {
    pending.timer = undefined;
    stats.headersTimeouts++;
    logger?.debug(
      { remoteAddress: pending.raw.remoteAddress, phase: pending.phase, headersTimeoutMs },
      `connection still in its ${pending.phase} ${headersTimeoutMs} ms after connecting; closing`,
    );
    pending.raw.destroy();
  }

  function track(raw: Socket, phase: Pending['phase']): Pending {
    const pending: Pending = { raw, timer: undefined, phase };
    pending.timer = setTimeout(onDeadline, headersTimeoutMs, pending);
    raw.once('close', () => {
      settle(pending);
      sniffing.delete(raw);
    });
    return pending;
  }

  h2.on('session', (session: Http2Session) => {
    const from = handoff;
    handoff = undefined;
    const state: SessionState = { open: 0, idleSince: performance.now() };
    sessions.set(session, state);
    session.once('close', () => sessions.delete(session));
    peers.set(session, from?.peer ?? { address: session.socket?.remoteAddress, tls: false, certCommonName: undefined });
    const pending = from?.pending;
    if (pending !== undefined) {
      pending.phase = 'HTTP/2 preface and SETTINGS';
      // The client's first SETTINGS frame follows the preface.
      session.once('remoteSettings', () => settle(pending));
    }
    session.on('stream', (stream: ServerHttp2Stream) => {
      state.open++;
      stream.once('close', () => {
        if (--state.open === 0) state.idleSince = performance.now();
      });
    });
    try {
      session.setLocalWindowSize(connectionWindowSize);
    } catch (err) {
      logger?.debug({ err }, 'could not enlarge the HTTP/2 connection window');
    }
    if (draining) session.close();
  });
  h2.on('sessionError', (err) => logger?.debug({ err }, 'HTTP/2 session error'));
  h1.on('clientError', (err: NodeJS.ErrnoException, socket: Socket) => {
    if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
      stats.requestTimeouts++;
      logger?.debug({ remoteAddress: socket.remoteAddress }, 'HTTP/1.1 request not received within headersTimeoutMs/requestTimeoutMs; closing');
      const res = http1State.get(socket)?.res;
      if (socket.writable && (res === undefined || res.writableEnded || !res.headersSent)) socket.write(REQUEST_TIMEOUT_RESPONSE);
    } else {
      logger?.debug({ err }, 'HTTP/1.1 client error');
    }
    if (!socket.destroyed) socket.destroy();
  });

  // Idle HTTP/2 sessions: no open stream for idleTimeoutMs.
  const sweepTimer = setInterval(
    () => {
      const now = performance.now();
      for (const [session, state] of sessions) {
        if (state.open === 0 && !session.closed && now - state.idleSince >= idleTimeoutMs) {
          stats.idleSessionsClosed++;
          logger?.debug({ remoteAddress: session.socket?.remoteAddress, idleTimeoutMs }, 'HTTP/2 session idle; closing (GOAWAY)');
          session.close();
        }
      }
    },
    Math.min(1000, Math.max(50, Math.floor(idleTimeoutMs / 4))),
  ).unref();

  function toHttp2(socket: Socket, pending: Pending | undefined, peer: PeerInfo): void {
    handoff = { pending, peer };
    try {
      h2.emit('connection', socket);
    } finally {
      handoff = undefined;
    }
  }

  function toHttp1(socket: Socket, pending: Pending | undefined, peer: PeerInfo): void {
    if (pending !== undefined) pending.phase = 'HTTP/1.1 request headers';
    http1State.set(socket, { pending, res: undefined });
    peers.set(socket, peer);
    http1Sockets.add(socket);
    socket.once('close', () => http1Sockets.delete(socket));
    h1.emit('connection', socket);
  }

  // ---- TLS ----
  let tlsServer: tls.Server | undefined;
  let unsubscribeTls: (() => void) | undefined;
  if (tlsContext !== undefined) {
    const clientCert = tlsContext.clientCert;
    // With client certificates, no session tickets: a resumed session brings
    // the certificate verified when its ticket was issued, not now. Every
    // connection does a full handshake instead (gRPC connections are long-lived).
    const fixed: tls.SecureContextOptions = clientCert === 'none' ? {} : { secureOptions: cryptoConstants.SSL_OP_NO_TICKET };
    tlsServer = tls.createServer({
      ...tlsContext.secureContextOptions(),
      ...fixed,
      ALPNProtocols: ['h2', 'http/1.1'],
      requestCert: clientCert !== 'none',
      rejectUnauthorized: clientCert === 'require',
      handshakeTimeout: headersTimeoutMs,
    });
    const server = tlsServer;
    unsubscribeTls = tlsContext.subscribe(() => server.setSecureContext({ ...tlsContext.secureContextOptions(), ...fixed }));
    tlsServer.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      stats.tlsHandshakeFailures++;
      logger?.debug({ remoteAddress: socket.remoteAddress, error: err.code ?? err.message }, 'TLS handshake failed');
    });
    tlsServer.on('secureConnection', (socket: TLSSocket) => {
      const key = tupleOf(socket);
      let pending = handshaking.get(key);
      handshaking.delete(key);
      if (pending === undefined) {
        // Not expected (the raw socket closed first, so this one is closing
        // too); keep a deadline anyway.
        pending = track(socket, 'tls handshake');
      }
      sniffing.delete(pending.raw);
      if (draining) {
        socket.destroy();
        return;
      }
      let certCommonName: string | undefined;
      if (clientCert !== 'none') {
        if (socket.authorized) {
          certCommonName = commonNameOf(socket);
        } else if (socket.getPeerX509Certificate() !== undefined) {
          // "optional": no certificate is fine, a bad one is not.
          stats.rejectedClientCertificates++;
          logger?.debug(
            { remoteAddress: socket.remoteAddress, error: socket.authorizationError },
            'client certificate not verified by the client CA; closing',
          );
          socket.destroy();
          return;
        }
      }
      const peer: PeerInfo = { address: socket.remoteAddress, tls: true, certCommonName };
      if (socket.alpnProtocol === 'h2') toHttp2(socket, pending, peer);
      else toHttp1(socket, pending, peer);
    });
  }

  const server = net.createServer((socket) => {
    if (draining) {
      socket.destroy();
      return;
    }
    sniffing.add(socket);
    if (tlsServer === undefined) {
      sniff(socket, track(socket, 'protocol sniff'));
      return;
    }
    const pending = track(socket, 'tls handshake');
    const key = tupleOf(socket);
    handshaking.set(key, pending);
    socket.once('close', () => {
      if (handshaking.get(key) === pending) handshaking.delete(key);
    });
    // The TLS socket reads and writes through this socket's handle; errors
    // surface there. This listener only keeps a stray one from crashing us.
    socket.on('error', (err) => logger?.debug({ err }, 'TLS connection socket error'));
    tlsServer.emit('connection', socket);
  }) as OnePortServer;
  server.maxConnections = limits.maxConnections;
  server.on('drop', (info?: { remoteAddress?: string }) => {
    stats.refused++;
    logger?.debug({ remoteAddress: info?.remoteAddress, maxConnections: limits.maxConnections }, 'connection refused: maxConnections open');
  });

  function sniff(socket: Socket, pending: Pending): void {
    let buffered: Buffer = Buffer.alloc(0);
    const cleanup = () => {
      sniffing.delete(socket);
      socket.removeListener('data', onData);
      socket.removeListener('error', onError);
      socket.removeListener('end', onEnd);
    };
    const onError = (err: Error) => {
      logger?.debug({ err }, 'connection failed before its protocol was known');
      cleanup();
      socket.destroy();
    };
    const onEnd = () => {
      cleanup();
      socket.destroy();
    };
    const onData = (chunk: Buffer) => {
      buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
      const n = Math.min(buffered.length, HTTP2_PREFACE.length);
      const matchesPreface = buffered.subarray(0, n).equals(HTTP2_PREFACE.subarray(0, n));
      if (matchesPreface && buffered.length < HTTP2_PREFACE.length) return; // need more bytes
      cleanup();
      // Stop the flow of 'data' events and give the bytes back, so that the
      // protocol server reads the connection from its first byte.
      socket.pause();
      socket.unshift(buffered);
      const peer: PeerInfo = { address: socket.remoteAddress, tls: false, certCommonName: undefined };
      if (matchesPreface) {
        // The HTTP/2 session takes over the socket's handle and first drains
        // what is buffered in the JS stream (our unshifted bytes).
        toHttp2(socket, pending, peer);
      } else {
        toHttp1(socket, pending, peer);
        // The HTTP/1.1 parser reads the buffered bytes through 'data' events:
        // let them flow.
        socket.resume();
      }
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('end', onEnd);
  }

  function startDrain(): void {
    if (draining) return;
    draining = true;
    for (const socket of sniffing) socket.destroy();
    sniffing.clear();
    for (const session of sessions.keys()) session.close();
    h1.closeIdleConnections();
    // A busy HTTP/1.1 connection becomes idle when its response ends: close
    // it then (node's http server only closes idle connections on request).
    // Both timers are unref'd: open connections keep the process alive anyway.
    idleTimer = setInterval(() => h1.closeIdleConnections(), 100).unref();
    killTimer = setTimeout(() => {
      const open = sessions.size + http1Sockets.size;
      if (open > 0) logger?.warn({ open }, 'drain timeout: destroying connections still open');
      for (const session of sessions.keys()) session.destroy();
      for (const socket of http1Sockets) socket.destroy();
    }, drainTimeoutMs).unref();
  }

  server.once('close', () => {
    clearInterval(idleTimer);
    clearTimeout(killTimer);
    clearInterval(sweepTimer);
    unsubscribeTls?.();
    // Stops node's connection checking interval (h1 never listened: nothing else to close).
    h1.close();
  });

  server.closeIdleConnections = () => h1.closeIdleConnections();
  server.closeHttp2Sessions = startDrain;
  server.connectionCounts = () => ({ http1: http1Sockets.size, http2: sessions.size, sniffing: sniffing.size });
  server.connectionStats = () => ({ ...stats });
  server.reloadTls = (reason) => (tlsContext === undefined ? Promise.resolve(false) : tlsContext.reload(reason));

  const netClose = server.close.bind(server);
  server.close = (callback?: (err?: Error) => void) => {
    startDrain();
    return netClose(callback);
  };
  return server;
}

/** A TCP connection's address 4-tuple, the same on the raw socket and the TLS socket over it. */
function tupleOf(socket: Socket): string {
  return `${socket.remoteAddress}|${socket.remotePort}|${socket.localAddress}|${socket.localPort}`;
}

/** The subject CN of a TLS socket's peer certificate; undefined when absent or not a single value. */
function commonNameOf(socket: TLSSocket): string | undefined {
  const cn: unknown = socket.getPeerCertificate().subject?.CN;
  return typeof cn === 'string' && cn !== '' ? cn : undefined;
}
