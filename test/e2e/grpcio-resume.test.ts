// Resumable uploads with a client nobody here wrote: python grpcio (C-core)
// uploads a 64 MiB blob, cancels it at half, asks QueryWriteStatus, and
// resumes from the committed size, sending only the rest (counted by the
// client). Against a storage node, and through an edge (the default
// cluster's shape: a fallback pair over sharded storage nodes; sync mode,
// the default, where both sides keep and resume a prefix, and async mode).
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Test } from 'tap';
import { startCluster } from '../helpers/cluster.ts';
import { python, pythonGrpcMissing } from '../helpers/python-grpc.ts';
import { spawnNode } from '../helpers/spawn-node.ts';

const here = dirname(fileURLToPath(import.meta.url));
const SIZE = 64 * 1024 * 1024;

interface ResumeDetail {
  hash: string;
  blob_bytes: number;
  first_write_sent: number;
  committed_size_after_cancel: number;
  resumed_write_sent: number;
  total_sent: number;
  wrong_offset_error: string;
}

const missingPrereq = pythonGrpcMissing();
if (missingPrereq !== undefined) {
  if (process.env.CI === 'true') t.fail(`${missingPrereq}, but CI=true requires this test`);
  else t.plan(0, `${missingPrereq} (apt-get install python3-grpcio python3-grpc-tools bazel-bootstrap-source)`);
} else {
  t.test('python grpcio resumes a cancelled 64 MiB upload', async (t) => {
    const stubs = await mkdtemp(join(tmpdir(), 'reapi-grpcio-stubs-'));
    t.teardown(() => rm(stubs, { recursive: true, force: true }));
    await promisify(execFile)('bash', [join(here, 'gen-grpcio-stubs.sh'), stubs]);

    await t.test('against a storage node', async (t) => {
      const node = await spawnNode();
      t.teardown(() => node.stop());
      await resume(t, stubs, node.port, () => node.logs());
    });

    for (const durability of ['sync', 'async'] as const) {
      await t.test(`through an edge (fallback pair in ${durability} mode over three shards)`, async (t) => {
        const cluster = await startCluster({ fallback: { durability } });
        t.teardown(cluster.stop);
        const d = await resume(t, stubs, cluster.edge.port, () => cluster.edge.logs());
        if (d === undefined) return;
        // Where the blob landed: the owner shard, and in sync mode the secondary too.
        const digest = { hash: d.hash, sizeBytes: BigInt(SIZE) };
        const holds = async (url: string) => {
          const cas = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: url }));
          return (await cas.findMissingBlobs({ instanceName: 'ci/main', blobDigests: [digest] })).missingBlobDigests.length === 0;
        };
        t.ok(await holds(cluster.shard(cluster.owner(d.hash)).url), 'the owner shard holds the resumed blob');
        if (durability === 'sync') t.ok(await holds(cluster.secondary!.url), 'the secondary holds it too (sync mode)');
      });
    }
  });
}

async function resume(t: Test, stubs: string, port: number, logs: () => string[]): Promise<ResumeDetail | undefined> {
  const started = Date.now();
  const result = await new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => {
    execFile(
      python,
      [join(here, 'grpcio_client.py'), '--target', `127.0.0.1:${port}`, '--stubs', stubs, '--instance', 'ci/main', '--only', 'bytestream_resume'],
      { timeout: 240_000, maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => res({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr }),
    );
  });
  t.comment(`grpcio_client.py ran in ${Date.now() - started} ms (exit ${result.code})`);
  let check: { name: string; ok: boolean; detail: unknown } | undefined;
  try {
    check = (JSON.parse(result.stdout) as { checks: { name: string; ok: boolean; detail: unknown }[] }).checks[0];
  } catch {
    t.fail('grpcio_client.py printed its JSON report', { code: result.code, stdout: result.stdout, stderr: result.stderr });
    return undefined;
  }
  if (!check?.ok) console.error(`--- server log (last 40 lines) ---\n${logs().slice(-40).join('\n')}`);
  t.ok(check?.ok, 'grpcio: bytestream_resume', { detail: check?.detail });
  if (!check?.ok) return undefined;
  const d = check.detail as ResumeDetail;
  t.comment(`bytes: ${JSON.stringify(d)}`);
  t.equal(d.first_write_sent, SIZE / 2, 'the first Write sent half the blob');
  t.ok(d.committed_size_after_cancel > 0 && d.committed_size_after_cancel <= SIZE / 2, 'QueryWriteStatus reported the kept prefix');
  t.equal(d.resumed_write_sent, SIZE - d.committed_size_after_cancel, 'the resumed Write sent only the rest');
  t.equal(d.wrong_offset_error, 'OUT_OF_RANGE', 'a Write past the prefix is OUT_OF_RANGE');
  return d;
}
