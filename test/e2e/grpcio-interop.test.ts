// Interop with a gRPC client nobody here wrote: Python grpcio (C-core) runs
// test/e2e/grpcio_client.py against a storage node child process. Stubs are
// generated at test time from the protos in bazel-bootstrap-source, so this
// also proves the node against the upstream proto definitions rather than
// our own copies in proto/. Each check the script runs is one assertion here.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import t from 'tap';
import type { Test } from 'tap';
import { spawnNode } from '../helpers/spawn-node.ts';
import { python, pythonGrpcMissing } from '../helpers/python-grpc.ts';

const here = dirname(fileURLToPath(import.meta.url));

/** Every check grpcio_client.py must report; a missing one fails. */
const expectedChecks = [
  'capabilities',
  'find_missing_before_upload',
  'batch_update_per_blob_status',
  'find_missing_after_upload',
  'batch_read_per_blob_status',
  'get_tree_paged',
  'action_cache_roundtrip',
  'action_cache_hides_incomplete_result',
  'bytestream_write_read',
  'bytestream_read_past_end',
  'bytestream_write_wrong_digest',
  'malformed_requests_rejected',
  'still_serving_after_errors',
];

const missingPrereq = pythonGrpcMissing();

if (missingPrereq !== undefined) {
  if (process.env.CI === 'true') t.fail(`${missingPrereq}, but CI=true requires this test`);
  else t.plan(0, `${missingPrereq} (apt-get install python3-grpcio python3-grpc-tools bazel-bootstrap-source)`);
} else {
  // A subtest, not the root: tap ends a root test that has a teardown once it
  // looks idle, which the long await on the Python client would trigger.
  t.test('python grpcio (C-core) client against a storage node', main);
}

interface CheckResult {
  name: string;
  ok: boolean;
  detail: unknown;
}

async function main(t: Test): Promise<void> {
  const run = promisify(execFile);
  const stubs = await mkdtemp(join(tmpdir(), 'reapi-grpcio-stubs-'));
  t.teardown(() => rm(stubs, { recursive: true, force: true }));
  await run('bash', [join(here, 'gen-grpcio-stubs.sh'), stubs]);

  const node = await spawnNode();
  t.teardown(async () => {
    if (!t.passing()) console.error(`--- storage node log (last 60 lines) ---\n${node.logs().slice(-60).join('\n')}`);
    await node.stop();
  });

  const started = Date.now();
  const result = await new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => {
    execFile(
      python,
      [join(here, 'grpcio_client.py'), '--target', `127.0.0.1:${node.port}`, '--stubs', stubs, '--instance', 'ci/main'],
      { timeout: 180_000, maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : null) : 0;
        res({ code, stdout, stderr });
      },
    );
  });
  t.comment(`grpcio_client.py ran in ${Date.now() - started} ms (exit ${result.code})`);

  let checks: CheckResult[] = [];
  try {
    checks = (JSON.parse(result.stdout) as { checks: CheckResult[] }).checks;
  } catch {
    t.fail('grpcio_client.py printed its JSON report', { code: result.code, stdout: result.stdout, stderr: result.stderr });
    return;
  }
  t.comment(`details: ${JSON.stringify(Object.fromEntries(checks.map((c) => [c.name, c.detail])))}`);
  for (const name of expectedChecks) {
    const check = checks.find((c) => c.name === name);
    t.ok(check?.ok, `grpcio: ${name}`, { detail: check ? check.detail : 'check not reported' });
  }
  t.same(
    checks.map((c) => c.name).filter((n) => !expectedChecks.includes(n)),
    [],
    'grpcio: no unexpected checks reported',
  );
  t.equal(
    result.code,
    checks.every((c) => c.ok) ? 0 : 1,
    'grpcio_client.py exit code agrees with its report',
    { stderr: result.stderr },
  );
  t.equal(node.exitInfo(), undefined, 'the node process is still running after all checks');
  t.same(await node.kill('SIGTERM'), { code: 0, signal: null }, 'the node exits 0 on SIGTERM');
}
