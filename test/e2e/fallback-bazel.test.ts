// Real Bazel 4.2.3 through the full default cluster shape (config.json): an
// edge whose CAS and AC are fallback { primary: sharding over shard-a/b/c,
// secondary: a fourth storage node }, the AC completeness-checked, with the
// four storage nodes run as supervised children of the edge process
// (`node src/main.ts cfg.json`), on free ports and temp data dirs.
//
// The loop: a cold build during which all three shard processes are
// SIGKILLed (the supervisor restarts them, on the same ports and data dirs);
// a warm build from a clean output base during which they are SIGKILLed
// again; then `bazel clean --expunge` and a warm build with the cluster
// healthy, which must hit the remote cache for every cacheable action.
import { createServer } from 'node:net';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import type { Test } from 'tap';
import { assertSucceeded, bazelTest, prepareWorkspace } from '../helpers/bazel.ts';
import type { BazelRun, BazelWorkspace } from '../helpers/bazel.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { SpawnedNode } from '../helpers/spawn-node.ts';

const instanceName = 'ci/fallback';
const SHARDS = ['shard-a', 'shard-b', 'shard-c'] as const;
const MiB = 1024 * 1024;

bazelTest(t, 'Bazel 4.2.3 through edge + 3 shards + secondary while the shard set is killed mid-build', main);

/** Free loopback ports (bound, then released) for the children the config names up front. */
async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () =>
      new Promise<ReturnType<typeof createServer>>((res, rej) => {
        const s = createServer();
        s.once('error', rej);
        s.listen(0, '127.0.0.1', () => res(s));
      }),
    ),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((res) => s.close(res))));
  return ports;
}

/** The default config.json's shape, on the given ports, with data under the config's dir. */
function clusterConfig(ports: { edge: number; shards: number[]; secondary: number }): Record<string, unknown> {
  const url = (port: number) => `http://127.0.0.1:${port}`;
  const primary = (tree: string) => ({
    sharding: {
      shards: Object.fromEntries(SHARDS.map((name, i) => [name, { weight: 1, backend: { remote: { url: url(ports.shards[i]!), timeoutMs: 10_000 } } }])),
      handoffDir: `edge/handoff-${tree}`,
      healthCheckIntervalMs: 250,
    },
  });
  const fallback = (tree: string) => ({
    fallback: {
      primary: primary(tree),
      secondary: { remote: { url: url(ports.secondary), timeoutMs: 10_000 } },
      journalDir: `edge/journal-${tree}`,
      healthCheckIntervalMs: 250,
    },
  });
  const child = (name: string, port: number, casBytes: number) => ({
    listen: `127.0.0.1:${port}`,
    logLevel: 'warn',
    cas: { disk: { path: `${name}/cas`, maxSizeBytes: casBytes } },
    ac: { disk: { path: `${name}/ac`, maxSizeBytes: 64 * MiB } },
  });
  return {
    logLevel: 'info',
    cas: fallback('cas'),
    ac: { completenessChecking: { backend: fallback('ac') } },
    children: {
      ...Object.fromEntries(SHARDS.map((name, i) => [name, child(name, ports.shards[i]!, 1024 * MiB)])),
      secondary: child('secondary', ports.secondary, 2048 * MiB),
    },
  };
}

/** Current pid of each supervised child, from the edge's "started storage node process" lines. */
function childPids(edge: SpawnedNode): Map<string, number> {
  const pids = new Map<string, number>();
  for (const line of edge.logs()) {
    if (!line.includes('started storage node process')) continue;
    const r = JSON.parse(line) as { child: string; pid: number };
    pids.set(r.child, r.pid);
  }
  return pids;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Fallback breaker transitions of the edge, e.g. "cas closed -> open". */
function fallbackTransitions(edge: SpawnedNode): string[] {
  return edge
    .logs()
    .filter((l) => l.includes('fallback: primary breaker'))
    .map((l) => {
      const r = JSON.parse(l) as { tree: string; from: string; to: string };
      return `${r.tree} ${r.from} -> ${r.to}`;
    });
}

async function main(t: Test): Promise<void> {
  const ws: BazelWorkspace = await prepareWorkspace('reapi-fallback-bazel-');
  const clusterDir = join(ws.root, 'cluster');
  await mkdir(clusterDir);
  const [edgePort, a, b, c, secondaryPort] = await freePorts(5);
  let edge: SpawnedNode | undefined;
  t.teardown(async () => {
    ws.shutdown();
    if (edge && !t.passing()) console.error(`--- edge log (last 80 lines) ---\n${edge.logs().slice(-80).join('\n')}`);
    // SIGTERM: the edge stops its children (and setpriv kills them if it cannot).
    await edge?.stop();
    await ws.remove();
  });
  edge = await spawnNode({
    dir: clusterDir,
    port: edgePort!,
    config: clusterConfig({ edge: edgePort!, shards: [a!, b!, c!], secondary: secondaryPort! }),
  });
  const started = childPids(edge);
  t.same([...started.keys()].sort(), [...SHARDS, 'secondary'].sort(), 'the edge started all four storage node processes');

  const remoteFlags = [`--remote_cache=grpc://127.0.0.1:${edgePort}`, `--remote_instance_name=${instanceName}`, '--disk_cache=', '--remote_timeout=60'];
  const targets = ['//...'];

  /** Runs a build and SIGKILLs every shard process `afterMs` into it. */
  const buildKillingShards = async (args: string[], afterMs: number): Promise<{ run: BazelRun; killed: number[] }> => {
    const building = ws.bazel(args);
    await sleep(afterMs);
    const pids = childPids(edge!);
    const killed = SHARDS.map((name) => pids.get(name)!);
    for (const pid of killed) process.kill(pid, 'SIGKILL');
    return { run: await building, killed };
  };
  const shardsRestarted = async (killed: number[]) => {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const now = childPids(edge!);
      const fresh = SHARDS.map((name) => now.get(name)!);
      if (fresh.every((pid, i) => pid !== killed[i] && alive(pid)) && killed.every((pid) => !alive(pid))) return fresh;
      if (Date.now() > deadline) throw new Error(`shards not restarted: killed ${killed}, now ${fresh}`);
      await sleep(100);
    }
  };

  // 1. Cold build; the primary shard set dies 5 s in, while Bazel is
  //    running actions and uploading their outputs.
  const b1 = await buildKillingShards(['test', ...remoteFlags, ...targets], 5000);
  t.comment(`cold build ${b1.run.ms} ms (shards ${b1.killed.join(', ')} SIGKILLed 5 s in): ${b1.run.summaryLine}`);
  if (!assertSucceeded(t, 'cold build with the shard set killed mid-build', b1.run)) return;
  const cold = b1.run.processes;
  t.ok(cold.executed > 0, `cold build: ${cold.executed} processes executed locally`);
  const during1 = fallbackTransitions(edge);
  t.ok(during1.includes('cas closed -> open'), `cold build: the edge failed the CAS over to the secondary (${during1.join('; ')})`);
  const restarted1 = await shardsRestarted(b1.killed);
  t.pass(`the supervisor restarted the shards (pids ${restarted1.join(', ')})`);

  // 2. Warm build from an empty output base; the shards die again 1 s in,
  //    while Bazel is checking the action cache and downloading.
  t.equal((await ws.bazel(['clean', '--expunge'])).code, 0, 'bazel clean --expunge');
  const b2 = await buildKillingShards(['test', ...remoteFlags, ...targets], 1000);
  t.comment(`warm build ${b2.run.ms} ms (shards SIGKILLed 1 s in): ${b2.run.summaryLine}`);
  if (!assertSucceeded(t, 'warm build with the shard set killed mid-build', b2.run)) return;
  await shardsRestarted(b2.killed);
  const during2 = fallbackTransitions(edge).slice(during1.length);
  t.ok(during2.includes('cas closed -> open'), `warm build: the edge failed the CAS over to the secondary again (${during2.join('; ')})`);

  // Let the edge take the shards back (breaker closes after its backoff and
  // three good probes) and drain its journals before the last build.
  const deadline = Date.now() + 60_000;
  for (;;) {
    const tr = fallbackTransitions(edge);
    const last = (tree: string) => tr.filter((x) => x.startsWith(`${tree} `)).at(-1);
    if (last('cas') === 'cas half-open -> closed' && (last('ac') ?? 'ac half-open -> closed') === 'ac half-open -> closed') break;
    if (Date.now() > deadline) throw new Error(`the edge did not take the shards back: ${tr.join('; ')}`);
    await sleep(250);
  }
  t.pass('the edge took the primary shard set back');

  // 3. clean --expunge + warm build with the cluster healthy: every
  //    cacheable action of the (interrupted) cold build is a cache hit.
  t.equal((await ws.bazel(['clean', '--expunge'])).code, 0, 'bazel clean --expunge');
  const warm = await ws.bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`final warm build ${warm.ms} ms: ${warm.summaryLine}`);
  if (!assertSucceeded(t, 'final warm build', warm)) return;
  t.equal(warm.processes.executed, 0, 'final warm build: no cacheable process executed locally', { breakdown: warm.processes.byStrategy });
  t.equal(
    warm.processes.remoteCacheHit,
    cold.executed,
    `final warm build: every process the cold build executed (${cold.executed}) is a remote cache hit`,
  );

  const errors = edge.logs().filter((l) => /"level":(50|60)/.test(l));
  t.same(errors, [], 'the edge and its children logged no errors');
  t.comment(`timings: cold ${b1.run.ms} ms, warm under failure ${b2.run.ms} ms, final warm ${warm.ms} ms`);
}
