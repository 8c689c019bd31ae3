// Starts a real storage node inside the test process: the same stores, app and
// one-port server as `node src/main.ts`, listening on 127.0.0.1 port 0.
//
//   const node = await startNode();                 // memory stores
//   const node = await startNode({ stores: 'disk' }); // disk stores in a temp dir
//   t.teardown(node.close);
//   const client = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: node.url }));
//   await fetch(`${node.url}/build.bazel.remote.execution.v2.Capabilities/GetCapabilities`, ...);
//
// `node.url` serves gRPC over HTTP/2 cleartext and Connect/JSON over HTTP/1.1.
// For a separate process (crash tests, real Bazel) use spawn-node.ts instead.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Interceptor } from '@connectrpc/connect';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import type { Logger } from 'pino';
import type { AuthConfig, LimitsConfig, LogLevel, ServerTlsConfig, StoreConfig } from '../../src/config.ts';
import { DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES } from '../../src/config.ts';
import { buildApp } from '../../src/server/app.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { buildStores, closeStores } from '../../src/stores/factory.ts';
import type { StoreTrees } from '../../src/stores/factory.ts';

const MiB = 1024 * 1024;

export interface StartNodeOptions {
  /**
   * Store trees shaped like the default config.json (a CAS, and an AC with
   * completenessChecking over a leaf store): 'memory' (the default) or
   * 'disk' (in a fresh temp dir, removed by close()).
   */
  readonly stores?: 'memory' | 'disk';
  /** Replaces the CAS tree config (disk paths resolve against the temp dir). */
  readonly cas?: StoreConfig;
  /** Replaces the AC tree config, e.g. `{kind: 'memory', maxSizeBytes}` for no completeness check. */
  readonly ac?: StoreConfig;
  /** Ready-made store trees (e.g. fault-injecting ones); close() closes them too. */
  readonly trees?: Pick<StoreTrees, 'cas' | 'ac'>;
  readonly maxBatchTotalSizeBytes?: number;
  /** How long close() lets in-flight RPCs run. Default 2 s (tests should not wait 10). */
  readonly shutdownTimeoutMs?: number;
  /** Default 'silent'; set REAPI_TEST_LOG=debug to see the node's log on stderr. */
  readonly logLevel?: LogLevel;
  /** Authentication and authorization (absent: everyone may do everything). */
  readonly auth?: AuthConfig;
  /** A logger of the test's own (e.g. to read the log lines); replaces logLevel. */
  readonly logger?: Logger;
  /** Outer interceptors, as main.ts passes metricsInterceptor. */
  readonly interceptors?: readonly Interceptor[];
  /** TLS on the port (url is then https://); see test/helpers/certs.ts. */
  readonly tls?: ServerTlsConfig;
  /** Connection and input limits (default DEFAULT_LIMITS). */
  readonly limits?: LimitsConfig;
}

export interface RunningNode {
  /** http://127.0.0.1:PORT (https:// with tls): gRPC (HTTP/2) and Connect/JSON (HTTP/1.1) on one port. */
  readonly url: string;
  readonly port: number;
  readonly cas: BlobStore;
  readonly ac: BlobStore;
  readonly app: FastifyInstance;
  readonly logger: Logger;
  /** Directory of the disk stores, if any. */
  readonly dir: string | undefined;
  /** Flips what grpc.health.v1 reports (SERVING/NOT_SERVING). */
  setReady(ready: boolean): void;
  /** Closes the server gracefully, then the stores; removes the temp dir. Idempotent. */
  close(): Promise<void>;
}

export async function startNode(opts: StartNodeOptions = {}): Promise<RunningNode> {
  const level = opts.logLevel ?? ((process.env.REAPI_TEST_LOG as LogLevel | undefined) || 'silent');
  const logger = opts.logger ?? pino({ level }, pino.destination(2));
  const kind = opts.stores ?? 'memory';
  const needsDir = opts.trees === undefined && (kind === 'disk' || hasDisk(opts.cas) || hasDisk(opts.ac));
  const dir = needsDir ? await mkdtemp(join(tmpdir(), 'reapi-node-')) : undefined;
  const leaf = (name: string, maxSizeBytes: number): StoreConfig =>
    kind === 'disk' ? { kind: 'disk', path: join(dir!, name), maxSizeBytes } : { kind: 'memory', maxSizeBytes };
  const trees =
    opts.trees ??
    (await buildStores(
      {
        cas: opts.cas ? inDir(opts.cas, dir) : leaf('cas', 1024 * MiB),
        ac: opts.ac ? inDir(opts.ac, dir) : { kind: 'completenessChecking', backend: leaf('ac', 64 * MiB) },
      },
      { logger },
    ));

  let ready = true;
  const app = await buildApp({
    deps: {
      cas: trees.cas,
      ac: trees.ac,
      logger,
      maxBatchTotalSizeBytes: opts.maxBatchTotalSizeBytes ?? DEFAULT_MAX_BATCH_TOTAL_SIZE_BYTES,
      isReady: () => ready,
    },
    logger,
    shutdownTimeoutMs: opts.shutdownTimeoutMs ?? 2000,
    auth: opts.auth,
    interceptors: opts.interceptors,
    tls: opts.tls,
    limits: opts.limits,
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const address = app.server.address();
  if (address === null || typeof address !== 'object') throw new Error('node is not listening on a TCP port');

  let closing: Promise<void> | undefined;
  return {
    url: `${opts.tls === undefined ? 'http' : 'https'}://127.0.0.1:${address.port}`,
    port: address.port,
    cas: trees.cas,
    ac: trees.ac,
    app,
    logger,
    dir,
    setReady(value) {
      ready = value;
    },
    close() {
      closing ??= (async () => {
        try {
          await app.close();
        } finally {
          await closeStores(trees);
          if (dir !== undefined) await rm(dir, { recursive: true, force: true });
        }
      })();
      return closing;
    },
  };
}

/** Resolves relative disk paths against the temp dir. */
function inDir(config: StoreConfig, dir: string | undefined): StoreConfig {
  if (config.kind === 'disk') return { ...config, path: resolve(dir ?? '.', config.path) };
  if (config.kind === 'completenessChecking') return { ...config, backend: inDir(config.backend, dir) };
  return config;
}

function hasDisk(config: StoreConfig | undefined): boolean {
  if (config === undefined) return false;
  if (config.kind === 'disk') return true;
  if (config.kind === 'completenessChecking') return hasDisk(config.backend);
  return false;
}
