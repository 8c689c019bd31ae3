import { Code, ConnectError, type Interceptor } from '@connectrpc/connect';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { OnePortServer } from '../server/listen.ts';
import type { StoreDescription } from '../stores/blob-store.ts';
import { LATENCY_BUCKETS, grpcCodeName } from '../stores/metrics-store.ts';
import type { ChildState } from '../supervisor.ts';
import type { ObservedTransition } from './state-watcher.ts';
import { TREE_NAMES, num, rec, shardsOf, walkTree, type ShardView, type TreeDescriptions, type TreeName } from './tree.ts';

/**
 * A fresh registry (never prom-client's global one, so tests and several
 * apps in one process do not collide) with Node's process metrics
 * (process_cpu_seconds_total, nodejs_eventloop_lag_seconds, ...), which keep
 * their conventional unprefixed names so stock dashboards work.
 */
export function createMetricsRegistry(opts: { readonly defaultMetrics?: boolean } = {}): Registry {
  const registry = new Registry();
  if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: registry });
  return registry;
}

// ---- RPCs ------------------------------------------------------------------

type RpcLabel = 'service' | 'method';

interface RpcFamilies {
  readonly requests: Counter<RpcLabel | 'code'>;
  readonly duration: Histogram<RpcLabel | 'code'>;
  readonly inFlight: Gauge<RpcLabel>;
  readonly received: Counter<RpcLabel>;
  readonly sent: Counter<RpcLabel>;
}

const rpcFamilies = new WeakMap<Registry, RpcFamilies>();

function rpcFamiliesFor(registry: Registry): RpcFamilies {
  let f = rpcFamilies.get(registry);
  if (f === undefined) {
    const registers = [registry];
    f = {
      requests: new Counter({
        name: 'reapi_edge_rpc_requests_total',
        help: 'Finished RPCs by service, method and gRPC code (a client that went away counts as CANCELLED).',
        labelNames: ['service', 'method', 'code'],
        registers,
      }),
      duration: new Histogram({
        name: 'reapi_edge_rpc_duration_seconds',
        help: 'RPC latency, until the last response message was sent.',
        labelNames: ['service', 'method', 'code'],
        buckets: [...LATENCY_BUCKETS],
        registers,
      }),
      inFlight: new Gauge({
        name: 'reapi_edge_rpc_in_flight',
        help: 'RPCs being served.',
        labelNames: ['service', 'method'],
        registers,
      }),
      received: new Counter({
        name: 'reapi_edge_rpc_received_bytes_total',
        help: 'Blob bytes received in requests (ByteStream Write data, BatchUpdateBlobs data).',
        labelNames: ['service', 'method'],
        registers,
      }),
      sent: new Counter({
        name: 'reapi_edge_rpc_sent_bytes_total',
        help: 'Blob bytes sent in responses (ByteStream Read data, BatchReadBlobs data).',
        labelNames: ['service', 'method'],
        registers,
      }),
    };
    rpcFamilies.set(registry, f);
  }
  return f;
}

const CLIENT_CANCELLED = new ConnectError('client cancelled', Code.Canceled);

/** Something that can count an RPC no interceptor saw. */
export interface EarlyFailureRecorder {
  /**
   * Counts an RPC that ended before any interceptor ran: a unary request
   * that never arrived whole (the client cancelled it, or it broke a limit)
   * or did not parse. The server calls it (app.ts, watchEarlyErrors).
   */
  recordEarlyFailure(service: string, method: string, err: unknown, seconds: number): void;
}

/** True for an interceptor that also counts early failures (metricsInterceptor's). */
export function isEarlyFailureRecorder(value: unknown): value is EarlyFailureRecorder {
  return typeof (value as Partial<EarlyFailureRecorder> | undefined)?.recordEarlyFailure === 'function';
}

/**
 * A Connect interceptor recording every RPC: count and latency by method and
 * gRPC code, RPCs in flight, and blob bytes in and out, counted message by
 * message as streams flow. Put it FIRST in the plugin's `interceptors` (the
 * outermost), so it sees the codes clients see after other interceptors
 * mapped errors. RPCs that fail before any interceptor runs (a unary
 * request that never arrives whole, or does not parse) are counted through
 * its recordEarlyFailure(), which the server calls.
 */
export function metricsInterceptor(registry: Registry): Interceptor & EarlyFailureRecorder {
  const f = rpcFamiliesFor(registry);
  const interceptor: Interceptor = (next) => async (req) => {
    const labels = { service: req.service.typeName, method: req.method.name };
    const received = f.received.labels(labels);
    const sent = f.sent.labels(labels);
    const start = performance.now();
    f.inFlight.inc(labels);
    let finished = false;
    const finish = (err: unknown): void => {
      if (finished) return;
      finished = true;
      f.inFlight.dec(labels);
      const withCode = { ...labels, code: grpcCodeName(err) };
      f.requests.inc(withCode);
      f.duration.observe(withCode, (performance.now() - start) / 1000);
    };

    if (req.stream) {
      const input = req.message;
      req = {
        ...req,
        message: (async function* () {
          for await (const m of input) {
            received.inc(payloadBytes(m));
            yield m;
          }
        })(),
      };
    } else {
      received.inc(payloadBytes(req.message));
    }

    let res;
    try {
      res = await next(req);
    } catch (err) {
      finish(err);
      throw err;
    }
    if (!res.stream) {
      sent.inc(payloadBytes(res.message));
      finish(undefined);
      return res;
    }
    const output = res.message;
    return {
      ...res,
      message: (async function* () {
        let ok = false;
        // True while a message is with the transport: an error thrown in
        // then is the transport's (the client reset the stream, or its
        // connection broke), not the handler's, so the client cancelled.
        let delivering = false;
        try {
          for await (const m of output) {
            sent.inc(payloadBytes(m));
            delivering = true;
            yield m;
            delivering = false;
          }
          ok = true;
        } catch (err) {
          finish(delivering ? CLIENT_CANCELLED : err);
          throw err;
        } finally {
          finish(ok ? undefined : CLIENT_CANCELLED);
        }
      })(),
    };
  };
  return Object.assign(interceptor, {
    recordEarlyFailure(service: string, method: string, err: unknown, seconds: number) {
      const labels = { service, method, code: grpcCodeName(err) };
      f.requests.inc(labels);
      f.duration.observe(labels, seconds);
    },
  });
}

/** Blob bytes carried by a REAPI message: `data`, or the `data` of batch entries. */
function payloadBytes(message: unknown): number {
  if (typeof message !== 'object' || message === null) return 0;
  const m = message as Record<string, unknown>;
  if (m.data instanceof Uint8Array) return m.data.byteLength;
  let n = 0;
  for (const list of [m.requests, m.responses]) {
    if (!Array.isArray(list)) continue;
    for (const entry of list) {
      const data = (entry as { data?: unknown } | null)?.data;
      if (data instanceof Uint8Array) n += data.byteLength;
    }
  }
  return n;
}

// ---- store trees, processes, readiness -----------------------------------

export interface TreeMetricsSource {
  readonly describe: () => TreeDescriptions;
  readonly processes?: (() => readonly ChildState[]) | undefined;
  readonly isReady?: (() => boolean) | undefined;
  readonly version?: string | undefined;
}

export interface TreeMetrics {
  /** Counts a breaker transition (reapi_edge_breaker_transitions_total). */
  recordTransition(t: ObservedTransition): void;
}

type Labels = Record<string, string>;
type Sample = readonly [Labels, number];

interface Located {
  readonly tree: TreeName;
  readonly store: string;
  readonly node: StoreDescription;
}

interface Snapshot {
  readonly nodes: readonly Located[];
  readonly shards: readonly (Located & { readonly shard: ShardView })[];
  readonly processes: readonly ChildState[];
  readonly ready: boolean | undefined;
}

const BREAKER_STATES = ['closed', 'open', 'half-open', 'drained'] as const;

/**
 * Registers the scrape-time metrics of the store trees: every value is read
 * from describe() when Prometheus scrapes (gauges with collect() callbacks,
 * no timers), one describe() per scrape. Counters that a store keeps itself
 * (hint overflows, replicated blobs, evictions) are exposed as counters from
 * the same snapshot. Families already in the registry under these names are
 * replaced, so a rebuilt admin app can reuse its registry.
 */
export function registerTreeMetrics(registry: Registry, source: TreeMetricsSource): TreeMetrics {
  // registry.metrics() runs every collect() synchronously in one go, so a
  // snapshot kept until the next microtask is one describe() per scrape.
  let cached: Snapshot | undefined;
  const snapshot = (): Snapshot => {
    if (cached === undefined) {
      cached = takeSnapshot(source);
      queueMicrotask(() => {
        cached = undefined;
      });
    }
    return cached;
  };
  const nodes = (kind: string | ((k: string) => boolean)) =>
    snapshot().nodes.filter((n) => (typeof kind === 'string' ? n.node.kind === kind : kind(n.node.kind)));
  const where = (n: Located): Labels => ({ tree: n.tree, store: n.store });
  // One sample per node that has the (numeric) field.
  const field = (kind: string | ((k: string) => boolean), get: (node: StoreDescription) => number | undefined, extra?: (n: Located) => Labels) =>
    (): Sample[] => {
      const out: Sample[] = [];
      for (const n of nodes(kind)) {
        const v = get(n.node);
        if (v !== undefined) out.push([{ ...where(n), ...extra?.(n) }, v]);
      }
      return out;
    };
  const shardField = (get: (s: ShardView) => number | undefined) => (): Sample[] => {
    const out: Sample[] = [];
    for (const s of snapshot().shards) {
      const v = get(s.shard);
      if (v !== undefined) out.push([{ tree: s.tree, store: s.store, shard: s.shard.name }, v]);
    }
    return out;
  };
  const seconds = (ms: number | undefined) => (ms === undefined ? undefined : ms / 1000);
  const isLeaf = (k: string) => k === 'disk' || k === 'memory';
  const S = ['tree', 'store'];
  const SH = ['tree', 'store', 'shard'];

  const gauge = (name: string, help: string, labelNames: string[], samples: () => Sample[]) =>
    define(registry, 'gauge', name, help, labelNames, samples);
  const counter = (name: string, help: string, labelNames: string[], samples: () => Sample[]) =>
    define(registry, 'counter', name, help, labelNames, samples);

  // Build and readiness.
  gauge('reapi_edge_build_info', 'Always 1; the version label says which build runs.', ['version'], () => [[{ version: source.version ?? 'unknown' }, 1]]);
  gauge('reapi_edge_ready', '1 when the process is ready to serve (what /readyz says).', [], () => {
    const ready = snapshot().ready;
    return ready === undefined ? [] : [[{}, ready ? 1 : 0]];
  });

  // Sharding: one breaker per shard.
  gauge('reapi_edge_shard_breaker_state', 'Breaker state of each shard: 1 for the current state, 0 for the others.', [...SH, 'state'], () => {
    const out: Sample[] = [];
    for (const s of snapshot().shards) {
      for (const state of BREAKER_STATES) out.push([{ tree: s.tree, store: s.store, shard: s.shard.name, state }, s.shard.state === state ? 1 : 0]);
    }
    return out;
  });
  gauge('reapi_edge_shard_breaker_manual', '1 while an operator holds the shard drained.', SH, shardField((s) => (s.manual ? 1 : 0)));
  gauge('reapi_edge_shard_breaker_state_since_timestamp_seconds', 'When the shard\'s breaker entered its current state (Unix time).', SH, shardField((s) => seconds(num(s, 'since'))));
  gauge('reapi_edge_shard_breaker_backoff_seconds', 'Backoff the shard\'s breaker uses for its current or next open state.', SH, shardField((s) => seconds(num(s, 'backoffMs'))));
  gauge('reapi_edge_shard_recent_requests', 'Requests to the shard in the breaker\'s sliding window.', SH, shardField((s) => num(s, 'recentRequests')));
  gauge('reapi_edge_shard_recent_failures', 'Infrastructure failures of the shard in the breaker\'s sliding window.', SH, shardField((s) => num(s, 'recentFailures')));
  gauge('reapi_edge_shard_health_check_up', 'Result of the shard\'s last health check: 1 passed, 0 failed (absent before the first).', SH,
    shardField((s) => (typeof s.lastHealthCheckOk === 'boolean' ? (s.lastHealthCheckOk ? 1 : 0) : undefined)));
  gauge('reapi_edge_shard_health_check_duration_seconds', 'Latency of the shard\'s last health check.', SH, shardField((s) => seconds(num(s, 'lastHealthCheckMs'))));
  gauge('reapi_edge_shard_in_flight', 'Calls to the shard in flight, including open read streams.', SH, shardField((s) => num(s, 'inFlight')));
  gauge('reapi_edge_shard_hints_pending', 'Hinted blobs that belong to the shard and wait to be handed back to it.', SH, shardField((s) => num(s, 'hintsPending')));
  gauge('reapi_edge_shard_hints_held', 'Hinted blobs the shard holds as a stand-in.', SH, shardField((s) => num(s, 'hintsHeld')));
  counter('reapi_edge_shard_written_bytes_total', 'Bytes written to the shard.', SH, shardField((s) => num(s, 'bytesIn')));
  counter('reapi_edge_shard_read_bytes_total', 'Bytes read from the shard.', SH, shardField((s) => num(s, 'bytesOut')));

  gauge('reapi_edge_sharding_hints_pending', 'Hints in the durable hint log.', S, field('sharding', (n) => num(n, 'hintsPending')));
  gauge('reapi_edge_sharding_hints_max', 'Capacity of the hint log; stand-in writes are refused beyond it.', S, field('sharding', (n) => num(n, 'maxHints')));
  gauge('reapi_edge_sharding_probing', '1 while reads and FindMissing probe further shards by rank.', S, field('sharding', (n) => (typeof n.probing === 'boolean' ? (n.probing ? 1 : 0) : undefined)));
  counter('reapi_edge_sharding_hint_overflows_total', 'Writes refused because the hint log was full.', S, field('sharding', (n) => num(n, 'hintOverflows')));
  counter('reapi_edge_sharding_handoff_copied_total', 'Hinted blobs handed back to their owner.', S, field('sharding', (n) => num(n, 'handoffCopied')));
  counter('reapi_edge_sharding_handoff_lost_total', 'Hinted blobs given up on (gone from the stand-in, or corrupt).', S, field('sharding', (n) => num(n, 'handoffLost')));
  counter('reapi_edge_sharding_probe_hits_total', 'Blobs found on a shard other than their owner.', S, field('sharding', (n) => num(n, 'probeHits')));
  counter('reapi_edge_sharding_retries_total', 'Writes retried on the next-ranked shard after an infrastructure failure.', S, field('sharding', (n) => num(n, 'retries')));
  counter('reapi_edge_sharding_aborted_on_open_total', 'Shard calls cancelled (and retried elsewhere) because the shard\'s breaker opened while they waited.', S, field('sharding', (n) => num(n, 'abortedOnOpen')));

  // Fallback pairs.
  gauge('reapi_edge_fallback_serving', 'Which side of a fallback pair serves traffic: 1 for the serving side.', [...S, 'side'], () => {
    const out: Sample[] = [];
    for (const n of nodes('fallback')) {
      for (const side of ['primary', 'secondary']) out.push([{ ...where(n), side }, n.node.serving === side ? 1 : 0]);
    }
    return out;
  });
  gauge('reapi_edge_fallback_breaker_state', 'Breaker state of a fallback pair\'s primary: 1 for the current state.', [...S, 'state'], () => {
    const out: Sample[] = [];
    for (const n of nodes('fallback')) {
      const b = rec(n.node, 'breaker');
      for (const state of BREAKER_STATES) out.push([{ ...where(n), state }, b?.state === state ? 1 : 0]);
    }
    return out;
  });
  counter('reapi_edge_fallback_failovers_total', 'Primary calls that failed over to the secondary.', S, field('fallback', (n) => num(n, 'failovers')));
  const repl = (key: string) => (n: StoreDescription) => num(rec(n, 'replication'), key);
  gauge('reapi_edge_replication_queue_depth', 'Writes queued for replication to the secondary.', S, field('fallback', repl('queued')));
  gauge('reapi_edge_replication_in_flight', 'Replication copies in flight.', S, field('fallback', repl('inFlight')));
  gauge('reapi_edge_replication_lag_seconds', 'Age of the oldest write still waiting to be replicated.', S, field('fallback', (n) => seconds(repl('lagMs')(n))));
  counter('reapi_edge_replication_copied_total', 'Writes replicated to the secondary.', S, field('fallback', repl('done')));
  counter('reapi_edge_replication_failed_total', 'Replications that failed.', S, field('fallback', repl('failed')));
  counter('reapi_edge_replication_vanished_total', 'Replications skipped because the blob was gone from the primary.', S, field('fallback', repl('vanished')));
  counter('reapi_edge_replication_overflows_total', 'Writes not queued for replication because the queue was full.', S, field('fallback', repl('overflow')));
  const journal = (key: string) => (n: StoreDescription) => num(rec(n, 'journal'), key);
  gauge('reapi_edge_journal_backlog', 'Writes accepted by the secondary while the primary was down, not yet replayed to it.', S, field('fallback', journal('backlog')));
  gauge('reapi_edge_journal_max_entries', 'Capacity of the catch-up journal.', S, field('fallback', journal('maxEntries')));
  gauge('reapi_edge_journal_lag_seconds', 'Age of the oldest journaled write not yet replayed.', S, field('fallback', (n) => seconds(journal('lagMs')(n))));
  counter('reapi_edge_journal_replayed_total', 'Journaled writes replayed to the primary.', S, field('fallback', journal('replayed')));
  counter('reapi_edge_journal_lost_total', 'Journaled writes that could not be replayed.', S, field('fallback', journal('lost')));
  const repairs = (key: string) => (n: StoreDescription) => num(rec(n, 'repairs'), key);
  gauge('reapi_edge_repairs_queued', 'Read repairs (secondary to primary copies) waiting.', S, field('fallback', repairs('queued')));
  counter('reapi_edge_repairs_total', 'Read repairs by outcome.', [...S, 'outcome'], () => [
    ...field('fallback', repairs('done'), () => ({ outcome: 'done' }))(),
    ...field('fallback', repairs('failed'), () => ({ outcome: 'failed' }))(),
    ...field('fallback', repairs('dropped'), () => ({ outcome: 'dropped' }))(),
  ]);

  // Leaves.
  const K = ['tree', 'store', 'kind'];
  const kindOf = (n: Located): Labels => ({ kind: n.node.kind });
  gauge('reapi_edge_store_usage_bytes', 'Bytes held by a disk or memory store.', K, field(isLeaf, (n) => num(n, 'bytes'), kindOf));
  gauge('reapi_edge_store_max_size_bytes', 'Size cap of a disk or memory store.', K, field(isLeaf, (n) => num(n, 'maxSizeBytes'), kindOf));
  gauge('reapi_edge_store_upload_in_flight_bytes', 'Bytes a disk store has reserved for uploads in flight (counted against its cap with the stored bytes).', S,
    field('disk', (n) => num(n, 'uploadBytesInFlight')));
  gauge('reapi_edge_store_blobs', 'Blobs held by a disk or memory store.', K, field(isLeaf, (n) => num(n, 'blobs'), kindOf));
  counter('reapi_edge_store_evictions_total', 'Blobs evicted by a disk or memory store to stay under its cap.', K, field(isLeaf, (n) => num(n, 'evictions'), kindOf));
  gauge('reapi_edge_remote_in_flight', 'Calls in flight to a remote store.', S, field('remote', (n) => num(n, 'inFlight')));
  counter('reapi_edge_remote_failures_total', 'Failed calls to a remote store.', S, field('remote', (n) => num(n, 'failures')));
  counter('reapi_edge_remote_health_check_failures_total', 'Failed health checks of a remote store.', S, field('remote', (n) => num(n, 'healthFailures')));
  counter('reapi_edge_ac_hidden_results_total', 'ActionResults hidden because a referenced blob was not readable.', S, field('completenessChecking', (n) => num(n, 'hiddenResults')));

  // Supervised storage-node processes.
  gauge('reapi_edge_child_up', '1 while a supervised storage-node process runs.', ['child'], () =>
    snapshot().processes.map((p) => [{ child: p.name }, p.running ? 1 : 0] as const));
  counter('reapi_edge_child_restarts_total', 'Restarts of a supervised storage-node process.', ['child'], () =>
    snapshot().processes.map((p) => [{ child: p.name }, p.restarts] as const));

  const transitions = replace(registry, 'reapi_edge_breaker_transitions_total', () =>
    new Counter({
      name: 'reapi_edge_breaker_transitions_total',
      help: 'Breaker state changes seen per shard (and fallback primary); manual="true" for drains and undrains.',
      labelNames: ['tree', 'store', 'shard', 'from', 'to', 'manual'],
      registers: [registry],
    }),
  );
  return {
    recordTransition(t) {
      transitions.inc({ tree: t.tree, store: t.store, shard: t.shard, from: t.from, to: t.to, manual: String(t.manual) });
    },
  };
}

function takeSnapshot(source: TreeMetricsSource): Snapshot {
  const nodes: Located[] = [];
  const shards: (Located & { shard: ShardView })[] = [];
  let trees: TreeDescriptions | undefined;
  try {
    trees = source.describe();
  } catch {
    trees = undefined; // a closing tree: report nothing rather than fail the scrape
  }
  if (trees !== undefined) {
    for (const tree of TREE_NAMES) {
      walkTree(trees[tree], (node, store) => {
        nodes.push({ tree, store, node });
        for (const shard of shardsOf(node)) shards.push({ tree, store, node, shard });
      });
    }
  }
  let processes: readonly ChildState[] = [];
  try {
    processes = source.processes?.() ?? [];
  } catch {
    processes = [];
  }
  return { nodes, shards, processes, ready: source.isReady?.() };
}

function replace<T>(registry: Registry, name: string, make: () => T): T {
  if (registry.getSingleMetric(name) !== undefined) registry.removeSingleMetric(name);
  return make();
}

function define(registry: Registry, type: 'gauge' | 'counter', name: string, help: string, labelNames: string[], samples: () => Sample[]): void {
  replace(registry, name, () => {
    if (type === 'gauge') {
      return new Gauge({
        name,
        help,
        labelNames,
        registers: [registry],
        collect(this: Gauge) {
          this.reset();
          for (const [labels, value] of samples()) this.set(labels, value);
        },
      });
    }
    return new Counter({
      name,
      help,
      labelNames,
      registers: [registry],
      collect(this: Counter) {
        this.reset();
        for (const [labels, value] of samples()) if (value >= 0) this.inc(labels, value);
      },
    });
  });
}

/** What registerConnectionMetrics reads at scrape time: the REAPI port's server. */
export type ConnectionMetricsSource = Pick<OnePortServer, 'connectionCounts' | 'connectionStats'>;

/**
 * Open connections of the REAPI port by protocol, and what its connection
 * limits and deadlines did (limits.maxConnections, headersTimeoutMs,
 * requestTimeoutMs, idleTimeoutMs, TLS handshakes and client certificates),
 * read when Prometheus scrapes.
 */
export function registerConnectionMetrics(registry: Registry, source: ConnectionMetricsSource): void {
  define(registry, 'gauge', 'reapi_edge_open_connections', 'Open client connections of the REAPI port, by protocol ("sniffing": not yet known).', ['protocol'], () => {
    const c = source.connectionCounts();
    return [
      [{ protocol: 'http1' }, c.http1],
      [{ protocol: 'http2' }, c.http2],
      [{ protocol: 'sniffing' }, c.sniffing],
    ];
  });
  define(
    registry,
    'counter',
    'reapi_edge_connection_events_total',
    'Connections the REAPI port refused or closed by its limits: refused (maxConnections), headers_timeout, request_timeout, idle_closed, tls_handshake_failure, client_cert_rejected.',
    ['event'],
    () => {
      const s = source.connectionStats();
      return [
        [{ event: 'refused' }, s.refused],
        [{ event: 'headers_timeout' }, s.headersTimeouts],
        [{ event: 'request_timeout' }, s.requestTimeouts],
        [{ event: 'idle_closed' }, s.idleSessionsClosed],
        [{ event: 'tls_handshake_failure' }, s.tlsHandshakeFailures],
        [{ event: 'client_cert_rejected' }, s.rejectedClientCertificates],
      ];
    },
  );
}
