import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { dirname, resolve } from 'node:path';
import { scryptHashProblem } from './auth/password.ts';
import { instanceNameError } from './services/instance-name.ts';

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
  /** TLS (and optionally mTLS) on the REAPI port; absent: cleartext (h2c and HTTP/1.1). */
  readonly tls?: ServerTlsConfig | undefined;
  /** Who may read and write which instances; absent: everyone may do everything. */
  readonly auth?: AuthConfig | undefined;
  /** How instance names partition the action cache. Defaults filled in. */
  readonly instances: InstancesConfig;
  /** Limits on every input. Defaults filled in. */
  readonly limits: LimitsConfig;
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
  /**
   * The admin bearer token, from exactly one of `token` (plain, in the
   * config), `tokenFile` (first line of the file) or `tokenEnv` (an
   * environment variable). The file and the variable are read at startup.
   */
  readonly token?: string | undefined;
  readonly tokenFile?: string | undefined;
  readonly tokenEnv?: string | undefined;
  /**
   * Host header values (host or host:port) the admin surface answers; others
   * get 421. Default: the listen address, plus localhost and 127.0.0.1 / [::1]
   * with its port when it listens on loopback.
   */
  readonly allowedHosts?: readonly string[] | undefined;
}

/**
 * `"tls": {"certFile": "tls/server.pem", "keyFile": "tls/server.key",
 * "clientCaFile": "tls/ca.pem", "clientCert": "require"}`. Paths resolve
 * against the config file's directory. The files are reloaded on SIGHUP and
 * when they change, without dropping connections.
 */
export interface ServerTlsConfig {
  /** PEM certificate chain (absolute after resolution). */
  readonly certFile: string;
  /** PEM private key (absolute after resolution). */
  readonly keyFile: string;
  /** PEM CA bundle that client certificates are verified against; enables mTLS. */
  readonly clientCaFile?: string | undefined;
  /**
   * With clientCaFile: "require" (default) refuses a handshake without a
   * valid client certificate; "optional" accepts one without a certificate
   * (a token must then identify the client) but never one with a bad one.
   */
  readonly clientCert: 'require' | 'optional';
}

export type Access = 'read' | 'read-write';

/** Access by instance-name prefix; the longest matching prefix wins. */
export interface Grant {
  /**
   * "" matches every instance name; "a/b" matches "a/b" and "a/b/..." but
   * not "a/bc" (prefixes are whole segments).
   */
  readonly instancePrefix: string;
  readonly access: Access;
}

/**
 * ```json
 * "auth": {
 *   "anonymous": "read",
 *   "identities": {
 *     "ci": {"tokenSha256": "<64 hex>", "grants": {"": "read-write"}},
 *     "alice": {"basic": {"username": "alice", "passwordHash": "scrypt$..."}, "grants": {"team-a": "read"}},
 *     "runner-7": {"clientCertCommonName": "runner-7", "grants": {"": "read-write"}}
 *   }
 * }
 * ```
 * Secrets are stored as hashes only (`npm run hash-secret`).
 */
export interface AuthConfig {
  /** What a call with no credentials may do: nothing (UNAUTHENTICATED) or read every instance. Default "none". */
  readonly anonymous: 'none' | 'read';
  readonly identities: readonly IdentityConfig[];
}

export interface IdentityConfig {
  readonly name: string;
  /** Lowercase hex SHA-256 of the bearer token (tokens are random, so a fast hash is enough). */
  readonly tokenSha256?: string | undefined;
  /** HTTP basic: the password as a scrypt hash string (see src/auth/). */
  readonly basic?: { readonly username: string; readonly passwordHash: string } | undefined;
  /** mTLS: a verified client certificate whose subject CN is this. */
  readonly clientCertCommonName?: string | undefined;
  readonly grants: readonly Grant[];
  /** Calls per second allowed to this identity (token bucket), with a burst; absent: no limit. */
  readonly rateLimit?: { readonly requestsPerSecond: number; readonly burst: number } | undefined;
}

/**
 * `"instances": {"isolateActionCache": true, "aliases": {"ci-linux": "linux", "dev-linux": "linux"}}`.
 * With isolation (the default) the action cache is partitioned by namespace:
 * an instance name's namespace is its alias if it has one, else the name
 * itself. Without it every instance shares the namespace "". The CAS is
 * always shared: it is content-addressed.
 */
export interface InstancesConfig {
  readonly isolateActionCache: boolean;
  /** Instance name -> action-cache namespace. */
  readonly aliases: ReadonlyMap<string, string>;
}

/** Each limit's default is in DEFAULT_LIMITS; the README's limits table lists the errors. */
export interface LimitsConfig {
  /** Largest gRPC / Connect binary message, received or accepted. */
  readonly maxMessageBytes: number;
  /** Largest Connect/JSON request body. */
  readonly maxJsonBodyBytes: number;
  /** Digests in one FindMissingBlobs request. */
  readonly maxFindMissingDigests: number;
  /** Digests (or blobs) in one BatchReadBlobs / BatchUpdateBlobs request. */
  readonly maxBatchBlobs: number;
  /** Largest blob accepted by a ByteStream Write or Batch update. */
  readonly maxBlobSizeBytes: number;
  /** Largest zstd window (log2 bytes) a compressed upload may use. */
  readonly maxZstdWindowLog: number;
  /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection. */
  readonly maxConcurrentStreams: number;
  /** Bytes of partly received messages held for one HTTP/2 connection at once. */
  readonly maxConnectionBufferBytes: number;
  /** Open client connections; more are refused at accept. */
  readonly maxConnections: number;
  /** Time to send the HTTP/1.1 request headers, or the HTTP/2 preface and SETTINGS, from connect. */
  readonly headersTimeoutMs: number;
  /** A connection with no request or stream in flight for this long is closed. */
  readonly idleTimeoutMs: number;
  /** Time to receive a whole HTTP/1.1 request (headers and body). */
  readonly requestTimeoutMs: number;
  /** Interrupted ByteStream uploads whose received prefix a disk CAS keeps for resumption. */
  readonly maxPartialUploads: number;
  /** Bytes of those prefixes kept in all (they also count against the disk store's maxSizeBytes). */
  readonly maxPartialUploadBytes: number;
  /** A kept prefix not resumed within this long is deleted. */
  readonly partialUploadTtlMs: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_LIMITS: LimitsConfig = {
  maxMessageBytes: 4 * MiB,
  maxJsonBodyBytes: 8 * MiB,
  maxFindMissingDigests: 65_536,
  maxBatchBlobs: 65_536,
  maxBlobSizeBytes: 16 * 1024 * MiB,
  maxZstdWindowLog: 23,
  maxConcurrentStreams: 128,
  maxConnectionBufferBytes: 64 * MiB,
  maxConnections: 1024,
  headersTimeoutMs: 10_000,
  idleTimeoutMs: 300_000,
  requestTimeoutMs: 300_000,
  maxPartialUploads: 128,
  maxPartialUploadBytes: 1024 * MiB,
  partialUploadTtlMs: 600_000,
};

export const DEFAULT_INSTANCES: InstancesConfig = { isolateActionCache: true, aliases: new Map() };

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
  /** For https:// shards: the CA to trust, a client certificate, the name to verify. */
  readonly tls?: RemoteTlsConfig | undefined;
  /**
   * Sent as `Authorization: Bearer <token>` on every call to the shard. From
   * a file (first line) or an environment variable, read at startup; never
   * written in the config itself.
   */
  readonly bearerTokenFile?: string | undefined;
  readonly bearerTokenEnv?: string | undefined;
}

export interface RemoteTlsConfig {
  /** PEM CA bundle (absolute after resolution); default: the system's roots. */
  readonly caFile?: string | undefined;
  /** Client certificate and key for mTLS; both or neither. */
  readonly certFile?: string | undefined;
  readonly keyFile?: string | undefined;
  /** Name to verify the shard's certificate against; default: the URL's host. */
  readonly serverName?: string | undefined;
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
  /**
   * "sync": a write is acknowledged once both sides hold it (or, with one
   * side down, once the other holds it and it is journaled for the missing
   * side). "async" (the default): once the primary holds it; the secondary
   * gets it by background replication.
   */
  readonly durability?: 'sync' | 'async' | undefined;
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
  const keys = ['logLevel', 'listen', 'admin', 'maxBatchTotalSizeBytes', 'tls', 'auth', 'instances', 'limits', 'cas', 'ac'];
  allowKeys(o, top ? [...keys, 'children'] : [...keys, 'restart'], path);
  const logLevel = o.logLevel === undefined ? 'info' : oneOf(o.logLevel, LOG_LEVELS, `${path}.logLevel`);
  const listen = listenAddress(required(o, 'listen', path), `${path}.listen`);
  const admin = o.admin === undefined ? undefined : adminConfig(o.admin, `${path}.admin`, opts);
  const tls = o.tls === undefined ? undefined : serverTlsConfig(o.tls, `${path}.tls`, opts);
  const auth = o.auth === undefined ? undefined : authConfig(o.auth, `${path}.auth`, tls);
  const instances = o.instances === undefined ? DEFAULT_INSTANCES : instancesConfig(o.instances, `${path}.instances`);
  const limits = o.limits === undefined ? DEFAULT_LIMITS : limitsConfig(o.limits, `${path}.limits`);
  const maxBatchTotalSizeBytes =
    o.maxBatchTotalSizeBytes === undefined
      ? DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES
      : positiveInteger(o.maxBatchTotalSizeBytes, `${path}.maxBatchTotalSizeBytes`);
  // A full batch must fit in one message with room for its per-blob framing.
  if (maxBatchTotalSizeBytes > limits.maxMessageBytes - 64 * 1024) {
    throw new ConfigError(
      `${path}.maxBatchTotalSizeBytes: ${maxBatchTotalSizeBytes} does not fit in limits.maxMessageBytes (${limits.maxMessageBytes}) ` +
        'with 64 KiB of framing to spare; lower it or raise the message limit',
    );
  }
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
  const config = { logLevel, listen, admin, maxBatchTotalSizeBytes, tls, auth, instances, limits, cas, ac, children };
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

  remote(value, path, ctx): RemoteStoreConfig {
    const o = object(value, path);
    allowKeys(o, ['url', 'instanceName', 'timeoutMs', 'healthTimeoutMs', 'tls', 'bearerTokenFile', 'bearerTokenEnv'], path);
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
    let tls: RemoteTlsConfig | undefined;
    if (o.tls !== undefined) {
      const tp = `${path}.tls`;
      if (parsed.protocol !== 'https:') throw new ConfigError(`${tp}: only valid with an https:// url, got ${describe(url)}`);
      const t = object(o.tls, tp);
      allowKeys(t, ['caFile', 'certFile', 'keyFile', 'serverName'], tp);
      const file = (key: string) =>
        t[key] === undefined ? undefined : resolve(ctx.baseDir, nonEmptyString(t[key], `${tp}.${key}`));
      tls = {
        caFile: file('caFile'),
        certFile: file('certFile'),
        keyFile: file('keyFile'),
        serverName: t.serverName === undefined ? undefined : nonEmptyString(t.serverName, `${tp}.serverName`),
      };
      if ((tls.certFile === undefined) !== (tls.keyFile === undefined)) {
        throw new ConfigError(`${tp}: certFile and keyFile go together (a client certificate needs its key)`);
      }
    }
    if (o.bearerTokenFile !== undefined && o.bearerTokenEnv !== undefined) {
      throw new ConfigError(`${path}: give bearerTokenFile or bearerTokenEnv, not both`);
    }
    return {
      kind: 'remote',
      url,
      instanceName,
      timeoutMs: optionalPositiveInteger(o, 'timeoutMs', path),
      healthTimeoutMs: optionalPositiveInteger(o, 'healthTimeoutMs', path),
      tls,
      bearerTokenFile:
        o.bearerTokenFile === undefined ? undefined : resolve(ctx.baseDir, nonEmptyString(o.bearerTokenFile, `${path}.bearerTokenFile`)),
      bearerTokenEnv: o.bearerTokenEnv === undefined ? undefined : envName(o.bearerTokenEnv, `${path}.bearerTokenEnv`),
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
    allowKeys(o, ['primary', 'secondary', 'journalDir', 'maxJournalEntries', 'replication', 'healthCheckIntervalMs', 'durability'], path);
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
      durability: o.durability === undefined ? undefined : oneOf(o.durability, ['sync', 'async'] as const, `${path}.durability`),
    };
  },
};

export const STORE_KINDS: readonly string[] = Object.keys(STORE_PARSERS);

/** Deepest store node accepted, counted in path segments (about 100 levels of nesting). */
const MAX_STORE_PATH_SEGMENTS = 256;

/** Validates one node of a store tree (and, recursively, its children). */
export function parseStoreConfig(value: unknown, path: string, ctx: StoreParseContext): StoreConfig {
  // Each level adds two or three segments to the path; real trees are a few levels deep.
  if (path.split('.').length > MAX_STORE_PATH_SEGMENTS) {
    throw new ConfigError(`${path.slice(0, 80)}...: the store tree is nested too deeply (over ${MAX_STORE_PATH_SEGMENTS} path segments)`);
  }
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

function adminConfig(value: unknown, path: string, opts: ParseOptions): AdminConfig {
  const o = object(value, path);
  allowKeys(o, ['listen', 'token', 'tokenFile', 'tokenEnv', 'allowedHosts'], path);
  const listen = listenAddress(required(o, 'listen', path), `${path}.listen`);
  const given = ['token', 'tokenFile', 'tokenEnv'].filter((k) => o[k] !== undefined);
  if (given.length > 1) throw new ConfigError(`${path}: give one of token, tokenFile or tokenEnv, not ${given.join(' and ')}`);
  const token = o.token === undefined ? undefined : nonEmptyString(o.token, `${path}.token`);
  const tokenFile = o.tokenFile === undefined ? undefined : resolve(opts.baseDir, nonEmptyString(o.tokenFile, `${path}.tokenFile`));
  const tokenEnv = o.tokenEnv === undefined ? undefined : envName(o.tokenEnv, `${path}.tokenEnv`);
  let allowedHosts: string[] | undefined;
  if (o.allowedHosts !== undefined) {
    const hp = `${path}.allowedHosts`;
    if (!Array.isArray(o.allowedHosts) || o.allowedHosts.length === 0) {
      throw new ConfigError(`${hp}: expected a non-empty array of host names, got ${describe(o.allowedHosts)}`);
    }
    allowedHosts = o.allowedHosts.map((h, i) => {
      const host = nonEmptyString(h, `${hp}[${i}]`);
      if (!/^[A-Za-z0-9.:\[\]_-]+$/.test(host)) throw new ConfigError(`${hp}[${i}]: not a host or host:port, got ${describe(host)}`);
      return host.toLowerCase();
    });
  }
  return { listen, token, tokenFile, tokenEnv, allowedHosts };
}

function serverTlsConfig(value: unknown, path: string, opts: ParseOptions): ServerTlsConfig {
  const o = object(value, path);
  allowKeys(o, ['certFile', 'keyFile', 'clientCaFile', 'clientCert'], path);
  const file = (key: string) => resolve(opts.baseDir, nonEmptyString(o[key], `${path}.${key}`));
  const clientCaFile = o.clientCaFile === undefined ? undefined : file('clientCaFile');
  if (o.clientCert !== undefined && clientCaFile === undefined) {
    throw new ConfigError(`${path}.clientCert: needs clientCaFile (the CA that client certificates are verified against)`);
  }
  return {
    certFile: resolve(opts.baseDir, nonEmptyString(required(o, 'certFile', path), `${path}.certFile`)),
    keyFile: resolve(opts.baseDir, nonEmptyString(required(o, 'keyFile', path), `${path}.keyFile`)),
    clientCaFile,
    clientCert: o.clientCert === undefined ? 'require' : oneOf(o.clientCert, ['require', 'optional'] as const, `${path}.clientCert`),
  };
}

function authConfig(value: unknown, path: string, tls: ServerTlsConfig | undefined): AuthConfig {
  const o = object(value, path);
  allowKeys(o, ['anonymous', 'identities'], path);
  const anonymous = o.anonymous === undefined ? 'none' : oneOf(o.anonymous, ['none', 'read'] as const, `${path}.anonymous`);
  const ip = `${path}.identities`;
  const io = object(required(o, 'identities', path), ip);
  const identities: IdentityConfig[] = [];
  const seen = new Map<string, string>();
  const unique = (what: string, value: string, field: string) => {
    const key = `${what}\0${value}`;
    const other = seen.get(key);
    if (other !== undefined) throw new ConfigError(`${field}: the same ${what} is already given to ${other}`);
    seen.set(key, field);
  };
  for (const [name, raw] of Object.entries(io)) {
    const p = `${ip}.${name}`;
    if (!/^[A-Za-z0-9_.@-]+$/.test(name)) {
      throw new ConfigError(`${p}: identity names may contain only letters, digits, '.', '_', '@' and '-'`);
    }
    const e = object(raw, p);
    allowKeys(e, ['tokenSha256', 'basic', 'clientCertCommonName', 'grants', 'rateLimit'], p);
    let tokenSha256: string | undefined;
    if (e.tokenSha256 !== undefined) {
      tokenSha256 = string(e.tokenSha256, `${p}.tokenSha256`);
      if (!/^[0-9a-f]{64}$/.test(tokenSha256)) {
        throw new ConfigError(`${p}.tokenSha256: expected 64 lowercase hex digits (the SHA-256 of the token, never the token itself)`);
      }
      unique('token', tokenSha256, `${p}.tokenSha256`);
    }
    let basic: IdentityConfig['basic'];
    if (e.basic !== undefined) {
      const bp = `${p}.basic`;
      const b = object(e.basic, bp);
      allowKeys(b, ['username', 'passwordHash'], bp);
      const username = nonEmptyString(required(b, 'username', bp), `${bp}.username`);
      if (username.includes(':') || /[\x00-\x1f\x7f]/.test(username)) {
        throw new ConfigError(`${bp}.username: may not contain ':' or control characters`);
      }
      const passwordHash = nonEmptyString(required(b, 'passwordHash', bp), `${bp}.passwordHash`);
      const hashProblem = scryptHashProblem(passwordHash);
      if (hashProblem !== undefined) {
        throw new ConfigError(`${bp}.passwordHash: ${hashProblem}, as printed by npm run hash-secret; never a plain password`);
      }
      unique('basic username', username, `${bp}.username`);
      basic = { username, passwordHash };
    }
    let clientCertCommonName: string | undefined;
    if (e.clientCertCommonName !== undefined) {
      clientCertCommonName = nonEmptyString(e.clientCertCommonName, `${p}.clientCertCommonName`);
      if (tls?.clientCaFile === undefined) {
        throw new ConfigError(`${p}.clientCertCommonName: needs tls.clientCaFile, or no certificate could ever be verified`);
      }
      unique('client certificate name', clientCertCommonName, `${p}.clientCertCommonName`);
    }
    if (tokenSha256 === undefined && basic === undefined && clientCertCommonName === undefined) {
      throw new ConfigError(`${p}: needs a credential: tokenSha256, basic or clientCertCommonName`);
    }
    const gp = `${p}.grants`;
    const go = object(required(e, 'grants', p), gp);
    const grants: Grant[] = Object.entries(go).map(([prefix, access]) => {
      if (prefix !== '') instanceNameProblem(prefix, `${gp}.${JSON.stringify(prefix)}`);
      return { instancePrefix: prefix, access: oneOf(access, ['read', 'read-write'] as const, `${gp}.${JSON.stringify(prefix)}`) };
    });
    let rateLimit: IdentityConfig['rateLimit'];
    if (e.rateLimit !== undefined) {
      const rp = `${p}.rateLimit`;
      const r = object(e.rateLimit, rp);
      allowKeys(r, ['requestsPerSecond', 'burst'], rp);
      const requestsPerSecond = positiveInteger(required(r, 'requestsPerSecond', rp), `${rp}.requestsPerSecond`);
      rateLimit = { requestsPerSecond, burst: r.burst === undefined ? requestsPerSecond : positiveInteger(r.burst, `${rp}.burst`) };
    }
    identities.push({ name, tokenSha256, basic, clientCertCommonName, grants, rateLimit });
  }
  return { anonymous, identities };
}

function instancesConfig(value: unknown, path: string): InstancesConfig {
  const o = object(value, path);
  allowKeys(o, ['isolateActionCache', 'aliases'], path);
  if (o.isolateActionCache !== undefined && typeof o.isolateActionCache !== 'boolean') {
    throw new ConfigError(`${path}.isolateActionCache: expected true or false, got ${describe(o.isolateActionCache)}`);
  }
  const aliases = new Map<string, string>();
  if (o.aliases !== undefined) {
    const ap = `${path}.aliases`;
    for (const [name, ns] of Object.entries(object(o.aliases, ap))) {
      const field = `${ap}.${JSON.stringify(name)}`;
      instanceNameProblem(name, field);
      const namespace = string(ns, field);
      if (namespace !== '') instanceNameProblem(namespace, field);
      aliases.set(name, namespace);
    }
  }
  return { isolateActionCache: o.isolateActionCache !== false, aliases };
}

/** Limits a value must stay within to be sane, whatever the deployment. */
const LIMIT_RANGES: Readonly<Record<keyof LimitsConfig, readonly [number, number]>> = {
  maxMessageBytes: [64 * 1024, 64 * MiB],
  maxJsonBodyBytes: [64 * 1024, 256 * MiB],
  maxFindMissingDigests: [1, 1_000_000],
  maxBatchBlobs: [1, 1_000_000],
  maxBlobSizeBytes: [1, Number.MAX_SAFE_INTEGER],
  maxZstdWindowLog: [10, 31],
  maxConcurrentStreams: [1, 65_535],
  maxConnectionBufferBytes: [MiB, 4096 * MiB],
  maxConnections: [1, 1_000_000],
  headersTimeoutMs: [100, 600_000],
  idleTimeoutMs: [1000, 86_400_000],
  requestTimeoutMs: [1000, 86_400_000],
  maxPartialUploads: [1, 1_000_000],
  maxPartialUploadBytes: [MiB, Number.MAX_SAFE_INTEGER],
  partialUploadTtlMs: [1000, 86_400_000],
};

function limitsConfig(value: unknown, path: string): LimitsConfig {
  const o = object(value, path);
  const keys = Object.keys(DEFAULT_LIMITS) as (keyof LimitsConfig)[];
  allowKeys(o, keys, path);
  const out: Record<string, number> = {};
  for (const key of keys) {
    if (o[key] === undefined) {
      out[key] = DEFAULT_LIMITS[key];
      continue;
    }
    const v = positiveInteger(o[key], `${path}.${key}`);
    const [lo, hi] = LIMIT_RANGES[key];
    if (v < lo || v > hi) throw new ConfigError(`${path}.${key}: must be between ${lo} and ${hi}, got ${v}`);
    out[key] = v;
  }
  const limits = out as unknown as LimitsConfig;
  if (limits.maxConnectionBufferBytes < limits.maxMessageBytes) {
    throw new ConfigError(`${path}.maxConnectionBufferBytes: must be at least maxMessageBytes (${limits.maxMessageBytes}), got ${limits.maxConnectionBufferBytes}`);
  }
  return limits;
}

/**
 * Instance names (and the prefixes and aliases naming them) in config follow
 * the request rules: printable, "/"-separated non-empty segments, no "." or
 * "..", no reserved word.
 */
function instanceNameProblem(name: string, field: string): void {
  const problem = instanceNameError(name);
  if (problem !== undefined) throw new ConfigError(`${field}: instance name ${problem}`);
}

function envName(value: unknown, path: string): string {
  const name = nonEmptyString(value, path);
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new ConfigError(`${path}: not an environment variable name, got ${describe(name)}`);
  return name;
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
