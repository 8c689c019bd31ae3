// Resumable uploads from an edge's RemoteStore to a storage node: the shard
// keeps the prefix under the client's upload id, QueryWriteStatus reports it,
// and a put at that offset sends only the rest.
import { randomBytes } from 'node:crypto';
import { Code } from '@connectrpc/connect';
import t from 'tap';
import { digestOf } from '../../src/digest.ts';
import { RemoteStore } from '../../src/stores/remote-store.ts';
import { collect, once } from '../../src/streams.ts';
import { startNode } from '../helpers/node.ts';

/** Yields `data`, waits `ms` (so the edge can pass it on), then fails like a broken client stream. */
async function* breakingAfter(data: Uint8Array, ms = 0): AsyncIterable<Uint8Array> {
  yield data;
  if (ms > 0) await new Promise((resolve) => setTimeout(resolve, ms));
  throw new Error('the client stream broke');
}

t.test('a remote put resumes on a disk storage node', async (t) => {
  const node = await startNode({ stores: 'disk' });
  t.teardown(() => node.close());
  const remote = new RemoteStore({ name: 'node', url: node.url, tree: 'cas' });
  t.teardown(() => remote.close());
  const data = randomBytes(3 * 1024 * 1024 + 7);
  const d = digestOf(data);
  const cut = 1024 * 1024;

  await t.rejects(remote.put(d, breakingAfter(data.subarray(0, cut), 300), { upload: { id: 'edge-u', offset: 0 } }), /broke/);
  // What reached the shard before the cancellation (all of it, unless the machine is very busy).
  const kept = await remote.uploadStatus(d, 'edge-u');
  t.ok(kept > 0 && kept <= cut, `the shard kept what it received (${kept} of ${cut} bytes), under the client upload id`);
  t.equal(await node.cas.uploadStatus!(d, 'edge-u'), kept);
  t.equal(await remote.uploadStatus(d, 'other'), 0);

  await t.rejects(remote.put(d, once(data.subarray(kept + 5)), { upload: { id: 'edge-u', offset: kept + 5 } }), { code: Code.OutOfRange });
  const before = remote.describe().bytesOut as number;
  await remote.put(d, once(data.subarray(kept)), { upload: { id: 'edge-u', offset: kept } });
  t.equal((remote.describe().bytesOut as number) - before, data.byteLength - kept, 'only the rest went over the wire');
  t.same(Buffer.from(await collect(await remote.get(d))), data);
  t.equal(await remote.uploadStatus(d, 'edge-u'), data.byteLength, 'complete: the whole blob');

  // The edge holds back an upload's last piece until its source has ended,
  // so a shard never gets a whole blob from a stream that then broke.
  const small = randomBytes(200_000);
  const ds = digestOf(small);
  await t.rejects(remote.put(ds, breakingAfter(small), { upload: { id: 'w', offset: 0 } }));
  t.equal(await remote.uploadStatus(ds, 'w'), 0);
  // A client that reached the node directly may leave one, though: the
  // resumption is then finish_write alone.
  await t.rejects(node.cas.put(ds, breakingAfter(small), { upload: { id: 'w', offset: 0 } }));
  t.equal(await remote.uploadStatus(ds, 'w'), small.byteLength);
  await remote.put(ds, once(new Uint8Array(0)), { upload: { id: 'w', offset: small.byteLength } });
  t.same(await remote.findMissing([ds]), []);
});
