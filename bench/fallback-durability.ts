// What the fallback pair's durability modes cost on the healthy path (issue
// 9): two clusters shaped like config.json (an edge whose CAS and AC trees
// are fallback { primary: sharding over three storage-node shards,
// secondary: a storage node }, built by test/helpers/cluster.ts), one with
// `durability: "async"`, one with `"sync"`, measured alternately in one run
// with a real gRPC client (connect-node) from this process:
//   - write throughput: ByteStream Write of a BENCH_DURABILITY_BLOB_MIB
//     (default 64) MiB blob in 64 KiB messages;
//   - write latency: BENCH_DURABILITY_SMALL (default 400) sequential 4 KiB
//     ByteStream Writes, p50 and p99.
// In async mode each write is followed by its background replication; the
// next measurement starts only once the secondary holds the blob, so the
// copy does not compete with it (the cost async defers is not hidden: it is
// reported as its own row).
//
// Run as part of `npm run bench` (bench/run.ts appends these rows) or alone:
// `node bench/fallback-durability.ts`. BENCH_RUNS (3) runs of each.
import { createHash, randomBytes } from 'node:crypto';
import { create } from '@bufbuild/protobuf';
import { setTimeout as sleep } from 'node:timers/promises';
import { WriteRequestSchema } from '../gen/google/bytestream/bytestream_pb.ts';
import { type Cluster, startCluster } from '../test/helpers/cluster.ts';
import { type BigBlob, clients, type Clients, fmt, makeBlob, median, MiB, writeMiBps } from './reapi-client.ts';

export type Row = [what: string, value: string, unit: string];

type Mode = 'async' | 'sync';
const MODES: readonly Mode[] = ['async', 'sync'];

export interface DurabilityBenchOptions {
  readonly blobMiB: number;
  readonly runs: number;
  /** Small writes per run for the latency figures. */
  readonly smallWrites: number;
  readonly onRow?: (row: Row) => void;
}

async function onSecondary(c: Clients, hash: string, size: number): Promise<boolean> {
  const res = await c.cas.findMissingBlobs({ blobDigests: [{ hash, sizeBytes: BigInt(size) }] });
  return res.missingBlobDigests.length === 0;
}

async function waitOnSecondary(c: Clients, hash: string, size: number): Promise<number> {
  const t0 = performance.now();
  const deadline = Date.now() + 300_000;
  while (!(await onSecondary(c, hash, size))) {
    if (Date.now() > deadline) throw new Error(`blob ${hash} never reached the secondary`);
    await sleep(10);
  }
  return (performance.now() - t0) / 1000;
}

/** One small ByteStream Write; ms. */
async function smallWriteMs(c: Clients, data: Uint8Array, hash: string): Promise<number> {
  const resourceName = `uploads/${crypto.randomUUID()}/blobs/${hash}/${data.byteLength}`;
  const t0 = performance.now();
  async function* requests() {
    yield create(WriteRequestSchema, { resourceName, writeOffset: 0n, data, finishWrite: true });
  }
  const res = await c.bs.write(requests());
  const ms = performance.now() - t0;
  if (res.committedSize !== BigInt(data.byteLength)) throw new Error(`committed ${res.committedSize}`);
  return ms;
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

export async function durabilityBench(opts: DurabilityBenchOptions): Promise<Row[]> {
  const rows: Row[] = [];
  const row = (what: string, value: string, unit: string) => {
    const r: Row = [what, value, unit];
    rows.push(r);
    opts.onRow?.(r);
  };
  const clusters = new Map<Mode, Cluster>();
  try {
    for (const mode of MODES) clusters.set(mode, await startCluster({ fallback: { durability: mode }, healthCheckIntervalMs: 1000 }));
    const edge = new Map(MODES.map((m) => [m, clients(clusters.get(m)!.edge.url)] as const));
    const secondary = new Map(MODES.map((m) => [m, clients(clusters.get(m)!.secondary!.url)] as const));

    const big = makeBlob(opts.blobMiB * MiB);
    let n = 0;
    const variant = (): BigBlob => {
      big.data.writeUInt32LE(n++, 0);
      return { data: big.data, hash: createHash('sha256').update(big.data).digest('hex') };
    };
    const mibps = { async: [] as number[], sync: [] as number[] };
    const replicationSecs: number[] = [];
    const latencies = { async: [] as number[], sync: [] as number[] };
    for (let run = 0; run < opts.runs; run++) {
      // Alternate which mode goes first, so neither always runs on a warmer machine.
      for (const mode of run % 2 === 0 ? MODES : [...MODES].reverse()) {
        const v = variant();
        mibps[mode].push(await writeMiBps(edge.get(mode)!, v, 64 * 1024));
        const lag = await waitOnSecondary(secondary.get(mode)!, v.hash, v.data.length);
        if (mode === 'async') replicationSecs.push(lag);
        let last = { hash: '', size: 0 };
        for (let i = 0; i < opts.smallWrites; i++) {
          const data = randomBytes(4096);
          const hash = createHash('sha256').update(data).digest('hex');
          latencies[mode].push(await smallWriteMs(edge.get(mode)!, data, hash));
          last = { hash, size: data.byteLength };
        }
        await waitOnSecondary(secondary.get(mode)!, last.hash, last.size);
        await sleep(200); // let the async mode's last copies finish
      }
    }
    const ratio = (a: number, b: number) => fmt(a / b, 2);
    const [wa, ws] = [median(mibps.async), median(mibps.sync)];
    row(`Fallback durability: ByteStream Write ${opts.blobMiB} MiB via edge, async`, fmt(wa), 'MiB/s');
    row(`Fallback durability: ByteStream Write ${opts.blobMiB} MiB via edge, sync`, fmt(ws), 'MiB/s');
    row('Fallback durability: write throughput, sync / async', ratio(ws, wa), 'x');
    row(`Fallback durability: async, background replication of the ${opts.blobMiB} MiB blob after its ack`, fmt(median(replicationSecs), 2), 's');
    for (const p of [50, 99]) {
      const [la, ls] = [percentile(latencies.async, p), percentile(latencies.sync, p)];
      row(`Fallback durability: 4 KiB ByteStream Write latency p${p}, async`, fmt(la, 2), 'ms');
      row(`Fallback durability: 4 KiB ByteStream Write latency p${p}, sync`, fmt(ls, 2), 'ms');
      row(`Fallback durability: 4 KiB write latency p${p}, sync / async`, ratio(ls, la), 'x');
    }
  } finally {
    await Promise.allSettled([...clusters.values()].map((c) => c.stop()));
  }
  return rows;
}

export function durabilityOptionsFromEnv(): DurabilityBenchOptions {
  return {
    blobMiB: Number(process.env.BENCH_DURABILITY_BLOB_MIB ?? 64),
    runs: Number(process.env.BENCH_RUNS ?? 3),
    smallWrites: Number(process.env.BENCH_DURABILITY_SMALL ?? 400),
    onRow: ([w, v, u]) => console.error(`  ${w}: ${v} ${u}`),
  };
}

if (import.meta.main) {
  const rows = await durabilityBench(durabilityOptionsFromEnv());
  console.log('\n| measurement | value | unit |\n| --- | ---: | --- |');
  for (const [w, v, u] of rows) console.log(`| ${w} | ${v} | ${u} |`);
}
