// Bearer tokens from a gRPC client nobody here wrote: Python grpcio (C-core)
// sends `authorization: Bearer ...` as call metadata, as Bazel's
// --remote_header does, against a node with auth. A read-only token reads
// and is refused every write (nothing lands), a read-write token writes, no
// token or a wrong one is UNAUTHENTICATED, health needs nothing.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import t from 'tap';
import type { Test } from 'tap';
import { startNode } from '../helpers/node.ts';

const here = dirname(fileURLToPath(import.meta.url));

const missingPrereq = pythonGrpcMissing();

if (missingPrereq !== undefined) {
  if (process.env.CI === 'true') t.fail(`${missingPrereq}, but CI=true requires this test`);
  else t.plan(0, `${missingPrereq} (apt-get install python3-grpcio python3-grpc-tools bazel-bootstrap-source)`);
} else {
  t.test('python grpcio (C-core) with bearer tokens in call metadata', main);
}

/** Each check prints {"name", "ok", "detail"}; the test asserts each by name. */
const SCRIPT = String.raw`
import hashlib, json, sys, uuid
sys.path.insert(0, sys.argv[2])
import grpc
from build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from google.bytestream import bytestream_pb2 as bs
from google.bytestream import bytestream_pb2_grpc as bs_grpc

target, _, read_token, write_token = sys.argv[1:5]
channel = grpc.insecure_channel(target)
cas = re_grpc.ContentAddressableStorageStub(channel)
ac = re_grpc.ActionCacheStub(channel)
bytestream = bs_grpc.ByteStreamStub(channel)
T = 30
INSTANCE = "main"

def md(token):
    return (("authorization", "Bearer " + token),)

def digest_of(data):
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))

def code_of(fn):
    try:
        fn()
        return "OK", ""
    except grpc.RpcError as err:
        return err.code().name, err.details()

def write(data, metadata):
    d = digest_of(data)
    name = f"{INSTANCE}/uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
    def reqs():
        yield bs.WriteRequest(resource_name=name, write_offset=0, data=data[:1000])
        yield bs.WriteRequest(write_offset=1000, data=data[1000:], finish_write=True)
    return bytestream.Write(reqs(), timeout=T, metadata=metadata)

def missing(digests):
    res = cas.FindMissingBlobs(re.FindMissingBlobsRequest(instance_name=INSTANCE, blob_digests=digests), timeout=T, metadata=md(write_token))
    return [d.hash for d in res.missing_blob_digests]

checks = []
def check(name, ok, detail):
    checks.append({"name": name, "ok": bool(ok), "detail": detail})

blob = b"grpcio auth blob " + uuid.uuid4().bytes * 100
d = digest_of(blob)
action = digest_of(b"grpcio auth action " + uuid.uuid4().bytes)
result = re.ActionResult(exit_code=0)

c = code_of(lambda: cas.FindMissingBlobs(re.FindMissingBlobsRequest(instance_name=INSTANCE, blob_digests=[d]), timeout=T, metadata=md(read_token)))
check("read_token_find_missing", c[0] == "OK", c)
c = code_of(lambda: ac.GetActionResult(re.GetActionResultRequest(instance_name=INSTANCE, action_digest=action), timeout=T, metadata=md(read_token)))
check("read_token_get_action_result_reaches_cache", c[0] == "NOT_FOUND", c)
c = code_of(lambda: ac.UpdateActionResult(re.UpdateActionResultRequest(instance_name=INSTANCE, action_digest=action, action_result=result), timeout=T, metadata=md(read_token)))
check("read_token_update_action_result_denied", c[0] == "PERMISSION_DENIED" and 'identity "dev"' in c[1], c)
c = code_of(lambda: write(blob, md(read_token)))
check("read_token_write_denied", c[0] == "PERMISSION_DENIED", c)
req = re.BatchUpdateBlobsRequest(instance_name=INSTANCE)
req.requests.add(digest=d, data=blob)
c = code_of(lambda: cas.BatchUpdateBlobs(req, timeout=T, metadata=md(read_token)))
check("read_token_batch_update_denied", c[0] == "PERMISSION_DENIED", c)
check("nothing_written", missing([d]) == [d.hash], missing([d]))
c = code_of(lambda: ac.GetActionResult(re.GetActionResultRequest(instance_name=INSTANCE, action_digest=action), timeout=T, metadata=md(write_token)))
check("no_action_result_written", c[0] == "NOT_FOUND", c)

c = code_of(lambda: cas.FindMissingBlobs(re.FindMissingBlobsRequest(instance_name=INSTANCE, blob_digests=[d]), timeout=T))
check("no_token_unauthenticated", c[0] == "UNAUTHENTICATED" and c[1].startswith("missing credentials"), c)
c = code_of(lambda: cas.FindMissingBlobs(re.FindMissingBlobsRequest(instance_name=INSTANCE, blob_digests=[d]), timeout=T, metadata=md(read_token + "x")))
check("wrong_token_unauthenticated", c[0] == "UNAUTHENTICATED" and c[1] == "invalid bearer token", c)
c = code_of(lambda: write(blob, ()))
check("no_token_write_unauthenticated", c[0] == "UNAUTHENTICATED", c)

c = code_of(lambda: write(blob, md(write_token)))
check("write_token_writes", c[0] == "OK" and missing([d]) == [], c)
c = code_of(lambda: ac.UpdateActionResult(re.UpdateActionResultRequest(instance_name=INSTANCE, action_digest=action, action_result=result), timeout=T, metadata=md(write_token)))
check("write_token_update_action_result", c[0] == "OK", c)
c = code_of(lambda: ac.GetActionResult(re.GetActionResultRequest(instance_name=INSTANCE, action_digest=action), timeout=T, metadata=md(read_token)))
check("read_token_cache_hit", c[0] == "OK", c)
read = b"".join(r.data for r in bytestream.Read(bs.ReadRequest(resource_name=f"{INSTANCE}/blobs/{d.hash}/{d.size_bytes}"), timeout=T, metadata=md(read_token)))
check("read_token_bytestream_read", read == blob, len(read))

# grpc.health.v1 by hand (its stubs are not in the REAPI protos): an empty
# HealthCheckRequest, a response whose field 1 is SERVING (1).
health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
resp = health(b"", timeout=T)
check("health_without_token", resp == b"\x08\x01", resp.hex())

print(json.dumps({"checks": checks}))
`;
import { python, pythonGrpcMissing } from '../helpers/python-grpc.ts';

const EXPECTED = [
  'read_token_find_missing',
  'read_token_get_action_result_reaches_cache',
  'read_token_update_action_result_denied',
  'read_token_write_denied',
  'read_token_batch_update_denied',
  'nothing_written',
  'no_action_result_written',
  'no_token_unauthenticated',
  'wrong_token_unauthenticated',
  'no_token_write_unauthenticated',
  'write_token_writes',
  'write_token_update_action_result',
  'read_token_cache_hit',
  'read_token_bytestream_read',
  'health_without_token',
];

async function main(t: Test): Promise<void> {
  const run = promisify(execFile);
  const dir = await mkdtemp(join(tmpdir(), 'reapi-grpcio-auth-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await run('bash', [join(here, '..', 'e2e', 'gen-grpcio-stubs.sh'), join(dir, 'stubs')]);
  await writeFile(join(dir, 'client.py'), SCRIPT);

  const readToken = randomBytes(32).toString('base64url');
  const writeToken = randomBytes(32).toString('base64url');
  const sha = (s: string) => createHash('sha256').update(s).digest('hex');
  const node = await startNode({
    auth: {
      anonymous: 'none',
      identities: [
        { name: 'ci', tokenSha256: sha(writeToken), grants: [{ instancePrefix: '', access: 'read-write' }] },
        { name: 'dev', tokenSha256: sha(readToken), grants: [{ instancePrefix: '', access: 'read' }] },
      ],
    },
  });
  t.teardown(node.close);

  const result = await new Promise<{ code: number | null; stdout: string; stderr: string }>((res) => {
    execFile(
      python,
      [join(dir, 'client.py'), `127.0.0.1:${node.port}`, join(dir, 'stubs'), readToken, writeToken],
      { timeout: 120_000 },
      (err, stdout, stderr) => res({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr }),
    );
  });
  let checks: { name: string; ok: boolean; detail: unknown }[] = [];
  try {
    checks = (JSON.parse(result.stdout) as { checks: typeof checks }).checks;
  } catch {
    t.fail('the client printed its JSON report', { code: result.code, stdout: result.stdout, stderr: result.stderr });
    return;
  }
  for (const name of EXPECTED) {
    const check = checks.find((c) => c.name === name);
    t.ok(check?.ok, `grpcio: ${name}`, { detail: check ? check.detail : 'not reported' });
  }
  t.same(checks.map((c) => c.name).filter((n) => !EXPECTED.includes(n)), [], 'no unexpected checks');
}
