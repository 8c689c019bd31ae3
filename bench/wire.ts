// The wire benchmark of issue 8: the data plane measured with the C-core gRPC
// client (python3-grpcio, bench/grpcio_bench.py) against five servers in ONE
// run, printed as ONE markdown table with every figure and every target ratio:
//   - edge: an edge process over 3 storage-node shards plus a fallback
//     secondary, the shape of the shipped config.json (CAS = fallback {
//     sharding, secondary }, AC = completenessChecking over the same shape);
//   - storage node: one node, spawnNode's default config (disk CAS,
//     completeness-checked disk AC);
//   - python: test/fixtures/py-shard/shard.py, the in-memory C-core grpcio
//     server, with --check-completeness so its GetActionResult does the same
//     work as ours (anchor);
//   - bare: bench/anchors/bare-http2-server.ts, node:http2 with hand-framed
//     ByteStream Read/Write, the runtime's limit (anchor; ByteStream only);
//   - relay: bench/anchors/bare-relay.ts in front of the storage node, a
//     node:http2 pass-through that parses nothing: the runtime's floor for
//     an edge (anchor; printed next to every edge / node ratio).
//
// Workloads (bench/grpcio_bench.py): ByteStream Write of a fresh BENCH_BLOB_MIB
// blob in 64 KiB and in 16 KiB messages, Read of it (sha256 checked);
// FindMissingBlobs of 10,000 digests, half present (the same half every time)
// and half fresh random, median of 5 calls; GetActionResult calls/s from 16
// threads over 200 actions with 3 output files each. ByteStream and
// GetActionResult run BENCH_RUNS times with the targets in rotating order
// (medians); every write through the edge waits until the secondary holds the
// blob, so background replication never overlaps the next measurement.
// FindMissing at the edge is measured inside the sharding store's probe window
// (right after the edge starts, window BENCH_PROBE_WINDOW_MS, default 90 s:
// long enough for the upload of the present half and its replication to the
// secondary to finish first; calls that end after the window are not counted)
// and after it closed, each next to the storage node's and python's figures
// taken at the same time.
//
// Optional (slow) parts:
//   BENCH_MEMORY=1  stream a BENCH_MEMORY_GIB (default 4) GiB blob through the
//                   edge (write then read; the client generates and hashes it on
//                   the fly), sampling the edge's VmRSS every 100 ms: idle, peak,
//                   growth. Shards and secondary then get a larger size cap.
//   BENCH_BAZEL=1   a warm Bazel build (after clean --expunge) through the edge
//                   vs straight at the storage node, alternating, median of 3.
//   BENCH_TLS=1     after the rest, the TLS and auth section (wireTlsBench):
//                   storage node cleartext / TLS / TLS + bearer auth against the
//                   python and bare anchors cleartext and over TLS, with ratios.
//                   BENCH_TLS=only runs that section alone; BENCH_TLS_PROF_DIR
//                   writes the TLS node's .cpuprofile there.
//
// `node bench/wire.ts` alone, or the first section of `npm run bench`.
// BENCH_BLOB_MIB (default 128), BENCH_RUNS (default 3). Figures on a shared
// 2-core machine are noisy: compare the ratios, which are taken in one run.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { bazelPath, prepareWorkspace } from '../test/helpers/bazel.ts';
import { createPki, opensslMissing } from '../test/helpers/certs.ts';
import { edgeConfig, parseTransitions } from '../test/helpers/cluster.ts';
import { startPyShard, type PyShard } from '../test/helpers/py-shard.ts';
import { spawnNode, type SpawnedNode } from '../test/helpers/spawn-node.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const python = '/usr/bin/python3';
const setpriv = '/usr/bin/setpriv';
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

export interface WireRow {
  readonly what: string;
  readonly value: string;
  readonly unit: string;
  /** e.g. ">= 1.0"; empty for plain figures. */
  readonly target: string;
  /** 'met', 'NOT met', or '' for plain figures. */
  readonly met: string;
}

export interface WireBenchOptions {
  readonly blobMiB: number;
  readonly runs: number;
  /** The edge sharding store's probe window. Default 90 s. */
  readonly probeWindowMs?: number;
  /** Stream a big blob through the edge and sample its RSS (BENCH_MEMORY=1). */
  readonly memory?: boolean;
  readonly memoryGiB?: number;
  /** Warm Bazel builds, edge vs direct (BENCH_BAZEL=1). */
  readonly bazel?: boolean;
  /**
   * The TLS and auth section (wireTlsBench) after the rest (BENCH_TLS=1), or
   * instead of it ('only', BENCH_TLS=only).
   */
  readonly tls?: boolean | 'only';
  /** Write the TLS storage node's .cpuprofile into this dir (BENCH_TLS_PROF_DIR). */
  readonly tlsProfileDir?: string | undefined;
  /** Progress on stderr. */
  readonly log?: (line: string) => void;
}

/** The JSON object bench/grpcio_bench.py prints. */
type Out = Record<string, unknown>;

/** A numeric field of a grpcio_bench.py result; throws if absent. */
function num(o: Out, key: string): number {
  const v = o[key];
  if (typeof v !== 'number') throw new Error(`grpcio_bench.py printed no ${key}: ${JSON.stringify(o).slice(0, 300)}`);
  return v;
}

const median = (xs: readonly number[]): number => {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const fmt = (x: number, digits = 0): string =>
  Number.isFinite(x) ? x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits }) : 'n/a';

// --- child processes -----------------------------------------------------------

/** argv wrapped in setpriv so the kernel kills the child if this process dies. */
function guarded(argv: string[]): [string, string[]] {
  const full = existsSync(setpriv) ? [setpriv, '--pdeathsig', 'SIGKILL', '--', ...argv] : argv;
  return [full[0]!, full.slice(1)];
}

const liveChildren = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of liveChildren) c.kill('SIGKILL');
});

interface TlsFiles {
  readonly certFile: string;
  readonly keyFile: string;
}

interface BareServer {
  readonly port: number;
  readonly pid: number;
  stop(): Promise<void>;
}

/**
 * bench/anchors/bare-http2-server.ts (over TLS with `tls`), or with `relayTo`
 * bench/anchors/bare-relay.ts in front of that port; with `pythonTls`
 * bench/anchors/py-shard-tls.py, the python anchor over TLS (same
 * "LISTENING <port>" handshake).
 */
async function startBareServer(relayTo?: number, o: { tls?: TlsFiles; pythonTls?: TlsFiles } = {}): Promise<BareServer> {
  const tlsArgs = (t: TlsFiles) => ['--tls-cert', t.certFile, '--tls-key', t.keyFile];
  let script: string;
  let argv: string[];
  if (o.pythonTls !== undefined) {
    script = 'py-shard-tls.py';
    argv = [python, join(repoRoot, 'bench', 'anchors', script), ...tlsArgs(o.pythonTls), '--check-completeness'];
  } else {
    script = relayTo === undefined ? 'bare-http2-server.ts' : 'bare-relay.ts';
    const extra = relayTo === undefined ? (o.tls ? tlsArgs(o.tls) : []) : ['--upstream', `http://127.0.0.1:${relayTo}`];
    argv = [process.execPath, join(repoRoot, 'bench', 'anchors', script), ...extra];
  }
  const [cmd, args] = guarded(argv);
  const child = spawn(cmd, args, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'] });
  liveChildren.add(child);
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  void exited.then(() => liveChildren.delete(child));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  };
  const port = await Promise.race([
    new Promise<number>((res) => {
      createInterface({ input: child.stdout! }).on('line', (line) => {
        const m = /^LISTENING (\d+)$/.exec(line);
        if (m) res(Number(m[1]));
      });
    }),
    exited.then(() => {
      throw new Error(`${script} exited before listening`);
    }),
    sleep(20_000).then(() => {
      throw new Error(`${script} did not listen within 20 s`);
    }),
  ]).catch(async (err: unknown) => {
    await stop();
    throw err;
  });
  return { port, pid: child.pid ?? -1, stop };
}

/** Runs bench/grpcio_bench.py and returns the JSON object it prints. */
async function grpcioBench(
  target: string,
  args: string[],
  opts: {
    settle?: string | undefined;
    stubsDir: string;
    timeoutMs?: number | undefined;
    log: (l: string) => void;
    /** The target speaks TLS with a certificate from this CA. */
    caFile?: string | undefined;
    /** A bearer token sent on every call (passed in the environment, never on argv). */
    token?: string | undefined;
  },
): Promise<Out> {
  const argv = [python, join(repoRoot, 'bench', 'grpcio_bench.py'), '--target', target, '--stubs-dir', opts.stubsDir];
  if (opts.settle) argv.push('--settle-target', opts.settle);
  if (opts.caFile) argv.push('--ca-file', opts.caFile);
  if (opts.token) argv.push('--token-env', 'BENCH_BEARER_TOKEN');
  const [cmd, a] = guarded([...argv, ...args]);
  const env = opts.token ? { ...process.env, BENCH_BEARER_TOKEN: opts.token } : process.env;
  const child = spawn(cmd, a, { cwd: repoRoot, env, stdio: ['ignore', 'pipe', 'pipe'] });
  liveChildren.add(child);
  let stdout = '';
  const errLines: string[] = [];
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  createInterface({ input: child.stderr! }).on('line', (line) => {
    errLines.push(line);
    opts.log(`    [grpcio ${target} ${args[0]}] ${line}`);
  });
  const timeoutMs = opts.timeoutMs ?? 600_000;
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((res) => child.once('close', (c, s) => res([c, s])));
  clearTimeout(timer);
  liveChildren.delete(child);
  if (code !== 0) {
    throw new Error(`grpcio_bench.py ${args.join(' ')} against ${target}: exit ${code} ${signal ?? ''}\n${errLines.slice(-20).join('\n')}`);
  }
  const last = stdout.trim().split('\n').pop() ?? '';
  return JSON.parse(last) as Out;
}

// --- RSS -------------------------------------------------------------------------

async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(status);
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}

/** Median RSS over `ms` of quiet, sampled every 100 ms. */
async function idleRss(pid: number, ms = 1000): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < Math.max(1, ms / 100); i++) {
    xs.push(await rssBytes(pid));
    await sleep(100);
  }
  return median(xs);
}

/** Samples a process's RSS every 100 ms until stop(); returns the peak. */
function rssSampler(pid: number): { stop(): Promise<{ peak: number; samples: number }> } {
  let peak = 0;
  let samples = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        peak = Math.max(peak, await rssBytes(pid));
        samples++;
      } catch {
        // the process is gone; the caller will notice
      }
      await sleep(100);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { peak, samples };
    },
  };
}

// --- the edge cluster ------------------------------------------------------------

interface EdgeCluster {
  readonly edge: SpawnedNode;
  readonly shards: readonly SpawnedNode[];
  readonly secondary: SpawnedNode;
  /** When the edge's spawn began: its probe window cannot have opened earlier. */
  readonly spawnedAt: number;
  /** When the edge accepted connections. */
  readonly readyAt: number;
  stop(): Promise<void>;
}

/**
 * 3 shards + a secondary + an edge, each `node src/main.ts` in its own dir
 * under `root`, shaped like config.json. test/helpers/cluster.ts's
 * startCluster has no fallback secondary and a fixed 4 GiB shard cap, so the
 * processes are spawned here; the edge's sharding trees come from its
 * edgeConfig().
 */
export async function startEdgeCluster(root: string, o: { probeWindowMs: number; shardMaxBytes: number }): Promise<EdgeCluster> {
  const all: SpawnedNode[] = [];
  const node = async (name: string, config: Record<string, unknown>) => {
    await mkdir(join(root, name), { recursive: true });
    const n = await spawnNode({ dir: join(root, name), config });
    all.push(n);
    return n;
  };
  const storage = (maxSizeBytes: number) => ({
    logLevel: 'info', // spawnNode reads the port from the info-level listening line
    cas: { disk: { path: 'cas', maxSizeBytes } },
    ac: { disk: { path: 'ac', maxSizeBytes: 256 * MiB } },
  });
  try {
    const names = ['shard-a', 'shard-b', 'shard-c'];
    const [shards, secondary] = await Promise.all([
      Promise.all(names.map((name) => node(name, storage(o.shardMaxBytes)))),
      node('secondary', storage(2 * o.shardMaxBytes)),
    ]);
    const trees = edgeConfig(
      shards.map((s, i) => ({ name: names[i]!, url: s.url, weight: 1 })),
      { probeWindowMs: o.probeWindowMs, edgeLogLevel: 'info' },
    ) as { cas: unknown; ac: { completenessChecking: { backend: unknown } } };
    const fallback = (primary: unknown, tree: string) => ({
      fallback: { primary, secondary: { remote: { url: secondary.url } }, journalDir: `journal-${tree}` },
    });
    const spawnedAt = Date.now();
    const edge = await node('edge', {
      logLevel: 'info', // breaker transitions (the probe window's restarts) are logged at info
      cas: fallback(trees.cas, 'cas'),
      ac: { completenessChecking: { backend: fallback(trees.ac.completenessChecking.backend, 'ac') } },
    });
    const readyAt = Date.now();
    return {
      edge,
      shards,
      secondary,
      spawnedAt,
      readyAt,
      stop: async () => {
        await Promise.allSettled(all.map((n) => n.stop()));
      },
    };
  } catch (err) {
    await Promise.allSettled(all.map((n) => n.stop()));
    throw err;
  }
}

// --- the bench ---------------------------------------------------------------------

export async function wireBench(opts: WireBenchOptions): Promise<WireRow[]> {
  if (opts.tls === 'only') return wireTlsBench(opts);
  const rows = await wireBenchPlain(opts);
  if (opts.tls) rows.push(...(await wireTlsBench(opts)));
  return rows;
}

async function wireBenchPlain(opts: WireBenchOptions): Promise<WireRow[]> {
  const log = opts.log ?? ((l: string) => console.error(l));
  const probeWindowMs = opts.probeWindowMs ?? 90_000;
  const memoryGiB = opts.memoryGiB ?? 4;
  const rows: WireRow[] = [];
  const figure = (what: string, value: number, unit: string, digits = 0) => {
    rows.push({ what, value: fmt(value, digits), unit, target: '', met: '' });
    log(`  ${what}: ${fmt(value, digits)} ${unit}`);
  };
  const target = (what: string, value: number, op: '>=' | '<=', bound: number, unit = 'ratio') => {
    const ok = Number.isFinite(value) && (op === '>=' ? value >= bound : value <= bound);
    const goal = `${op} ${Number.isInteger(bound) && bound < 10 ? bound.toFixed(1) : bound}`;
    rows.push({ what, value: fmt(value, 2), unit, target: goal, met: ok ? 'met' : 'NOT met' });
    log(`  ${what}: ${fmt(value, 2)} (target ${goal}: ${ok ? 'met' : 'NOT met'})`);
  };

  const root = await mkdtemp(join(tmpdir(), 'reapi-bench-wire-'));
  const stubsDir = join(root, 'stubs');
  const stops: (() => Promise<unknown>)[] = [];
  const onSignal = () => process.exit(130); // runs the exit hooks that kill children
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const big = opts.memory ? memoryGiB * GiB + 2 * GiB : 4 * GiB;
    log(`wire bench: starting the python anchor, the bare anchor, a storage node and the edge cluster (probe window ${probeWindowMs} ms)`);
    const started = await Promise.allSettled([
      startPyShard({ checkCompleteness: true }),
      startBareServer(),
      spawnNode({ config: { logLevel: 'info' } }),
    ] as const);
    for (const s of started) if (s.status === 'fulfilled') stops.push(() => s.value.stop());
    for (const s of started) if (s.status === 'rejected') throw s.reason;
    const [py, bare, direct] = started.map((s) => (s as PromiseFulfilledResult<unknown>).value) as [PyShard, BareServer, SpawnedNode];
    const nodeIdleRss = await idleRss(direct.pid);
    // The runtime's floor for an edge: a relay that parses nothing, in front
    // of the same storage node.
    const relay = await startBareServer(direct.port);
    stops.push(() => relay.stop());
    const cluster = await startEdgeCluster(join(root, 'cluster'), { probeWindowMs, shardMaxBytes: big });
    stops.push(() => cluster.stop());
    const edgeIdleRss = await idleRss(cluster.edge.pid, 500);

    const addr = (port: number) => `127.0.0.1:${port}`;
    const targets = {
      edge: { addr: addr(cluster.edge.port), settle: addr(cluster.secondary.port) },
      node: { addr: addr(direct.port), settle: undefined },
      python: { addr: addr(py.port), settle: undefined },
      bare: { addr: addr(bare.port), settle: undefined },
      relay: { addr: addr(relay.port), settle: undefined },
    } as const;
    type Name = keyof typeof targets;
    const run = (name: Name, args: string[], timeoutMs?: number) =>
      grpcioBench(targets[name].addr, args, { settle: targets[name].settle, stubsDir, log, timeoutMs });

    // 1. FindMissing inside the probe window: the edge first, right after it
    //    started; the node and python at the same time for comparison.
    const fm = (name: Name) => run(name, ['findmissing', '--seed', '7', '--iters', '5']);
    // The window runs from the edge's start or its last breaker transition
    // (e.g. a shard's first health check); a call counts as inside when it
    // ended before the window that was open when it started could close.
    const lastChangeBefore = (t: number) =>
      Math.max(cluster.spawnedAt, ...parseTransitions(cluster.edge.logs()).filter((x) => x.time <= t).map((x) => x.time));
    const fmEdgeIn = await fm('edge');
    const allMs = fmEdgeIn.findmissing_all_ms as number[];
    const windows = fmEdgeIn.findmissing_windows as [number, number][];
    const insideMs = allMs.filter((_, i) => windows[i]![1] < lastChangeBefore(windows[i]![0]) + probeWindowMs);
    if (insideMs.length < allMs.length) {
      log(`  note: ${allMs.length - insideMs.length} FindMissing calls at the edge ended after the probe window; not counted`);
    }
    const fmNodeA = num(await fm('node'), 'findmissing_ms');
    const fmPyA = num(await fm('python'), 'findmissing_ms');

    // 2. ByteStream and GetActionResult, BENCH_RUNS times, targets rotating.
    const order: Name[] = ['node', 'edge', 'python', 'bare', 'relay'];
    const bs: Record<Name, Out[]> = { edge: [], node: [], python: [], bare: [], relay: [] };
    const gar: Record<Name, number[]> = { edge: [], node: [], python: [], bare: [], relay: [] };
    for (let i = 0; i < opts.runs; i++) {
      log(`run ${i + 1} of ${opts.runs}`);
      const rotated = [...order.slice(i % order.length), ...order.slice(0, i % order.length)];
      for (const name of rotated) bs[name].push(await run(name, ['bytestream', '--blob-mib', String(opts.blobMiB)]));
      for (const name of rotated) {
        if (name !== 'bare') gar[name].push(num(await run(name, ['gar', '--seed', '9', '--threads', '16', '--seconds', '5']), 'gar_calls_s'));
      }
    }
    const bsm = (name: Name, key: string) => median(bs[name].map((f) => num(f, key)));

    // 3. FindMissing after the window closed (no breaker change since).
    const lastChange = () => lastChangeBefore(Infinity);
    const waitMs = lastChange() + probeWindowMs + 1000 - Date.now();
    if (waitMs > 0) {
      log(`  waiting ${Math.ceil(waitMs / 1000)} s for the edge's probe window to close`);
      await sleep(waitMs);
    }
    const outsideFrom = Date.now();
    const fmEdgeOut = num(await fm('edge'), 'findmissing_ms');
    const fmNodeB = num(await fm('node'), 'findmissing_ms');
    const fmPyB = num(await fm('python'), 'findmissing_ms');
    const reopened = lastChange() > outsideFrom - probeWindowMs;
    if (reopened) log('  warning: a breaker changed state: the "probe window closed" FindMissing may have probed');

    // The table: figures, then the ratios the issue targets.
    const mb = `${opts.blobMiB} MiB`;
    for (const [label, key] of [
      [`ByteStream Write ${mb}, 64 KiB messages`, 'write_64k_mib_s'],
      [`ByteStream Write ${mb}, 16 KiB messages`, 'write_16k_mib_s'],
      [`ByteStream Read ${mb}`, 'read_mib_s'],
    ] as const) {
      for (const name of ['edge', 'node', 'python', 'bare', 'relay'] as const) figure(`${name}: ${label}`, bsm(name, key), 'MiB/s');
    }
    figure('edge: FindMissingBlobs 10,000 (half present), inside the probe window', median(insideMs), 'ms', 1);
    figure('node: FindMissingBlobs 10,000, same time', fmNodeA, 'ms', 1);
    figure('python: FindMissingBlobs 10,000, same time', fmPyA, 'ms', 1);
    figure(`edge: FindMissingBlobs 10,000, probe window closed${reopened ? ' (a breaker changed: may have probed)' : ''}`, fmEdgeOut, 'ms', 1);
    figure('node: FindMissingBlobs 10,000, same time', fmNodeB, 'ms', 1);
    figure('python: FindMissingBlobs 10,000, same time', fmPyB, 'ms', 1);
    for (const name of ['edge', 'node', 'python', 'relay'] as const) {
      figure(`${name}: GetActionResult, 16 threads, 3 outputs checked per result`, median(gar[name]), 'calls/s');
    }
    figure('edge: idle RSS after start', edgeIdleRss / MiB, 'MiB');
    figure('storage node: idle RSS after start', nodeIdleRss / MiB, 'MiB');

    const r = (a: number, b: number) => a / b;
    target('node / python: ByteStream Read', r(bsm('node', 'read_mib_s'), bsm('python', 'read_mib_s')), '>=', 1.0);
    target('node / bare: ByteStream Read', r(bsm('node', 'read_mib_s'), bsm('bare', 'read_mib_s')), '>=', 0.7);
    target('node / python: ByteStream Write, 64 KiB messages', r(bsm('node', 'write_64k_mib_s'), bsm('python', 'write_64k_mib_s')), '>=', 1.0);
    target('node / python: ByteStream Write, 16 KiB messages', r(bsm('node', 'write_16k_mib_s'), bsm('python', 'write_16k_mib_s')), '>=', 1.0);
    // Next to each edge / node ratio, the bare relay's: what a second HTTP/2
    // hop on these two cores allows at best.
    const floor = (what: string, value: number) => figure(`anchor: ${what}`, value, 'ratio', 2);
    target('edge / node: ByteStream Read', r(bsm('edge', 'read_mib_s'), bsm('node', 'read_mib_s')), '>=', 0.9);
    floor('bare relay / node: ByteStream Read', r(bsm('relay', 'read_mib_s'), bsm('node', 'read_mib_s')));
    target('edge / node: ByteStream Write, 64 KiB messages', r(bsm('edge', 'write_64k_mib_s'), bsm('node', 'write_64k_mib_s')), '>=', 0.9);
    floor('bare relay / node: ByteStream Write, 64 KiB messages', r(bsm('relay', 'write_64k_mib_s'), bsm('node', 'write_64k_mib_s')));
    target('edge / node: ByteStream Write, 16 KiB messages', r(bsm('edge', 'write_16k_mib_s'), bsm('node', 'write_16k_mib_s')), '>=', 0.9);
    floor('bare relay / node: ByteStream Write, 16 KiB messages', r(bsm('relay', 'write_16k_mib_s'), bsm('node', 'write_16k_mib_s')));
    target('node / python: FindMissingBlobs time (window closed)', r(fmNodeB, fmPyB), '<=', 1.0);
    target('edge / node: FindMissingBlobs time, probe window closed', r(fmEdgeOut, fmNodeB), '<=', 1.3);
    target('edge / node: FindMissingBlobs time, inside the probe window', r(median(insideMs), fmNodeA), '<=', 1.3);
    target('node / python: GetActionResult calls/s', r(median(gar.node), median(gar.python)), '>=', 1.0);
    target('edge / node: GetActionResult calls/s', r(median(gar.edge), median(gar.node)), '>=', 0.8);
    floor('bare relay / node: GetActionResult calls/s', r(median(gar.relay), median(gar.node)));

    // 4. Memory: a big blob streamed through the edge.
    if (opts.memory) {
      log(`memory: streaming a ${memoryGiB} GiB blob through the edge (write, wait for the secondary, read)`);
      const idle = await idleRss(cluster.edge.pid, 2000);
      const sampler = rssSampler(cluster.edge.pid);
      const res = await run('edge', ['stream', '--gib', String(memoryGiB), '--chunk-kib', '64', '--seed', String(Date.now() % 1e9)], 3_600_000).catch(
        async (err: unknown) => {
          await sampler.stop();
          throw err;
        },
      );
      const peak = await sampler.stop();
      figure(`edge: ByteStream Write ${memoryGiB} GiB streamed`, num(res, 'stream_write_mib_s'), 'MiB/s');
      figure(`edge: ByteStream Read ${memoryGiB} GiB streamed`, num(res, 'stream_read_mib_s'), 'MiB/s');
      figure('edge: idle RSS before the stream', idle / MiB, 'MiB');
      figure(`edge: peak RSS while streaming ${memoryGiB} GiB (${peak.samples} samples, 100 ms apart)`, peak.peak / MiB, 'MiB');
      target(`edge: RSS growth streaming ${memoryGiB} GiB (peak - idle)`, (peak.peak - idle) / MiB, '<=', 64, 'MiB');
    }

    // 5. Bazel: warm builds through the edge vs straight at the storage node.
    if (opts.bazel) {
      if (!bazelPath) throw new Error('BENCH_BAZEL=1 but bazel is not installed (apt-get install bazel-bootstrap bazel-bootstrap-source)');
      const ws = await prepareWorkspace('reapi-bench-bazel-');
      stops.push(async () => {
        ws.shutdown();
        await ws.remove();
      });
      const flags = (url: string) => [`--remote_cache=${url}`, '--remote_instance_name=bazel-bench', '--disk_cache=', '--remote_timeout=60'];
      const via = { edge: flags(cluster.edge.grpcUrl), direct: flags(direct.grpcUrl) };
      const build = async (which: 'edge' | 'direct', what: string) => {
        const clean = await ws.bazel(['clean', '--expunge']);
        if (clean.code !== 0) throw new Error(`bazel clean --expunge failed:\n${clean.output.slice(-2000)}`);
        const b = await ws.bazel(['build', ...via[which], '//...']);
        if (b.code !== 0) throw new Error(`${what} build (${which}) failed:\n${b.output.slice(-3000)}`);
        log(`  bazel ${what} build via ${which}: ${b.ms} ms, ${b.summaryLine}`);
        return b;
      };
      log('bazel: cold builds populate both caches');
      const cold = await build('edge', 'cold');
      await build('direct', 'cold');
      const warm = { edge: [] as number[], direct: [] as number[] };
      let hits = true;
      for (let i = 0; i < 3; i++) {
        for (const which of i % 2 === 0 ? (['edge', 'direct'] as const) : (['direct', 'edge'] as const)) {
          const b = await build(which, 'warm');
          if (b.processes.executed !== 0) hits = false;
          warm[which].push(b.ms);
        }
      }
      figure(`bazel: cold build via edge (${cold.processes.executed} actions executed)`, cold.ms / 1000, 's', 1);
      figure(`bazel: warm build after clean --expunge, via edge${hits ? '' : ' (NOT all remote cache hits)'}`, median(warm.edge) / 1000, 's', 1);
      figure('bazel: the same, straight at the storage node', median(warm.direct) / 1000, 's', 1);
      target('edge / node: warm Bazel build time', median(warm.edge) / median(warm.direct), '<=', 1.1);
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    for (const stop of stops.reverse()) await stop().catch((err: unknown) => log(`cleanup: ${String(err)}`));
    await rm(root, { recursive: true, force: true });
  }
  return rows;
}

// --- TLS and auth ------------------------------------------------------------------

/**
 * What TLS and bearer-token auth cost on the storage node's data plane, with
 * the C-core client, in one run against anchors measured the same way:
 *   - node, node-tls, node-auth: three storage nodes (spawnNode's default
 *     config: disk CAS, completeness-checked disk AC) listening cleartext,
 *     with `tls`, and with `tls` + `auth` (one identity by tokenSha256,
 *     read-write on every instance, no rate limit; the client sends
 *     "authorization: Bearer ..." as call metadata on every call);
 *   - python, python-tls: test/fixtures/py-shard/shard.py --check-completeness,
 *     cleartext and over TLS (bench/anchors/py-shard-tls.py,
 *     grpc.ssl_server_credentials): what TLS costs the C-core server;
 *   - bare, bare-tls: bench/anchors/bare-http2-server.ts, cleartext and over
 *     TLS (http2.createSecureServer): what TLS costs node:http2 itself
 *     (ByteStream only).
 * Certificates: a private CA and a P-256 server certificate for 127.0.0.1
 * from test/helpers/certs.ts (openssl CLI); every TLS client verifies it.
 * After an uncounted warm-up of every target (16 MiB ByteStream, 1 s of
 * GetActionResult), ByteStream (write 64 KiB and 16 KiB messages, read) and
 * GetActionResult (16 threads, 5 s) run BENCH_RUNS times with the targets in
 * rotating order; medians. The ratios are taken within this one run.
 */
export async function wireTlsBench(opts: WireBenchOptions): Promise<WireRow[]> {
  const log = opts.log ?? ((l: string) => console.error(l));
  if (opensslMissing) throw new Error(`the TLS section needs openssl: ${opensslMissing}`);
  const rows: WireRow[] = [];
  const figure = (what: string, value: number, unit: string, digits = 0) => {
    rows.push({ what, value: fmt(value, digits), unit, target: '', met: '' });
    log(`  ${what}: ${fmt(value, digits)} ${unit}`);
  };
  const root = await mkdtemp(join(tmpdir(), 'reapi-bench-wire-tls-'));
  const stubsDir = join(root, 'stubs');
  const stops: (() => Promise<unknown>)[] = [];
  const onSignal = () => process.exit(130);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const pki = await createPki();
    stops.push(() => pki.remove());
    const tls = { certFile: pki.server.certFile, keyFile: pki.server.keyFile };
    const token = randomBytes(32).toString('base64url');
    const auth = {
      anonymous: 'none',
      identities: { bench: { tokenSha256: createHash('sha256').update(token).digest('hex'), grants: { '': 'read-write' } } },
    };
    const profEnv = opts.tlsProfileDir ? { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${resolve(opts.tlsProfileDir)}` } : undefined;
    log('wire bench, TLS and auth: starting three storage nodes (cleartext, TLS, TLS + auth), python and bare anchors (cleartext and TLS)');
    const started = await Promise.allSettled([
      spawnNode({ config: { logLevel: 'info' } }),
      spawnNode({ config: { logLevel: 'info', tls }, ...(profEnv ? { env: profEnv } : {}) }),
      spawnNode({ config: { logLevel: 'info', tls, auth } }),
      startPyShard({ checkCompleteness: true }),
      startBareServer(undefined, { pythonTls: tls }),
      startBareServer(),
      startBareServer(undefined, { tls }),
    ] as const);
    for (const s of started) if (s.status === 'fulfilled') stops.push(() => (s.value as { stop(): Promise<unknown> }).stop());
    for (const s of started) if (s.status === 'rejected') throw s.reason;
    const [node, nodeTls, nodeAuth, py, pyTls, bare, bareTls] = started.map((s) => (s as PromiseFulfilledResult<unknown>).value) as [
      SpawnedNode,
      SpawnedNode,
      SpawnedNode,
      PyShard,
      BareServer,
      BareServer,
      BareServer,
    ];
    const addr = (port: number) => `127.0.0.1:${port}`;
    const targets = {
      node: { addr: addr(node.port), caFile: undefined, token: undefined },
      'node-tls': { addr: addr(nodeTls.port), caFile: pki.caFile, token: undefined },
      'node-auth': { addr: addr(nodeAuth.port), caFile: pki.caFile, token },
      python: { addr: addr(py.port), caFile: undefined, token: undefined },
      'python-tls': { addr: addr(pyTls.port), caFile: pki.caFile, token: undefined },
      bare: { addr: addr(bare.port), caFile: undefined, token: undefined },
      'bare-tls': { addr: addr(bareTls.port), caFile: pki.caFile, token: undefined },
    } as const;
    type Name = keyof typeof targets;
    const names = Object.keys(targets) as Name[];
    const run = (name: Name, args: string[]) => grpcioBench(targets[name].addr, args, { ...targets[name], stubsDir, log });

    const bs = Object.fromEntries(names.map((n) => [n, [] as Out[]])) as Record<Name, Out[]>;
    const gar = Object.fromEntries(names.map((n) => [n, [] as number[]])) as Record<Name, number[]>;
    // Warm-up, not counted: the node processes are fresh (cold JIT), the
    // anchors in C and python are not.
    log('TLS warm-up (not counted)');
    for (const name of names) {
      await run(name, ['bytestream', '--blob-mib', '16']);
      if (!name.startsWith('bare')) await run(name, ['gar', '--seed', '9', '--threads', '16', '--seconds', '1']);
    }
    for (let i = 0; i < opts.runs; i++) {
      log(`TLS run ${i + 1} of ${opts.runs}`);
      const rotated = [...names.slice(i % names.length), ...names.slice(0, i % names.length)];
      for (const name of rotated) bs[name].push(await run(name, ['bytestream', '--blob-mib', String(opts.blobMiB)]));
      for (const name of rotated) {
        if (!name.startsWith('bare')) gar[name].push(num(await run(name, ['gar', '--seed', '9', '--threads', '16', '--seconds', '5']), 'gar_calls_s'));
      }
    }
    const bsm = (name: Name, key: string) => median(bs[name].map((f) => num(f, key)));
    const garm = (name: Name) => median(gar[name]);

    const label: Record<Name, string> = {
      node: 'node cleartext',
      'node-tls': 'node TLS',
      'node-auth': 'node TLS + auth',
      python: 'python cleartext',
      'python-tls': 'python TLS',
      bare: 'bare cleartext',
      'bare-tls': 'bare TLS',
    };
    const mb = `${opts.blobMiB} MiB`;
    const workloads = [
      [`ByteStream Read ${mb}`, 'read_mib_s'],
      [`ByteStream Write ${mb}, 64 KiB messages`, 'write_64k_mib_s'],
      [`ByteStream Write ${mb}, 16 KiB messages`, 'write_16k_mib_s'],
    ] as const;
    for (const [what, key] of workloads) for (const name of names) figure(`${label[name]}: ${what}`, bsm(name, key), 'MiB/s');
    for (const name of names) if (!name.startsWith('bare')) figure(`${label[name]}: GetActionResult, 16 threads, 3 outputs checked per result`, garm(name), 'calls/s');

    const ratio = (a: Name, b: Name) => {
      for (const [w, key] of workloads) figure(`${label[a]} / ${label[b]}: ${w.replace(/ \d+ MiB/, '')}`, bsm(a, key) / bsm(b, key), 'ratio', 2);
      if (!a.startsWith('bare') && !b.startsWith('bare')) figure(`${label[a]} / ${label[b]}: GetActionResult calls/s`, garm(a) / garm(b), 'ratio', 2);
    };
    ratio('node-tls', 'node'); // the TLS cost
    ratio('node-tls', 'python-tls'); // against the C-core server over TLS
    ratio('node-tls', 'bare-tls'); // against the runtime's limit over TLS
    ratio('node-auth', 'node-tls'); // the auth cost
    // The anchors' own TLS cost: what the same TLS costs servers we did not write.
    ratio('python-tls', 'python');
    ratio('bare-tls', 'bare');
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    for (const stop of stops.reverse()) await stop().catch((err: unknown) => log(`cleanup: ${String(err)}`));
    await rm(root, { recursive: true, force: true });
  }
  return rows;
}

export function printWireTable(rows: readonly WireRow[]): void {
  console.log('\n| measurement | value | unit | target | met |\n| --- | ---: | --- | --- | --- |');
  for (const r of rows) console.log(`| ${r.what} | ${r.value} | ${r.unit} | ${r.target} | ${r.met} |`);
}

export function wireOptionsFromEnv(): WireBenchOptions {
  const env = process.env;
  return {
    blobMiB: Number(env.BENCH_BLOB_MIB ?? 128),
    runs: Number(env.BENCH_RUNS ?? 3),
    probeWindowMs: Number(env.BENCH_PROBE_WINDOW_MS ?? 90_000),
    memory: env.BENCH_MEMORY === '1',
    memoryGiB: Number(env.BENCH_MEMORY_GIB ?? 4),
    bazel: env.BENCH_BAZEL === '1',
    tls: env.BENCH_TLS === 'only' ? 'only' : env.BENCH_TLS === '1',
    tlsProfileDir: env.BENCH_TLS_PROF_DIR,
  };
}

if (import.meta.main) {
  const t0 = Date.now();
  const rows = await wireBench(wireOptionsFromEnv());
  printWireTable(rows);
  console.error(`wire bench took ${Math.round((Date.now() - t0) / 1000)} s`);
}
