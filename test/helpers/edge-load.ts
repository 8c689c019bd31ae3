// Client load and failover measurements against an edge cluster
// (test/helpers/cluster.ts), shared by test/e2e/edge-faults.test.ts and
// bench/edge.ts. Everything goes through a real gRPC client (connect-node over
// HTTP/2), and every time is Date.now() so it lines up with the edge's log.
//
// One "op" is a full round trip for one fresh blob owned by a chosen shard:
//   FindMissing (must say missing) -> write (BatchUpdate or ByteStream in
//   16 KiB messages, alternating) -> FindMissing (must say present) -> read
//   back (BatchRead or ByteStream, byte-compared) -> every third op also
//   UpdateActionResult + GetActionResult for an action owned by the same shard.
// So an op succeeds only if the edge kept its promise: what FindMissing
// vouched for is readable, and an ActionResult is served with its outputs.
import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { create } from '@bufbuild/protobuf';
import { type Client, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import {
  ActionCache,
  ContentAddressableStorage,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';

export interface ProtoDigest {
  hash: string;
  sizeBytes: bigint;
}

export interface ReapiClients {
  cas: Client<typeof ContentAddressableStorage>;
  ac: Client<typeof ActionCache>;
  bs: Client<typeof ByteStream>;
}

export function reapiClients(baseUrl: string): ReapiClients {
  const transport = createGrpcTransport({ baseUrl, readMaxBytes: 64 * 1024 * 1024, writeMaxBytes: 64 * 1024 * 1024 });
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
  };
}

export interface Blob {
  data: Buffer;
  digest: ProtoDigest;
}

/** A random blob of `size` bytes whose digest `owner` assigns to `shard`. */
export function blobOwnedBy(shard: string, owner: (hash: string) => string, size: number): Blob {
  for (;;) {
    const data = randomBytes(size);
    const hash = createHash('sha256').update(data).digest('hex');
    if (owner(hash) === shard) return { data, digest: { hash, sizeBytes: BigInt(size) } };
  }
}

/** A random action digest (a CAS-style key for the AC) owned by `shard`. */
export function actionOwnedBy(shard: string, owner: (hash: string) => string): ProtoDigest {
  return blobOwnedBy(shard, owner, 147).digest;
}

const BYTESTREAM_MESSAGE = 16 * 1024; // what Bazel sends

export async function writeByteStream(c: ReapiClients, instanceName: string, blob: Blob, timeoutMs: number): Promise<void> {
  const size = blob.data.length;
  const name = `${instanceName ? `${instanceName}/` : ''}uploads/${crypto.randomUUID()}/blobs/${blob.digest.hash}/${size}`;
  async function* requests() {
    for (let o = 0; o < size; o += BYTESTREAM_MESSAGE) {
      const end = Math.min(size, o + BYTESTREAM_MESSAGE);
      yield create(WriteRequestSchema, {
        resourceName: o === 0 ? name : '',
        writeOffset: BigInt(o),
        data: blob.data.subarray(o, end),
        finishWrite: end === size,
      });
    }
  }
  const res = await c.bs.write(requests(), { timeoutMs });
  if (res.committedSize !== BigInt(size)) throw new Error(`ByteStream Write committed ${res.committedSize} of ${size}`);
}

export async function readByteStream(c: ReapiClients, instanceName: string, d: ProtoDigest, timeoutMs: number): Promise<Buffer> {
  const parts: Uint8Array[] = [];
  const name = `${instanceName ? `${instanceName}/` : ''}blobs/${d.hash}/${d.sizeBytes}`;
  for await (const res of c.bs.read({ resourceName: name }, { timeoutMs })) parts.push(res.data);
  return Buffer.concat(parts);
}

export async function writeBatch(c: ReapiClients, instanceName: string, blobs: Blob[], timeoutMs: number): Promise<void> {
  const res = await c.cas.batchUpdateBlobs(
    { instanceName, requests: blobs.map((b) => ({ digest: b.digest, data: b.data })) },
    { timeoutMs },
  );
  for (const r of res.responses) {
    if (r.status !== undefined && r.status.code !== 0) throw new Error(`BatchUpdateBlobs: ${r.digest?.hash}: [${r.status.code}] ${r.status.message}`);
  }
}

export async function readBatch(c: ReapiClients, instanceName: string, d: ProtoDigest, timeoutMs: number): Promise<Buffer> {
  const res = await c.cas.batchReadBlobs({ instanceName, digests: [d] }, { timeoutMs });
  const r = res.responses[0];
  if (r === undefined || (r.status !== undefined && r.status.code !== 0)) {
    throw new Error(`BatchReadBlobs: [${r?.status?.code}] ${r?.status?.message}`);
  }
  return Buffer.from(r.data);
}

export async function missingOf(c: ReapiClients, instanceName: string, digests: ProtoDigest[], timeoutMs: number): Promise<string[]> {
  const res = await c.cas.findMissingBlobs({ instanceName, blobDigests: digests }, { timeoutMs });
  return res.missingBlobDigests.map((d) => d.hash);
}

export interface OpRecord {
  readonly start: number;
  readonly end: number;
  readonly ok: boolean;
  /** Which step failed and why. */
  readonly error?: string;
}

export interface LoadOptions {
  readonly edgeUrl: string;
  readonly instanceName: string;
  readonly shard: string;
  readonly owner: (hash: string) => string;
  /** A new op starts this often, whether or not earlier ones finished (an open loop). Default 100 ms. */
  readonly everyMs?: number;
  /** Most ops in flight; at the cap, a tick starts none (counted in `skipped`). Default 64. */
  readonly maxInFlight?: number;
  /** Client deadline per RPC. Default 20 s (longer than the edge's own timeouts). */
  readonly rpcTimeoutMs?: number;
  /** ByteStream blob size. Default 96 KiB. */
  readonly byteStreamBytes?: number;
}

/**
 * Starts one op for one shard's keys every `everyMs` until stop(), and keeps
 * a record of each. An open loop, like many independent clients: ops stuck
 * on a blackholed shard do not hold back the ops that start after them, so
 * the records show when new requests are served again.
 */
export class ShardKeyLoad {
  readonly records: OpRecord[] = [];
  /** Ticks that started no op because `maxInFlight` were running. */
  skipped = 0;
  readonly #opts: LoadOptions;
  readonly #c: ReapiClients;
  readonly #inFlight = new Set<Promise<void>>();
  #timer: NodeJS.Timeout | undefined;
  #seq = 0;

  constructor(opts: LoadOptions) {
    this.#opts = opts;
    this.#c = reapiClients(opts.edgeUrl);
  }

  start(): void {
    this.#timer = setInterval(() => this.#tick(), this.#opts.everyMs ?? 100);
  }

  /** Stops starting ops and waits for the running ones. */
  async stop(): Promise<OpRecord[]> {
    clearInterval(this.#timer);
    await Promise.all(this.#inFlight);
    return this.records;
  }

  #tick(): void {
    if (this.#inFlight.size >= (this.#opts.maxInFlight ?? 64)) {
      this.skipped++;
      return;
    }
    const i = this.#seq++;
    const start = Date.now();
    const p = this.#op(i).then(
      () => void this.records.push({ start, end: Date.now(), ok: true }),
      (err: unknown) => {
        const msg = err instanceof ConnectError ? `[${err.code}] ${err.rawMessage}` : String(err);
        this.records.push({ start, end: Date.now(), ok: false, error: msg });
      },
    );
    this.#inFlight.add(p);
    void p.finally(() => this.#inFlight.delete(p));
  }

  async #op(i: number): Promise<void> {
    const { instanceName: inst, shard, owner } = this.#opts;
    const timeout = this.#opts.rpcTimeoutMs ?? 20_000;
    const c = this.#c;
    const viaByteStream = i % 2 === 1;
    const blob = blobOwnedBy(shard, owner, viaByteStream ? (this.#opts.byteStreamBytes ?? 96 * 1024) : 1024 + (i % 7) * 300);
    const step = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
      try {
        return await fn();
      } catch (err) {
        const msg = err instanceof ConnectError ? `[${err.code}] ${err.rawMessage}` : String(err);
        throw new Error(`${what}: ${msg}`);
      }
    };
    const before = await step('FindMissing (fresh)', () => missingOf(c, inst, [blob.digest], timeout));
    if (before.length !== 1) throw new Error('FindMissing (fresh): a never-written blob was reported present');
    if (viaByteStream) await step('ByteStream Write', () => writeByteStream(c, inst, blob, timeout));
    else await step('BatchUpdateBlobs', () => writeBatch(c, inst, [blob], timeout));
    const after = await step('FindMissing (written)', () => missingOf(c, inst, [blob.digest], timeout));
    if (after.length !== 0) throw new Error('FindMissing (written): a blob just written is reported missing');
    const back = viaByteStream
      ? await step('ByteStream Read', () => readByteStream(c, inst, blob.digest, timeout))
      : await step('BatchReadBlobs', () => readBatch(c, inst, blob.digest, timeout));
    if (!back.equals(blob.data)) throw new Error(`read back ${back.length} bytes that differ from the ${blob.data.length} written`);
    if (i % 3 === 0) {
      const actionDigest = actionOwnedBy(shard, owner);
      await step('UpdateActionResult', () =>
        c.ac.updateActionResult(
          { instanceName: inst, actionDigest, actionResult: { exitCode: 0, outputFiles: [{ path: 'out/blob', digest: blob.digest }] } },
          { timeoutMs: timeout },
        ),
      );
      const got = await step('GetActionResult', () => c.ac.getActionResult({ instanceName: inst, actionDigest }, { timeoutMs: timeout }));
      if (got.outputFiles[0]?.digest?.hash !== blob.digest.hash) throw new Error('GetActionResult returned another result');
    }
  }
}

export interface FailoverFigures {
  /** Ops that started at or after the fault. */
  readonly opsAfterFault: number;
  /** Of those, how many failed. */
  readonly failedAfterFault: number;
  /**
   * Fault -> 100% success: the earliest time after the fault from which every
   * op that started succeeded within `latencyBoundMs`, minus the fault time.
   * 0 when no op after the fault failed or was slow.
   */
  readonly detectMs: number;
  /** Ops that started after that point and failed (the assertion: zero). */
  readonly failedAfterDetection: number;
  /** The slowest op that started after the fault, ms. */
  readonly maxLatencyMs: number;
  /** First few failures, for the log. */
  readonly sampleErrors: string[];
  /** The last few failed or slow ops after the fault: "+START ms: DURATION ms ERROR". */
  readonly lastBad: string[];
}

/** Evaluates the op records of one fault; see FailoverFigures. `until` ends the window. */
export function failoverFigures(records: readonly OpRecord[], faultAt: number, until: number, latencyBoundMs: number): FailoverFigures {
  const after = records.filter((r) => r.start >= faultAt && r.start < until).sort((a, b) => a.start - b.start);
  const bad = (r: OpRecord) => !r.ok || r.end - r.start > latencyBoundMs;
  let lastBad = -1;
  after.forEach((r, i) => {
    if (bad(r)) lastBad = i;
  });
  let healedAt = faultAt;
  if (lastBad >= 0) healedAt = after[lastBad + 1]?.start ?? until;
  return {
    opsAfterFault: after.length,
    failedAfterFault: after.filter((r) => !r.ok).length,
    detectMs: healedAt - faultAt,
    failedAfterDetection: after.filter((r) => r.start >= healedAt && !r.ok).length,
    maxLatencyMs: Math.max(0, ...after.map((r) => r.end - r.start)),
    sampleErrors: after.filter((r) => !r.ok).slice(0, 3).map((r) => r.error ?? '?'),
    lastBad: after
      .filter(bad)
      .slice(-3)
      .map((r) => `+${r.start - faultAt} ms: ${r.end - r.start} ms${r.ok ? '' : ` ${r.error}`}`),
  };
}

/**
 * Failed ops that overlap no [fault, fault + windowMs) window. An op still
 * running when a fault hits counts as inside: it may have written its blob
 * to the shard that then died, and a blob on a dead shard is unreadable
 * until it returns (there is no replica without a fallback).
 */
export function failuresOutside(records: readonly OpRecord[], faults: readonly number[], windowMs: number): OpRecord[] {
  return records.filter((r) => !r.ok && !faults.some((f) => r.start < f + windowMs && r.end >= f));
}

export interface ShardTarget {
  readonly name: string;
  readonly url: string;
}

/**
 * Recovery -> traffic returned: writes a fresh blob owned by `shard` through
 * the edge every `everyMs` and asks every shard directly; resolves with the
 * time (Date.now()) of the first write that landed on the owner itself and on
 * no other shard (so not a stand-in write copied back by handoff).
 */
export async function waitForTrafficOn(
  edgeUrl: string,
  instanceName: string,
  shard: string,
  shards: readonly ShardTarget[],
  owner: (hash: string) => string,
  deadlineMs: number,
  everyMs = 50,
): Promise<number | undefined> {
  const edge = reapiClients(edgeUrl);
  const direct = shards.map((s) => ({ name: s.name, c: reapiClients(s.url) }));
  const deadline = Date.now() + deadlineMs;
  while (Date.now() < deadline) {
    const blob = blobOwnedBy(shard, owner, 512);
    try {
      await writeBatch(edge, instanceName, [blob], 5000);
      const written = Date.now();
      const where = await Promise.all(
        direct.map(async (d) => {
          try {
            return (await missingOf(d.c, '', [blob.digest], 500)).length === 0 ? d.name : undefined;
          } catch {
            return undefined;
          }
        }),
      );
      const holders = where.filter((w) => w !== undefined);
      if (holders.length === 1 && holders[0] === shard) return written;
    } catch {
      // a failed write is the load's business; keep polling
    }
    await sleep(everyMs);
  }
  return undefined;
}
