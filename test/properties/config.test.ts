// Config validation, property-based (parseConfig in src/config.ts): valid
// configs are generated whole (every section: listen, admin, limits,
// instances, tls, auth, store trees nested several levels, children), then
// mutated at random places: values of the wrong type, out-of-range
// numbers, unknown keys, missing fields, arrays for objects, two kinds in
// one store node, deeper nesting. Every result is either a NodeConfig or a
// ConfigError whose message starts with a field path ("config", then ".",
// "[" or ":"); never a TypeError or any other exception.
import fc from 'fast-check';
import t from 'tap';
import type { Test } from 'tap';
import { ConfigError, parseConfig } from '../../src/config.ts';
import { Tally, check, hex64 } from './property.ts';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type Obj = { [key: string]: Json };

const BASE_DIR = '/srv/reapi';
const MiB = 1024 * 1024;

// ---- valid configs ----

const posInt = fc.oneof(fc.integer({ min: 1, max: 1 << 30 }), fc.constant(Number.MAX_SAFE_INTEGER));
const relPath = fc.stringMatching(/^[a-z]{1,6}(\/[a-z0-9-]{1,6}){0,2}$/);
const name = fc.stringMatching(/^[a-z][a-z0-9_.-]{0,7}$/);

function optional<T extends Obj>(required: Record<string, fc.Arbitrary<Json>>, optionalKeys: Record<string, fc.Arbitrary<Json>>): fc.Arbitrary<T> {
  return fc.record({ ...required, ...optionalKeys }, { requiredKeys: Object.keys(required) }) as unknown as fc.Arbitrary<T>;
}

const leafStore: fc.Arbitrary<Obj> = fc.oneof(
  fc.record({ memory: fc.record({ maxSizeBytes: posInt }) }),
  fc.record({ disk: fc.record({ path: relPath, maxSizeBytes: posInt }) }),
  fc.record({
    remote: optional(
      { url: fc.constantFrom('http://127.0.0.1:8981', 'http://[::1]:8982', 'http://shard-b:80/') },
      {
        instanceName: fc.constantFrom('', 'main', 'a/b'),
        timeoutMs: posInt,
        healthTimeoutMs: posInt,
        bearerTokenEnv: fc.constantFrom('SHARD_TOKEN', '_T1'),
      },
    ),
  }),
  fc.record({
    remote: optional(
      { url: fc.constantFrom('https://shard-a.internal:8981', 'https://10.0.0.7/') },
      {
        tls: fc.oneof(
          optional({}, { caFile: relPath, serverName: fc.constantFrom('shard-a', 'x.example') }),
          fc.record({ certFile: relPath, keyFile: relPath }),
        ),
        bearerTokenFile: relPath,
      },
    ),
  }),
);

function storeTree(depth: number): fc.Arbitrary<Obj> {
  if (depth === 0) return leafStore;
  const child = storeTree(depth - 1);
  return fc.oneof(
    { weight: 3, arbitrary: leafStore },
    {
      weight: 1,
      arbitrary: fc.record({
        sharding: optional(
          {
            shards: fc.dictionary(name, optional({ backend: child }, { weight: fc.integer({ min: 1, max: 1_000_000 }) }), { minKeys: 1, maxKeys: 3 }),
            handoffDir: relPath,
          },
          {
            maxHints: posInt,
            healthCheckIntervalMs: posInt,
            healthCheckTimeoutMs: posInt,
            probeDepth: fc.nat(5),
            probeWindowMs: fc.nat(),
            existenceCacheMaxEntries: fc.nat(),
            existenceCacheTtlMs: fc.nat(),
          },
        ),
      }),
    },
    {
      weight: 1,
      arbitrary: fc.record({
        fallback: optional(
          { primary: child, secondary: child, journalDir: relPath },
          {
            maxJournalEntries: posInt,
            healthCheckIntervalMs: posInt,
            replication: optional({}, { maxQueue: posInt, concurrency: posInt, overflow: fc.constantFrom('drop-oldest', 'reject-new') }),
          },
        ),
      }),
    },
  );
}

const casTree = storeTree(3);
const acTree = fc.oneof(casTree, fc.record({ completenessChecking: fc.record({ backend: storeTree(2) }) }));

const limits = optional<Obj>(
  {},
  {
    maxMessageBytes: fc.integer({ min: 4 * MiB, max: 64 * MiB }),
    maxJsonBodyBytes: fc.integer({ min: 64 * 1024, max: 256 * MiB }),
    maxFindMissingDigests: fc.integer({ min: 1, max: 1_000_000 }),
    maxBatchBlobs: fc.integer({ min: 1, max: 1_000_000 }),
    maxBlobSizeBytes: posInt,
    maxZstdWindowLog: fc.integer({ min: 10, max: 31 }),
    maxConcurrentStreams: fc.integer({ min: 1, max: 65_535 }),
    maxConnectionBufferBytes: fc.integer({ min: 64 * MiB, max: 4096 * MiB }),
    maxConnections: fc.integer({ min: 1, max: 1_000_000 }),
    headersTimeoutMs: fc.integer({ min: 100, max: 600_000 }),
    idleTimeoutMs: fc.integer({ min: 1000, max: 86_400_000 }),
    requestTimeoutMs: fc.integer({ min: 1000, max: 86_400_000 }),
  },
);

const grants = fc.dictionary(fc.constantFrom('', 'main', 'team-a', 'ci/linux'), fc.constantFrom('read', 'read-write'), { maxKeys: 3 });

/** tls and auth together: a clientCertCommonName needs tls.clientCaFile. */
const tlsAndAuth = fc
  .record({
    tls: fc.option(optional<Obj>({ certFile: relPath, keyFile: relPath }, { clientCaFile: relPath }), { freq: 2 }),
    clientCert: fc.constantFrom('require', 'optional', undefined),
    auth: fc.option(
      optional<Obj>(
        {
          identities: fc.dictionary(
            fc.stringMatching(/^[A-Za-z0-9_.@-]{1,8}$/),
            fc.record({
              tokenSha256: hex64,
              grants,
              basic: fc.option(fc.record({ username: fc.stringMatching(/^[a-z]{1,8}$/), passwordHash: fc.constant(`scrypt$16384$8$1$${Buffer.from('a 16-byte salt..').toString('base64')}$${Buffer.alloc(32, 7).toString('base64')}`) }), { nil: undefined }),
              rateLimit: fc.option(optional({ requestsPerSecond: posInt }, { burst: posInt }), { nil: undefined }),
            }) as unknown as fc.Arbitrary<Json>,
            { maxKeys: 3 },
          ),
        },
        { anonymous: fc.constantFrom('none', 'read') },
      ),
      { freq: 2 },
    ),
    cn: fc.option(fc.stringMatching(/^[a-z-]{1,10}$/), { nil: undefined }),
  })
  .map(({ tls, clientCert, auth, cn }) => {
    const out: Obj = {};
    if (tls !== null) {
      out.tls = tls.clientCaFile !== undefined && clientCert !== undefined ? { ...tls, clientCert } : tls;
    }
    if (auth !== null) {
      // Tokens and basic usernames must be unique across identities.
      const identities: Obj = {};
      let i = 0;
      for (const [id, e] of Object.entries(auth.identities as Obj)) {
        const entry: Obj = { ...(e as Obj), tokenSha256: `${((e as Obj).tokenSha256 as string).slice(0, 62)}${(i++).toString(16).padStart(2, '0')}` };
        if (entry.basic !== undefined) entry.basic = { ...(entry.basic as Obj), username: `${((entry.basic as Obj).username as string)}${i}` };
        else delete entry.basic;
        if (entry.rateLimit === undefined) delete entry.rateLimit;
        if (cn !== undefined && (tls?.clientCaFile ?? undefined) !== undefined) entry.clientCertCommonName = `${cn}${i}`;
        identities[id] = entry;
      }
      out.auth = { ...auth, identities };
    }
    return out;
  });

function nodeConfig(child: boolean): fc.Arbitrary<Obj> {
  return fc
    .record({
      base: optional<Obj>(
        { listen: fc.constantFrom('127.0.0.1:0', '[::1]:0', 'localhost:0'), cas: casTree, ac: acTree },
        {
          logLevel: fc.constantFrom('fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'),
          admin: optional({ listen: fc.constant('127.0.0.1:0') }, { token: fc.constant('change-me'), allowedHosts: fc.constant(['localhost:8990']) }),
          maxBatchTotalSizeBytes: fc.integer({ min: 1, max: 4 * MiB - 64 * 1024 }),
          limits,
          instances: optional({}, { isolateActionCache: fc.boolean(), aliases: fc.dictionary(fc.constantFrom('ci-linux', 'dev', 'a/b'), fc.constantFrom('', 'linux', 'shared/x')) }),
          ...(child ? { restart: fc.boolean() } : {}),
        },
      ),
      security: tlsAndAuth,
    })
    .map(({ base, security }) => ({ ...base, ...security }));
}

const validConfig = fc
  .record({ node: nodeConfig(false), children: fc.option(fc.dictionary(name, nodeConfig(true), { maxKeys: 2 }), { nil: undefined }) })
  .map(({ node, children }) => (children === undefined ? node : { ...node, children }));

// ---- mutations ----

type Path = (string | number)[];

/** Every place in the tree a value sits, with the root as []. */
function paths(value: Json, at: Path = [], out: Path[] = []): Path[] {
  out.push(at);
  if (Array.isArray(value)) value.forEach((v, i) => paths(v, [...at, i], out));
  else if (value !== null && typeof value === 'object') for (const [k, v] of Object.entries(value)) paths(v, [...at, k], out);
  return out;
}

const junk: fc.Arbitrary<Json> = fc.oneof(
  fc.constantFrom<Json>(null, true, false, 0, -0, -1, 1.5, 2 ** 53, -(2 ** 53), 1e300, '', 'x', '0', '-1', 'true', [], {}, [1], { a: 1 }, { memory: {} }, { memory: null }),
  fc.constant(Infinity as Json), // JSON.parse("1e400")
  fc.integer().map((n) => n as Json),
  fc.double({ noNaN: true }).map((n) => n as Json),
  fc.string({ maxLength: 20 }).map((s) => s as Json),
  fc.constantFrom<Json>('127.0.0.1:8980', '127.0.0.1:99999', '0.0.0.0:0', '[zz]:1', 'a:b', 'ftp://x', 'http://', 'scrypt$1', 'read-only', 'Blobs/x', '/abs', '..', 'a\u0000b'),
  fc.string({ minLength: 5000, maxLength: 5000 }).map((s) => s as Json),
);

const unknownKey = fc.constantFrom('extra', '__proto__', 'constructor', 'toString', 'hasOwnProperty', 'memory', 'Listen', '', ' cas', 'kind');

type Mutation =
  | { kind: 'replace'; pick: number; value: Json }
  | { kind: 'delete'; pick: number }
  | { kind: 'add-key'; pick: number; key: string; value: Json }
  | { kind: 'wrap-array'; pick: number }
  | { kind: 'second-kind'; pick: number }
  | { kind: 'nest'; pick: number; depth: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('replace' as const), pick: fc.nat(), value: junk }),
  fc.record({ kind: fc.constant('delete' as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant('add-key' as const), pick: fc.nat(), key: unknownKey, value: junk }),
  fc.record({ kind: fc.constant('wrap-array' as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant('second-kind' as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant('nest' as const), pick: fc.nat(), depth: fc.integer({ min: 1, max: 60 }) }),
);

function clone<T extends Json>(v: T): T {
  return JSON.parse(JSON.stringify(v)) as T;
}

/** Applies `m` to a copy of `config`; returns the copy and the path it touched. */
function mutate(config: Obj, m: Mutation): { config: Json; at: Path } {
  let root: Json = clone(config);
  const all = paths(root);
  const at = all[m.pick % all.length]!;
  const parentOf = (p: Path): Json => p.slice(0, -1).reduce<Json>((v, k) => (v as Record<string | number, Json>)[k]!, root);
  const get = (p: Path): Json => p.reduce<Json>((v, k) => (v as Record<string | number, Json>)[k]!, root);
  const set = (p: Path, value: Json) => {
    if (p.length === 0) root = value;
    else Object.defineProperty(parentOf(p), p[p.length - 1]!, { value, enumerable: true, writable: true, configurable: true });
  };
  const current = get(at);
  switch (m.kind) {
    case 'replace':
      set(at, m.value);
      break;
    case 'delete': {
      if (at.length === 0) return { config: undefined as unknown as Json, at };
      const parent = parentOf(at);
      if (Array.isArray(parent)) parent.splice(at[at.length - 1] as number, 1);
      else delete (parent as Obj)[at[at.length - 1] as string];
      break;
    }
    case 'add-key':
      if (current !== null && typeof current === 'object' && !Array.isArray(current)) {
        // defineProperty, as JSON.parse does: "__proto__" becomes an own key, not the prototype.
        Object.defineProperty(current, m.key, { value: m.value, enumerable: true, writable: true, configurable: true });
      } else {
        set(at, { [m.key]: m.value });
      }
      break;
    case 'wrap-array':
      set(at, [current]);
      break;
    case 'second-kind':
      if (current !== null && typeof current === 'object' && !Array.isArray(current)) (current as Obj).memory = { maxSizeBytes: 1 };
      else set(at, { memory: { maxSizeBytes: 1 }, disk: { path: 'x', maxSizeBytes: 1 } });
      break;
    case 'nest': {
      // Valid nesting of the node in place: a chain of fallback pairs.
      let v: Json = current;
      for (let i = 0; i < m.depth; i++) v = { fallback: { primary: v, secondary: { memory: { maxSizeBytes: 1 } }, journalDir: `j${i}` } };
      set(at, v);
      break;
    }
  }
  return { config: root, at };
}

/** The result of parseConfig, classified; throws (failing the property) for anything but a NodeConfig or a ConfigError with a field path. */
function outcome(config: unknown): { result: 'valid' | 'ConfigError'; field?: string } {
  try {
    const parsed = parseConfig(config, { baseDir: BASE_DIR });
    if (typeof parsed !== 'object' || parsed === null || parsed.cas === undefined || parsed.ac === undefined || parsed.listen === undefined) {
      throw new Error(`parseConfig returned ${JSON.stringify(parsed)}`);
    }
    return { result: 'valid' };
  } catch (err) {
    if (!(err instanceof ConfigError)) throw new Error(`parseConfig threw ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
    const m = /^(config(?:[.[][^:]*)?):/s.exec(err.message);
    if (m === null) throw new Error(`ConfigError without a field path: ${err.message}`);
    return { result: 'ConfigError', field: m[1] };
  }
}

t.test('generated configs are valid as generated', async (t) => {
  const tally = new Tally();
  check(
    t,
    'valid configs parse',
    fc.property(validConfig, (config) => {
      const { result } = outcome(config);
      tally.add(result);
      return result === 'valid';
    }),
    300,
  );
  t.comment(`config (unmutated): ${tally.summary()}`);
});

t.test('mutated configs give a NodeConfig or a ConfigError naming a field, nothing else', async (t) => {
  const tally = new Tally();
  const byKind = new Map<string, Tally>();
  check(
    t,
    'parseConfig on mutated configs',
    fc.property(validConfig, fc.array(mutation, { minLength: 1, maxLength: 3 }), (config, mutations) => {
      let current: Json = config;
      for (const m of mutations) {
        if (current === null || typeof current !== 'object' || Array.isArray(current)) break;
        current = mutate(current, m).config;
      }
      const { result } = outcome(current);
      tally.add(result);
      for (const kind of new Set(mutations.map((m) => m.kind))) {
        if (!byKind.has(kind)) byKind.set(kind, new Tally());
        byKind.get(kind)!.add(result);
      }
      return true;
    }),
    1500,
  );
  t.comment(`config (mutated): ${tally.summary()}`);
  for (const [kind, k] of byKind) t.comment(`  mutation ${kind}: ${k.summary()}`);
});

/** A config whose CAS is `depth` fallback pairs nested in each other, parsed from JSON text as loadConfig would (JSON.parse itself takes 100,000 levels). */
function nestedConfig(depth: number): unknown {
  const open = '{"fallback":{"secondary":{"memory":{"maxSizeBytes":1}},"journalDir":"j","primary":'.repeat(depth);
  return JSON.parse(`{"listen":"127.0.0.1:0","ac":{"memory":{"maxSizeBytes":1}},"cas":${open}{"memory":{"maxSizeBytes":1}}${'}}'.repeat(depth)}}`);
}

function deepNesting(t: Test, depths: readonly number[], label: string, todo?: string): void {
  const tally = new Tally();
  for (const depth of depths) {
    let result: string;
    try {
      result = outcome(nestedConfig(depth)).result;
    } catch (err) {
      result = (err as Error).message;
    }
    tally.add(result === 'valid' || result === 'ConfigError' ? result : 'other exception');
    t.ok(result === 'valid' || result === 'ConfigError', `depth ${depth}: ${result}`, todo === undefined ? {} : { todo });
  }
  t.comment(`config (${label}): ${tally.summary()}`);
}

t.test('store trees nested 10 to 2,000 deep parse', async (t) => {
  deepNesting(t, [10, 100, 1000, 2000], 'nesting up to 2,000');
});

t.test('store trees nested 5,000 to 100,000 deep are refused with a ConfigError, not a stack overflow', async (t) => {
  deepNesting(t, [5000, 20_000, 100_000], 'nesting 5,000 to 100,000');
});
