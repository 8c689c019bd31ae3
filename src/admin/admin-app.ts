import { createHash, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import { Code, ConnectError } from '@connectrpc/connect';
import fastify, { LogController } from 'fastify';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import type { ListenAddress } from '../config.ts';
import { degradedReasons } from '../readiness.ts';
import type { ChildState } from '../supervisor.ts';
import {
  PAGE_CSP,
  SECURITY_HEADERS,
  bodyProblem,
  crossOriginProblem,
  defaultAllowedHosts,
  formatHost,
  hostAllowed,
  parseAllowedHosts,
  type HostPattern,
} from './admin-guard.ts';
import { createMetricsRegistry, registerTreeMetrics } from './metrics.ts';
import type { DrainFn } from './shard-control.ts';
import { StateWatcher } from './state-watcher.ts';
import { TREE_NAMES, type TreeDescriptions, type TreeName } from './tree.ts';

export interface AdminAppOptions {
  /** Both store trees as their roots describe them right now. Cheap and synchronous. */
  readonly describe: () => TreeDescriptions;
  /** Supervised storage-node processes (Supervisor.states()); none when absent. */
  readonly processes?: (() => readonly ChildState[]) | undefined;
  /** Drives /readyz. */
  readonly isReady: () => boolean;
  /** Why the process is not ready, for /readyz. Default "not ready". */
  readonly notReadyReason?: (() => string) | undefined;
  /** Drains or undrains a shard (see shardControl). Absent: every shard is unknown. */
  readonly drain?: DrainFn | undefined;
  /**
   * Bearer token that authorizes drain and undrain. Unset or empty: those
   * are refused with 403, everything else still works.
   */
  readonly token?: string | undefined;
  /**
   * Host header values answered (see admin-guard.ts); others get 421, except
   * on /healthz and /readyz. Default: defaultAllowedHosts() of `listen`.
   */
  readonly allowedHosts?: readonly string[] | undefined;
  /**
   * The configured listen address, for the default allowedHosts (a name such
   * as "localhost" is kept as written; port 0 becomes the bound port).
   * Default: the address the app is bound to.
   */
  readonly listen?: ListenAddress | undefined;
  /** Where /metrics reads from; share it with metricsInterceptor and MetricsStore. Default: a fresh one. */
  readonly registry?: Registry | undefined;
  /**
   * Subscribes to "something changed" (e.g. breaker transitions), so the page
   * is pushed at once instead of on its next tick. May return an unsubscribe.
   */
  readonly onChange?: ((listener: () => void) => (() => void) | void) | undefined;
  /** Shown on the page and in reapi_edge_build_info. Default: package.json's version. */
  readonly version?: string | undefined;
  readonly logger?: Logger | undefined;
  /** How often /api/events pushes the state. Default 1000 ms. */
  readonly eventIntervalMs?: number | undefined;
  /** How often breaker states are compared for transitions. Default 250 ms; 0 disables. */
  readonly watchIntervalMs?: number | undefined;
}

/** An operator's drain or undrain, kept (the last 20) for the page. */
interface Action {
  readonly at: number;
  readonly tree: TreeName;
  readonly shard: string;
  readonly action: 'drain' | 'undrain';
  readonly stores: number;
  readonly peer: string;
}

/** What GET /api/state returns and /api/events pushes. */
export interface AdminState {
  readonly version: string;
  /** Server clock (ms since the epoch), so the page can show "since" without trusting its own. */
  readonly now: number;
  readonly ready: boolean;
  /**
   * Ready, but with less redundancy than configured: one line per fallback
   * pair running on one copy ("cas/fallback: secondary is down: ..."). Empty
   * when nothing is degraded.
   */
  readonly degraded: readonly string[];
  readonly tokenConfigured: boolean;
  readonly trees: TreeDescriptions;
  readonly processes: readonly ChildState[];
  readonly actions: readonly Action[];
}

const PAGE_DIR = new URL('./page/', import.meta.url);
const PAGE_FILES: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/style.css': { file: 'style.css', type: 'text/css; charset=utf-8' },
};

/**
 * Probes answer whatever the Host: Kubernetes sends the pod IP, a load
 * balancer its own idea. They reveal only "ready or not" and a fixed reason.
 */
const PROBE_ROUTES = new Set(['/healthz', '/readyz']);

/** Methods that change nothing; every other one gets the cross-origin checks. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** Refused Host values are logged once each, up to this many. */
const MAX_LOGGED_HOSTS = 32;

/**
 * Builds (but does not start) the admin and operations app: a plain
 * HTTP/1.1 fastify instance, separate from the gRPC port, meant for a
 * loopback address. main.ts calls listen() and close().
 *
 * - GET /              the admin page (three static files, see page/)
 * - GET /api/state     JSON: both store trees, processes, readiness, version
 * - GET /api/events    the same state as server-sent events, every
 *                      `eventIntervalMs` and at once on a breaker transition
 * - POST /api/shards/:tree/:name/drain | /undrain
 *                      needs `Authorization: Bearer <token>`
 * - GET /metrics       Prometheus text from `registry`
 * - GET /healthz       200 while the process runs
 * - GET /readyz        200 when isReady(), else 503 with the reason
 *
 * Browser-facing defences (admin-guard.ts): every request but the two probes
 * must name an allowed Host (else 421, which defeats DNS rebinding); a
 * state-changing request is refused when its Origin or Sec-Fetch-Site says it
 * comes from another origin, and its body must be JSON; every response
 * carries the security headers. Reads (page, state, events, metrics) need no
 * token: they are same-origin only (no CORS), Host-checked, and the page's
 * EventSource could not send one; the listen address decides who can reach
 * them at all.
 *
 * The page is served from memory by a route per file rather than with
 * @fastify/static: three files known at build time need no path handling
 * (so no traversal to guard against) and no extra dependency.
 *
 * On close, event streams are ended (so close() does not wait on them) and
 * the transition watcher stops. The stores are not touched.
 */
export async function buildAdminApp(opts: AdminAppOptions): Promise<FastifyInstance> {
  const registry = opts.registry ?? createMetricsRegistry();
  const version = opts.version ?? (await packageVersion());
  const tokenDigest = opts.token ? sha256(opts.token) : undefined;
  const eventIntervalMs = Math.max(50, opts.eventIntervalMs ?? 1000);
  const log = opts.logger?.child({ component: 'admin' });
  const actions: Action[] = [];
  const explicitHosts = opts.allowedHosts === undefined ? undefined : parseAllowedHosts(opts.allowedHosts);

  const pages = new Map<string, { body: Buffer; type: string }>();
  for (const [route, { file, type }] of Object.entries(PAGE_FILES)) {
    pages.set(route, { body: await readFile(new URL(file, PAGE_DIR)), type });
  }

  const state = (): AdminState => {
    const trees = opts.describe();
    return {
      version,
      now: Date.now(),
      ready: opts.isReady(),
      degraded: degradedOf(trees),
      tokenConfigured: tokenDigest !== undefined,
      trees,
      processes: opts.processes?.() ?? [],
      actions,
    };
  };

  const metrics = registerTreeMetrics(registry, {
    describe: opts.describe,
    processes: opts.processes,
    isReady: opts.isReady,
    version,
  });

  // ---- server-sent events: one ticker shared by every open stream --------
  const streams = new Set<ServerResponse>();
  let ticker: NodeJS.Timeout | undefined;
  let pushSoon: NodeJS.Timeout | undefined;
  let closed = false;
  const push = (): void => {
    if (streams.size === 0) return;
    let frame: string;
    try {
      frame = `event: state\ndata: ${JSON.stringify(state())}\n\n`;
    } catch (err) {
      log?.warn({ err }, 'admin: could not describe the store trees');
      return;
    }
    for (const res of streams) res.write(frame);
  };
  // Bursts of changes (three shards opening at once) make one push.
  const changed = (): void => {
    if (closed || pushSoon !== undefined) return;
    pushSoon = setTimeout(() => {
      pushSoon = undefined;
      push();
    }, 20);
  };
  const endStream = (res: ServerResponse): void => {
    streams.delete(res);
    if (!res.writableEnded) res.end();
    if (streams.size === 0) {
      clearInterval(ticker);
      ticker = undefined;
    }
  };

  const watcher = new StateWatcher(opts.describe, opts.watchIntervalMs ?? 250);
  watcher.on('transition', (t) => {
    metrics.recordTransition(t);
    log?.debug({ ...t }, 'admin: breaker transition');
  });
  watcher.on('change', changed);
  const unsubscribe = opts.onChange?.(() => {
    watcher.poll();
    changed();
  });

  const app = fastify({
    ...(log === undefined ? { logger: false } : { loggerInstance: log }),
    logController: new LogController({ disableRequestLogging: true }),
    // An SSE stream is never idle; we end those ourselves in preClose.
    forceCloseConnections: 'idle',
    // No route takes more than a few bytes of body.
    bodyLimit: 16 * 1024,
  }) as unknown as FastifyInstance;

  // ---- Host check, cross-origin writes, security headers -----------------
  let defaults: { key: string; hosts: HostPattern[] } | undefined;
  const allowedHosts = (): readonly HostPattern[] => {
    if (explicitHosts !== undefined) return explicitHosts;
    const bound = app.server.address();
    const boundAt = typeof bound === 'object' && bound !== null ? bound : undefined;
    const host = opts.listen?.host ?? boundAt?.address ?? '127.0.0.1';
    // Not listening (inject() in tests) and no configured port: any port.
    const port = boundAt?.port ?? (opts.listen?.port || undefined);
    const key = `${host} ${port}`;
    if (defaults?.key !== key) defaults = { key, hosts: defaultAllowedHosts(host, port) };
    return defaults.hosts;
  };
  const loggedHosts = new Set<string>();
  app.addHook('onListen', (done) => {
    log?.debug({ allowedHosts: allowedHosts().map(formatHost) }, 'admin: Host header values answered');
    done();
  });
  app.addHook('onRequest', async (req, reply) => {
    const host = req.headers.host;
    if (!PROBE_ROUTES.has(req.routeOptions.url ?? '') && !hostAllowed(host, allowedHosts())) {
      const shown = JSON.stringify((host ?? '').slice(0, 100));
      if (loggedHosts.size < MAX_LOGGED_HOSTS && !loggedHosts.has(shown)) {
        loggedHosts.add(shown);
        log?.warn(
          { host: shown, peer: req.ip, allowedHosts: allowedHosts().map(formatHost) },
          'admin: refused a request for a Host not in admin.allowedHosts (DNS rebinding, or a name to add to the list); logged once per Host',
        );
      }
      return reply
        .code(421)
        .type('text/plain; charset=utf-8')
        .send(`421 Misdirected Request: this admin server does not answer to Host ${shown} (see admin.allowedHosts)\n`);
    }
    if (SAFE_METHODS.has(req.method)) return;
    const problem = crossOriginProblem(req.headers, host);
    if (problem !== undefined) return reply.code(403).send({ error: problem });
    const bad = bodyProblem(req.headers);
    if (bad !== undefined) return reply.code(415).send({ error: bad });
  });
  app.addHook('onSend', async (_req, reply) => {
    for (const [name, value] of Object.entries(SECURITY_HEADERS)) {
      if (!reply.hasHeader(name)) void reply.header(name, value);
    }
  });

  app.addHook('preClose', (done) => {
    closed = true;
    clearTimeout(pushSoon);
    for (const res of [...streams]) endStream(res);
    done();
  });
  app.addHook('onClose', (_app, done) => {
    watcher.close();
    if (typeof unsubscribe === 'function') unsubscribe();
    done();
  });

  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({ error: `no such endpoint: ${req.method} ${req.url}` });
  });
  app.setErrorHandler((err: { statusCode?: number; message?: string }, req, reply) => {
    const status = typeof err.statusCode === 'number' && err.statusCode >= 400 ? err.statusCode : 500;
    if (status >= 500) req.log.error({ err }, 'admin request failed');
    void reply.code(status).send({ error: status >= 500 ? 'internal error' : (err.message ?? 'bad request') });
  });

  for (const [route, page] of pages) {
    app.get(route, (_req, reply) => reply.header('content-security-policy', PAGE_CSP).type(page.type).send(page.body));
  }

  app.get('/api/state', (_req, reply) => reply.send(state()));

  app.get('/api/events', (req, reply) => {
    reply.hijack();
    const res = reply.raw;
    if (closed) {
      res.writeHead(503, { ...SECURITY_HEADERS, 'content-type': 'application/json' }).end('{"error":"shutting down"}');
      return;
    }
    // Hijacked: fastify's onSend hook does not run, so the headers go here.
    res.writeHead(200, {
      ...SECURITY_HEADERS,
      'content-type': 'text/event-stream; charset=utf-8',
      connection: 'keep-alive',
      'x-accel-buffering': 'no', // a proxy in front must not buffer the stream
    });
    res.write('retry: 2000\n\n');
    streams.add(res);
    req.raw.socket.setNoDelay(true);
    res.on('close', () => endStream(res));
    ticker ??= setInterval(push, eventIntervalMs);
    try {
      res.write(`event: state\ndata: ${JSON.stringify(state())}\n\n`);
    } catch (err) {
      log?.warn({ err }, 'admin: could not describe the store trees');
    }
  });

  for (const action of ['drain', 'undrain'] as const) {
    app.post<{ Params: { tree: string; name: string } }>(`/api/shards/:tree/:name/${action}`, async (req, reply) => {
      if (tokenDigest === undefined) {
        return reply.code(403).send({ error: 'admin token not configured: drain and undrain are disabled' });
      }
      const denied = checkBearer(req, tokenDigest);
      if (denied !== undefined) {
        return reply.code(401).header('www-authenticate', 'Bearer realm="reapi-edge admin"').send({ error: denied });
      }
      const { tree, name } = req.params;
      if (!isTreeName(tree)) {
        return reply.code(404).send({ error: `unknown tree "${tree}": expected cas or ac` });
      }
      let stores = 0;
      try {
        stores = (await opts.drain?.(tree, name, action === 'drain')) ?? 0;
      } catch (err) {
        if (!(err instanceof ConnectError && err.code === Code.NotFound)) throw err;
      }
      if (stores === 0) {
        return reply.code(404).send({ error: `no shard named "${name}" in the ${tree} tree` });
      }
      const peer = req.ip;
      actions.unshift({ at: Date.now(), tree, shard: name, action, stores, peer });
      actions.length = Math.min(actions.length, 20);
      log?.info({ tree, shard: name, stores, peer }, `admin: shard ${name} ${action}ed by operator`);
      watcher.poll();
      changed();
      return reply.send({ ok: true, tree, shard: name, action, stores });
    });
  }

  app.get('/metrics', async (_req, reply) => {
    const text = await registry.metrics();
    return reply.type(registry.contentType).send(text);
  });

  app.get('/healthz', (_req, reply) => reply.send({ ok: true }));

  app.get('/readyz', (_req, reply) => {
    if (opts.isReady()) {
      // Still 200, so traffic keeps flowing; a fallback pair on one copy says so.
      let degraded: string[] = [];
      try {
        degraded = degradedOf(opts.describe());
      } catch {
        // a tree being closed: readiness alone answers
      }
      return reply.send(degraded.length === 0 ? { ready: true } : { ready: true, degraded: true, reasons: degraded });
    }
    return reply.code(503).send({ ready: false, reason: opts.notReadyReason?.() ?? 'not ready' });
  });

  return app;
}

/** degradedReasons() of both trees, each line prefixed with its tree's name. */
function degradedOf(trees: TreeDescriptions): string[] {
  return TREE_NAMES.flatMap((tree) => degradedReasons(trees[tree]).map((r) => `${tree}: ${r}`));
}

function isTreeName(s: string): s is TreeName {
  return (TREE_NAMES as readonly string[]).includes(s);
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

/** undefined when the request carries the right bearer token, else why not. */
function checkBearer(req: FastifyRequest, tokenDigest: Buffer): string | undefined {
  const header = req.headers.authorization;
  if (header === undefined || header === '') return 'missing bearer token: send "Authorization: Bearer <admin token>"';
  const m = /^Bearer\s+(\S(?:.*\S)?)\s*$/i.exec(header);
  if (m === null) return 'malformed Authorization header: expected "Bearer <admin token>"';
  // Hashing first gives equal lengths, which timingSafeEqual needs, and
  // leaks nothing about the token's length.
  if (!timingSafeEqual(sha256(m[1]!), tokenDigest)) return 'wrong bearer token';
  return undefined;
}

async function packageVersion(): Promise<string> {
  try {
    const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : 'unknown';
  } catch {
    return 'unknown';
  }
}

