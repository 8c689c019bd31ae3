// The protobuf surface over gRPC, property-based, against a real node
// (buildApp in-process via test/helpers/node.ts, h2c on a real port). For
// every REAPI method (FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs,
// GetTree, GetActionResult, UpdateActionResult, GetCapabilities, ByteStream
// Read / Write / QueryWriteStatus):
//
// - raw frames on a node:http2 client: garbage messages and garbage bodies,
//   truncated messages and truncated frames, a valid message of another
//   type, oversized length prefixes, the compressed flag without a
//   grpc-encoding, unknown flag bits, gzip garbage and a gzip bomb, unknown
//   encodings, empty bodies, duplicated messages, malformed grpc-timeout,
//   client resets mid-request, and Writes gone wrong every way (bad data,
//   short, long, gaps, no finish_write, messages after it, a changed name,
//   bad zstd);
// - typed-but-wrong requests through connect-node's gRPC client.
//
// Every call must end with HTTP 200 and a grpc-status among the precise
// codes (never INTERNAL or UNKNOWN; the one exception is what the gRPC
// spec itself prescribes INTERNAL for, see SPEC_INTERNAL), and afterwards
// the node still serves good requests on the same connection and a new
// one, and nothing half-written is visible: every blob a failed upload
// named is still missing and every action result a failed update named
// is still NOT_FOUND, while what succeeded reads back whole.
import http2 from 'node:http2';
import net from 'node:net';
import { gzipSync } from 'node:zlib';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import type { DescMessage } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import fc from 'fast-check';
import t from 'tap';
import {
  ActionCache,
  ActionResultSchema,
  BatchUpdateBlobsRequestSchema,
  BatchUpdateBlobsResponseSchema,
  Capabilities,
  ContentAddressableStorage,
  DirectorySchema,
  GetTreeRequestSchema,
  TreeSchema,
  UpdateActionResultRequestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, ReadRequestSchema, ReadResponseSchema, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { EMPTY_DIGEST, digestKey, digestOf, toProtoDigest } from '../../src/digest.ts';
import { startNode } from '../helpers/node.ts';
import { KNOWN_DIGEST, Ledger, NONE, PRECISE, REQUESTS, seedStore } from './requests.ts';
import type { Named, Request } from './requests.ts';
import { Tally, checkAsync, nastyString } from './property.ts';

const MiB = 1024 * 1024;

// ---- the node, a raw HTTP/2 session and typed clients ----

const node = await startNode();
const session = connect();
/** An h2c session with Nagle off: small frames followed by END_STREAM otherwise wait out a delayed ACK. */
function connect(): http2.ClientHttp2Session {
  const s = http2.connect(node.url, { createConnection: () => net.connect({ host: '127.0.0.1', port: node.port, noDelay: true }) });
  s.on('error', () => {});
  return s;
}
const transport = createGrpcTransport({ baseUrl: node.url });
const cas = createClient(ContentAddressableStorage, transport);
const ac = createClient(ActionCache, transport);
const bytestream = createClient(ByteStream, transport);
const capabilities = createClient(Capabilities, transport);
t.teardown(async () => {
  session.close();
  await node.close();
});

await seedStore(node.cas);
const ledger = new Ledger();

/** Each method with a way to send its request through connect-node's gRPC client. */
const TYPED: Record<string, (r: Request) => Promise<unknown>> = {
  FindMissingBlobs: (r) => cas.findMissingBlobs(r.messages[0] as never),
  BatchUpdateBlobs: (r) => cas.batchUpdateBlobs(r.messages[0] as never),
  BatchReadBlobs: (r) => cas.batchReadBlobs(r.messages[0] as never),
  GetTree: async (r) => {
    for await (const _ of cas.getTree(r.messages[0] as never)) void _;
  },
  GetActionResult: (r) => ac.getActionResult(r.messages[0] as never),
  UpdateActionResult: (r) => ac.updateActionResult(r.messages[0] as never),
  GetCapabilities: (r) => capabilities.getCapabilities(r.messages[0] as never),
  'ByteStream.Read': async (r) => {
    for await (const _ of bytestream.read(r.messages[0] as never)) void _;
  },
  'ByteStream.Write': (r) =>
    bytestream.write(
      (async function* () {
        yield* r.messages as never[];
      })(),
    ),
  'ByteStream.QueryWriteStatus': (r) => bytestream.queryWriteStatus(r.messages[0] as never),
};
const METHODS = REQUESTS.map((spec) => ({ ...spec, typed: TYPED[spec.name]! }));

// ---- what counts as precise ----

/**
 * The gRPC spec prescribes INTERNAL for a message flagged compressed on a
 * stream without a grpc-encoding (doc/compression.md, test case 6), and
 * implementations (grpc-go, connect-es) answer INTERNAL for unknown flag
 * bits too; those two framing errors alone may be INTERNAL, and only with
 * a message that names the problem.
 */
const SPEC_INTERNAL = /compress|flag/i;

/**
 * Messages go to clients, logs and metrics labels: every part of a request
 * quoted in one has its non-printable characters escaped (quote() in
 * src/services/instance-name.ts), so none appears raw.
 */
const NON_PRINTABLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u;

/** Fails (throws) on a message with a raw non-printable character. */
function checkMessage(method: string, kind: string, message: string): void {
  if (NON_PRINTABLE.test(message)) throw new Error(`${method} ${kind}: raw non-printable character in ${JSON.stringify(message)}`);
}

function codeName(code: number): string {
  return code === 0 ? 'ok' : code === -1 ? 'no grpc-status' : code === -2 ? 'no answer in 15 s' : (Code[code] ?? `code ${code}`);
}

// ---- raw gRPC calls ----

interface RawResult {
  readonly httpStatus: number;
  /** grpc-status; -1 when the response had none, -2 when none came in time. */
  readonly code: number;
  readonly message: string;
  readonly body: Buffer;
}

function frame(body: Uint8Array, flags = 0, length = body.byteLength): Buffer {
  const out = Buffer.alloc(5 + body.byteLength);
  out[0] = flags;
  out.writeUInt32BE(length, 1);
  out.set(body, 5);
  return out;
}

function messagesOf(body: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let pos = 0; pos + 5 <= body.length; ) {
    const len = body.readUInt32BE(pos + 1);
    out.push(body.subarray(pos + 5, pos + 5 + len));
    pos += 5 + len;
  }
  return out;
}

/**
 * One call: writes `chunks` and ends the request (or resets the stream
 * after them, for `reset`); resolves with the status once the response ends.
 */
function rawCall(
  path: string,
  chunks: readonly Buffer[],
  headers: Record<string, string>,
  reset = false,
  sess: http2.ClientHttp2Session = session,
): Promise<RawResult> {
  const stream = sess.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers', ...headers });
  return new Promise((resolve) => {
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders | undefined;
    const body: Buffer[] = [];
    let done = false;
    const timer = setTimeout(() => finish(-2), 15_000);
    const finish = (forced?: number) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
      const status = trailers ?? head;
      const raw = status['grpc-status'];
      resolve({
        httpStatus: Number(head[':status'] ?? 0),
        code: forced ?? (raw === undefined ? -1 : Number(raw)),
        message: decodeURIComponent(String(status['grpc-message'] ?? '')),
        body: Buffer.concat(body),
      });
    };
    stream.on('response', (h) => (head = h));
    stream.on('data', (c: Buffer) => body.push(c));
    stream.on('trailers', (h) => (trailers = h));
    stream.on('error', () => {});
    stream.on('end', () => finish());
    stream.on('close', () => finish());
    void (async () => {
      const last = reset ? undefined : chunks[chunks.length - 1];
      for (const c of last === undefined ? chunks : chunks.slice(0, -1)) {
        if (stream.destroyed) return;
        if (!stream.write(c)) await new Promise((r) => stream.once('drain', r));
      }
      if (reset) stream.close(http2.constants.NGHTTP2_CANCEL);
      // The last chunk goes with END_STREAM.
      else if (last !== undefined) stream.end(last);
      else stream.end();
    })().catch(() => {});
  });
}

// ---- one valid-shaped request per method (typed, and often wrong in its values) ----

// ---- raw cases ----

const OTHER_TYPES: readonly [DescMessage, Record<string, unknown>][] = [
  [ActionResultSchema, { exitCode: 3, outputFiles: [{ path: 'a', digest: toProtoDigest(KNOWN_DIGEST) }], stdoutRaw: new Uint8Array([1, 2, 3]) }],
  [TreeSchema, { root: { files: [{ name: 'x', digest: toProtoDigest(KNOWN_DIGEST) }] }, children: [{}] }],
  [DirectorySchema, { files: [{ name: 'f', digest: toProtoDigest(EMPTY_DIGEST), isExecutable: true }] }],
  [WriteRequestSchema, { resourceName: 'uploads/u/blobs/x/1', writeOffset: -5n, finishWrite: true, data: new Uint8Array(9) }],
  [BatchUpdateBlobsRequestSchema, { requests: [{ digest: toProtoDigest(KNOWN_DIGEST), data: new Uint8Array(3) }] }],
  [GetTreeRequestSchema, { pageSize: -1, pageToken: 'x' }],
  [UpdateActionResultRequestSchema, { instanceName: 'main', actionResult: { exitCode: 1 } }],
];

const RAW_KINDS = [
  'valid',
  'garbage-message',
  'garbage-body',
  'truncated-message',
  'truncated-frame',
  'other-type',
  'oversized-prefix',
  'compressed-no-encoding',
  'unknown-flags',
  'gzip-garbage',
  'gzip-valid',
  'gzip-bomb',
  'unknown-encoding',
  'empty-body',
  'duplicated',
  'bad-timeout',
  'client-reset',
] as const;
type RawKind = (typeof RAW_KINDS)[number];

interface RawCase {
  /** The method's name (its entry in METHODS): the counterexample fast-check prints stays plain data. */
  readonly method: string;
  readonly kind: RawKind;
  readonly chunks: readonly Buffer[];
  readonly headers: Record<string, string>;
  readonly reset: boolean;
  readonly named: Named;
  /** Whether this request's framing is one the spec answers with INTERNAL. */
  readonly specInternal: boolean;
}

/** 80 MiB of zeros, gzipped (~80 KiB): past every message limit once inflated. */
const GZIP_BOMB = gzipSync(Buffer.alloc(80 * MiB));

const rawCase: fc.Arbitrary<RawCase> = fc
  .record({
    methodIndex: fc.nat(METHODS.length - 1),
    kind: fc.constantFrom(...RAW_KINDS),
    garbage: fc.uint8Array({ minLength: 0, maxLength: 300 }),
    cut: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
    other: fc.nat(OTHER_TYPES.length - 1),
    oversize: fc.integer({ min: 4 * MiB + 1, max: 0xffffffff }),
    flags: fc.integer({ min: 2, max: 255 }),
    encoding: fc.constantFrom('br', 'snappy', 'x-nope', 'GZIP2', '*'),
    timeout: fc.oneof(fc.constantFrom('', '1', 'S', '-1S', '123456789S', '1h', '1.5S', '10x'), nastyString(6).map((s) => s.replace(/[^\x20-\x7e]/g, '?'))),
  })
  .chain((c) => METHODS[c.methodIndex]!.request.map((req) => ({ ...c, req })))
  .map(({ methodIndex, kind, garbage, cut, other, oversize, flags, encoding, timeout, req }) => {
    const method = METHODS[methodIndex]!;
    const encoded = req.messages.map((m) => Buffer.from(toBinary(req.schema, m)));
    const frames = encoded.map((b) => frame(b));
    const first = encoded[0]!;
    let chunks: Buffer[] = frames;
    let headers: Record<string, string> = {};
    let named = req.named;
    let specInternal = false;
    let reset = false;
    switch (kind) {
      case 'valid':
        break;
      case 'garbage-message':
        chunks = [frame(garbage)];
        named = NONE;
        break;
      case 'garbage-body':
        chunks = garbage.length === 0 ? [Buffer.from([0x7f])] : [Buffer.from(garbage)];
        named = NONE;
        specInternal = true; // its first byte is a flags byte
        break;
      case 'truncated-message':
        chunks = [frame(first.subarray(0, Math.floor(cut * first.length)))];
        break;
      case 'truncated-frame': {
        const all = Buffer.concat(frames);
        chunks = [all.subarray(0, Math.max(1, Math.floor(cut * all.length)))];
        break;
      }
      case 'other-type': {
        const [schema, init] = OTHER_TYPES[other]!;
        chunks = [frame(toBinary(schema, create(schema, init as never)))];
        named = NONE;
        break;
      }
      case 'oversized-prefix':
        chunks = [frame(first.subarray(0, 16), 0, oversize)];
        break;
      case 'compressed-no-encoding':
        chunks = [frame(first, 1), ...frames.slice(1)];
        specInternal = true;
        break;
      case 'unknown-flags':
        chunks = [frame(first, flags), ...frames.slice(1)];
        specInternal = true;
        break;
      case 'gzip-garbage':
        headers = { 'grpc-encoding': 'gzip' };
        chunks = [frame(garbage, 1)];
        named = NONE;
        break;
      case 'gzip-valid':
        headers = { 'grpc-encoding': 'gzip' };
        chunks = encoded.map((b) => frame(gzipSync(b), 1));
        break;
      case 'gzip-bomb':
        headers = { 'grpc-encoding': 'gzip' };
        chunks = [frame(GZIP_BOMB, 1)];
        named = NONE;
        break;
      case 'unknown-encoding':
        headers = { 'grpc-encoding': encoding };
        chunks = [frame(first, 1)];
        break;
      case 'empty-body':
        chunks = [];
        named = NONE;
        break;
      case 'duplicated':
        chunks = [...frames, ...frames];
        break;
      case 'bad-timeout':
        headers = { 'grpc-timeout': timeout };
        break;
      case 'client-reset': {
        const all = Buffer.concat(frames);
        chunks = [all.subarray(0, Math.floor(cut * all.length))];
        reset = true;
        break;
      }
    }
    return { method: method.name, kind, chunks, headers, reset, named, specInternal } satisfies RawCase;
  });

t.test('raw gRPC frames: every call ends in a precise status', async (t) => {
  const byMethod = new Map<string, Tally>();
  const byKind = new Map<string, Tally>();
  const all = new Tally();
  await checkAsync(
    t,
    'raw frames',
    fc.asyncProperty(rawCase, async (c) => {
      const method = METHODS.find((m) => m.name === c.method)!;
      const res = await rawCall(method.path, c.chunks, c.headers, c.reset);
      let outcome: string;
      if (c.reset) {
        outcome = 'client reset';
        ledger.note(c.named, false);
      } else {
        if (res.httpStatus !== 200) throw new Error(`${c.method} ${c.kind}: HTTP ${res.httpStatus}, ${codeName(res.code)} ${res.message}`);
        const precise =
          res.code === 0 || PRECISE.has(res.code) || (c.specInternal && res.code === Code.Internal && SPEC_INTERNAL.test(res.message));
        if (!precise) throw new Error(`${c.method} ${c.kind}: ${codeName(res.code)} ${JSON.stringify(res.message)}`);
        checkMessage(c.method, c.kind, res.message);
        outcome = res.code === Code.Internal ? 'INTERNAL (framing, as the gRPC spec prescribes)' : codeName(res.code);
        if (res.code === 0 && c.method === 'BatchUpdateBlobs') {
          const response = fromBinary(BatchUpdateBlobsResponseSchema, messagesOf(res.body)[0] ?? new Uint8Array());
          const ok = new Set<string>();
          for (const r of response.responses) {
            const code = r.status?.code ?? 0;
            if (code !== 0 && !PRECISE.has(code)) throw new Error(`BatchUpdateBlobs ${c.kind}: per-blob ${codeName(code)} ${r.status?.message}`);
            if (code === 0 && r.digest !== undefined) ok.add(`${r.digest.hash}/${r.digest.sizeBytes}`);
          }
          ledger.note(c.named, (d) => ok.has(digestKey(d)));
        } else {
          ledger.note(c.named, res.code === 0);
        }
      }
      all.add(outcome);
      for (const [map, key] of [[byMethod, c.method], [byKind, c.kind]] as const) {
        if (!map.has(key)) map.set(key, new Tally());
        map.get(key)!.add(outcome);
      }
      return true;
    }),
    1700,
  );
  t.comment(`gRPC raw frames: ${all.summary()}`);
  for (const [name, tally] of byMethod) t.comment(`  ${name}: ${tally.summary()}`);
  for (const [kind, tally] of byKind) t.comment(`  ${kind}: ${tally.summary()}`);
});

t.test('typed-but-wrong requests through connect-node: every call ends in a precise status', async (t) => {
  const all = new Tally();
  const byMethod = new Map<string, Tally>();
  const typedCase = fc.nat(METHODS.length - 1).chain((i) => METHODS[i]!.request.map((req) => ({ method: METHODS[i]!, req })));
  await checkAsync(
    t,
    'typed requests',
    fc.asyncProperty(typedCase, async ({ method, req }) => {
      let outcome: string;
      try {
        const res = await method.typed(req);
        outcome = 'ok';
        if (method.name === 'BatchUpdateBlobs') {
          const responses = (res as { responses: { digest?: { hash: string; sizeBytes: bigint }; status?: { code: number; message: string } }[] }).responses;
          const ok = new Set<string>();
          for (const r of responses) {
            const code = r.status?.code ?? 0;
            if (code !== 0 && !PRECISE.has(code)) throw new Error(`BatchUpdateBlobs: per-blob ${codeName(code)} ${r.status?.message}`);
            if (code === 0 && r.digest !== undefined) ok.add(`${r.digest.hash}/${r.digest.sizeBytes}`);
          }
          ledger.note(req.named, (d) => ok.has(digestKey(d)));
        } else {
          ledger.note(req.named, true);
        }
      } catch (err) {
        if (!(err instanceof ConnectError)) throw err;
        if (!PRECISE.has(err.code)) throw new Error(`${method.name}: ${codeName(err.code)} ${JSON.stringify(err.rawMessage)}`);
        checkMessage(method.name, 'typed', err.rawMessage);
        outcome = codeName(err.code);
        ledger.note(req.named, false);
      }
      all.add(outcome);
      if (!byMethod.has(method.name)) byMethod.set(method.name, new Tally());
      byMethod.get(method.name)!.add(outcome);
      return true;
    }),
    800,
  );
  t.comment(`gRPC typed requests (connect-node): ${all.summary()}`);
  for (const [name, tally] of byMethod) t.comment(`  ${name}: ${tally.summary()}`);
});

t.test('a gzip-compressed message that does not decompress is INVALID_ARGUMENT on every method', async (t) => {
  for (const method of METHODS) {
    const res = await rawCall(method.path, [frame(Buffer.from([0x1f, 0x8b, 0x08]), 1)], { 'grpc-encoding': 'gzip' });
    t.equal(codeName(res.code), 'InvalidArgument', `${method.name}: ${codeName(res.code)} ${JSON.stringify(res.message)}`);
  }
});

t.test('a Write error message carries no raw control or format character from the resource name', async (t) => {
  const data = Buffer.from('abc');
  const d = digestOf(data);
  for (const [uuid, second] of [['u\u202ev', undefined], ['u\nv', undefined], ['u', `uploads/u/blobs/${d.hash}/3\u0000`]] as const) {
    const name = `uploads/${uuid}/blobs/${d.hash}/${d.size}`;
    const messages =
      second === undefined
        ? [{ resourceName: name, finishWrite: true, data: Buffer.from('abd') }]
        : [{ resourceName: name, data: data.subarray(0, 1) }, { resourceName: second, writeOffset: 1n, finishWrite: true, data: data.subarray(1) }];
    const res = await rawCall(`/${ByteStream.typeName}/Write`, messages.map((m) => frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, m)))), {});
    t.equal(codeName(res.code), 'InvalidArgument', `${JSON.stringify(name)}: ${JSON.stringify(res.message)}`);
    t.notOk(NON_PRINTABLE.test(res.message), 'no raw non-printable character in the message');
  }
});

t.test('afterwards: the node serves good requests, and nothing half-written is visible', async (t) => {
  // A good Write, Read and FindMissing on the raw session and on a new one.
  const fresh = connect();
  try {
    for (const sess of [session, fresh]) {
      const data = Buffer.from(`still serving ${sess === session ? 'the old' : 'a new'} connection`);
      const d = digestOf(data);
      const write = await rawCall(
        `/${ByteStream.typeName}/Write`,
        [frame(toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName: `uploads/x/blobs/${d.hash}/${d.size}`, finishWrite: true, data })))],
        {},
        false,
        sess,
      );
      t.equal(codeName(write.code), 'ok', `Write on ${sess === session ? 'the same' : 'a new'} connection (${write.message})`);
      const read = await rawCall(`/${ByteStream.typeName}/Read`, [frame(toBinary(ReadRequestSchema, create(ReadRequestSchema, { resourceName: `blobs/${d.hash}/${d.size}` })))], {}, false, sess);
      t.equal(codeName(read.code), 'ok', 'Read');
      t.ok(Buffer.concat(messagesOf(read.body).map((m) => fromBinary(ReadResponseSchema, m).data)).equals(data), 'Read returns the bytes');
    }
  } finally {
    fresh.close();
  }
  const stillMissing = await cas.findMissingBlobs({ blobDigests: [toProtoDigest(KNOWN_DIGEST)] });
  t.same(stillMissing.missingBlobDigests, [], 'FindMissing answers, and the blob stored before the run is still there');

  t.comment(`gRPC, nothing half-written: ${await ledger.verify(t, cas, ac)}`);
});
