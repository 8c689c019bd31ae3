// The chaos soak (README, "Chaos soak"): a Bazel-like load through the
// default cluster shape while a seeded fault injector kills, pauses, wipes and
// restarts its processes; prints the checker's table and exits 1 if an
// invariant failed.
//
//   npm run soak -- --duration 600 --seed 42
//   npm run soak -- --duration 60 --seed 7 --durability async --json soak.json
//
// Options: --duration SECONDS (default 60), --seed N (default: the time),
// --durability sync|async (default: config.json's), --workers N (default 4),
// --faults kind,kind (default all: shard-kill, shard-stop, shard-empty,
// secondary-kill, secondary-stop, edge-term, edge-kill), --settle SECONDS
// (default 90), --json FILE (the full report), --double-faults (sync mode: let
// a shard be wiped while the pair still runs on one copy after a secondary
// fault; by default the injector waits for two copies first).
import { writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { type Durability, FAULT_KINDS, type FaultKind, formatReport, runSoak, verdict } from '../test/helpers/soak.ts';

const { values } = parseArgs({
  options: {
    duration: { type: 'string', default: '60' },
    seed: { type: 'string' },
    durability: { type: 'string' },
    workers: { type: 'string', default: '4' },
    faults: { type: 'string' },
    settle: { type: 'string', default: '90' },
    json: { type: 'string' },
    'double-faults': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h' },
  },
});

if (values.help === true) {
  console.log('usage: npm run soak -- [--duration SECONDS] [--seed N] [--durability sync|async] [--workers N] [--faults k1,k2] [--settle SECONDS] [--json FILE] [--double-faults]');
  console.log(`fault kinds: ${FAULT_KINDS.join(', ')}`);
  process.exit(0);
}

function positive(name: string, text: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n <= 0) {
    console.error(`--${name} must be a positive number, not ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return n;
}

const durationMs = positive('duration', values.duration) * 1000;
const seed = values.seed === undefined ? Date.now() % 2 ** 31 : Math.floor(Number(values.seed));
if (!Number.isSafeInteger(seed)) {
  console.error(`--seed must be an integer, not ${JSON.stringify(values.seed)}`);
  process.exit(2);
}
let durability: Durability | undefined;
if (values.durability !== undefined) {
  if (values.durability !== 'sync' && values.durability !== 'async') {
    console.error('--durability must be sync or async');
    process.exit(2);
  }
  durability = values.durability;
}
let faults: FaultKind[] | undefined;
if (values.faults !== undefined) {
  faults = values.faults.split(',').map((f) => f.trim()) as FaultKind[];
  const unknown = faults.filter((f) => !FAULT_KINDS.includes(f));
  if (unknown.length > 0 || faults.length === 0) {
    console.error(`unknown fault kinds: ${unknown.join(', ')} (known: ${FAULT_KINDS.join(', ')})`);
    process.exit(2);
  }
}

const started = Date.now();
const report = await runSoak({
  durationMs,
  seed,
  durability,
  workers: Math.floor(positive('workers', values.workers)),
  faults,
  settleTimeoutMs: positive('settle', values.settle) * 1000,
  doubleFaults: values['double-faults'],
  log: (line) => console.error(`[soak +${((Date.now() - started) / 1000).toFixed(1)}s] ${line}`),
});
for (const line of formatReport(report)) console.log(line);
if (values.json !== undefined) await writeFile(values.json, `${JSON.stringify(report, null, 2)}\n`);
process.exit(verdict(report).ok ? 0 : 1);
