// Runs the tap suite and closes with one plain line "N passed, M failed"
// counted over every assertion, so CI can read the result in any log.
// Extra arguments are passed to tap (e.g. a single test file).
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const args = ['tap', '-R', 'tap', ...process.argv.slice(2)];
const child = spawn('npx', args, { stdio: ['ignore', 'pipe', 'inherit'] });
let passed = 0;
let failed = 0;
let skipped = 0;
const rl = createInterface({ input: child.stdout });
rl.on('line', (line) => {
  process.stdout.write(`${line}\n`);
  // tap's final summary comment: "# { total: 12, pass: 11, fail: 1, skip: 0 }"
  const m = /^# \{ total: \d+(.*)\}$/.exec(line);
  if (m) {
    const field = (name: string) => Number(new RegExp(`${name}: (\\d+)`).exec(m[1] ?? '')?.[1] ?? 0);
    passed = field('pass');
    failed = field('fail');
    skipped = field('skip') + field('todo');
  }
});
child.on('close', (code) => {
  if (code !== 0 && failed === 0) failed = 1; // a crash or a missing summary is a failure
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  process.exit(code ?? 1);
});
