import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { ConfigError, DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES, loadConfig, parseConfig, parseListenAddress } from '../src/config.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const base = '/etc/reapi';

function valid(): Record<string, unknown> {
  return {
    listen: '127.0.0.1:8980',
    cas: { memory: { maxSizeBytes: 1024 } },
    ac: { memory: { maxSizeBytes: 1024 } },
  };
}

function errorOf(raw: unknown): string {
  try {
    parseConfig(raw, { baseDir: base });
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
  return '(no error)';
}

t.test('a minimal config gets defaults', async (t) => {
  const c = parseConfig(valid(), { baseDir: base });
  t.equal(c.logLevel, 'info');
  t.same(c.listen, { host: '127.0.0.1', port: 8980 });
  t.equal(c.maxBatchTotalSizeBytes, DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES);
  t.ok(c.maxBatchTotalSizeBytes < 4 * 1024 * 1024, 'below the 4 MiB message limit of Bazel');
  t.same(c.cas, { kind: 'memory', maxSizeBytes: 1024 });
  t.equal(c.admin, undefined);
});

t.test('the shipped config.json is the local cluster: an edge over three shards and a fallback secondary', async (t) => {
  const c = await loadConfig(join(repoRoot, 'config.json'));
  t.same(c.listen, { host: '127.0.0.1', port: 8980 });
  t.same(c.admin?.listen, { host: '127.0.0.1', port: 8990 }, 'admin on loopback');
  t.same(
    c.children.map((child) => [child.name, child.restart, `${child.config.listen.host}:${child.config.listen.port}`]),
    [
      ['shard-a', true, '127.0.0.1:8981'],
      ['shard-b', true, '127.0.0.1:8982'],
      ['shard-c', true, '127.0.0.1:8983'],
      ['secondary', true, '127.0.0.1:8984'],
    ],
  );
  for (const child of c.children) {
    t.same(child.config.cas, { kind: 'disk', path: join(repoRoot, 'data', child.name, 'cas'), maxSizeBytes: child.config.cas.kind === 'disk' ? child.config.cas.maxSizeBytes : -1 });
    t.equal(child.config.ac.kind, 'disk', `${child.name}: a plain AC (completeness is checked at the edge)`);
    t.same(child.config.children, [], `${child.name}: children have no children`);
    t.equal(child.config.admin?.listen.host, '127.0.0.1', `${child.name}: its own /metrics (disk usage, evictions) on loopback`);
  }
  // Both trees: fallback { primary: sharding over shard-a..c, secondary } whose
  // remote URLs are exactly the children's addresses.
  t.equal(c.ac.kind, 'completenessChecking');
  const ac = c.ac.kind === 'completenessChecking' ? c.ac.backend : c.ac;
  for (const [tree, root] of [['cas', c.cas], ['ac', ac]] as const) {
    if (root.kind !== 'fallback' || root.primary.kind !== 'sharding' || root.secondary.kind !== 'remote') {
      t.fail(`${tree}: expected fallback { primary: sharding, secondary: remote }, got ${root.kind}`);
      continue;
    }
    t.same(
      root.primary.shards.map((s) => [s.name, s.weight, s.backend.kind === 'remote' ? s.backend.url : s.backend.kind]),
      [
        ['shard-a', 1, 'http://127.0.0.1:8981'],
        ['shard-b', 1, 'http://127.0.0.1:8982'],
        ['shard-c', 1, 'http://127.0.0.1:8983'],
      ],
      `${tree}: shards`,
    );
    t.equal(root.secondary.url, 'http://127.0.0.1:8984', `${tree}: secondary`);
    t.equal(root.journalDir, join(repoRoot, 'data/edge', `journal-${tree}`), `${tree}: journal under data/`);
    t.equal(root.primary.handoffDir, join(repoRoot, 'data/edge', `handoff-${tree}`), `${tree}: hints under data/`);
  }
});

t.test('relative disk paths resolve against the config file directory; absolute ones stay', async (t) => {
  const c = parseConfig(
    {
      ...valid(),
      cas: { disk: { path: 'data/cas', maxSizeBytes: 1 } },
      ac: { completenessChecking: { backend: { disk: { path: '/var/ac', maxSizeBytes: 1 } } } },
    },
    { baseDir: base },
  );
  t.same(c.cas, { kind: 'disk', path: '/etc/reapi/data/cas', maxSizeBytes: 1 });
  t.same(c.ac, { kind: 'completenessChecking', backend: { kind: 'disk', path: '/var/ac', maxSizeBytes: 1 } });
});

t.test('errors name the offending field', async (t) => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ['not an object', { ...valid(), cas: [] }, 'config.cas: expected an object, got an array'],
    [
      'negative size',
      { ...valid(), cas: { disk: { path: 'x', maxSizeBytes: -1 } } },
      'config.cas.disk.maxSizeBytes: expected a positive integer, got -1',
    ],
    [
      'size as string',
      { ...valid(), cas: { memory: { maxSizeBytes: '10GiB' } } },
      'config.cas.memory.maxSizeBytes: expected a positive integer, got "10GiB"',
    ],
    ['fractional size', { ...valid(), ac: { memory: { maxSizeBytes: 1.5 } } }, 'config.ac.memory.maxSizeBytes: expected a positive integer, got 1.5'],
    ['missing size', { ...valid(), cas: { disk: { path: 'x' } } }, 'config.cas.disk.maxSizeBytes: required'],
    ['empty path', { ...valid(), cas: { disk: { path: '', maxSizeBytes: 1 } } }, 'config.cas.disk.path: expected a non-empty string, got ""'],
    [
      'unknown kind',
      { ...valid(), cas: { s3: {} } },
      'config.cas: unknown store kind "s3", expected one of memory, disk, completenessChecking, remote, sharding, fallback',
    ],
    [
      'two kinds',
      { ...valid(), cas: { memory: { maxSizeBytes: 1 }, disk: { path: 'x', maxSizeBytes: 1 } } },
      'config.cas: expected an object with exactly one key naming the store kind (memory, disk, completenessChecking, remote, sharding, fallback), got keys "memory", "disk"',
    ],
    [
      'no kind',
      { ...valid(), ac: {} },
      'config.ac: expected an object with exactly one key naming the store kind (memory, disk, completenessChecking, remote, sharding, fallback), got no keys',
    ],
    [
      'completeness check in the CAS',
      { ...valid(), cas: { completenessChecking: { backend: { memory: { maxSizeBytes: 1 } } } } },
      'config.cas.completenessChecking: completenessChecking is only valid in the ac tree',
    ],
    [
      'nested error',
      { ...valid(), ac: { completenessChecking: { backend: { disk: { path: 'x', maxSizeBytes: 0 } } } } },
      'config.ac.completenessChecking.backend.disk.maxSizeBytes: expected a positive integer, got 0',
    ],
    [
      'unknown field in a store',
      { ...valid(), cas: { memory: { maxSizeBytes: 1, maxSize: 2 } } },
      'config.cas.memory.maxSize: unknown field (allowed: maxSizeBytes)',
    ],
    ['unknown top-level field', { ...valid(), lisen: 'x' }, 'config.lisen: unknown field (allowed: logLevel, listen, admin, maxBatchTotalSizeBytes, tls, auth, instances, limits, cas, ac, children)'],
    ['missing listen', { cas: valid().cas, ac: valid().ac }, 'config.listen: required'],
    ['missing ac', { listen: '127.0.0.1:1', cas: valid().cas }, 'config.ac: required'],
    ['bad listen', { ...valid(), listen: '8980' }, 'config.listen: expected "host:port" (e.g. "127.0.0.1:8980" or "[::1]:8980"), got "8980"'],
    ['port out of range', { ...valid(), listen: 'localhost:70000' }, 'config.listen: port 70000 is out of range (0-65535), got "localhost:70000"'],
    ['bad log level', { ...valid(), logLevel: 'verbose' }, 'config.logLevel: expected one of fatal, error, warn, info, debug, trace, silent, got "verbose"'],
    ['bad batch size', { ...valid(), maxBatchTotalSizeBytes: 0 }, 'config.maxBatchTotalSizeBytes: expected a positive integer, got 0'],
    ['admin without listen', { ...valid(), admin: { token: 's' } }, 'config.admin.listen: required'],
    ['admin empty token', { ...valid(), admin: { listen: '127.0.0.1:8990', token: '' } }, 'config.admin.token: expected a non-empty string, got ""'],
    ['not an object at all', null as unknown as Record<string, unknown>, 'config: expected an object, got null'],
  ];
  for (const [name, raw, message] of cases) t.equal(errorOf(raw), message, name);
});

t.test('admin is accepted (served by a later issue)', async (t) => {
  const c = parseConfig({ ...valid(), admin: { listen: '[::1]:8990', token: 'secret' } }, { baseDir: base });
  t.same(c.admin, { listen: { host: '::1', port: 8990 }, token: 'secret' });
});

t.test('listen addresses', async (t) => {
  t.same(parseListenAddress('0.0.0.0:0'), { host: '0.0.0.0', port: 0 });
  t.same(parseListenAddress('[::]:8980'), { host: '::', port: 8980 });
  t.same(parseListenAddress('localhost:1'), { host: 'localhost', port: 1 });
  t.type(parseListenAddress(':8980'), 'string', 'the host is required');
  t.type(parseListenAddress('[nope]:1'), 'string');
  t.type(parseListenAddress('::1:8980'), 'string', 'IPv6 needs brackets');
});

t.test('loadConfig reports unreadable files and bad JSON with the file name', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'reapi-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await t.rejects(loadConfig(join(dir, 'missing.json')), { name: 'ConfigError', message: /cannot read config file .*missing\.json/ });
  const bad = join(dir, 'bad.json');
  await writeFile(bad, '{"listen": ');
  await t.rejects(loadConfig(bad), { name: 'ConfigError', message: /config file .*bad\.json is not valid JSON/ });
});

t.test('main.ts prints the validation error and exits 2 on a bad config', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'reapi-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'config.json');
  await writeFile(file, JSON.stringify({ ...valid(), cas: { disk: { path: 'cas', maxSizeBytes: -5 } } }));
  const child = spawn(process.execPath, [join(repoRoot, 'src/main.ts'), file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const [code] = (await once(child, 'close')) as [number | null];
  t.equal(code, 2);
  t.match(stderr, 'bad config: config.cas.disk.maxSizeBytes: expected a positive integer, got -5');
});
