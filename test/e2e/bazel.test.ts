// End to end with a real client: Bazel 4.2.3 builds test/e2e/bazel-workspace
// against a storage node running as a child process.
//   1. cold build: every cacheable action runs locally and is uploaded;
//   2. clean --expunge, warm build: every cacheable action is a remote cache
//      hit and all outputs are byte-identical to the cold build's;
//   3. clean --expunge, --remote_download_minimal build succeeds from the cache
//      alone (Builds without the Bytes trusts what the cache vouched for).
import { create } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import type { Test } from 'tap';
import {
  ContentAddressableStorage,
  DigestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { assertSucceeded, bazelPath, bazelTest, diskUsage, hashOutputs, prepareWorkspace } from '../helpers/bazel.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { SpawnedNode } from '../helpers/spawn-node.ts';

const instanceName = 'ci/main';
const targets = ['//...'];

bazelTest(t, 'Bazel 4.2.3 against a storage node: cold, warm, --remote_download_minimal', main);

async function main(t: Test): Promise<void> {
  const ws = await prepareWorkspace('reapi-bazel-e2e-');
  const { root, workspace } = ws;
  const nodeDir = join(root, 'node');
  let node: SpawnedNode | undefined;
  // One teardown, so the order is explicit: Bazel's server (even after a build
  // failed half way; a no-op if none runs), then the node, then the files.
  t.teardown(async () => {
    if (node && !t.passing()) {
      console.error(`--- storage node log (last 60 lines) ---\n${node.logs().slice(-60).join('\n')}`);
    }
    ws.shutdown();
    await node?.stop();
    await ws.remove();
  });
  await mkdir(nodeDir);
  node = await spawnNode({ dir: nodeDir });
  t.comment(`storage node pid ${node.pid} on ${node.url}, bazel ${bazelPath}`);

  const remoteFlags = [
    `--remote_cache=${node.grpcUrl}`,
    `--remote_instance_name=${instanceName}`,
    '--disk_cache=',
    '--remote_timeout=60',
  ];
  const bazel = ws.bazel;

  // 1. Cold build: an empty cache, so everything runs locally and is uploaded.
  const cold = await bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`cold build ${cold.ms} ms: ${cold.summaryLine}`);
  if (!assertSucceeded(t, 'cold build', cold)) return;
  t.equal(cold.processes.remoteCacheHit, 0, 'cold build: no remote cache hits on an empty cache');
  t.ok(cold.processes.executed > 0, `cold build: ${cold.processes.executed} processes executed locally`);

  const bin = join(workspace, 'bazel-bin');
  const coldOutputs = await hashOutputs(bin);
  const sizes = [...coldOutputs.values()].map((o) => o.size);
  t.ok(coldOutputs.size >= 10, `cold build produced ${coldOutputs.size} output files`);
  t.ok(sizes.includes(24 * 1024 * 1024), 'the 24 MiB output exists');
  t.ok(sizes.includes(10), 'the 10 byte output exists');
  t.ok(
    [...coldOutputs.keys()].some((p) => p.startsWith('tree/tree/sub/deeper/')),
    'the tree artifact has its nested directory',
  );

  // The uploads reached the node: FindMissing over gRPC, and bytes on disk.
  const cas = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: node.url }));
  // .params files are written by Bazel itself, not by a spawn, so never uploaded.
  const uploaded = [...coldOutputs.values()].filter((o) => !o.path.endsWith('.params'));
  const missing = await cas.findMissingBlobs({
    instanceName,
    blobDigests: uploaded.map((o) => create(DigestSchema, { hash: o.sha256, sizeBytes: BigInt(o.size) })),
  });
  t.same(
    missing.missingBlobDigests.map((d) => `${d.hash}/${d.sizeBytes}`),
    [],
    `FindMissingBlobs: all ${uploaded.length} output blobs are in the node`,
  );
  const stored = await diskUsage(nodeDir);
  t.ok(
    stored >= 29 * 1024 * 1024,
    `node data dir holds ${(stored / 1048576).toFixed(1)} MiB (>= the 24 MiB + 5 MiB outputs)`,
  );

  // 2. Warm build from the cache only.
  const cleaned = await bazel(['clean', '--expunge']);
  t.equal(cleaned.code, 0, 'bazel clean --expunge');
  const warm = await bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`warm build ${warm.ms} ms: ${warm.summaryLine}`);
  if (!assertSucceeded(t, 'warm build', warm)) return;
  t.equal(warm.processes.executed, 0, 'warm build: no cacheable process executed locally', {
    breakdown: warm.processes.byStrategy,
  });
  t.equal(
    warm.processes.remoteCacheHit,
    cold.processes.executed,
    `warm build: every process the cold build executed (${cold.processes.executed}) is a remote cache hit`,
  );
  t.equal(warm.processes.total, cold.processes.total, 'warm build: same number of processes as the cold build');
  const warmOutputs = await hashOutputs(bin);
  t.same([...warmOutputs.keys()].sort(), [...coldOutputs.keys()].sort(), 'warm build: the same output files');
  const differing = [...coldOutputs.values()]
    .filter((o) => warmOutputs.get(o.path)?.sha256 !== o.sha256)
    .map((o) => o.path);
  t.same(differing, [], `warm build: all ${coldOutputs.size} outputs byte-identical (sha256)`);
  const executable = [...coldOutputs.values()].filter((o) => o.executable).map((o) => o.path);
  t.same(
    [...warmOutputs.values()].filter((o) => o.executable).map((o) => o.path),
    executable,
    'warm build: executable bits preserved',
  );

  // 3. Builds without the Bytes: nothing is downloaded, so the build only
  // succeeds if every blob behind every AC hit is really there.
  await bazel(['clean', '--expunge']);
  const minimal = await bazel(['test', ...remoteFlags, '--remote_download_minimal', ...targets]);
  t.comment(`--remote_download_minimal build ${minimal.ms} ms: ${minimal.summaryLine}`);
  if (!assertSucceeded(t, '--remote_download_minimal build', minimal)) return;
  t.equal(minimal.processes.executed, 0, '--remote_download_minimal: no process executed locally', {
    breakdown: minimal.processes.byStrategy,
  });
  t.equal(
    minimal.processes.remoteCacheHit,
    cold.processes.executed,
    '--remote_download_minimal: every cacheable process is a remote cache hit',
  );

  const fetched = await hashOutputs(bin);
  t.notOk(
    fetched.has('blobs/blob_24mib.bin'),
    '--remote_download_minimal: the 24 MiB output stayed in the cache (not downloaded)',
  );

  const warnings = node.logs().filter((line) => /"level":40/.test(line));
  if (warnings.length > 0) t.comment(`storage node warnings: ${warnings.length}, first: ${warnings[0]}`);
  const problems = node.logs().filter((line) => /"level":(50|60)/.test(line));
  t.same(problems, [], 'the storage node logged no errors during the builds');

  await bazel(['clean', '--expunge']);
  const shutdown = await bazel(['shutdown']);
  t.equal(shutdown.code, 0, 'bazel shutdown');
  t.comment(`timings: cold ${cold.ms} ms, warm ${warm.ms} ms, minimal ${minimal.ms} ms`);
}
