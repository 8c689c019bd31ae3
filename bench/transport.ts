// `node bench/transport.ts`: the shard-client candidates measured in one run,
// against a storage node (spawnNode: a separate process, disk stores,
// completeness checking on) and against the python grpcio shard (C-core,
// gRPC only), printed as one markdown table with ratios to the current
// transport:
//
//   (a)  src/transport.ts: connect-node's gRPC transport over node:http2
//   (b)  test/helpers/undici-transport.ts: the Connect protocol over HTTP/1.1, undici Pool
//   (b0) connect-node's Connect transport over node:http HTTP/1.1 (reference:
//        tells the protocol's cost apart from the client library's)
//   (c)  test/helpers/undici-transport.ts: gRPC over h2c, undici Client. Fails the
//        slow-consumer test (test/stores/transport-undici.test.ts); measured
//        only to know what its speed would buy. Reads that fail are counted.
//   (d)  RemoteStore's ByteStream fast path (src/stores/remote-bytestream.ts):
//        raw node:http2 streams framed by hand (src/grpc/client-call.ts), on
//        the session of its own src/transport.ts. Measured through the store
//        itself, new RemoteStore({url, instanceName, tree: 'cas'}): put()
//        of the blob as 64 KiB chunks (passed on as 64 KiB messages, the same
//        as the others; the store's own 256 KiB coalescing never kicks in),
//        get() iterated to the end. So (d) includes the store's checks,
//        counters and stall timers, which a bare transport does not pay.
//        ByteStream only: RemoteStore makes its unary calls (FindMissingBlobs,
//        GetActionResult) with connect-node over node:http2, which is (a), so
//        those rows show "= a" for (d) and n/a for d/a.
//
// Workloads: ByteStream Write of a BENCH_BLOB_MIB (default 128) MiB blob in
// 64 KiB messages (a fresh variant of the blob each time, so no early
// completion), ByteStream Read of it (byte count and sha256 checked after the
// timer stops), FindMissingBlobs of 10,000 digests (half present),
// GetActionResult calls/s at concurrency 32. Transports take turns within
// each run, in a rotated order ((d) included), so that noise from other
// loads on the machine hits all of them alike; each figure is the median of
// BENCH_RUNS (default 3) runs. On a shared 2-core machine absolute figures
// move by +-40% between runs: compare ratios within one table.
import { createHash, randomBytes } from 'node:crypto';
import { create } from '@bufbuild/protobuf';
import { type Client, type Transport, createClient } from '@connectrpc/connect';
import { createConnectTransport } from '@connectrpc/connect-node';
import {
  ActionCache,
  ContentAddressableStorage,
} from '../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../gen/google/bytestream/bytestream_pb.ts';
import { RemoteStore } from '../src/stores/remote-store.ts';
import { createShardTransport } from '../src/transport.ts';
import { createUndiciConnectTransport, createUndiciGrpcTransport } from '../test/helpers/undici-transport.ts';
import { startPyShard } from '../test/helpers/py-shard.ts';
import { spawnNode } from '../test/helpers/spawn-node.ts';

const MiB = 1024 * 1024;
const BLOB_MiB = Number(process.env.BENCH_BLOB_MIB ?? 128);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const CHUNK = 64 * 1024;
const FIND_MISSING_DIGESTS = 10_000;
const GAR_CONCURRENCY = 32;
const GAR_SECONDS = Number(process.env.BENCH_GAR_SECONDS ?? 3);
const INSTANCE = 'bench';

interface CandidateBase {
  readonly id: string;
  readonly label: string;
  /** Speaks gRPC (the python shard speaks nothing else). */
  readonly grpc: boolean;
}
/** A Connect transport: measured on every workload through generated clients. */
interface TransportCandidate extends CandidateBase {
  readonly kind: 'transport';
  readonly make: (url: string) => { transport: Transport; close(): unknown };
}
/** A RemoteStore: measured on ByteStream Write and Read only (its unary calls are (a)). */
interface StoreCandidate extends CandidateBase {
  readonly kind: 'store';
  readonly make: (url: string) => RemoteStore;
}
type Candidate = TransportCandidate | StoreCandidate;

const candidates: Candidate[] = [
  {
    id: 'a',
    label: '(a) connect-node gRPC, node:http2',
    grpc: true,
    kind: 'transport',
    make: (url) => {
      const st = createShardTransport({ url });
      return { transport: st.transport, close: () => st.close() };
    },
  },
  {
    id: 'b',
    label: '(b) undici Pool, Connect, HTTP/1.1',
    grpc: false,
    kind: 'transport',
    make: (url) => createUndiciConnectTransport({ url }),
  },
  {
    id: 'b0',
    label: '(b0) node:http, Connect, HTTP/1.1',
    grpc: false,
    kind: 'transport',
    make: (url) => ({
      transport: createConnectTransport({
        baseUrl: url,
        httpVersion: '1.1',
        acceptCompression: [],
        readMaxBytes: 64 * MiB,
        writeMaxBytes: 64 * MiB,
      }),
      close: () => undefined,
    }),
  },
  {
    id: 'c',
    label: '(c) undici gRPC, h2c (fails slow-consumer test)',
    grpc: true,
    kind: 'transport',
    make: (url) => createUndiciGrpcTransport({ url }),
  },
  {
    id: 'd',
    label: '(d) RemoteStore fast path, raw node:http2 (src/stores/remote-bytestream.ts)',
    grpc: true,
    kind: 'store',
    make: (url) => new RemoteStore({ url, instanceName: INSTANCE, tree: 'cas' }),
  },
];

interface Clients {
  cas: Client<typeof ContentAddressableStorage>;
  ac: Client<typeof ActionCache>;
  bs: Client<typeof ByteStream>;
}

function clientsOf(transport: Transport): Clients {
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
  };
}

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

const blob = randomBytes(BLOB_MiB * MiB);
let variantCounter = 0;
/** A blob nobody has written yet: the first 8 bytes are a counter. */
function freshVariant(): { hash: string; size: number } {
  blob.writeBigUInt64BE(BigInt(++variantCounter), 0);
  return { hash: sha256(blob), size: blob.length };
}

/** ByteStream Write of the current blob in 64 KiB messages; MiB/s. */
async function writeMiBps(c: Clients, d: { hash: string; size: number }): Promise<number> {
  const name = `${INSTANCE}/uploads/${crypto.randomUUID()}/blobs/${d.hash}/${d.size}`;
  const t0 = performance.now();
  const res = await c.bs.write(
    (async function* () {
      for (let o = 0; o < blob.length; o += CHUNK) {
        const end = Math.min(blob.length, o + CHUNK);
        yield create(WriteRequestSchema, {
          resourceName: o === 0 ? name : '',
          writeOffset: BigInt(o),
          data: blob.subarray(o, end),
          finishWrite: end === blob.length,
        });
      }
    })(),
  );
  const secs = (performance.now() - t0) / 1000;
  if (res.committedSize !== BigInt(blob.length)) throw new Error(`write committed ${res.committedSize}`);
  return BLOB_MiB / secs;
}

/** (d): RemoteStore.put() of the current blob as 64 KiB chunks; MiB/s. */
async function storeWriteMiBps(store: RemoteStore, d: { hash: string; size: number }): Promise<number> {
  const t0 = performance.now();
  await store.put(
    d,
    (async function* () {
      for (let o = 0; o < blob.length; o += CHUNK) yield blob.subarray(o, Math.min(blob.length, o + CHUNK));
    })(),
  );
  return BLOB_MiB / ((performance.now() - t0) / 1000);
}

/** (d): RemoteStore.get() of a blob, iterated to the end; bytes and sha256 checked after the timer stops; MiB/s. */
async function storeReadMiBps(store: RemoteStore, d: { hash: string; size: number }): Promise<number> {
  const chunks: Uint8Array[] = [];
  let n = 0;
  const t0 = performance.now();
  for await (const chunk of await store.get(d)) {
    chunks.push(chunk);
    n += chunk.byteLength;
  }
  const secs = (performance.now() - t0) / 1000;
  const h = createHash('sha256');
  for (const chunk of chunks) h.update(chunk);
  if (n !== d.size || h.digest('hex') !== d.hash) throw new Error(`read returned ${n} of ${d.size} bytes or wrong content`);
  return BLOB_MiB / secs;
}

/** ByteStream Read of a blob; every byte and the sha256 checked after the timer stops; MiB/s. */
async function readMiBps(c: Clients, d: { hash: string; size: number }): Promise<number> {
  const chunks: Uint8Array[] = [];
  const t0 = performance.now();
  for await (const res of c.bs.read({ resourceName: `${INSTANCE}/blobs/${d.hash}/${d.size}` })) chunks.push(res.data);
  const secs = (performance.now() - t0) / 1000;
  const h = createHash('sha256');
  let n = 0;
  for (const chunk of chunks) {
    h.update(chunk);
    n += chunk.byteLength;
  }
  if (n !== d.size || h.digest('hex') !== d.hash) throw new Error(`read returned ${n} of ${d.size} bytes or wrong content`);
  return BLOB_MiB / secs;
}

/** Median latency of FindMissingBlobs over `digests`, ms. */
async function findMissingMs(c: Clients, digests: { hash: string; sizeBytes: bigint }[]): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    const res = await c.cas.findMissingBlobs({ instanceName: INSTANCE, blobDigests: digests });
    times.push(performance.now() - t0);
    if (res.missingBlobDigests.length !== FIND_MISSING_DIGESTS / 2) throw new Error(`${res.missingBlobDigests.length} missing`);
  }
  return median(times);
}

/** GetActionResult calls/s at GAR_CONCURRENCY for GAR_SECONDS. */
async function getActionResultRate(c: Clients, actionDigest: { hash: string; sizeBytes: bigint }): Promise<number> {
  let calls = 0;
  const t0 = performance.now();
  const deadline = t0 + GAR_SECONDS * 1000;
  await Promise.all(
    Array.from({ length: GAR_CONCURRENCY }, async () => {
      while (performance.now() < deadline) {
        await c.ac.getActionResult({ instanceName: INSTANCE, actionDigest });
        calls++;
      }
    }),
  );
  return calls / ((performance.now() - t0) / 1000);
}

/** Present and missing digests, and an action result whose output is present. */
async function seed(c: Clients) {
  const present: { hash: string; sizeBytes: bigint }[] = [];
  for (let i = 0; i < FIND_MISSING_DIGESTS / 2; i += 500) {
    const requests = Array.from({ length: 500 }, () => {
      const data = randomBytes(64);
      const digest = { hash: sha256(data), sizeBytes: 64n };
      present.push(digest);
      return { digest, data };
    });
    const res = await c.cas.batchUpdateBlobs({ instanceName: INSTANCE, requests });
    for (const r of res.responses) if (r.status?.code) throw new Error(`seed upload failed: ${r.status.message}`);
  }
  const missing = Array.from({ length: FIND_MISSING_DIGESTS / 2 }, () => ({ hash: sha256(randomBytes(8)), sizeBytes: 1000n }));
  const out = randomBytes(100);
  const outDigest = { hash: sha256(out), sizeBytes: 100n };
  await c.cas.batchUpdateBlobs({ instanceName: INSTANCE, requests: [{ digest: outDigest, data: out }] });
  const actionDigest = { hash: sha256(randomBytes(32)), sizeBytes: 140n };
  await c.ac.updateActionResult({
    instanceName: INSTANCE,
    actionDigest,
    actionResult: { outputFiles: [{ path: 'out/a', digest: outDigest }], exitCode: 0 },
  });
  return { digests: [...present, ...missing], actionDigest };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const fmt = (x: number, digits = 0) =>
  x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

type Workload = 'write' | 'read' | 'findMissing' | 'gar';
const WORKLOADS: { key: Workload; label: string; unit: string; higherIsBetter: boolean; digits: number }[] = [
  { key: 'write', label: `ByteStream Write ${BLOB_MiB} MiB, 64 KiB msgs`, unit: 'MiB/s', higherIsBetter: true, digits: 0 },
  { key: 'read', label: `ByteStream Read ${BLOB_MiB} MiB`, unit: 'MiB/s', higherIsBetter: true, digits: 0 },
  { key: 'findMissing', label: 'FindMissingBlobs 10,000 digests', unit: 'ms', higherIsBetter: false, digits: 1 },
  { key: 'gar', label: `GetActionResult, concurrency ${GAR_CONCURRENCY}`, unit: 'calls/s', higherIsBetter: true, digits: 0 },
];

interface Server {
  readonly name: string;
  readonly url: string;
  stop(): Promise<unknown>;
}

/** samples[server][candidate][workload] */
const samples = new Map<string, Map<string, Map<Workload, number[]>>>();
const failures = new Map<string, string[]>();
function record(server: string, cand: string, w: Workload, v: number) {
  const byCand = samples.get(server) ?? new Map<string, Map<Workload, number[]>>();
  samples.set(server, byCand);
  const byW = byCand.get(cand) ?? new Map<Workload, number[]>();
  byCand.set(cand, byW);
  const xs = byW.get(w) ?? [];
  byW.set(w, xs);
  xs.push(v);
}
async function measure(server: string, cand: string, w: Workload, fn: () => Promise<number>) {
  try {
    const v = await fn();
    record(server, cand, w, v);
    console.error(`  ${server} ${cand} ${w}: ${fmt(v, 1)}`);
  } catch (err) {
    const key = `${server}/${cand}/${w}`;
    failures.set(key, [...(failures.get(key) ?? []), String(err)]);
    console.error(`  ${server} ${cand} ${w}: FAILED ${String(err)}`);
  }
}

type Live =
  | { readonly kind: 'transport'; readonly clients: Clients; close(): unknown }
  | { readonly kind: 'store'; readonly store: RemoteStore; close(): unknown };
function clientsAt(live: Map<string, Live>, key: string): Clients {
  const l = live.get(key);
  if (l?.kind !== 'transport') throw new Error(`${key} is not a transport`);
  return l.clients;
}

const servers: Server[] = [];
const node = await spawnNode({ config: { logLevel: 'info' } });
servers.push({ name: 'storage node', url: node.url, stop: () => node.stop() });
const py = await startPyShard({ readChunkBytes: CHUNK });
servers.push({ name: 'python grpcio', url: py.url, stop: () => py.stop() });

try {
  const setups = new Map<string, Awaited<ReturnType<typeof seed>>>();
  const live = new Map<string, Live>();
  for (const s of servers) {
    for (const cand of candidates) {
      if (s.name === 'python grpcio' && !cand.grpc) continue;
      if (cand.kind === 'store') {
        const store = cand.make(s.url);
        live.set(`${s.name}/${cand.id}`, { kind: 'store', store, close: () => store.close() });
      } else {
        const t = cand.make(s.url);
        live.set(`${s.name}/${cand.id}`, { kind: 'transport', clients: clientsOf(t.transport), close: t.close });
      }
    }
    setups.set(s.name, await seed(clientsAt(live, `${s.name}/a`)));
  }
  // Warm every connection up (and the JIT) before timing anything. The
  // store's session opens on its own findMissing (a FindMissingBlobs call).
  for (const s of servers) {
    const sample = setups.get(s.name)!.digests.slice(0, 100);
    for (const [key, l] of live) {
      if (!key.startsWith(`${s.name}/`)) continue;
      if (l.kind === 'store') await l.store.findMissing(sample.map((d) => ({ hash: d.hash, size: Number(d.sizeBytes) })));
      else await l.clients.cas.findMissingBlobs({ instanceName: INSTANCE, blobDigests: sample });
    }
  }

  for (let run = 0; run < RUNS; run++) {
    console.error(`run ${run + 1} of ${RUNS}`);
    for (const s of servers) {
      const setup = setups.get(s.name)!;
      const here = candidates.filter((c) => live.has(`${s.name}/${c.id}`));
      const order = here.map((_, i) => here[(i + run) % here.length]!);
      // One workload at a time, transports taking turns, so that a burst of
      // load elsewhere on the machine lands on all transports alike.
      for (const cand of order) {
        const l = live.get(`${s.name}/${cand.id}`)!;
        const d = freshVariant();
        if (l.kind === 'store') {
          await measure(s.name, cand.id, 'write', () => storeWriteMiBps(l.store, d));
          await measure(s.name, cand.id, 'read', () => storeReadMiBps(l.store, d));
        } else {
          await measure(s.name, cand.id, 'write', () => writeMiBps(l.clients, d));
          await measure(s.name, cand.id, 'read', () => readMiBps(l.clients, d));
        }
      }
      // (d) makes its unary calls through (a): not measured again.
      const unary = order.filter((c) => c.kind === 'transport');
      for (const cand of unary) {
        const c = clientsAt(live, `${s.name}/${cand.id}`);
        await measure(s.name, cand.id, 'findMissing', () => findMissingMs(c, setup.digests));
      }
      for (const cand of unary) {
        const c = clientsAt(live, `${s.name}/${cand.id}`);
        await measure(s.name, cand.id, 'gar', () => getActionResultRate(c, setup.actionDigest));
      }
    }
  }
  for (const l of live.values()) await l.close();
} finally {
  for (const s of servers) await s.stop();
}

/** Workloads a store candidate is not measured on: its figure is (a)'s. */
const sameAsA = (cand: string, w: Workload) =>
  candidates.find((c) => c.id === cand)!.kind === 'store' && (w === 'findMissing' || w === 'gar');
const cell = (server: string, cand: string, w: Workload, digits: number) => {
  if (sameAsA(cand, w)) return live(server, cand) ? '= a' : 'n/a';
  const xs = samples.get(server)?.get(cand)?.get(w);
  const failed = failures.get(`${server}/${cand}/${w}`)?.length ?? 0;
  if (!live(server, cand)) return 'n/a';
  const v = xs && xs.length > 0 ? fmt(median(xs), digits) : '-';
  return failed > 0 ? `${v} (${failed}/${RUNS} failed)` : v;
};
function live(server: string, cand: string) {
  return server !== 'python grpcio' || candidates.find((c) => c.id === cand)!.grpc;
}
const ratio = (server: string, cand: string, w: Workload, higherIsBetter: boolean) => {
  const a = samples.get(server)?.get('a')?.get(w);
  const x = samples.get(server)?.get(cand)?.get(w);
  if (!a?.length || !x?.length) return 'n/a';
  const r = higherIsBetter ? median(x) / median(a) : median(a) / median(x);
  return `${r.toFixed(2)}x`;
};

console.log(`\nTransports to shards, medians of ${RUNS} runs (ratios: speed relative to (a), >1 is faster)\n`);
console.log(`| workload | server | ${candidates.map((c) => c.label).join(' | ')} | ${candidates.slice(1).map((c) => `${c.id}/a`).join(' | ')} |`);
console.log(`| --- | --- | ${candidates.map(() => '---:').join(' | ')} | ${candidates.slice(1).map(() => '---:').join(' | ')} |`);
for (const w of WORKLOADS) {
  for (const s of servers) {
    const cells = candidates.map((c) => cell(s.name, c.id, w.key, w.digits));
    const ratios = candidates.slice(1).map((c) => ratio(s.name, c.id, w.key, w.higherIsBetter));
    console.log(`| ${w.label} (${w.unit}) | ${s.name} | ${cells.join(' | ')} | ${ratios.join(' | ')} |`);
  }
}
console.log(
  `\n"= a": ${candidates.filter((c) => c.kind === 'store').map((c) => `(${c.id})`).join(', ')} makes unary calls with (a)'s transport; not measured again.`,
);
if (failures.size > 0) {
  console.log('\nFailures:');
  for (const [k, errs] of failures) console.log(`- ${k}: ${[...new Set(errs)].join('; ')}`);
}
