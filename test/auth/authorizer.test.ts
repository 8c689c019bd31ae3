// Authentication and authorization on a real node (buildApp with `auth`),
// spoken to by real clients: connect-node over gRPC (which takes the
// ByteStream fast path), over the Connect protocol, and over gRPC by hand on
// raw HTTP/2; curl on Connect/JSON. Each denial is checked for its exact
// code and message and for what it left behind (nothing), and the log and
// metrics for what they show (the identity, never a secret).
// The C-core client (python3-grpcio) is in grpcio-auth.test.ts.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import http2 from 'node:http2';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { create, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import type { Client, Transport } from '@connectrpc/connect';
import { createConnectTransport, createGrpcTransport } from '@connectrpc/connect-node';
import { pino } from 'pino';
import t from 'tap';
import type { Test } from 'tap';
import {
  ActionCache,
  Capabilities,
  ContentAddressableStorage,
  Execution,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { Health, HealthCheckResponse_ServingStatus } from '../../gen/grpc/health/v1/health_pb.ts';
import { createMetricsRegistry, metricsInterceptor } from '../../src/admin/metrics.ts';
import type { AuthConfig } from '../../src/config.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import type { Digest } from '../../src/digest.ts';
import { hashPassword } from '../../src/auth/password.ts';
import { writeResourceName } from '../../src/services/resource-name.ts';
import { startNode } from '../helpers/node.ts';

const sha = (s: string) => createHash('sha256').update(s).digest('hex');
const TOKENS = {
  ci: randomBytes(32).toString('base64url'),
  dev: randomBytes(32).toString('base64url'),
  team: randomBytes(32).toString('base64url'),
  limited: randomBytes(32).toString('base64url'),
};
const PASSWORD = 'correct horse battery staple';

const authConfig = async (anonymous: 'none' | 'read'): Promise<AuthConfig> => ({
  anonymous,
  identities: [
    { name: 'ci', tokenSha256: sha(TOKENS.ci), grants: [{ instancePrefix: '', access: 'read-write' }] },
    { name: 'dev', tokenSha256: sha(TOKENS.dev), grants: [{ instancePrefix: '', access: 'read' }] },
    {
      name: 'team-a',
      tokenSha256: sha(TOKENS.team),
      grants: [
        { instancePrefix: 'team-a', access: 'read-write' },
        { instancePrefix: 'team-a/release', access: 'read' },
      ],
    },
    {
      name: 'limited',
      tokenSha256: sha(TOKENS.limited),
      grants: [{ instancePrefix: '', access: 'read' }],
      rateLimit: { requestsPerSecond: 1, burst: 3 },
    },
    { name: 'alice', basic: { username: 'alice', passwordHash: await hashPassword(Buffer.from(PASSWORD)) }, grants: [{ instancePrefix: '', access: 'read-write' }] },
  ],
});

// ---- one node with anonymous "none", with its log and metrics ----

const lines: Record<string, unknown>[] = [];
const rawLog: string[] = [];
const sink = new Writable({
  write(chunk: Buffer, _enc, done) {
    for (const l of chunk.toString().split('\n')) {
      if (l === '') continue;
      rawLog.push(l);
      lines.push(JSON.parse(l) as Record<string, unknown>);
    }
    done();
  },
});
const registry = createMetricsRegistry({ defaultMetrics: false });
const node = await startNode({
  auth: await authConfig('none'),
  logger: pino({ level: 'debug' }, sink),
  interceptors: [metricsInterceptor(registry)],
});
t.teardown(node.close);

const grpc = createGrpcTransport({ baseUrl: node.url });
const connect = createConnectTransport({ baseUrl: node.url, httpVersion: '2' });
const bearer = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

function clients(transport: Transport) {
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
    caps: createClient(Capabilities, transport),
    health: createClient(Health, transport),
    exec: createClient(Execution, transport),
  };
}
const g = clients(grpc);
const c = clients(connect);

/** Resolves to the ConnectError a call fails with (fails the test if it succeeds). */
async function failure(t: Test, call: Promise<unknown>, code: Code, message: RegExp | string, what: string): Promise<ConnectError | undefined> {
  try {
    await call;
    t.fail(`${what}: expected ${Code[code]}, but the call succeeded`);
    return undefined;
  } catch (err) {
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], Code[code], `${what}: ${Code[code]}`);
    if (typeof message === 'string') t.equal(ce.rawMessage, message, `${what}: message`);
    else t.match(ce.rawMessage, message, `${what}: message`);
    return ce;
  }
}

let blobSeed = 0;
function newBlob(size = 1000): { data: Buffer; digest: Digest } {
  const data = Buffer.concat([Buffer.from(`auth test blob ${++blobSeed} `), randomBytes(size)]);
  return { data, digest: digestOf(data) };
}

async function missing(instance: string, digests: Digest[]): Promise<string[]> {
  const res = await g.cas.findMissingBlobs({ instanceName: instance, blobDigests: digests.map(toProtoDigest) }, bearer(TOKENS.ci));
  return res.missingBlobDigests.map((d) => d.hash);
}

function upload(bs: Client<typeof ByteStream>, instance: string, blob: { data: Buffer; digest: Digest }, token?: string) {
  const name = writeResourceName(instance, `u-${blobSeed}`, blob.digest);
  const half = Math.floor(blob.data.length / 2);
  return bs.write(
    (async function* () {
      yield { resourceName: name, writeOffset: 0n, data: blob.data.subarray(0, half) };
      yield { writeOffset: BigInt(half), finishWrite: true, data: blob.data.subarray(half) };
    })(),
    token === undefined ? {} : bearer(token),
  );
}

const actionDigest = () => toProtoDigest(digestOf(randomBytes(32)));

// ---- tests ----

t.test('read-only token: reads pass, every write is PERMISSION_DENIED and writes nothing', async (t) => {
  const instance = 'main';
  const action = actionDigest();
  await failure(t, g.ac.getActionResult({ instanceName: instance, actionDigest: action }, bearer(TOKENS.dev)), Code.NotFound, /.*/, 'GetActionResult (authorized, not there)');
  const caps = await g.caps.getCapabilities({ instanceName: instance }, bearer(TOKENS.dev));
  t.ok(caps.cacheCapabilities !== undefined, 'GetCapabilities');
  const b = newBlob();
  const found = await g.cas.findMissingBlobs({ instanceName: instance, blobDigests: [toProtoDigest(b.digest)] }, bearer(TOKENS.dev));
  t.equal(found.missingBlobDigests.length, 1, 'FindMissingBlobs');

  const denied = 'identity "dev" may only read instance "main" (its grant for "" is read-only); ';
  await failure(
    t,
    g.ac.updateActionResult({ instanceName: instance, actionDigest: action, actionResult: { exitCode: 0 } }, bearer(TOKENS.dev)),
    Code.PermissionDenied,
    `${denied}build.bazel.remote.execution.v2.ActionCache/UpdateActionResult needs read-write access`,
    'UpdateActionResult',
  );
  await failure(
    t,
    g.cas.batchUpdateBlobs({ instanceName: instance, requests: [{ digest: toProtoDigest(b.digest), data: b.data }] }, bearer(TOKENS.dev)),
    Code.PermissionDenied,
    `${denied}build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs needs read-write access`,
    'BatchUpdateBlobs',
  );
  const before = rpcLines('Write').length;
  await failure(t, upload(g.bs, instance, b, TOKENS.dev), Code.PermissionDenied, `${denied}google.bytestream.ByteStream/Write needs read-write access`, 'ByteStream Write over gRPC');
  t.match(String(rpcLines('Write')[before]?.reqId), /^bs-/, 'that Write went through the fast path');
  await failure(t, upload(c.bs, instance, b, TOKENS.dev), Code.PermissionDenied, `${denied}google.bytestream.ByteStream/Write needs read-write access`, 'ByteStream Write over Connect');
  t.notMatch(String(rpcLines('Write')[before + 1]?.reqId), /^bs-/, 'that Write went through Connect');

  t.same(await missing(instance, [b.digest]), [b.digest.hash], 'the blob is still missing');
  t.same(await node.cas.findMissing([b.digest]), [b.digest], 'the store never got it');
  await failure(t, g.ac.getActionResult({ instanceName: instance, actionDigest: action }, bearer(TOKENS.ci)), Code.NotFound, /.*/, 'no ActionResult was stored');

  // The same calls with the read-write token succeed, so the denials were the token's doing.
  await g.ac.updateActionResult({ instanceName: instance, actionDigest: action, actionResult: { exitCode: 0 } }, bearer(TOKENS.ci));
  const res = await upload(g.bs, instance, b, TOKENS.ci);
  t.equal(res.committedSize, BigInt(b.data.length), 'read-write token: Write over gRPC');
  const b2 = newBlob();
  await upload(c.bs, instance, b2, TOKENS.ci);
  t.same(await missing(instance, [b.digest, b2.digest]), [], 'read-write token: both uploads stored');
  const got = await g.ac.getActionResult({ instanceName: instance, actionDigest: action }, bearer(TOKENS.dev));
  t.equal(got.exitCode, 0, 'the read-only token reads what CI wrote');
  let bytes = 0;
  for await (const r of g.bs.read({ resourceName: `${instance}/blobs/${b.digest.hash}/${b.digest.size}` }, bearer(TOKENS.dev))) bytes += r.data.length;
  t.equal(bytes, b.data.length, 'ByteStream Read over gRPC with the read-only token');
  const st = await g.bs.queryWriteStatus({ resourceName: writeResourceName(instance, 'q', b.digest) }, bearer(TOKENS.dev));
  t.equal(st.complete, true, 'QueryWriteStatus is a read');
});

t.test('no credentials, wrong credentials: UNAUTHENTICATED, on both paths', async (t) => {
  const b = newBlob();
  const missingCreds =
    'missing credentials: send Authorization: Bearer <token> (Bazel: --remote_header=Authorization=Bearer <token>), or Authorization: Basic <base64 of user:password>';
  await failure(t, g.ac.getActionResult({ instanceName: 'main', actionDigest: actionDigest() }), Code.Unauthenticated, missingCreds, 'GetActionResult without a token');
  await failure(t, g.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }), Code.Unauthenticated, missingCreds, 'FindMissingBlobs without a token');
  await failure(t, upload(g.bs, 'main', b), Code.Unauthenticated, missingCreds, 'Write (fast path) without a token');
  await failure(t, upload(c.bs, 'main', b), Code.Unauthenticated, missingCreds, 'Write (Connect) without a token');
  await failure(t, upload(g.bs, 'main', b, 'not-a-token'), Code.Unauthenticated, 'invalid bearer token', 'Write (fast path) with a wrong token');
  await failure(t, g.ac.getActionResult({ instanceName: 'main', actionDigest: actionDigest() }, bearer(`${TOKENS.ci}x`)), Code.Unauthenticated, 'invalid bearer token', 'a token one character off');
  await failure(
    t,
    g.ac.getActionResult({ instanceName: 'main', actionDigest: actionDigest() }, { headers: { authorization: 'Token abc' } }),
    Code.Unauthenticated,
    /^unsupported Authorization scheme "Token"/,
    'an unknown scheme',
  );
  t.same(await missing('main', [b.digest]), [b.digest.hash], 'nothing was written');
});

t.test('the ByteStream fast path spoken to by hand: a denied Write is answered before any byte is stored', async (t) => {
  const session = http2.connect(node.url);
  t.teardown(() => session.close());
  const b = newBlob(256 * 1024);
  const name = writeResourceName('main', 'raw', b.digest);
  const frame = (fields: object) => {
    const body = toBinary(WriteRequestSchema, create(WriteRequestSchema, fields));
    const out = Buffer.alloc(5 + body.length);
    out.writeUInt32BE(body.length, 1);
    out.set(body, 5);
    return out;
  };
  const call = (token: string | undefined, end: boolean) =>
    new Promise<{ code: number; message: string }>((resolve) => {
      const stream = session.request({
        ':method': 'POST',
        ':path': '/google.bytestream.ByteStream/Write',
        'content-type': 'application/grpc',
        te: 'trailers',
        ...(token === undefined ? {} : { authorization: `Bearer ${token}` }),
      });
      let status: http2.IncomingHttpHeaders = {};
      stream.on('response', (h) => (status = h));
      stream.on('trailers', (h) => (status = h));
      stream.on('error', () => {});
      stream.resume();
      // The call is over when the response ends, even with the request side still open.
      const done = () => {
        if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
        resolve({ code: Number(status['grpc-status']), message: decodeURIComponent(String(status['grpc-message'] ?? '')) });
      };
      stream.on('end', done);
      stream.on('close', done);
      // The first message only; the rest is never sent unless `end`.
      stream.write(frame({ resourceName: name, writeOffset: 0n, data: b.data.subarray(0, 64 * 1024) }));
      if (end) stream.end(frame({ writeOffset: 65536n, finishWrite: true, data: b.data.subarray(64 * 1024) }));
    });
  const denied = await call(TOKENS.dev, false);
  t.equal(denied.code, Code.PermissionDenied, 'PERMISSION_DENIED after the first message, with the request still open');
  t.match(denied.message, /^identity "dev" may only read instance "main"/);
  const anon = await call(undefined, false);
  t.equal(anon.code, Code.Unauthenticated, 'no token: UNAUTHENTICATED');
  t.same(await node.cas.findMissing([b.digest]), [b.digest], 'nothing stored');
  const ok = await call(TOKENS.ci, true);
  t.equal(ok.code, 0, 'the read-write token uploads the same bytes on the same session');
  t.same(await node.cas.findMissing([b.digest]), [], 'stored');
});

t.test('instance-prefix grants', async (t) => {
  const put = (instance: string) => {
    const b = newBlob(100);
    return g.cas.batchUpdateBlobs({ instanceName: instance, requests: [{ digest: toProtoDigest(b.digest), data: b.data }] }, bearer(TOKENS.team));
  };
  const res = await put('team-a');
  t.equal(res.responses[0]?.status?.code ?? 0, 0, '"team-a" grants team-a');
  await put('team-a/linux');
  t.pass('"team-a" grants team-a/linux');
  await failure(t, put('team-ab'), Code.PermissionDenied, 'identity "team-a" has no access to instance "team-ab" (build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs needs write access)', '"team-a" does not grant team-ab');
  await failure(t, put(''), Code.PermissionDenied, /has no access to instance ""/, 'nor the empty instance');
  await failure(t, put('team-a/release/x'), Code.PermissionDenied, /may only read instance "team-a\/release\/x" \(its grant for "team-a\/release" is read-only\)/, 'the longer read-only prefix wins');
  await g.cas.findMissingBlobs({ instanceName: 'team-a/release/x', blobDigests: [] }, bearer(TOKENS.team));
  t.pass('but reading team-a/release/x is allowed');
  await failure(t, g.cas.findMissingBlobs({ instanceName: 'other', blobDigests: [] }, bearer(TOKENS.team)), Code.PermissionDenied, /has no access to instance "other" \(.*needs read access\)/, 'no read outside the grants');
  const b = newBlob();
  await failure(t, upload(g.bs, 'team-a/release', b, TOKENS.team), Code.PermissionDenied, /may only read instance "team-a\/release"/, 'the resource name\'s instance decides for Write');
  const read = async () => {
    for await (const _ of g.bs.read({ resourceName: `other/blobs/${b.digest.hash}/${b.digest.size}` }, bearer(TOKENS.team))) void _;
  };
  await failure(t, read(), Code.PermissionDenied, /has no access to instance "other"/, 'and for Read');
  await failure(
    t,
    g.cas.findMissingBlobs({ instanceName: 'team-a/../other', blobDigests: [] }, bearer(TOKENS.team)),
    Code.InvalidArgument,
    /contains the segment ".."/,
    'a name that is not an instance name is never matched against a grant',
  );
});

t.test('HTTP basic', async (t) => {
  const auth = { headers: { authorization: `Basic ${Buffer.from(`alice:${PASSWORD}`).toString('base64')}` } };
  const b = newBlob();
  const res = await g.bs.write(
    (async function* () {
      yield { resourceName: writeResourceName('main', 'basic', b.digest), finishWrite: true, data: b.data };
    })(),
    auth,
  );
  t.equal(res.committedSize, BigInt(b.data.length), 'the right password writes');
  const wrong = { headers: { authorization: `Basic ${Buffer.from('alice:wrong').toString('base64')}` } };
  await failure(t, g.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }, wrong), Code.Unauthenticated, 'invalid username or password', 'a wrong password');
});

t.test('rate limit per identity', async (t) => {
  const call = () => g.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }, bearer(TOKENS.limited));
  for (let i = 0; i < 3; i++) await call();
  t.pass('the burst of 3 passes');
  await failure(t, call(), Code.ResourceExhausted, 'identity "limited" is over its rate limit of 1 calls/s (burst 3); retry later', 'the 4th');
  await g.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }, bearer(TOKENS.dev));
  t.pass('another identity is not held back');
});

t.test('health needs no credentials; other methods are closed', async (t) => {
  const res = await g.health.check({ service: '' });
  t.equal(res.status, HealthCheckResponse_ServingStatus.SERVING, 'grpc.health.v1 Check over gRPC without a token');
  const viaConnect = await c.health.check({ service: '' });
  t.equal(viaConnect.status, HealthCheckResponse_ServingStatus.SERVING, 'and over Connect');
  const execute = async (opts: object) => {
    for await (const _ of g.exec.execute({ instanceName: 'main' }, opts)) void _;
  };
  await failure(t, execute(bearer(TOKENS.ci)), Code.PermissionDenied, 'build.bazel.remote.execution.v2.Execution/Execute is not open to any identity on this server', 'Execute, even for CI');
  await failure(t, execute({}), Code.Unauthenticated, /^missing credentials/, 'Execute without a token');
  await failure(t, g.cas.splitBlob({ instanceName: 'main' }, bearer(TOKENS.dev)), Code.Unimplemented, /.*/, 'SplitBlob is a read: an authorized caller learns it is UNIMPLEMENTED');
});

t.test('curl with a bearer token on Connect/JSON', async (t) => {
  const run = promisify(execFile);
  const curl = async (method: string, body: object, headers: string[] = []) => {
    const args = ['-s', '-w', '\n%{http_code}', '-H', 'Content-Type: application/json', ...headers.flatMap((h) => ['-H', h]), '-d', JSON.stringify(body), `${node.url}/${method}`];
    const { stdout } = await run('curl', args);
    const cut = stdout.lastIndexOf('\n');
    return { status: Number(stdout.slice(cut + 1)), body: JSON.parse(stdout.slice(0, cut)) as Record<string, unknown> };
  };
  const fm = 'build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs';
  const b = newBlob();
  const req = { instanceName: 'main', blobDigests: [{ hash: b.digest.hash, sizeBytes: String(b.digest.size) }] };
  const ok = await curl(fm, req, [`Authorization: Bearer ${TOKENS.dev}`]);
  t.equal(ok.status, 200);
  t.same(ok.body, { missingBlobDigests: [{ hash: b.digest.hash, sizeBytes: String(b.digest.size) }] }, 'FindMissingBlobs with the read-only token');
  const none = await curl(fm, req);
  t.equal(none.status, 401, 'no token: HTTP 401');
  t.equal(none.body.code, 'unauthenticated');
  const upd = await curl(
    'build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs',
    { instanceName: 'main', requests: [{ digest: { hash: b.digest.hash, sizeBytes: String(b.digest.size) }, data: b.data.toString('base64') }] },
    [`Authorization: Bearer ${TOKENS.dev}`],
  );
  t.equal(upd.status, 403, 'BatchUpdateBlobs with the read-only token: HTTP 403');
  t.equal(upd.body.code, 'permission_denied');
  t.match(String(upd.body.message), /^identity "dev" may only read instance "main"/);
  const { stdout } = await run('curl', ['-s', '-u', `alice:${PASSWORD}`, '-H', 'Content-Type: application/json', '-d', JSON.stringify(req), `${node.url}/${fm}`]);
  t.same(JSON.parse(stdout), ok.body, 'curl -u (HTTP basic)');
  t.same(await missing('main', [b.digest]), [b.digest.hash], 'nothing was written');
});

t.test('the log shows who was denied and why, never a secret; metrics count the codes', async (t) => {
  const denials = lines.filter((l) => l.msg === 'call denied');
  t.ok(denials.length > 0, 'denials are logged');
  t.ok(denials.every((l) => l.level === 30), 'at info');
  t.ok(
    denials.some((l) => l.identity === 'dev' && l.code === 'PermissionDenied' && /ByteStream\/Write|UpdateActionResult|BatchUpdateBlobs/.test(String(l.rpc))),
    'a line names the identity, the code and the method',
  );
  t.ok(denials.some((l) => l.identity === null && l.code === 'Unauthenticated'), 'unauthenticated ones have no identity');
  const all = rawLog.join('\n');
  for (const [name, token] of Object.entries(TOKENS)) t.notOk(all.includes(token), `the ${name} token is not in the log`);
  t.notOk(all.includes(PASSWORD), 'the password is not in the log');
  t.notOk(all.includes(Buffer.from(`alice:${PASSWORD}`).toString('base64')), 'nor the basic header');

  const rpcs = lines.filter((l) => l.msg === 'rpc' || l.msg === 'rpc failed');
  t.ok(rpcs.some((l) => l.identity === 'ci' && l.code === 'ok'), 'the per-RPC line names the identity');
  t.ok(rpcs.some((l) => l.identity === 'dev' && l.code === 'PermissionDenied'), 'also for denied calls');

  const text = await registry.metrics();
  t.match(text, /reapi_edge_rpc_requests_total\{service="google.bytestream.ByteStream",method="Write",code="PERMISSION_DENIED"\} [1-9]/, 'metrics count denied Writes');
  t.match(text, /reapi_edge_rpc_requests_total\{[^}]*code="UNAUTHENTICATED"\} [1-9]/, 'and unauthenticated calls');
});

t.test('a flood of denied calls logs one line per identity and code, not one per call', async (t) => {
  const own: Record<string, unknown>[] = [];
  const logSink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') own.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  const quiet = await startNode({ auth: await authConfig('none'), logger: pino({ level: 'info' }, logSink) });
  t.teardown(quiet.close);
  const q = clients(createGrpcTransport({ baseUrl: quiet.url }));
  for (let i = 0; i < 50; i++) {
    await q.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }).catch(() => undefined);
    await q.cas.batchUpdateBlobs({ instanceName: 'main', requests: [] }, bearer(TOKENS.dev)).catch(() => undefined);
  }
  const denied = own.filter((l) => l.msg === 'call denied');
  t.same(
    denied.map((l) => `${String(l.identity)} ${String(l.code)}`).sort(),
    ['dev PermissionDenied', 'null Unauthenticated'],
    '100 denied calls, 2 lines',
  );
});

t.test('anonymous "read": reads without credentials, writes UNAUTHENTICATED, wrong tokens still rejected', async (t) => {
  const open = await startNode({ auth: await authConfig('read') });
  t.teardown(open.close);
  const o = clients(createGrpcTransport({ baseUrl: open.url }));
  const oc = clients(createConnectTransport({ baseUrl: open.url, httpVersion: '2' }));
  const b = newBlob();
  const res = await o.cas.findMissingBlobs({ instanceName: 'any/instance', blobDigests: [toProtoDigest(b.digest)] });
  t.equal(res.missingBlobDigests.length, 1, 'FindMissingBlobs without credentials');
  await failure(t, o.ac.getActionResult({ instanceName: 'x', actionDigest: actionDigest() }), Code.NotFound, /.*/, 'GetActionResult without credentials reaches the cache');
  const anonWrite = /^anonymous callers may only read: .* on instance "main" needs an identity with read-write access: send Authorization: Bearer <token>/;
  await failure(t, o.ac.updateActionResult({ instanceName: 'main', actionDigest: actionDigest(), actionResult: {} }), Code.Unauthenticated, anonWrite, 'UpdateActionResult');
  await failure(t, upload(o.bs, 'main', b), Code.Unauthenticated, anonWrite, 'Write over gRPC (fast path)');
  await failure(t, upload(oc.bs, 'main', b), Code.Unauthenticated, anonWrite, 'Write over Connect');
  await failure(t, o.cas.findMissingBlobs({ instanceName: 'main', blobDigests: [] }, bearer('wrong')), Code.Unauthenticated, 'invalid bearer token', 'a wrong token is not taken as anonymous');
  t.same(await open.cas.findMissing([b.digest]), [b.digest], 'nothing written');
  await upload(o.bs, 'main', b, TOKENS.ci);
  t.same(await open.cas.findMissing([b.digest]), [], 'a token still writes');
});

t.test('a node without auth is open, as before', async (t) => {
  const plain = await startNode();
  t.teardown(plain.close);
  const p = clients(createGrpcTransport({ baseUrl: plain.url }));
  const b = newBlob();
  await upload(p.bs, 'main', b);
  t.same(await plain.cas.findMissing([b.digest]), [], 'anyone writes');
});

function rpcLines(method: string): Record<string, unknown>[] {
  return lines.filter((l) => (l.msg === 'rpc' || l.msg === 'rpc failed') && String(l.rpc).endsWith(`/${method}`));
}
