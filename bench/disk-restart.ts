// Restart cost of the disk store: fills a temp directory with small blobs
// through a DiskStore, closes it, then times DiskStore.open() on the same
// directory (index rebuilt from a directory scan) and the memory the index
// takes. Prints a markdown table.
//
//   npx node bench/disk-restart.ts [blobs=100000] [runs=3]
//
// The page cache is warm (the files were just written); a cold start after a
// reboot adds the disk's metadata read time.
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Digest } from '../src/digest.ts';
import { DiskStore } from '../src/stores/disk-store.ts';
import { once } from '../src/streams.ts';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const BLOBS = Number(process.argv[2] ?? 100_000);
const RUNS = Number(process.argv[3] ?? 3);
const BLOB_BYTES = 100;
const WRITE_CONCURRENCY = 64;
const MAX_SIZE = 10 * 1024 ** 3;

function blob(i: number): { digest: Digest; data: Uint8Array } {
  const data = Buffer.alloc(BLOB_BYTES, 0);
  data.writeUInt32LE(i, 0);
  return { digest: { hash: createHash('sha256').update(data).digest('hex'), size: data.byteLength }, data };
}

function mib(n: number): string {
  return (n / 1024 ** 2).toFixed(1);
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'disk-restart-'));
  const rows: string[][] = [];
  try {
    // fsync off: this measures restart, not write durability.
    const writer = await DiskStore.open({ path: dir, maxSizeBytes: MAX_SIZE, contentAddressed: true, fsync: false });
    const tw = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: WRITE_CONCURRENCY }, async () => {
        while (next < BLOBS) {
          const { digest, data } = blob(next++);
          await writer.put(digest, once(data));
        }
      }),
    );
    const writeMs = performance.now() - tw;
    await writer.close();
    rows.push(['write (fsync off, 64 concurrent)', `${BLOBS}`, writeMs.toFixed(0), '', '']);

    const probe = Array.from({ length: 10_000 }, (_, i) => blob(i * 7).digest);
    for (let run = 1; run <= RUNS; run++) {
      gc();
      const before = process.memoryUsage();
      const t0 = performance.now();
      const store = await DiskStore.open({ path: dir, maxSizeBytes: MAX_SIZE, contentAddressed: true });
      const openMs = performance.now() - t0;
      gc();
      const after = process.memoryUsage();
      const d = store.describe();
      if (d.blobs !== BLOBS) throw new Error(`expected ${BLOBS} blobs after reopen, index has ${String(d.blobs)}`);
      rows.push([
        `open #${run} (rebuild index)`,
        `${d.blobs}`,
        openMs.toFixed(0),
        mib(after.heapUsed - before.heapUsed),
        mib(after.rss - before.rss),
      ]);
      if (run === RUNS) {
        for (const label of ['first call', 'warm']) {
          const tf = performance.now();
          const missing = await store.findMissing(probe);
          const fmMs = performance.now() - tf;
          if (missing.length !== 0) throw new Error(`findMissing reported ${missing.length} present blobs missing`);
          rows.push([`findMissing of ${probe.length} present digests (${label})`, `${d.blobs}`, fmMs.toFixed(1), '', '']);
        }
      }
      await store.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }

  const header = ['step', 'blobs', 'ms', 'heap delta MiB', 'rss delta MiB'];
  console.log(`DiskStore restart, ${BLOBS} blobs of ${BLOB_BYTES} bytes, node ${process.version}\n`);
  console.log(`| ${header.join(' | ')} |`);
  console.log(`| ${header.map((h, i) => (i === 0 ? '---' : '---:')).join(' | ')} |`);
  for (const r of rows) console.log(`| ${r.join(' | ')} |`);
}

await main();
