// The chaos soak (issue 9): a mixed Bazel-like load through the default
// cluster shape (an edge whose CAS and AC trees are fallback { primary:
// sharding over three storage-node shards, secondary: a storage node }, as
// config.json holds them, built by test/helpers/cluster.ts) while a fault
// injector, driven by a seeded PRNG, breaks one process at a time. A checker
// then reads back everything that was acknowledged and reports, as a table:
//
//   - acknowledged writes (blobs and ActionResults) that are not readable
//     byte-identical once the faults stopped and the cluster settled, each
//     with its digest, when it was acknowledged, its owner shard, who still
//     holds it, and which faults happened since;
//   - FindMissing lies: a blob FindMissing reported present whose read, made
//     right after through the edge, came back NOT_FOUND or with other bytes;
//   - incomplete ActionResults: a GetActionResult that returned a result one
//     of whose outputs then could not be read;
//   - client errors by gRPC code, split by whether the edge itself was down
//     (being restarted by the injector) while the RPC ran;
//   - RSS of the edge and the nodes at the start and at the end.
//
// Used by scripts/soak.ts (`npm run soak -- --duration 600 --seed 42`) and by
// test/e2e/soak.test.ts (the 60 s CI form). Only the fault schedule is a
// function of the seed (kinds, targets, hold times and gaps, from their own
// PRNG stream); when each fault lands relative to the load depends on the
// machine.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { create } from '@bufbuild/protobuf';
import { type Client, Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { ActionCache, ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { mapLimit } from '../../src/concurrency.ts';
import { type Cluster, type ClusterShard, startCluster } from './cluster.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

// --- options and report ----------------------------------------------------------

export type Durability = 'sync' | 'async';

export const FAULT_KINDS = [
  'shard-kill', // SIGKILL a primary shard, restart it 1-4 s later on its port and data dir
  'shard-stop', // SIGSTOP a primary shard for 1-4 s, then SIGCONT
  'shard-empty', // SIGKILL a primary shard, delete its data dir, restart it 0.5-2 s later
  'secondary-kill', // SIGKILL the secondary, restart it 1-4 s later
  'secondary-stop', // SIGSTOP the secondary for 1-4 s, then SIGCONT
  'edge-term', // SIGTERM the edge (graceful), restart it on its port and data dir
  'edge-kill', // SIGKILL the edge, restart it on its port and data dir
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

export interface SoakOptions {
  /** How long the load and the faults run. */
  readonly durationMs: number;
  /** Seeds the fault schedule and the load's choices. */
  readonly seed: number;
  /**
   * The fallback pair's `durability` in the edge config. Default: what
   * config.json's CAS fallback says (the shipped default).
   */
  readonly durability?: Durability | undefined;
  /** Concurrent clients, each running one "action" after another. Default 4. */
  readonly workers?: number;
  /** Faults to pick from. Default all of FAULT_KINDS. */
  readonly faults?: readonly FaultKind[];
  /** Quiet time between one fault's recovery and the next fault, ms. Default [2000, 5000]. */
  readonly gapMs?: readonly [number, number];
  /** The first fault comes this long after the load started, ms. Default 3000. */
  readonly firstFaultAfterMs?: number;
  /** Bound on the wait for the cluster to settle after the faults. Default 90 s. */
  readonly settleTimeoutMs?: number;
  /**
   * Sync mode: let a `shard-empty` fault land while the pair still runs on
   * one copy (a second fault, which sync mode does not promise to survive).
   * Default false: a shard is wiped only once the edge reports two copies
   * and an empty secondary journal.
   */
  readonly doubleFaults?: boolean;
  /** A large output is this likely (ByteStream, 256 KiB - 4 MiB). Default 0.06. */
  readonly largeShare?: number;
  /** Progress lines (faults as they happen, phases). */
  readonly log?: (line: string) => void;
}

export interface FaultRecord {
  readonly id: number;
  readonly kind: FaultKind;
  readonly target: string;
  /** ms since the soak started. */
  readonly at: number;
  /** When the target was healthy again (restarted / resumed), ms since the start. */
  recoveredAt: number;
  /** How long it was held down or paused, as drawn. */
  readonly holdMs: number;
  readonly detail: string;
}

export interface LostWrite {
  readonly what: 'blob' | 'ActionResult';
  readonly digest: string;
  /** How it was written: BatchUpdateBlobs, ByteStream, UpdateActionResult. */
  readonly via: string;
  /** ms since the start: the write began, and was acknowledged. */
  readonly startedAt: number;
  readonly ackedAt: number;
  /** The blob's (or the action's) owner shard, by the edge's ranking. */
  readonly owner: string;
  /** What the final read saw: not-found, wrong bytes, an error, a wrong result. */
  readonly outcome: string;
  /** For a blob: which nodes hold it now, asked directly (no edge). */
  readonly heldBy: string;
  /** Faults in progress at the write or begun after it: "#3 shard-empty shard-b +12.3s". */
  readonly faultsSince: string[];
  /** The edge's log lines that name it: "+31.2s error fallback: ...". */
  readonly edgeLog: string[];
}

export interface Violation {
  /** ms since the start. */
  readonly at: number;
  readonly digest: string;
  readonly detail: string;
  /** Faults in progress then, or in the 10 s before. */
  readonly faultsAround: string[];
}

export interface ErrorTally {
  /** While the edge was down or coming back (a restart by the injector, plus 1 s). */
  edgeDown: number;
  /** Any other time. */
  otherwise: number;
}

export interface ErrorSample {
  readonly at: number;
  readonly rpc: string;
  readonly code: string;
  /** Whether the edge was being restarted while the RPC ran. */
  readonly edgeDown: boolean;
  /** UNAVAILABLE or a connection reset while the edge was down. */
  readonly expected: boolean;
  readonly message: string;
  readonly faultsAround: string[];
}

export interface ProcessRss {
  readonly name: string;
  /** KiB, from /proc/PID/status VmRSS; undefined if unreadable. */
  readonly startKiB: number | undefined;
  readonly endKiB: number | undefined;
  /** How many times the injector restarted it (the end figure is of the last process). */
  readonly restarts: number;
}

export interface SoakReport {
  readonly seed: number;
  readonly durationMs: number;
  readonly durability: Durability;
  readonly doubleFaults: boolean;
  readonly workers: number;
  readonly faults: FaultRecord[];
  /** Load figures. */
  readonly actions: { started: number; completed: number; failed: number };
  readonly rpcs: Record<string, { ok: number; failed: number }>;
  readonly bytesUploaded: number;
  readonly bytesRead: number;
  readonly ackedBlobs: number;
  readonly ackedLargeBlobs: number;
  readonly ackedActions: number;
  /** Cluster settle after the faults. */
  readonly settled: boolean;
  readonly settleMs: number;
  readonly unsettledReasons: string[];
  /** Invariants. */
  readonly lostBlobs: LostWrite[];
  readonly lostActions: LostWrite[];
  /** Final reads that failed with an error other than NOT_FOUND after retries (not counted lost, not OK either). */
  readonly unreadableAtEnd: LostWrite[];
  readonly findMissingChecked: number;
  readonly findMissingLies: Violation[];
  /** FindMissing said present, the read after failed with a transient error (UNAVAILABLE...), not NOT_FOUND. */
  readonly findMissingUnconfirmed: number;
  /** FindMissing reported an acknowledged blob missing during the run (a loss, or a transient view). */
  readonly ackedReportedMissing: Violation[];
  readonly actionHitsChecked: number;
  readonly incompleteActionResults: Violation[];
  /** A GetActionResult for an acknowledged action answered NOT_FOUND during the run. */
  readonly ackedActionsMissing: Violation[];
  readonly errors: Record<string, ErrorTally>;
  readonly unexpectedErrors: number;
  /** Unexpected errors by code. */
  readonly unexpectedByCode: Record<string, number>;
  /**
   * Unexpected errors of RPCs that ran entirely outside every fault window
   * (from a fault until FAULT_WINDOW_MS after its recovery): errors with
   * nothing broken. "+12.3s RPC CODE: message".
   */
  readonly unexpectedOutsideFaults: string[];
  /** A few errors of each code, edge state and verdict. */
  readonly errorSamples: ErrorSample[];
  /** Unexpected errors by RPC, code and message (digits masked), most frequent first. */
  readonly unexpectedByReason: { reason: string; count: number }[];
  readonly totalRpcs: number;
  readonly rss: ProcessRss[];
  /** The edge's own counters at the end (last process only). */
  readonly edgeCounters: Record<string, number>;
  /** The edge's warn and error log lines by message, most frequent first (every edge process). */
  readonly edgeWarnings: { level: string; msg: string; count: number }[];
  readonly wallMs: number;
}

/** The fallback durability config.json ships with (its CAS tree), or 'async' when it names none. */
export function configDurability(): Durability {
  try {
    const cfg = JSON.parse(readFileSync(join(repoRoot, 'config.json'), 'utf8')) as { cas?: { fallback?: { durability?: string } } };
    return cfg.cas?.fallback?.durability === 'sync' ? 'sync' : 'async';
  } catch {
    return 'async';
  }
}

// --- seeded PRNG -------------------------------------------------------------------

/** A small 32-bit PRNG (mulberry32): deterministic per seed, [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const between = (rnd: () => number, lo: number, hi: number) => Math.floor(lo + rnd() * (hi - lo + 1));
const pick = <T>(rnd: () => number, xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;

// --- clients -----------------------------------------------------------------------

interface Clients {
  cas: Client<typeof ContentAddressableStorage>;
  ac: Client<typeof ActionCache>;
  bs: Client<typeof ByteStream>;
}

function clients(baseUrl: string): Clients {
  const transport = createGrpcTransport({ baseUrl, readMaxBytes: 64 * MiB, writeMaxBytes: 64 * MiB });
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
  };
}

interface Digest {
  readonly hash: string;
  readonly size: number;
}
const pd = (d: Digest) => ({ hash: d.hash, sizeBytes: BigInt(d.size) });
const short = (d: Digest) => `${d.hash.slice(0, 16)}/${d.size}`;

interface AckedBlob extends Digest {
  readonly via: 'BatchUpdateBlobs' | 'ByteStream';
  readonly startedAt: number;
  readonly ackedAt: number;
}

interface AckedAction {
  readonly action: Digest;
  readonly outputs: readonly AckedBlob[];
  readonly startedAt: number;
  readonly ackedAt: number;
}

const RPC_TIMEOUT_MS = 20_000;
const CHUNK = 64 * KiB;
/** Outputs of at most this many bytes go in BatchUpdateBlobs, larger ones by ByteStream. */
const BATCH_MAX = 64 * KiB;

/** How long after a fault's recovery errors are still put down to it (breakers closing, reconnects). */
export const FAULT_WINDOW_MS = 5000;

/** A client-side view of a connection the server dropped. */
const TRANSPORT_RESET = /ECONNRESET|EPIPE|socket hang up|GOAWAY|NGHTTP2|stream (was )?(closed|reset)|premature close/i;

function codeOf(err: unknown): string {
  return Code[ConnectError.from(err).code] ?? 'Unknown';
}

// --- the soak ----------------------------------------------------------------------

interface EdgeDownWindow {
  readonly start: number;
  end: number | undefined;
}

export async function runSoak(opts: SoakOptions): Promise<SoakReport> {
  const log = opts.log ?? (() => {});
  const durability = opts.durability ?? configDurability();
  const workers = opts.workers ?? 4;
  const kinds = opts.faults ?? FAULT_KINDS;
  const gap = opts.gapMs ?? [2000, 5000];
  const largeShare = opts.largeShare ?? 0.06;
  const wall0 = Date.now();

  const cluster = await startCluster({
    fallback: { durability },
    healthCheckIntervalMs: 250,
    edgeExtra: { admin: { listen: '127.0.0.1:0' } },
  });
  try {
    return await soakOn(cluster, { ...opts, durability, workers, faults: kinds, gapMs: gap, largeShare, log }, wall0);
  } finally {
    await cluster.stop();
  }
}

type Resolved = Required<Pick<SoakOptions, 'workers' | 'faults' | 'gapMs' | 'largeShare' | 'log'>> & SoakOptions & { durability: Durability };

async function soakOn(cluster: Cluster, o: Resolved, wall0: number): Promise<SoakReport> {
  const { log } = o;
  const nodes: ClusterShard[] = [...cluster.shards, cluster.secondary!];
  const restarts = new Map<string, number>();
  const rssStart = new Map<string, number | undefined>();
  rssStart.set('edge', await rssKiB(cluster.edge.node.pid));
  for (const n of nodes) rssStart.set(n.name, await rssKiB(n.node.pid));

  const t0 = Date.now();
  const rel = (ms: number) => ms - t0;
  const faults: FaultRecord[] = [];
  const edgeDown: EdgeDownWindow[] = [];
  const EDGE_GRACE_MS = 1000;
  const edgeWasDown = (start: number, end: number) =>
    edgeDown.some((w) => start <= (w.end ?? Number.POSITIVE_INFINITY) + EDGE_GRACE_MS && end >= w.start);
  const faultLabel = (f: FaultRecord) => `#${f.id} ${f.kind} ${f.target} +${(f.at / 1000).toFixed(1)}s`;
  /** Faults in progress at `at` (rel) or started in the `beforeMs` before it. */
  const faultsAround = (at: number, beforeMs = 10_000) =>
    faults.filter((f) => f.at <= at && (f.recoveredAt < 0 || f.recoveredAt >= at - beforeMs)).map(faultLabel);
  /** Faults in progress at `at` (rel) or begun after it. */
  const faultsSince = (at: number) => faults.filter((f) => f.at >= at || f.recoveredAt < 0 || f.recoveredAt >= at).map(faultLabel);

  // --- accounting ---
  const rpcs: Record<string, { ok: number; failed: number }> = {};
  const errors: Record<string, ErrorTally> = {};
  const errorSamples: ErrorSample[] = [];
  const unexpectedByCode: Record<string, number> = {};
  const sampled = new Map<string, number>();
  const unexpectedByReason = new Map<string, number>();
  const unexpectedAt: { start: number; end: number; what: string }[] = [];
  let unexpectedErrors = 0;
  let bytesUploaded = 0;
  let bytesRead = 0;
  const rpc = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const start = Date.now();
    const r = (rpcs[name] ??= { ok: 0, failed: 0 });
    try {
      const v = await fn();
      r.ok++;
      return v;
    } catch (err) {
      r.failed++;
      const ce = ConnectError.from(err);
      const code = Code[ce.code] ?? 'Unknown';
      // NOT_FOUND is an answer (a cache miss, or a loss the checker judges), not an error.
      if (ce.code !== Code.NotFound) {
        const end = Date.now();
        const tally = (errors[code] ??= { edgeDown: 0, otherwise: 0 });
        const down = edgeWasDown(start, end);
        if (down) tally.edgeDown++;
        else tally.otherwise++;
        // Expected while the edge is down: UNAVAILABLE (nothing listens), or the
        // connection reset that a killed edge leaves on RPCs in flight
        // (connect-node reports ECONNRESET as ABORTED; grpc C-core calls it UNAVAILABLE).
        const expected = down && (ce.code === Code.Unavailable || TRANSPORT_RESET.test(ce.rawMessage));
        if (!expected) {
          unexpectedErrors++;
          unexpectedByCode[code] = (unexpectedByCode[code] ?? 0) + 1;
          const reason = `${name.replace(/^\w+:/, '')} ${code}: ${ce.rawMessage.replace(/[0-9a-f]{64}/g, 'H').replace(/\d+/g, 'N').slice(0, 120)}`;
          unexpectedByReason.set(reason, (unexpectedByReason.get(reason) ?? 0) + 1);
          unexpectedAt.push({ start: rel(start), end: rel(end), what: `${name} ${code}: ${ce.rawMessage.slice(0, 160)}` });
        }
        // A few of each code, edge state and verdict, so that a rare code is not crowded out.
        const sampleKey = `${code} ${down} ${expected}`;
        const kept = (sampled.get(sampleKey) ?? 0) + 1;
        sampled.set(sampleKey, kept);
        if (kept <= 3) {
          errorSamples.push({ at: rel(start), rpc: name, code, edgeDown: down, expected, message: ce.rawMessage.slice(0, 200), faultsAround: faultsAround(rel(end)) });
        }
      }
      throw err;
    }
  };

  const edge = clients(cluster.edge.url);
  const blobs: AckedBlob[] = [];
  const actions: AckedAction[] = [];
  const findMissingLies: Violation[] = [];
  const ackedReportedMissing: Violation[] = [];
  const incompleteActionResults: Violation[] = [];
  const ackedActionsMissing: Violation[] = [];
  let findMissingChecked = 0;
  let findMissingUnconfirmed = 0;
  let actionHitsChecked = 0;
  const actionCounts = { started: 0, completed: 0, failed: 0 };

  /** Reads a blob through the edge: 'ok', 'not-found', 'wrong bytes ...', or an error code (transient). */
  const readOnce = async (d: Digest, name: string): Promise<string> => {
    try {
      if (d.size <= BATCH_MAX) {
        const res = await rpc(`${name}:BatchReadBlobs`, () => edge.cas.batchReadBlobs({ digests: [pd(d)] }, { timeoutMs: RPC_TIMEOUT_MS }));
        const r = res.responses[0];
        const code = r?.status?.code ?? 0;
        if (code === Code.NotFound) return 'not-found';
        if (code !== 0) return `${Code[code]}: ${r?.status?.message ?? ''}`;
        bytesRead += r!.data.byteLength;
        return sha(r!.data) === d.hash && r!.data.byteLength === d.size ? 'ok' : `wrong bytes (${r!.data.byteLength} of ${d.size})`;
      }
      const h = createHash('sha256');
      let n = 0;
      await rpc(`${name}:ByteStream.Read`, async () => {
        for await (const m of edge.bs.read({ resourceName: `blobs/${d.hash}/${d.size}` }, { timeoutMs: RPC_TIMEOUT_MS })) {
          h.update(m.data);
          n += m.data.byteLength;
        }
      });
      bytesRead += n;
      return n === d.size && h.digest('hex') === d.hash ? 'ok' : `wrong bytes (${n} of ${d.size})`;
    } catch (err) {
      const code = codeOf(err);
      return code === 'NotFound' ? 'not-found' : code;
    }
  };
  /** readOnce, retried (like Bazel's --remote_retries) while the outcome is a transient error. */
  const readRetrying = async (d: Digest, name: string, tries = 3): Promise<string> => {
    let out = '';
    for (let i = 0; i < tries; i++) {
      out = await readOnce(d, name);
      if (out === 'ok' || out === 'not-found' || out.startsWith('wrong bytes')) return out;
      await sleep(300 * (i + 1));
    }
    return out;
  };

  const uploadBatch = async (bs: { d: Digest; data: Buffer }[]) => {
    await rpc('BatchUpdateBlobs', async () => {
      const res = await edge.cas.batchUpdateBlobs({ requests: bs.map((b) => ({ digest: pd(b.d), data: b.data })) }, { timeoutMs: RPC_TIMEOUT_MS });
      for (const r of res.responses) {
        if (r.status !== undefined && r.status.code !== 0) throw new ConnectError(`BatchUpdateBlobs ${r.digest?.hash}: ${r.status.message}`, r.status.code);
      }
    });
    for (const b of bs) bytesUploaded += b.data.byteLength;
  };
  const uploadStream = async (b: { d: Digest; data: Buffer }) => {
    const resourceName = `uploads/${randomUUID()}/blobs/${b.d.hash}/${b.d.size}`;
    async function* requests() {
      for (let off = 0; off < b.data.byteLength; off += CHUNK) {
        const end = Math.min(b.data.byteLength, off + CHUNK);
        yield create(WriteRequestSchema, {
          resourceName: off === 0 ? resourceName : '',
          writeOffset: BigInt(off),
          data: b.data.subarray(off, end),
          finishWrite: end === b.data.byteLength,
        });
      }
    }
    const res = await rpc('ByteStream.Write', () => edge.bs.write(requests(), { timeoutMs: RPC_TIMEOUT_MS }));
    if (res.committedSize !== BigInt(b.d.size)) throw new Error(`ByteStream Write committed ${res.committedSize} of ${b.d.size}`);
    bytesUploaded += b.d.size;
  };

  const stopLoad = new AbortController();

  /** One Bazel-like action: cache lookup, FindMissing of inputs and outputs, uploads, UpdateActionResult. */
  const action = async (rnd: () => number): Promise<void> => {
    // 1. A cache lookup: an earlier action (a hit: every output must be readable) or this one (a miss).
    const old = actions.length > 0 && rnd() < 0.5 ? pick(rnd, actions) : undefined;
    const actionDigest: Digest = { hash: randomBytes(32).toString('hex'), size: 140 };
    if (old !== undefined) {
      const lookupAt = rel(Date.now());
      let got;
      try {
        got = await rpc('GetActionResult', () => edge.ac.getActionResult({ actionDigest: pd(old.action) }, { timeoutMs: RPC_TIMEOUT_MS }));
      } catch (err) {
        if (codeOf(err) !== 'NotFound') throw err;
        ackedActionsMissing.push({ at: lookupAt, digest: short(old.action), detail: 'GetActionResult NOT_FOUND for an acknowledged ActionResult', faultsAround: faultsAround(lookupAt) });
      }
      if (got !== undefined) {
        actionHitsChecked++;
        const outs = got.outputFiles.map((f) => ({ hash: f.digest?.hash ?? '', size: Number(f.digest?.sizeBytes ?? 0n) }));
        const want = old.outputs.map((b) => `${b.hash}/${b.size}`).join(',');
        if (outs.map((b) => `${b.hash}/${b.size}`).join(',') !== want) {
          incompleteActionResults.push({ at: lookupAt, digest: short(old.action), detail: 'GetActionResult returned another result', faultsAround: faultsAround(lookupAt) });
        }
        for (const out of outs) {
          const r = await readRetrying(out, 'output');
          if (r === 'ok') continue;
          if (r === 'not-found' || r.startsWith('wrong bytes')) {
            incompleteActionResults.push({ at: lookupAt, digest: short(old.action), detail: `output ${short(out)}: ${r}`, faultsAround: faultsAround(lookupAt) });
          } else {
            throw new ConnectError(`output read: ${r}`, Code.Unavailable);
          }
        }
      }
    } else {
      try {
        await rpc('GetActionResult', () => edge.ac.getActionResult({ actionDigest: pd(actionDigest) }, { timeoutMs: RPC_TIMEOUT_MS }));
      } catch (err) {
        if (codeOf(err) !== 'NotFound') throw err;
      }
    }

    // 2. Inputs: acknowledged blobs of earlier actions; outputs: fresh blobs.
    const inputs: AckedBlob[] = [];
    for (let i = between(rnd, 0, 6); i > 0 && blobs.length > 0; i--) inputs.push(pick(rnd, blobs));
    const outputs = Array.from({ length: between(rnd, 1, 4) }, () => {
      const size = rnd() < o.largeShare ? between(rnd, 256 * KiB, 4 * MiB) : between(rnd, 100, 48 * KiB);
      const data = randomBytes(size);
      return { d: { hash: sha(data), size }, data };
    });
    const fmAt = rel(Date.now());
    const fm = await rpc('FindMissingBlobs', () =>
      edge.cas.findMissingBlobs({ blobDigests: [...inputs, ...outputs.map((x) => x.d)].map(pd) }, { timeoutMs: RPC_TIMEOUT_MS }),
    );
    const missing = new Set(fm.missingBlobDigests.map((d) => `${d.hash}/${d.sizeBytes}`));
    const present: AckedBlob[] = [];
    for (const b of new Set(inputs)) {
      if (missing.has(`${b.hash}/${b.size}`)) {
        ackedReportedMissing.push({ at: fmAt, digest: short(b), detail: `acknowledged at +${(b.ackedAt / 1000).toFixed(1)}s`, faultsAround: faultsAround(fmAt) });
      } else {
        present.push(b);
      }
    }
    // 3. Read what FindMissing vouched for, right away (at most two inputs, one large).
    const toRead = present.filter((b) => b.size <= BATCH_MAX).slice(0, 2);
    const large = present.find((b) => b.size > BATCH_MAX);
    if (large !== undefined && rnd() < 0.5) toRead.push(large);
    for (const b of toRead) {
      findMissingChecked++;
      const r = await readRetrying(b, 'input');
      if (r === 'ok') continue;
      if (r === 'not-found' || r.startsWith('wrong bytes')) {
        findMissingLies.push({ at: fmAt, digest: short(b), detail: `FindMissing said present; the read right after: ${r}`, faultsAround: faultsAround(fmAt) });
      } else {
        findMissingUnconfirmed++;
      }
    }
    // 4. Upload the outputs: small ones in one BatchUpdateBlobs, large ones by ByteStream.
    const small = outputs.filter((x) => x.d.size <= BATCH_MAX);
    const big = outputs.filter((x) => x.d.size > BATCH_MAX);
    const acked: AckedBlob[] = [];
    if (small.length > 0) {
      const startedAt = rel(Date.now());
      await uploadBatch(small);
      const ackedAt = rel(Date.now());
      for (const x of small) acked.push({ ...x.d, via: 'BatchUpdateBlobs', startedAt, ackedAt });
    }
    for (const x of big) {
      const startedAt = rel(Date.now());
      await uploadStream(x);
      acked.push({ ...x.d, via: 'ByteStream', startedAt, ackedAt: rel(Date.now()) });
    }
    // Recorded only once every output is acknowledged: a half-uploaded action is retried whole.
    blobs.push(...acked);
    // 5. The ActionResult naming them.
    const startedAt = rel(Date.now());
    await rpc('UpdateActionResult', () =>
      edge.ac.updateActionResult(
        {
          actionDigest: pd(actionDigest),
          actionResult: { exitCode: 0, outputFiles: acked.map((b, i) => ({ path: `out/${i}`, digest: pd(b) })) },
        },
        { timeoutMs: RPC_TIMEOUT_MS },
      ),
    );
    actions.push({ action: actionDigest, outputs: acked, startedAt, ackedAt: rel(Date.now()) });
  };

  const worker = async (w: number) => {
    const rnd = prng((o.seed * 7919 + w + 1) >>> 0);
    while (!stopLoad.signal.aborted) {
      actionCounts.started++;
      try {
        await action(rnd);
        actionCounts.completed++;
      } catch {
        actionCounts.failed++;
        await sleep(150); // a client backs off before retrying
      }
    }
  };

  // --- the fault injector ---
  const frnd = prng(o.seed);
  const end = t0 + o.durationMs;
  const shardNames = cluster.shards.map((s) => s.name);
  const injector = async () => {
    await sleep(Math.min(o.firstFaultAfterMs ?? 3000, o.durationMs / 4));
    let id = 0;
    while (Date.now() < end - 1000) {
      const kind = pick(frnd, o.faults);
      const target = kind.startsWith('shard') ? pick(frnd, shardNames) : kind.startsWith('secondary') ? 'secondary' : 'edge';
      const holdMs = kind === 'shard-empty' ? between(frnd, 500, 2000) : kind.startsWith('edge') ? 0 : between(frnd, 1000, 4000);
      const gapMs = between(frnd, o.gapMs[0], o.gapMs[1]);
      let detail = '';
      if (kind === 'shard-empty' && o.durability === 'sync' && o.doubleFaults !== true) {
        // One fault at a time: sync mode promises no loss when one side's data
        // is lost while the other's survives. Right after a secondary fault the
        // pair still runs on one copy (the secondary's breaker closes after
        // backoff and good probes, then its journal is replayed); wiping a
        // shard then would be a second fault. Wait for two copies.
        const waited = await waitTwoCopies(cluster, 30_000);
        detail = waited.ok ? `waited ${waited.ms} ms for two copies` : `two copies not reached in ${waited.ms} ms: ${waited.why}`;
      }
      const f: FaultRecord = { id: ++id, kind, target, at: rel(Date.now()), recoveredAt: -1, holdMs, detail };
      faults.push(f);
      log(`fault ${faultLabel(f)} hold ${holdMs} ms`);
      await inject(f);
      f.recoveredAt = rel(Date.now());
      log(`  recovered +${(f.recoveredAt / 1000).toFixed(1)}s`);
      const wait = Math.min(gapMs, end - Date.now());
      if (wait > 0) await sleep(wait);
    }
  };
  const inject = async (f: FaultRecord) => {
    if (f.target === 'edge') {
      const w: EdgeDownWindow = { start: Date.now(), end: undefined };
      edgeDown.push(w);
      try {
        if (f.kind === 'edge-term') {
          const killed = cluster.edge.kill('SIGTERM');
          const timer = setTimeout(() => void cluster.edge.kill('SIGKILL'), 15_000);
          await killed.finally(() => clearTimeout(timer));
        } else {
          await cluster.edge.kill('SIGKILL');
        }
        await cluster.edge.restart();
      } finally {
        w.end = Date.now();
      }
      restarts.set('edge', (restarts.get('edge') ?? 0) + 1);
      return;
    }
    const node = f.target === 'secondary' ? cluster.secondary! : cluster.shard(f.target);
    if (f.kind.endsWith('-stop')) {
      node.pause();
      try {
        await sleep(f.holdMs);
      } finally {
        node.resume();
      }
      return;
    }
    await node.kill('SIGKILL');
    await sleep(f.holdMs);
    await node.restart(f.kind === 'shard-empty' ? { empty: true } : undefined);
    restarts.set(node.name, (restarts.get(node.name) ?? 0) + 1);
  };

  log(`load: ${o.workers} workers for ${o.durationMs / 1000} s, durability ${o.durability}, seed ${o.seed}`);
  const loading = Promise.all(Array.from({ length: o.workers }, (_, w) => worker(w)));
  const injecting = injector();
  const stopTimer = setTimeout(() => stopLoad.abort(), o.durationMs);
  await injecting; // the last fault recovered; nothing is down or paused
  await sleep(Math.max(0, end - Date.now()));
  stopLoad.abort();
  clearTimeout(stopTimer);
  await loading;
  log(`load stopped at +${(rel(Date.now()) / 1000).toFixed(1)}s: ${blobs.length} blobs, ${actions.length} ActionResults acknowledged`);

  // --- settle: breakers closed, hints handed off, journals replayed, replication drained ---
  const settleStart = Date.now();
  let unsettledReasons: string[] = ['not checked'];
  const settleDeadline = settleStart + (o.settleTimeoutMs ?? 90_000);
  let lastState: unknown;
  while (Date.now() < settleDeadline) {
    try {
      lastState = await adminState(cluster);
      unsettledReasons = unsettled(lastState);
    } catch (err) {
      unsettledReasons = [`admin state: ${String(err)}`];
    }
    if (unsettledReasons.length === 0) break;
    await sleep(250);
  }
  const settled = unsettledReasons.length === 0;
  const settleMs = Date.now() - settleStart;
  log(settled ? `settled in ${settleMs} ms` : `NOT settled after ${settleMs} ms: ${unsettledReasons.join('; ')}`);

  // --- the checker: every acknowledged write, read back through the edge ---
  const direct = nodes.map((n) => ({ name: n.name, c: clients(n.url) }));
  const heldBy = async (d: Digest): Promise<string> => {
    const holders: string[] = [];
    for (const n of direct) {
      try {
        const r = await n.c.cas.findMissingBlobs({ blobDigests: [pd(d)] }, { timeoutMs: 5000 });
        if (r.missingBlobDigests.length === 0) holders.push(n.name);
      } catch (err) {
        holders.push(`${n.name}?(${codeOf(err)})`);
      }
    }
    return holders.length === 0 ? 'nobody' : holders.join(',');
  };
  const edgeLines = parseLog(cluster.edge.logs());
  const edgeLogFor = (hash: string): string[] =>
    edgeLines
      .filter((l) => l.raw.includes(hash))
      .slice(0, 8)
      .map((l) => `${s(rel(l.time))} ${l.level} ${l.msg}`);
  const lostBlobs: LostWrite[] = [];
  const unreadableAtEnd: LostWrite[] = [];
  const outcomes = await mapLimit(blobs, 8, (b) => readRetrying(b, 'final', 5));
  for (let i = 0; i < blobs.length; i++) {
    const b = blobs[i]!;
    const out = outcomes[i]!;
    if (out === 'ok') continue;
    const rec: LostWrite = {
      what: 'blob',
      digest: `${b.hash}/${b.size}`,
      via: b.via,
      startedAt: b.startedAt,
      ackedAt: b.ackedAt,
      owner: cluster.owner(b.hash),
      outcome: out,
      heldBy: await heldBy(b),
      faultsSince: faultsSince(b.startedAt),
      edgeLog: edgeLogFor(b.hash),
    };
    (out === 'not-found' || out.startsWith('wrong bytes') ? lostBlobs : unreadableAtEnd).push(rec);
  }
  const lostActions: LostWrite[] = [];
  const actionOutcomes = await mapLimit(actions, 8, async (a) => {
    for (let i = 0; i < 5; i++) {
      try {
        const r = await edge.ac.getActionResult({ actionDigest: pd(a.action) }, { timeoutMs: RPC_TIMEOUT_MS });
        const got = r.outputFiles.map((f) => `${f.digest?.hash}/${f.digest?.sizeBytes}`).join(',');
        return got === a.outputs.map((b) => `${b.hash}/${b.size}`).join(',') ? 'ok' : 'wrong result';
      } catch (err) {
        const code = codeOf(err);
        if (code === 'NotFound') return 'not-found';
        if (i === 4) return code;
        await sleep(300 * (i + 1));
      }
    }
    return 'unreachable';
  });
  for (let i = 0; i < actions.length; i++) {
    const a = actions[i]!;
    const out = actionOutcomes[i]!;
    if (out === 'ok') continue;
    const lostOutputs = a.outputs.filter((b) => lostBlobs.some((l) => l.digest === `${b.hash}/${b.size}`)).map(short);
    const rec: LostWrite = {
      what: 'ActionResult',
      digest: `${a.action.hash}/${a.action.size}`,
      via: 'UpdateActionResult',
      startedAt: a.startedAt,
      ackedAt: a.ackedAt,
      owner: cluster.owner(a.action.hash),
      outcome: lostOutputs.length > 0 ? `${out} (outputs lost: ${lostOutputs.join(', ')})` : out,
      heldBy: '',
      faultsSince: faultsSince(a.startedAt),
      edgeLog: edgeLogFor(a.action.hash),
    };
    (out === 'not-found' || out === 'wrong result' ? lostActions : unreadableAtEnd).push(rec);
  }

  const rss: ProcessRss[] = [];
  rss.push({ name: 'edge', startKiB: rssStart.get('edge'), endKiB: await rssKiB(cluster.edge.node.pid), restarts: restarts.get('edge') ?? 0 });
  for (const n of nodes) rss.push({ name: n.name, startKiB: rssStart.get(n.name), endKiB: await rssKiB(n.node.pid), restarts: restarts.get(n.name) ?? 0 });

  return {
    seed: o.seed,
    durationMs: o.durationMs,
    durability: o.durability,
    doubleFaults: o.doubleFaults === true,
    workers: o.workers,
    faults,
    actions: actionCounts,
    rpcs,
    bytesUploaded,
    bytesRead,
    ackedBlobs: blobs.length,
    ackedLargeBlobs: blobs.filter((b) => b.size > BATCH_MAX).length,
    ackedActions: actions.length,
    settled,
    settleMs,
    unsettledReasons,
    lostBlobs,
    lostActions,
    unreadableAtEnd,
    findMissingChecked,
    findMissingLies,
    findMissingUnconfirmed,
    ackedReportedMissing,
    actionHitsChecked,
    incompleteActionResults,
    ackedActionsMissing,
    errors,
    unexpectedErrors,
    unexpectedByCode,
    errorSamples,
    unexpectedOutsideFaults: unexpectedAt
      .filter((e) => !faults.some((f) => e.end >= f.at && e.start <= (f.recoveredAt < 0 ? Number.POSITIVE_INFINITY : f.recoveredAt + FAULT_WINDOW_MS)))
      .map((e) => `${s(e.start)} ${e.what}`),
    unexpectedByReason: [...unexpectedByReason].map(([reason, count]) => ({ reason, count })).sort((a, b) => b.count - a.count),
    totalRpcs: Object.values(rpcs).reduce((n, r) => n + r.ok + r.failed, 0),
    rss,
    edgeCounters: countersOf(lastState),
    edgeWarnings: tallyWarnings(edgeLines),
    wallMs: Date.now() - wall0,
  };
}

function sha(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

interface LogLine {
  readonly time: number;
  readonly level: string;
  readonly msg: string;
  readonly raw: string;
}

const LEVELS: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** The pino JSON lines of a process's output (other lines are skipped). */
function parseLog(lines: readonly string[]): LogLine[] {
  const out: LogLine[] = [];
  for (const raw of lines) {
    if (!raw.startsWith('{')) continue;
    try {
      const r = JSON.parse(raw) as { time?: number; level?: number; msg?: string };
      out.push({ time: Number(r.time ?? 0), level: LEVELS[r.level ?? 30] ?? String(r.level), msg: String(r.msg ?? ''), raw });
    } catch {
      // a torn line
    }
  }
  return out;
}

function tallyWarnings(lines: readonly LogLine[]): { level: string; msg: string; count: number }[] {
  const by = new Map<string, { level: string; msg: string; count: number }>();
  for (const l of lines) {
    if (l.level !== 'warn' && l.level !== 'error' && l.level !== 'fatal') continue;
    const k = `${l.level} ${l.msg}`;
    const e = by.get(k) ?? { level: l.level, msg: l.msg, count: 0 };
    e.count++;
    by.set(k, e);
  }
  return [...by.values()].sort((a, b) => b.count - a.count);
}

async function rssKiB(pid: number): Promise<number | undefined> {
  try {
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
    return m === null ? undefined : Number(m[1]);
  } catch {
    return undefined;
  }
}

// --- the edge's admin state ---------------------------------------------------------

/** The admin address the current edge process logged. */
async function adminUrl(cluster: Cluster): Promise<string> {
  for (let i = 0; i < 100; i++) {
    let url: string | undefined;
    for (const line of cluster.edge.node.logs()) {
      const m = /"admin":"([^"]+)"/.exec(line);
      if (m !== null) url = `http://${m[1]}`;
    }
    if (url !== undefined) return url;
    await sleep(100);
  }
  throw new Error('the edge logged no admin address');
}

async function adminState(cluster: Cluster): Promise<unknown> {
  const res = await fetch(`${await adminUrl(cluster)}/api/state`, { signal: AbortSignal.timeout(5000) });
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return res.json();
}

type Node = Record<string, unknown> & { kind?: string; children?: Node[] };

function walk(node: Node | undefined, path: string, visit: (n: Node, path: string) => void): void {
  if (node === undefined || node === null || typeof node !== 'object') return;
  visit(node, path);
  for (const c of node.children ?? []) walk(c, `${path}/${String(c.role ?? c.name ?? c.kind)}`, visit);
}

const numField = (r: unknown, k: string): number => {
  const v = typeof r === 'object' && r !== null ? (r as Record<string, unknown>)[k] : undefined;
  return typeof v === 'number' ? v : 0;
};
const recField = (r: unknown, k: string): Record<string, unknown> | undefined => {
  const v = typeof r === 'object' && r !== null ? (r as Record<string, unknown>)[k] : undefined;
  return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : undefined;
};

/** Waits until every sync fallback pair of the edge reports two copies and an empty secondary journal. */
async function waitTwoCopies(cluster: Cluster, timeoutMs: number): Promise<{ ok: boolean; ms: number; why: string }> {
  const t0 = Date.now();
  let why = 'not asked';
  while (Date.now() - t0 < timeoutMs) {
    try {
      why = oneCopyReasons(await adminState(cluster)).join('; ');
      if (why === '') return { ok: true, ms: Date.now() - t0, why };
    } catch (err) {
      why = `admin state: ${String(err)}`;
    }
    await sleep(200);
  }
  return { ok: false, ms: Date.now() - t0, why };
}

/** Sync fallback pairs running on one copy or owing the secondary a journal; [] when none. */
export function oneCopyReasons(state: unknown): string[] {
  const out: string[] = [];
  const trees = recField(state, 'trees') as Record<string, Node> | undefined;
  if (trees === undefined) return ['admin state has no trees'];
  for (const [tree, root] of Object.entries(trees)) {
    walk(root, tree, (n, path) => {
      if (n.kind !== 'fallback' || n.durability !== 'sync') return;
      if (n.copies !== 2) out.push(`${path}: ${String(n.oneCopy ?? 'one copy')}`);
      const backlog = numField(recField(n, 'secondaryJournal'), 'backlog');
      if (backlog > 0) out.push(`${path}: secondary journal backlog ${backlog}`);
    });
  }
  return out;
}

/** Why the cluster is not settled yet, per the edge's own admin state; [] when settled. */
export function unsettled(state: unknown): string[] {
  const out: string[] = [];
  const trees = recField(state, 'trees') as Record<string, Node> | undefined;
  if (trees === undefined) return ['admin state has no trees'];
  for (const [tree, root] of Object.entries(trees)) {
    walk(root, tree, (n, path) => {
      if (n.kind === 'sharding') {
        for (const s of (n.shards as Record<string, unknown>[] | undefined) ?? []) {
          if (s.state !== 'closed') out.push(`${path}: shard ${String(s.name)} breaker ${String(s.state)}`);
        }
        if (numField(n, 'hintsPending') > 0) out.push(`${path}: ${numField(n, 'hintsPending')} hints pending`);
      }
      if (n.kind === 'fallback') {
        const breaker = recField(n, 'breaker');
        if (breaker !== undefined && breaker.state !== 'closed') out.push(`${path}: primary breaker ${String(breaker.state)}`);
        const sb = recField(n, 'secondaryBreaker');
        if (sb !== undefined && sb.state !== 'closed') out.push(`${path}: secondary breaker ${String(sb.state)}`);
        const j = recField(n, 'journal');
        if (numField(j, 'backlog') > 0) out.push(`${path}: primary journal backlog ${numField(j, 'backlog')}`);
        const sj = recField(n, 'secondaryJournal');
        if (numField(sj, 'backlog') > 0) out.push(`${path}: secondary journal backlog ${numField(sj, 'backlog')}`);
        const rep = recField(n, 'replication');
        if (numField(rep, 'queued') + numField(rep, 'inFlight') > 0) {
          out.push(`${path}: replication ${numField(rep, 'queued')} queued, ${numField(rep, 'inFlight')} in flight`);
        }
      }
    });
  }
  return out;
}

/** Loss-relevant counters of the last edge process (they restart at 0 with it). */
function countersOf(state: unknown): Record<string, number> {
  const out: Record<string, number> = {};
  const trees = recField(state, 'trees') as Record<string, Node> | undefined;
  if (trees === undefined) return out;
  const add = (k: string, v: number) => {
    if (v !== 0) out[k] = (out[k] ?? 0) + v;
  };
  for (const [tree, root] of Object.entries(trees)) {
    walk(root, tree, (n, path) => {
      if (n.kind === 'sharding') {
        add(`${path} handoffCopied`, numField(n, 'handoffCopied'));
        add(`${path} handoffLost`, numField(n, 'handoffLost'));
        add(`${path} hintOverflows`, numField(n, 'hintOverflows'));
      }
      if (n.kind === 'fallback') {
        add(`${path} journal.replayed`, numField(recField(n, 'journal'), 'replayed'));
        add(`${path} journal.lost`, numField(recField(n, 'journal'), 'lost'));
        add(`${path} secondaryJournal.replayed`, numField(recField(n, 'secondaryJournal'), 'replayed'));
        add(`${path} secondaryJournal.lost`, numField(recField(n, 'secondaryJournal'), 'lost'));
        add(`${path} replication.failed`, numField(recField(n, 'replication'), 'failed'));
        add(`${path} replication.overflow`, numField(recField(n, 'replication'), 'overflow'));
        add(`${path} oneCopyWrites`, numField(n, 'oneCopyWrites'));
      }
      if (n.kind === 'completenessChecking') add(`${path} hiddenResults`, numField(n, 'hiddenResults'));
    });
  }
  return out;
}

// --- the table ------------------------------------------------------------------------

/** Whether the report keeps every invariant, and the bound on unexpected client errors. */
export interface Verdict {
  readonly ok: boolean;
  readonly failures: string[];
}

/**
 * Unexpected client errors (any error while the edge was up; anything but
 * UNAVAILABLE or a connection reset while it was being restarted) are
 * allowed up to this share of all RPCs, and only while a fault is in
 * progress or within FAULT_WINDOW_MS of its recovery (none at all outside):
 * an RPC in flight on a node at the moment it is SIGKILLed or SIGSTOPped can
 * fail before the breaker opens (the edge fails over new requests, not every
 * stream under way), and an ActionCache miss that asks a secondary which has
 * just died answers UNAVAILABLE until the secondary's breaker opens (~1 s;
 * the largest share in practice).
 */
export const UNEXPECTED_ERROR_BOUND = { share: 0.04, atLeast: 10 };

/**
 * The codes a fault explains: the edge or a node unreachable or too slow
 * (UNAVAILABLE, DEADLINE_EXCEEDED), or a connection reset under an RPC in
 * flight (connect-node's ABORTED). Anything else (INTERNAL, UNKNOWN,
 * DATA_LOSS, INVALID_ARGUMENT, ...) is a bug whatever the count.
 */
export const FAULT_CODES: readonly string[] = ['Unavailable', 'DeadlineExceeded', 'Aborted'];

/** Unexpected client errors with a code no fault explains, e.g. ["Internal x3"]. */
export function unexplainedCodes(r: SoakReport): string[] {
  return Object.entries(r.unexpectedByCode)
    .filter(([code]) => !FAULT_CODES.includes(code))
    .map(([code, n]) => `${code} x${n}`);
}

export function verdict(r: SoakReport): Verdict {
  const failures: string[] = [];
  if (!r.settled) failures.push(`the cluster did not settle: ${r.unsettledReasons.join('; ')}`);
  if (r.lostBlobs.length > 0) failures.push(`${r.lostBlobs.length} acknowledged blobs lost`);
  if (r.lostActions.length > 0) failures.push(`${r.lostActions.length} acknowledged ActionResults lost`);
  if (r.unreadableAtEnd.length > 0) failures.push(`${r.unreadableAtEnd.length} acknowledged writes unreadable at the end (errors, not NOT_FOUND)`);
  if (r.findMissingLies.length > 0) failures.push(`${r.findMissingLies.length} FindMissing lies`);
  if (r.incompleteActionResults.length > 0) failures.push(`${r.incompleteActionResults.length} incomplete ActionResults served`);
  const bound = errorBound(r);
  if (r.unexpectedErrors > bound) failures.push(`${r.unexpectedErrors} unexpected client errors (bound ${bound})`);
  if (r.unexpectedOutsideFaults.length > 0) failures.push(`${r.unexpectedOutsideFaults.length} client errors with no fault in progress`);
  const odd = unexplainedCodes(r);
  if (odd.length > 0) failures.push(`client errors no fault explains: ${odd.join(', ')}`);
  return { ok: failures.length === 0, failures };
}

export function errorBound(r: SoakReport): number {
  return Math.max(UNEXPECTED_ERROR_BOUND.atLeast, Math.floor(r.totalRpcs * UNEXPECTED_ERROR_BOUND.share));
}

const s = (ms: number) => `${ms >= 0 ? '+' : ''}${(ms / 1000).toFixed(1)}s`;
const mib = (kib: number | undefined) => (kib === undefined ? '?' : (kib / 1024).toFixed(0));

function table(rows: (string | number)[][]): string[] {
  const widths: number[] = [];
  for (const row of rows) row.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, String(c).length)));
  return rows.map((row) => row.map((c, i) => (typeof c === 'number' ? String(c).padStart(widths[i]!) : String(c).padEnd(widths[i]!))).join('  ').trimEnd());
}

/** The report as text lines. */
export function formatReport(r: SoakReport): string[] {
  const v = verdict(r);
  const pf = (bad: boolean) => (bad ? 'FAIL' : 'ok');
  const lines: string[] = [];
  lines.push(
    `chaos soak: seed ${r.seed}, ${r.durationMs / 1000} s, durability ${r.durability}${r.doubleFaults ? ' (double faults allowed)' : ''}, ` +
      `${r.workers} workers, wall ${(r.wallMs / 1000).toFixed(0)} s`,
  );
  lines.push('');
  lines.push(`faults (${r.faults.length}):`);
  lines.push(
    ...table([
      ['#', 'at', 'kind', 'target', 'hold ms', 'back at', ''],
      ...r.faults.map((f) => [f.id, s(f.at), f.kind, f.target, f.holdMs, f.recoveredAt < 0 ? '-' : s(f.recoveredAt), f.detail]),
    ]).map((l) => `  ${l}`),
  );
  lines.push('');
  lines.push(
    `load: ${r.actions.completed} actions done, ${r.actions.failed} failed (retried by the next); ${r.totalRpcs} RPCs; ` +
      `${(r.bytesUploaded / MiB).toFixed(0)} MiB up, ${(r.bytesRead / MiB).toFixed(0)} MiB read; ` +
      `acknowledged ${r.ackedBlobs} blobs (${r.ackedLargeBlobs} large) and ${r.ackedActions} ActionResults`,
  );
  lines.push('');
  lines.push(
    ...table([
      ['invariant', 'result', 'count'],
      ['cluster settled (breakers closed, hints and journals drained)', pf(!r.settled), r.settled ? `in ${(r.settleMs / 1000).toFixed(1)} s` : r.unsettledReasons.join('; ')],
      ['acknowledged blobs lost', pf(r.lostBlobs.length > 0), `${r.lostBlobs.length} of ${r.ackedBlobs}`],
      ['acknowledged ActionResults lost', pf(r.lostActions.length > 0), `${r.lostActions.length} of ${r.ackedActions}`],
      ['acknowledged writes unreadable at the end (errors)', pf(r.unreadableAtEnd.length > 0), String(r.unreadableAtEnd.length)],
      ['FindMissing lies (present, then NOT_FOUND / other bytes)', pf(r.findMissingLies.length > 0), `${r.findMissingLies.length} of ${r.findMissingChecked} reads`],
      ['incomplete ActionResults served', pf(r.incompleteActionResults.length > 0), `${r.incompleteActionResults.length} of ${r.actionHitsChecked} hits`],
      ['unexpected client errors', pf(r.unexpectedErrors > errorBound(r)), `${r.unexpectedErrors} (bound ${errorBound(r)} of ${r.totalRpcs} RPCs)`],
      ['unexpected client errors with no fault in progress (or 5 s after)', pf(r.unexpectedOutsideFaults.length > 0), String(r.unexpectedOutsideFaults.length)],
      ['client errors with a code no fault explains', pf(unexplainedCodes(r).length > 0), unexplainedCodes(r).join(', ') || '0'],
      ['(info) acked blobs FindMissing called missing during the run', '', String(r.ackedReportedMissing.length)],
      ['(info) acked ActionResults NOT_FOUND during the run', '', String(r.ackedActionsMissing.length)],
      ['(info) present, then a transient read error', '', String(r.findMissingUnconfirmed)],
    ]).map((l) => `  ${l}`),
  );
  lines.push('');
  lines.push('client errors by code (NOT_FOUND is an answer, not counted):');
  const codes = Object.entries(r.errors).sort((a, b) => b[1].edgeDown + b[1].otherwise - (a[1].edgeDown + a[1].otherwise));
  lines.push(
    ...table([
      ['code', 'edge restarting', 'otherwise'],
      ...(codes.length === 0 ? [['(none)', 0, 0]] : codes.map(([c, n]) => [c, n.edgeDown, n.otherwise])),
    ]).map((l) => `  ${l}`),
  );
  if (r.unexpectedByReason.length > 0) {
    lines.push('  unexpected, by reason:');
    for (const u of r.unexpectedByReason.slice(0, 12)) lines.push(`    ${String(u.count).padStart(5)}  ${u.reason}`);
  }
  if (r.errorSamples.length > 0) {
    lines.push('  a few of each code:');
    for (const e of r.errorSamples) {
      lines.push(
        `    ${s(e.at)} ${e.expected ? 'expected' : 'UNEXPECTED'} ${e.rpc} ${e.code}${e.edgeDown ? ' (edge restarting)' : ''}: ${e.message} ` +
          `[faults: ${e.faultsAround.join(', ') || 'none'}]`,
      );
    }
  }
  lines.push('');
  lines.push(
    ...table([
      ['RSS MiB', 'start', 'end', 'restarts'],
      ...r.rss.map((p) => [p.name, mib(p.startKiB), mib(p.endKiB), p.restarts]),
    ]).map((l) => `  ${l}`),
  );
  const counters = Object.entries(r.edgeCounters);
  if (counters.length > 0) {
    lines.push('');
    lines.push(`edge counters (last edge process): ${counters.map(([k, n]) => `${k}=${n}`).join(', ')}`);
  }
  if (r.edgeWarnings.length > 0) {
    lines.push('');
    lines.push('edge warnings and errors (every edge process), most frequent first:');
    for (const w of r.edgeWarnings.slice(0, 12)) lines.push(`  ${String(w.count).padStart(5)}  ${w.level}  ${w.msg}`);
  }
  const detail = (title: string, xs: readonly LostWrite[]) => {
    if (xs.length === 0) return;
    lines.push('');
    lines.push(`${title} (${xs.length}):`);
    for (const x of xs.slice(0, 50)) {
      lines.push(
        `  ${x.what} ${x.digest} via ${x.via}, written ${s(x.startedAt)}..${s(x.ackedAt)}, owner ${x.owner}: ${x.outcome}` +
          `${x.heldBy ? `; held by ${x.heldBy}` : ''}; faults since: ${x.faultsSince.join(', ') || 'none'}`,
      );
      for (const l of x.edgeLog) lines.push(`      edge log: ${l}`);
    }
  };
  detail('LOST acknowledged writes', [...r.lostBlobs, ...r.lostActions]);
  detail('unreadable at the end', r.unreadableAtEnd);
  const viol = (title: string, xs: readonly Violation[]) => {
    if (xs.length === 0) return;
    lines.push('');
    lines.push(`${title} (${xs.length}):`);
    for (const x of xs.slice(0, 20)) lines.push(`  ${s(x.at)} ${x.digest}: ${x.detail} [faults: ${x.faultsAround.join(', ') || 'none'}]`);
  };
  if (r.unexpectedOutsideFaults.length > 0) {
    lines.push('');
    lines.push(`client errors with no fault in progress (${r.unexpectedOutsideFaults.length}):`);
    for (const e of r.unexpectedOutsideFaults.slice(0, 20)) lines.push(`  ${e}`);
  }
  viol('FindMissing lies', r.findMissingLies);
  viol('incomplete ActionResults', r.incompleteActionResults);
  viol('(info) acknowledged blobs reported missing during the run', r.ackedReportedMissing);
  viol('(info) acknowledged ActionResults NOT_FOUND during the run', r.ackedActionsMissing);
  lines.push('');
  lines.push(v.ok ? 'verdict: PASS' : `verdict: FAIL: ${v.failures.join('; ')}`);
  return lines;
}
