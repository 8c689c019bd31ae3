import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import { pino } from 'pino';
import t from 'tap';
import {
  Capabilities,
  Compressor_Value,
  DigestFunction_Value,
  SymlinkAbsolutePathStrategy_Value,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { createCapabilitiesService, SUPPORTED_COMPRESSORS } from '../../src/services/capabilities.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';

function client(maxBatchTotalSizeBytes = 4_000_000) {
  const service = createCapabilitiesService({
    cas: new MemoryStore({ maxSizeBytes: 1, contentAddressed: true }),
    ac: new MemoryStore({ maxSizeBytes: 1, contentAddressed: false }),
    logger: pino({ level: 'silent' }),
    maxBatchTotalSizeBytes,
    isReady: () => true,
  });
  return createClient(Capabilities, createRouterTransport((router) => router.service(Capabilities, service)));
}

t.test('advertises a SHA-256 cache with AC writes and no execution', async (t) => {
  const caps = await client(1234).getCapabilities({});
  const cache = caps.cacheCapabilities!;
  t.same(cache.digestFunctions, [DigestFunction_Value.SHA256]);
  t.equal(cache.actionCacheUpdateCapabilities?.updateEnabled, true);
  t.equal(cache.maxBatchTotalSizeBytes, 1234n);
  t.equal(cache.symlinkAbsolutePathStrategy, SymlinkAbsolutePathStrategy_Value.ALLOWED);
  t.same(cache.supportedCompressors, [Compressor_Value.ZSTD]);
  t.same(cache.supportedCompressors, SUPPORTED_COMPRESSORS);
  t.same(cache.supportedBatchUpdateCompressors, [], 'batch compression is not implemented');
  t.equal(cache.splitBlobSupport, false);
  t.equal(cache.spliceBlobSupport, false);
  t.equal(caps.executionCapabilities, undefined, 'a cache, not an executor');
  t.match(caps.lowApiVersion, { major: 2, minor: 0 });
  t.match(caps.deprecatedApiVersion, { major: 2, minor: 0 });
  t.match(caps.highApiVersion, { major: 2, minor: 3 });
});

t.test('the same answer for every valid instance name', async (t) => {
  const c = client();
  const a = await c.getCapabilities({ instanceName: '' });
  const b = await c.getCapabilities({ instanceName: 'team/main' });
  t.same(a, b);
});

t.test('rejects malformed instance names with INVALID_ARGUMENT', async (t) => {
  const c = client();
  for (const name of ['/x', 'x/', 'a//b', '.', 'a/../b', 'blobs', 'main/uploads', 'compressed-blobs/x']) {
    const err = await c.getCapabilities({ instanceName: name }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    t.equal(err?.code, Code.InvalidArgument, `"${name}": ${err?.rawMessage}`);
    t.match(err?.rawMessage, `instance_name "${name}"`);
  }
});
