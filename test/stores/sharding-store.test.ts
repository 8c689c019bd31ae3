import t, { type Test } from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Code, ConnectError } from '@connectrpc/connect';
import { pino } from 'pino';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString } from '../../src/digest.ts';
import { collect, once } from '../../src/streams.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { rank } from '../../src/stores/rendezvous.ts';
import { ShardingStore, type HandoffOptions, type ShardingStoreOptions } from '../../src/stores/sharding-store.ts';
import { FaultyStore } from '../helpers/faulty-store.ts';

const NAMES = ['a', 'b', 'c'];
const weighted = NAMES.map((name) => ({ name, weight: 1 }));

interface Cluster {
  store: ShardingStore;
  shards: Map<string, FaultyStore>;
  dir: string;
  logs: { msg: string; shard?: string; from?: string; to?: string; reason?: string; backoffMs?: number; aborted?: number }[];
}

/**
 * Three MemoryStore shards behind fault injectors, with intervals of tens of
 * ms. `inner` reuses existing memory stores (an edge restart).
 */
async function cluster(
  t: Test,
  opts: Omit<Partial<ShardingStoreOptions>, 'handoff'> & {
    dir?: string;
    handoff?: Partial<HandoffOptions>;
    inner?: Map<string, MemoryStore>;
    contentAddressed?: boolean;
  } = {},
): Promise<Cluster> {
  const { dir: givenDir, inner, handoff, breaker, contentAddressed, ...rest } = opts;
  const dir = givenDir ?? tempDir(t);
  const shards = new Map(
    NAMES.map((name) => [
      name,
      new FaultyStore(
        inner?.get(name) ?? new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: contentAddressed ?? true }),
      ),
    ]),
  );
  const logs: Cluster['logs'] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
  const store = await ShardingStore.open({
    shards: NAMES.map((name) => ({ name, weight: 1, store: shards.get(name)!, check: shards.get(name)!.check })),
    handoff: { intervalMs: 20, ...handoff, dir },
    healthCheckIntervalMs: 20,
    healthCheckTimeoutMs: 30,
    breaker: {
      consecutiveFailures: 3,
      healthCheckFailures: 2,
      closeAfterProbes: 2,
      backoffInitialMs: 40,
      backoffMaxMs: 400,
      ...breaker,
    },
    logger,
    ...rest,
  });
  t.teardown(() => store.close());
  return { store, shards, dir, logs };
}

/**
 * A fresh directory, removed when the test ends. Teardowns run last-in
 * first-out, so it outlives the stores created after it (their close() runs
 * first and stops all writes to it).
 */
function tempDir(t: Test, files: Record<string, string> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'sharding-store-test-'));
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function blob(label: string | number): { data: Uint8Array; digest: Digest } {
  const data = new TextEncoder().encode(`blob ${label}`);
  return { data, digest: digestOf(data) };
}

/** `n` distinct blobs whose rankings start with the given shards. */
function blobsRanked(prefix: string[], n: number): { data: Uint8Array; digest: Digest; label: number }[] {
  const out = [];
  let from = 0;
  while (out.length < n) {
    const x = blobRanked(prefix, from);
    out.push(x);
    from = x.label + 1;
  }
  return out;
}

/** The first blob (from `from` on) whose ranking starts with the given shards. */
function blobRanked(prefix: string[], from = 0): { data: Uint8Array; digest: Digest; label: number } {
  for (let i = from; ; i++) {
    const b = blob(i);
    const r = rank(b.digest.hash, weighted);
    if (prefix.every((name, j) => r[j] === name)) return { ...b, label: i };
  }
}

async function read(store: ShardingStore | MemoryStore, d: Digest): Promise<string> {
  return new TextDecoder().decode(await collect(await store.get(d)));
}

async function has(store: MemoryStore | FaultyStore, d: Digest): Promise<boolean> {
  return (await store.findMissing([d])).length === 0;
}

function innerOf(c: Cluster, name: string): MemoryStore {
  return c.shards.get(name)!.inner as MemoryStore;
}

function shardState(c: Cluster, name: string): Record<string, unknown> {
  const shards = c.store.describe().shards as Record<string, unknown>[];
  return shards.find((s) => s.name === name)!;
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function rejection(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof ConnectError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

/**
 * `p`, or a rejection after `ms`. Its timer also keeps the process alive
 * while `p` waits on nothing but the store's (unref'd) health checks.
 */
async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still waiting after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// Health checks every 20 ms would open breakers in tests that want to watch
// passive detection only; this turns them off.
const noHealthChecks = { healthCheckIntervalMs: 3_600_000 };

t.test('routing is stable: every blob lands on its top-ranked shard and reads back', async (t) => {
  const c = await cluster(t);
  const blobs = Array.from({ length: 60 }, (_, i) => blob(i));
  for (const b of blobs) await c.store.put(b.digest, once(b.data));
  const owned = new Map<string, number>();
  for (const [i, b] of blobs.entries()) {
    const owner = rank(b.digest.hash, weighted)[0]!;
    owned.set(owner, (owned.get(owner) ?? 0) + 1);
    for (const name of NAMES) t.equal(await has(innerOf(c, name), b.digest), name === owner, `blob ${i} on ${name}`);
    t.equal(await read(c.store, b.digest), `blob ${i}`);
  }
  t.equal(owned.size, 3, 'all shards own some blobs');
  t.equal(c.store.describe().hintsPending, 0);
  t.same(await c.store.findMissing(blobs.map((b) => b.digest)), []);
});

t.test('owner failing while its breaker is closed: retried on the next shard, no client error', async (t) => {
  // No existence cache: the findMissing below must reach the shards.
  const c = await cluster(t, { ...noHealthChecks, handoff: { intervalMs: 3_600_000 }, existenceCache: { ttlMs: 0 } });
  const b = blobRanked(['a', 'b']);
  c.shards.get('a')!.mode = 'unavailable';

  await c.store.put(b.digest, once(b.data));
  t.ok(await has(innerOf(c, 'b'), b.digest), 'written to the runner-up');
  t.equal(shardState(c, 'a').hintsPending, 1, 'with a hint for the owner');
  t.equal(shardState(c, 'b').hintsHeld, 1);
  t.match(shardState(c, 'a'), { state: 'closed', consecutiveFailures: 1 });
  t.equal(await read(c.store, b.digest), `blob ${b.label}`);
  t.match(shardState(c, 'a'), { state: 'closed', consecutiveFailures: 2 });
  t.same(await c.store.findMissing([b.digest]), []);
  t.match(shardState(c, 'a'), { state: 'open', consecutiveFailures: 3 }, 'the third failure opens it');
  t.equal(c.store.describe().retries, 1);
});

t.test('breaker opens after the failure threshold and traffic moves off the shard', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const a = c.shards.get('a')!;
  a.mode = 'unavailable';
  const blobs = blobsRanked(['a'], 5);
  for (const b of blobs.slice(0, 3)) await c.store.put(b.digest, once(b.data));
  t.equal(shardState(c, 'a').state, 'open');
  t.match(shardState(c, 'a').reason, /^3 consecutive infrastructure failures, last: \[unavailable\] injected fault: shard is down$/);
  const callsWhenOpened = a.calls.put;
  for (const b of blobs.slice(3)) await c.store.put(b.digest, once(b.data));
  t.equal(a.calls.put, callsWhenOpened, 'an open shard gets no client traffic');
  for (const b of blobs) t.equal(await read(c.store, b.digest), `blob ${b.label}`);
  t.equal(c.store.describe().hintsPending, 5);
  t.ok(c.logs.some((l) => l.shard === 'a' && l.to === 'open' && l.msg === 'shard a is open'));
});

t.test('failing health checks open a breaker before any client asks', async (t) => {
  const c = await cluster(t);
  c.shards.get('b')!.mode = 'unavailable';
  await waitFor('b open', () => shardState(c, 'b').state === 'open');
  t.equal(shardState(c, 'b').reason, '2 failed health checks, last: [unavailable] injected fault: shard is down');
  t.equal(shardState(c, 'b').lastHealthCheckOk, false);
  t.equal(c.shards.get('b')!.calls.get, 0);
  t.equal(shardState(c, 'a').lastHealthCheckOk, true);
  t.type(shardState(c, 'a').lastHealthCheckMs, 'number');
});

t.test('a blackholed shard is caught by the health-check timeout', async (t) => {
  const c = await cluster(t);
  const b = c.shards.get('b')!;
  b.mode = 'blackhole';
  await waitFor('b open', () => shardState(c, 'b').state === 'open');
  t.equal(shardState(c, 'b').reason, '2 failed health checks, last: health check timed out after 30 ms');
  t.ok(b.aborted >= 2, 'the hung checks were cancelled');
  // Clients no longer wait on it.
  const x = blobRanked(['b']);
  const started = Date.now();
  await c.store.put(x.digest, once(x.data));
  t.equal(await read(c.store, x.digest), `blob ${x.label}`);
  t.ok(Date.now() - started < 500);
  t.equal(b.calls.put + b.calls.get, 0);
});

t.test('half-open: health checks probe it, no client traffic, M successes close it; only flapping grows the backoff', async (t) => {
  const c = await cluster(t);
  const a = c.shards.get('a')!;
  const x = blobRanked(['a']);
  a.mode = 'unavailable';
  await waitFor('a open', () => shardState(c, 'a').state === 'open');
  const firstBackoff = shardState(c, 'a').backoffMs as number;
  t.equal(firstBackoff, 40);
  // Still down when half-open: the probe fails and reopens it, for the
  // initial backoff again (probing a dead shard is cheap; a long wait here
  // would only delay its return).
  await waitFor('a reopened', () => c.logs.filter((l) => l.shard === 'a' && l.to === 'open').length >= 3);
  const reopens = c.logs.filter((l) => l.shard === 'a' && l.from === 'half-open' && l.to === 'open');
  t.ok(reopens.length >= 2 && reopens.every((l) => /^probe failed in half-open/.test(l.reason!)));
  t.same(reopens.map((l) => l.backoffMs), reopens.map(() => 40), 'each reopen waits the initial backoff');

  a.mode = 'ok';
  // While half-open, client reads of a's blobs go elsewhere.
  let sawHalfOpen = false;
  await waitFor('a closed', async () => {
    if (shardState(c, 'a').state === 'half-open') {
      sawHalfOpen = true;
      const before = a.calls.get;
      await c.store.get(x.digest).catch(() => {});
      if (a.calls.get !== before && shardState(c, 'a').state === 'half-open') t.fail('client read sent to a half-open shard');
    }
    return shardState(c, 'a').state === 'closed';
  });
  t.ok(sawHalfOpen);
  const transitions = c.logs.filter((l) => l.shard === 'a' && l.to !== undefined).map((l) => `${l.from}->${l.to}`);
  t.same(transitions.slice(-2), ['open->half-open', 'half-open->closed']);
  t.equal(shardState(c, 'a').reason, '2 successful probes');

  // Falls over again right away (flapping): held out twice as long as the first time.
  const closedAt = c.logs.length;
  a.mode = 'unavailable';
  await waitFor('a open again', () => c.logs.slice(closedAt).some((l) => l.shard === 'a' && l.to === 'open'));
  const flap = c.logs.slice(closedAt).find((l) => l.shard === 'a' && l.to === 'open');
  t.match(flap, { from: 'closed', backoffMs: firstBackoff * 2 }, 'the open soon after closing holds longer');
});

t.test('manual drain: writes go to the stand-in with a durable hint; undrain hands them back', async (t) => {
  const c = await cluster(t);
  const x = blobRanked(['a', 'c']);
  c.store.drain('a');
  t.match(shardState(c, 'a'), { state: 'drained', manual: true, reason: 'drained by operator' });
  await c.store.put(x.digest, once(x.data));
  t.notOk(await has(innerOf(c, 'a'), x.digest));
  t.ok(await has(innerOf(c, 'c'), x.digest));
  t.equal(shardState(c, 'a').hintsPending, 1);
  const log = readFileSync(join(c.dir, 'hints.jsonl'), 'utf8');
  t.same(JSON.parse(log), { op: 'add', hash: x.digest.hash, size: x.digest.size, owner: 'a', standIn: 'c' }, 'on disk before put() resolved');

  // Health checks pass, but a drain holds.
  await new Promise((r) => setTimeout(r, 100));
  t.equal(shardState(c, 'a').state, 'drained');

  c.store.undrain('a');
  t.match(shardState(c, 'a'), { state: 'half-open', manual: false, reason: 'undrained by operator' });
  await waitFor('handoff', () => c.store.describe().hintsPending === 0);
  t.equal(shardState(c, 'a').state, 'closed');
  t.ok(await has(innerOf(c, 'a'), x.digest), 'the owner has its blob back');
  t.equal(c.store.describe().handoffCopied, 1);
  await waitFor('log compacted', () => readFileSync(join(c.dir, 'hints.jsonl'), 'utf8') === '');
});

t.test('drain and undrain of an unknown shard fail with NOT_FOUND', async (t) => {
  const c = await cluster(t);
  for (const f of [() => c.store.drain('zz'), () => c.store.undrain('zz')]) {
    try {
      f();
      t.fail('accepted an unknown shard');
    } catch (err) {
      t.equal((err as ConnectError).code, Code.NotFound);
      t.equal((err as ConnectError).rawMessage, 'shard zz not found');
    }
  }
});

t.test('the hint log survives an edge restart and the new edge completes the handoff', async (t) => {
  const dir = tempDir(t);
  const first = await cluster(t, { dir });
  const blobs = [blobRanked(['b']), blobRanked(['b'], 1000)];
  first.store.drain('b');
  for (const x of blobs) await first.store.put(x.digest, once(x.data));
  t.equal(first.store.describe().hintsPending, 2);
  const inner = new Map(NAMES.map((n) => [n, innerOf(first, n)]));
  for (const s of first.shards.values()) s.closeInner = false; // the shards outlive the edge
  await first.store.close();
  await first.store.close(); // idempotent
  t.equal(readFileSync(join(dir, 'hints.jsonl'), 'utf8').trim().split('\n').length, 2);

  const second = await cluster(t, { dir, inner });
  t.equal(second.store.describe().hintsPending, 2, 'loaded on construction');
  t.equal(shardState(second, 'b').hintsPending, 2);
  await waitFor('handoff after restart', () => second.store.describe().hintsPending === 0);
  for (const x of blobs) t.ok(await has(inner.get('b')!, x.digest));
  await waitFor('log compacted', () => readFileSync(join(dir, 'hints.jsonl'), 'utf8') === '');
});

t.test('a torn last line in the hint log is skipped, not fatal', async (t) => {
  const x = blobRanked(['a', 'b']);
  const good = JSON.stringify({ op: 'add', hash: x.digest.hash, size: x.digest.size, owner: 'a', standIn: 'b' });
  const dir = tempDir(t, { 'hints.jsonl': `${good}\n{"op":"add","hash":"ab` });
  const c = await cluster(t, { dir, ...noHealthChecks, handoff: { intervalMs: 3_600_000 } });
  t.equal(c.store.describe().hintsPending, 1);
  t.equal(readFileSync(join(dir, 'hints.jsonl'), 'utf8'), `${good}\n`, 'rewritten compact on load');
});

t.test('on load, hints are re-pointed at the current top shard and obsolete ones dropped, durably', async (t) => {
  const hint = (d: Digest, owner: string, standIn: string) =>
    JSON.stringify({ op: 'add', hash: d.hash, size: d.size, owner, standIn });
  const stale = blobRanked(['a', 'b']); // owner recorded as c, e.g. before a config change
  const gone = blobRanked(['b', 'a']); // its stand-in is no longer configured
  const home = blobRanked(['c', 'a']); // its stand-in is now its owner
  const dir = tempDir(t, {
    'hints.jsonl': [hint(stale.digest, 'c', 'b'), hint(gone.digest, 'b', 'zz'), hint(home.digest, 'a', 'c')].join('\n') + '\n',
  });
  const quiet = { ...noHealthChecks, handoff: { intervalMs: 3_600_000 } };
  const first = await cluster(t, { dir, ...quiet });
  t.equal(first.store.describe().hintsPending, 1);
  t.equal(shardState(first, 'a').hintsPending, 1, 're-pointed at a');
  t.equal(shardState(first, 'c').hintsPending, 0);
  t.equal(shardState(first, 'b').hintsHeld, 1);
  await first.store.close();
  t.equal(readFileSync(join(dir, 'hints.jsonl'), 'utf8'), `${hint(stale.digest, 'a', 'b')}\n`, 'made durable, then compacted');

  const second = await cluster(t, { dir, ...quiet });
  t.equal(second.store.describe().hintsPending, 1);
  t.equal(shardState(second, 'a').hintsPending, 1);
});

t.test('NOT_FOUND on the owner probes the next shards and finds a blob on a stand-in', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const x = blobRanked(['a', 'b', 'c']);
  // Written by another edge that had a drained: here there is no hint.
  await innerOf(c, 'c').put(x.digest, once(x.data));
  t.equal(await read(c.store, x.digest), `blob ${x.label}`);
  t.same(await c.store.findMissing([x.digest]), []);
  t.equal(c.shards.get('b')!.calls.get, 1, 'probed in rank order');
  t.ok((c.store.describe().probeHits as number) >= 1);
});

t.test('outside the probe window a miss on the owner is final, for get and findMissing alike', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0 });
  const x = blobRanked(['a', 'b']);
  await innerOf(c, 'b').put(x.digest, once(x.data));
  const err = await rejection(c.store.get(x.digest));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, `shard a: blob ${digestString(x.digest)} not found`);
  t.same(await c.store.findMissing([x.digest]), [x.digest]);
  t.equal(c.shards.get('b')!.calls.get + c.shards.get('b')!.calls.findMissing, 0);
});

t.test('a pending hint is followed even outside the probe window', async (t) => {
  const c = await cluster(t, {
    ...noHealthChecks,
    probeWindowMs: 0,
    breaker: { closeAfterProbes: 1 },
    handoff: { intervalMs: 3_600_000 },
  });
  const x = blobRanked(['a', 'b']);
  c.store.drain('a');
  await c.store.put(x.digest, once(x.data));
  t.ok(await has(innerOf(c, 'b'), x.digest));
  // a comes back, but the handoff's copy to it fails: the hint stays.
  c.shards.get('a')!.failPutMidStream = true;
  c.store.undrain('a'); // one immediate health check closes it
  await waitFor('a closed', () => shardState(c, 'a').state === 'closed');
  await waitFor('handoff attempt', () => c.shards.get('a')!.calls.put === 1);
  t.equal(c.store.describe().hintsPending, 1);
  t.equal(await read(c.store, x.digest), `blob ${x.label}`);
  t.same(await c.store.findMissing([x.digest]), []);
  t.equal(c.shards.get('b')!.calls.get, 2, 'the handoff and the client read, via the hint');
});

t.test('findMissing splits by owner, sends in parallel, and returns exactly the missing', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0 });
  const present = Array.from({ length: 30 }, (_, i) => blob(i));
  const absent = Array.from({ length: 10 }, (_, i) => blob(`absent ${i}`));
  for (const b of present) await c.store.put(b.digest, once(b.data));
  for (const s of c.shards.values()) {
    s.mode = 'slow';
    s.delayMs = 100;
  }
  const pending = c.store.findMissing([...present, ...absent, present[0]!].map((b) => b.digest));
  await new Promise((r) => setTimeout(r, 50));
  t.same(NAMES.map((n) => shardState(c, n).inFlight), [1, 1, 1], 'one call per shard, all at once');
  const missing = await pending;
  t.same(new Set(missing.map(digestString)), new Set(absent.map((b) => digestString(b.digest))));
  t.equal(missing.length, 10);
  t.same(NAMES.map((n) => c.shards.get(n)!.calls.findMissing), [1, 1, 1]);
});

t.test('findMissing retries a failed group on the next shard, and the first fatal failure cancels the rest', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0 });
  const x = blobRanked(['a', 'b']);
  await innerOf(c, 'b').put(x.digest, once(x.data));
  c.shards.get('a')!.mode = 'unavailable';
  t.same(await c.store.findMissing([x.digest]), [], 'answered by the runner-up');

  // a and its runner-up c both fail: fatal. b's hanging call is cancelled.
  const y = blobRanked(['a', 'c']);
  const z = blobRanked(['b']);
  c.shards.get('c')!.mode = 'unavailable';
  c.shards.get('b')!.mode = 'blackhole';
  const err = await rejection(c.store.findMissing([y.digest, z.digest]));
  t.equal(err.code, Code.Unavailable);
  t.match(err.rawMessage, /^shard a: injected fault: shard is down$/);
  t.equal(c.shards.get('b')!.aborted, 1, 'sibling call was cancelled');
});

t.test('never reports present a blob that get() cannot return', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const cases = [
    { x: blobRanked(['a', 'b', 'c']), on: 'a' }, // on the owner
    { x: blobRanked(['a', 'b', 'c'], 5000), on: 'c' }, // on a probed stand-in
    { x: blobRanked(['c', 'b'], 0), on: 'c' }, // on c, which gets drained below
    { x: blobRanked(['b', 'a']), on: null }, // nowhere
  ];
  for (const { x, on } of cases) if (on !== null) await innerOf(c, on).put(x.digest, once(x.data));
  c.store.drain('c');
  for (const { x } of cases) {
    const present = (await c.store.findMissing([x.digest])).length === 0;
    const readable = await read(c.store, x.digest).then(
      () => true,
      () => false,
    );
    t.equal(present, readable, `blob ${x.label}: findMissing and get agree`);
  }
  const drained = cases[2]!.x;
  const err = await rejection(c.store.get(drained.digest));
  t.equal(err.code, Code.NotFound, 'a drained shard\'s blobs are unreachable until undrained');
});

t.test('a read of a hinted blob whose stand-in is down is UNAVAILABLE, not NOT_FOUND', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, handoff: { intervalMs: 3_600_000 } });
  const x = blobRanked(['a', 'b']);
  c.store.drain('a');
  await c.store.put(x.digest, once(x.data));
  c.store.drain('b');
  t.same(await c.store.findMissing([x.digest]), [x.digest], 'missing is always safe to report');
  const err = await rejection(c.store.get(x.digest));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, `blob ${digestString(x.digest)} is held by shard b, which is not taking traffic`);
});

t.test('a read whose owner fails and whose runner-up lacks the blob gets the infrastructure error', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0 });
  const x = blobRanked(['a', 'b']);
  await innerOf(c, 'a').put(x.digest, once(x.data));
  c.shards.get('a')!.mode = 'unavailable';
  const err = await rejection(c.store.get(x.digest));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, 'shard a: injected fault: shard is down');
  t.equal(c.shards.get('b')!.calls.get, 1, 'the runner-up was asked once');
});

t.test('write retry: replayable uploads move to the next shard; long ones fail for the client to retry', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, maxReplayBytes: 16 });
  const a = c.shards.get('a')!;
  a.failPutMidStream = true;
  const small = blobRanked(['a', 'b']);
  await c.store.put(small.digest, once(small.data));
  t.ok(await has(innerOf(c, 'b'), small.digest), 'replayed to b after a failed mid-upload');
  t.equal(shardState(c, 'a').hintsPending, 1);

  // The shard pulls a 32-byte chunk before failing: more than maxReplayBytes,
  // so the upload cannot be replayed and the error goes to the client.
  const big = new Uint8Array(64).fill(7);
  const d = digestOf(big);
  async function* chunks() {
    for (let i = 0; i < 64; i += 32) yield big.subarray(i, i + 32);
  }
  const owner = rank(d.hash, weighted)[0]!;
  const s = c.shards.get(owner)!;
  s.failPutMidStream = true;
  const err = await rejection(c.store.put(d, chunks()));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, `shard ${owner}: injected fault: connection reset mid-upload`);
  t.equal(c.store.describe().retries, 1, 'only the replayable upload was retried');
});

t.test('a failure of the client\'s own upload stream is not blamed on the shard', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const x = blobRanked(['a']);
  async function* broken() {
    yield x.data.subarray(0, 2);
    throw new ConnectError('client went away', Code.Unavailable);
  }
  const err = await rejection(c.store.put(x.digest, broken()));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, 'client went away');
  t.equal(shardState(c, 'a').consecutiveFailures, 0);
  t.equal(c.shards.get('b')!.calls.put + c.shards.get('c')!.calls.put, 0, 'not retried elsewhere');
});

t.test('hint overflow: writes that would need a hint are refused with UNAVAILABLE and counted', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, handoff: { maxHints: 2, intervalMs: 3_600_000 } });
  c.store.drain('a');
  const xs = blobsRanked(['a'], 3);
  await c.store.put(xs[0]!.digest, once(xs[0]!.data));
  await c.store.put(xs[1]!.digest, once(xs[1]!.data));
  await c.store.put(xs[1]!.digest, once(xs[1]!.data)); // same hint again: no new slot
  const err = await rejection(c.store.put(xs[2]!.digest, once(xs[2]!.data)));
  t.equal(err.code, Code.Unavailable);
  t.equal(
    err.rawMessage,
    `blob ${digestString(xs[2]!.digest)} belongs to shard a, which cannot take it now, and the hint log is full (2 hints): refusing to write it to a stand-in`,
  );
  t.equal(c.store.describe().hintOverflows, 1);
  // Blobs owned by healthy shards are unaffected.
  const y = blobRanked(['b']);
  await c.store.put(y.digest, once(y.data));
});

t.test('zero lost blobs: N writes while a shard is down are all readable and present after it returns', async (t) => {
  const c = await cluster(t);
  const a = c.shards.get('a')!;
  a.mode = 'unavailable';
  await waitFor('a open', () => shardState(c, 'a').state === 'open');
  const blobs = Array.from({ length: 90 }, (_, i) => blob(`zero-loss ${i}`));
  await Promise.all(blobs.map((b) => c.store.put(b.digest, once(b.data))));
  const ownedByA = blobs.filter((b) => rank(b.digest.hash, weighted)[0] === 'a');
  t.ok(ownedByA.length > 10);
  t.equal(shardState(c, 'a').hintsPending, ownedByA.length);

  a.mode = 'ok';
  await waitFor('handoff', () => c.store.describe().hintsPending === 0, 5000);
  for (const b of ownedByA) t.ok(await has(innerOf(c, 'a'), b.digest));
  const unreadable: string[] = [];
  for (const [i, b] of blobs.entries()) {
    if ((await read(c.store, b.digest).catch(() => '')) !== `blob zero-loss ${i}`) unreadable.push(digestString(b.digest));
  }
  t.same(unreadable, []);
  t.same(await c.store.findMissing(blobs.map((b) => b.digest)), []);
});

t.test('the AC tree routes the same way (key: the action digest hash)', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, contentAddressed: false });
  const action = blobRanked(['c', 'a']).digest;
  const result = new TextEncoder().encode('an ActionResult');
  c.store.drain('c');
  await c.store.put(action, once(result));
  t.ok(await has(innerOf(c, 'a'), action));
  t.equal(await read(c.store, action), 'an ActionResult');
});

t.test('calls waiting on a shard that went silent are cancelled when its breaker opens, and served by the next shard', async (t) => {
  // No probing: only the retry-once can reach b. A blackholed call here never
  // ends by itself (there is no call timeout), so only the cancel can end it.
  const c = await cluster(t, { probeWindowMs: 0 });
  const a = c.shards.get('a')!;
  const x = blobRanked(['a', 'b']);
  const y = blobRanked(['a', 'b'], x.label + 1);
  await innerOf(c, 'b').put(x.digest, once(x.data));
  a.mode = 'blackhole';
  const started = Date.now();
  const [got, missing] = await within(
    5000,
    'calls on the silent shard',
    Promise.all([read(c.store, x.digest), c.store.findMissing([x.digest]), c.store.put(y.digest, once(y.data))]),
  );
  const tookMs = Date.now() - started;
  t.equal(got, `blob ${x.label}`, 'the read was served by b');
  t.same(missing, [], 'findMissing was answered by b');
  t.ok(await has(innerOf(c, 'b'), y.digest), 'the write landed on b');
  t.equal(shardState(c, 'a').hintsPending, 1, 'with a hint for its owner');
  t.same([a.calls.get, a.calls.findMissing, a.calls.put], [1, 1, 1], 'each call went to a first');
  t.equal(shardState(c, 'a').state, 'open');
  t.match(shardState(c, 'a').reason, /^2 failed health checks, last: health check timed out after 30 ms$/);
  t.ok(tookMs < 1000, `done ${tookMs} ms after the shard went silent`);
  t.equal(c.store.describe().abortedOnOpen, 3);
  t.match(shardState(c, 'a'), { consecutiveFailures: 0, recentFailures: 0, inFlight: 0 }, 'the cancelled calls are not counted against a');
  t.ok(c.logs.some((l) => l.shard === 'a' && l.aborted === 3 && l.msg === 'shard a: cancelled 3 waiting calls, to be retried elsewhere'));
});

t.test('a cancelled call that cannot go elsewhere fails with UNAVAILABLE naming the open', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0 });
  const x = blobRanked(['a', 'b']);
  c.shards.get('a')!.mode = 'blackhole';
  c.shards.get('b')!.mode = 'unavailable';
  const pending = rejection(c.store.get(x.digest));
  await waitFor('the call to reach a', () => shardState(c, 'a').inFlight === 1);
  c.store.drain('a');
  const err = await within(5000, 'the cancelled read', pending);
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, 'shard a was drained while the call waited: drained by operator');
  t.equal(c.shards.get('b')!.calls.get, 1, 'retried once on b, which failed too');
});

t.test('a write the shard already pulled past the replay buffer is not cancelled when the breaker opens', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, maxReplayBytes: 16 });
  const data = new Uint8Array(64).fill(9);
  const d = digestOf(data);
  async function* chunks() {
    for (let i = 0; i < 64; i += 32) yield data.subarray(i, i + 32);
  }
  const owner = rank(d.hash, weighted)[0]!;
  const s = c.shards.get(owner)!;
  s.hangPutMidStream = true; // pulls 32 bytes, more than the buffer, then goes silent
  const ctl = new AbortController();
  const pending = rejection(c.store.put(d, chunks(), { signal: ctl.signal }));
  await waitFor('the upload to reach the shard', () => s.calls.put === 1);
  await new Promise((r) => setTimeout(r, 10));
  c.store.drain(owner);
  await new Promise((r) => setTimeout(r, 50));
  t.equal(s.aborted, 0, 'still waiting: retrying it elsewhere could not send the bytes already pulled');
  t.equal(c.store.describe().abortedOnOpen, 0);
  ctl.abort();
  t.equal((await pending).code, Code.Canceled);
  t.equal(s.aborted, 1);
});

t.test('a write cancelled while its shard waits on the client\'s upload is replayed whole to the next shard', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, maxReplayBytes: 1024 });
  const x = blobRanked(['a', 'b']);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  async function* slowClient() {
    yield x.data.subarray(0, 3);
    await gate; // a is now waiting for the next chunk of the upload
    yield x.data.subarray(3);
  }
  const pending = c.store.put(x.digest, slowClient());
  await waitFor('a to wait on the upload', () => shardState(c, 'a').bytesIn === 3);
  c.store.drain('a');
  await waitFor('the retry on b', () => c.shards.get('b')!.calls.put === 1);
  release();
  await within(5000, 'the retried write', pending);
  t.equal(await read(innerOf(c, 'b'), x.digest), `blob ${x.label}`, 'every byte once, in order');
  t.equal(c.store.describe().abortedOnOpen, 1);
  t.equal(shardState(c, 'a').hintsPending, 1);
});

t.test('cancelling a call aborts the shard call and does not count against the shard', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const x = blobRanked(['a']);
  c.shards.get('a')!.mode = 'blackhole';
  const ctl = new AbortController();
  const pending = c.store.get(x.digest, { signal: ctl.signal });
  setTimeout(() => ctl.abort(), 20);
  const err = await rejection(pending);
  t.equal(err.code, Code.Canceled);
  t.equal(c.shards.get('a')!.aborted, 1);
  t.equal(shardState(c, 'a').consecutiveFailures, 0);
  t.equal(shardState(c, 'a').inFlight, 0);
});

t.test('describe reports shard state, hints and children; close is idempotent and final', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const x = blobRanked(['a']);
  await c.store.put(x.digest, once(x.data));
  await read(c.store, x.digest);
  const d = c.store.describe();
  t.equal(d.kind, 'sharding');
  t.match(shardState(c, 'a'), {
    name: 'a',
    weight: 1,
    state: 'closed',
    manual: false,
    since: Number,
    reason: 'started',
    consecutiveFailures: 0,
    recentFailures: 0,
    recentRequests: 2,
    lastHealthCheckMs: null,
    lastHealthCheckOk: null,
    inFlight: 0,
    hintsPending: 0,
    bytesIn: x.data.byteLength,
    bytesOut: x.data.byteLength,
  });
  t.same((d.children ?? []).map((ch) => [ch.kind, ch.name]), [
    ['faulty', 'a'],
    ['faulty', 'b'],
    ['faulty', 'c'],
  ]);
  await Promise.all([c.store.close(), c.store.close()]);
  for (const s of c.shards.values()) t.ok(s.closed);
  const err = await rejection(c.store.get(x.digest));
  t.equal(err.code, Code.Unavailable);
  t.equal(err.rawMessage, 'sharding store is closed');
});

t.test('existence cache: confirmed blobs are answered without a shard hop until the shard changes state', async (t) => {
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0, breaker: { closeAfterProbes: 1 } });
  const x = blobRanked(['a']);
  const y = blobRanked(['b']);
  await c.store.put(x.digest, once(x.data)); // a write confirms
  await innerOf(c, 'b').put(y.digest, once(y.data));
  t.same(await c.store.findMissing([y.digest]), [], 'a FindMissing "present" confirms');
  const before = NAMES.map((n) => c.shards.get(n)!.calls.findMissing);
  t.same(await c.store.findMissing([x.digest, y.digest]), []);
  t.same(NAMES.map((n) => c.shards.get(n)!.calls.findMissing), before, 'no shard asked');
  t.match(c.store.describe().existenceCache, { entries: 2, hits: 2 });

  // Any transition of a voids a's confirmations at once (b's stay).
  c.store.drain('a');
  c.store.undrain('a');
  await waitFor('a closed', () => shardState(c, 'a').state === 'closed');
  t.same(await c.store.findMissing([x.digest, y.digest]), []);
  t.equal(c.shards.get('a')!.calls.findMissing, before[0]! + 1, 'a asked again');
  t.equal(c.shards.get('b')!.calls.findMissing, before[1]!, 'b still answered from memory');
});

t.test('existence cache: a NOT_FOUND from the confirming shard voids it; the staleness is bounded by the TTL', async (t) => {
  let now = 1_000_000;
  const [x, y] = blobsRanked(['a'], 2) as [ReturnType<typeof blobRanked>, ReturnType<typeof blobRanked>];
  // a holds one blob at a time: writing y evicts x behind the edge's back.
  const inner = new Map([['a', new MemoryStore({ maxSizeBytes: Math.max(x.data.byteLength, y.data.byteLength), contentAddressed: true })]]);
  inner.set('b', new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }));
  inner.set('c', new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }));
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 0, inner, now: () => now, existenceCache: { ttlMs: 5000 } });
  await c.store.put(x.digest, once(x.data));
  await innerOf(c, 'a').put(y.digest, once(y.data));
  t.notOk(await has(innerOf(c, 'a'), x.digest), 'evicted');
  t.same(await c.store.findMissing([x.digest]), [], 'the catch: still vouched for within the TTL');
  now += 5000;
  t.same(await c.store.findMissing([x.digest]), [x.digest], 'not after it');

  await c.store.put(x.digest, once(x.data)); // back on a (evicting y), confirmed
  t.same(await c.store.findMissing([x.digest]), []);
  await innerOf(c, 'a').put(y.digest, once(y.data));
  t.equal((await rejection(c.store.get(x.digest))).code, Code.NotFound);
  const calls = c.shards.get('a')!.calls.findMissing;
  t.same(await c.store.findMissing([x.digest]), [x.digest], 'the read\'s NOT_FOUND voided the entry');
  t.equal(c.shards.get('a')!.calls.findMissing, calls + 1);
});

t.test('existence cache: a probed stand-in\'s confirmation dies with the probe window; get and findMissing agree', async (t) => {
  let now = 1_000_000;
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 10_000, now: () => now });
  const x = blobRanked(['a', 'b']);
  await innerOf(c, 'b').put(x.digest, once(x.data)); // by another edge
  t.same(await c.store.findMissing([x.digest]), [], 'found by the start-up probe');
  t.same(await c.store.findMissing([x.digest]), []);
  t.equal(c.shards.get('b')!.calls.findMissing, 1, 'then from memory');
  now += 10_000;
  t.same(await c.store.findMissing([x.digest]), [x.digest], 'b is no longer read: not vouched for');
  t.equal((await rejection(c.store.get(x.digest))).code, Code.NotFound);
});

t.test('probing: the start-up window probes every miss in the same round as its owner', async (t) => {
  const c = await cluster(t, noHealthChecks);
  const x = blobRanked(['a', 'b', 'c']);
  await innerOf(c, 'c').put(x.digest, once(x.data));
  for (const s of c.shards.values()) {
    s.mode = 'slow';
    s.delayMs = 100;
  }
  const pending = c.store.findMissing([x.digest, blob('nowhere').digest]);
  await new Promise((r) => setTimeout(r, 50));
  t.same(NAMES.map((n) => shardState(c, n).inFlight), [1, 1, 1], 'owner and probes asked at once');
  t.same(await pending, [blob('nowhere').digest]);
  t.same(NAMES.map((n) => c.shards.get(n)!.calls.findMissing), [1, 1, 1]);
});

t.test('probing: after the start-up window only misses whose owner changed state are probed', async (t) => {
  let now = 1_000_000;
  const c = await cluster(t, { ...noHealthChecks, probeWindowMs: 10_000, now: () => now, breaker: { closeAfterProbes: 1 } });
  const ofA = blobRanked(['a', 'b', 'c']);
  const ofB = blobRanked(['b', 'c', 'a']);
  await innerOf(c, 'c').put(ofA.digest, once(ofA.data));
  await innerOf(c, 'c').put(ofB.digest, once(ofB.data));
  now += 10_000;
  c.store.drain('a');
  c.store.undrain('a');
  await waitFor('a closed', () => shardState(c, 'a').state === 'closed');
  t.same(c.store.describe().probingFor, ['a']);
  const calls = () => NAMES.map((n) => c.shards.get(n)!.calls.findMissing + c.shards.get(n)!.calls.get);
  const before = calls();
  t.same(await c.store.findMissing([ofA.digest, ofB.digest]), [ofB.digest], 'a changed state: its miss is probed and found on c');
  t.equal(await read(c.store, ofA.digest), `blob ${ofA.label}`);
  t.equal((await rejection(c.store.get(ofB.digest))).code, Code.NotFound, 'b did not: its miss is final, for reads too');
  const after = calls();
  t.same(
    after.map((n, i) => n - before[i]!),
    [2, 3, 2],
    'a: findMissing, get of ofA; b: one findMissing (ofB, probe of ofA), gets of ofA and ofB; c: probe and get of ofA',
  );
  now += 10_000;
  t.same(c.store.describe().probingFor, []);
  t.equal(c.store.describe().probing, false);
});
