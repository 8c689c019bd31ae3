// The per-RPC log line names the request and the shards it was routed to,
// and lines written deep in the store tree during the RPC carry its id.
import t from 'tap';
import { Writable } from 'node:stream';
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { logMixin } from '../../src/request-context.ts';
import { buildApp } from '../../src/server/app.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';

t.test('RPC log lines carry the request id and the shards chosen', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  const logger = pino({ level: 'debug', mixin: logMixin }, sink);
  const memory = () => new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const faulty = new FaultyStore(memory());
  const dir = t.testdir();
  const cas = await ShardingStore.open({
    shards: [
      { name: 'a', weight: 1, store: faulty },
      { name: 'b', weight: 1, store: memory() },
    ],
    handoff: { dir },
    healthCheckIntervalMs: 60_000,
    breaker: { consecutiveFailures: 1 },
    logger,
  });
  const app = await buildApp({
    deps: {
      cas,
      ac: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false }),
      logger,
      maxBatchTotalSizeBytes: 1 << 20,
      isReady: () => true,
    },
    logger,
    shutdownTimeoutMs: 1000,
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(async () => {
    await app.close();
    await cas.close();
  });
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : 0;
  const client = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: `http://127.0.0.1:${port}` }));

  const digests = Array.from({ length: 16 }, (_, i) => toProtoDigest(digestOf(Buffer.from(`blob ${i}`))));
  await client.findMissingBlobs({ blobDigests: digests });
  const rpc = lines.find((l) => l.rpc === 'build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs');
  t.ok(rpc, 'one line for the RPC');
  t.same([...((rpc?.shards as string[]) ?? [])].sort(), ['a', 'b'], 'it names both shards the digests were split over');
  t.match(rpc?.reqId, /.+/, 'and the request id');

  // A failure on shard a opens its breaker inside the RPC: that line names the request too.
  faulty.mode = 'unavailable';
  lines.length = 0;
  await client.findMissingBlobs({ blobDigests: digests });
  const rpc2 = lines.find((l) => typeof l.rpc === 'string' && String(l.rpc).endsWith('/FindMissingBlobs'));
  const transition = lines.find((l) => l.shard === 'a' && l.to === 'open');
  t.ok(transition, 'the breaker transition was logged');
  t.equal(transition?.reqId, rpc2?.reqId, 'with the id of the request that tripped it');
});
