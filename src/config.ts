import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { dirname, resolve } from 'node:path';

/**
 * The process configuration (config.json), validated. Every error names the
 * offending field by its path, e.g.
 * `config.cas.disk.maxSizeBytes: expected a positive integer, got -1`.
 *
 * Validation is hand-written rather than done with a schema library: the
 * schema is small, recursive (stores nest) and its "exactly one key names the
 * kind" unions are where libraries give their vaguest messages.
 *
 * Example (the default config.json):
 * ```json
 * {
 *   "logLevel": "info",
 *   "listen": "127.0.0.1:8980",
 *   "maxBatchTotalSizeBytes": 4128768,
 *   "cas": { "disk": { "path": "data/cas", "maxSizeBytes": 10737418240 } },
 *   "ac": { "completenessChecking": { "backend": { "disk": { "path": "data/ac", "maxSizeBytes": 1073741824 } } } }
 * }
 * ```
 */
export interface NodeConfig {
  readonly logLevel: LogLevel;
  /** Where gRPC (HTTP/2 cleartext) and Connect/JSON (HTTP/1.1) are served, on one port. */
  readonly listen: ListenAddress;
  /** The admin surface; accepted now, served by a later issue. */
  readonly admin?: AdminConfig | undefined;
  /** Largest sum of blob sizes in one BatchUpdateBlobs/BatchReadBlobs call. */
  readonly maxBatchTotalSizeBytes: number;
  readonly cas: StoreConfig;
  readonly ac: StoreConfig;
  /**
   * Storage-node processes this process starts and supervises (the local
   * cluster of `npm start`). Each is a whole node config of its own, run as
   * `main.ts <this file> --child <name>`; relative paths in it resolve
   * against this file's directory too.
   */
  readonly children: readonly ChildConfig[];
}

export interface ChildConfig {
  readonly name: string;
  /** Restart the process when it dies. Default true. */
  readonly restart: boolean;
  readonly config: NodeConfig;
}

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export interface ListenAddress {
  readonly host: string;
  /** 0 picks a free port. */
  readonly port: number;
}

export interface AdminConfig {
  readonly listen: ListenAddress;
  readonly token?: string | undefined;
}

/**
 * Default batch limit: 4 MiB minus 64 KiB. Bazel (like every grpc-java or
 * C-core client with default settings) rejects messages over 4 MiB, and the
 * limit counts blob bytes only, so the headroom is for the per-blob framing
 * (digest, status) a BatchReadBlobs response adds around the data.
 */
export const DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES = 4 * 1024 * 1024 - 64 * 1024;

/**
 * A node of the store tree. In config.json each node is an object with
 * exactly one key naming its kind; here the kind becomes a `kind` tag.
 */
export type StoreConfig =
  | MemoryStoreConfig
  | DiskStoreConfig
  | CompletenessCheckingStoreConfig
  | RemoteStoreConfig
  | ShardingStoreConfig
  | FallbackStoreConfig;

/** `{"memory": {"maxSizeBytes": 1073741824}}`: blobs in RAM, LRU-capped. */
export interface MemoryStoreConfig {
  readonly kind: 'memory';
  readonly maxSizeBytes: number;
}

/**
 * `{"disk": {"path": "data/cas", "maxSizeBytes": 10737418240}}`: files under
 * `path` (relative paths resolve against the config file's directory),
 * LRU-capped at maxSizeBytes.
 */
export interface DiskStoreConfig {
  readonly kind: 'disk';
  /** Absolute, after resolution. */
  readonly path: string;
  readonly maxSizeBytes: number;
}

/**
 * AC only: `{"completenessChecking": {"backend": {...}}}` hides an
 * ActionResult whose referenced blobs are not all readable from the CAS tree.
 */
export interface CompletenessCheckingStoreConfig {
  readonly kind: 'completenessChecking';
  readonly backend: StoreConfig;
}

/**
 * `{"remote": {"url": "http://127.0.0.1:8981", "instanceName": ""}}`: a shard
 * reached over gRPC (h2c for http://, TLS for https://): this project's
 * storage node or any REAPI server (bb-storage, bazel-remote, NativeLink).
 */
export interface RemoteStoreConfig {
  readonly kind: 'remote';
  readonly url: string;
  readonly instanceName: string;
  /** Deadline for unary calls and for progress on streams. Default 30 s. */
  readonly timeoutMs?: number | undefined;
  /** Deadline for one grpc.health.v1 check. Default 1 s. */
  readonly healthTimeoutMs?: number | undefined;
}

/**
 * ```json
 * {"sharding": {
 *   "shards": {
 *     "shard-a": {"weight": 1, "backend": {"remote": {"url": "http://127.0.0.1:8981"}}},
 *     "shard-b": {"weight": 1, "backend": {"remote": {"url": "http://127.0.0.1:8982"}}}
 *   },
 *   "handoffDir": "data/edge/handoff-cas",
 *   "healthCheckIntervalMs": 1000
 * }}
 * ```
 * Weighted rendezvous hashing over named shards, each behind a circuit
 * breaker; writes that land on a stand-in are recorded in `handoffDir` and
 * copied to their owner when it returns. Shard names are the hashing keys:
 * every edge must use the same names and weights.
 */
export interface ShardingStoreConfig {
  readonly kind: 'sharding';
  readonly shards: readonly { readonly name: string; readonly weight: number; readonly backend: StoreConfig }[];
  readonly handoffDir: string;
  readonly maxHints?: number | undefined;
  readonly healthCheckIntervalMs?: number | undefined;
  readonly healthCheckTimeoutMs?: number | undefined;
  readonly probeDepth?: number | undefined;
  readonly probeWindowMs?: number | undefined;
  /** Digests remembered as recently confirmed present; 0 turns the existence cache off. */
  readonly existenceCacheMaxEntries?: number | undefined;
  /** How long such a confirmation is believed, in ms; 0 turns the existence cache off. */
  readonly existenceCacheTtlMs?: number | undefined;
}

/**
 * ```json
 * {"fallback": {
 *   "primary": {"sharding": {...}},
 *   "secondary": {"remote": {"url": "http://127.0.0.1:8984"}},
 *   "journalDir": "data/edge/journal-cas",
 *   "replication": {"maxQueue": 10000, "concurrency": 4, "overflow": "drop-oldest"}
 * }}
 * ```
 * Reads and writes go to the primary and are replicated to the secondary in
 * the background; while the primary is down the secondary serves, and what it
 * accepted is journaled in `journalDir` and replayed to the primary later.
 */
export interface FallbackStoreConfig {
  readonly kind: 'fallback';
  readonly primary: StoreConfig;
  readonly secondary: StoreConfig;
  readonly journalDir: string;
  readonly maxJournalEntries?: number | undefined;
  readonly replication?: {
    readonly maxQueue?: number | undefined;
    readonly concurrency?: number | undefined;
    readonly overflow?: 'drop-oldest' | 'reject-new' | undefined;
  };
  readonly healthCheckIntervalMs?: number | undefined;
}

/** A config that failed validation; the message starts with the field path. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

/** Reads, parses and validates a config file. */
export async function loadConfig(file: string): Promise<NodeConfig> {
  const path = resolve(file);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`config file ${path} is not valid JSON: ${(err as Error).message}`);
  }
  return parseConfig(raw, { baseDir: dirname(path) });
}

export interface ParseOptions {
  /** Directory that relative paths resolve against (the config file's). */
  readonly baseDir: string;
}

/** Validates an already parsed config object. */
export function parseConfig(raw: unknown, opts: ParseOptions): NodeConfig {
  const path = 'config';
  return parseNode(raw, path, opts, true);
}

function parseNode(raw: unknown, path: string, opts: ParseOptions, top: boolean): NodeConfig {
  const o = object(raw, path);
  const keys = ['logLevel', 'listen', 'admin', 'maxBatchTotalSizeBytes', 'cas', 'ac'];
  allowKeys(o, top ? [...keys, 'children'] : [...keys, 'restart'], path);
  const logLevel = o.logLevel === undefined ? 'info' : oneOf(o.logLevel, LOG_LEVELS, `${path}.logLevel`);
  const listen = listenAddress(required(o, 'listen', path), `${path}.listen`);
  const admin = o.admin === undefined ? undefined : adminConfig(o.admin, `${path}.admin`);
  const maxBatchTotalSizeBytes =
    o.maxBatchTotalSizeBytes === undefined
      ? DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES
      : positiveInteger(o.maxBatchTotalSizeBytes, `${path}.maxBatchTotalSizeBytes`);
  const cas = parseStoreConfig(required(o, 'cas', path), `${path}.cas`, { tree: 'cas', baseDir: opts.baseDir });
  const ac = parseStoreConfig(required(o, 'ac', path), `${path}.ac`, { tree: 'ac', baseDir: opts.baseDir });
  const children: ChildConfig[] = [];
  if (o.children !== undefined) {
    const cp = `${path}.children`;
    const co = object(o.children, cp);
    for (const [name, value] of Object.entries(co)) {
      if (!/^[A-Za-z0-9_.-]+$/.test(name)) {
        throw new ConfigError(`${cp}.${name}: child names may contain only letters, digits, '.', '_' and '-'`);
      }
      const child = parseNode(value, `${cp}.${name}`, opts, false);
      const restartValue = (value as Record<string, unknown>).restart;
      if (restartValue !== undefined && typeof restartValue !== 'boolean') {
        throw new ConfigError(`${cp}.${name}.restart: expected true or false, got ${describe(restartValue)}`);
      }
      children.push({ name, restart: restartValue !== false, config: child });
    }
  }
  const config = { logLevel, listen, admin, maxBatchTotalSizeBytes, cas, ac, children };
  if (top) checkDistinctAddresses(config, path);
  return config;
}

/**
 * Two listeners of this process and its children on one host:port would
 * fail at startup with EADDRINUSE (or, worse, one child would take another's
 * traffic), so it is a config error naming both fields. Port 0 (any free
 * port) never clashes; a wildcard host (0.0.0.0, ::) clashes with every
 * host on the same port, as it does for the kernel. Host names are compared
 * as written ("localhost" is not resolved).
 */
function checkDistinctAddresses(config: NodeConfig, path: string): void {
  const seen: { field: string; address: ListenAddress }[] = [];
  const add = (field: string, address: ListenAddress) => {
    if (address.port !== 0) {
      const clash = seen.find((s) => s.address.port === address.port && sameHost(s.address.host, address.host));
      if (clash !== undefined) {
        throw new ConfigError(
          `${field}: ${formatAddress(address)} is already used by ${clash.field} (${formatAddress(clash.address)})`,
        );
      }
    }
    seen.push({ field, address });
  };
  const node = (n: NodeConfig, p: string) => {
    add(`${p}.listen`, n.listen);
    if (n.admin !== undefined) add(`${p}.admin.listen`, n.admin.listen);
  };
  node(config, path);
  for (const child of config.children) node(child.config, `${path}.children.${child.name}`);
}

const WILDCARD_HOSTS = new Set(['0.0.0.0', '::']);

function sameHost(a: string, b: string): boolean {
  return a === b || WILDCARD_HOSTS.has(a) || WILDCARD_HOSTS.has(b);
}

export interface StoreParseContext {
  /** Which tree the node sits in; some kinds are valid in one tree only. */
  readonly tree: 'cas' | 'ac';
  readonly baseDir: string;
}

type StoreParser = (value: unknown, path: string, ctx: StoreParseContext) => StoreConfig;

/**
 * One parser per store kind. A new kind costs one entry here, one interface
 * in StoreConfig and one case in src/stores/factory.ts.
 */
const STORE_PARSERS: Readonly<Record<string, StoreParser>> = {
  memory(value, path): MemoryStoreConfig {
    const o = object(value, path);
    allowKeys(o, ['maxSizeBytes'], path);
    return { kind: 'memory', maxSizeBytes: positiveInteger(required(o, 'maxSizeBytes', path), `${path}.maxSizeBytes`) };
  },

  disk(value, path, ctx): DiskStoreConfig {
    const o = object(value, path);
    allowKeys(o, ['path', 'maxSizeBytes'], path);
    const dir = nonEmptyString(required(o, 'path', path), `${path}.path`);
    return {
      kind: 'disk',
      path: resolve(ctx.baseDir, dir),
      maxSizeBytes: positiveInteger(required(o, 'maxSizeBytes', path), `${path}.maxSizeBytes`),
    };
  },

  completenessChecking(value, path, ctx): CompletenessCheckingStoreConfig {
    if (ctx.tree !== 'ac') {
      throw new ConfigError(`${path}: completenessChecking is only valid in the ac tree`);
    }
    const o = object(value, path);
    allowKeys(o, ['backend'], path);
    return { kind: 'completenessChecking', backend: parseStoreConfig(required(o, 'backend', path), `${path}.backend`, ctx) };
  },

  remote(value, path): RemoteStoreConfig {
    const o = object(value, path);
    allowKeys(o, ['url', 'instanceName', 'timeoutMs', 'healthTimeoutMs'], path);
    const url = nonEmptyString(required(o, 'url', path), `${path}.url`);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new ConfigError(`${path}.url: expected an http:// or https:// URL, got ${describe(url)}`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new ConfigError(`${path}.url: expected an http:// or https:// URL, got ${describe(url)}`);
    }
    const instanceName = o.instanceName === undefined ? '' : string(o.instanceName, `${path}.instanceName`);
    return {
      kind: 'remote',
      url,
      instanceName,
      timeoutMs: optionalPositiveInteger(o, 'timeoutMs', path),
      healthTimeoutMs: optionalPositiveInteger(o, 'healthTimeoutMs', path),
    };
  },

  sharding(value, path, ctx): ShardingStoreConfig {
    const o = object(value, path);
    allowKeys(
      o,
      [
        'shards',
        'handoffDir',
        'maxHints',
        'healthCheckIntervalMs',
        'healthCheckTimeoutMs',
        'probeDepth',
        'probeWindowMs',
        'existenceCacheMaxEntries',
        'existenceCacheTtlMs',
      ],
      path,
    );
    const shardsPath = `${path}.shards`;
    const shardsObj = object(required(o, 'shards', path), shardsPath);
    const names = Object.keys(shardsObj);
    if (names.length === 0) throw new ConfigError(`${shardsPath}: needs at least one shard`);
    const shards = names.map((name) => {
      const sp = `${shardsPath}.${name}`;
      const so = object(shardsObj[name], sp);
      allowKeys(so, ['weight', 'backend'], sp);
      const weight = so.weight === undefined ? 1 : positiveInteger(so.weight, `${sp}.weight`);
      if (weight > 1_000_000) throw new ConfigError(`${sp}.weight: must be at most 1000000, got ${weight}`);
      return { name, weight, backend: parseStoreConfig(required(so, 'backend', sp), `${sp}.backend`, ctx) };
    });
    const probeDepth = o.probeDepth === undefined ? undefined : nonNegativeInteger(o.probeDepth, `${path}.probeDepth`);
    return {
      kind: 'sharding',
      shards,
      handoffDir: resolve(ctx.baseDir, nonEmptyString(required(o, 'handoffDir', path), `${path}.handoffDir`)),
      maxHints: optionalPositiveInteger(o, 'maxHints', path),
      healthCheckIntervalMs: optionalPositiveInteger(o, 'healthCheckIntervalMs', path),
      healthCheckTimeoutMs: optionalPositiveInteger(o, 'healthCheckTimeoutMs', path),
      probeDepth,
      // 0: no probing by rank at all (pending hints are still followed).
      probeWindowMs: o.probeWindowMs === undefined ? undefined : nonNegativeInteger(o.probeWindowMs, `${path}.probeWindowMs`),
      existenceCacheMaxEntries: optionalNonNegativeInteger(o, 'existenceCacheMaxEntries', path),
      existenceCacheTtlMs: optionalNonNegativeInteger(o, 'existenceCacheTtlMs', path),
    };
  },

  fallback(value, path, ctx): FallbackStoreConfig {
    const o = object(value, path);
    allowKeys(o, ['primary', 'secondary', 'journalDir', 'maxJournalEntries', 'replication', 'healthCheckIntervalMs'], path);
    let replication: FallbackStoreConfig['replication'];
    if (o.replication !== undefined) {
      const rp = `${path}.replication`;
      const r = object(o.replication, rp);
      allowKeys(r, ['maxQueue', 'concurrency', 'overflow'], rp);
      replication = {
        maxQueue: optionalPositiveInteger(r, 'maxQueue', rp),
        concurrency: optionalPositiveInteger(r, 'concurrency', rp),
        overflow: r.overflow === undefined ? undefined : oneOf(r.overflow, ['drop-oldest', 'reject-new'] as const, `${rp}.overflow`),
      };
    }
    return {
      kind: 'fallback',
      primary: parseStoreConfig(required(o, 'primary', path), `${path}.primary`, ctx),
      secondary: parseStoreConfig(required(o, 'secondary', path), `${path}.secondary`, ctx),
      journalDir: resolve(ctx.baseDir, nonEmptyString(required(o, 'journalDir', path), `${path}.journalDir`)),
      maxJournalEntries: optionalPositiveInteger(o, 'maxJournalEntries', path),
      replication,
      healthCheckIntervalMs: optionalPositiveInteger(o, 'healthCheckIntervalMs', path),
    };
  },
};

export const STORE_KINDS: readonly string[] = Object.keys(STORE_PARSERS);

/** Validates one node of a store tree (and, recursively, its children). */
export function parseStoreConfig(value: unknown, path: string, ctx: StoreParseContext): StoreConfig {
  const o = object(value, path);
  const keys = Object.keys(o);
  const expected = `an object with exactly one key naming the store kind (${STORE_KINDS.join(', ')})`;
  if (keys.length !== 1) {
    const got = keys.length === 0 ? 'no keys' : `keys ${keys.map((k) => JSON.stringify(k)).join(', ')}`;
    throw new ConfigError(`${path}: expected ${expected}, got ${got}`);
  }
  const kind = keys[0]!;
  const parser = Object.hasOwn(STORE_PARSERS, kind) ? STORE_PARSERS[kind] : undefined;
  if (parser === undefined) {
    throw new ConfigError(`${path}: unknown store kind ${JSON.stringify(kind)}, expected one of ${STORE_KINDS.join(', ')}`);
  }
  return parser(o[kind], `${path}.${kind}`, ctx);
}

/**
 * Parses "host:port" or "[ipv6]:port". The host is required, so that
 * listening on all interfaces ("0.0.0.0:8980") is always spelled out.
 */
export function parseListenAddress(text: string): ListenAddress | string {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  if (m === null) return 'expected "host:port" (e.g. "127.0.0.1:8980" or "[::1]:8980")';
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined && isIP(host) !== 6) return `"${host}" is not an IPv6 address`;
  const port = Number(m[3]);
  if (port > 65535) return `port ${port} is out of range (0-65535)`;
  return { host, port };
}

/** Formats an address for logs and URLs. */
export function formatAddress(a: ListenAddress): string {
  return isIP(a.host) === 6 ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

function listenAddress(value: unknown, path: string): ListenAddress {
  const text = nonEmptyString(value, path);
  const parsed = parseListenAddress(text);
  if (typeof parsed === 'string') throw new ConfigError(`${path}: ${parsed}, got ${JSON.stringify(text)}`);
  return parsed;
}

function adminConfig(value: unknown, path: string): AdminConfig {
  const o = object(value, path);
  allowKeys(o, ['listen', 'token'], path);
  const listen = listenAddress(required(o, 'listen', path), `${path}.listen`);
  const token = o.token === undefined ? undefined : nonEmptyString(o.token, `${path}.token`);
  return { listen, token };
}

// --- primitive checks -------------------------------------------------------

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object';
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? `${value.slice(0, 57)}...` : value);
  return String(value);
}

function object(value: unknown, path: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ConfigError(`${path}: expected an object, got ${describe(value)}`);
  }
  return value as Record<string, unknown>;
}

function allowKeys(o: Record<string, unknown>, allowed: readonly string[], path: string): void {
  for (const key of Object.keys(o)) {
    if (!allowed.includes(key)) {
      throw new ConfigError(`${path}.${key}: unknown field (allowed: ${allowed.join(', ')})`);
    }
  }
}

function required(o: Record<string, unknown>, key: string, path: string): unknown {
  if (o[key] === undefined) throw new ConfigError(`${path}.${key}: required`);
  return o[key];
}

function positiveInteger(value: unknown, path: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
    throw new ConfigError(`${path}: expected a positive integer, got ${describe(value)}`);
  }
  return value;
}

function optionalPositiveInteger(o: Record<string, unknown>, key: string, path: string): number | undefined {
  return o[key] === undefined ? undefined : positiveInteger(o[key], `${path}.${key}`);
}

function optionalNonNegativeInteger(o: Record<string, unknown>, key: string, path: string): number | undefined {
  return o[key] === undefined ? undefined : nonNegativeInteger(o[key], `${path}.${key}`);
}

function nonNegativeInteger(value: unknown, path: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new ConfigError(`${path}: expected a non-negative integer, got ${describe(value)}`);
  }
  return value;
}

function string(value: unknown, path: string): string {
  if (typeof value !== 'string') throw new ConfigError(`${path}: expected a string, got ${describe(value)}`);
  return value;
}

function nonEmptyString(value: unknown, path: string): string {
  if (typeof value !== 'string' || value === '') {
    throw new ConfigError(`${path}: expected a non-empty string, got ${describe(value)}`);
  }
  return value;
}

function oneOf<T extends string>(value: unknown, choices: readonly T[], path: string): T {
  if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
    throw new ConfigError(`${path}: expected one of ${choices.join(', ')}, got ${describe(value)}`);
  }
  return value as T;
}
