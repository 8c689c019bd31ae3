// The storage node's unary hot paths against the in-memory python grpcio
// server, with the C-core client (bench/grpcio_bench.py): FindMissingBlobs of
// 2 x --present digests (half present) and GetActionResult calls/s from 16
// client threads with completeness checking on (the python server with
// --check-completeness, the node with spawnNode's default config, whose AC
// is a completenessChecking store over a disk store).
//
// The two servers run side by side and are measured alternately, --runs
// times, so both see the same machine load; the table gives medians and the
// node/python ratios that issue 8's targets are stated in.
//
// With --baseline DIR a second node runs from another checkout (e.g. a copy
// of the tree with the changes under test reverted) and is measured in the
// same rounds, so before/after figures come from one run.
//
// With --cpu-prof the node runs under `node --cpu-prof` and writes a
// .cpuprofile into --prof-dir when it stops (one per workload when
// --separate is given, so each profile shows one path only).
//
//   node bench/unary-profile.ts [--runs 3] [--present 5000] [--iters 9]
//        [--seconds 5] [--threads 16] [--only findmissing|gar]
//        [--baseline DIR] [--node-options '--v8-flag ...'] [--cpu-prof --prof-dir DIR [--separate]]
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { startPyShard } from '../test/helpers/py-shard.ts';
import { spawnNode, type SpawnedNode } from '../test/helpers/spawn-node.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const python = '/usr/bin/python3';

const { values: opts } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    present: { type: 'string', default: '5000' },
    iters: { type: 'string', default: '9' },
    seconds: { type: 'string', default: '5' },
    threads: { type: 'string', default: '16' },
    only: { type: 'string' },
    'cpu-prof': { type: 'boolean', default: false },
    'prof-dir': { type: 'string' },
    separate: { type: 'boolean', default: false },
    baseline: { type: 'string' },
    'node-options': { type: 'string' },
  },
});

type Out = Record<string, unknown>;

function bench(target: string, stubsDir: string, args: string[]): Promise<Out> {
  const argv = [join(repoRoot, 'bench', 'grpcio_bench.py'), '--target', target, '--stubs-dir', stubsDir, ...args];
  const child = spawn(python, argv, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  return new Promise((res, rej) =>
    child.once('close', (code) => {
      if (code !== 0) rej(new Error(`grpcio_bench.py ${args.join(' ')} against ${target}: exit ${code}\n${stderr.slice(-2000)}`));
      else res(JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as Out);
    }),
  );
}

function num(o: Out, key: string): number {
  const v = o[key];
  if (typeof v !== 'number') throw new Error(`no ${key} in ${JSON.stringify(o).slice(0, 200)}`);
  return v;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function main(): Promise<void> {
  const runs = Number(opts.runs);
  const workloads = opts.only === undefined ? ['findmissing', 'gar'] : [opts.only];
  const root = await mkdtemp(join(tmpdir(), 'reapi-unary-profile-'));
  const stubsDir = join(root, 'stubs');
  const profDir = resolve(opts['prof-dir'] ?? join(root, 'prof'));
  const nodeOptions = [opts['node-options'] ?? '', opts['cpu-prof'] ? `--cpu-prof --cpu-prof-dir=${profDir}` : ''].join(' ').trim();
  const nodeEnv = nodeOptions === '' ? undefined : { NODE_OPTIONS: nodeOptions };
  const py = await startPyShard({ checkCompleteness: true });
  let node: SpawnedNode | undefined;
  const startNode = async () => (node = await spawnNode({ config: { logLevel: 'info' }, env: nodeEnv }));
  const baseline = opts.baseline === undefined
    ? undefined
    : await (async () => {
        const helper = join(resolve(opts.baseline!), 'test', 'helpers', 'spawn-node.ts');
        const mod = (await import(helper)) as { spawnNode: typeof spawnNode };
        return mod.spawnNode({ config: { logLevel: 'info' } });
      })();
  type Who = 'node' | 'python' | 'baseline';
  const who: Who[] = baseline === undefined ? ['node', 'python'] : ['node', 'baseline', 'python'];
  const results: Record<string, Record<Who, number[]>> = {};
  const common = ['--seed', '1'];
  const args: Record<string, string[]> = {
    findmissing: ['findmissing', '--present', opts.present!, '--iters', opts.iters!],
    gar: ['gar', '--threads', opts.threads!, '--seconds', opts.seconds!],
  };
  const key: Record<string, string> = { findmissing: 'findmissing_ms', gar: 'gar_calls_s' };
  try {
    await startNode();
    for (const w of workloads) {
      results[w] = { node: [], python: [], baseline: [] };
      if (opts.separate && node === undefined) await startNode();
      for (let r = 0; r < runs; r++) {
        // Alternate which server goes first, so neither always runs warmer.
        const order = r % 2 === 0 ? who : [...who].reverse();
        for (const x of order) {
          const port = x === 'node' ? node!.port : x === 'baseline' ? baseline!.port : py.port;
          const out = await bench(`127.0.0.1:${port}`, stubsDir, [...common, ...args[w]!]);
          results[w]![x].push(num(out, key[w]!));
          process.stderr.write(`  ${w} run ${r + 1} ${x}: ${num(out, key[w]!).toFixed(1)}\n`);
        }
      }
      if (opts.separate) {
        await node!.stop();
        node = undefined;
      }
    }
  } finally {
    await node?.stop();
    await baseline?.stop();
    await py.stop();
    await rm(join(root, 'stubs'), { recursive: true, force: true });
  }
  const cell = (xs: number[]) => `${median(xs).toFixed(1)} [${xs.map((x) => x.toFixed(0)).join(' ')}]`;
  const withBase = baseline !== undefined;
  console.log(`| workload | node |${withBase ? ' baseline |' : ''} python | node/python |${withBase ? ' baseline/python |' : ''}`);
  console.log(`|---|---:|${withBase ? '---:|' : ''}---:|---:|${withBase ? '---:|' : ''}`);
  for (const [w, r] of Object.entries(results)) {
    const p = median(r.python);
    const unit = w === 'gar' ? 'calls/s' : 'ms';
    const base = withBase ? ` ${cell(r.baseline)} |` : '';
    const baseRatio = withBase ? ` ${(median(r.baseline) / p).toFixed(2)} |` : '';
    console.log(`| ${w} (${unit}) | ${cell(r.node)} |${base} ${cell(r.python)} | ${(median(r.node) / p).toFixed(2)} |${baseRatio}`);
  }
  if (opts['cpu-prof']) console.log(`profiles in ${profDir}`);
}

await main();
