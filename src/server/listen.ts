import http from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import http2 from 'node:http2';
import type { Http2ServerRequest, Http2ServerResponse, Http2Session } from 'node:http2';
import net from 'node:net';
import type { Socket } from 'node:net';
import type { Logger } from 'pino';

/** The client connection preface every HTTP/2 connection starts with (RFC 9113 §3.4). */
const HTTP2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');

const MiB = 1024 * 1024;

/**
 * Largest HTTP/2 frame we accept (the protocol's default is 16 KiB). Larger
 * DATA frames mean fewer frames, callbacks and 'data' events per MiB.
 */
const MAX_FRAME_BYTES = 1024 * 1024;

export type RequestHandler = (
  req: IncomingMessage | Http2ServerRequest,
  res: ServerResponse | Http2ServerResponse,
) => void;

export interface OnePortServerOptions {
  /** Per-stream HTTP/2 flow-control window we advertise. Default 8 MiB. */
  readonly initialWindowSize?: number | undefined;
  /** Connection-level HTTP/2 receive window. Default 32 MiB. */
  readonly connectionWindowSize?: number | undefined;
  /** A connection that sends fewer bytes than it takes to tell the protocols apart within this time is dropped. Default 10 s. */
  readonly sniffTimeoutMs?: number | undefined;
  /**
   * After close() starts, connections still open after this long are
   * destroyed. Should exceed the RPC shutdown timeout, so that cancelled
   * RPCs can still send their status. Default 12 s.
   */
  readonly drainTimeoutMs?: number | undefined;
  readonly logger?: Logger | undefined;
}

/**
 * A net.Server that serves HTTP/2 cleartext (gRPC, for Bazel) and HTTP/1.1
 * (Connect/JSON, for curl) on one port, for fastify's `serverFactory`.
 */
export interface OnePortServer extends net.Server {
  /** Closes HTTP/1.1 connections that have no request in flight. */
  closeIdleConnections(): void;
  /** Starts the graceful drain (fastify calls this on close; close() does too). */
  closeHttp2Sessions(): void;
  /** Open connections by protocol, for tests and the admin page. */
  connectionCounts(): { http1: number; http2: number; sniffing: number };
}

/**
 * Creates the one-port server. Each accepted connection is read until its
 * first bytes either match the HTTP/2 preface ("PRI * HTTP/2.0...", 24
 * bytes) or diverge from it (an HTTP/1.1 request line diverges by the second
 * byte at the latest); the bytes read are pushed back onto the socket
 * (unshift) and the socket is handed to an internal http2 server (h2c, with
 * large flow-control windows) or http server. Both emit 'request' into
 * `handler`, i.e. fastify's. TLS is not handled: this is for loopback and
 * trusted networks, behind a TLS-terminating proxy otherwise.
 *
 * close() is graceful: it stops accepting, sends GOAWAY to every HTTP/2
 * session (idle ones close at once, busy ones after their streams end),
 * closes idle HTTP/1.1 connections (and the others as they become idle),
 * and destroys whatever is still open after drainTimeoutMs. Its callback
 * runs once every connection is gone.
 */
export function createOnePortServer(handler: RequestHandler, opts: OnePortServerOptions = {}): OnePortServer {
  const logger = opts.logger;
  const sniffTimeoutMs = opts.sniffTimeoutMs ?? 10_000;
  const drainTimeoutMs = opts.drainTimeoutMs ?? 12_000;
  const connectionWindowSize = opts.connectionWindowSize ?? 32 * MiB;

  const h2 = http2.createServer(
    {
      settings: { initialWindowSize: opts.initialWindowSize ?? 8 * MiB, maxFrameSize: MAX_FRAME_BYTES },
      // Large windows mean more data buffered per session than the 10 MB default allows.
      maxSessionMemory: 128,
    },
    handler as (req: Http2ServerRequest, res: Http2ServerResponse) => void,
  );
  const h1 = http.createServer(handler as (req: IncomingMessage, res: ServerResponse) => void);

  const sniffing = new Set<Socket>();
  const http1Sockets = new Set<Socket>();
  const sessions = new Set<Http2Session>();
  let draining = false;
  let idleTimer: NodeJS.Timeout | undefined;
  let killTimer: NodeJS.Timeout | undefined;

  h2.on('session', (session: Http2Session) => {
    sessions.add(session);
    session.once('close', () => sessions.delete(session));
    try {
      session.setLocalWindowSize(connectionWindowSize);
    } catch (err) {
      logger?.debug({ err }, 'could not enlarge the HTTP/2 connection window');
    }
    if (draining) session.close();
  });
  h2.on('sessionError', (err) => logger?.debug({ err }, 'HTTP/2 session error'));
  h1.on('clientError', (err: Error, socket: Socket) => {
    logger?.debug({ err }, 'HTTP/1.1 client error');
    if (!socket.destroyed) socket.destroy();
  });

  const server = net.createServer((socket) => {
    if (draining) {
      socket.destroy();
      return;
    }
    sniff(socket);
  }) as OnePortServer;

  function sniff(socket: Socket): void {
    sniffing.add(socket);
    let buffered: Buffer = Buffer.alloc(0);
    const cleanup = () => {
      sniffing.delete(socket);
      socket.removeListener('data', onData);
      socket.removeListener('error', onError);
      socket.removeListener('end', onEnd);
      socket.removeListener('timeout', onTimeout);
      socket.setTimeout(0);
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
    const onTimeout = () => {
      logger?.debug('connection sent too little to tell HTTP/1.1 from HTTP/2; closing');
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
      if (matchesPreface) {
        // The HTTP/2 session takes over the socket's handle and first drains
        // what is buffered in the JS stream (our unshifted bytes).
        h2.emit('connection', socket);
      } else {
        http1Sockets.add(socket);
        socket.once('close', () => http1Sockets.delete(socket));
        h1.emit('connection', socket);
        // The HTTP/1.1 parser reads the buffered bytes through 'data' events:
        // let them flow.
        socket.resume();
      }
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.on('timeout', onTimeout);
    socket.setTimeout(sniffTimeoutMs);
  }

  function startDrain(): void {
    if (draining) return;
    draining = true;
    for (const socket of sniffing) socket.destroy();
    sniffing.clear();
    for (const session of sessions) session.close();
    h1.closeIdleConnections();
    // A busy HTTP/1.1 connection becomes idle when its response ends: close
    // it then (node's http server only closes idle connections on request).
    // Both timers are unref'd: open connections keep the process alive anyway.
    idleTimer = setInterval(() => h1.closeIdleConnections(), 100).unref();
    killTimer = setTimeout(() => {
      const open = sessions.size + http1Sockets.size;
      if (open > 0) logger?.warn({ open }, 'drain timeout: destroying connections still open');
      for (const session of sessions) session.destroy();
      for (const socket of http1Sockets) socket.destroy();
    }, drainTimeoutMs).unref();
  }

  server.once('close', () => {
    clearInterval(idleTimer);
    clearTimeout(killTimer);
  });

  server.closeIdleConnections = () => h1.closeIdleConnections();
  server.closeHttp2Sessions = startDrain;
  server.connectionCounts = () => ({ http1: http1Sockets.size, http2: sessions.size, sniffing: sniffing.size });

  const netClose = server.close.bind(server);
  server.close = (callback?: (err?: Error) => void) => {
    startDrain();
    return netClose(callback);
  };
  return server;
}
