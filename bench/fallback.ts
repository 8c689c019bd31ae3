// The fallback benchmark: what the fallback pair costs and how fast it
// catches up. Two storage-node processes (primary, secondary) and two edge
// processes over them, each `node src/main.ts`:
//   - fallback edge: CAS = fallback { primary: remote, secondary: remote },
//     AC = completenessChecking over the same shape (as in config.json);
//   - direct edge:   CAS = remote primary, AC = completenessChecking over it.
// Measured with a real gRPC client (connect-node) from this process:
//   1. Replication throughput: the secondary is frozen (SIGSTOP), 2,000 x
//      64 KiB blobs are written through the fallback edge, the secondary is
//      resumed, and the time until the edge's replication queue is empty
//      (admin /api/state) and the secondary holds every blob (FindMissing on
//      it directly) gives blobs/s and MiB/s.
//   2. The healthy-path cost: ByteStream Write/Read of BENCH_BLOB_MIB MiB and
//      GetActionResult calls/s at concurrency 32, fallback edge vs direct
//      edge, and their ratio. A write through the fallback edge is followed
//      by its background replication (a read from the primary and a write to
//      the secondary); the read is timed only after that has finished, so
//      the two do not compete for the 2 cores.
//
// Run as part of `npm run bench` (bench/run.ts appends these rows) or alone:
// `node bench/fallback.ts`. BENCH_BLOB_MIB (default 256), BENCH_RUNS (3),
// BENCH_REPLICATION_BLOBS (2000).
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { mapLimit } from '../src/concurrency.ts';
import { spawnNode } from '../test/helpers/spawn-node.ts';
import type { SpawnedNode } from '../test/helpers/spawn-node.ts';
import { type BigBlob, clients, type Clients, fmt, getActionResultRate, makeBlob, median, MiB, readMiBps, writeMiBps } from './reapi-client.ts';

export type Row = [what: string, value: string, unit: string];

const CHUNK = 64 * 1024;

export interface FallbackBenchOptions {
  readonly blobMiB: number;
  readonly runs: number;
  /** Blobs in the replication backlog. Default 2,000. */
  readonly replicationBlobs?: number;
  /** Called for each row as it is measured (progress on stderr). */
  readonly onRow?: (row: Row) => void;
}

const STORAGE_NODE = { logLevel: 'info', ac: { disk: { path: 'ac', maxSizeBytes: 256 * MiB } } };

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((res, rej) => {
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => res());
  });
  const port = (s.address() as { port: number }).port;
  await new Promise((res) => s.close(res));
  return port;
}

interface ReplicationState {
  queued: number;
  inFlight: number;
  done: number;
  failed: number;
  overflow: number;
}

/** The CAS tree's fallback replication counters, from the edge's admin /api/state. */
async function replicationState(adminUrl: string): Promise<ReplicationState> {
  const res = await fetch(`${adminUrl}/api/state`);
  if (!res.ok) throw new Error(`GET /api/state: ${res.status}`);
  const state = (await res.json()) as { trees: { cas: unknown } };
  const find = (node: unknown): ReplicationState | undefined => {
    if (typeof node !== 'object' || node === null) return undefined;
    const n = node as { kind?: string; replication?: ReplicationState; children?: unknown[] };
    if (n.kind === 'fallback' && n.replication !== undefined) return n.replication;
    for (const c of n.children ?? []) {
      const r = find(c);
      if (r !== undefined) return r;
    }
    return undefined;
  };
  const r = find(state.trees.cas);
  if (r === undefined) throw new Error('no fallback store in the CAS tree of /api/state');
  return r;
}

async function missingCount(c: Clients, digests: { hash: string; sizeBytes: bigint }[]): Promise<number> {
  let n = 0;
  for (let i = 0; i < digests.length; i += 1000) {
    const res = await c.cas.findMissingBlobs({ instanceName: '', blobDigests: digests.slice(i, i + 1000) });
    n += res.missingBlobDigests.length;
  }
  return n;
}

async function waitUntil(what: string, timeoutMs: number, cond: () => Promise<boolean>, pollMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(pollMs);
  }
}

export async function fallbackBench(opts: FallbackBenchOptions): Promise<Row[]> {
  const rows: Row[] = [];
  const row = (what: string, value: string, unit: string) => {
    const r: Row = [what, value, unit];
    rows.push(r);
    opts.onRow?.(r);
  };
  const root = await mkdtemp(join(tmpdir(), 'reapi-bench-fallback-'));
  const procs: SpawnedNode[] = [];
  const spawn = async (name: string, config: Record<string, unknown>, port?: number) => {
    const p = await spawnNode({ dir: join(root, name), config, ...(port === undefined ? {} : { port }) });
    procs.push(p);
    return p;
  };
  for (const d of ['primary', 'secondary', 'edge-fallback', 'edge-direct']) await mkdir(join(root, d));
  try {
    const primary = await spawn('primary', STORAGE_NODE);
    const secondary = await spawn('secondary', STORAGE_NODE);
    const remote = (url: string) => ({ remote: { url } });
    const fallback = (tree: string) => ({
      fallback: { primary: remote(primary.url), secondary: remote(secondary.url), journalDir: `journal-${tree}` },
    });
    const adminPort = await freePort();
    const edgeFallback = await spawn(
      'edge-fallback',
      {
        logLevel: 'warn',
        admin: { listen: `127.0.0.1:${adminPort}` },
        cas: fallback('cas'),
        ac: { completenessChecking: { backend: fallback('ac') } },
      },
      await freePort(),
    );
    const edgeDirect = await spawn(
      'edge-direct',
      { logLevel: 'warn', cas: remote(primary.url), ac: { completenessChecking: { backend: remote(primary.url) } } },
      await freePort(),
    );
    const adminUrl = `http://127.0.0.1:${adminPort}`;
    const viaFallback = clients(edgeFallback.url);
    const viaDirect = clients(edgeDirect.url);
    const onSecondary = clients(secondary.url);

    // 1. Replication throughput draining a backlog.
    const count = opts.replicationBlobs ?? 2000;
    const size = 64 * 1024;
    const blobs = Array.from({ length: count }, () => {
      const data = randomBytes(size);
      return { data, digest: { hash: createHash('sha256').update(data).digest('hex'), sizeBytes: BigInt(size) } };
    });
    process.kill(secondary.pid, 'SIGSTOP');
    try {
      await mapLimit(blobs, 8, async (b) => {
        const res = await viaFallback.cas.batchUpdateBlobs({ instanceName: '', requests: [{ digest: b.digest, data: b.data }] });
        if (res.responses[0]?.status?.code) throw new Error(`upload failed: ${res.responses[0].status.message}`);
      });
      const backlog = await replicationState(adminUrl);
      if (backlog.queued + backlog.inFlight + backlog.done < count) {
        throw new Error(`replication backlog holds ${backlog.queued + backlog.inFlight} of ${count} (overflow ${backlog.overflow})`);
      }
    } finally {
      process.kill(secondary.pid, 'SIGCONT');
    }
    const t0 = performance.now();
    await waitUntil('the replication queue to empty', 300_000, async () => {
      const s = await replicationState(adminUrl);
      return s.queued === 0 && s.inFlight === 0;
    });
    const queueEmptySecs = (performance.now() - t0) / 1000;
    const digests = blobs.map((b) => b.digest);
    await waitUntil('the secondary to hold every blob', 60_000, async () => (await missingCount(onSecondary, digests)) === 0);
    const final = await replicationState(adminUrl);
    if (final.failed > 0 || final.overflow > 0) throw new Error(`replication failed ${final.failed}, overflow ${final.overflow}`);
    row(`Replication backlog drain, ${count} x 64 KiB to a resumed secondary`, fmt(count / queueEmptySecs), 'blobs/s');
    row(`Replication backlog drain, ${count} x 64 KiB`, fmt((count * size) / MiB / queueEmptySecs, 1), 'MiB/s');
    // For scale: the same blobs written straight to a storage node at the
    // replication's concurrency (4). The disk store fsyncs every blob.
    const sinkBlobs = blobs.slice(0, Math.min(count, 500)).map((b) => {
      const data = randomBytes(size);
      return { data, digest: { hash: createHash('sha256').update(data).digest('hex'), sizeBytes: BigInt(size) } };
    });
    const s0 = performance.now();
    await mapLimit(sinkBlobs, 4, (b) => onSecondary.cas.batchUpdateBlobs({ instanceName: '', requests: [{ digest: b.digest, data: b.data }] }));
    row('For scale: 64 KiB writes straight to a storage node, concurrency 4', fmt(sinkBlobs.length / ((performance.now() - s0) / 1000)), 'blobs/s');

    // 2. Healthy path: fallback edge vs direct edge.
    const blob = makeBlob(opts.blobMiB * MiB);
    const variant = (n: number): BigBlob => {
      blob.data[0] = n;
      return { data: blob.data, hash: createHash('sha256').update(blob.data).digest('hex') };
    };
    const w = { fallback: [] as number[], direct: [] as number[] };
    const r = { fallback: [] as number[], direct: [] as number[] };
    const replicationSecs: number[] = [];
    let n = 0;
    for (let i = 0; i < opts.runs; i++) {
      // Alternate which edge goes first, so neither always runs on a warmer machine.
      for (const which of i % 2 === 0 ? (['direct', 'fallback'] as const) : (['fallback', 'direct'] as const)) {
        const v = variant(n++);
        const c = which === 'fallback' ? viaFallback : viaDirect;
        w[which].push(await writeMiBps(c, v, CHUNK));
        if (which === 'fallback') {
          const r0 = performance.now();
          const d = [{ hash: v.hash, sizeBytes: BigInt(v.data.length) }];
          await waitUntil('the big blob on the secondary', 300_000, async () => (await missingCount(onSecondary, d)) === 0, 20);
          replicationSecs.push((performance.now() - r0) / 1000);
        }
        r[which].push(await readMiBps(c, v));
      }
    }
    const ratio = (a: number, b: number) => fmt(a / b, 2);
    const wf = median(w.fallback);
    const wd = median(w.direct);
    const rf = median(r.fallback);
    const rd = median(r.direct);
    row(`ByteStream Write ${opts.blobMiB} MiB via edge, direct (remote primary)`, fmt(wd), 'MiB/s');
    row(`ByteStream Write ${opts.blobMiB} MiB via edge, fallback pair`, fmt(wf), 'MiB/s');
    row('ByteStream Write, fallback / direct', ratio(wf, wd), 'x');
    row(`Background replication of the ${opts.blobMiB} MiB blob after its write`, fmt(median(replicationSecs), 2), 's');
    row(`ByteStream Read ${opts.blobMiB} MiB via edge, direct (remote primary)`, fmt(rd), 'MiB/s');
    row(`ByteStream Read ${opts.blobMiB} MiB via edge, fallback pair`, fmt(rf), 'MiB/s');
    row('ByteStream Read, fallback / direct', ratio(rf, rd), 'x');

    const gd: number[] = [];
    const gf: number[] = [];
    for (let i = 0; i < opts.runs; i++) {
      gd.push(await getActionResultRate(viaDirect, 32, 3));
      gf.push(await getActionResultRate(viaFallback, 32, 3));
    }
    row('GetActionResult via edge, concurrency 32, direct (remote primary)', fmt(median(gd)), 'calls/s');
    row('GetActionResult via edge, concurrency 32, fallback pair', fmt(median(gf)), 'calls/s');
    row('GetActionResult, fallback / direct', ratio(median(gf), median(gd)), 'x');
  } finally {
    for (const p of procs) {
      if (p.exitInfo() === undefined) process.kill(p.pid, 'SIGCONT');
      await p.stop();
    }
    await rm(root, { recursive: true, force: true });
  }
  return rows;
}

if (import.meta.main) {
  const rows = await fallbackBench({
    blobMiB: Number(process.env.BENCH_BLOB_MIB ?? 256),
    runs: Number(process.env.BENCH_RUNS ?? 3),
    replicationBlobs: Number(process.env.BENCH_REPLICATION_BLOBS ?? 2000),
    onRow: ([w, v, u]) => console.error(`  ${w}: ${v} ${u}`),
  });
  console.log('\n| measurement | value | unit |\n| --- | ---: | --- |');
  for (const [w, v, u] of rows) console.log(`| ${w} | ${v} | ${u} |`);
}
