import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError } from '@connectrpc/connect';
import { pino } from 'pino';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestKey, digestOf } from '../../src/digest.ts';
import { DurableLog } from '../../src/durable-log.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import type { FallbackStoreOpenOptions, JournalRecord } from '../../src/stores/fallback-store.ts';
import { FallbackStore, JOURNAL_FILE } from '../../src/stores/fallback-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { collect, once } from '../../src/streams.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';
import { SwappableStore } from '../helpers/swappable-store.ts';
import { failure } from '../helpers/failure.ts';

const enc = new TextEncoder();
const dec = new TextDecoder();

interface Stats {
  serving: string;
  breaker: { state: string };
  failovers: number;
  replication: { queued: number; inFlight: number; done: number; failed: number; vanished: number; overflow: number; overflowPolicy: string; lagMs: number };
  journal: { backlog: number; inFlight: number; replayed: number; lost: number };
  repairs: { queued: number; inFlight: number; done: number; failed: number; dropped: number };
  children: { role: string }[];
}

interface Rig {
  store: FallbackStore;
  /** Fault injection in front of the primary; its backend can be swapped. */
  primary: FaultyStore;
  primarySlot: SwappableStore;
  secondary: FaultyStore;
  secondarySlot: SwappableStore;
  secondaryMem: MemoryStore;
  journalDir: string;
  stats: () => Stats;
}

function memory(contentAddressed = true): MemoryStore {
  return new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed });
}

/** The primary's current backend, as a MemoryStore. */
function primaryMem(rig: Rig): BlobStore {
  return rig.primarySlot.target;
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'fallback-store-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

type RigOptions = Partial<Omit<FallbackStoreOpenOptions, 'primary' | 'secondary'>> & { contentAddressed?: boolean };

async function rig(opts: RigOptions = {}, reuse?: Omit<Rig, 'store' | 'stats'>): Promise<Rig> {
  const { contentAddressed = true, ...storeOpts } = opts;
  const parts = reuse ?? (() => {
    const primarySlot = new SwappableStore(memory(contentAddressed));
    const secondaryMem = memory(contentAddressed);
    const secondarySlot = new SwappableStore(secondaryMem);
    return {
      primary: new FaultyStore(primarySlot),
      primarySlot,
      secondary: new FaultyStore(secondarySlot),
      secondarySlot,
      secondaryMem,
      journalDir: '',
    };
  })();
  const journalDir = reuse?.journalDir ?? await tempDir();
  const store = await FallbackStore.open({
    primary: parts.primary,
    secondary: parts.secondary,
    journalDir,
    primaryHealthCheck: parts.primary.check,
    healthCheckIntervalMs: 20,
    healthCheckTimeoutMs: 100,
    breaker: { consecutiveFailures: 3, healthCheckFailures: 2, closeAfterProbes: 2, backoffInitialMs: 50, backoffMaxMs: 200 },
    replication: { retryInitialMs: 10, retryMaxMs: 50, maxAttempts: 1000 },
    replay: { retryInitialMs: 10, retryMaxMs: 50 },
    ...storeOpts,
  });
  t.teardown(() => store.close());
  return { ...parts, journalDir, store, stats: () => store.describe() as unknown as Stats };
}

function blob(name: string): { data: Uint8Array; digest: Digest } {
  const data = enc.encode(`blob ${name}`);
  return { data, digest: digestOf(data) };
}

async function put(store: BlobStore, b: { data: Uint8Array; digest: Digest }): Promise<void> {
  await store.put(b.digest, once(b.data));
}

async function read(store: BlobStore, d: Digest): Promise<string> {
  return dec.decode(await collect(await store.get(d)));
}

async function has(store: BlobStore, d: Digest): Promise<boolean> {
  return (await store.findMissing([d])).length === 0;
}

async function waitFor(cond: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Yields `data` as several chunks, so a store can fail after the first. */
async function* chunked(data: Uint8Array, size: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.byteLength; i += size) yield data.subarray(i, i + size);
}

t.test('healthy: writes go to the primary and are replicated to the secondary', async (t) => {
  const r = await rig();
  const blobs = Array.from({ length: 20 }, (_, i) => blob(`healthy ${i}`));
  await Promise.all(blobs.map((b) => put(r.store, b)));
  const digests = blobs.map((b) => b.digest);
  t.same(await primaryMem(r).findMissing(digests), [], 'the primary holds every write at once');
  await waitFor(() => r.stats().replication.done === 20, 'replication');
  t.same(await r.secondaryMem.findMissing(digests), [], 'the secondary holds every write after replication');
  const s = r.stats();
  t.equal(s.serving, 'primary');
  t.match(s.replication, { queued: 0, inFlight: 0, done: 20, failed: 0, overflow: 0, lagMs: 0 });
  t.equal(s.journal.backlog, 0, 'nothing journaled while the primary is healthy');
  t.same(s.children.map((c) => c.role), ['primary', 'secondary']);
  t.equal(await read(r.store, blobs[3]!.digest), 'blob healthy 3');
});

t.test('replication is deduplicated by digest', async (t) => {
  const r = await rig({ replication: { concurrency: 1 } });
  r.secondary.mode = 'slow';
  r.secondary.delayMs = 150;
  const a = blob('dedup a');
  const b = blob('dedup b');
  await put(r.store, a); // starts at once and waits on the slow secondary
  await put(r.store, b);
  await put(r.store, b);
  await put(r.store, b);
  t.match(r.stats().replication, { inFlight: 1, queued: 1 });
  await waitFor(() => r.stats().replication.done === 2, 'replication');
  t.equal(r.secondary.calls.put, 2, 'one copy per digest');
});

t.test('a hung secondary does not hold up FindMissing on the healthy path', async (t) => {
  const r = await rig({ secondaryLookupTimeoutMs: 100, secondaryLookupCooldownMs: 60_000 });
  r.secondary.mode = 'blackhole';
  // The deadline is an unref'd timer (a server holds the loop open); hold it here.
  const keepAlive = setInterval(() => {}, 1000);
  t.teardown(() => clearInterval(keepAlive));
  const fresh = [blob('new 1'), blob('new 2'), blob('new 3')];
  let t0 = Date.now();
  t.same(await r.store.findMissing([fresh[0]!.digest]), [fresh[0]!.digest], 'what the primary lacks is reported missing');
  const first = Date.now() - t0;
  t.ok(first >= 90 && first < 1000, `the first lookup gives up on the secondary after its deadline (${first} ms)`);
  t0 = Date.now();
  t.same(await r.store.findMissing([fresh[1]!.digest, fresh[2]!.digest]), [fresh[1]!.digest, fresh[2]!.digest]);
  t.ok(Date.now() - t0 < 50, `later lookups leave the secondary out (${Date.now() - t0} ms)`);
  t.equal(r.secondary.calls.findMissing, 1, 'the secondary was asked once');
  t.match(r.store.describe(), { serving: 'primary', secondaryLookups: { failed: 1, skipped: 1 } });
  await put(r.store, fresh[0]!);
  t.same(await r.store.findMissing([fresh[0]!.digest]), [], 'a blob the primary holds is present, secondary or not');
});

t.test('replication overflow is logged, rate-limited, with the count given up', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const logger = pino({ level: 'warn' }, { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
  const r = await rig({ replication: { maxQueue: 2, concurrency: 1 }, logger });
  r.secondary.mode = 'slow';
  r.secondary.delayMs = 100;
  const blobs = Array.from({ length: 10 }, (_, i) => blob(`overflow log ${i}`));
  for (const b of blobs) await put(r.store, b);
  const overflowLines = () => lines.filter((l) => /replication queue full/.test(String(l.msg)));
  t.equal(overflowLines().length, 1, 'one line for a burst, at once');
  t.match(overflowLines()[0], { level: 40, overflow: 1, overflowTotal: 1, policy: 'drop-oldest' });
  await r.store.close(); // flushes what the rate limit held back
  t.equal(overflowLines().length, 2, 'the rest of the burst in one trailing line');
  t.match(overflowLines()[1], { overflow: 6, overflowTotal: 7 });
});

for (const overflow of ['drop-oldest', 'reject-new'] as const) {
  t.test(`a full replication queue (${overflow}) counts what it gives up`, async (t) => {
    const r = await rig({ replication: { maxQueue: 2, concurrency: 1, overflow } });
    r.secondary.mode = 'slow';
    r.secondary.delayMs = 100;
    const blobs = Array.from({ length: 10 }, (_, i) => blob(`overflow ${overflow} ${i}`));
    for (const b of blobs) await put(r.store, b); // every write succeeds regardless
    t.match(r.stats().replication, { inFlight: 1, queued: 2, overflow: 7, overflowPolicy: overflow });
    await waitFor(() => r.stats().replication.done === 3, 'replication');
    const kept = overflow === 'drop-oldest' ? [0, 8, 9] : [0, 1, 2];
    for (const [i, b] of blobs.entries()) {
      t.equal(await has(r.secondaryMem, b.digest), kept.includes(i), `blob ${i} ${kept.includes(i) ? 'replicated' : 'given up'}`);
      t.ok(await has(primaryMem(r), b.digest), `blob ${i} on the primary`);
    }
  });
}

t.test('replication falls behind while the secondary is down and catches up', async (t) => {
  const r = await rig();
  r.secondary.mode = 'unavailable';
  const blobs = Array.from({ length: 30 }, (_, i) => blob(`behind ${i}`));
  for (const b of blobs) await put(r.store, b);
  await sleep(100);
  const behind = r.stats().replication;
  t.equal(behind.queued + behind.inFlight, 30, 'every write waits for replication');
  t.equal(behind.done, 0);
  t.ok(behind.lagMs >= 100, `lag ${behind.lagMs} ms is visible`);
  t.equal(r.stats().serving, 'primary', 'a down secondary does not affect serving');

  r.secondary.mode = 'ok';
  await waitFor(() => r.stats().replication.done === 30, 'catch-up');
  t.match(r.stats().replication, { queued: 0, inFlight: 0, failed: 0, lagMs: 0 });
  t.same(await r.secondaryMem.findMissing(blobs.map((b) => b.digest)), []);
});

t.test('a blob the primary no longer has is dropped from replication and counted', async (t) => {
  const r = await rig();
  r.secondary.mode = 'unavailable';
  const b = blob('vanishing');
  await put(r.store, b);
  await waitFor(() => r.secondary.calls.put >= 2, 'a failed replication attempt and its retry');
  r.primarySlot.target = memory(); // the primary lost it before it was copied
  r.secondary.mode = 'ok';
  await waitFor(() => r.stats().replication.vanished === 1, 'the drop');
  t.match(r.stats().replication, { queued: 0, done: 0, failed: 0 });
  t.notOk(await has(r.secondaryMem, b.digest));
});

t.test('primary killed during a write load: every acknowledged write stays readable', async (t) => {
  const r = await rig();
  const acked: Digest[] = [];
  const ackedWhileDown: Digest[] = [];
  let failed = 0;
  let killed = false;
  let replicatedAtKill = new Set<string>();
  const writer = async (w: number) => {
    for (let i = 0; i < 50; i++) {
      const b = blob(`load ${w}/${i}`);
      try {
        await put(r.store, b);
        acked.push(b.digest);
        if (killed) ackedWhileDown.push(b.digest);
      } catch {
        failed++;
      }
      if (w === 0 && i === 20) {
        const missing = new Set((await r.secondaryMem.findMissing(acked)).map(digestKey));
        replicatedAtKill = new Set(acked.map(digestKey).filter((k) => !missing.has(k)));
        r.primary.mode = 'unavailable';
        killed = true;
      }
      await sleep(1);
    }
  };
  await Promise.all(Array.from({ length: 8 }, (_, w) => writer(w)));
  t.equal(failed, 0, 'no write failed: those the primary refused went to the secondary');
  t.equal(acked.length, 400);
  t.ok(ackedWhileDown.length > 100, `${ackedWhileDown.length} writes acknowledged while the primary was down`);
  await waitFor(() => r.stats().serving === 'secondary', 'the breaker to open');
  t.equal(r.stats().journal.backlog, ackedWhileDown.length, 'each failover write is journaled');

  // While down: whatever FindMissing vouches for is readable; that covers
  // every write acknowledged after the kill and every one replicated before.
  const missingWhileDown = new Set((await r.store.findMissing(acked)).map(digestKey));
  let readableWhileDown = 0;
  for (const d of acked) {
    if (missingWhileDown.has(digestKey(d))) continue;
    await read(r.store, d);
    readableWhileDown++;
  }
  for (const d of ackedWhileDown) t.notOk(missingWhileDown.has(digestKey(d)), 'a failover write is present while down');
  for (const k of replicatedAtKill) t.notOk(missingWhileDown.has(k), 'a write replicated before the kill is present while down');
  t.comment(`while down: ${readableWhileDown} of ${acked.length} readable; ${missingWhileDown.size} were on the primary only (replication lag at the kill)`);

  r.primary.mode = 'ok';
  await waitFor(() => r.stats().serving === 'primary', 'the primary to return');
  await waitFor(() => r.stats().journal.backlog === 0, 'the journal to drain');
  let lost = 0;
  for (const d of acked) {
    try {
      await read(r.store, d);
    } catch {
      lost++;
    }
  }
  t.equal(lost, 0, 'zero acknowledged writes lost after the primary returned');
  t.same(await primaryMem(r).findMissing(acked), [], 'the primary holds every acknowledged write again');
  t.match(r.stats().journal, { backlog: 0, replayed: ackedWhileDown.length, lost: 0 });
});

t.test('a primary that returns empty is refilled by journal replay and read repair', async (t) => {
  const r = await rig();
  const before = Array.from({ length: 10 }, (_, i) => blob(`before ${i}`));
  for (const b of before) await put(r.store, b);
  await waitFor(() => r.stats().replication.done === 10, 'replication');

  r.primary.mode = 'unavailable';
  await waitFor(() => r.stats().serving === 'secondary', 'the breaker to open');
  const during = Array.from({ length: 10 }, (_, i) => blob(`during ${i}`));
  for (const b of during) await put(r.store, b);
  t.equal(r.stats().journal.backlog, 10);

  const fresh = memory();
  r.primarySlot.target = fresh; // the pod came back with an empty volume
  r.primary.mode = 'ok';
  await waitFor(() => r.stats().serving === 'primary' && r.stats().journal.backlog === 0, 'the journal to drain');
  t.same(await fresh.findMissing(during.map((b) => b.digest)), [], 'journal replay refilled the writes made while down');
  t.equal((await fresh.findMissing(before.map((b) => b.digest))).length, 10, 'older blobs are still missing on the primary');

  // Reads and FindMissing still find the older blobs (on the secondary) and repair them.
  for (const b of before.slice(0, 5)) t.equal(await read(r.store, b.digest), dec.decode(b.data));
  t.same(await r.store.findMissing(before.slice(5).map((b) => b.digest)), [], 'FindMissing vouches for blobs on the secondary');
  await waitFor(() => r.stats().repairs.done === 10, 'read repair');
  t.same(await fresh.findMissing([...before, ...during].map((b) => b.digest)), [], 'the primary holds everything again');
  t.match(r.stats(), { journal: { replayed: 10, lost: 0 }, repairs: { queued: 0, failed: 0 } });
});

t.test('restart: a new store on the same journal dir replays what the previous one journaled', async (t) => {
  const r = await rig();
  r.primarySlot.keepOnClose = true;
  r.secondarySlot.keepOnClose = true;
  r.primary.mode = 'unavailable';
  const blobs = Array.from({ length: 5 }, (_, i) => blob(`restart ${i}`));
  for (const b of blobs) await put(r.store, b);
  t.equal(r.stats().journal.backlog, 5);
  await r.store.close(); // the edge goes away with the primary still down

  r.primary.mode = 'ok';
  const r2 = await rig({}, r);
  t.equal(r2.stats().journal.backlog > 0 || r2.stats().journal.replayed > 0, true, 'the journal was loaded');
  await waitFor(() => r2.stats().journal.backlog === 0, 'the replay');
  t.same(await primaryMem(r2).findMissing(blobs.map((b) => b.digest)), [], 'the primary received every journaled write');
  t.equal(r2.stats().journal.replayed, 5);
  await r2.store.close();

  const journal = await DurableLog.open<JournalRecord>(join(r.journalDir, JOURNAL_FILE));
  t.equal(journal.size, 0, 'replayed entries are gone from the journal on disk');
  await journal.close();
});

t.test('FindMissing reports a blob present only if a read returns it', async (t) => {
  const r = await rig();
  const onPrimary = blob('fm primary only');
  const onSecondary = blob('fm secondary only');
  const nowhere = blob('fm nowhere');
  await put(primaryMem(r), onPrimary);
  await put(r.secondaryMem, onSecondary);
  const all = [onPrimary.digest, onSecondary.digest, nowhere.digest];

  // Healthy: missing on both.
  t.same(await r.store.findMissing(all), [nowhere.digest]);
  t.equal(await read(r.store, onSecondary.digest), 'blob fm secondary only', 'the secondary-only blob is readable');
  const miss = await failure(r.store.get(nowhere.digest));
  t.equal(miss.code, Code.NotFound);
  t.match(miss.message, /secondary: blob [0-9a-f]+-\d+ not found/);
  await waitFor(() => has(primaryMem(r), onSecondary.digest), 'the secondary-only blob to be repaired to the primary');

  // Healthy, secondary unreachable: what the primary lacks is reported missing.
  const onSecondary2 = blob('fm secondary only 2');
  await put(r.secondaryMem, onSecondary2);
  r.secondary.mode = 'unavailable';
  t.same(await r.store.findMissing([onPrimary.digest, onSecondary2.digest]), [onSecondary2.digest]);
  r.secondary.mode = 'ok';

  // Primary down: the secondary alone answers, since reads go there.
  r.primary.mode = 'unavailable';
  await waitFor(() => r.stats().serving === 'secondary', 'the breaker to open');
  const missing = await r.store.findMissing(all);
  t.same(missing.map(digestKey).sort(), [onPrimary.digest, nowhere.digest].map(digestKey).sort());
  for (const d of all) {
    if (missing.some((m) => digestKey(m) === digestKey(d))) {
      t.equal((await failure(r.store.get(d))).code, Code.NotFound);
    } else {
      await read(r.store, d);
    }
  }
});

t.test('a failing primary call falls back within the same request while the breaker is still closed', async (t) => {
  const r = await rig({ breaker: { consecutiveFailures: 1000, healthCheckFailures: 1000, minRequests: 1000 } });
  const onSecondary = blob('same request read');
  await put(r.secondaryMem, onSecondary);
  r.primary.mode = 'unavailable';

  t.equal(await read(r.store, onSecondary.digest), 'blob same request read');
  t.same(await r.store.findMissing([onSecondary.digest]), []);
  const w = blob('same request write');
  await put(r.store, w);
  t.ok(await has(r.secondaryMem, w.digest), 'the write landed on the secondary');
  t.equal(r.stats().journal.backlog, 1, 'and was journaled');
  t.equal(r.stats().serving, 'primary', 'the breaker never opened');
  t.ok(r.stats().failovers >= 3);
});

t.test('a write the primary failed mid-upload fails over only if the consumed prefix is still held', async (t) => {
  const r = await rig({ failoverBufferBytes: 64, breaker: { consecutiveFailures: 1000 } });
  r.primary.failPutMidStream = true;

  const small = blob('mid-stream small'.padEnd(40, '.'));
  await r.store.put(small.digest, chunked(small.data, 8));
  t.equal(await read(r.secondaryMem, small.digest), dec.decode(small.data), 'replayed to the secondary whole');
  t.equal(r.stats().journal.backlog, 1);

  const big = blob('mid-stream big'.padEnd(200, '.'));
  const err = await failure(r.store.put(big.digest, chunked(big.data, 100)));
  t.equal(err.code, Code.Unavailable);
  t.match(err.message, /primary: injected fault: connection reset mid-upload/);
  t.notOk(await has(r.secondaryMem, big.digest), 'nothing half-written on the secondary');
  t.equal(r.stats().journal.backlog, 1, 'nothing journaled for the failed write');
});

t.test('a client stream that fails is not held against the primary', async (t) => {
  const r = await rig({ breaker: { consecutiveFailures: 1 } });
  const b = blob('broken upload');
  async function* broken(): AsyncIterable<Uint8Array> {
    yield b.data.subarray(0, 3);
    throw new ConnectError('client went away', Code.Unavailable);
  }
  const err = await failure(r.store.put(b.digest, broken()));
  t.equal(err.code, Code.Unavailable);
  t.match(err.message, /client went away/);
  t.equal(r.stats().breaker.state, 'closed');
  t.notOk(await has(r.secondaryMem, b.digest));
});

t.test('answers from the primary are not failures: INVALID_ARGUMENT propagates and nothing fails over', async (t) => {
  const r = await rig({ breaker: { consecutiveFailures: 1 } });
  const b = blob('bad content');
  const err = await failure(r.store.put(b.digest, once(enc.encode('other content'))));
  t.equal(err.code, Code.InvalidArgument);
  t.match(err.message, /^\[invalid_argument\] primary: blob /);
  t.equal(r.stats().breaker.state, 'closed');
  t.equal(r.secondary.calls.put, 0);
});

t.test('a blackholed primary is caught by health checks; traffic returns after probes', async (t) => {
  const r = await rig();
  r.primary.mode = 'blackhole';
  await waitFor(() => r.stats().serving === 'secondary', 'the breaker to open');
  t.equal(r.stats().breaker.state, 'open');
  const b = blob('during blackhole');
  await put(r.store, b); // would hang forever on the primary
  t.ok(await has(r.secondaryMem, b.digest));

  r.primary.mode = 'ok';
  await waitFor(() => r.stats().serving === 'primary', 'the breaker to close');
  t.equal(r.stats().breaker.state, 'closed');
  await waitFor(() => has(primaryMem(r), b.digest), 'the journal replay');
});

t.test('the AC works the same: values written while down are replayed', async (t) => {
  const r = await rig({ contentAddressed: false });
  const key = digestOf(enc.encode('an action'));
  const value = enc.encode('an action result');
  r.primary.mode = 'unavailable';
  await waitFor(() => r.stats().serving === 'secondary', 'the breaker to open');
  await r.store.put(key, once(value));
  t.equal(dec.decode(await collect(await r.store.get(key))), 'an action result');
  r.primary.mode = 'ok';
  await waitFor(() => r.stats().journal.backlog === 0, 'the replay');
  t.equal(dec.decode(await collect(await primaryMem(r).get(key))), 'an action result');
});

t.test('a write the primary accepts supersedes a pending journal entry for the same key', async (t) => {
  const r = await rig({ contentAddressed: false, breaker: { consecutiveFailures: 1000, healthCheckFailures: 1000 } });
  const key = digestOf(enc.encode('a mutable action'));
  r.primary.mode = 'unavailable';
  await r.store.put(key, once(enc.encode('old result'))); // fails over, journaled
  t.equal(r.stats().journal.backlog, 1);
  // Hold the replay back so the newer write gets there first.
  r.secondary.mode = 'unavailable';
  r.primary.mode = 'ok';
  await r.store.put(key, once(enc.encode('new result')));
  t.equal(r.stats().journal.backlog, 0, 'the entry is gone: the primary has a newer value');
  r.secondary.mode = 'ok';
  await sleep(100);
  t.equal(dec.decode(await collect(await primaryMem(r).get(key))), 'new result');
});

t.test('close stops background work, closes the journal and the children, and is idempotent', async (t) => {
  const r = await rig();
  r.secondary.mode = 'unavailable';
  await put(r.store, blob('pending at close'));
  const checksBefore = r.primary.calls.check;
  await Promise.all([r.store.close(), r.store.close()]);
  await r.store.close();
  t.ok(r.primary.closed);
  t.ok(r.secondary.closed);
  const err = await failure(r.store.get(blob('x').digest));
  t.equal(err.code, Code.Unavailable);
  t.match(err.message, /fallback store is closed/);
  const checksAtClose = r.primary.calls.check;
  await sleep(80);
  t.equal(r.primary.calls.check, checksAtClose, 'no health checks after close');
  t.ok(checksAtClose >= checksBefore);
  t.equal(r.store.describe().kind, 'fallback', 'describe() still works after close');
});
