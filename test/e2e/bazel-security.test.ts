// End to end with a real client: Bazel 4.2.3 against an edge (over three
// storage-node processes) that serves gRPC over TLS with a private CA and
// authorizes every call:
//   1. no credentials: the edge answers UNAUTHENTICATED and Bazel says so;
//   2. cold build over grpcs:// (--tls_certificate) with a read-write bearer
//      token sent by --remote_header: everything runs here and is uploaded;
//   3. clean --expunge, warm build with no token but a client certificate
//      (--tls_client_certificate/--tls_client_key) whose CN names a read-only
//      identity: every cacheable action is a remote cache hit;
//   4. a read-only token with a changed action environment (new keys for
//      every action that takes the environment): the build succeeds, runs
//      those actions here, and uploads nothing, which step 5 proves: the same
//      build with the read-write token hits no more than step 4 did.
import { createHash, randomBytes } from 'node:crypto';
import t from 'tap';
import type { Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { assertSucceeded, bazelTest, bazelTlsStartupArgs, prepareWorkspace } from '../helpers/bazel.ts';
import { createPki, opensslMissing } from '../helpers/certs.ts';
import type { Pki } from '../helpers/certs.ts';
import { startCluster } from '../helpers/cluster.ts';
import type { Cluster } from '../helpers/cluster.ts';

const instanceName = 'ci/secure';
const targets = ['//...'];

if (opensslMissing !== undefined && process.env.CI !== 'true') {
  t.plan(0, opensslMissing);
} else {
  bazelTest(t, 'Bazel 4.2.3 over grpcs:// with a private CA, mTLS, and read-write / read-only tokens', main);
}

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

async function main(t: Test): Promise<void> {
  const jniDir = await mkdtemp(join(tmpdir(), 'reapi-bazel-jni-'));
  t.teardown(() => rm(jniDir, { recursive: true, force: true }));
  const tlsArgs = await bazelTlsStartupArgs(jniDir);
  if ('missing' in tlsArgs) {
    if (process.env.CI === 'true') t.fail(`Bazel cannot speak TLS here: ${tlsArgs.missing}`);
    else t.comment(`skipped: Bazel cannot speak TLS here: ${tlsArgs.missing}`);
    return;
  }
  const ws = await prepareWorkspace('reapi-bazel-tls-', tlsArgs.args);
  let pki: Pki | undefined;
  let cluster: Cluster | undefined;
  t.teardown(async () => {
    ws.shutdown();
    if (cluster && !t.passing()) {
      console.error(`--- edge log (last 60 lines) ---\n${cluster.edge.logs().slice(-60).join('\n')}`);
    }
    await cluster?.stop();
    await ws.remove();
    await pki?.remove();
  });
  pki = await createPki();
  const laptop = await pki.issueClient('dev-laptop');
  const ciToken = randomBytes(32).toString('base64url');
  const readerToken = randomBytes(32).toString('base64url');
  cluster = await startCluster({
    edgeExtra: {
      tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCaFile: pki.caFile, clientCert: 'optional' },
      auth: {
        anonymous: 'none',
        identities: {
          ci: { tokenSha256: sha256(ciToken), grants: { '': 'read-write' } },
          reader: { tokenSha256: sha256(readerToken), grants: { '': 'read' } },
          'dev-laptop': { clientCertCommonName: 'dev-laptop', grants: { ci: 'read' } },
        },
      },
    },
  });
  const c = cluster;
  // The server certificate names localhost and 127.0.0.1; grpc-java checks the name.
  const url = `grpcs://localhost:${c.edge.port}`;
  t.comment(`edge on ${url}, shards ${c.shards.map((s) => `${s.name} ${s.url}`).join(', ')}`);
  const base = [
    `--remote_cache=${url}`,
    `--tls_certificate=${pki.caFile}`,
    `--remote_instance_name=${instanceName}`,
    '--disk_cache=',
    '--remote_timeout=60',
  ];
  const bearer = (token: string) => `--remote_header=Authorization=Bearer ${token}`;
  const bazel = ws.bazel;

  // 1. No credentials at all. Bazel 4.2.3 asks GetCapabilities first and,
  // refused, stops the command (exit 34) rather than building without the cache.
  const anonymous = await bazel(['build', ...base, ...targets]);
  t.comment(`no credentials: exit ${anonymous.code}`);
  t.equal(anonymous.code, 34, 'Bazel stops: it does not build with a cache that refuses it');
  t.match(anonymous.output, /Failed to query remote execution capabilities: UNAUTHENTICATED: missing credentials/, "Bazel says why, with the edge's reason");
  t.notOk(anonymous.output.includes(ciToken), 'no secret in the output');
  await bazel(['clean', '--expunge']);

  // 2. Cold build with the read-write token: runs here, uploads.
  const cold = await bazel(['test', ...base, bearer(ciToken), ...targets]);
  t.comment(`cold build, read-write token: ${cold.ms} ms: ${cold.summaryLine}`);
  if (!assertSucceeded(t, 'cold build with the read-write token', cold)) return;
  t.equal(cold.processes.remoteCacheHit, 0, 'cold: no hits on an empty cache');
  t.ok(cold.processes.executed > 0, `cold: ${cold.processes.executed} processes ran here`);
  t.notMatch(cold.output, /PERMISSION_DENIED|UNAUTHENTICATED/, 'cold: no upload was refused');

  // 3. Warm build with only a client certificate naming a read-only identity.
  await bazel(['clean', '--expunge']);
  const warm = await bazel([
    'test',
    ...base,
    `--tls_client_certificate=${laptop.certFile}`,
    `--tls_client_key=${laptop.keyFile}`,
    ...targets,
  ]);
  t.comment(`warm build, mTLS read-only identity: ${warm.ms} ms: ${warm.summaryLine}`);
  if (!assertSucceeded(t, 'warm build over mTLS', warm)) return;
  t.equal(warm.processes.executed, 0, 'warm over mTLS: nothing ran here');
  t.equal(warm.processes.remoteCacheHit, cold.processes.executed, 'warm over mTLS: every cacheable action was a remote cache hit');

  // 4. The read-only token on new action keys: runs here, its uploads are refused.
  await bazel(['clean', '--expunge']);
  const salted = '--action_env=REAPI_SECURITY_TEST=1';
  const readOnly = await bazel(['test', ...base, bearer(readerToken), salted, ...targets]);
  t.comment(`read-only token, new action keys: ${readOnly.ms} ms: ${readOnly.summaryLine}`);
  if (!assertSucceeded(t, 'build with the read-only token', readOnly)) return;
  // (--action_env reaches only the actions that take the environment; the others keep their keys and hit.)
  t.ok(readOnly.processes.executed > 0, `read-only: ${readOnly.processes.executed} actions with new keys ran here`);
  t.match(readOnly.output, /WARNING: Writing to Remote Cache:/, 'Bazel was told its uploads failed, and built anyway');
  const denials = c.edge.logs().filter((l) => l.includes('call denied') && l.includes('"identity":"reader"'));
  t.ok(denials.length > 0, `the edge refused the read-only identity's writes: ${denials[0]?.slice(0, 300)}`);
  t.notOk(readOnly.output.includes(readerToken), 'no secret in the output');

  // 5. Nothing of step 4 reached the cache: the same keys with the read-write token all miss.
  await bazel(['clean', '--expunge']);
  const after = await bazel(['test', ...base, bearer(ciToken), salted, ...targets]);
  t.comment(`same keys, read-write token: ${after.summaryLine}`);
  if (!assertSucceeded(t, 'build after the read-only one', after)) return;
  t.equal(
    after.processes.remoteCacheHit,
    readOnly.processes.remoteCacheHit,
    'the read-only build uploaded nothing: only the actions it found in the cache hit again',
  );
  t.equal(after.processes.executed, readOnly.processes.executed, 'every action the read-only build ran had to run again');

  // The edge logged the denials by identity, never a token.
  const logs = c.edge.logs().join('\n');
  t.notOk(logs.includes(ciToken) || logs.includes(readerToken), 'no token in the edge log');
}
