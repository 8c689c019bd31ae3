// The process: `node src/main.ts [config.json] [--child NAME]`.
//
// One process type, several roles by config: a storage node (disk stores
// served over REAPI), an edge (a routing tree over remote shards), or both.
// A config with `children` also starts and supervises those storage-node
// processes (the local cluster); each child runs this same file with
// `--child NAME` and reads its own section of the same config file.
//
// Loads and validates the config (exit 2 with the field path on error),
// opens the store trees, serves REAPI on the configured address (gRPC over
// HTTP/2 and Connect/JSON over HTTP/1.1 on the same port, cleartext or TLS),
// on SIGHUP re-reads the TLS certificate, key and client CA, and on
// SIGTERM/SIGINT shuts down gracefully: the server first (in-flight RPCs
// may finish), then the stores. Exit 0 after a clean shutdown, 1 on failure.
import { pino } from 'pino';
import type { Logger } from 'pino';
import { ConfigError, formatAddress, loadConfig } from './config.ts';
import type { NodeConfig } from './config.ts';
import { buildAdminApp } from './admin/admin-app.ts';
import { parseAllowedHosts } from './admin/admin-guard.ts';
import { adminTokenWarnings, resolveAdminToken, type ResolvedAdminToken } from './admin/admin-token.ts';
import { createMetricsRegistry, metricsInterceptor, registerConnectionMetrics } from './admin/metrics.ts';
import { V8_FLAGS } from './runtime-flags.ts';
import { shardControl } from './admin/shard-control.ts';
import { canServe } from './readiness.ts';
import { logMixin } from './request-context.ts';
import { buildApp } from './server/app.ts';
import type { OnePortServer } from './server/listen.ts';
import { loadTlsMaterial } from './server/tls.ts';
import { buildStores, closeStores } from './stores/factory.ts';
import { Supervisor } from './supervisor.ts';
import type { StoreTrees } from './stores/factory.ts';

/** A second signal during shutdown exits at once; this bounds the first. */
const SHUTDOWN_LIMIT_MS = 30_000;

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  const childAt = args.indexOf('--child');
  const childName = childAt >= 0 ? args[childAt + 1] : undefined;
  if (childAt >= 0) args.splice(childAt, 2);
  if (childAt >= 0 && childName === undefined) {
    process.stderr.write('reapi-edge: --child needs a name\n');
    return 2;
  }
  const file = args[0] ?? 'config.json';
  let config: NodeConfig;
  /** How config errors name this process's section. */
  const nodeField = childName === undefined ? 'config' : `config.children.${childName}`;
  const adminPath = `${nodeField}.admin`;
  let adminToken: ResolvedAdminToken | undefined;
  try {
    const top = await loadConfig(file);
    if (childName === undefined) {
      config = top;
    } else {
      const child = top.children.find((c) => c.name === childName);
      if (child === undefined) throw new ConfigError(`config.children.${childName}: no such child`);
      config = child.config;
    }
    // The TLS files are read and checked now, so a bad one is a config error too.
    if (config.tls !== undefined) await loadTlsMaterial(config.tls, `${nodeField}.tls`);
    // The admin token's file or variable is read now, so a bad one is a config error too.
    if (config.admin !== undefined) {
      adminToken = await resolveAdminToken(config.admin, { path: adminPath });
      if (config.admin.allowedHosts !== undefined) parseAllowedHosts(config.admin.allowedHosts, `${adminPath}.allowedHosts`);
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`reapi-edge: bad config: ${err.message}\n`);
      return 2;
    }
    throw err;
  }

  const logger = pino({ level: config.logLevel, mixin: logMixin, base: { pid: process.pid, role: childName ?? 'main' } });
  // SIGHUP re-reads the TLS files once the server exists; it must never
  // terminate the process (its default action).
  let onHangup = (): void => logger.info('SIGHUP received while starting: nothing to reload yet');
  process.on('SIGHUP', () => onHangup());
  process.on('unhandledRejection', (err) => logger.error({ err }, 'unhandled promise rejection'));
  process.on('uncaughtException', (err) => {
    logger.fatal({ err }, 'uncaught exception');
    process.exit(1);
  });

  const missingFlags = V8_FLAGS.filter((f) => !process.execArgv.includes(f));
  if (missingFlags.length > 0) {
    logger.warn({ missing: missingFlags }, 'started without the recommended V8 flags: streaming costs more CPU (see src/runtime-flags.ts)');
  }
  for (const warning of adminToken === undefined ? [] : adminTokenWarnings(adminToken, adminPath)) logger.warn(warning);

  const registry = createMetricsRegistry();

  // Children first, so the shards are coming up while the edge opens its
  // stores; the edge's health checks take them in as they answer.
  let supervisor: Supervisor | undefined;
  if (config.children.length > 0) {
    supervisor = new Supervisor({
      configPath: file,
      children: config.children.map((c) => ({ name: c.name, restart: c.restart, address: c.config.listen })),
      logger,
    });
    supervisor.start();
    if (!(await supervisor.waitUntilListening(15_000))) {
      logger.warn('some storage node processes are not listening yet; starting the edge anyway');
    }
  }

  let stores: StoreTrees;
  try {
    stores = await buildStores(config, { logger, registry, field: nodeField, limits: config.limits });
  } catch (err) {
    logger.fatal({ err }, 'could not open the stores');
    await supervisor?.stop();
    return 1;
  }

  // Ready once listening, while not shutting down, and while both trees have
  // something behind them that can serve.
  let listening = false;
  const ready = () => listening && canServe(stores.cas.describe()) && canServe(stores.ac.describe());
  const app = await buildApp({
    deps: {
      cas: stores.cas,
      ac: stores.ac,
      logger,
      maxBatchTotalSizeBytes: config.maxBatchTotalSizeBytes,
      isReady: ready,
      limits: config.limits,
      instances: config.instances,
    },
    logger,
    limits: config.limits,
    tls: config.tls,
    auth: config.auth,
    interceptors: [metricsInterceptor(registry)],
  });

  // The admin surface: page, JSON API, /metrics, /healthz, /readyz. Only
  // where configured; it listens on its own (loopback by default) address.
  const admin =
    config.admin === undefined
      ? undefined
      : await buildAdminApp({
          describe: () => ({ cas: stores.cas.describe(), ac: stores.ac.describe() }),
          processes: supervisor === undefined ? undefined : () => supervisor.states(),
          isReady: ready,
          notReadyReason: () =>
            listening ? 'no shard of a store tree is taking traffic' : 'starting or shutting down',
          drain: shardControl(stores.sharding),
          token: adminToken?.token,
          allowedHosts: config.admin.allowedHosts,
          listen: config.admin.listen,
          registry,
          logger,
        });

  try {
    await app.listen({ host: config.listen.host, port: config.listen.port });
    if (admin !== undefined && config.admin !== undefined) {
      await admin.listen({ host: config.admin.listen.host, port: config.admin.listen.port });
      // The bound port, so that port 0 (tests) is logged as the port taken.
      const adminBound = admin.server.address();
      const adminAt = formatAddress({
        host: config.admin.listen.host,
        port: typeof adminBound === 'object' && adminBound !== null ? adminBound.port : config.admin.listen.port,
      });
      logger.info({ admin: adminAt }, `admin page, /metrics, /healthz and /readyz on http://${adminAt}`);
    }
  } catch (err) {
    logger.fatal({ err, listen: formatAddress(config.listen) }, 'could not listen');
    await app.close().catch(() => undefined);
    await admin?.close().catch(() => undefined);
    await closeStores(stores).catch((e: unknown) => logger.error({ err: e }, 'closing stores failed'));
    await supervisor?.stop();
    return 1;
  }
  listening = true;
  registerConnectionMetrics(registry, app.server as unknown as OnePortServer);
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : config.listen.port;
  const bound = formatAddress({ host: config.listen.host, port });
  logger.info(
    { listen: bound, port, cas: stores.cas.describe(), ac: stores.ac.describe() },
    config.tls === undefined
      ? `serving REAPI on ${bound}: gRPC over h2c (grpc://${bound}) and Connect/JSON over HTTP/1.1 (http://${bound})`
      : `serving REAPI on ${bound} over TLS${config.tls.clientCaFile === undefined ? '' : ` (client certificates: ${config.tls.clientCert})`}: gRPC (grpcs://${bound}) and Connect/JSON (https://${bound})`,
  );
  onHangup = () => {
    if (config.tls === undefined) {
      logger.info('SIGHUP: no TLS configured, nothing to reload');
      return;
    }
    logger.info('SIGHUP: reloading the TLS certificate, key and client CA');
    void (app.server as unknown as OnePortServer).reloadTls('SIGHUP');
  };

  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  listening = false;
  return shutdown([app, ...(admin === undefined ? [] : [admin])], stores, supervisor, logger, signal);
}

async function shutdown(
  servers: readonly { close(): Promise<unknown> }[],
  stores: StoreTrees,
  supervisor: Supervisor | undefined,
  logger: Logger,
  signal: NodeJS.Signals,
): Promise<number> {
  logger.info({ signal }, 'shutting down');
  const again = () => {
    logger.warn('second signal: exiting without waiting');
    process.exit(1);
  };
  process.once('SIGTERM', again);
  process.once('SIGINT', again);
  setTimeout(() => {
    logger.error(`shutdown took longer than ${SHUTDOWN_LIMIT_MS} ms; exiting`);
    process.exit(1);
  }, SHUTDOWN_LIMIT_MS).unref();

  let code = 0;
  for (const result of await Promise.allSettled(servers.map((s) => s.close()))) {
    if (result.status === 'rejected') {
      logger.error({ err: result.reason }, 'closing a server failed');
      code = 1;
    }
  }
  try {
    await closeStores(stores);
  } catch (err) {
    logger.error({ err }, 'closing the stores failed');
    code = 1;
  }
  await supervisor?.stop();
  logger.info('stopped');
  return code;
}

main().then(
  (code) => {
    // Exit explicitly: a stray timer or socket must not keep a stopped node alive.
    process.exit(code);
  },
  (err: unknown) => {
    process.stderr.write(`reapi-edge: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  },
);
