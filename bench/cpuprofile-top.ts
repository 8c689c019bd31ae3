// Summarises a V8 .cpuprofile (from `node --cpu-prof`): self time per
// function and per source file, top N of each.
//
//   node bench/cpuprofile-top.ts FILE.cpuprofile [N]
import { readFileSync } from 'node:fs';

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile {
  nodes: Node[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

const [file, nArg] = process.argv.slice(2);
if (file === undefined) throw new Error('usage: node bench/cpuprofile-top.ts FILE.cpuprofile [N]');
const n = Number(nArg ?? 25);
const p = JSON.parse(readFileSync(file, 'utf8')) as Profile;
const byId = new Map(p.nodes.map((x) => [x.id, x]));
const self = new Map<number, number>();
for (let i = 0; i < p.samples.length; i++) {
  const id = p.samples[i]!;
  self.set(id, (self.get(id) ?? 0) + (p.timeDeltas[i] ?? 0));
}
const short = (url: string) => url.replace(/^.*\/node_modules\//, 'nm/').replace(/^.*\/(src|gen|bench|test)\//, '$1/').replace(/^file:\/\//, '');
const byFn = new Map<string, number>();
const byFile = new Map<string, number>();
let total = 0;
for (const [id, us] of self) {
  const node = byId.get(id)!;
  const f = node.callFrame;
  const fn = `${f.functionName || '(anon)'} ${short(f.url)}:${f.lineNumber + 1}`;
  byFn.set(fn, (byFn.get(fn) ?? 0) + us);
  const fileKey = f.url === '' ? f.functionName : short(f.url).replace(/\/[^/]*$/, (m) => (f.url.includes('node_modules') ? '' : m));
  byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + us);
  total += us;
}
const top = (m: Map<string, number>) =>
  [...m]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([k, us]) => `${(us / 1000).toFixed(0).padStart(7)} ms ${((100 * us) / total).toFixed(1).padStart(5)}%  ${k}`)
    .join('\n');
console.log(`profile ${((p.endTime - p.startTime) / 1e6).toFixed(1)} s wall, ${(total / 1e6).toFixed(2)} s sampled`);
console.log('\nself time by function:\n' + top(byFn));
console.log('\nself time by file / package:\n' + top(byFile));
