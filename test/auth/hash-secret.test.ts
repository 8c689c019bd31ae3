// scripts/hash-secret.ts: what it prints goes into config.json as is,
// passes config validation, and the token and password it was made from
// then authenticate against a node built from that config.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import { ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { parseConfig } from '../../src/config.ts';
import { startNode } from '../helpers/node.ts';

const script = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'scripts', 'hash-secret.ts');

function hashSecret(args: string[], stdin?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [script, ...args], (err, stdout, stderr) =>
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr }),
    );
    child.stdin!.end(stdin ?? '');
  });
}

t.test('token: a fresh one, and the sha of a given one', async (t) => {
  const fresh = await hashSecret(['token']);
  t.equal(fresh.code, 0);
  const m = /^token: ([A-Za-z0-9_-]{43})\n"tokenSha256": "([0-9a-f]{64})"\n$/.exec(fresh.stdout);
  t.ok(m, 'a 32-byte base64url token and its tokenSha256 line', { stdout: fresh.stdout });
  t.equal(m?.[2], createHash('sha256').update(m?.[1] ?? '').digest('hex'), 'the line is the SHA-256 of the token');
  const again = await hashSecret(['token']);
  t.not(again.stdout, fresh.stdout, 'a different token each time');

  const given = await hashSecret(['token', 'abc']);
  t.equal(given.stdout, '"tokenSha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"\n', 'sha of a given token');
  const piped = await hashSecret(['token', '-'], 'abc\n');
  t.equal(piped.stdout, given.stdout, '"-" reads it from stdin, without the newline');
  const bad = await hashSecret(['tokens']);
  t.equal(bad.code, 2, 'a usage error exits 2');
  t.match(bad.stderr, /^usage: hash-secret/);
});

t.test('what it prints works in config.json and authenticates', async (t) => {
  const fresh = await hashSecret(['token']);
  const token = /^token: (\S+)$/m.exec(fresh.stdout)![1]!;
  const tokenLine = fresh.stdout.split('\n')[1]!;
  const pw = await hashSecret(['password'], 'tr0ub4dor&3\n');
  t.equal(pw.code, 0);
  const passwordHash = pw.stdout.trim();
  t.match(passwordHash, /^scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/, 'scrypt, N=16384, r=8, p=1');

  const json = `{
    "listen": "127.0.0.1:0",
    "cas": {"memory": {"maxSizeBytes": 1048576}},
    "ac": {"memory": {"maxSizeBytes": 1048576}},
    "auth": {"identities": {
      "ci": {${tokenLine}, "grants": {"": "read-write"}},
      "alice": {"basic": {"username": "alice", "passwordHash": "${passwordHash}"}, "grants": {"": "read"}}
    }}
  }`;
  const config = parseConfig(JSON.parse(json), { baseDir: '.' });
  t.ok(config.auth, 'the config validates');
  const node = await startNode({ auth: config.auth! });
  t.teardown(node.close);
  const cas = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: node.url }));
  const call = (authorization: string) => cas.findMissingBlobs({ instanceName: '', blobDigests: [] }, { headers: { authorization } });
  await call(`Bearer ${token}`);
  t.pass('the token authenticates');
  await call(`Basic ${Buffer.from('alice:tr0ub4dor&3').toString('base64')}`);
  t.pass('the password authenticates (the newline from stdin is not part of it)');
  const err = await call(`Basic ${Buffer.from('alice:tr0ub4dor&3\n').toString('base64')}`).then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
  t.equal(err?.code, Code.Unauthenticated, 'with the newline it does not');
});
