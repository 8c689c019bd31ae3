// A verified client certificate as the credential: its subject CN names an
// identity (clientCertCommonName), on a node with TLS and an optional
// client certificate. A header, when sent, decides instead (and a wrong one
// is never saved by a good certificate); a certificate whose CN names no
// identity counts as no credential. The PKI is made with openssl at test
// time (test/helpers/certs.ts).
import { execFile, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import type { Test } from 'tap';
import { ActionCache, ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { writeResourceName } from '../../src/services/resource-name.ts';
import { createPki, opensslMissing } from '../helpers/certs.ts';
import type { IssuedCert } from '../helpers/certs.ts';
import { startNode } from '../helpers/node.ts';

if (opensslMissing !== undefined) {
  if (process.env.CI === 'true') t.fail(`${opensslMissing}, but CI=true requires this test`);
  else t.plan(0, opensslMissing);
} else {
  t.test('client certificates name identities', main);
}

async function main(t: Test): Promise<void> {
  const pki = await createPki();
  t.teardown(pki.remove);
  const devToken = randomBytes(32).toString('base64url');
  const node = await startNode({
    tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile, clientCaFile: pki.caFile, clientCert: 'optional' },
    auth: {
      anonymous: 'none',
      identities: [
        { name: 'runner', clientCertCommonName: 'runner-7', grants: [{ instancePrefix: '', access: 'read-write' }] },
        { name: 'dev', tokenSha256: createHash('sha256').update(devToken).digest('hex'), grants: [{ instancePrefix: '', access: 'read' }] },
      ],
    },
  });
  t.teardown(node.close);
  const runner = await pki.issueClient('runner-7');
  const stranger = await pki.issueClient('stranger');

  const clientsFor = (cert: IssuedCert | undefined, transport: 'grpc' | 'connect' = 'grpc') => {
    const nodeOptions = cert === undefined ? { ca: pki.ca } : { ca: pki.ca, cert: cert.cert, key: cert.key };
    const tr =
      transport === 'grpc'
        ? createGrpcTransport({ baseUrl: node.url, nodeOptions })
        : createConnectTransport({ baseUrl: node.url, httpVersion: '2', nodeOptions });
    return { cas: createClient(ContentAddressableStorage, tr), ac: createClient(ActionCache, tr), bs: createClient(ByteStream, tr) };
  };
  const codeOf = (p: Promise<unknown>) =>
    p.then(
      () => 'OK',
      (err: unknown) => {
        const ce = ConnectError.from(err);
        return `${Code[ce.code]}: ${ce.rawMessage}`;
      },
    );
  let n = 0;
  const write = (bs: ReturnType<typeof clientsFor>['bs'], headers: Record<string, string> = {}) => {
    const data = randomBytes(5000);
    const digest = digestOf(data);
    const call = bs.write(
      (async function* () {
        yield { resourceName: writeResourceName('main', `m-${++n}`, digest), finishWrite: true, data };
      })(),
      { headers },
    );
    return { digest, call };
  };

  const r = clientsFor(runner);
  const w = write(r.bs);
  t.equal(await codeOf(w.call), 'OK', 'the runner certificate writes over gRPC (the fast path)');
  const wc = write(clientsFor(runner, 'connect').bs);
  t.equal(await codeOf(wc.call), 'OK', 'and over Connect');
  t.same(await node.cas.findMissing([w.digest, wc.digest]), [], 'both stored');
  t.equal(
    await codeOf(r.ac.updateActionResult({ instanceName: 'main', actionDigest: toProtoDigest(digestOf(randomBytes(8))), actionResult: {} })),
    'OK',
    'UpdateActionResult with the certificate',
  );

  const s = write(clientsFor(stranger).bs);
  t.match(
    await codeOf(s.call),
    /^Unauthenticated: missing credentials: .* \(the client certificate's CN "stranger" names no identity\)$/,
    'a CA-signed certificate whose CN names no identity is no credential, and the message says so',
  );
  const none = write(clientsFor(undefined).bs);
  t.match(await codeOf(none.call), /^Unauthenticated: missing credentials/, 'no certificate, no header');

  const wrong = write(r.bs, { authorization: 'Bearer wrong' });
  t.equal(await codeOf(wrong.call), 'Unauthenticated: invalid bearer token', 'a wrong header is not saved by a good certificate');
  const asDev = write(r.bs, { authorization: `Bearer ${devToken}` });
  t.match(await codeOf(asDev.call), /^PermissionDenied: identity "dev" may only read/, 'a header decides over the certificate');
  t.same(
    (await node.cas.findMissing([s.digest, none.digest, wrong.digest, asDev.digest])).length,
    4,
    'none of the refused uploads was stored',
  );
  t.equal(await codeOf(r.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] })), 'OK', 'the runner reads too');

  // curl over HTTPS (Connect/JSON) with the token: the README's debugging path on a secured port.
  const curlArgs = (headers: string[]) => [
    '-sS', '--max-time', '20', '--cacert', pki.caFile, '-H', 'Content-Type: application/json', ...headers,
    '-d', '{"instanceName":"main"}', '-w', '\n%{http_code}',
    `${node.url}/build.bazel.remote.execution.v2.Capabilities/GetCapabilities`,
  ];
  const curl = (headers: string[]) =>
    new Promise<string>((resolve) => execFile('curl', curlArgs(headers), (_err, stdout, stderr) => resolve(`${stdout}${stderr}`)));
  if (spawnSync('curl', ['--version']).status !== 0) {
    if (process.env.CI === 'true') t.fail('curl is not installed, but CI=true requires it');
    return;
  }
  t.match(await curl(['-H', `Authorization: Bearer ${devToken}`]), /"cacheCapabilities"[\s\S]*\n200$/, 'curl over HTTPS with the token: 200');
  t.match(await curl([]), /"code":"unauthenticated"[\s\S]*\n401$/, 'curl over HTTPS without it: 401 unauthenticated');
}
