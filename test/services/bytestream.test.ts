import { randomBytes } from 'node:crypto';
import http2 from 'node:http2';
import type { AddressInfo } from 'node:net';
import { zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import t from 'tap';
import type { Test } from 'tap';
import { pino } from 'pino';
import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import type { Client, ConnectRouter, Transport } from '@connectrpc/connect';
import { connectNodeAdapter, createGrpcTransport } from '@connectrpc/connect-node';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import type { WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { digestOf, EMPTY_DIGEST } from '../../src/digest.ts';
import { DiskStore } from '../../src/stores/disk-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { createByteStreamService, READ_CHUNK_BYTES } from '../../src/services/bytestream.ts';
import { readResourceName, writeResourceName } from '../../src/services/resource-name.ts';

type WriteInit = MessageInitShape<typeof WriteRequestSchema>;

const KiB = 1024;
const MiB = 1024 * KiB;

interface Harness {
  cas: MemoryStore;
  client: Client<typeof ByteStream>;
}

function routes(cas: MemoryStore) {
  return (router: ConnectRouter) => {
    router.service(
      ByteStream,
      createByteStreamService({
        cas,
        ac: new MemoryStore({ maxSizeBytes: MiB, contentAddressed: false }),
        logger: pino({ level: 'silent' }),
        maxBatchTotalSizeBytes: 4 * MiB,
        isReady: () => true,
      }),
    );
  };
}

function harness(): Harness {
  const cas = new MemoryStore({ maxSizeBytes: 256 * MiB, contentAddressed: true });
  const transport: Transport = createRouterTransport(routes(cas));
  return { cas, client: createClient(ByteStream, transport) };
}

async function readAll(
  client: Client<typeof ByteStream>,
  resourceName: string,
  readOffset = 0n,
  readLimit = 0n,
): Promise<{ data: Buffer; sizes: number[] }> {
  const parts: Uint8Array[] = [];
  for await (const res of client.read({ resourceName, readOffset, readLimit })) parts.push(res.data);
  return { data: Buffer.concat(parts), sizes: parts.map((p) => p.byteLength) };
}

/** Write messages for `data` in `size`-byte pieces, finish_write on the last. */
function messages(resourceName: string, data: Uint8Array, size = 16 * KiB): WriteInit[] {
  const out: WriteInit[] = [];
  for (let off = 0; off < data.byteLength || out.length === 0; off += size) {
    out.push({
      resourceName: off === 0 ? resourceName : '',
      writeOffset: BigInt(off),
      data: data.subarray(off, Math.min(off + size, data.byteLength)),
      finishWrite: off + size >= data.byteLength,
    });
  }
  return out;
}

async function* stream(msgs: WriteInit[], pulled?: { count: number }): AsyncGenerator<WriteInit> {
  for (const m of msgs) {
    if (pulled) pulled.count++;
    yield m;
  }
}

async function rejectsWith(t: Test, p: Promise<unknown>, code: Code, message: RegExp): Promise<void> {
  try {
    await p;
  } catch (err) {
    t.ok(err instanceof ConnectError, 'a ConnectError');
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], Code[code], `code (${ce.rawMessage})`);
    t.match(ce.rawMessage, message, 'message');
    return;
  }
  t.fail('expected the call to fail');
}

async function isMissing(cas: MemoryStore, d: Digest): Promise<boolean> {
  return (await cas.findMissing([d])).length === 1;
}

t.test('Read', async (t) => {
  const { cas, client } = harness();
  const blob = randomBytes(100 * KiB + 7);
  const d = digestOf(blob);
  await cas.put(d, (async function* () { yield blob; })());
  const name = readResourceName('', d);

  t.test('whole blob, with and without an instance name and metadata suffix', async (t) => {
    t.ok((await readAll(client, name)).data.equals(blob));
    t.ok((await readAll(client, readResourceName('a/b', d))).data.equals(blob));
    t.ok((await readAll(client, `${name}/some/file.txt`)).data.equals(blob));
  });

  t.test('offset and limit', async (t) => {
    t.ok((await readAll(client, name, 1000n)).data.equals(blob.subarray(1000)), 'offset');
    t.ok((await readAll(client, name, 0n, 10n)).data.equals(blob.subarray(0, 10)), 'limit');
    t.ok((await readAll(client, name, 5n, 10n)).data.equals(blob.subarray(5, 15)), 'offset + limit');
    t.ok((await readAll(client, name, 5n, 10n ** 15n)).data.equals(blob.subarray(5)), 'limit past the end');
    t.equal((await readAll(client, name, BigInt(blob.byteLength))).data.byteLength, 0, 'offset == size');
  });

  t.test('OUT_OF_RANGE', async (t) => {
    await rejectsWith(t, readAll(client, name, -1n), Code.OutOfRange, /read_offset -1 is negative/);
    await rejectsWith(t, readAll(client, name, 0n, -1n), Code.OutOfRange, /read_limit -1 is negative/);
    await rejectsWith(
      t,
      readAll(client, name, BigInt(blob.byteLength + 1)),
      Code.OutOfRange,
      /read_offset 102408 is past the end of blob [0-9a-f]{64}-102407/,
    );
  });

  t.test('NOT_FOUND and malformed names', async (t) => {
    const other = digestOf(Buffer.from('not stored'));
    await rejectsWith(t, readAll(client, readResourceName('', other)), Code.NotFound, /not found/);
    await rejectsWith(t, readAll(client, `blobs/${d.hash}`), Code.InvalidArgument, /missing size/);
    await rejectsWith(t, readAll(client, `../blobs/${d.hash}/${d.size}`), Code.InvalidArgument, /"\.\."/);
    t.ok((await readAll(client, name)).data.equals(blob), 'still serving');
  });

  t.test('the empty blob is always readable', async (t) => {
    const r = await readAll(client, readResourceName('', EMPTY_DIGEST));
    t.equal(r.data.byteLength, 0);
  });
});

t.test('Read of a 10 MiB blob comes in messages well under 4 MiB', async (t) => {
  const { cas, client } = harness();
  const blob = randomBytes(10 * MiB);
  const d = digestOf(blob);
  await cas.put(d, (async function* () { yield blob; })());
  const { data, sizes } = await readAll(client, readResourceName('', d));
  t.ok(data.equals(blob), 'content');
  t.ok(READ_CHUNK_BYTES < 4 * MiB);
  t.ok(Math.max(...sizes) <= READ_CHUNK_BYTES, `largest message ${Math.max(...sizes)} bytes`);
  t.ok(sizes.length >= Math.ceil((10 * MiB) / READ_CHUNK_BYTES), `${sizes.length} messages`);
});

t.test('Write', async (t) => {
  t.test('happy path in 16 KiB messages', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(MiB + 123);
    const d = digestOf(blob);
    const res = await client.write(stream(messages(writeResourceName('inst', 'u1', d), blob)));
    t.equal(res.committedSize, BigInt(blob.byteLength));
    t.notOk(await isMissing(cas, d), 'stored');
    t.ok((await readAll(client, readResourceName('inst', d))).data.equals(blob), 'reads back');
  });

  t.test('resource_name repeated on every message is fine', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(40 * KiB);
    const d = digestOf(blob);
    const name = writeResourceName('', 'u', d, 'identity');
    const msgs = messages(name, blob).map((m) => ({ ...m, resourceName: name }));
    t.equal((await client.write(stream(msgs))).committedSize, BigInt(blob.byteLength));
    t.notOk(await isMissing(cas, d));
  });

  t.test('protocol violations are INVALID_ARGUMENT and store nothing', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(64 * KiB);
    const d = digestOf(blob);
    const name = writeResourceName('', 'u', d);
    const good = () => messages(name, blob);

    const gap = good();
    gap[2] = { ...gap[2], writeOffset: 40000n };
    await rejectsWith(t, client.write(stream(gap)), Code.InvalidArgument, /write_offset 40000 is not contiguous: expected 32768/);

    const late = good();
    late[0] = { ...late[0], writeOffset: 100n };
    // The memory store keeps no partial uploads: any offset but 0 is past what it holds.
    await rejectsWith(t, client.write(stream(late)), Code.OutOfRange, /write_offset 100 is beyond the 0 bytes this server holds of the upload/);

    const renamed = good();
    renamed[1] = { ...renamed[1], resourceName: writeResourceName('', 'other', d) };
    await rejectsWith(t, client.write(stream(renamed)), Code.InvalidArgument, /resource_name changed mid-stream to "uploads\/other\//);

    const after = [...good(), { writeOffset: BigInt(blob.byteLength), data: new Uint8Array(3) }];
    await rejectsWith(t, client.write(stream(after)), Code.InvalidArgument, /a message \(write_offset 65536, 3 bytes\) followed finish_write/);

    const unfinished = good().map((m) => ({ ...m, finishWrite: false }));
    await rejectsWith(t, client.write(stream(unfinished)), Code.InvalidArgument, /ended after 65536 bytes without finish_write/);

    const nameless = good();
    nameless[0] = { ...nameless[0], resourceName: '' };
    await rejectsWith(t, client.write(stream(nameless)), Code.InvalidArgument, /first message must set resource_name/);

    await rejectsWith(t, client.write(stream([])), Code.InvalidArgument, /carried no message/);
    await rejectsWith(
      t,
      client.write(stream(messages(`blobs/${d.hash}/${d.size}`, blob))),
      Code.InvalidArgument,
      /no "uploads" segment/,
    );

    t.ok(await isMissing(cas, d), 'nothing was stored');
  });

  t.test('content that does not match the digest is rejected and not stored', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(50 * KiB);
    const d = digestOf(blob);

    const wrongHash = { hash: digestOf(Buffer.from('x')).hash, size: d.size };
    await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'u', wrongHash), blob))), Code.InvalidArgument, /content hashes to/);
    t.ok(await isMissing(cas, wrongHash), 'wrong hash not stored');

    const short = { hash: d.hash, size: d.size + 10 };
    await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'u', short), blob))), Code.InvalidArgument, /received 51200 bytes, digest says 51210/);
    t.ok(await isMissing(cas, short), 'short upload not stored');

    const long = { hash: d.hash, size: d.size - 10 };
    await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'u', long), blob))), Code.InvalidArgument, /received more than 51190 bytes/);
    t.ok(await isMissing(cas, long), 'long upload not stored');
    t.ok(await isMissing(cas, d), 'the real digest was never stored');
  });

  t.test('an existing blob completes early with committed_size = size', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(MiB);
    const d = digestOf(blob);
    await cas.put(d, (async function* () { yield blob; })());
    const pulled = { count: 0 };
    const msgs = messages(writeResourceName('', 'u', d), blob);
    const res = await client.write(stream(msgs, pulled));
    t.equal(res.committedSize, BigInt(blob.byteLength));
    t.ok(pulled.count < msgs.length, `the server stopped early (${pulled.count} of ${msgs.length} messages pulled)`);
    t.ok((await readAll(client, readResourceName('', d))).data.equals(blob), 'still serving');
  });

  t.test('the empty blob needs no data', async (t) => {
    const { client } = harness();
    const res = await client.write(stream([{ resourceName: writeResourceName('', 'u', EMPTY_DIGEST), finishWrite: true }]));
    t.equal(res.committedSize, 0n);
  });

  t.test('a failed upload can be retried from offset 0', async (t) => {
    const { cas, client } = harness();
    const blob = randomBytes(100 * KiB);
    const d = digestOf(blob);
    const name = writeResourceName('', 'retry', d);
    const broken = messages(name, blob).slice(0, 3).map((m) => ({ ...m, finishWrite: false }));
    await rejectsWith(t, client.write(stream(broken)), Code.InvalidArgument, /without finish_write/);
    const status = await client.queryWriteStatus({ resourceName: name });
    t.same({ committedSize: status.committedSize, complete: status.complete }, { committedSize: 0n, complete: false });
    t.equal((await client.write(stream(messages(name, blob)))).committedSize, BigInt(blob.byteLength));
    t.notOk(await isMissing(cas, d));
  });
});

t.test('QueryWriteStatus', async (t) => {
  const { cas, client } = harness();
  const blob = randomBytes(3000);
  const d = digestOf(blob);
  await cas.put(d, (async function* () { yield blob; })());

  const stored = await client.queryWriteStatus({ resourceName: writeResourceName('i', 'u', d) });
  t.same({ c: stored.committedSize, done: stored.complete }, { c: 3000n, done: true }, 'existing blob');

  const storedZ = await client.queryWriteStatus({ resourceName: writeResourceName('i', 'u', d, 'zstd') });
  t.same({ c: storedZ.committedSize, done: storedZ.complete }, { c: -1n, done: true }, 'existing blob, compressed upload');

  const unknown = await client.queryWriteStatus({ resourceName: writeResourceName('i', 'u', digestOf(Buffer.from('nope'))) });
  t.same({ c: unknown.committedSize, done: unknown.complete }, { c: 0n, done: false }, 'unknown upload');

  await rejectsWith(t, client.queryWriteStatus({ resourceName: readResourceName('', d) }), Code.InvalidArgument, /no "uploads" segment/);
});

t.test('zstd', async (t) => {
  const { cas, client } = harness();
  // Compressible but not trivial: repeated random lines.
  const line = randomBytes(3000).toString('base64');
  const blob = Buffer.from(Array.from({ length: 700 }, (_, i) => `${i % 7}:${line}\n`).join(''));
  const d = digestOf(blob);
  const compressed = zstdCompressSync(blob);
  t.ok(compressed.byteLength < blob.byteLength / 2, 'the test data compresses');

  t.test('write decompresses and stores the blob uncompressed', async (t) => {
    const res = await client.write(stream(messages(writeResourceName('', 'z', d, 'zstd'), compressed)));
    t.equal(res.committedSize, BigInt(compressed.byteLength), 'committed_size counts the compressed bytes');
    t.notOk(await isMissing(cas, d), 'stored under the uncompressed digest');
    t.ok((await readAll(client, readResourceName('', d))).data.equals(blob), 'plain read returns the uncompressed bytes');
  });

  t.test('read compresses; offset counts uncompressed bytes', async (t) => {
    const whole = await readAll(client, readResourceName('', d, 'zstd'));
    t.ok(whole.data.byteLength < blob.byteLength, 'smaller on the wire');
    t.ok(zstdDecompressSync(whole.data).equals(blob), 'round trip');
    const tail = await readAll(client, readResourceName('', d, 'zstd'), 1000n);
    t.ok(zstdDecompressSync(tail.data).equals(blob.subarray(1000)), 'offset');
    await rejectsWith(t, readAll(client, readResourceName('', d, 'zstd'), 0n, 10n), Code.InvalidArgument, /read_limit must be 0/);
    const empty = await readAll(client, readResourceName('', EMPTY_DIGEST, 'zstd'));
    t.equal(zstdDecompressSync(empty.data).byteLength, 0, 'empty blob');
  });

  t.test('an existing blob completes early with committed_size -1', async (t) => {
    const res = await client.write(stream(messages(writeResourceName('', 'z2', d, 'zstd'), compressed)));
    t.equal(res.committedSize, -1n);
  });

  t.test('bad compressed uploads are rejected and not stored', async (t) => {
    const other = Buffer.concat([blob, Buffer.from('more')]);
    const od = digestOf(other);
    const oc = zstdCompressSync(other);
    const wrong = { hash: digestOf(Buffer.from('x')).hash, size: od.size };
    await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'z', wrong, 'zstd'), oc))), Code.InvalidArgument, /content hashes to/);
    t.ok(await isMissing(cas, wrong));

    await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'z', od, 'zstd'), randomBytes(5000)))), Code.InvalidArgument, /not valid zstd/);
    await rejectsWith(
      t,
      client.write(stream(messages(writeResourceName('', 'z', od, 'zstd'), oc.subarray(0, oc.byteLength - 20)))),
      Code.InvalidArgument,
      /not valid zstd|received \d+ bytes, digest says/,
    );
    const gap = messages(writeResourceName('', 'z', od, 'zstd'), oc, 4 * KiB);
    gap[1] = { ...gap[1], writeOffset: 1n };
    await rejectsWith(t, client.write(stream(gap)), Code.InvalidArgument, /write_offset 1 is not contiguous: expected 4096/);
    t.ok(await isMissing(cas, od), 'nothing stored');
  });
});

t.test('over real HTTP/2 with the connect-node gRPC client', async (t) => {
  const cas = new MemoryStore({ maxSizeBytes: 256 * MiB, contentAddressed: true });
  const server = http2.createServer(connectNodeAdapter({ routes: routes(cas) }));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  const transport = createGrpcTransport({ baseUrl: `http://127.0.0.1:${port}` });
  const client = createClient(ByteStream, transport);
  t.teardown(() => new Promise<void>((resolve) => {
    server.close(() => resolve());
    // Sessions held open by the client keep close() waiting.
    for (const s of sessions) s.destroy();
  }));
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on('session', (s) => sessions.add(s));

  const blob = randomBytes(8 * MiB);
  const d = digestOf(blob);
  const name = writeResourceName('', 'h2', d);
  t.equal((await client.write(stream(messages(name, blob)))).committedSize, BigInt(blob.byteLength), 'upload');
  const back = await readAll(client, readResourceName('', d));
  t.ok(back.data.equals(blob), 'download');
  t.ok(Math.max(...back.sizes) <= READ_CHUNK_BYTES, 'message size');

  // Early completion: the server answers while the client is still sending.
  const pulled = { count: 0 };
  const msgs = messages(name, blob);
  t.equal((await client.write(stream(msgs, pulled))).committedSize, BigInt(blob.byteLength), 'early completion');
  t.ok(pulled.count < msgs.length, `the client stopped sending early (${pulled.count} of ${msgs.length})`);

  await rejectsWith(t, client.write(stream(messages(writeResourceName('', 'h2', { hash: d.hash, size: 5 }), blob))), Code.InvalidArgument, /received more than 5 bytes/);
  // The server keeps serving on the same connection after early completion and errors.
  t.ok((await readAll(client, readResourceName('', d), 10n, 20n)).data.equals(blob.subarray(10, 30)), 'still serving');
  const again = randomBytes(300 * KiB);
  t.equal((await client.write(stream(messages(writeResourceName('', 'h2b', digestOf(again)), again)))).committedSize, BigInt(again.byteLength));
});

t.test('resumable uploads over a disk CAS', async (t) => {
  const cas = await DiskStore.open({ path: t.testdir(), maxSizeBytes: 64 * MiB, contentAddressed: true, fsync: false });
  t.teardown(() => cas.close());
  const deps = {
    cas,
    ac: new MemoryStore({ maxSizeBytes: MiB, contentAddressed: false }),
    logger: pino({ level: 'silent' }),
    maxBatchTotalSizeBytes: 4 * MiB,
    isReady: () => true,
  };
  const client = createClient(ByteStream, createRouterTransport((router) => router.service(ByteStream, createByteStreamService(deps))));
  const blob = randomBytes(1 * MiB + 123);
  const d = digestOf(blob);
  const name = writeResourceName('i', 'resume-me', d);
  const status = async (n = name) => {
    const s = await client.queryWriteStatus({ resourceName: n });
    return { committedSize: s.committedSize, complete: s.complete };
  };

  // A stream that broke after 20 messages (no finish_write): the prefix is kept.
  const all = messages(name, blob);
  await rejectsWith(t, client.write(stream(all.slice(0, 20).map((m) => ({ ...m, finishWrite: false })))), Code.InvalidArgument, /without finish_write/);
  const kept = BigInt(20 * 16 * KiB);
  t.same(await status(), { committedSize: kept, complete: false }, 'QueryWriteStatus reports the prefix');
  t.same(await status(writeResourceName('i', 'another', d)), { committedSize: 0n, complete: false }, 'keyed by the upload id');
  t.same(await cas.findMissing([d]), [d], 'nothing partial is visible as a blob');

  // Wrong offsets: precise errors, the prefix stays.
  const at = (offset: number): WriteInit[] => messages(name, blob.subarray(offset)).map((m, i) => ({
    ...m,
    resourceName: i === 0 ? name : '',
    writeOffset: (m.writeOffset as bigint) + BigInt(offset),
  }));
  await rejectsWith(t, client.write(stream(at(Number(kept) + 1))), Code.OutOfRange, /write_offset 327681 is beyond the 327680 bytes this server holds/);
  await rejectsWith(t, client.write(stream(at(1000))), Code.InvalidArgument, /write_offset 1000 is behind the 327680 bytes .*resume at write_offset 327680/);
  await rejectsWith(t, client.write(stream(at(blob.byteLength + 1))), Code.OutOfRange, /is past the end of the 1048699-byte blob/);
  await rejectsWith(
    t,
    client.write(stream([{ resourceName: writeResourceName('i', 'resume-me', d, 'zstd'), writeOffset: 5n, data: new Uint8Array(1) }])),
    Code.OutOfRange,
    /must be 0 for a compressed upload/,
  );
  t.same(await status(), { committedSize: kept, complete: false });

  // The resumed Write sends only the rest.
  const rest = at(Number(kept));
  const sent = rest.reduce((n, m) => n + (m.data as Uint8Array).byteLength, 0);
  t.equal(sent, blob.byteLength - Number(kept));
  t.equal((await client.write(stream(rest))).committedSize, BigInt(blob.byteLength));
  t.same(await status(), { committedSize: BigInt(blob.byteLength), complete: true });
  t.same((await readAll(client, readResourceName('i', d))).data, blob);
  t.match(cas.describe(), { partialUploads: 0, partialUploadsResumed: 1, uploadBytesInFlight: 0 });
});
