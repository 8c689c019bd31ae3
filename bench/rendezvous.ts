// `node bench/rendezvous.ts`: cost of weighted rendezvous placement, in ns
// per key, for shard sets of several sizes, printed as a markdown table.
// rank() is the convenience form (names in, names out); Placement.order() is
// what ShardingStore calls on its hot path (shard seeds precomputed, indices
// out). Keys are SHA-256 hex digests, as in the CAS and the AC.
import { createHash } from 'node:crypto';
import { Placement, rank } from '../src/stores/rendezvous.ts';

const KEYS = Number(process.env.BENCH_KEYS ?? 200_000);
const RUNS = Number(process.env.BENCH_RUNS ?? 5);

const keys = Array.from({ length: KEYS }, (_, i) => createHash('sha256').update(`bench key ${i}`).digest('hex'));

/** Median ns per key of `fn` over all keys. */
function nsPerKey(fn: (key: string) => unknown): number {
  let sink = 0;
  for (let i = 0; i < 10_000; i++) sink += fn(keys[i % KEYS]!) === undefined ? 1 : 0; // warm up
  const runs: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const start = process.hrtime.bigint();
    for (const k of keys) sink += fn(k) === undefined ? 1 : 0;
    runs.push(Number(process.hrtime.bigint() - start) / KEYS);
  }
  if (sink < 0) console.log(sink);
  return runs.sort((a, b) => a - b)[Math.floor(runs.length / 2)]!;
}

const rows: string[] = ['| shards | rank() ns/key | Placement.order() ns/key |', '|---:|---:|---:|'];
for (const n of [3, 10, 50]) {
  const shards = Array.from({ length: n }, (_, i) => ({ name: `shard-${i}`, weight: 1 + (i % 3) }));
  const placement = new Placement(shards);
  rows.push(`| ${n} | ${nsPerKey((k) => rank(k, shards)).toFixed(0)} | ${nsPerKey((k) => placement.order(k)).toFixed(0)} |`);
}
console.log(rows.join('\n'));
