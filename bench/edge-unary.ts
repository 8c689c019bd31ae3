// The edge's unary paths, FindMissingBlobs and GetActionResult, in one run:
// one or more edge processes (variants) sharding over the same three
// storage-node processes (the shape of test/helpers/cluster.ts), and one
// storage node reached directly, all with the same connect-node client.
// Variants are measured alternately, so machine noise hits them alike.
//
// Variants: `edge` (this tree, default config), `edge-nocache` (existence
// cache off: only the probing changes show), and with --base-dir DIR
// `base`: the edge from another checkout of the repo (e.g. `git worktree
// add DIR HEAD` plus a node_modules symlink), the "before" of a change.
//
// Figures:
// - FindMissingBlobs of 10,000 digests (half present): within the start-up
//   probe window, outside every window, and within one shard's
//   breaker-change window (shard-a paused until its breaker opens, resumed,
//   closed again). "first" is the first call after the existence cache's
//   TTL ran out (blobs uploaded through another edge), "repeat" the median
//   of repeated calls.
// - GetActionResult calls/s at concurrency 32, completeness-checked at the
//   edge (and on the node).
//
// With --cpu-prof every edge runs under `node --cpu-prof` and writes a
// .cpuprofile into --prof-dir when it stops; --only picks one workload so a
// profile shows one path. Summarise one with bench/cpuprofile-top.ts.
//
//   node bench/edge-unary.ts [--runs 7] [--window-ms 40000] [--base-dir DIR]
//        [--only fm-start|fm-steady|fm-change|gar] [--cpu-prof --prof-dir DIR]
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { edgeConfig } from '../test/helpers/cluster.ts';
import { spawnNode, type SpawnedNode, type SpawnNodeOptions } from '../test/helpers/spawn-node.ts';
import { type Clients, clients, findMissingMs, fmt, getActionResultRate, median, uploadSmallBlobs } from './reapi-client.ts';
import { DEFAULT_EXISTENCE_CACHE_TTL_MS } from '../src/stores/existence-cache.ts';

const { values: opts } = parseArgs({
  options: {
    runs: { type: 'string', default: '7' },
    'window-ms': { type: 'string', default: '40000' },
    'base-dir': { type: 'string' },
    only: { type: 'string' },
    'cpu-prof': { type: 'boolean', default: false },
    'prof-dir': { type: 'string' },
  },
});
const runs = Number(opts.runs);
const windowMs = Number(opts['window-ms']);
const want = (w: string) => opts.only === undefined || opts.only === w;

type Row = [string, string, string];
const rows: Row[] = [];
const row = (what: string, value: string, unit: string) => {
  rows.push([what, value, unit]);
  console.error(`  ${what}: ${value} ${unit}`);
};

interface Variant {
  readonly label: string;
  readonly node: SpawnedNode;
  readonly c: Clients;
}

const root = await mkdtemp(join(tmpdir(), 'edge-unary-'));
const nodes: SpawnedNode[] = [];
try {
  const names = ['shard-a', 'shard-b', 'shard-c'];
  const shards = await Promise.all(
    names.map(async (name) => {
      const dir = join(root, name);
      await mkdir(dir, { recursive: true });
      const n = await spawnNode({
        dir,
        config: { cas: { disk: { path: 'cas', maxSizeBytes: 1 << 30 } }, ac: { disk: { path: 'ac', maxSizeBytes: 1 << 28 } } },
      });
      nodes.push(n);
      return { name, node: n };
    }),
  );
  const direct = await spawnNode({});
  nodes.push(direct);
  const baseConfig = edgeConfig(
    shards.map((s) => ({ name: s.name, url: s.node.url, weight: 1 })),
    { probeWindowMs: windowMs },
  );
  const withCache = (maxEntries: number | undefined) => {
    const config = structuredClone(baseConfig) as Record<string, Record<string, Record<string, unknown>>>;
    if (maxEntries === undefined) return config;
    (config.cas!.sharding as Record<string, unknown>).existenceCacheMaxEntries = maxEntries;
    ((config.ac!.completenessChecking!.backend as Record<string, Record<string, unknown>>).sharding!).existenceCacheMaxEntries = maxEntries;
    return config;
  };
  const env: Record<string, string> = {};
  if (opts['cpu-prof']) env.NODE_OPTIONS = `--cpu-prof --cpu-prof-dir=${resolve(opts['prof-dir'] ?? join(root, 'prof'))}`;
  const start = async (label: string, config: Record<string, unknown>, spawn: (o: SpawnNodeOptions) => Promise<SpawnedNode> = spawnNode) => {
    const dir = join(root, label);
    await mkdir(dir, { recursive: true });
    const node = await spawn({ dir, config, env });
    nodes.push(node);
    return { label, node, c: clients(node.url) };
  };
  const variants: Variant[] = [];
  if (opts['base-dir'] !== undefined) {
    const other = (await import(resolve(opts['base-dir'], 'test/helpers/spawn-node.ts'))) as { spawnNode: typeof spawnNode };
    variants.push(await start('base', baseConfig, other.spawnNode));
  }
  variants.push(await start('edge-nocache', withCache(0)));
  variants.push(await start('edge', withCache(undefined)));
  const startedAt = Date.now();
  const viaNode = clients(direct.url);

  const missing = Array.from({ length: 5000 }, (_, i) => ({
    hash: (i.toString(16).padStart(8, '0') + 'e'.repeat(56)).slice(0, 64),
    sizeBytes: 1000n,
  }));
  // Uploaded through the cacheless edge, so no edge's cache knows them yet.
  const present = await uploadSmallBlobs(variants.find((v) => v.label === 'edge-nocache')!.c, 5000);
  const presentDirect = await uploadSmallBlobs(viaNode, 5000);
  const digests = [...present, ...missing];

  const fm = async (label: string) => {
    const first = new Map<string, number[]>();
    const repeat = new Map<string, number[]>();
    for (let i = 0; i < Math.min(2, runs); i++) {
      if (i > 0) await sleep(DEFAULT_EXISTENCE_CACHE_TTL_MS + 200);
      for (const v of variants) first.set(v.label, [...(first.get(v.label) ?? []), await findMissingMs(v.c, digests, 1)]);
    }
    for (let i = 0; i < runs; i++) {
      for (const v of variants) repeat.set(v.label, [...(repeat.get(v.label) ?? []), await findMissingMs(v.c, digests, 1)]);
    }
    for (const v of variants) {
      row(`${v.label}: FindMissingBlobs 10k, ${label}, first`, fmt(median(first.get(v.label)!), 1), 'ms');
      row(`${v.label}: FindMissingBlobs 10k, ${label}, repeat`, fmt(median(repeat.get(v.label)!), 1), 'ms');
    }
  };
  if (want('fm-start')) await fm('start-up window');
  row('direct: FindMissingBlobs 10k', fmt(await findMissingMs(viaNode, [...presentDirect, ...missing], runs), 1), 'ms');

  if (want('fm-steady') || want('gar') || want('fm-change')) {
    const wait = startedAt + windowMs + 500 - Date.now();
    console.error(`  (waiting ${Math.round(wait / 1000)} s for the start-up window to close)`);
    await sleep(Math.max(0, wait));
  }
  if (want('fm-steady')) {
    await sleep(DEFAULT_EXISTENCE_CACHE_TTL_MS);
    await fm('no window');
  }
  if (want('gar')) {
    // Alternating 3 s slices, summed per variant.
    const rate = new Map<string, number[]>();
    for (let i = 0; i < 3; i++) {
      for (const v of [...variants, { label: 'direct', c: viaNode }]) {
        rate.set(v.label, [...(rate.get(v.label) ?? []), await getActionResultRate(v.c, 32, 3)]);
      }
    }
    for (const [label, r] of rate) row(`${label}: GetActionResult c=32`, fmt(median(r)), 'calls/s');
  }
  if (want('fm-change')) {
    const a = shards[0]!.node;
    process.kill(a.pid, 'SIGSTOP');
    await sleep(2000);
    process.kill(a.pid, 'SIGCONT');
    await sleep(3000);
    await sleep(DEFAULT_EXISTENCE_CACHE_TTL_MS);
    await fm("within shard-a's breaker-change window");
  }

  console.log('\n| measurement | value | unit |\n| --- | ---: | --- |');
  for (const [w, v, u] of rows) console.log(`| ${w} | ${v} | ${u} |`);
} finally {
  await Promise.allSettled(nodes.map((n) => n.stop()));
  await rm(root, { recursive: true, force: true });
}
