import t from 'tap';
import { createHash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';
import { log2Fraction, MAX_WEIGHT, Placement, rank, score, validateShards } from '../../src/stores/rendezvous.ts';

const shards = [
  { name: 'a', weight: 1 },
  { name: 'b', weight: 2 },
  { name: 'c', weight: 1 },
  { name: 'd', weight: 3 },
];

function keys(n: number): string[] {
  return Array.from({ length: n }, (_, i) => createHash('sha256').update(`blob ${i}`).digest('hex'));
}

t.test('rankings are golden: the same on every machine and every release', async (t) => {
  // If these change, every edge in a mixed-version fleet disagrees on placement.
  t.same(rank('e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', shards), ['b', 'd', 'c', 'a']);
  t.same(rank('key-1', shards), ['c', 'b', 'd', 'a']);
  t.same(rank('key-2', shards), ['d', 'c', 'b', 'a']);
  t.same(rank('key-3', shards), ['c', 'd', 'b', 'a']);
  t.equal(score('key-1', 'a'), 33670076);
  t.equal(score('key-2', 'b'), 31174621);
  t.equal(score('e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 'a'), 52268161);
  t.same(new Placement(shards).order('key-1'), [2, 1, 3, 0], 'indices into the shard list');
});

t.test('the code is the documented algorithm: matches a BigInt rendering of it', async (t) => {
  const mask = (1n << 64n) - 1n;
  const first8 = (s: string) => createHash('sha256').update(s, 'utf8').digest().readBigUInt64BE(0);
  const keyValue = (k: string) => (/^[0-9a-f]{16}/.test(k) ? BigInt(`0x${k.slice(0, 16)}`) : first8(k));
  const mix = (z: bigint) => {
    z ^= z >> 30n;
    z = (z * 0xbf58476d1ce4e5b9n) & mask;
    z ^= z >> 27n;
    z = (z * 0x94d049bb133111ebn) & mask;
    return z ^ (z >> 31n);
  };
  const table = Array.from({ length: 1024 }, (_, j) => log2Fraction(2 ** 24 + j * 2 ** 14));
  table.push(2 ** 24);
  const reference = (key: string, name: string): number => {
    const x = mix(keyValue(key) ^ first8(name));
    if (x === 0n) return 65 * 2 ** 24;
    const p = x.toString(2).length - 1;
    const f = Number((p >= 26 ? x >> BigInt(p - 26) : x << BigInt(26 - p)) & ((1n << 26n) - 1n));
    const i = f >> 16;
    const r = f & 0xffff;
    return 64 * 2 ** 24 - (p * 2 ** 24 + table[i]! + Math.floor(((table[i + 1]! - table[i]!) * r) / 2 ** 16));
  };
  const mismatches: string[] = [];
  const samples = [...keys(2000), 'key-1', '', 'short', '0123456789abcdef', '0123456789ABCDEF0', '0123456789abcdefXYZ', 'ü-ключ'];
  for (const [i, k] of samples.entries()) {
    const name = ['a', 'shard-b', 'ñame', ''][i % 4]!;
    if (score(k, name) !== reference(k, name)) mismatches.push(`${k} @ ${name}: ${score(k, name)} != ${reference(k, name)}`);
  }
  t.same(mismatches, []);
  t.equal(score('0123456789abcdefXYZ', 'a'), score('0123456789abcdef', 'a'), 'only the first 16 hex digits of a hex key count');
  t.not(score('0123456789ABCDEF0', 'a'), score('0123456789abcdef0', 'a'), 'upper case is not hex here: hashed instead');
});

t.test('ranking does not depend on the order shards are listed in', async (t) => {
  const reversed = [...shards].reverse();
  const differ = keys(500).filter((k) => rank(k, reversed).join() !== rank(k, shards).join());
  t.same(differ, []);
});

t.test('fixed-point log2 tracks the real one to a few units in the last place', async (t) => {
  const one = 2 ** 24;
  t.equal(log2Fraction(one), 0);
  for (const m of [one + 1, 1.25 * one, 1.5 * one, Math.SQRT2 * one, 2 * one - 1]) {
    const mi = Math.floor(m);
    const exact = Math.log2(mi / one) * one;
    t.ok(Math.abs(log2Fraction(mi) - exact) <= 4, `log2Fraction(${mi}) = ${log2Fraction(mi)}, exact ${exact}`);
  }
  t.ok(Number.isInteger(score('anything', 'a')));
});

t.test('scores behave like -log2 of a uniform value: integers in (0, 65 * 2^24], mean 1/ln 2', async (t) => {
  let sum = 0;
  const bad: number[] = [];
  const all = keys(20_000);
  for (const k of all) {
    const s = score(k, 'a');
    if (!Number.isInteger(s) || s <= 0 || s > 65 * 2 ** 24) bad.push(s);
    sum += s;
  }
  t.same(bad, []);
  const mean = sum / all.length / 2 ** 24;
  // The sd of -log2(u) is 1/ln 2 too, so the mean of 20k is within 0.03 at 3 sd.
  t.ok(Math.abs(mean - 1 / Math.LN2) < 0.03, `mean score ${mean}, expected about ${1 / Math.LN2}`);
});

t.test('keys spread in proportion to weight over 100k keys', async (t) => {
  const counts = new Map<string, number>();
  const n = 100_000;
  for (const k of keys(n)) {
    const owner = rank(k, shards)[0]!;
    counts.set(owner, (counts.get(owner) ?? 0) + 1);
  }
  const total = shards.reduce((s, x) => s + x.weight, 0);
  for (const s of shards) {
    const expected = (n * s.weight) / total;
    const got = counts.get(s.name) ?? 0;
    // Binomial sd is at most ~160 here; 2% of n is > 10 sd.
    t.ok(Math.abs(got - expected) < 0.02 * n, `${s.name}: ${got} keys, expected about ${Math.round(expected)}`);
  }
});

t.test('removing a shard moves only its keys, and adding it back moves exactly those back', async (t) => {
  const all = keys(20_000);
  const without = shards.filter((s) => s.name !== 'b');
  let moved = 0;
  const wrong: string[] = [];
  for (const k of all) {
    const before = rank(k, shards);
    const after = rank(k, without);
    if (before[0] === 'b') moved++;
    // The others keep their order: keys b did not own stay put, and b's keys
    // go to their runner-up, so stand-ins are predictable.
    const expected = before.filter((n) => n !== 'b');
    if (after.join() !== expected.join()) wrong.push(`${k}: ${before} -> ${after}`);
  }
  t.same(wrong, [], 'only b\'s keys moved, each to its runner-up');
  t.ok(moved > 0.2 * all.length && moved < 0.4 * all.length, `b owned ${moved} keys (expected about 2/7)`);

  // Adding a shard: keys move only to the newcomer.
  const withE = [...shards, { name: 'e', weight: 2 }];
  let toE = 0;
  const strayed: string[] = [];
  for (const k of all) {
    const before = rank(k, shards)[0];
    const after = rank(k, withE)[0];
    if (after === 'e') toE++;
    else if (after !== before) strayed.push(`${k}: ${before} -> ${after}`);
  }
  t.same(strayed, [], 'keys move only to the newcomer');
  t.ok(toE > 0.15 * all.length && toE < 0.3 * all.length, `e took ${toE} keys (expected about 2/9)`);
});

t.test('validateShards rejects bad shard sets with INVALID_ARGUMENT', async (t) => {
  const cases: [unknown, RegExp][] = [
    [[], /at least one shard/],
    [[{ name: '', weight: 1 }], /name is empty/],
    [[{ name: 'a', weight: 1 }, { name: 'a', weight: 2 }], /shard a: name is used twice/],
    [[{ name: 'a', weight: 0 }], /shard a: weight 0 is not an integer/],
    [[{ name: 'a', weight: 1.5 }], /weight 1.5/],
    [[{ name: 'a', weight: MAX_WEIGHT + 1 }], /weight 1000001/],
  ];
  for (const [input, message] of cases) {
    try {
      validateShards(input as never);
      t.fail(`accepted ${JSON.stringify(input)}`);
    } catch (err) {
      t.ok(err instanceof ConnectError);
      t.equal((err as ConnectError).code, Code.InvalidArgument);
      t.match((err as ConnectError).message, message);
    }
  }
  t.doesNotThrow(() => validateShards(shards));
});
