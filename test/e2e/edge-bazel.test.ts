// End to end with a real client through the edge: Bazel 4.2.3 builds
// test/e2e/bazel-workspace against an edge sharding over three storage-node
// processes (test/helpers/cluster.ts), and a shard dies in the middle.
//   1. cold build; shard-b is SIGKILLed once uploads are under way: the build
//      still succeeds (exit 0);
//   2. clean --expunge, --remote_download_minimal build while shard-b is still
//      down: succeeds (an ActionResult whose outputs sat on shard-b is hidden
//      by the completeness check, so Bazel reruns that action rather than
//      failing on a missing blob);
//   3. shard-b restarts on its port and data dir; the edge takes it back and
//      hands off what the stand-ins took meanwhile;
//   4. clean --expunge, warm build: every cacheable action is a remote cache
//      hit, outputs byte-identical to the cold build's;
//   5. clean --expunge, --remote_download_minimal build: all hits, succeeds.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import type { Test } from 'tap';
import { assertSucceeded, bazelTest, diskUsage, hashOutputs, prepareWorkspace } from '../helpers/bazel.ts';
import { startCluster } from '../helpers/cluster.ts';
import type { Cluster } from '../helpers/cluster.ts';

const instanceName = 'ci/edge';
const targets = ['//...'];
const VICTIM = 'shard-b';

bazelTest(t, 'Bazel 4.2.3 through an edge over 3 shards: a shard SIGKILLed mid-build, then restarted', main);

async function main(t: Test): Promise<void> {
  const ws = await prepareWorkspace('reapi-edge-bazel-');
  let cluster: Cluster | undefined;
  t.teardown(async () => {
    ws.shutdown();
    if (cluster && !t.passing()) {
      console.error(`--- edge log (last 60 lines) ---\n${cluster.edge.logs().slice(-60).join('\n')}`);
    }
    await cluster?.stop();
    await ws.remove();
  });
  cluster = await startCluster();
  const c = cluster;
  t.comment(`edge on ${c.edge.url}, shards ${c.shards.map((s) => `${s.name} ${s.url}`).join(', ')}`);
  const remoteFlags = [
    `--remote_cache=${c.edge.grpcUrl}`,
    `--remote_instance_name=${instanceName}`,
    '--disk_cache=',
    '--remote_timeout=60',
  ];
  const bazel = ws.bazel;
  const bin = join(ws.workspace, 'bazel-bin');

  // 1. Cold build, killing the victim once the shards hold a few MiB (the
  // larger outputs are being uploaded), or after 20 s at the latest.
  const victim = c.shard(VICTIM);
  const coldRun = bazel(['test', ...remoteFlags, ...targets]);
  let done = false;
  void coldRun.finally(() => {
    done = true;
  });
  const buildStart = Date.now();
  let killedAt: number | undefined;
  let storedAtKill = 0;
  while (!done && Date.now() - buildStart < 120_000) {
    storedAtKill = (await Promise.all(c.shards.map((s) => diskUsage(join(s.dir, 'cas')).catch(() => 0)))).reduce((a, b) => a + b, 0);
    if (storedAtKill >= 2 * 1024 * 1024 || Date.now() - buildStart > 20_000) {
      killedAt = Date.now();
      await victim.kill('SIGKILL');
      break;
    }
    await sleep(100);
  }
  const cold = await coldRun;
  t.comment(
    `cold build ${cold.ms} ms: ${cold.summaryLine}; ${VICTIM} SIGKILLed ` +
      `${killedAt === undefined ? 'never' : `${killedAt - buildStart} ms in, with ${(storedAtKill / 1048576).toFixed(1)} MiB stored on the shards`}`,
  );
  t.ok(killedAt !== undefined && killedAt < buildStart + cold.ms, `${VICTIM} was killed while the cold build ran`);
  if (!assertSucceeded(t, 'cold build with a shard killed mid-build', cold)) return;
  t.equal(cold.processes.remoteCacheHit, 0, 'cold build: no remote cache hits on an empty cache');
  t.ok(cold.processes.executed > 0, `cold build: ${cold.processes.executed} processes executed locally`);
  const coldOutputs = await hashOutputs(bin);
  t.ok(coldOutputs.size >= 10, `cold build produced ${coldOutputs.size} output files`);

  // 2. Builds without the Bytes while the victim is still down.
  t.equal((await bazel(['clean', '--expunge'])).code, 0, 'bazel clean --expunge');
  const outage = await bazel(['test', ...remoteFlags, '--remote_download_minimal', ...targets]);
  t.comment(`--remote_download_minimal build with ${VICTIM} down ${outage.ms} ms: ${outage.summaryLine}`);
  if (!assertSucceeded(t, `--remote_download_minimal build with ${VICTIM} down`, outage)) return;

  // 3. The victim comes back on the same port and data dir.
  const restartAt = Date.now();
  await victim.restart();
  const listeningAt = Date.now();
  let backMs: number | undefined;
  let pendingHints = -1;
  for (let i = 0; i < 600; i++) {
    const closed = ['cas', 'ac'].every((tree) =>
      c.transitions().some((x) => x.shard === VICTIM && x.tree === tree && x.to === 'closed' && x.time >= restartAt),
    );
    pendingHints = (await hintLines(c, 'cas')) + (await hintLines(c, 'ac'));
    if (closed && backMs === undefined) backMs = Date.now() - listeningAt;
    if (closed && pendingHints === 0) break;
    await sleep(100);
  }
  t.comment(`${VICTIM} restarted in ${listeningAt - restartAt} ms; the edge took it back after ${backMs} ms; hints pending: ${pendingHints}`);
  t.ok(backMs !== undefined, `the edge closed ${VICTIM}'s breakers (cas and ac) again`);
  t.equal(pendingHints, 0, 'every hint was handed off');

  // 4. Warm build from the cache only.
  t.equal((await bazel(['clean', '--expunge'])).code, 0, 'bazel clean --expunge');
  const warm = await bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`warm build ${warm.ms} ms: ${warm.summaryLine}`);
  if (!assertSucceeded(t, 'warm build after recovery', warm)) return;
  t.equal(warm.processes.executed, 0, 'warm build: no cacheable process executed locally', { breakdown: warm.processes.byStrategy });
  t.equal(
    warm.processes.remoteCacheHit,
    cold.processes.executed,
    `warm build: every cacheable process (${cold.processes.executed}) is a remote cache hit`,
  );
  const warmOutputs = await hashOutputs(bin);
  const differing = [...coldOutputs.values()].filter((o) => warmOutputs.get(o.path)?.sha256 !== o.sha256).map((o) => o.path);
  t.same(differing, [], `warm build: all ${coldOutputs.size} outputs byte-identical to the cold build's`);

  // 5. Builds without the Bytes after recovery: all hits, nothing downloaded.
  t.equal((await bazel(['clean', '--expunge'])).code, 0, 'bazel clean --expunge');
  const minimal = await bazel(['test', ...remoteFlags, '--remote_download_minimal', ...targets]);
  t.comment(`--remote_download_minimal build after recovery ${minimal.ms} ms: ${minimal.summaryLine}`);
  if (!assertSucceeded(t, '--remote_download_minimal build after recovery', minimal)) return;
  t.equal(minimal.processes.executed, 0, '--remote_download_minimal: no process executed locally', {
    breakdown: minimal.processes.byStrategy,
  });
  t.equal(minimal.processes.remoteCacheHit, cold.processes.executed, '--remote_download_minimal: every cacheable process is a remote cache hit');

  const perShard = await Promise.all(c.shards.map(async (s) => `${s.name} ${((await diskUsage(join(s.dir, 'cas'))) / 1048576).toFixed(1)} MiB`));
  t.comment(`CAS bytes per shard: ${perShard.join(', ')}`);
  const problems = c.edge.logs().filter((line) => /"level":(50|60)/.test(line));
  t.same(problems, [], 'the edge logged no errors');
  t.comment(`timings: cold ${cold.ms} ms, minimal during outage ${outage.ms} ms, warm ${warm.ms} ms, minimal ${minimal.ms} ms`);
}

async function hintLines(c: Cluster, tree: string): Promise<number> {
  const text = await readFile(join(c.edge.dir, `handoff-${tree}`, 'hints.jsonl'), 'utf8').catch(() => '');
  return text.split('\n').filter((l) => l.trim() !== '').length;
}
