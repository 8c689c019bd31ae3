// Edge -> shard over TLS with a client certificate and a bearer token
// (issue 11): a real storage node serving TLS with mTLS required, an edge
// whose remote stores name the CA, the edge's certificate and a token file,
// and a recording interceptor on the storage node that shows what reached it
// on every kind of call (Connect unary calls, the raw ByteStream streams,
// health checks).
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { create } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';
import type { Interceptor } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import {
  ActionCache,
  ActionResultSchema,
  ContentAddressableStorage,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import type { RemoteStoreConfig, StoreConfig } from '../../src/config.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { kPeer } from '../../src/server/peer.ts';
import { buildStores, closeStores } from '../../src/stores/factory.ts';
import { RemoteStore } from '../../src/stores/remote-store.ts';
import { readShardCredentials } from '../../src/transport.ts';
import { createPki, opensslMissing } from '../helpers/certs.ts';
import type { Pki } from '../helpers/certs.ts';
import { startNode } from '../helpers/node.ts';
import type { RunningNode } from '../helpers/node.ts';

interface Seen {
  readonly method: string;
  readonly authorization: string | null;
  readonly certCommonName: string | undefined;
}

function recorder(): { interceptor: Interceptor; seen: Seen[] } {
  const seen: Seen[] = [];
  return {
    seen,
    interceptor: (next) => async (req) => {
      seen.push({
        method: req.method.name,
        authorization: req.header.get('authorization'),
        certCommonName: req.contextValues.get(kPeer).certCommonName,
      });
      return next(req);
    },
  };
}

const TOKEN = 'shard-token-2f9c1d7e';
const logger = pino({ level: process.env.REAPI_TEST_LOG ?? 'silent' });

if (opensslMissing !== undefined) {
  if (process.env.CI === 'true') t.fail(`${opensslMissing}, but CI=true requires the TLS tests`);
  else t.plan(0, opensslMissing);
} else {
  let pki: Pki;
  let dir: string;
  let shard: RunningNode;
  const shardSeen = recorder();
  t.before(async () => {
    pki = await createPki();
    dir = await mkdtemp(join(tmpdir(), 'reapi-shard-tls-'));
    await writeFile(join(dir, 'token'), `${TOKEN}\nthe rest of the file is ignored\n`);
    shard = await startNode({
      tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCaFile: pki.caFile, clientCert: 'require' },
      ac: { kind: 'memory', maxSizeBytes: 64 * 1024 * 1024 },
      interceptors: [shardSeen.interceptor],
    });
  });
  t.teardown(async () => {
    await shard?.close();
    await pki?.remove();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const remote = (edgeCert: { certFile: string; keyFile: string } | undefined, extra: Partial<RemoteStoreConfig> = {}): RemoteStoreConfig => ({
    kind: 'remote',
    url: shard.url,
    instanceName: '',
    timeoutMs: 5000,
    healthTimeoutMs: 2000,
    tls: { caFile: pki.caFile, certFile: edgeCert?.certFile, keyFile: edgeCert?.keyFile, serverName: undefined },
    bearerTokenFile: join(dir, 'token'),
    ...extra,
  });

  t.test('an edge reaches a TLS + mTLS storage node, with its bearer token on every kind of call', async (t) => {
    const edgeCert = await pki.issueClient('edge-1');
    const edge = await startNode({ cas: remote(edgeCert), ac: remote(edgeCert) });
    t.teardown(edge.close);
    t.match(shard.url, /^https:/);
    shardSeen.seen.length = 0;

    // Client -> edge over h2c; edge -> shard over TLS.
    const transport = createGrpcTransport({ baseUrl: edge.url });
    const cas = createClient(ContentAddressableStorage, transport);
    const bytestream = createClient(ByteStream, transport);
    const ac = createClient(ActionCache, transport);
    const blob = new TextEncoder().encode('through the edge over mTLS, '.repeat(2000));
    const digest = digestOf(blob);

    const before = await cas.findMissingBlobs({ blobDigests: [toProtoDigest(digest)] });
    t.equal(before.missingBlobDigests.length, 1, 'FindMissingBlobs through the edge');
    await bytestream.write(
      (async function* () {
        yield {
          resourceName: `uploads/0b7f7f9e-9d43-4d0a-9d8f-5c1d3e2b1a00/blobs/${digest.hash}/${digest.size}`,
          data: blob,
          finishWrite: true,
        };
      })(),
    );
    const chunks: Uint8Array[] = [];
    for await (const res of bytestream.read({ resourceName: `blobs/${digest.hash}/${digest.size}` })) chunks.push(res.data);
    t.same(Buffer.concat(chunks), Buffer.from(blob), 'ByteStream Write then Read through the edge');
    const actionDigest = toProtoDigest(digestOf(new TextEncoder().encode('action')));
    await ac.updateActionResult({ actionDigest, actionResult: create(ActionResultSchema, { exitCode: 3 }) });
    const got = await ac.getActionResult({ actionDigest });
    t.equal(got.exitCode, 3, 'UpdateActionResult then GetActionResult through the edge');
    t.ok(edge.cas instanceof RemoteStore);
    await (edge.cas as RemoteStore).healthCheck();
    t.pass('grpc.health.v1 Check over TLS');

    const methods = new Set(shardSeen.seen.map((s) => s.method));
    for (const m of ['FindMissingBlobs', 'Write', 'Read', 'UpdateActionResult', 'GetActionResult', 'Check']) {
      t.ok(methods.has(m), `the shard saw ${m}`);
    }
    const wrong = shardSeen.seen.filter((s) => s.authorization !== `Bearer ${TOKEN}` || s.certCommonName !== 'edge-1');
    t.same(wrong, [], `every one of the ${shardSeen.seen.length} calls carried "Bearer <token>" and the edge's verified certificate (CN edge-1)`);
  });

  t.test('without its client certificate the edge cannot reach the mTLS node; serverName is verified', async (t) => {
    const built = await buildStores(
      { cas: remote(undefined), ac: { kind: 'memory', maxSizeBytes: 1024 * 1024 } },
      { logger },
    );
    t.teardown(() => closeStores(built));
    await t.rejects((built.cas as RemoteStore).healthCheck(), { code: 14 }, 'no client certificate: UNAVAILABLE');

    const edgeCert = await pki.issueClient('edge-2');
    const byName = await buildStores(
      {
        cas: remote(edgeCert, { tls: { caFile: pki.caFile, certFile: edgeCert.certFile, keyFile: edgeCert.keyFile, serverName: 'localhost' } }),
        ac: remote(edgeCert, { tls: { caFile: pki.caFile, certFile: edgeCert.certFile, keyFile: edgeCert.keyFile, serverName: 'shard.example' } }),
      },
      { logger },
    );
    t.teardown(() => closeStores(byName));
    await (byName.cas as RemoteStore).healthCheck();
    t.pass('serverName "localhost" matches the shard certificate (reached by IP)');
    await t.rejects((byName.ac as RemoteStore).healthCheck(), { code: 14 }, 'serverName "shard.example" does not');
  });

  t.test('the token from an environment variable; bad credentials stop the start with the field named', async (t) => {
    const edgeCert = await pki.issueClient('edge-3');
    process.env.REAPI_TEST_SHARD_TOKEN = ' env-token-77 \n';
    t.teardown(() => delete process.env.REAPI_TEST_SHARD_TOKEN);
    const built = await buildStores(
      { cas: remote(edgeCert, { bearerTokenFile: undefined, bearerTokenEnv: 'REAPI_TEST_SHARD_TOKEN' }), ac: { kind: 'memory', maxSizeBytes: 1024 * 1024 } },
      { logger },
    );
    t.teardown(() => closeStores(built));
    shardSeen.seen.length = 0;
    await (built.cas as RemoteStore).healthCheck();
    t.equal(shardSeen.seen.at(-1)?.authorization, 'Bearer env-token-77', 'trimmed value of the variable');

    const field = 'config.cas.remote';
    await t.rejects(readShardCredentials(remote(edgeCert, { bearerTokenFile: join(dir, 'no-such-token') }), field), {
      name: 'ConfigError',
      message: /^config\.cas\.remote\.bearerTokenFile: cannot read .*no-such-token: ENOENT/,
    });
    await t.rejects(readShardCredentials(remote(edgeCert, { bearerTokenFile: undefined, bearerTokenEnv: 'REAPI_TEST_UNSET_VAR' }), field), {
      message: /^config\.cas\.remote\.bearerTokenEnv: environment variable REAPI_TEST_UNSET_VAR is not set/,
    });
    await writeFile(join(dir, 'empty-token'), '\n');
    await t.rejects(readShardCredentials(remote(edgeCert, { bearerTokenFile: join(dir, 'empty-token') }), field), {
      message: /bearerTokenFile: .*empty-token is empty/,
    });
    await t.rejects(readShardCredentials(remote({ certFile: edgeCert.certFile, keyFile: pki.server.keyFile }), field), {
      message: /^config\.cas\.remote\.tls: OpenSSL refuses the files/,
    });
    // Through the factory, nested: the whole config path.
    const nested: StoreConfig = {
      kind: 'sharding',
      shards: [{ name: 'a', weight: 1, backend: remote(edgeCert, { tls: { caFile: join(dir, 'missing-ca.pem'), certFile: undefined, keyFile: undefined, serverName: undefined } }) }],
      handoffDir: join(dir, 'hints'),
    } as StoreConfig;
    await t.rejects(buildStores({ cas: nested, ac: { kind: 'memory', maxSizeBytes: 1024 } }, { logger }), {
      message: /^config\.cas\.sharding\.shards\.a\.backend\.remote\.tls\.caFile: cannot read .*missing-ca\.pem: ENOENT/,
    });
  });
}
