// The one module that chooses and builds the HTTP/2 client used to speak gRPC
// to shards. Every remote store gets its transport here, so changing the client
// stack is a one-file change.
//
// Choice: node:http2, one session per shard (connect-node's
// Http2SessionManager: multiplexed calls, PING keepalive, re-opened after the
// shard restarts, torn down by close()). Two kinds of call share it:
// - every unary call (FindMissingBlobs, GetActionResult, health...) through
//   connect-node's gRPC transport;
// - ByteStream Read and Write as raw HTTP/2 streams (openGrpcStream), framed
//   by hand in src/stores/remote-bytestream.ts: no protobuf-es object and no
//   copy per relayed message.
// Both pass through ShardSessionManager.request(), which is also where a
// shard's bearer token is added (TLS options go to the session), so no kind
// of call can go without its credentials.
// Both end a call when the response stream ENDS, never when the trailers
// arrive: node:http2 fires 'trailers' as soon as the frame comes in, with
// unread data possibly still buffered behind it for a slow consumer.
// test/stores/transport-backpressure.test.ts proves it against a C-core gRPC
// server and our own node: a 32 MiB Read consumed slowly, trailers observed
// while unread data was buffered, every byte and the sha256 checked. Re-run
// it before changing anything here.
//
// Measured alternatives (issue 8; bench/transport.ts prints the table,
// test/stores/transport-undici.test.ts holds the slow-consumer checks;
// undici 8.12.4 on Node 24):
// - undici over h2c, gRPC: still completes a response when the trailers
//   arrive while the stream is paused and drops the buffered DATA. A 32 MiB
//   read came up 131,072 bytes short from the python grpcio shard and
//   262,144 short from our node, with grpc-status 0 in the trailers: silent
//   truncation on exactly our data path. Ruled out; the test asserts the
//   defect so that a fixed undici makes it fail and prompts a re-measure.
// - undici Pool, the Connect protocol over HTTP/1.1 (our nodes serve it):
//   keeps every byte (a stream's end is a message in the body), but read a
//   128 MiB blob from a storage node at 0.34-0.81x of node:http2 gRPC and
//   wrote at 0.55-1.01x over three runs (node's own HTTP/1.1 client was as
//   slow: the cost is HTTP/1.1 and the Connect path, not undici); unary
//   calls were level within the noise. Not worth a second stack and a pool
//   per shard, and gRPC-only shards (bb-storage, bazel-remote) need node:http2
//   anyway.
// undici stays a dependency for HTTP/1.1 JSON fetches only, where bodies are
// read whole.
import { readFile } from 'node:fs/promises';
import type * as http2 from 'node:http2';
import { createSecureContext } from 'node:tls';
import type { Transport } from '@connectrpc/connect';
import { createGrpcTransport, Http2SessionManager } from '@connectrpc/connect-node';
import { ConfigError } from './config.ts';
import type { RemoteStoreConfig } from './config.ts';

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
  /**
   * Sent as `authorization: Bearer <token>` on every stream the session
   * opens: Connect's unary calls, health checks and the raw ByteStream
   * streams alike (they all go through the session manager's request()).
   */
  readonly bearerToken?: string | undefined;
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
  readonly #authorization: string | undefined;

  constructor(
    url: string,
    tls: http2.SecureClientSessionOptions | undefined,
    bearerToken: string | undefined,
    onStream?: (s: http2.ClientHttp2Stream) => void,
  ) {
    super(
      url,
      {
        // Verify a connection that sat idle for a minute with a PING before
        // using it, and drop one that does not answer. A stalled stream is
        // caught sooner by the remote store's own timeouts.
        pingIntervalMs: 60_000,
        pingTimeoutMs: 5_000,
        // Below our storage nodes' limits.idleTimeoutMs (default 5 min), so
        // the edge closes an idle session before the shard sends GOAWAY,
        // and no call races a GOAWAY.
        idleConnectionTimeoutMs: 4 * 60_000,
      },
      { ...tls, settings: { initialWindowSize: STREAM_WINDOW_BYTES, maxFrameSize: MAX_FRAME_BYTES, ...tls?.settings } },
    );
    this.#onStream = onStream;
    this.#authorization = bearerToken === undefined ? undefined : `Bearer ${bearerToken}`;
  }

  override async request(
    method: string,
    path: string,
    headers: http2.OutgoingHttpHeaders,
    options: Omit<http2.ClientSessionRequestOptions, 'signal'>,
  ): Promise<http2.ClientHttp2Stream> {
    // The one place every call to the shard passes: the credentials go here,
    // so that no kind of call can go without them.
    if (this.#authorization !== undefined) headers = { ...headers, authorization: this.#authorization };
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
  if (opts.tls !== undefined && url.protocol !== 'https:') {
    throw new Error(`shard url ${opts.url}: TLS options need an https:// url`);
  }
  const sessionManager = new ShardSessionManager(url.origin, opts.tls, opts.bearerToken, opts.onStream);
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

/** What a remote store's config adds to its transport: TLS options and the bearer token, read from their files. */
export interface ShardCredentials {
  readonly tls: http2.SecureClientSessionOptions | undefined;
  readonly bearerToken: string | undefined;
}

/**
 * Reads the files and environment variable a remote store's config names
 * (`tls.caFile`, `tls.certFile`, `tls.keyFile`, `bearerTokenFile`,
 * `bearerTokenEnv`), at startup. `field` is the store's config path, e.g.
 * "config.cas.sharding.shards.a.backend.remote"; every error is a
 * ConfigError naming the field and the file or variable. A token is the
 * first line of its file (or the variable's value), trimmed, and must not be
 * empty.
 */
export async function readShardCredentials(config: RemoteStoreConfig, field: string): Promise<ShardCredentials> {
  let tls: http2.SecureClientSessionOptions | undefined;
  if (config.tls !== undefined) {
    const t = config.tls;
    const [ca, cert, key] = await Promise.all([
      t.caFile === undefined ? undefined : readConfigFile(t.caFile, `${field}.tls.caFile`),
      t.certFile === undefined ? undefined : readConfigFile(t.certFile, `${field}.tls.certFile`),
      t.keyFile === undefined ? undefined : readConfigFile(t.keyFile, `${field}.tls.keyFile`),
    ]);
    tls = {};
    if (ca !== undefined) tls.ca = ca;
    if (cert !== undefined) tls.cert = cert;
    if (key !== undefined) tls.key = key;
    if (t.serverName !== undefined) tls.servername = t.serverName;
    // Checked now, or a bad file would only show as every call failing.
    try {
      createSecureContext({ ca, cert, key });
    } catch (err) {
      throw new ConfigError(`${field}.tls: OpenSSL refuses the files (${[t.caFile, t.certFile, t.keyFile].filter(Boolean).join(', ')}): ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  let bearerToken: string | undefined;
  if (config.bearerTokenFile !== undefined) {
    const text = (await readConfigFile(config.bearerTokenFile, `${field}.bearerTokenFile`)).toString('utf8');
    bearerToken = firstLine(text);
    if (bearerToken === '') throw new ConfigError(`${field}.bearerTokenFile: ${config.bearerTokenFile} is empty (the token is its first line)`);
  } else if (config.bearerTokenEnv !== undefined) {
    const value = process.env[config.bearerTokenEnv];
    if (value === undefined) throw new ConfigError(`${field}.bearerTokenEnv: environment variable ${config.bearerTokenEnv} is not set`);
    bearerToken = firstLine(value);
    if (bearerToken === '') throw new ConfigError(`${field}.bearerTokenEnv: environment variable ${config.bearerTokenEnv} is empty`);
  }
  if (bearerToken !== undefined && !/^[\x21-\x7e]+$/.test(bearerToken)) {
    // It goes into an HTTP/2 header as is.
    const where = config.bearerTokenFile !== undefined ? `${field}.bearerTokenFile` : `${field}.bearerTokenEnv`;
    throw new ConfigError(`${where}: the token must be printable ASCII without spaces`);
  }
  return { tls, bearerToken };
}

async function readConfigFile(file: string, field: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new ConfigError(`${field}: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

function firstLine(text: string): string {
  return (text.split(/\r?\n/, 1)[0] ?? '').trim();
}
