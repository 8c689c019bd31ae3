// Config validation for the edge's store kinds (remote, sharding, fallback)
// and the supervised children: what a valid edge config becomes, and the
// exact field-path message for each mistake (style of test/config.test.ts).
import t from 'tap';
import { ConfigError, parseConfig } from '../src/config.ts';

const base = '/etc/reapi';

const remote = (url = 'http://127.0.0.1:8981') => ({ remote: { url } });
const sharding = (extra: Record<string, unknown> = {}) => ({
  sharding: { shards: { a: { weight: 1, backend: remote() } }, handoffDir: 'h', ...extra },
});

function valid(): Record<string, unknown> {
  return { listen: '127.0.0.1:8980', cas: { memory: { maxSizeBytes: 1024 } }, ac: { memory: { maxSizeBytes: 1024 } } };
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

t.test('an edge tree: defaults filled in, relative dirs resolved against the config directory', async (t) => {
  const c = parseConfig(
    {
      ...valid(),
      cas: {
        fallback: {
          primary: {
            sharding: {
              shards: { a: { backend: remote() }, b: { weight: 3, backend: { remote: { url: 'https://b:1', instanceName: 'x', timeoutMs: 5, healthTimeoutMs: 6 } } } },
              handoffDir: 'data/h',
              probeDepth: 0,
            },
          },
          secondary: remote('http://s:1'),
          journalDir: '/var/j',
          replication: { overflow: 'reject-new' },
        },
      },
    },
    { baseDir: base },
  );
  t.same(c.cas, {
    kind: 'fallback',
    primary: {
      kind: 'sharding',
      shards: [
        { name: 'a', weight: 1, backend: { kind: 'remote', url: 'http://127.0.0.1:8981', instanceName: '', timeoutMs: undefined, healthTimeoutMs: undefined } },
        { name: 'b', weight: 3, backend: { kind: 'remote', url: 'https://b:1', instanceName: 'x', timeoutMs: 5, healthTimeoutMs: 6 } },
      ],
      handoffDir: '/etc/reapi/data/h',
      maxHints: undefined,
      healthCheckIntervalMs: undefined,
      healthCheckTimeoutMs: undefined,
      probeDepth: 0,
      probeWindowMs: undefined,
      existenceCacheMaxEntries: undefined,
      existenceCacheTtlMs: undefined,
    },
    secondary: { kind: 'remote', url: 'http://s:1', instanceName: '', timeoutMs: undefined, healthTimeoutMs: undefined },
    journalDir: '/var/j',
    maxJournalEntries: undefined,
    replication: { maxQueue: undefined, concurrency: undefined, overflow: 'reject-new' },
    healthCheckIntervalMs: undefined,
  });
});

/** valid() listening on `listen` (children need addresses of their own). */
function node(listen: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { ...valid(), listen, ...extra };
}

t.test('children: restart defaults to true and can be turned off', async (t) => {
  const c = parseConfig(
    { ...valid(), children: { 'n-1.x_y': node('127.0.0.1:8981', { restart: false }), n2: node('127.0.0.1:8982') } },
    { baseDir: base },
  );
  t.same(c.children.map((ch) => [ch.name, ch.restart]), [['n-1.x_y', false], ['n2', true]]);
});

t.test('errors in remote, sharding, fallback and children name the offending field', async (t) => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    // remote
    ['remote without url', { ...valid(), cas: { remote: {} } }, 'config.cas.remote.url: required'],
    ['remote url empty', { ...valid(), cas: remote('') }, 'config.cas.remote.url: expected a non-empty string, got ""'],
    ['remote url grpc://', { ...valid(), cas: remote('grpc://127.0.0.1:8981') }, 'config.cas.remote.url: expected an http:// or https:// URL, got "grpc://127.0.0.1:8981"'],
    ['remote url without scheme', { ...valid(), cas: remote('not a url') }, 'config.cas.remote.url: expected an http:// or https:// URL, got "not a url"'],
    ['remote timeout zero', { ...valid(), cas: { remote: { url: 'http://a:1', timeoutMs: 0 } } }, 'config.cas.remote.timeoutMs: expected a positive integer, got 0'],
    ['remote health timeout string', { ...valid(), ac: { remote: { url: 'http://a:1', healthTimeoutMs: '1s' } } }, 'config.ac.remote.healthTimeoutMs: expected a positive integer, got "1s"'],
    ['remote instance name number', { ...valid(), cas: { remote: { url: 'http://a:1', instanceName: 5 } } }, 'config.cas.remote.instanceName: expected a string, got 5'],
    ['remote unknown field', { ...valid(), cas: { remote: { url: 'http://a:1', token: 'x' } } }, 'config.cas.remote.token: unknown field (allowed: url, instanceName, timeoutMs, healthTimeoutMs, tls, bearerTokenFile, bearerTokenEnv)'],
    // sharding
    ['sharding without shards', { ...valid(), cas: { sharding: { handoffDir: 'h' } } }, 'config.cas.sharding.shards: required'],
    ['shards as an array', { ...valid(), cas: { sharding: { shards: [], handoffDir: 'h' } } }, 'config.cas.sharding.shards: expected an object, got an array'],
    ['no shards', { ...valid(), cas: { sharding: { shards: {}, handoffDir: 'h' } } }, 'config.cas.sharding.shards: needs at least one shard'],
    ['sharding without handoffDir', { ...valid(), cas: { sharding: { shards: { a: { backend: remote() } } } } }, 'config.cas.sharding.handoffDir: required'],
    ['shard weight zero', { ...valid(), cas: { sharding: { shards: { a: { weight: 0, backend: remote() } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.weight: expected a positive integer, got 0'],
    ['shard weight fractional', { ...valid(), cas: { sharding: { shards: { a: { weight: 0.5, backend: remote() } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.weight: expected a positive integer, got 0.5'],
    ['shard weight too large', { ...valid(), cas: { sharding: { shards: { a: { weight: 1_000_001, backend: remote() } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.weight: must be at most 1000000, got 1000001'],
    ['shard without backend', { ...valid(), cas: { sharding: { shards: { a: { weight: 1 } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.backend: required'],
    ['shard not an object', { ...valid(), cas: { sharding: { shards: { a: 'http://a:1' }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a: expected an object, got "http://a:1"'],
    ['shard unknown field', { ...valid(), cas: { sharding: { shards: { a: { store: remote(), backend: remote() } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.store: unknown field (allowed: weight, backend)'],
    ['shard backend error', { ...valid(), cas: { sharding: { shards: { a: { backend: remote('ftp://a') } }, handoffDir: 'h' } } }, 'config.cas.sharding.shards.a.backend.remote.url: expected an http:// or https:// URL, got "ftp://a"'],
    [
      'completeness check under a CAS shard',
      { ...valid(), cas: { sharding: { shards: { a: { backend: { completenessChecking: { backend: remote() } } } }, handoffDir: 'h' } } },
      'config.cas.sharding.shards.a.backend.completenessChecking: completenessChecking is only valid in the ac tree',
    ],
    ['handoffDir empty', { ...valid(), cas: sharding({ handoffDir: '' }) }, 'config.cas.sharding.handoffDir: expected a non-empty string, got ""'],
    ['probeDepth negative', { ...valid(), cas: sharding({ probeDepth: -1 }) }, 'config.cas.sharding.probeDepth: expected a non-negative integer, got -1'],
    ['health interval zero', { ...valid(), cas: sharding({ healthCheckIntervalMs: 0 }) }, 'config.cas.sharding.healthCheckIntervalMs: expected a positive integer, got 0'],
    ['health timeout string', { ...valid(), cas: sharding({ healthCheckTimeoutMs: '500ms' }) }, 'config.cas.sharding.healthCheckTimeoutMs: expected a positive integer, got "500ms"'],
    ['maxHints zero', { ...valid(), cas: sharding({ maxHints: 0 }) }, 'config.cas.sharding.maxHints: expected a positive integer, got 0'],
    ['probeWindowMs negative', { ...valid(), cas: sharding({ probeWindowMs: -5 }) }, 'config.cas.sharding.probeWindowMs: expected a non-negative integer, got -5'],
    ['probeWindowMs fractional', { ...valid(), cas: sharding({ probeWindowMs: 1.5 }) }, 'config.cas.sharding.probeWindowMs: expected a non-negative integer, got 1.5'],
    [
      'existenceCacheMaxEntries negative',
      { ...valid(), cas: sharding({ existenceCacheMaxEntries: -1 }) },
      'config.cas.sharding.existenceCacheMaxEntries: expected a non-negative integer, got -1',
    ],
    [
      'existenceCacheTtlMs string',
      { ...valid(), cas: sharding({ existenceCacheTtlMs: '10s' }) },
      'config.cas.sharding.existenceCacheTtlMs: expected a non-negative integer, got "10s"',
    ],
    [
      'sharding unknown field',
      { ...valid(), cas: sharding({ replicas: 2 }) },
      'config.cas.sharding.replicas: unknown field (allowed: shards, handoffDir, maxHints, healthCheckIntervalMs, healthCheckTimeoutMs, probeDepth, probeWindowMs, existenceCacheMaxEntries, existenceCacheTtlMs)',
    ],
    // fallback
    ['fallback without primary', { ...valid(), cas: { fallback: { secondary: remote(), journalDir: 'j' } } }, 'config.cas.fallback.primary: required'],
    ['fallback without secondary', { ...valid(), cas: { fallback: { primary: remote(), journalDir: 'j' } } }, 'config.cas.fallback.secondary: required'],
    ['fallback without journalDir', { ...valid(), cas: { fallback: { primary: remote(), secondary: remote() } } }, 'config.cas.fallback.journalDir: required'],
    [
      'fallback primary error',
      { ...valid(), ac: { fallback: { primary: { sharding: { shards: {}, handoffDir: 'h' } }, secondary: remote(), journalDir: 'j' } } },
      'config.ac.fallback.primary.sharding.shards: needs at least one shard',
    ],
    [
      'fallback secondary error',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: { remote: { url: 'http://a:1', timeoutMs: -1 } }, journalDir: 'j' } } },
      'config.cas.fallback.secondary.remote.timeoutMs: expected a positive integer, got -1',
    ],
    [
      'replication overflow',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', replication: { overflow: 'drop' } } } },
      'config.cas.fallback.replication.overflow: expected one of drop-oldest, reject-new, got "drop"',
    ],
    [
      'replication concurrency zero',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', replication: { concurrency: 0 } } } },
      'config.cas.fallback.replication.concurrency: expected a positive integer, got 0',
    ],
    [
      'replication unknown field',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', replication: { batch: 1 } } } },
      'config.cas.fallback.replication.batch: unknown field (allowed: maxQueue, concurrency, overflow)',
    ],
    [
      'replication not an object',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', replication: true } } },
      'config.cas.fallback.replication: expected an object, got true',
    ],
    [
      'fallback maxJournalEntries',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', maxJournalEntries: 1.5 } } },
      'config.cas.fallback.maxJournalEntries: expected a positive integer, got 1.5',
    ],
    [
      'fallback durability',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', durability: 'both' } } },
      'config.cas.fallback.durability: expected one of sync, async, got "both"',
    ],
    [
      'fallback unknown field',
      { ...valid(), cas: { fallback: { primary: remote(), secondary: remote(), journalDir: 'j', tertiary: remote() } } },
      'config.cas.fallback.tertiary: unknown field (allowed: primary, secondary, journalDir, maxJournalEntries, replication, healthCheckIntervalMs, durability)',
    ],
    // children
    ['children as an array', { ...valid(), children: [] }, 'config.children: expected an object, got an array'],
    ['child name with a space', { ...valid(), children: { 'shard a': valid() } }, "config.children.shard a: child names may contain only letters, digits, '.', '_' and '-'"],
    ['child name with a slash', { ...valid(), children: { 'a/b': valid() } }, "config.children.a/b: child names may contain only letters, digits, '.', '_' and '-'"],
    ['child not an object', { ...valid(), children: { a: 'config.json' } }, 'config.children.a: expected an object, got "config.json"'],
    ['child without listen', { ...valid(), children: { a: { cas: valid().cas, ac: valid().ac } } }, 'config.children.a.listen: required'],
    ['child restart not boolean', { ...valid(), children: { a: { ...valid(), restart: 'yes' } } }, 'config.children.a.restart: expected true or false, got "yes"'],
    [
      'grandchildren',
      { ...valid(), children: { a: { ...valid(), children: {} } } },
      'config.children.a.children: unknown field (allowed: logLevel, listen, admin, maxBatchTotalSizeBytes, tls, auth, instances, limits, cas, ac, restart)',
    ],
    ['restart at the top', { ...valid(), restart: true }, 'config.restart: unknown field (allowed: logLevel, listen, admin, maxBatchTotalSizeBytes, tls, auth, instances, limits, cas, ac, children)'],
    [
      'child store error',
      { ...valid(), children: { a: { ...valid(), cas: { disk: { path: 'x', maxSizeBytes: -1 } } } } },
      'config.children.a.cas.disk.maxSizeBytes: expected a positive integer, got -1',
    ],
  ];
  for (const [name, raw, message] of cases) t.equal(errorOf(raw), message, name);
});

t.test('probeWindowMs 0 is accepted: no probing by rank, as the store takes it', async (t) => {
  const c = parseConfig({ ...valid(), cas: sharding({ probeWindowMs: 0 }) }, { baseDir: base });
  t.equal(c.cas.kind === 'sharding' ? c.cas.probeWindowMs : undefined, 0);
});

t.test('listen addresses of the process and its children must differ; the error names both fields', async (t) => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    [
      'two children on one port',
      { ...valid(), children: { a: node('127.0.0.1:8981'), b: node('127.0.0.1:8981') } },
      'config.children.b.listen: 127.0.0.1:8981 is already used by config.children.a.listen (127.0.0.1:8981)',
    ],
    [
      'a child on the top-level listen address',
      { ...valid(), children: { a: node('127.0.0.1:8980') } },
      'config.children.a.listen: 127.0.0.1:8980 is already used by config.listen (127.0.0.1:8980)',
    ],
    [
      'a child on the top-level admin address',
      { ...valid(), admin: { listen: '127.0.0.1:8990' }, children: { a: node('127.0.0.1:8990') } },
      'config.children.a.listen: 127.0.0.1:8990 is already used by config.admin.listen (127.0.0.1:8990)',
    ],
    [
      "a child's admin on another child's port",
      { ...valid(), children: { a: node('127.0.0.1:8981'), b: node('127.0.0.1:8982', { admin: { listen: '127.0.0.1:8981' } }) } },
      'config.children.b.admin.listen: 127.0.0.1:8981 is already used by config.children.a.listen (127.0.0.1:8981)',
    ],
    [
      'admin on the same address as listen',
      { ...valid(), admin: { listen: '127.0.0.1:8980' } },
      'config.admin.listen: 127.0.0.1:8980 is already used by config.listen (127.0.0.1:8980)',
    ],
    [
      'a wildcard host clashes with any host on its port',
      { ...valid(), children: { a: node('0.0.0.0:8981'), b: node('[::1]:8981') } },
      'config.children.b.listen: [::1]:8981 is already used by config.children.a.listen (0.0.0.0:8981)',
    ],
  ];
  for (const [name, raw, message] of cases) t.equal(errorOf(raw), message, name);

  const fine: Array<[string, Record<string, unknown>]> = [
    ['port 0 picks a free port each time', { ...node('127.0.0.1:0'), children: { a: node('127.0.0.1:0'), b: node('127.0.0.1:0', { admin: { listen: '127.0.0.1:0' } }) } }],
    ['same port on different hosts', { ...valid(), children: { a: node('127.0.0.2:8980'), b: node('[::1]:8980') } }],
  ];
  for (const [name, raw] of fine) t.equal(errorOf(raw), '(no error)', name);
});
