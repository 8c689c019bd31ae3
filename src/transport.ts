// The one module that chooses and builds the HTTP/2 client used to speak gRPC
// to shards. Every remote store gets its transport here, so changing the client
// stack is a one-file change.
//
// Choice: connect-node's gRPC transport (node:http2), for every call, data
// path included. undici is NOT used for gRPC to shards. Why:
//
// - undici 7.x and 8.x complete a request when HTTP/2 trailers arrive while the
//   response stream is paused by backpressure, and drop the body still buffered
//   (../shared/ENVIRONMENT.md from the repo root, "undici as a gRPC client"). Over gRPC
//   that is a truncated ByteStream Read that ends with status OK: silent data
//   loss, exactly on our data path (a slow Bazel client downloading a large
//   blob through the edge). Connect ships no undici gRPC transport either; a
//   hand-written one would inherit the defect.
// - node:http2 keeps trailers queued behind unread data: the 'trailers' event
//   fires when the frame arrives, but the readable side only ends after every
//   buffered byte was consumed, and Connect reads grpc-status only at the end.
//   test/stores/transport-backpressure.test.ts proves this against a real
//   C-core gRPC server: a 32 MiB Read consumed slowly, with trailers observed
//   arriving while unread data was buffered, every byte and the sha256 checked.
//   Re-run that test before changing the choice (for undici, write the same
//   test for it first).
// - One transport holds one HTTP/2 session per shard (Http2SessionManager):
//   calls are multiplexed on it, it is re-opened transparently after the shard
//   restarts or the connection dies, and close() tears it down.
//
// undici remains a fine choice where bodies are read whole without pausing
// (plain HTTP/1.1 JSON fetches, e.g. an admin page talking to another edge);
// nothing in the gRPC data path uses it.
import type * as http2 from 'node:http2';
import type { Transport } from '@connectrpc/connect';
import { createGrpcTransport, Http2SessionManager } from '@connectrpc/connect-node';

const USER_AGENT = 'reapi-edge (node:http2)';

/** Names the client stack, for describe() and logs. */
export const TRANSPORT_KIND = 'connect-node-http2';

/**
 * Per-stream HTTP/2 receive window we advertise. The node default (64 KiB)
 * caps a read at one window per round trip; a larger window lets the shard
 * keep sending while we forward. It also bounds how much of a read can sit
 * buffered in this process for a paused consumer, per stream.
 */
const STREAM_WINDOW_BYTES = 4 * 1024 * 1024;
/**
 * Largest HTTP/2 frame we accept (the protocol's default is 16 KiB). Larger
 * DATA frames mean fewer frames, callbacks and 'data' events per MiB.
 */
const MAX_FRAME_BYTES = 1024 * 1024;

/** Connection-level receive window: room for several concurrent reads. */
const SESSION_WINDOW_BYTES = 16 * 1024 * 1024;

/** Largest single response message we accept from a shard. */
const READ_MAX_BYTES = 64 * 1024 * 1024;

export interface ShardTransportOptions {
  /**
   * `http://host:port` for gRPC over cleartext HTTP/2 (h2c), `https://...` for
   * TLS. A path is allowed and prefixes every RPC path.
   */
  readonly url: string;
  /**
   * Extra node:http2 connect options, e.g. `ca`, `cert`, `key`,
   * `servername` for TLS shards.
   */
  readonly tls?: http2.SecureClientSessionOptions;
  /** Sees every HTTP/2 stream opened, before any response. For tests that watch the wire. */
  readonly onStream?: (stream: http2.ClientHttp2Stream) => void;
}

export interface ShardTransport {
  readonly transport: Transport;
  /**
   * Opens a raw HTTP/2 stream for a gRPC call on the same session (the
   * ByteStream fast path: src/stores/remote-bytestream.ts). `method` is
   * "/package.Service/Method"; the url's path, if any, is prefixed.
   */
  openGrpcStream(method: string, headers?: http2.OutgoingHttpHeaders): Promise<http2.ClientHttp2Stream>;
  /** Which client stack is in use (TRANSPORT_KIND). */
  readonly kind: string;
  /** HTTP/2 session state: closed, connecting, open, idle, verifying or error. */
  state(): string;
  /** Closes the HTTP/2 session and every call still running on it. Idempotent. */
  close(): void;
}

/**
 * Connect's session manager (one session, re-opened on demand, PING
 * keepalive) plus a larger connection-level receive window, which node:http2
 * only offers as a method on a live session.
 */
class ShardSessionManager extends Http2SessionManager {
  readonly #widened = new WeakSet<http2.Http2Session>();
  readonly #onStream: ((stream: http2.ClientHttp2Stream) => void) | undefined;

  constructor(url: string, tls: http2.SecureClientSessionOptions | undefined, onStream?: (s: http2.ClientHttp2Stream) => void) {
    super(
      url,
      {
        // Verify a connection that sat idle for a minute with a PING before
        // using it, and drop one that does not answer. A stalled stream is
        // caught sooner by the remote store's own timeouts.
        pingIntervalMs: 60_000,
        pingTimeoutMs: 5_000,
        idleConnectionTimeoutMs: 15 * 60_000,
      },
      { ...tls, settings: { initialWindowSize: STREAM_WINDOW_BYTES, maxFrameSize: MAX_FRAME_BYTES, ...tls?.settings } },
    );
    this.#onStream = onStream;
  }

  override async request(
    method: string,
    path: string,
    headers: http2.OutgoingHttpHeaders,
    options: Omit<http2.ClientSessionRequestOptions, 'signal'>,
  ): Promise<http2.ClientHttp2Stream> {
    const stream = await super.request(method, path, headers, options);
    const session = stream.session;
    if (session !== undefined && !this.#widened.has(session)) {
      this.#widened.add(session);
      try {
        session.setLocalWindowSize(SESSION_WINDOW_BYTES);
      } catch {
        // The session is already closing; the stream will report why.
      }
    }
    this.#onStream?.(stream);
    return stream;
  }
}

/** Builds the transport for one shard: one reusable HTTP/2 session. */
export function createShardTransport(opts: ShardTransportOptions): ShardTransport {
  const url = new URL(opts.url);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new Error(`shard url ${opts.url}: expected http:// (h2c) or https:// (TLS)`);
  }
  const sessionManager = new ShardSessionManager(url.origin, opts.tls, opts.onStream);
  const transport = createGrpcTransport({
    baseUrl: opts.url.replace(/\/+$/, ''),
    sessionManager,
    readMaxBytes: READ_MAX_BYTES,
    // Blobs are mostly incompressible or already compressed; never ask a
    // shard to spend CPU on it.
    acceptCompression: [],
  });
  let closed = false;
  const pathPrefix = url.pathname.replace(/\/+$/, '');
  return {
    transport,
    kind: TRANSPORT_KIND,
    openGrpcStream: (method, headers) =>
      sessionManager.request(
        'POST',
        pathPrefix + method,
        { 'content-type': 'application/grpc', te: 'trailers', 'user-agent': USER_AGENT, ...headers },
        {},
      ),
    state: () => sessionManager.state(),
    close: () => {
      if (closed) return;
      closed = true;
      sessionManager.abort();
    },
  };
}
