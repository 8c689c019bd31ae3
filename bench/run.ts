// `npm run bench`: first the wire benchmark of issue 8 (bench/wire.ts: the
// C-core gRPC client against the edge, a storage node and two anchors, every
// target ratio marked met / NOT met; BENCH_MEMORY=1 and BENCH_BAZEL=1 add its
// slow parts), then throughput and latency of a storage node measured with a
// real gRPC client (connect-node) from a separate process, printed as a
// markdown table next to node:crypto's sha256 speed (the per-core ceiling for
// verified writes), followed by the edge's figures (bench/edge.ts): edge over
// three shards vs one storage node direct, and failover times.
// Each figure is the median of several runs; on a shared 2-core machine
// expect +-40% noise between runs, so compare ratios taken in one run.
import { createHash } from 'node:crypto';
import { spawnNode } from '../test/helpers/spawn-node.ts';
import { edgeBench } from './edge.ts';
import { fallbackBench } from './fallback.ts';
import { durabilityBench, durabilityOptionsFromEnv } from './fallback-durability.ts';
import { wireBench, wireOptionsFromEnv } from './wire.ts';
import {
  clients,
  findMissingMs,
  fmt,
  getActionResultRate,
  makeBlob,
  median,
  MiB,
  readMiBps,
  sha256MiBps,
  uploadSmallBlobs,
  writeMiBps,
} from './reapi-client.ts';

const BLOB_MiB = Number(process.env.BENCH_BLOB_MIB ?? 256);
const CHUNK = 64 * 1024;
const RUNS = Number(process.env.BENCH_RUNS ?? 3);

const rows: [string, string, string][] = [];
function row(what: string, value: string, unit: string) {
  rows.push([what, value, unit]);
  console.error(`  ${what}: ${value} ${unit}`);
}

// The wire benchmark (bench/wire.ts) first; its target and verdict go in the unit column.
for (const r of await wireBench(wireOptionsFromEnv())) {
  rows.push([`wire: ${r.what}`, r.value, r.target ? `${r.unit} (target ${r.target}: ${r.met})` : r.unit]);
}

const blob = makeBlob(BLOB_MiB * MiB);
row('node:crypto sha256, 64 KiB updates', fmt(median([1, 2, 3].map(() => sha256MiBps(blob.data, CHUNK)))), 'MiB/s');

const node = await spawnNode({ config: { logLevel: 'info' } }); // info: spawnNode reads the port from the listening line
try {
  const c = clients(node.url);
  const writes: number[] = [];
  const reads: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    // Rewriting an existing digest would complete early without sending the
    // data, so each run writes a variant of the blob (one byte changed).
    blob.data[0] = i;
    const variant = { data: blob.data, hash: createHash('sha256').update(blob.data).digest('hex') };
    writes.push(await writeMiBps(c, variant, CHUNK));
    reads.push(await readMiBps(c, variant));
  }
  row(`ByteStream Write ${BLOB_MiB} MiB, 64 KiB messages (storage node, disk)`, fmt(median(writes)), 'MiB/s');
  row(`ByteStream Read ${BLOB_MiB} MiB (storage node, disk)`, fmt(median(reads)), 'MiB/s');

  const present = await uploadSmallBlobs(c, 5000);
  const missing = Array.from({ length: 5000 }, (_, i) => ({
    hash: (i.toString(16).padStart(8, '0') + 'f'.repeat(56)).slice(0, 64),
    sizeBytes: 1000n,
  }));
  row('FindMissingBlobs, 10,000 digests (half present)', fmt(await findMissingMs(c, [...present, ...missing]), 1), 'ms');
  row('GetActionResult, concurrency 32', fmt(await getActionResultRate(c, 32, 5)), 'calls/s');
} finally {
  await node.stop();
}

// The edge over three shards vs one storage node, and failover (bench/edge.ts).
rows.push(...(await edgeBench({ blobMiB: BLOB_MiB, runs: RUNS, onRow: ([w, v, u]) => console.error(`  ${w}: ${v} ${u}`) })));

// The fallback pair: replication throughput and the healthy-path cost (bench/fallback.ts).
rows.push(...(await fallbackBench({ blobMiB: BLOB_MiB, runs: RUNS, onRow: ([w, v, u]) => console.error(`  ${w}: ${v} ${u}`) })));

// The fallback pair's durability modes, async vs sync, through an edge shaped like config.json (bench/fallback-durability.ts).
rows.push(...(await durabilityBench(durabilityOptionsFromEnv())));

console.log('\n| measurement | value | unit |\n| --- | ---: | --- |');
for (const [w, v, u] of rows) console.log(`| ${w} | ${v} | ${u} |`);
