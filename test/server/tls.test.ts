// TLS and mTLS on the REAPI port (issue 11), with clients nobody here wrote:
// python grpcio (C-core) with and without a client certificate, curl over
// HTTPS, plus node's own clients for what they see of the certificate
// (reloads). The PKI is made with openssl at test time (test/helpers/certs.ts).
import { execFile, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { copyFile, writeFile } from 'node:fs/promises';
import http2 from 'node:http2';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import type { Interceptor } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Test } from 'tap';
import { Capabilities, ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { ConfigError } from '../../src/config.ts';
import type { ServerTlsConfig } from '../../src/config.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import type { OnePortServer } from '../../src/server/listen.ts';
import { kPeer } from '../../src/server/peer.ts';
import type { PeerInfo } from '../../src/server/peer.ts';
import { loadTlsMaterial } from '../../src/server/tls.ts';
import { createPki, opensslMissing } from '../helpers/certs.ts';
import type { IssuedCert, Pki } from '../helpers/certs.ts';
import { startNode } from '../helpers/node.ts';
import { spawnNode } from '../helpers/spawn-node.ts';

const python = '/usr/bin/python3';
const CAPABILITIES_PATH = '/build.bazel.remote.execution.v2.Capabilities/GetCapabilities';

const pythonMissing =
  spawnSync(python, ['-c', 'import grpc']).status === 0 ? undefined : 'python3-grpcio not installed (apt-get install python3-grpcio)';
const curlMissing = spawnSync('curl', ['--version']).status === 0 ? undefined : 'curl not installed';

function requireOrSkip(t: Test, reason: string | undefined): boolean {
  if (reason === undefined) return true;
  if (process.env.CI === 'true') t.fail(`${reason}, but CI=true requires this test`);
  else t.comment(`skipped: ${reason}`);
  return false;
}

if (opensslMissing !== undefined) {
  if (process.env.CI === 'true') t.fail(`${opensslMissing}, but CI=true requires the TLS tests`);
  else t.plan(0, opensslMissing);
} else {
  main();
}

/** Records the peer each RPC saw, by method and path kind. */
function peerRecorder(): { interceptor: Interceptor; seen: Map<string, PeerInfo> } {
  const seen = new Map<string, PeerInfo>();
  return {
    seen,
    interceptor: (next) => async (req) => {
      seen.set(req.method.name, req.contextValues.get(kPeer));
      return next(req);
    },
  };
}

/**
 * python grpcio (C-core) calls GetCapabilities and grpc.health.v1 Check
 * over TLS with raw bytes (no stubs needed): an empty message is a valid
 * request for both. Prints JSON: per call {ok, code, details}.
 */
const PY_CLIENT = `
import json, sys, grpc
target, ca, cert, key = sys.argv[1:5]
def read(p): return None if p == '-' else open(p, 'rb').read()
creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
out = {}
with grpc.secure_channel(target, creds) as channel:
    for name, path in [('capabilities', '/build.bazel.remote.execution.v2.Capabilities/GetCapabilities'),
                       ('health', '/grpc.health.v1.Health/Check')]:
        call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            res = call(b'', timeout=10)
            out[name] = {'ok': True, 'bytes': len(res)}
        except grpc.RpcError as e:
            out[name] = {'ok': False, 'code': e.code().name, 'details': e.details()}
print(json.dumps(out))
`;

interface PyResult {
  capabilities: { ok: boolean; code?: string; details?: string; bytes?: number };
  health: { ok: boolean; code?: string; details?: string };
}

async function grpcio(port: number, pki: Pki, client: IssuedCert | undefined): Promise<PyResult> {
  const args = ['-c', PY_CLIENT, `127.0.0.1:${port}`, pki.caFile, client?.certFile ?? '-', client?.keyFile ?? '-'];
  const stdout = await new Promise<string>((resolve, reject) =>
    execFile(python, args, { timeout: 60_000 }, (err, out, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(out))),
  );
  return JSON.parse(stdout) as PyResult;
}

async function curl(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) =>
    execFile('curl', ['-sS', '--max-time', '20', ...args], { timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr }),
    ),
  );
}

/** The server certificate a fresh TLS connection is shown, by fingerprint. */
async function servedFingerprint(port: number, ca: string): Promise<string> {
  const socket = tls.connect({ host: '127.0.0.1', port, ca, ALPNProtocols: ['h2'] });
  try {
    await once(socket, 'secureConnect');
    return socket.getPeerX509Certificate()!.fingerprint256;
  } finally {
    socket.destroy();
  }
}

function tlsConfig(pki: Pki, extra: Partial<ServerTlsConfig> = {}): ServerTlsConfig {
  return { certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCert: 'require', ...extra };
}

function main(): void {
  let pki: Pki;
  t.before(async () => {
    pki = await createPki();
  });
  t.teardown(() => pki?.remove());

  t.test('TLS without client certificates: gRPC (ALPN h2) and Connect/JSON over HTTPS on one port', async (t) => {
    const recorder = peerRecorder();
    const node = await startNode({ tls: tlsConfig(pki), interceptors: [recorder.interceptor] });
    t.teardown(node.close);
    t.match(node.url, /^https:/);

    const grpc = createClient(Capabilities, createGrpcTransport({ baseUrl: node.url, nodeOptions: { ca: pki.ca } }));
    const caps = await grpc.getCapabilities({});
    t.ok(caps.cacheCapabilities, 'gRPC over TLS (node:http2 client)');
    t.same(recorder.seen.get('GetCapabilities'), { address: '127.0.0.1', tls: true, certCommonName: undefined }, 'kPeer: TLS, no certificate');

    const connect11 = createClient(Capabilities, createConnectTransport({ baseUrl: node.url, httpVersion: '1.1', nodeOptions: { ca: pki.ca } }));
    t.ok((await connect11.getCapabilities({})).cacheCapabilities, 'Connect/JSON over HTTPS/1.1');

    // A cleartext client gets nowhere.
    const plain = createClient(Capabilities, createGrpcTransport({ baseUrl: node.url.replace('https:', 'http:') }));
    await t.rejects(plain.getCapabilities({}, { timeoutMs: 3000 }), 'an h2c client cannot talk to the TLS port');

    if (requireOrSkip(t, curlMissing)) {
      const res = await curl([
        '--cacert', pki.caFile, '-H', 'Content-Type: application/json', '-d', '{}', '-w', '\\n%{http_version} %{http_code}',
        `${node.url}${CAPABILITIES_PATH}`,
      ]);
      t.equal(res.code, 0, `curl exits 0 ${res.stderr}`);
      t.match(res.stdout, /"cacheCapabilities"/, 'curl over HTTPS: a Connect/JSON answer');
      t.match(res.stdout, /\n2 200$/, 'curl negotiated HTTP/2 by ALPN');
      const h1 = await curl([
        '--http1.1', '--cacert', pki.caFile, '-H', 'Content-Type: application/json', '-d', '{}', '-w', '\\n%{http_version} %{http_code}',
        `https://localhost:${node.port}${CAPABILITIES_PATH}`,
      ]);
      t.match(h1.stdout, /"cacheCapabilities"[\s\S]*\n1\.1 200$/, 'curl --http1.1, by the DNS name in the certificate');
      const untrusted = await curl(['-H', 'Content-Type: application/json', '-d', '{}', `${node.url}${CAPABILITIES_PATH}`]);
      t.not(untrusted.code, 0, 'curl without --cacert refuses the private CA');
    }
  });

  t.test('mTLS require: python grpcio with a client certificate gets through, without one it does not', async (t) => {
    if (!requireOrSkip(t, pythonMissing)) return;
    const recorder = peerRecorder();
    const node = await startNode({ tls: tlsConfig(pki, { clientCaFile: pki.caFile, clientCert: 'require' }), interceptors: [recorder.interceptor] });
    t.teardown(node.close);
    const runner = await pki.issueClient('runner-7');
    const rogue = await pki.issueClient('runner-7', { ca: 'other' });

    const withCert = await grpcio(node.port, pki, runner);
    t.ok(withCert.capabilities.ok, `GetCapabilities with a client certificate ${JSON.stringify(withCert.capabilities)}`);
    t.ok(withCert.health.ok, 'health Check with a client certificate');
    t.same(recorder.seen.get('GetCapabilities'), { address: '127.0.0.1', tls: true, certCommonName: 'runner-7' }, 'kPeer names the verified CN');

    const without = await grpcio(node.port, pki, undefined);
    t.equal(without.capabilities.code, 'UNAVAILABLE', `no certificate: refused at the handshake (${without.capabilities.details})`);
    const wrongCa = await grpcio(node.port, pki, rogue);
    t.equal(wrongCa.capabilities.code, 'UNAVAILABLE', `a certificate from another CA: refused (${wrongCa.capabilities.details})`);
    const stats = (node.app.server as unknown as OnePortServer).connectionStats();
    t.ok(stats.tlsHandshakeFailures >= 2, `handshake failures counted (${stats.tlsHandshakeFailures})`);
  });

  t.test('mTLS optional: no certificate is accepted (no CN), a good one names the peer, a bad one is refused', async (t) => {
    const recorder = peerRecorder();
    const node = await startNode({
      tls: tlsConfig(pki, { clientCaFile: pki.caFile, clientCert: 'optional' }),
      interceptors: [recorder.interceptor],
    });
    t.teardown(node.close);
    const runner = await pki.issueClient('ci-runner');
    const rogue = await pki.issueClient('ci-runner', { ca: 'other' });

    if (requireOrSkip(t, pythonMissing)) {
      const without = await grpcio(node.port, pki, undefined);
      t.ok(without.capabilities.ok, `python grpcio without a certificate is served ${JSON.stringify(without.capabilities)}`);
      t.same(recorder.seen.get('GetCapabilities'), { address: '127.0.0.1', tls: true, certCommonName: undefined });
      const withCert = await grpcio(node.port, pki, runner);
      t.ok(withCert.capabilities.ok, 'python grpcio with a good certificate is served');
      t.equal(recorder.seen.get('GetCapabilities')?.certCommonName, 'ci-runner');
      const bad = await grpcio(node.port, pki, rogue);
      t.equal(bad.capabilities.code, 'UNAVAILABLE', `python grpcio with a certificate from another CA is refused (${bad.capabilities.details})`);
    }

    // The verified CN on all three call paths: the ByteStream fast path,
    // direct gRPC routes, and fastify (Connect/JSON).
    recorder.seen.clear();
    const nodeOptions = { ca: pki.ca, cert: runner.cert, key: runner.key };
    const grpc = createGrpcTransport({ baseUrl: node.url, nodeOptions });
    const blob = new TextEncoder().encode('hello over mTLS');
    const digest = digestOf(blob);
    await createClient(ByteStream, grpc).write(
      (async function* () {
        yield { resourceName: `uploads/5f0c0e3a-4c4f-4e43-9d3e-8a1a9f1f0a11/blobs/${digest.hash}/${digest.size}`, data: blob, finishWrite: true };
      })(),
    );
    await createClient(ContentAddressableStorage, grpc).findMissingBlobs({ blobDigests: [toProtoDigest(digest)] });
    const json = createConnectTransport({ baseUrl: node.url, httpVersion: '1.1', nodeOptions });
    await createClient(Capabilities, json).getCapabilities({});
    t.equal(recorder.seen.get('Write')?.certCommonName, 'ci-runner', 'fast path (ByteStream Write over gRPC)');
    t.equal(recorder.seen.get('FindMissingBlobs')?.certCommonName, 'ci-runner', 'direct gRPC route');
    t.equal(recorder.seen.get('GetCapabilities')?.certCommonName, 'ci-runner', 'fastify (Connect/JSON over HTTPS/1.1)');

    // node's own client with the rogue certificate: refused after the handshake.
    const rogueClient = createClient(
      Capabilities,
      createGrpcTransport({ baseUrl: node.url, nodeOptions: { ca: pki.ca, cert: rogue.cert, key: rogue.key } }),
    );
    const err = await rogueClient.getCapabilities({}, { timeoutMs: 5000 }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    // Refused after the handshake (TLS 1.3: the client sends its certificate
    // last), so node's client sees its stream end rather than a handshake alert.
    t.ok(err !== undefined, `node client with a certificate from another CA: refused (${err === undefined ? 'served!' : `${Code[err.code]}: ${err.rawMessage}`})`);
    t.ok((node.app.server as unknown as OnePortServer).connectionStats().rejectedClientCertificates >= 1, 'counted');

    if (requireOrSkip(t, curlMissing)) {
      const res = await curl([
        '--cacert', pki.caFile, '--cert', runner.certFile, '--key', runner.keyFile,
        '-H', 'Content-Type: application/json', '-d', '{}', `${node.url}${CAPABILITIES_PATH}`,
      ]);
      t.match(res.stdout, /"cacheCapabilities"/, 'curl with a client certificate');
    }
  });

  t.test('a changed certificate file is picked up by new connections; an old connection keeps working', async (t) => {
    const dir = t.testdir();
    const certFile = `${dir}/server.pem`;
    const keyFile = `${dir}/server.key`;
    await copyFile(pki.server.certFile, certFile);
    await copyFile(pki.server.keyFile, keyFile);
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(line) });
    const node = await startNode({ tls: { certFile, keyFile, clientCert: 'require' }, logger });
    t.teardown(node.close);
    const before = await servedFingerprint(node.port, pki.ca);

    // An HTTP/2 session opened before the change.
    const session = http2.connect(node.url, { ca: pki.ca });
    t.teardown(() => session.destroy());
    const call = () => unaryOver(session, CAPABILITIES_PATH);
    t.equal(await call(), 200, 'old session works before the change');

    // A broken certificate file: the old one stays in use.
    await writeFile(certFile, '-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n');
    await waitFor(() => lines.some((l) => l.includes('TLS reload failed')), 5000);
    t.match(lines.find((l) => l.includes('TLS reload failed')), /config\.tls\.certFile/, 'the error names the field');
    t.equal(await servedFingerprint(node.port, pki.ca), before, 'after a bad file, new connections still get the old certificate');

    // A new certificate (and key), written one after the other as tools do.
    const next = await pki.issueServer('localhost', { name: 'server-reloaded' });
    await writeFile(keyFile, next.key);
    await writeFile(certFile, next.cert);
    let after = before;
    await waitFor(async () => (after = await servedFingerprint(node.port, pki.ca)) !== before, 8000);
    t.not(after, before, 'a new connection gets the new certificate');
    t.equal(after, new (await import('node:crypto')).X509Certificate(next.cert).fingerprint256);
    t.equal(await call(), 200, 'the session opened before the reload still serves calls');
    t.notOk(session.closed || session.destroyed, 'and was never closed');
  });

  t.test('SIGHUP reloads the certificate of a running node (and does not kill it)', async (t) => {
    const dir = t.testdir();
    const certFile = `${dir}/server.pem`;
    const keyFile = `${dir}/server.key`;
    await copyFile(pki.server.certFile, certFile);
    await copyFile(pki.server.keyFile, keyFile);
    // Relative paths in the config resolve against its directory.
    const node = await spawnNode({ dir, config: { tls: { certFile: 'server.pem', keyFile: 'server.key' } } });
    t.teardown(node.stop);
    await waitFor(() => node.logs().some((l) => l.includes('over TLS')), 5000);
    t.match(node.logs().find((l) => l.includes('over TLS')), /grpcs:\/\/127\.0\.0\.1:\d+/, 'the node announces TLS and grpcs://');
    const before = await servedFingerprint(node.port, pki.ca);
    t.equal(before, new (await import('node:crypto')).X509Certificate(pki.server.cert).fingerprint256);

    const session = http2.connect(`https://127.0.0.1:${node.port}`, { ca: pki.ca });
    t.teardown(() => session.destroy());
    t.equal(await unaryOver(session, CAPABILITIES_PATH), 200);

    const next = await pki.issueServer('localhost', { name: 'server-sighup' });
    // Written without waiting for the file watcher: SIGHUP does it at once.
    await writeFile(keyFile, next.key);
    await writeFile(certFile, next.cert);
    process.kill(node.pid, 'SIGHUP');
    await waitFor(() => node.logs().some((l) => l.includes('TLS certificate reloaded')), 5000);
    t.equal(node.exitInfo(), undefined, 'still running after SIGHUP');
    t.not(await servedFingerprint(node.port, pki.ca), before, 'new connections get the new certificate');
    t.equal(await unaryOver(session, CAPABILITIES_PATH), 200, 'the old session still works');
    process.kill(node.pid, 'SIGHUP');
    await sleep(300);
    t.equal(node.exitInfo(), undefined, 'a second SIGHUP is harmless too');
    const stopped = await node.stop();
    t.equal(stopped.code, 0, 'exits 0 on SIGTERM');
  });

  t.test('startup: a missing or bad TLS file is a config error naming the field and the file', async (t) => {
    await t.rejects(loadTlsMaterial(tlsConfig(pki, { certFile: `${pki.dir}/nope.pem` })), {
      name: 'ConfigError',
      message: /^config\.tls\.certFile: cannot read .*nope\.pem: ENOENT/,
    });
    await t.rejects(loadTlsMaterial(tlsConfig(pki, { keyFile: pki.caFile })), {
      message: /^config\.tls\.keyFile: .*ca\.pem is not an unencrypted PEM private key/,
    });
    const other = await pki.issueClient('someone');
    await t.rejects(loadTlsMaterial(tlsConfig(pki, { keyFile: other.keyFile })), {
      message: /^config\.tls\.keyFile: the key in .* does not belong to the certificate in .*server\.pem/,
    });
    await t.rejects(loadTlsMaterial(tlsConfig(pki, { clientCaFile: pki.server.keyFile })), {
      message: /^config\.tls\.clientCaFile: .*server\.key holds no PEM certificate/,
    });
    t.ok(ConfigError);

    // The process: exit code 2 and the message on stderr.
    const failed = await spawnNode({ config: { tls: { certFile: 'missing.pem', keyFile: 'missing.key' } } }).then(
      () => undefined,
      (err: unknown) => String(err),
    );
    t.match(failed, /bad config: config\.tls\.certFile: cannot read .*missing\.pem: ENOENT/, 'node exits before listening, naming the field');
  });
}

/** One unary request on an existing session; resolves with the HTTP status. */
async function unaryOver(session: http2.ClientHttp2Session, path: string): Promise<number> {
  const stream = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/json' });
  stream.end('{}');
  const [headers] = (await once(stream, 'response')) as [http2.IncomingHttpHeaders];
  stream.resume();
  await once(stream, 'end');
  return Number(headers[':status']);
}

async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(50);
  }
}
