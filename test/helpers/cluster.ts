// A real edge cluster for fault-injection tests and benchmarks: N storage-node
// shard processes and one edge process (sharding over `remote` stores that
// point at the shards), each its own process with its own data dir, on free
// loopback ports.
//
//   const cluster = await startCluster({ healthCheckIntervalMs: 250 });
//   t.teardown(cluster.stop);
//   const a = cluster.shard('shard-a');
//   await a.kill();      // SIGKILL; a.restart() brings it back on the same port and data dir
//   a.pause(); a.resume(); // SIGSTOP (a blackhole: connections open, nothing answers) / SIGCONT
//   cluster.owner(hash)  // the shard that owns a digest (same ranking as the edge)
//   cluster.transitions() // breaker transitions parsed from the edge's log
//
// The shards are spawned here rather than by the edge's `children`
// supervision so that a test controls each one: the exact signal, when it
// comes back, and on which port. The edge is a plain node config with no
// children; it can be killed and restarted on its port and data dir too
// (its hint logs live there).
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { rank } from '../../src/stores/rendezvous.ts';
import { spawnNode } from './spawn-node.ts';
import type { ExitInfo, SpawnedNode } from './spawn-node.ts';

export interface ClusterOptions {
  /** Shard names; also their rendezvous keys. Default shard-a, shard-b, shard-c. */
  readonly shardNames?: readonly string[];
  /** Weight of every shard. Default 1. */
  readonly weight?: number;
  /** Edge sharding store: how often each shard is health-checked. Default 250 ms. */
  readonly healthCheckIntervalMs?: number;
  /** Edge sharding store: a slower health check fails. Default 500 ms. */
  readonly healthCheckTimeoutMs?: number;
  /** Edge remote stores: deadline for unary calls and stream progress. Default 5000 ms. */
  readonly remoteTimeoutMs?: number;
  /** Edge sharding store probe window. Default: the store's default (10 min). */
  readonly probeWindowMs?: number;
  /** Wrap the edge's AC sharding store in completenessChecking. Default true. */
  readonly acCompletenessChecking?: boolean;
  /** Log level of the edge. Default 'info' (breaker transitions are logged at info/warn). */
  readonly edgeLogLevel?: string;
  /** Log level of the shards. Default 'info' (spawnNode reads the port from the info-level listening line). */
  readonly shardLogLevel?: string;
  /** Top-level fields added to the edge's config (e.g. tls, auth, limits). */
  readonly edgeExtra?: Record<string, unknown>;
  /**
   * Also start a `secondary` storage node and make each edge tree a fallback
   * pair { primary: the sharding store, secondary }, as config.json does.
   */
  readonly fallback?: {
    readonly durability?: 'sync' | 'async';
    /** The pair's health checks. Default 200 ms. */
    readonly healthCheckIntervalMs?: number;
  };
}

export interface ClusterShard {
  readonly name: string;
  readonly port: number;
  /** http://127.0.0.1:PORT: talk to the shard directly, bypassing the edge. */
  readonly url: string;
  readonly dir: string;
  /** The current process (replaced by restart()). */
  readonly node: SpawnedNode;
  readonly running: boolean;
  readonly paused: boolean;
  /** Sends a signal (default SIGKILL) and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<ExitInfo>;
  /** SIGSTOP: the socket stays open and the kernel still accepts; nothing answers. */
  pause(): void;
  /** SIGCONT after pause(). */
  resume(): void;
  /**
   * Starts the shard again on the same port and data dir (kills it first if
   * it runs); `empty`: with its data dir deleted first (a pod back on a fresh volume).
   */
  restart(opts?: { empty?: boolean }): Promise<void>;
}

export interface ClusterEdge {
  readonly port: number;
  readonly url: string;
  /** grpc://127.0.0.1:PORT for Bazel. */
  readonly grpcUrl: string;
  readonly dir: string;
  readonly node: SpawnedNode;
  readonly running: boolean;
  kill(signal?: NodeJS.Signals): Promise<ExitInfo>;
  restart(): Promise<void>;
  /** Every log line of every edge process so far, in order. */
  logs(): string[];
}

export interface BreakerTransitionLog {
  /** ms since the epoch, from the edge's log record. */
  readonly time: number;
  readonly tree: string;
  readonly shard: string;
  readonly from: string;
  readonly to: string;
  readonly reason: string;
  readonly backoffMs: number | undefined;
}

export interface Cluster {
  readonly edge: ClusterEdge;
  readonly shards: readonly ClusterShard[];
  /** The fallback pair's secondary (with the `fallback` option). */
  readonly secondary: ClusterShard | undefined;
  readonly root: string;
  shard(name: string): ClusterShard;
  /** Full ranking of a digest hash over the shards, best first (same as the edge's). */
  ranking(hash: string): string[];
  /** Top-ranked shard of a digest hash. */
  owner(hash: string): string;
  /** Breaker transitions the edge logged so far. */
  transitions(): BreakerTransitionLog[];
  /** Resumes paused shards, stops every process and removes the data. Idempotent. */
  stop(): Promise<void>;
}

/** The edge config for shards at `urls` (by name), as config.json would hold it. */
export function edgeConfig(
  shards: readonly { name: string; url: string; weight: number }[],
  opts: ClusterOptions = {},
  secondaryUrl?: string,
): Record<string, unknown> {
  const sharding = (tree: string) => ({
    sharding: {
      shards: Object.fromEntries(
        shards.map((s) => [
          s.name,
          {
            weight: s.weight,
            backend: {
              remote: {
                url: s.url,
                timeoutMs: opts.remoteTimeoutMs ?? 5000,
                healthTimeoutMs: opts.healthCheckTimeoutMs ?? 500,
              },
            },
          },
        ]),
      ),
      handoffDir: `handoff-${tree}`,
      healthCheckIntervalMs: opts.healthCheckIntervalMs ?? 250,
      healthCheckTimeoutMs: opts.healthCheckTimeoutMs ?? 500,
      ...(opts.probeWindowMs === undefined ? {} : { probeWindowMs: opts.probeWindowMs }),
    },
  });
  const tree = (name: string): Record<string, unknown> =>
    opts.fallback === undefined || secondaryUrl === undefined
      ? sharding(name)
      : {
          fallback: {
            primary: sharding(name),
            secondary: { remote: { url: secondaryUrl, timeoutMs: opts.remoteTimeoutMs ?? 5000, healthTimeoutMs: opts.healthCheckTimeoutMs ?? 500 } },
            journalDir: `journal-${name}`,
            healthCheckIntervalMs: opts.fallback.healthCheckIntervalMs ?? 200,
            ...(opts.fallback.durability === undefined ? {} : { durability: opts.fallback.durability }),
          },
        };
  return {
    logLevel: opts.edgeLogLevel ?? 'info',
    cas: tree('cas'),
    ac: opts.acCompletenessChecking === false ? tree('ac') : { completenessChecking: { backend: tree('ac') } },
    ...opts.edgeExtra,
  };
}

/**
 * A shard's own config: disk CAS and a plain disk AC. No completeness check
 * on the shard: an ActionResult's outputs live on other shards, so only the
 * edge, which sees the whole CAS, can check it.
 */
function shardConfig(logLevel: string): Record<string, unknown> {
  return {
    logLevel,
    cas: { disk: { path: 'cas', maxSizeBytes: 4 * 1024 * 1024 * 1024 } },
    ac: { disk: { path: 'ac', maxSizeBytes: 256 * 1024 * 1024 } },
  };
}

export async function startCluster(opts: ClusterOptions = {}): Promise<Cluster> {
  const names = opts.shardNames ?? ['shard-a', 'shard-b', 'shard-c'];
  const weight = opts.weight ?? 1;
  const root = await mkdtemp(join(tmpdir(), 'reapi-cluster-'));
  const shards: ClusterShard[] = [];
  let secondary: ClusterShard | undefined;
  let edge: ClusterEdge | undefined;
  const stop = async (): Promise<void> => {
    await Promise.allSettled([edge?.node.stop(), ...[...shards, ...(secondary === undefined ? [] : [secondary])].map((s) => stopShard(s))]);
    await rm(root, { recursive: true, force: true });
  };
  try {
    // Shards start in parallel: each takes ~0.5-1 s to load on a busy machine.
    shards.push(...(await Promise.all(names.map((name) => startShard(name, join(root, name), opts.shardLogLevel ?? 'info')))));
    if (opts.fallback !== undefined) secondary = await startShard('secondary', join(root, 'secondary'), opts.shardLogLevel ?? 'info');
    edge = await startEdge(
      join(root, 'edge'),
      edgeConfig(
        shards.map((s) => ({ name: s.name, url: s.url, weight })),
        opts,
        secondary?.url,
      ),
    );
  } catch (err) {
    await stop();
    throw err;
  }
  const weighted = names.map((name) => ({ name, weight }));
  const theEdge = edge;
  let stopping: Promise<void> | undefined;
  return {
    edge: theEdge,
    shards,
    secondary,
    root,
    shard(name) {
      const s = shards.find((x) => x.name === name);
      if (s === undefined) throw new Error(`no shard ${name}`);
      return s;
    },
    ranking: (hash) => rank(hash, weighted),
    owner: (hash) => rank(hash, weighted)[0]!,
    transitions: () => parseTransitions(theEdge.logs()),
    stop: () => (stopping ??= stop()),
  };
}

async function stopShard(s: ClusterShard): Promise<void> {
  if (s.paused) s.resume();
  await s.node.stop();
}

async function startShard(name: string, dir: string, logLevel: string): Promise<ClusterShard> {
  await mkdir(dir, { recursive: true });
  let node = await spawnNode({ dir, config: shardConfig(logLevel) });
  const port = node.port;
  let paused = false;
  const shard: ClusterShard = {
    name,
    port,
    url: `http://127.0.0.1:${port}`,
    dir,
    get node() {
      return node;
    },
    get running() {
      return node.exitInfo() === undefined;
    },
    get paused() {
      return paused;
    },
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      const info = await node.kill(signal);
      paused = false;
      return info;
    },
    pause() {
      if (node.exitInfo() !== undefined) return;
      process.kill(node.pid, 'SIGSTOP');
      paused = true;
    },
    resume() {
      if (node.exitInfo() !== undefined) return;
      process.kill(node.pid, 'SIGCONT');
      paused = false;
    },
    async restart(opts?: { empty?: boolean }) {
      if (node.exitInfo() === undefined) {
        if (paused) process.kill(node.pid, 'SIGCONT');
        await node.kill('SIGKILL');
      }
      paused = false;
      if (opts?.empty === true) {
        await rm(dir, { recursive: true, force: true });
        await mkdir(dir, { recursive: true });
      }
      node = await spawnNode({ dir, port, config: shardConfig(logLevel) });
    },
  };
  return shard;
}

async function startEdge(dir: string, config: Record<string, unknown>): Promise<ClusterEdge> {
  await mkdir(dir, { recursive: true });
  const past: string[] = [];
  let node = await spawnNode({ dir, config });
  const port = node.port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    grpcUrl: `grpc://127.0.0.1:${port}`,
    dir,
    get node() {
      return node;
    },
    get running() {
      return node.exitInfo() === undefined;
    },
    kill: (signal: NodeJS.Signals = 'SIGKILL') => node.kill(signal),
    async restart() {
      if (node.exitInfo() === undefined) await node.kill('SIGKILL');
      past.push(...node.logs());
      node = await spawnNode({ dir, port, config: { ...config, listen: `127.0.0.1:${port}` } });
    },
    logs: () => [...past, ...node.logs()],
  };
}

/** Breaker transitions from the sharding store's log lines ("shard X is open", "shard X is back"). */
export function parseTransitions(lines: readonly string[]): BreakerTransitionLog[] {
  const out: BreakerTransitionLog[] = [];
  for (const line of lines) {
    if (!line.includes('"to":')) continue;
    let r: Record<string, unknown>;
    try {
      r = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    if (typeof r.shard !== 'string' || typeof r.from !== 'string' || typeof r.to !== 'string') continue;
    out.push({
      time: Number(r.time),
      tree: String(r.tree ?? ''),
      shard: r.shard,
      from: r.from,
      to: r.to,
      reason: String(r.reason ?? ''),
      backoffMs: typeof r.backoffMs === 'number' ? r.backoffMs : undefined,
    });
  }
  return out;
}
