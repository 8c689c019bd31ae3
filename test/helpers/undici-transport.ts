// undici-based shard transports, candidates measured against src/transport.ts
// (connect-node's gRPC transport over node:http2) by bench/transport.ts and
// proven (or not) under a slow consumer by test/stores/transport-undici.test.ts.
// Nothing in the data path uses this module yet; src/transport.ts decides.
//
// Connect ships no undici transport, but its protocol implementations only
// need a `UniversalClientFn` (one HTTP request -> status, headers, a body as
// an async iterable, and trailers). This module supplies that function on top
// of an undici dispatcher and hands it to connect's own protocol code, so the
// framing, envelopes, end-stream message, errors and limits are connect-es's,
// not ours:
//
// - createUndiciConnectTransport: the Connect protocol over HTTP/1.1 with an
//   undici Pool. Our storage nodes serve it on the gRPC port
//   (src/server/listen.ts). The end of a stream is an envelope in the body,
//   not an HTTP trailer, so a response that completes while the consumer is
//   paused loses nothing as long as undici delivers the body in order.
// - createUndiciGrpcTransport: gRPC over cleartext HTTP/2 (h2c) with an
//   undici Client. grpc-status travels in HTTP/2 trailers; see the test for
//   what undici does with body data still buffered when they arrive.
import { Readable } from 'node:stream';
import type { Transport } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import type { UniversalClientFn, UniversalClientRequest, UniversalClientResponse } from '@connectrpc/connect/protocol';
import { createTransport as createConnectProtocolTransport } from '@connectrpc/connect/protocol-connect';
import { createTransport as createGrpcProtocolTransport } from '@connectrpc/connect/protocol-grpc';
import { Client, type Dispatcher, Pool } from 'undici';

const MiB = 1024 * 1024;

/** Largest single message accepted or sent (matches src/transport.ts). */
const MAX_MESSAGE_BYTES = 64 * MiB;

/** HTTP/2 windows and frame size, the same as src/transport.ts uses. */
const H2_STREAM_WINDOW_BYTES = 4 * MiB;
const H2_SESSION_WINDOW_BYTES = 16 * MiB;
const H2_MAX_FRAME_BYTES = MiB;

/** Connections per shard for HTTP/1.1: one call per connection at a time. */
const DEFAULT_H1_CONNECTIONS = 32;

export const UNDICI_CONNECT_KIND = 'undici-connect-h1';
export const UNDICI_GRPC_KIND = 'undici-grpc-h2c';

/** What a test can observe about each call on the wire. */
export interface UndiciCallHooks {
  /**
   * undici reported the response complete (the end of the body on HTTP/1.1,
   * the trailers / END_STREAM on HTTP/2). Called before the completion reaches
   * the consumer, which may still be reading buffered data.
   */
  readonly onResponseEnd?: (path: string, trailers: Record<string, string | string[] | undefined>) => void;
  /** undici handed `bytes` of response body to the response's Readable. */
  readonly onResponseData?: (path: string, bytes: number) => void;
}

export interface UndiciTransportOptions {
  /** `http://host:port`, optionally with a path prefix for every RPC. */
  readonly url: string;
  /** HTTP/1.1 only: connections in the pool. Default 32. */
  readonly connections?: number;
  readonly hooks?: UndiciCallHooks;
}

export interface UndiciShardTransport {
  readonly transport: Transport;
  readonly kind: string;
  /** The undici Pool or Client underneath (its `stats` show connections and calls in flight). */
  readonly dispatcher: Pool | Client;
  /** Closes the dispatcher and every call on it. Idempotent. */
  close(): Promise<void>;
}

/** The Connect protocol (binary) over HTTP/1.1, on an undici Pool. */
export function createUndiciConnectTransport(opts: UndiciTransportOptions): UndiciShardTransport {
  const url = checkedUrl(opts.url);
  const pool = new Pool(url.origin, {
    connections: opts.connections ?? DEFAULT_H1_CONNECTIONS,
    pipelining: 1,
    allowH2: false,
    // A stream may be idle for a long time between messages (a slow upload):
    // the caller's deadline bounds it, not undici.
    bodyTimeout: 0,
    headersTimeout: 0,
  });
  const dispatcher = withHooks(pool, opts.hooks);
  const transport = createConnectProtocolTransport({
    ...commonOptions(opts.url, dispatcher),
  });
  return { transport, kind: UNDICI_CONNECT_KIND, dispatcher: pool, close: closer(pool) };
}

/** gRPC over cleartext HTTP/2 (prior knowledge), on one undici Client session. */
export function createUndiciGrpcTransport(opts: UndiciTransportOptions): UndiciShardTransport {
  const url = checkedUrl(opts.url);
  const client = new Client(url.origin, {
    allowH2: true,
    bodyTimeout: 0,
    headersTimeout: 0,
    h2Options: {
      useH2c: url.protocol === 'http:',
      maxConcurrentStreams: 1000,
      connectionWindowSize: H2_SESSION_WINDOW_BYTES,
      settings: { initialWindowSize: H2_STREAM_WINDOW_BYTES, maxFrameSize: H2_MAX_FRAME_BYTES },
    },
  });
  const dispatcher = withHooks(client, opts.hooks);
  const transport = createGrpcProtocolTransport(commonOptions(opts.url, dispatcher));
  return { transport, kind: UNDICI_GRPC_KIND, dispatcher: client, close: closer(client) };
}

function checkedUrl(raw: string): URL {
  const url = new URL(raw);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new Error(`shard url ${raw}: expected http:// or https://`);
  }
  return url;
}

function commonOptions(baseUrl: string, dispatcher: Dispatcher) {
  return {
    httpClient: undiciHttpClient(dispatcher),
    baseUrl: baseUrl.replace(/\/+$/, ''),
    useBinaryFormat: true,
    interceptors: [],
    // Blobs are mostly incompressible: never ask a shard to compress.
    acceptCompression: [],
    sendCompression: null,
    compressMinBytes: 1024,
    readMaxBytes: MAX_MESSAGE_BYTES,
    writeMaxBytes: MAX_MESSAGE_BYTES,
  };
}

function closer(d: Dispatcher): () => Promise<void> {
  let closing: Promise<void> | undefined;
  return () => (closing ??= d.destroy().catch(() => undefined));
}

/** Content types whose request body is one whole message (Connect unary). */
const WHOLE_BODY_TYPES = new Set(['application/proto', 'application/json']);

/**
 * connect-es's HTTP client abstraction on undici's request(): the response
 * body is undici's Readable (flow-controlled: a consumer that stops reading
 * pauses the socket or HTTP/2 stream), and the trailers are copied once the
 * body has ended, which is when connect reads them.
 */
export function undiciHttpClient(dispatcher: Dispatcher): UniversalClientFn {
  return async (req: UniversalClientRequest): Promise<UniversalClientResponse> => {
    const url = new URL(req.url);
    const headers: Record<string, string> = {};
    req.header.forEach((value, key) => {
      headers[key] = value;
    });
    let body: Buffer | Readable | null = null;
    if (req.body !== undefined) {
      if (WHOLE_BODY_TYPES.has(headers['content-type'] ?? '')) {
        // One message: send it with a Content-Length rather than chunked.
        const parts: Uint8Array[] = [];
        for await (const part of req.body) parts.push(part);
        body = Buffer.concat(parts);
      } else {
        body = Readable.from(req.body, { objectMode: false });
      }
    }
    let res: Dispatcher.ResponseData;
    try {
      res = await dispatcher.request({
        origin: url.origin,
        path: url.pathname + url.search,
        method: req.method as Dispatcher.HttpMethod,
        headers,
        body,
        signal: req.signal,
      });
    } catch (err) {
      throw toConnectError(err);
    }
    const trailer = new Headers();
    const responseBody = res.body;
    async function* iterate(): AsyncGenerator<Uint8Array> {
      try {
        for await (const chunk of responseBody) yield chunk as Buffer;
      } catch (err) {
        throw toConnectError(err);
      }
      for (const [k, v] of Object.entries(res.trailers)) {
        if (v === undefined) continue;
        for (const one of Array.isArray(v) ? v : [v]) trailer.append(k, one);
      }
    }
    return { status: res.statusCode, header: toHeaders(res.headers), body: iterate(), trailer };
  };
}

function toHeaders(h: Record<string, string | string[] | undefined>): Headers {
  const out = new Headers();
  for (const [k, v] of Object.entries(h)) {
    if (v === undefined) continue;
    for (const one of Array.isArray(v) ? v : [v]) out.append(k, one);
  }
  return out;
}

/** Network failures are UNAVAILABLE (retry elsewhere); aborts and ConnectErrors pass through. */
function toConnectError(err: unknown): unknown {
  if (err instanceof ConnectError) return err;
  if (err instanceof Error && err.name === 'AbortError') return err;
  return new ConnectError(err instanceof Error ? err.message : String(err), Code.Unavailable, undefined, undefined, err);
}

/** Wraps every dispatched handler so that hooks see each response's completion. */
function withHooks(d: Dispatcher, hooks: UndiciCallHooks | undefined): Dispatcher {
  if (hooks?.onResponseEnd === undefined && hooks?.onResponseData === undefined) return d;
  const { onResponseEnd, onResponseData } = hooks;
  return d.compose((dispatch) => (options, handler) =>
    dispatch(options, {
      onRequestStart: (c, ctx) => handler.onRequestStart?.(c, ctx),
      onRequestUpgrade: (c, s, h, sock) => handler.onRequestUpgrade?.(c, s, h, sock),
      onResponseStart: (c, s, h, m) => handler.onResponseStart?.(c, s, h, m),
      onResponseData: (c, chunk) => {
        onResponseData?.(options.path, chunk.byteLength);
        return handler.onResponseData?.(c, chunk);
      },
      onResponseEnd: (c, trailers) => {
        onResponseEnd?.(options.path, trailers);
        handler.onResponseEnd?.(c, trailers);
      },
      onResponseError: (c, err) => handler.onResponseError?.(c, err),
    }),
  );
}
