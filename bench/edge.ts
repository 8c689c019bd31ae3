// The edge benchmark: an edge process sharding over three storage-node
// processes (test/helpers/cluster.ts) against one storage node reached
// directly (the default node config: disk CAS, completeness-checked disk AC),
// with the same real gRPC client (connect-node) from this process. Prints
// edge vs direct figures and their ratio, then the failover times measured
// with the fault-injection load of test/e2e/edge-faults.test.ts.
//
// Run as part of `npm run bench` (bench/run.ts appends these rows to its
// table) or alone: `node bench/edge.ts`. BENCH_BLOB_MIB (default 256) sets
// the ByteStream blob size, BENCH_RUNS (default 3) the runs per figure.
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { startCluster } from '../test/helpers/cluster.ts';
import type { Cluster } from '../test/helpers/cluster.ts';
import { failoverFigures, ShardKeyLoad, waitForTrafficOn } from '../test/helpers/edge-load.ts';
import { spawnNode } from '../test/helpers/spawn-node.ts';
import {
  type BigBlob,
  clients,
  findMissingMs,
  fmt,
  getActionResultRate,
  makeBlob,
  median,
  MiB,
  readMiBps,
  uploadSmallBlobs,
  writeMiBps,
} from './reapi-client.ts';

export type Row = [what: string, value: string, unit: string];

const CHUNK = 64 * 1024;

export interface EdgeBenchOptions {
  readonly blobMiB: number;
  readonly runs: number;
  /** Called for each row as it is measured (progress on stderr). */
  readonly onRow?: (row: Row) => void;
}

export async function edgeBench(opts: EdgeBenchOptions): Promise<Row[]> {
  const rows: Row[] = [];
  const row = (what: string, value: string, unit: string) => {
    rows.push([what, value, unit]);
    opts.onRow?.([what, value, unit]);
  };
  const ratio = (edge: number, direct: number) => fmt(edge / direct, 2);

  const direct = await spawnNode({ config: { logLevel: 'info' } }); // info: spawnNode reads the port from the listening line
  let cluster: Cluster | undefined;
  try {
    // The edge probes next-ranked shards on a miss for probeWindowMs after
    // start and after any breaker transition (10 min by default); a short
    // window here lets FindMissing be measured both with and without it.
    const probeWindowMs = 20_000;
    cluster = await startCluster({ edgeLogLevel: 'info', probeWindowMs });
    const startedAt = Date.now();
    const viaEdge = clients(cluster.edge.url);
    const viaNode = clients(direct.url);

    // FindMissing first, while the probe window after start is still open.
    const missing = Array.from({ length: 5000 }, (_, i) => ({
      hash: (i.toString(16).padStart(8, '0') + 'e'.repeat(56)).slice(0, 64),
      sizeBytes: 1000n,
    }));
    const presentEdge = await uploadSmallBlobs(viaEdge, 5000);
    const presentDirect = await uploadSmallBlobs(viaNode, 5000);
    const fmProbing = await findMissingMs(viaEdge, [...presentEdge, ...missing]);
    const fmDirect = await findMissingMs(viaNode, [...presentDirect, ...missing]);

    // ByteStream: each run writes a variant (one byte changed) so no write
    // completes early on an existing digest; edge and direct alternate so
    // machine noise hits both alike.
    const blob = makeBlob(opts.blobMiB * MiB);
    const variant = (i: number): BigBlob => {
      blob.data[0] = i;
      return { data: blob.data, hash: createHash('sha256').update(blob.data).digest('hex') };
    };
    const w = { edge: [] as number[], direct: [] as number[] };
    const r = { edge: [] as number[], direct: [] as number[] };
    for (let i = 0; i < opts.runs; i++) {
      for (const [name, c] of [['direct', viaNode], ['edge', viaEdge]] as const) {
        const v = variant(2 * i + (name === 'edge' ? 1 : 0));
        w[name].push(await writeMiBps(c, v, CHUNK));
        r[name].push(await readMiBps(c, v));
      }
    }
    const mb = `${opts.blobMiB} MiB, 64 KiB messages`;
    row(`edge: ByteStream Write ${mb}`, fmt(median(w.edge)), 'MiB/s');
    row(`direct: ByteStream Write ${mb}`, fmt(median(w.direct)), 'MiB/s');
    row('edge/direct: ByteStream Write', ratio(median(w.edge), median(w.direct)), 'ratio (target >= 0.8)');
    row(`edge: ByteStream Read ${opts.blobMiB} MiB`, fmt(median(r.edge)), 'MiB/s');
    row(`direct: ByteStream Read ${opts.blobMiB} MiB`, fmt(median(r.direct)), 'MiB/s');
    row('edge/direct: ByteStream Read', ratio(median(r.edge), median(r.direct)), 'ratio (target >= 0.8)');

    await sleep(Math.max(0, startedAt + probeWindowMs + 500 - Date.now()));
    const fmSteady = await findMissingMs(viaEdge, [...presentEdge, ...missing]);
    row('edge: FindMissingBlobs, 10,000 digests over 3 shards (half present), probing window closed', fmt(fmSteady, 1), 'ms');
    row('edge: the same within the probe window (misses also asked on 2 next-ranked shards)', fmt(fmProbing, 1), 'ms');
    row('direct: FindMissingBlobs, 10,000 digests (half present)', fmt(fmDirect, 1), 'ms');
    row('direct/edge: FindMissingBlobs latency, probing window closed', ratio(fmDirect, fmSteady), 'ratio (target >= 0.8)');

    const garEdge = await getActionResultRate(viaEdge, 32, 5);
    const garDirect = await getActionResultRate(viaNode, 32, 5);
    row('edge: GetActionResult, concurrency 32 (completeness-checked at the edge)', fmt(garEdge), 'calls/s');
    row('direct: GetActionResult, concurrency 32', fmt(garDirect), 'calls/s');
    row('edge/direct: GetActionResult', ratio(garEdge, garDirect), 'ratio (target >= 0.8)');

    // Failover, with the load of test/e2e/edge-faults.test.ts (one op every
    // 100 ms for the faulty shard's keys). Different shards, so the second
    // fault does not inherit the first one's grown backoff.
    for (const fault of ['killed', 'blackholed'] as const) {
      const c = cluster;
      const victim = c.shard(fault === 'killed' ? 'shard-a' : 'shard-b');
      const load = new ShardKeyLoad({ edgeUrl: c.edge.url, instanceName: 'bench', shard: victim.name, owner: c.owner });
      load.start();
      await sleep(1500);
      const faultAt = Date.now();
      if (fault === 'killed') await victim.kill('SIGKILL');
      else victim.pause();
      await sleep(3000);
      const recoverAt = Date.now();
      if (fault === 'killed') await victim.restart();
      else victim.resume();
      const upAt = Date.now();
      const returned = await waitForTrafficOn(c.edge.url, 'bench', victim.name, c.shards, c.owner, 60_000);
      const records = await load.stop();
      const f = failoverFigures(records, faultAt, recoverAt, 1500);
      const open = c.transitions().find((x) => x.shard === victim.name && x.tree === 'cas' && x.to === 'open' && x.time >= faultAt);
      const target = fault === 'killed' ? 'target < 1 s' : 'target < 3 s';
      row(`${fault} shard: fault -> 100% success for its keys (${f.failedAfterFault} of ${f.opsAfterFault} ops failed)`, fmt(f.detectMs), `ms (${target})`);
      row(`${fault} shard: fault -> breaker open (edge log)`, open === undefined ? 'never' : fmt(open.time - faultAt), 'ms');
      if (fault === 'blackholed') row('blackholed shard: slowest op caught in flight (waits for the 5 s remote timeout or the SIGCONT at 3 s)', fmt(f.maxLatencyMs), 'ms');
      row(
        `${fault} shard: ${fault === 'killed' ? 'listening again' : 'SIGCONT'} after a 3 s outage -> traffic returned`,
        returned === undefined ? 'never' : fmt(returned - upAt),
        'ms',
      );
    }
  } finally {
    await Promise.allSettled([cluster?.stop(), direct.stop()]);
  }
  return rows;
}

export function printTable(rows: readonly Row[]): void {
  console.log('\n| measurement | value | unit |\n| --- | ---: | --- |');
  for (const [w, v, u] of rows) console.log(`| ${w} | ${v} | ${u} |`);
}

if (import.meta.main) {
  const rows = await edgeBench({
    blobMiB: Number(process.env.BENCH_BLOB_MIB ?? 256),
    runs: Number(process.env.BENCH_RUNS ?? 3),
    onRow: ([w, v, u]) => console.error(`  ${w}: ${v} ${u}`),
  });
  printTable(rows);
}
