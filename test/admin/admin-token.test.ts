// Where the admin token comes from (config, a file, an environment variable),
// as a unit and through a real `node src/main.ts` startup.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { PLACEHOLDER_TOKEN, adminTokenWarnings, resolveAdminToken } from '../../src/admin/admin-token.ts';
import { ConfigError } from '../../src/config.ts';
import { spawnNode, type SpawnedNode } from '../helpers/spawn-node.ts';

const GOOD = 'Zq3v9X-file-token-0123456789abcdef';

async function tempDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'admin-token-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function errorOf(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

t.test('resolveAdminToken: token, tokenFile, tokenEnv', async (t) => {
  const dir = await tempDir(t);
  t.same(await resolveAdminToken({}), { token: undefined, source: undefined }, 'none configured');
  t.same(await resolveAdminToken({ token: ` ${GOOD} ` }), { token: GOOD, source: 'token' });

  const file = join(dir, 'admin-token');
  await writeFile(file, `${GOOD}\n`);
  t.same(await resolveAdminToken({ tokenFile: file }), { token: GOOD, source: 'tokenFile' }, 'first line, newline dropped');
  await writeFile(file, `\uFEFF  ${GOOD}  \r\nsecond line is ignored\n`);
  t.same(await resolveAdminToken({ tokenFile: file }), { token: GOOD, source: 'tokenFile' }, 'BOM, spaces and CRLF trimmed');
  await writeFile(file, GOOD);
  t.same(await resolveAdminToken({ tokenFile: file }), { token: GOOD, source: 'tokenFile' }, 'no newline at all');

  t.same(await resolveAdminToken({ tokenEnv: 'ADMIN_TOKEN' }, { env: { ADMIN_TOKEN: `${GOOD}\n` } }), { token: GOOD, source: 'tokenEnv' });
  process.env.REAPI_TEST_ADMIN_TOKEN = GOOD;
  t.teardown(() => void delete process.env.REAPI_TEST_ADMIN_TOKEN);
  t.same(await resolveAdminToken({ tokenEnv: 'REAPI_TEST_ADMIN_TOKEN' }), { token: GOOD, source: 'tokenEnv' }, 'process.env by default');
});

t.test('resolveAdminToken: errors name the field and never show the token', async (t) => {
  const dir = await tempDir(t);
  const missing = join(dir, 'no-such-file');
  const e1 = await errorOf(resolveAdminToken({ tokenFile: missing }));
  t.ok(e1 instanceof ConfigError);
  t.match(e1.message, /^config\.admin\.tokenFile: cannot read ".*no-such-file" \(ENOENT\)$/);

  const e2 = await errorOf(resolveAdminToken({ tokenFile: dir }));
  t.match(e2.message, /^config\.admin\.tokenFile: cannot read .* \(EISDIR\)$/, 'a directory');

  const empty = join(dir, 'empty');
  for (const content of ['', '\n', '   \nsecret on line two\n']) {
    await writeFile(empty, content);
    const e = await errorOf(resolveAdminToken({ tokenFile: empty }));
    t.match(e.message, /^config\.admin\.tokenFile: ".*empty" is empty \(the token is its first line\)$/, JSON.stringify(content));
    t.notMatch(e.message, /secret/);
  }

  const e3 = await errorOf(resolveAdminToken({ tokenEnv: 'NOPE' }, { env: {} }));
  t.ok(e3 instanceof ConfigError);
  t.equal(e3.message, 'config.admin.tokenEnv: environment variable NOPE is not set');
  const e4 = await errorOf(resolveAdminToken({ tokenEnv: 'BLANK' }, { env: { BLANK: '  ' } }));
  t.equal(e4.message, 'config.admin.tokenEnv: environment variable BLANK is empty');

  const bin = join(dir, 'binary');
  await writeFile(bin, 'tok\u0000en-with-a-nul\n');
  const e5 = await errorOf(resolveAdminToken({ tokenFile: bin }));
  t.equal(e5.message, 'config.admin.tokenFile: the token may only contain printable ASCII characters');
  const e6 = await errorOf(resolveAdminToken({ token: 'naïve-token' }, { path: 'config.children.shard-a.admin' }));
  t.equal(e6.message, 'config.children.shard-a.admin.token: the token may only contain printable ASCII characters', 'a child names its own path');
});

t.test('adminTokenWarnings: the placeholder and short tokens', async (t) => {
  const [placeholder, ...rest] = adminTokenWarnings({ token: PLACEHOLDER_TOKEN, source: 'token' });
  t.same(rest, []);
  t.match(placeholder, /^the admin token \(config\.admin\.token\) is the placeholder "change-me" of the default config/);
  t.match(placeholder, /config\.admin\.tokenFile/, 'says what to do instead');
  t.match(adminTokenWarnings({ token: 'short', source: 'tokenEnv' }), [/config\.admin\.tokenEnv\) has 5 characters/]);
  t.same(adminTokenWarnings({ token: GOOD, source: 'tokenFile' }), []);
  t.same(adminTokenWarnings({ token: undefined, source: undefined }), []);
});

// ---- through main.ts ------------------------------------------------------

/** The admin port, from main.ts's "admin page ... on http://host:port" line. */
async function adminPort(node: SpawnedNode): Promise<number> {
  for (let i = 0; i < 100; i++) {
    for (const line of node.logs()) {
      const m = /"admin":"127\.0\.0\.1:(\d+)"/.exec(line);
      if (m !== null && m[1] !== '0') return Number(m[1]);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no admin address in the log:\n${node.logs().join('\n')}`);
}

function post(port: number, path: string, headers: Record<string, string>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method: 'POST', path, headers }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** spawnNode's error for a node that exits during startup. */
async function startupFailure(options: Parameters<typeof spawnNode>[0]): Promise<string> {
  try {
    const node = await spawnNode(options);
    await node.stop();
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error('the node started');
}

t.test('main.ts: a token from a file or a variable authorizes drains; the placeholder is warned about', async (t) => {
  const dir = await tempDir(t);
  await writeFile(join(dir, 'admin-token'), `${GOOD}\n`);

  const fromFile = await spawnNode({ dir, config: { admin: { listen: '127.0.0.1:0', tokenFile: 'admin-token' } } });
  t.teardown(() => fromFile.stop());
  const port = await adminPort(fromFile);
  const host = `127.0.0.1:${port}`;
  // A storage node has no shards: the right token gets past auth to a 404.
  const right = await post(port, '/api/shards/cas/x/drain', { host, authorization: `Bearer ${GOOD}` });
  t.equal(right.status, 404, 'the file token is accepted');
  t.match(JSON.parse(right.body), { error: /no shard named "x"/ });
  t.equal((await post(port, '/api/shards/cas/x/drain', { host, authorization: 'Bearer change-me' })).status, 401, 'another token is not');
  t.equal(
    (await post(port, '/api/shards/cas/x/drain', { host: `evil.example:${port}`, authorization: `Bearer ${GOOD}` })).status,
    421,
    'a foreign Host is refused by the real process',
  );
  t.notOk(fromFile.logs().some((l) => /placeholder/.test(l)), 'no placeholder warning');
  t.notOk(fromFile.logs().some((l) => l.includes(GOOD)), 'the token is never logged');
  await fromFile.stop();

  const fromEnv = await spawnNode({
    config: { admin: { listen: '127.0.0.1:0', tokenEnv: 'REAPI_ADMIN_TOKEN_FOR_TEST' } },
    env: { REAPI_ADMIN_TOKEN_FOR_TEST: GOOD },
  });
  t.teardown(() => fromEnv.stop());
  const envPort = await adminPort(fromEnv);
  const viaEnv = await post(envPort, '/api/shards/cas/x/drain', { host: `localhost:${envPort}`, authorization: `Bearer ${GOOD}` });
  t.equal(viaEnv.status, 404, 'the variable token is accepted');
  await fromEnv.stop();

  const placeholder = await spawnNode({ config: { admin: { listen: '127.0.0.1:0', token: PLACEHOLDER_TOKEN } } });
  t.teardown(() => placeholder.stop());
  await adminPort(placeholder);
  const records = placeholder.logs().flatMap((l) => {
    try {
      return [JSON.parse(l) as { level: number; msg: string }];
    } catch {
      return [];
    }
  });
  const warning = records.find((r) => /placeholder "change-me"/.test(r.msg));
  t.ok(warning, 'the placeholder is warned about');
  t.match(warning, { level: 40, msg: /config\.admin\.token\b/ }, 'at warn level, naming the field');
  t.equal(placeholder.exitInfo(), undefined, 'and the node still runs');
  await placeholder.stop();
});

t.test('main.ts: an unreadable token file or an unset variable stops startup with exit code 2', async (t) => {
  const file = await startupFailure({ config: { admin: { listen: '127.0.0.1:0', tokenFile: 'missing-token-file' } } });
  t.match(file, /exited with code 2/);
  t.match(file, /reapi-edge: bad config: config\.admin\.tokenFile: cannot read ".*missing-token-file" \(ENOENT\)/);

  const env = await startupFailure({
    config: { admin: { listen: '127.0.0.1:0', tokenEnv: 'REAPI_ADMIN_TOKEN_UNSET_FOR_TEST' } },
    env: { REAPI_ADMIN_TOKEN_UNSET_FOR_TEST: '' },
  });
  t.match(env, /exited with code 2/);
  t.match(env, /bad config: config\.admin\.tokenEnv: environment variable REAPI_ADMIN_TOKEN_UNSET_FOR_TEST is empty/);
});
