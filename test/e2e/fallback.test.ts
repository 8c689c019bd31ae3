// The fallback pair (issue 4) with real processes: an edge (`node src/main.ts`)
// whose CAS and AC trees are each `fallback { primary: remote, secondary:
// remote }` over two storage-node processes, driven by a real gRPC client
// (connect-node) while the primary is SIGKILLed, comes back with its data or
// empty, the edge itself is SIGKILLed with a journal backlog, and the
// secondary is SIGSTOPped under load.
//
// What "lost" means here: a write the edge acknowledged (ByteStream Write or
// UpdateActionResult returned OK) that a read through the edge does not
// return. The one window the design admits (fallback-store.ts, "The catch"):
// a blob the primary acknowledged shortly before it died and had not yet
// replicated is unreadable while the primary is down, and gone for good if
// the primary returns empty. The tests measure that window (they do not
// assume it is empty) and check that FindMissing never vouches for a blob in
// it, which is the promise Bazel relies on.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { create } from '@bufbuild/protobuf';
import { type Client, Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import type { Test } from 'tap';
import {
  ActionCache,
  ContentAddressableStorage,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream, WriteRequestSchema } from '../../gen/google/bytestream/bytestream_pb.ts';
import { mapLimit } from '../../src/concurrency.ts';
import { JOURNAL_FILE } from '../../src/stores/fallback-store.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { SpawnedNode } from '../helpers/spawn-node.ts';

const MiB = 1024 * 1024;
/** Fallback health checks every 200 ms, so the edge notices a dead primary in well under a second. */
const HEALTH_INTERVAL_MS = 200;
/**
 * The primary's breaker backs off 1 s, 2 s, 4 s, ... while the primary stays
 * down (the backoff is not configurable per config), then needs 3 good probes:
 * a primary that was down for ~5 s is taken back within ~10 s of returning.
 */
const CATCH_UP_TIMEOUT_MS = 45_000;

// --- clients ---------------------------------------------------------------

interface Clients {
  cas: Client<typeof ContentAddressableStorage>;
  ac: Client<typeof ActionCache>;
  bs: Client<typeof ByteStream>;
}

function clients(url: string): Clients {
  const transport = createGrpcTransport({ baseUrl: url });
  return {
    cas: createClient(ContentAddressableStorage, transport),
    ac: createClient(ActionCache, transport),
    bs: createClient(ByteStream, transport),
  };
}

interface Blob {
  readonly hash: string;
  readonly size: number;
}

interface AckedBlob extends Blob {
  /** When the client started the write, and when it got the OK (ms since the epoch). */
  readonly startedAt: number;
  readonly ackedAt: number;
}

interface AckedAction {
  readonly actionHash: string;
  /** The output the ActionResult names; the test reads it back by this. */
  readonly outputHash: string;
  readonly startedAt: number;
}

const key = (b: Blob) => `${b.hash}/${b.size}`;

async function writeBlob(c: Clients, data: Uint8Array, hash: string): Promise<void> {
  const resourceName = `uploads/${randomUUID()}/blobs/${hash}/${data.byteLength}`;
  async function* requests() {
    yield create(WriteRequestSchema, { resourceName, writeOffset: 0n, data, finishWrite: true });
  }
  const res = await c.bs.write(requests(), { timeoutMs: 15_000 });
  if (res.committedSize !== BigInt(data.byteLength)) throw new Error(`committed ${res.committedSize} of ${data.byteLength}`);
}

/** 'ok' (every byte, right hash), 'not-found', or the other error's code and message. */
async function readBlob(c: Clients, b: Blob): Promise<string> {
  try {
    const h = createHash('sha256');
    let n = 0;
    for await (const r of c.bs.read({ resourceName: `blobs/${b.hash}/${b.size}` }, { timeoutMs: 15_000 })) {
      h.update(r.data);
      n += r.data.byteLength;
    }
    return n === b.size && h.digest('hex') === b.hash ? 'ok' : `wrong bytes (${n} of ${b.size})`;
  } catch (err) {
    const ce = ConnectError.from(err);
    return ce.code === Code.NotFound ? 'not-found' : `${Code[ce.code]}: ${ce.rawMessage}`;
  }
}

/** Keys of the blobs a server reports missing. */
async function missingOn(c: Clients, blobs: readonly Blob[]): Promise<Set<string>> {
  const missing = new Set<string>();
  for (let i = 0; i < blobs.length; i += 1000) {
    const res = await c.cas.findMissingBlobs(
      { blobDigests: blobs.slice(i, i + 1000).map((b) => ({ hash: b.hash, sizeBytes: BigInt(b.size) })) },
      { timeoutMs: 15_000 },
    );
    for (const d of res.missingBlobDigests) missing.add(`${d.hash}/${d.sizeBytes}`);
  }
  return missing;
}

async function writeAction(c: Clients, a: { actionHash: string; outputHash: string }): Promise<void> {
  await c.ac.updateActionResult(
    {
      actionDigest: { hash: a.actionHash, sizeBytes: 140n },
      actionResult: { exitCode: 0, outputFiles: [{ path: 'out/blob', digest: { hash: a.outputHash, sizeBytes: 1n } }] },
    },
    { timeoutMs: 15_000 },
  );
}

/** The output hash of the stored ActionResult, 'not-found', or the error. */
async function readAction(c: Clients, actionHash: string): Promise<string> {
  try {
    const r = await c.ac.getActionResult({ actionDigest: { hash: actionHash, sizeBytes: 140n } }, { timeoutMs: 15_000 });
    return r.outputFiles[0]?.digest?.hash ?? '(no output)';
  } catch (err) {
    const ce = ConnectError.from(err);
    return ce.code === Code.NotFound ? 'not-found' : `${Code[ce.code]}: ${ce.rawMessage}`;
  }
}

function randomBlob(minBytes: number, maxBytes: number): { data: Buffer; hash: string } {
  const data = randomBytes(minBytes + Math.floor(Math.random() * (maxBytes - minBytes + 1)));
  return { data, hash: createHash('sha256').update(data).digest('hex') };
}

interface LoadResult {
  readonly blobs: AckedBlob[];
  readonly actions: AckedAction[];
  /** Writes that were not acknowledged, by error code (the client would retry them). */
  readonly failures: Map<string, number>;
}

/**
 * `workers` concurrent writers, each writing fresh blobs of 1-16 KiB through
 * ByteStream and, every 5th blob, an ActionResult naming it, until `stop`.
 * Only what came back OK is recorded as acknowledged.
 */
async function writeLoad(c: Clients, workers: number, stop: AbortSignal): Promise<LoadResult> {
  const result: LoadResult = { blobs: [], actions: [], failures: new Map() };
  const fail = (err: unknown) => {
    const code = Code[ConnectError.from(err).code];
    result.failures.set(code, (result.failures.get(code) ?? 0) + 1);
  };
  await Promise.all(
    Array.from({ length: workers }, async () => {
      for (let n = 0; !stop.aborted; n++) {
        const { data, hash } = randomBlob(1024, 16 * 1024);
        const startedAt = Date.now();
        try {
          await writeBlob(c, data, hash);
          result.blobs.push({ hash, size: data.byteLength, startedAt, ackedAt: Date.now() });
        } catch (err) {
          fail(err);
          await sleep(20);
          continue;
        }
        if (n % 5 === 0) {
          const action = { actionHash: randomBytes(32).toString('hex'), outputHash: hash, startedAt: Date.now() };
          try {
            await writeAction(c, action);
            result.actions.push(action);
          } catch (err) {
            fail(err);
          }
        }
      }
    }),
  );
  return result;
}

async function waitFor(what: string, timeoutMs: number, cond: () => Promise<boolean>): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    if (await cond()) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(250);
  }
}

/**
 * Live entries of a fallback journal file, replayed the way DurableLog does
 * ({"k","s","v"} puts, {"k","s","d":1} deletes of that version). Read-only:
 * the edge owns the file. A torn last line (a write in progress) is skipped.
 */
async function journalBacklog(dir: string): Promise<number> {
  let text: string;
  try {
    text = await readFile(join(dir, JOURNAL_FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
  const live = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let r: { k: string; s: number; d?: number };
    try {
      r = JSON.parse(line) as typeof r;
    } catch {
      continue;
    }
    if (r.d === undefined) live.set(r.k, r.s);
    else if (live.get(r.k) === r.s) live.delete(r.k);
  }
  return live.size;
}

// --- the rig -----------------------------------------------------------------

const STORAGE_NODE = {
  logLevel: 'info', // spawnNode learns the port from the "serving REAPI" info line
  // Plain disk AC: the test reads ActionResults straight off each backend.
  ac: { disk: { path: 'ac', maxSizeBytes: 256 * MiB } },
};

interface Rig {
  readonly root: string;
  primary: SpawnedNode;
  secondary: SpawnedNode;
  edge: SpawnedNode;
  readonly edgeDir: string;
  /** Restarts the primary on its port; `empty` gives it a fresh data dir. */
  restartPrimary(empty?: boolean): Promise<void>;
  startEdge(): Promise<void>;
  c: Clients;
}

interface RigOptions {
  /** replication.maxQueue / concurrency of the AC tree's fallback (the CAS tree keeps the defaults). */
  readonly acReplication?: { maxQueue: number; concurrency: number };
}

async function startRig(t: Test, opts: RigOptions = {}): Promise<Rig> {
  const root = await mkdtemp(join(tmpdir(), 'reapi-fallback-e2e-'));
  const edgeDir = join(root, 'edge');
  let primaryDir = join(root, 'primary-0');
  await Promise.all([mkdir(edgeDir), mkdir(primaryDir), mkdir(join(root, 'secondary'))]);
  const procs: SpawnedNode[] = [];
  const names = new Map<SpawnedNode, string>();
  t.teardown(async () => {
    for (const p of procs) {
      if (!t.passing()) console.error(`--- ${names.get(p)} log (last 30 lines) ---\n${p.logs().slice(-30).join('\n')}`);
      // A stopped (SIGSTOP) process does not act on SIGTERM until resumed.
      if (p.exitInfo() === undefined) process.kill(p.pid, 'SIGCONT');
      await p.stop();
    }
    await rm(root, { recursive: true, force: true });
  });
  const spawn = async (name: string, dir: string, config: Record<string, unknown>, port?: number) => {
    const p = await spawnNode({ dir, config, ...(port === undefined ? {} : { port }) });
    procs.push(p);
    names.set(p, `${name} (pid ${p.pid})`);
    return p;
  };
  const primary = await spawn('primary', primaryDir, STORAGE_NODE);
  const secondary = await spawn('secondary', join(root, 'secondary'), STORAGE_NODE);
  const tree = (name: string, replication?: { maxQueue: number; concurrency: number }) => ({
    fallback: {
      primary: { remote: { url: primary.url, timeoutMs: 10_000 } },
      secondary: { remote: { url: secondary.url, timeoutMs: 10_000 } },
      journalDir: `journal-${name}`,
      healthCheckIntervalMs: HEALTH_INTERVAL_MS,
      ...(replication === undefined ? {} : { replication }),
    },
  });
  const edgeConfig = { logLevel: 'info', cas: tree('cas'), ac: tree('ac', opts.acReplication) };
  const edge = await spawn('edge', edgeDir, edgeConfig);
  const rig: Rig = {
    root,
    primary,
    secondary,
    edge,
    edgeDir,
    async restartPrimary(empty = false) {
      if (empty) {
        primaryDir = join(root, `primary-${procs.length}`);
        await mkdir(primaryDir);
      }
      rig.primary = await spawn('primary', primaryDir, STORAGE_NODE, primary.port);
    },
    async startEdge() {
      rig.edge = await spawn('edge', edgeDir, edgeConfig, edge.port);
      rig.c = clients(rig.edge.url);
    },
    c: clients(edge.url),
  };
  return rig;
}

/** Reads every blob through a client; returns outcome -> keys. */
async function readAll(c: Clients, blobs: readonly Blob[]): Promise<Map<string, string[]>> {
  const outcomes = new Map<string, string[]>();
  await mapLimit(blobs, 16, async (b) => {
    const r = await readBlob(c, b);
    outcomes.set(r, [...(outcomes.get(r) ?? []), key(b)]);
  });
  return outcomes;
}

function summary(outcomes: Map<string, string[]>): Record<string, number> {
  return Object.fromEntries([...outcomes].map(([k, v]) => [k, v.length]));
}

function failuresText(f: Map<string, number>): string {
  return f.size === 0 ? 'none' : [...f].map(([k, v]) => `${v} ${k}`).join(', ');
}

/**
 * Runs a write load, SIGKILLs the primary after `beforeMs`, keeps writing for
 * `downMs`, stops the load, and checks what a reader sees while the primary
 * is down. Returns the load and the blobs in the replication window.
 */
async function loadAcrossPrimaryDeath(t: Test, rig: Rig): Promise<{ load: LoadResult; exitedAt: number; window: Set<string> }> {
  const stop = new AbortController();
  const loading = writeLoad(rig.c, 8, stop.signal);
  await sleep(2000);
  const killedAt = Date.now();
  await rig.primary.kill('SIGKILL');
  const exitedAt = Date.now();
  await sleep(3000);
  stop.abort();
  const load = await loading;
  const before = load.blobs.filter((b) => b.ackedAt < killedAt).length;
  const after = load.blobs.filter((b) => b.startedAt >= exitedAt);
  t.comment(
    `acknowledged ${load.blobs.length} blobs (${before} before the kill, ${after.length} started after the primary exited) ` +
      `and ${load.actions.length} ActionResults; unacknowledged writes: ${failuresText(load.failures)}`,
  );
  t.ok(before >= 20, `${before} blobs acknowledged before the kill`);
  t.ok(after.length >= 20, `${after.length} blobs acknowledged while the primary was down (writes failed over)`);

  // While the primary is down: reads and FindMissing through the edge.
  const outcomes = await readAll(rig.c, load.blobs);
  const notFound = new Set(outcomes.get('not-found') ?? []);
  const others = [...outcomes].filter(([k]) => k !== 'ok' && k !== 'not-found');
  t.same(others, [], 'primary down: every read through the edge returns the blob or NOT_FOUND, never an error');
  t.same(
    after.filter((b) => notFound.has(key(b))).map(key),
    [],
    'primary down: every blob written after the primary died is readable through the edge',
  );
  const lateWindow = load.blobs.filter((b) => notFound.has(key(b)) && b.startedAt >= exitedAt);
  t.same(lateWindow, [], 'only blobs the primary acknowledged before dying can be in the replication window');
  const reportedPresent = await missingOn(rig.c, load.blobs);
  t.same(
    [...notFound].filter((k) => !reportedPresent.has(k)),
    [],
    'primary down: FindMissing through the edge never vouches for a blob a read does not return',
  );
  t.comment(
    `primary down: reads through the edge ${JSON.stringify(summary(outcomes))}; ${notFound.size} blob(s) in the ` +
      'replication window (acknowledged by the primary, not yet copied when it died)',
  );
  return { load, exitedAt, window: notFound };
}

// --- the tests ---------------------------------------------------------------

t.test('(a) primary SIGKILLed under write load, returns with its data: nothing acknowledged is lost', async (t) => {
  const rig = await startRig(t);
  const { load } = await loadAcrossPrimaryDeath(t, rig);

  // While down, the journal holds what the secondary took on the primary's behalf.
  const casBacklog = await journalBacklog(join(rig.edgeDir, 'journal-cas'));
  t.ok(casBacklog >= 20, `CAS journal holds ${casBacklog} entries while the primary is down`);

  await rig.restartPrimary();
  const direct = clients(rig.primary.url);
  const ms = await waitFor('the primary to hold every acknowledged blob', CATCH_UP_TIMEOUT_MS, async () => (await missingOn(direct, load.blobs)).size === 0);
  t.pass(`the returned primary holds all ${load.blobs.length} acknowledged blobs directly, ${ms} ms after its restart`);
  await waitFor('the CAS and AC journals to drain', CATCH_UP_TIMEOUT_MS, async () =>
    (await journalBacklog(join(rig.edgeDir, 'journal-cas'))) === 0 && (await journalBacklog(join(rig.edgeDir, 'journal-ac'))) === 0,
  );
  t.pass('the CAS and AC journals drained to 0 entries');

  const actionsOnPrimary = await mapLimit(load.actions, 16, (a) => readAction(direct, a.actionHash));
  t.same(
    load.actions.filter((a, i) => actionsOnPrimary[i] !== a.outputHash).map((a) => a.actionHash),
    [],
    `the returned primary holds all ${load.actions.length} acknowledged ActionResults directly`,
  );

  const outcomes = await readAll(rig.c, load.blobs);
  t.same(summary(outcomes), { ok: load.blobs.length }, `primary back: all ${load.blobs.length} acknowledged blobs read back through the edge, zero lost`);
  const actions = await mapLimit(load.actions, 16, (a) => readAction(rig.c, a.actionHash));
  t.same(
    load.actions.filter((a, i) => actions[i] !== a.outputHash).map((a) => a.actionHash),
    [],
    `primary back: all ${load.actions.length} acknowledged ActionResults read back through the edge`,
  );
  t.same(await missingOn(rig.c, load.blobs), new Set(), 'primary back: FindMissing through the edge reports every blob present');
});

t.test('(b) primary returns with an EMPTY data dir: journal replay and read repair refill it', async (t) => {
  const rig = await startRig(t);
  const { load, exitedAt, window } = await loadAcrossPrimaryDeath(t, rig);
  // The window is measured on the secondary itself: with the primary dead
  // nothing can replicate any more, so what it lacks now it will never get.
  const onSecondary = await missingOn(clients(rig.secondary.url), load.blobs);
  t.same(onSecondary, window, 'the blobs unreadable through the edge are exactly those missing on the secondary');

  await rig.restartPrimary(true);
  const direct = clients(rig.primary.url);
  const survivors = load.blobs.filter((b) => !window.has(key(b)));
  const journaled = load.blobs.filter((b) => b.startedAt >= exitedAt);
  // Journal replay needs no reads: what was written while the primary was down comes back by itself.
  const replayMs = await waitFor('journal replay to the empty primary', CATCH_UP_TIMEOUT_MS, async () => (await missingOn(direct, journaled)).size === 0);
  t.pass(`journal replay refilled the empty primary with the ${journaled.length} blobs written while it was down, ${replayMs} ms after its restart`);

  // Older blobs come back by read repair: FindMissing and reads through the
  // edge find them on the secondary and copy them back. The repair queue is
  // bounded (1,000, excess dropped), so ask again until the primary has all.
  const repairMs = await waitFor('read repair of every surviving blob', CATCH_UP_TIMEOUT_MS, async () => {
    const lacking = await missingOn(direct, survivors);
    if (lacking.size === 0) return true;
    const stillMissing = await missingOn(rig.c, survivors.filter((b) => lacking.has(key(b))));
    t.equal(stillMissing.size, 0, `edge reports all ${lacking.size} not-yet-repaired blobs present (the secondary has them)`);
    return false;
  });
  t.pass(`read repair refilled the empty primary with all ${survivors.length} surviving blobs in ${repairMs} ms`);

  const outcomes = await readAll(rig.c, load.blobs);
  t.equal((outcomes.get('ok') ?? []).length, survivors.length, `all ${survivors.length} blobs outside the replication window read back through the edge`);
  t.same(new Set(outcomes.get('not-found') ?? []), window, `the ${window.size} blob(s) of the replication window are gone with the primary's disk, and reads say NOT_FOUND`);
  const reported = await missingOn(rig.c, load.blobs);
  t.same(reported, window, 'FindMissing through the edge reports exactly those missing (so Bazel uploads them again)');
  t.comment(`lost with the primary's disk: ${window.size} of ${load.blobs.length} acknowledged blobs (the documented asynchronous-replication window)`);
});

t.test('(c) edge SIGKILLed with a journal backlog: a new edge replays it', async (t) => {
  const rig = await startRig(t);
  await rig.primary.kill('SIGKILL');
  const blobs = Array.from({ length: 200 }, () => randomBlob(512, 8 * 1024));
  await mapLimit(blobs, 8, (b) => writeBlob(rig.c, b.data, b.hash));
  const acked: Blob[] = blobs.map((b) => ({ hash: b.hash, size: b.data.byteLength }));
  const actions = blobs.slice(0, 20).map((b) => ({ actionHash: randomBytes(32).toString('hex'), outputHash: b.hash }));
  await mapLimit(actions, 8, (a) => writeAction(rig.c, a));
  t.pass('all 200 blobs and 20 ActionResults acknowledged with the primary down');
  t.equal(await journalBacklog(join(rig.edgeDir, 'journal-cas')), 200, 'CAS journal holds 200 entries (fsync\'d before the acknowledgement)');
  t.equal(await journalBacklog(join(rig.edgeDir, 'journal-ac')), 20, 'AC journal holds 20 entries');

  await rig.edge.kill('SIGKILL');
  await rig.startEdge();
  t.equal(await journalBacklog(join(rig.edgeDir, 'journal-cas')), 200, 'the restarted edge still holds the 200 entries (primary still down)');
  t.same(summary(await readAll(rig.c, acked)), { ok: 200 }, 'the restarted edge serves all 200 blobs from the secondary');

  await rig.restartPrimary();
  const direct = clients(rig.primary.url);
  const ms = await waitFor('replay of the journal to the primary', CATCH_UP_TIMEOUT_MS, async () => (await missingOn(direct, acked)).size === 0);
  t.pass(`the primary holds all 200 journaled blobs directly, ${ms} ms after its restart`);
  await waitFor('the ActionResults on the primary', CATCH_UP_TIMEOUT_MS, async () => {
    const got = await mapLimit(actions, 8, (a) => readAction(direct, a.actionHash));
    return actions.every((a, i) => got[i] === a.outputHash);
  });
  t.pass('the primary holds all 20 journaled ActionResults directly');
  await waitFor('the journals to drain', CATCH_UP_TIMEOUT_MS, async () =>
    (await journalBacklog(join(rig.edgeDir, 'journal-cas'))) === 0 && (await journalBacklog(join(rig.edgeDir, 'journal-ac'))) === 0,
  );
  t.pass('both journals drained to 0 entries');
});

t.test('(d) replication falls behind a SIGSTOPped secondary and catches up; overflow is counted and logged', async (t) => {
  // AC: a tiny replication queue (1 copy in flight + 4 waiting) to overflow; CAS: the default 10,000.
  const rig = await startRig(t, { acReplication: { maxQueue: 4, concurrency: 1 } });
  process.kill(rig.secondary.pid, 'SIGSTOP');
  const blobs = Array.from({ length: 300 }, () => randomBlob(1024, 16 * 1024));
  const acked: Blob[] = blobs.map((b) => ({ hash: b.hash, size: b.data.byteLength }));
  const writeStart = Date.now();
  await mapLimit(blobs, 8, (b) => writeBlob(rig.c, b.data, b.hash));
  const writeMs = Date.now() - writeStart;
  // Every new blob is looked up first (ByteStream Write checks FindMissing):
  // a frozen secondary must not hold that up for its 10 s timeout each time.
  t.ok(writeMs < 20_000, `300 writes took ${writeMs} ms with the secondary frozen`);
  // One at a time, so which ActionResults the queue keeps is determined.
  const actions = blobs.slice(0, 50).map((b) => ({ actionHash: randomBytes(32).toString('hex'), outputHash: b.hash }));
  for (const a of actions) await writeAction(rig.c, a);
  t.pass('300 blobs and 50 ActionResults acknowledged with the secondary frozen (the primary takes them)');
  t.same(await missingOn(rig.c, acked), new Set(), 'FindMissing through the edge: all present (on the primary)');

  await sleep(1000);
  process.kill(rig.secondary.pid, 'SIGCONT');
  const direct = clients(rig.secondary.url);
  const ms = await waitFor('replication to catch up on the secondary', CATCH_UP_TIMEOUT_MS, async () => (await missingOn(direct, acked)).size === 0);
  t.pass(`the secondary holds all 300 blobs directly, ${ms} ms after it resumed`);

  // drop-oldest: the first ActionResult was in flight when the queue filled,
  // the last four held the queue; the 45 in between were given up.
  const kept = new Set([0, 46, 47, 48, 49]);
  await waitFor('the kept ActionResults on the secondary', CATCH_UP_TIMEOUT_MS, async () => {
    const got = await mapLimit([...kept], 5, (i) => readAction(direct, actions[i]!.actionHash));
    return got.every((h, j) => h === actions[[...kept][j]!]!.outputHash);
  });
  const onSecondary = await mapLimit(actions, 8, (a) => readAction(direct, a.actionHash));
  t.same(
    actions.map((_, i) => i).filter((i) => onSecondary[i] !== 'not-found'),
    [...kept],
    'the secondary holds exactly the 5 ActionResults the queue kept (the first, in flight, and the last 4)',
  );
  const viaEdge = await mapLimit(actions, 8, (a) => readAction(rig.c, a.actionHash));
  t.same(
    actions.filter((a, i) => viaEdge[i] !== a.outputHash).map((a) => a.actionHash),
    [],
    'every ActionResult, replicated or not, reads back through the edge (from the primary)',
  );

  // A graceful stop flushes the overflow lines the rate limit held back.
  await rig.edge.stop();
  const overflowLines = rig.edge
    .logs()
    .filter((l) => l.includes('replication queue full'))
    .map((l) => JSON.parse(l) as { tree: string; overflow: number; overflowTotal: number; policy: string; level: number });
  t.ok(overflowLines.length >= 1 && overflowLines.length <= 3, `overflow logged in ${overflowLines.length} rate-limited line(s), not one per blob`);
  t.same(new Set(overflowLines.map((l) => `${l.tree} ${l.policy} ${l.level}`)), new Set(['ac drop-oldest 40']), 'as warnings of the AC tree, naming the policy');
  t.equal(overflowLines.reduce((n, l) => n + l.overflow, 0), 45, 'the log lines add up to the 45 ActionResults given up');
  t.equal(Math.max(...overflowLines.map((l) => l.overflowTotal)), 45, 'and carry the running total');
});
