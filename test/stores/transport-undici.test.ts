// The slow-consumer test of test/stores/transport-backpressure.test.ts, for
// the undici-based candidates in test/helpers/undici-transport.ts:
//
// - the Connect protocol over HTTP/1.1 on an undici Pool, against this
//   project's storage node (the python grpcio shard speaks only gRPC);
// - gRPC over h2c on an undici Client, against the python grpcio shard and
//   against our node.
//
// A large ByteStream Read is consumed slowly, slowest near the end, so that
// undici reports the response complete (HTTP/2 trailers, or the end of the
// HTTP/1.1 body) while data is still unread. A transport that completes the
// call then and drops what was buffered yields a short blob; the Connect and
// gRPC protocols only notice when the end-of-stream marker itself is lost.
// Every byte and the sha256 are checked, on a bare ByteStream client (the
// remote store's own length check would mask a truncating transport).
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { create } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';
import t, { type Test } from 'tap';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { digestOf } from '../../src/digest.ts';
import { createShardTransport } from '../../src/transport.ts';
import {
  createUndiciConnectTransport,
  createUndiciGrpcTransport,
  type UndiciShardTransport,
  type UndiciTransportOptions,
} from '../helpers/undici-transport.ts';
import { startNode } from '../helpers/node.ts';
import { startPyShard } from '../helpers/py-shard.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
/** ReadResponse size the python shard sends, and WriteRequest size we send. */
const MESSAGE = 64 * 1024;

const data = randomBytes(SIZE);
const digest = digestOf(data);
const resourceName = `blobs/${digest.hash}/${digest.size}`;
/**
 * A second blob for the write test: a digest the node already holds
 * completes early (after the first message), which would not exercise the
 * client-streamed upload, and over HTTP/1.1 leaves the server's connection
 * open until its drain timeout (a server-side matter, see the report).
 */
const other = Buffer.from(data);
other[0] = other[0]! ^ 1;
const otherDigest = digestOf(other);

type Factory = (opts: UndiciTransportOptions) => UndiciShardTransport;

/** Uploads the blob over the current transport (node:http2), which the other test file proves. */
async function upload(url: string): Promise<void> {
  const st = createShardTransport({ url });
  try {
    await write(createClient(ByteStream, st.transport));
  } finally {
    st.close();
  }
}

async function write(bs: ReturnType<typeof createClient<typeof ByteStream>>, blob = data): Promise<bigint> {
  const name = `uploads/${crypto.randomUUID()}/blobs/${digestOf(blob).hash}/${blob.length}`;
  const res = await bs.write(
    (async function* () {
      for (let o = 0; o < SIZE; o += MESSAGE) {
        yield create(WriteRequestSchema, {
          resourceName: o === 0 ? name : '',
          writeOffset: BigInt(o),
          data: blob.subarray(o, o + MESSAGE),
          finishWrite: o + MESSAGE >= SIZE,
        });
      }
    })(),
  );
  return res.committedSize;
}

interface SlowReadResult {
  /** Bytes the consumer got, and their sha256. */
  readonly consumed: number;
  readonly sha256: string;
  /** The call's error, if it failed (a loud failure is acceptable; a short OK is not). */
  readonly error: unknown;
  /** Bytes the consumer had taken when undici reported the response complete; -1 if never. */
  readonly consumedAtEnd: number;
  /** Response body bytes undici delivered to the Readable, in all (envelope/frame headers included). */
  readonly delivered: number;
  /** grpc-status in the trailers undici reported (HTTP/2 only). */
  readonly grpcStatus: string | undefined;
}

/** Reads the blob slowly over a bare ByteStream client on an undici transport. */
async function slowRead(t: Test, factory: Factory, url: string): Promise<SlowReadResult> {
  let consumed = 0;
  let consumedAtEnd = -1;
  let delivered = 0;
  let grpcStatus: string | undefined;
  const st = factory({
    url,
    hooks: {
      onResponseData: (_path, bytes) => {
        delivered += bytes;
      },
      onResponseEnd: (_path, trailers) => {
        consumedAtEnd = consumed;
        const status = trailers['grpc-status'];
        grpcStatus = Array.isArray(status) ? status[0] : status;
      },
    },
  });
  t.teardown(() => st.close());
  const bs = createClient(ByteStream, st.transport);
  const h = createHash('sha256');
  let messages = 0;
  let error: unknown;
  try {
    for await (const res of bs.read({ resourceName })) {
      h.update(res.data);
      consumed += res.data.byteLength;
      messages++;
      // Slow all along, and slowest near the end, so that the server gets to
      // send its last window and the end of the stream while we are not reading.
      if (SIZE - consumed <= 4 * MiB) await sleep(15);
      else if (messages % 16 === 0) await sleep(2);
    }
  } catch (err) {
    error = err;
  }
  return { consumed, sha256: h.digest('hex'), error, consumedAtEnd, delivered, grpcStatus };
}

/** The property every adopted transport must have: all bytes, right hash, end seen while data was unread. */
function assertComplete(t: Test, r: SlowReadResult): void {
  t.error(r.error, 'the read ends without an error');
  t.equal(r.consumed, SIZE, 'every byte arrived');
  t.equal(r.sha256, digest.hash, 'sha256 matches');
  t.ok(r.consumedAtEnd >= 0, 'undici reported the response complete');
  // The condition under test: the response completed while data was still
  // unread by the consumer (buffered in undici's body Readable and below).
  t.ok(SIZE - r.consumedAtEnd > 0, `response completed with ${SIZE - r.consumedAtEnd} of ${SIZE} bytes not yet consumed`);
  t.comment(`undici delivered ${r.delivered} body bytes; the consumer had ${r.consumedAtEnd} when the response completed`);
}

t.test('undici Connect over HTTP/1.1 against this project\'s storage node', async (t) => {
  const node = await startNode();
  t.teardown(() => node.close());
  await upload(node.url);

  await t.test(`slow consumer of a ${SIZE / MiB} MiB read gets every byte`, async (t) => {
    assertComplete(t, await slowRead(t, createUndiciConnectTransport, node.url));
  });

  await t.test(`a client-streamed ${SIZE / MiB} MiB write arrives whole`, async (t) => {
    const st = createUndiciConnectTransport({ url: node.url });
    t.teardown(() => st.close());
    t.equal(await write(createClient(ByteStream, st.transport), other), BigInt(SIZE), 'committed size');
    // The node verified the sha256 before committing; check it holds the bytes.
    const h = createHash('sha256');
    let n = 0;
    for await (const c of await node.cas.get(otherDigest)) {
      h.update(c);
      n += c.byteLength;
    }
    t.equal(n, SIZE, 'the node holds every byte');
    t.equal(h.digest('hex'), otherDigest.hash, 'and their sha256');
  });
});

// undici 8.12.4 over HTTP/2 is NOT adopted: when the trailers arrive while
// the response stream is paused, undici stops listening for data ('data'
// listener removed in its onTrailers) and completes the request, so the DATA
// frames still buffered in the node:http2 stream are dropped although the
// server ended the call with grpc-status 0. connect-es then usually fails the
// call with "incomplete envelope" (the cut fell inside a message); a cut on a
// message boundary would be a short blob with status OK. These tests assert
// the defect is still there; if one fails because every byte arrived, undici
// may have fixed it: make it an assertComplete test and re-run
// bench/transport.ts before reconsidering.
for (const [name, start] of [
  ['the python grpcio shard', async (t: Test) => {
    const shard = await startPyShard({ readChunkBytes: MESSAGE });
    t.teardown(() => shard.stop());
    return shard.url;
  }],
  ["this project's storage node", async (t: Test) => {
    const node = await startNode();
    t.teardown(() => node.close());
    return node.url;
  }],
] as const) {
  t.test(`undici gRPC over h2c against ${name} (known defect)`, async (t) => {
    const url = await start(t);
    await upload(url);
    await t.test(`slow consumer of a ${SIZE / MiB} MiB read loses the data buffered when the trailers arrive`, async (t) => {
      const r = await slowRead(t, createUndiciGrpcTransport, url);
      t.equal(r.grpcStatus, '0', 'the server ended the call OK (grpc-status 0 in the trailers undici delivered)');
      t.ok(r.consumed < SIZE, `yet the consumer got ${r.consumed} of ${SIZE} bytes`);
      t.equal(r.consumedAtEnd, r.consumed, 'nothing reached the consumer after undici completed the response');
      t.comment(
        `undici delivered ${r.delivered} body bytes (gRPC frames); the consumer got ${r.consumed}, ${SIZE - r.consumed} short; ` +
          (r.error === undefined ? 'the call ended OK: silent truncation' : `connect-es reported: ${String(r.error)}`),
      );
    });
  });
}
