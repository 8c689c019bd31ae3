// Proves the shard transport (src/transport.ts) correct under the condition
// that breaks undici as a gRPC client (see that file): a large server-streamed
// ByteStream Read whose consumer is slow, so the response stream is paused
// with unread data buffered when the HTTP/2 trailers (grpc-status) arrive.
// A transport that completes the call on trailers and drops the buffered
// data yields a truncated blob with status OK; this test fails on that.
//
// The server is the python grpcio shard (C-core), not our own code. The read
// goes through a bare ByteStream client on the transport, without the remote
// store, whose own length check would mask a truncating transport.
import { createHash, randomBytes } from 'node:crypto';
import type { ClientHttp2Stream } from 'node:http2';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient } from '@connectrpc/connect';
import t, { type Test } from 'tap';
import { digestOf } from '../../src/digest.ts';
import { RemoteStore } from '../../src/stores/remote-store.ts';
import { TRANSPORT_KIND, createShardTransport } from '../../src/transport.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { startNode } from '../helpers/node.ts';
import { startPyShard } from '../helpers/py-shard.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
/** ReadResponse size the python shard sends. */
const MESSAGE = 64 * 1024;

const data = randomBytes(SIZE);
const digest = digestOf(data);

async function upload(url: string): Promise<void> {
  const writer = new RemoteStore({ name: 'writer', url, tree: 'cas' });
  try {
    await writer.put(digest, (async function* () {
      for (let i = 0; i < SIZE; i += MiB) yield data.subarray(i, i + MiB);
    })());
  } finally {
    await writer.close();
  }
}

interface TrailerObservation {
  /** Bytes the consumer had taken when the trailers frame arrived. */
  readonly consumed: number;
  /** Bytes sitting unread in the HTTP/2 stream's buffer at that moment. */
  readonly buffered: number;
}

/** Reads the blob slowly over a bare ByteStream client and checks every byte arrived. */
async function slowRead(t: Test, url: string): Promise<void> {
  let consumed = 0;
  const observations: TrailerObservation[] = [];
  const shardTransport = createShardTransport({
    url,
    onStream: (stream: ClientHttp2Stream) => {
      stream.once('trailers', () => {
        observations.push({ consumed, buffered: stream.readableLength });
      });
    },
  });
  t.teardown(() => shardTransport.close());
  const bytestream = createClient(ByteStream, shardTransport.transport);

  const h = createHash('sha256');
  let messages = 0;
  for await (const res of bytestream.read({ resourceName: `blobs/${digest.hash}/${digest.size}` })) {
    h.update(res.data);
    consumed += res.data.byteLength;
    messages++;
    // Slow all along, and slowest near the end, so that the server gets to
    // send its last window and the trailers while we are not reading.
    if (SIZE - consumed <= 4 * MiB) await sleep(15);
    else if (messages % 16 === 0) await sleep(2);
  }

  t.equal(consumed, SIZE, 'every byte arrived');
  t.equal(h.digest('hex'), digest.hash, 'sha256 matches');
  t.equal(observations.length, 1, 'trailers observed once');
  const at = observations[0]!;
  // The condition under test: the trailers arrived while at least a window's
  // worth of data was still unread (held in node:http2 and nghttp2 because
  // the consumer was not reading).
  t.ok(SIZE - at.consumed >= 256 * 1024, `trailers arrived with ${SIZE - at.consumed} of ${SIZE} bytes not yet consumed`);
  t.comment(`${messages} messages; ${at.buffered} bytes sat in the stream's readable buffer when the trailers arrived`);
}

t.test(`${TRANSPORT_KIND} against the python grpcio shard`, async (t) => {
  const shard = await startPyShard({ readChunkBytes: MESSAGE });
  t.teardown(() => shard.stop());
  await upload(shard.url);

  await t.test(`slow consumer of a ${SIZE / MiB} MiB read gets every byte`, (t) => slowRead(t, shard.url));

  await t.test('the remote store itself: slow consumer, full blob', async (t) => {
    const store = new RemoteStore({ name: 'py', url: shard.url, tree: 'cas' });
    t.teardown(() => store.close());
    const h = createHash('sha256');
    let n = 0;
    for await (const c of await store.get(digest)) {
      h.update(c);
      n += c.byteLength;
      if (SIZE - n <= 2 * MiB) await sleep(10);
    }
    t.equal(n, SIZE);
    t.equal(h.digest('hex'), digest.hash);
  });
});

t.test(`${TRANSPORT_KIND} against this project's storage node`, async (t) => {
  const node = await startNode();
  // The node's close() waits for idle HTTP/2 sessions: subtests close theirs first.
  t.teardown(() => node.close());
  await upload(node.url);
  await t.test(`slow consumer of a ${SIZE / MiB} MiB read gets every byte`, (t) => slowRead(t, node.url));
});
