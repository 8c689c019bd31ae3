// The fallback pair's synchronous durability mode (issue 9): a write is
// acknowledged once both sides hold it, teed from one read of the client's
// stream; with one side down (or failing mid-write) it lands on the other
// and is journaled durably for the missing side before the acknowledgement.
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import type { Test } from 'tap';
import type { Digest } from '../../src/digest.ts';
import { digestOf } from '../../src/digest.ts';
import { degradedReasons } from '../../src/readiness.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import type { FallbackStoreOpenOptions } from '../../src/stores/fallback-store.ts';
import { FallbackStore } from '../../src/stores/fallback-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { TeeUpload } from '../../src/stores/replayable-upload.ts';
import { collect, once } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';
import { SwappableStore } from '../helpers/swappable-store.ts';

const enc = new TextEncoder();
const dec = new TextDecoder();

interface JournalStats { backlog: number; inFlight: number; replayed: number; lost: number }
interface Stats {
  durability: string;
  serving: string;
  copies: number;
  oneCopy?: string;
  oneCopyWrites: number;
  dualWrites: number;
  breaker: { state: string };
  secondaryBreaker: { state: string };
  failovers: number;
  replication: { queued: number; inFlight: number; done: number };
  journal: JournalStats;
  secondaryJournal: JournalStats;
}

interface Rig {
  store: FallbackStore;
  primary: FaultyStore;
  primarySlot: SwappableStore;
  secondary: FaultyStore;
  secondarySlot: SwappableStore;
  journalDir: string;
  stats: () => Stats;
}

function memory(contentAddressed = true): MemoryStore {
  return new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed });
}

type RigOptions = Partial<Omit<FallbackStoreOpenOptions, 'primary' | 'secondary'>> & { contentAddressed?: boolean };

async function rig(t: Test, opts: RigOptions = {}, reuse?: Omit<Rig, 'store' | 'stats'>): Promise<Rig> {
  const { contentAddressed = true, ...storeOpts } = opts;
  let parts = reuse;
  if (parts === undefined) {
    const primarySlot = new SwappableStore(memory(contentAddressed));
    const secondarySlot = new SwappableStore(memory(contentAddressed));
    const journalDir = await mkdtemp(join(tmpdir(), 'fallback-sync-'));
    t.teardown(() => rm(journalDir, { recursive: true, force: true }));
    parts = { primary: new FaultyStore(primarySlot), primarySlot, secondary: new FaultyStore(secondarySlot), secondarySlot, journalDir };
  }
  const store = await FallbackStore.open({
    primary: parts.primary,
    secondary: parts.secondary,
    journalDir: parts.journalDir,
    durability: 'sync',
    primaryHealthCheck: parts.primary.check,
    secondaryHealthCheck: parts.secondary.check,
    healthCheckIntervalMs: 20,
    healthCheckTimeoutMs: 100,
    breaker: { consecutiveFailures: 3, healthCheckFailures: 2, closeAfterProbes: 2, backoffInitialMs: 50, backoffMaxMs: 200 },
    replay: { retryInitialMs: 10, retryMaxMs: 50 },
    ...storeOpts,
  });
  t.teardown(() => store.close());
  return { ...parts, store, stats: () => store.describe() as unknown as Stats };
}

function blob(name: string): { data: Uint8Array; digest: Digest } {
  const data = enc.encode(`blob ${name}`);
  return { data, digest: digestOf(data) };
}

async function read(store: BlobStore, d: Digest, namespace?: string): Promise<string> {
  return dec.decode(await collect(await store.get(d, { namespace })));
}

async function has(store: BlobStore, d: Digest, namespace?: string): Promise<boolean> {
  return (await store.findMissing([d], { namespace })).length === 0;
}

async function waitFor(cond: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

async function* chunked(data: Uint8Array, size: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.byteLength; i += size) yield data.subarray(i, i + size);
}

// --- the tee ------------------------------------------------------------------

t.test('TeeUpload: one read of the source, every byte to each branch, the slower branch sets the pace', async (t) => {
  const chunk = 64 * 1024;
  const data = randomBytes(100 * chunk);
  let pulls = 0;
  async function* source(): AsyncIterable<Uint8Array> {
    for (let i = 0; i < data.byteLength; i += chunk) {
      pulls++;
      yield data.subarray(i, i + chunk);
    }
  }
  const windowBytes = 256 * 1024;
  const tee = new TeeUpload(source(), 2, { windowBytes });
  let maxHeld = 0;
  let maxLead = 0;
  const taken = [0, 0];
  const consume = async (i: number, delayMs: number) => {
    const h = createHash('sha256');
    for await (const c of tee.branch(i)) {
      h.update(c);
      taken[i]!++;
      maxHeld = Math.max(maxHeld, tee.heldBytes);
      maxLead = Math.max(maxLead, Math.abs(taken[0]! - taken[1]!));
      if (delayMs > 0) await sleep(delayMs);
    }
    return h.digest('hex');
  };
  const [fast, slow] = await Promise.all([consume(0, 0), consume(1, 1)]);
  const want = createHash('sha256').update(data).digest('hex');
  t.equal(fast, want, 'the fast branch got every byte');
  t.equal(slow, want, 'the slow branch got every byte');
  t.equal(pulls, 100, 'the source was read once');
  t.ok(maxHeld <= windowBytes + chunk, `held at most ${maxHeld} bytes (window ${windowBytes} + one chunk)`);
  t.ok(maxLead <= windowBytes / chunk + 1, `the fast branch ran at most ${maxLead} chunks ahead`);
});

t.test('TeeUpload: a released branch stops holding the others back; a source error reaches every branch', async (t) => {
  const data = randomBytes(64 * 1024);
  const tee = new TeeUpload(chunked(data, 1024), 2, { windowBytes: 0 });
  const it = tee.branch(1)[Symbol.asyncIterator]();
  await it.next(); // takes one chunk, then stalls (a backend that gave up)
  setTimeout(() => tee.release(1), 20);
  t.equal((await collect(tee.branch(0))).byteLength, data.byteLength, 'branch 0 finished alone after branch 1 was released');

  const clientErrors = new WeakSet<object>();
  async function* broken(): AsyncIterable<Uint8Array> {
    yield enc.encode('abc');
    throw new ConnectError('client went away', Code.Unavailable);
  }
  const tee2 = new TeeUpload(broken(), 2, { clientErrors });
  const results = await Promise.allSettled([collect(tee2.branch(0)), collect(tee2.branch(1))]);
  t.same(results.map((r) => r.status), ['rejected', 'rejected']);
  t.ok(tee2.failed);
  t.ok(clientErrors.has(tee2.error as object), 'the client error is marked as such');
});

// --- the store ------------------------------------------------------------------

t.test('sync, healthy: a write is acknowledged only once both sides hold it', async (t) => {
  const r = await rig(t);
  const b = blob('both');
  await r.store.put(b.digest, chunked(b.data, 3));
  t.ok(await has(r.primarySlot.target, b.digest), 'the primary holds it at the acknowledgement');
  t.ok(await has(r.secondarySlot.target, b.digest), 'the secondary holds it at the acknowledgement');
  t.match(r.stats(), {
    durability: 'sync',
    copies: 2,
    dualWrites: 1,
    oneCopyWrites: 0,
    replication: { queued: 0, inFlight: 0, done: 0 },
    journal: { backlog: 0 },
    secondaryJournal: { backlog: 0 },
  });
  t.notOk(r.stats().oneCopy);
  t.same(degradedReasons(r.store.describe()), [], 'not degraded');
  t.equal(await read(r.store, b.digest), dec.decode(b.data));
});

t.test('sync: the AC namespace is passed to both sides', async (t) => {
  const r = await rig(t, { contentAddressed: false });
  const d = digestOf(enc.encode('action'));
  await r.store.put(d, once(enc.encode('result in ns1')), { namespace: 'ns1' });
  for (const side of [r.primarySlot.target, r.secondarySlot.target]) {
    t.equal(await read(side, d, 'ns1'), 'result in ns1');
    t.notOk(await has(side, d, ''), 'not in the default namespace');
  }
  // Secondary down: journaled for it in ns1, and replayed into ns1.
  r.secondary.mode = 'unavailable';
  await waitFor(() => r.stats().secondaryBreaker.state === 'open', 'the secondary breaker to open');
  await r.store.put(d, once(enc.encode('newer result')), { namespace: 'ns1' });
  t.equal(r.stats().secondaryJournal.backlog, 1);
  r.secondary.mode = 'ok';
  await waitFor(() => r.stats().secondaryJournal.backlog === 0, 'replay to the secondary');
  t.equal(await read(r.secondarySlot.target, d, 'ns1'), 'newer result', 'replayed in its namespace');
  t.notOk(await has(r.secondarySlot.target, d, ''));
});

t.test('sync, secondary down: writes still succeed, go to the primary alone, are journaled, and the state says one copy', async (t) => {
  const r = await rig(t);
  r.secondary.mode = 'unavailable';
  await waitFor(() => r.stats().secondaryBreaker.state === 'open', 'the secondary breaker to open');
  const st = r.stats();
  t.equal(st.copies, 1);
  t.match(st.oneCopy, /secondary is down/);
  t.match(degradedReasons(r.store.describe()), [/^fallback: secondary is down: writes go to the primary alone and are journaled for the secondary$/]);
  const puts = r.secondary.calls.put;
  const blobs = Array.from({ length: 20 }, (_, i) => blob(`while secondary down ${i}`));
  for (const b of blobs) await r.store.put(b.digest, once(b.data));
  t.equal(r.secondary.calls.put, puts, 'the secondary was not asked');
  t.equal(r.stats().secondaryJournal.backlog, 20, 'each write journaled for the secondary');
  t.equal(r.stats().oneCopyWrites, 20);

  r.secondary.mode = 'ok';
  await waitFor(() => r.stats().secondaryJournal.backlog === 0, 'the secondary journal to drain');
  t.same(await r.secondarySlot.target.findMissing(blobs.map((b) => b.digest)), [], 'the secondary holds every write again');
  t.equal(r.stats().copies, 2);
  t.match(r.stats().secondaryJournal, { replayed: 20, lost: 0 });
});

t.test('sync, primary down: writes go to the secondary alone and are journaled for the primary', async (t) => {
  const r = await rig(t);
  r.primary.mode = 'unavailable';
  await waitFor(() => r.stats().serving === 'secondary', 'the primary breaker to open');
  t.match(r.stats().oneCopy, /primary is down/);
  const b = blob('while primary down');
  await r.store.put(b.digest, once(b.data));
  t.equal(r.stats().journal.backlog, 1);
  const fresh = memory();
  r.primarySlot.target = fresh; // back empty
  r.primary.mode = 'ok';
  await waitFor(() => r.stats().journal.backlog === 0 && r.stats().serving === 'primary', 'replay to the primary');
  t.ok(await has(fresh, b.digest));
});

t.test('sync, one side fails mid-write while its breaker is closed: acknowledged, journaled for that side, repaired', async (t) => {
  const r = await rig(t, { breaker: { consecutiveFailures: 1000, healthCheckFailures: 1000 } });
  r.secondary.failPutMidStream = true;
  const a = blob('secondary fails mid-write'.padEnd(64, '.'));
  await r.store.put(a.digest, chunked(a.data, 8));
  t.ok(await has(r.primarySlot.target, a.digest), 'the primary holds it');
  t.equal(r.stats().secondaryJournal.backlog + r.stats().secondaryJournal.replayed, 1, 'journaled for the secondary');
  r.secondary.failPutMidStream = false;
  await waitFor(async () => has(r.secondarySlot.target, a.digest), 'replay to the secondary');

  r.primary.failPutMidStream = true;
  const b = blob('primary fails mid-write'.padEnd(64, '.'));
  await r.store.put(b.digest, chunked(b.data, 8));
  t.ok(await has(r.secondarySlot.target, b.digest), 'the secondary holds it');
  t.notOk(await has(r.primarySlot.target, b.digest), 'the primary does not, yet');
  t.equal(r.stats().failovers, 1);
  r.primary.failPutMidStream = false;
  await waitFor(async () => has(r.primarySlot.target, b.digest), 'replay to the primary');
  await waitFor(() => r.stats().journal.backlog === 0 && r.stats().secondaryJournal.backlog === 0, 'journals to drain');
});

t.test('sync, both sides fail: the write is refused, nothing journaled', async (t) => {
  const r = await rig(t, { breaker: { consecutiveFailures: 1000, healthCheckFailures: 1000 } });
  r.primary.failPutMidStream = true;
  r.secondary.failPutMidStream = true;
  const b = blob('both fail'.padEnd(64, '.'));
  const err = await failure(r.store.put(b.digest, chunked(b.data, 8)));
  t.equal(err.code, Code.Unavailable);
  t.match(err.message, /primary: injected fault/);
  t.match(r.stats(), { journal: { backlog: 0 }, secondaryJournal: { backlog: 0 } });
});

t.test('sync, a side that goes silent mid-write is cut off when its breaker opens; the write completes on the other', async (t) => {
  const r = await rig(t);
  r.secondary.hangPutMidStream = true;
  const b = blob('secondary goes silent'.padEnd(64, '.'));
  const writing = r.store.put(b.digest, chunked(b.data, 8));
  await sleep(30);
  r.secondary.mode = 'blackhole'; // its health checks now time out
  const t0 = Date.now();
  // The store's timers are unref'd (as in a server, where the listener keeps the process alive).
  const keepAlive = setInterval(() => {}, 50);
  try {
    await writing;
  } finally {
    clearInterval(keepAlive);
  }
  t.ok(Date.now() - t0 < 5000, `acknowledged ${Date.now() - t0} ms later, once the secondary's breaker opened`);
  t.equal(r.stats().secondaryBreaker.state, 'open');
  t.ok(await has(r.primarySlot.target, b.digest));
  t.equal(r.stats().secondaryJournal.backlog, 1, 'journaled for the secondary');
  r.secondary.hangPutMidStream = false;
  r.secondary.mode = 'ok';
  await waitFor(() => r.stats().secondaryJournal.backlog === 0, 'replay to the secondary');
  t.ok(await has(r.secondarySlot.target, b.digest));
});

t.test('sync: answers are not outages (INVALID_ARGUMENT propagates); a failing client stream blames no side', async (t) => {
  const r = await rig(t, { breaker: { consecutiveFailures: 1 } });
  const b = blob('bad content');
  const err = await failure(r.store.put(b.digest, once(enc.encode('other content'))));
  t.equal(err.code, Code.InvalidArgument);
  t.match(err.message, /primary: /);
  async function* broken(): AsyncIterable<Uint8Array> {
    yield b.data.subarray(0, 3);
    throw new ConnectError('client went away', Code.Unavailable);
  }
  const err2 = await failure(r.store.put(b.digest, broken()));
  t.match(err2.message, /client went away/);
  t.match(r.stats(), { breaker: { state: 'closed' }, secondaryBreaker: { state: 'closed' }, journal: { backlog: 0 }, secondaryJournal: { backlog: 0 } });
  t.notOk(await has(r.primarySlot.target, b.digest));
  t.notOk(await has(r.secondarySlot.target, b.digest));
});

t.test('sync: a primary wiped after the writes loses nothing acknowledged', async (t) => {
  const r = await rig(t);
  const blobs = Array.from({ length: 50 }, (_, i) => blob(`wiped ${i}`));
  await Promise.all(blobs.map((b) => r.store.put(b.digest, once(b.data))));
  r.primarySlot.target = memory(); // every primary shard back empty, no outage seen
  for (const b of blobs) t.equal(await read(r.store, b.digest), dec.decode(b.data));
  t.same(await r.store.findMissing(blobs.map((b) => b.digest)), [], 'FindMissing vouches for all');
});

t.test('sync: a restarted store replays the secondary journal left by the previous one', async (t) => {
  const r = await rig(t);
  r.primarySlot.keepOnClose = true;
  r.secondarySlot.keepOnClose = true;
  r.secondary.mode = 'unavailable';
  await waitFor(() => r.stats().secondaryBreaker.state === 'open', 'the secondary breaker to open');
  const b = blob('journaled before restart');
  await r.store.put(b.digest, once(b.data));
  await r.store.close();
  r.secondary.mode = 'ok';
  r.primary.closed = false;
  const r2 = await rig(t, {}, r);
  t.equal(r2.stats().secondaryJournal.backlog, 1, 'the entry survived the restart');
  await waitFor(() => r2.stats().secondaryJournal.backlog === 0, 'replay after the restart');
  t.ok(await has(r.secondarySlot.target, b.digest));
});

t.test('async mode is unchanged: no secondary breaker or journal, one copy then replication', async (t) => {
  const r = await rig(t, { durability: 'async' });
  const b = blob('async');
  await r.store.put(b.digest, once(b.data));
  const st = r.stats();
  t.equal(st.durability, 'async');
  t.equal(st.copies, 1);
  t.notOk('secondaryBreaker' in st);
  t.notOk(st.oneCopy);
  await waitFor(async () => has(r.secondarySlot.target, b.digest), 'replication');
});
