// An in-process app with its log lines and metrics at hand, and a raw
// node:http2 gRPC client that frames messages by hand, for tests that need
// to send what no well-behaved client would (oversized messages, partial
// messages, cancellations at exact moments):
//
//   const app = await startApp(t, { limits: { ...DEFAULT_LIMITS, maxBatchBlobs: 10 } });
//   const res = await rawCall(app.session, PATH, sendAll([frame(bytes)]));
//   t.equal(res.code, Code.InvalidArgument);
//   t.equal(await app.metric('reapi_edge_rpc_requests_total', { code: 'CANCELLED' }), 1);
import http2 from 'node:http2';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import type { Logger } from 'pino';
import type { Test } from 'tap';
import type { Registry } from 'prom-client';
import { createMetricsRegistry, metricsInterceptor } from '../../src/admin/metrics.ts';
import type { LimitsConfig } from '../../src/config.ts';
import { DEFAULT_LIMITS } from '../../src/config.ts';
import { buildApp } from '../../src/server/app.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { FaultyStore } from './faulty-store.ts';

export interface TestApp {
  /** http://127.0.0.1:PORT */
  readonly url: string;
  /** A shared HTTP/2 session to the app (closed at teardown). */
  readonly session: http2.ClientHttp2Session;
  /** The CAS as the app sees it: a FaultyStore over `memory` (or over `cas` when given). */
  readonly cas: FaultyStore;
  readonly memory: BlobStore;
  /** Every log line the app wrote (level debug and up), parsed. */
  readonly lines: Record<string, unknown>[];
  readonly registry: Registry;
  readonly logger: Logger;
  /** Sum of a metric's samples whose labels match. */
  metric(name: string, labels: Record<string, string>): Promise<number>;
  /** The per-RPC lines of one method ("FindMissingBlobs", "Write", ...). */
  rpcLines(method: string): Record<string, unknown>[];
}

export interface StartAppOptions {
  readonly limits?: Partial<LimitsConfig> | undefined;
  readonly cas?: BlobStore | undefined;
  readonly maxBatchTotalSizeBytes?: number | undefined;
}

export async function startApp(t: Test, opts: StartAppOptions = {}): Promise<TestApp> {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  const logger = pino({ level: 'debug' }, sink);
  const registry = createMetricsRegistry({ defaultMetrics: false });
  const memory = opts.cas ?? new MemoryStore({ maxSizeBytes: 256 << 20, contentAddressed: true });
  const cas = new FaultyStore(memory);
  const limits: LimitsConfig = { ...DEFAULT_LIMITS, ...opts.limits };
  const app = await buildApp({
    deps: {
      cas,
      ac: new MemoryStore({ maxSizeBytes: 16 << 20, contentAddressed: false }),
      logger,
      maxBatchTotalSizeBytes: opts.maxBatchTotalSizeBytes ?? Math.min(4 << 20, limits.maxMessageBytes - 64 * 1024),
      isReady: () => true,
      limits,
    },
    logger,
    limits,
    shutdownTimeoutMs: 1000,
    interceptors: [metricsInterceptor(registry)],
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const address = app.server.address();
  const url = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
  const session = http2.connect(url);
  session.on('error', () => {});
  t.teardown(async () => {
    session.destroy();
    await app.close();
  });
  return {
    url,
    session,
    cas,
    memory,
    lines,
    registry,
    logger,
    async metric(name, labels) {
      const m = registry.getSingleMetric(name);
      if (m === undefined) return 0;
      const { values } = await m.get();
      let sum = 0;
      for (const v of values) {
        if (Object.entries(labels).every(([k, want]) => String((v.labels as Record<string, unknown>)[k]) === want)) sum += v.value;
      }
      return sum;
    },
    rpcLines(method) {
      return lines.filter((l) => typeof l.rpc === 'string' && String(l.rpc).endsWith(`/${method}`));
    },
  };
}

/** One gRPC message: flag byte, 4-byte length, body. */
export function frame(body: Uint8Array, compressed = false): Buffer {
  const out = Buffer.alloc(5 + body.byteLength);
  out[0] = compressed ? 1 : 0;
  out.writeUInt32BE(body.byteLength, 1);
  out.set(body, 5);
  return out;
}

/** Just the prefix of a message announcing `length` bytes. */
export function prefix(length: number): Buffer {
  const out = Buffer.alloc(5);
  out.writeUInt32BE(length, 1);
  return out;
}

export interface RawResult {
  readonly httpStatus: number;
  readonly code: number;
  readonly message: string;
  readonly body: Buffer;
}

/**
 * One gRPC call on `session`: `drive` writes the request; resolves once the
 * response has ended (status from the trailers, or the headers for a
 * trailers-only answer), cancelling the request side if still open.
 */
export function rawCall(
  session: http2.ClientHttp2Session,
  path: string,
  drive: (stream: http2.ClientHttp2Stream) => void | Promise<void>,
  headers: Record<string, string> = {},
): Promise<RawResult> {
  const stream = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers', ...headers });
  return new Promise((resolve, reject) => {
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders | undefined;
    const chunks: Buffer[] = [];
    stream.on('response', (h) => (head = h));
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('trailers', (h) => (trailers = h));
    stream.on('error', () => {});
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      const status = trailers ?? head;
      resolve({
        httpStatus: Number(head[':status']),
        code: status['grpc-status'] === undefined ? -1 : Number(status['grpc-status']),
        message: decodeURIComponent(String(status['grpc-message'] ?? '')),
        body: Buffer.concat(chunks),
      });
    };
    stream.on('end', finish);
    stream.on('close', finish);
    Promise.resolve(drive(stream)).catch(reject);
  });
}

/** Writes `messages` in pieces of at most 64 KiB (as a flow-controlled client would), then ends unless told not to. */
export function sendAll(messages: readonly Buffer[], end = true): (s: http2.ClientHttp2Stream) => Promise<void> {
  return async (s) => {
    for (const m of messages) {
      for (let off = 0; off < m.length; off += 64 * 1024) {
        if (s.closed || s.destroyed) return;
        if (!s.write(m.subarray(off, off + 64 * 1024))) await new Promise((r) => { s.once('drain', r); s.once('close', r); });
      }
    }
    if (end && !s.closed && !s.destroyed) s.end();
  };
}

/** The messages of a gRPC response body. */
export function messagesOf(body: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  while (pos + 5 <= body.length) {
    const len = body.readUInt32BE(pos + 1);
    out.push(body.subarray(pos + 5, pos + 5 + len));
    pos += 5 + len;
  }
  return out;
}

export async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

let blobSeed = 1;
/** A fresh pseudo-random blob of `size` bytes (xorshift; a new one each call, cheap to make). */
export function blobOf(size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  let x = (blobSeed++ * 0x9e3779b1) >>> 0;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}
