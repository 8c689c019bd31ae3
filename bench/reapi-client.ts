// Client-side workloads shared by the benchmarks: each takes a base URL of a
// REAPI server (a storage node or an edge) and measures one thing with a real
// gRPC client (connect-node over HTTP/2).
import { createHash, randomBytes } from 'node:crypto';
import { create } from '@bufbuild/protobuf';
import { type Client, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import {
  ActionCache,
  ContentAddressableStorage,
} from '../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../gen/google/bytestream/bytestream_pb.ts';

export const MiB = 1024 * 1024;

export interface Clients {
  cas: Client<typeof ContentAddressableStorage>;
  ac: Client<typeof ActionCache>;
  bs: Client<typeof ByteStream>;
}

export function clients(baseUrl: string): Clients {
  const transport = createGrpcTransport({ baseUrl, readMaxBytes: 64 * MiB, writeMaxBytes: 64 * MiB });
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
  };
}

export interface BigBlob {
  data: Buffer;
  hash: string;
}

export function makeBlob(bytes: number): BigBlob {
  const data = randomBytes(bytes);
  return { data, hash: createHash('sha256').update(data).digest('hex') };
}

/** sha256 throughput of node:crypto over `blob` in `chunk`-sized updates, MiB/s. */
export function sha256MiBps(blob: Buffer, chunk: number): number {
  const t0 = performance.now();
  const h = createHash('sha256');
  for (let o = 0; o < blob.length; o += chunk) h.update(blob.subarray(o, o + chunk));
  h.digest();
  return blob.length / MiB / ((performance.now() - t0) / 1000);
}

/** ByteStream Write of the blob in `chunk`-sized messages; MiB/s. */
export async function writeMiBps(c: Clients, blob: BigBlob, chunk: number): Promise<number> {
  const name = `bench/uploads/${crypto.randomUUID()}/blobs/${blob.hash}/${blob.data.length}`;
  async function* requests() {
    for (let o = 0; o < blob.data.length; o += chunk) {
      const end = Math.min(blob.data.length, o + chunk);
      yield create(WriteRequestSchema, {
        resourceName: o === 0 ? name : '',
        writeOffset: BigInt(o),
        data: blob.data.subarray(o, end),
        finishWrite: end === blob.data.length,
      });
    }
  }
  const t0 = performance.now();
  const res = await c.bs.write(requests());
  const secs = (performance.now() - t0) / 1000;
  if (res.committedSize !== BigInt(blob.data.length)) throw new Error(`committed ${res.committedSize}`);
  return blob.data.length / MiB / secs;
}

/** ByteStream Read of the whole blob, checking every byte arrived; MiB/s. */
export async function readMiBps(c: Clients, blob: BigBlob): Promise<number> {
  const t0 = performance.now();
  const h = createHash('sha256');
  let n = 0;
  for await (const res of c.bs.read({ resourceName: `bench/blobs/${blob.hash}/${blob.data.length}` })) {
    n += res.data.length;
    h.update(res.data);
  }
  const secs = (performance.now() - t0) / 1000;
  if (n !== blob.data.length || h.digest('hex') !== blob.hash) throw new Error('read returned wrong bytes');
  return n / MiB / secs;
}

/** Uploads `count` small blobs and returns their digests. */
export async function uploadSmallBlobs(c: Clients, count: number, size = 64) {
  const digests: { hash: string; sizeBytes: bigint }[] = [];
  for (let i = 0; i < count; i += 500) {
    const requests = [];
    for (let j = i; j < Math.min(count, i + 500); j++) {
      const data = randomBytes(size);
      const digest = { hash: createHash('sha256').update(data).digest('hex'), sizeBytes: BigInt(size) };
      digests.push(digest);
      requests.push({ digest, data });
    }
    const res = await c.cas.batchUpdateBlobs({ instanceName: 'bench', requests });
    for (const r of res.responses) if (r.status?.code) throw new Error(`upload failed: ${r.status.message}`);
  }
  return digests;
}

/** Median latency (ms) of FindMissingBlobs over `digests`, `runs` times. */
export async function findMissingMs(c: Clients, digests: { hash: string; sizeBytes: bigint }[], runs = 7) {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await c.cas.findMissingBlobs({ instanceName: 'bench', blobDigests: digests });
    times.push(performance.now() - t0);
  }
  return median(times);
}

/** GetActionResult calls per second at the given concurrency for `seconds`. */
export async function getActionResultRate(c: Clients, concurrency: number, seconds: number): Promise<number> {
  const data = randomBytes(100);
  const out = { hash: createHash('sha256').update(data).digest('hex'), sizeBytes: 100n };
  await c.cas.batchUpdateBlobs({ instanceName: 'bench', requests: [{ digest: out, data }] });
  const actionDigest = { hash: createHash('sha256').update(randomBytes(32)).digest('hex'), sizeBytes: 140n };
  await c.ac.updateActionResult({
    instanceName: 'bench',
    actionDigest,
    actionResult: { outputFiles: [{ path: 'out/a', digest: out }], exitCode: 0 },
  });
  let calls = 0;
  const deadline = performance.now() + seconds * 1000;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        await c.ac.getActionResult({ instanceName: 'bench', actionDigest });
        calls++;
      }
    }),
  );
  return calls / ((performance.now() - t0) / 1000);
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

export function fmt(x: number, digits = 0): string {
  return x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
