import { hash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';

/** A placement target: a unique name and a positive integer weight. */
export interface WeightedShard {
  readonly name: string;
  readonly weight: number;
}

/** Largest accepted weight; keeps every product in the comparison below 2^53. */
export const MAX_WEIGHT = 1_000_000;

// Fixed-point fraction bits of the logarithm. Scores stay below 2^31 and
// score * weight below 2^51, so plain Numbers hold every value exactly: no
// rounding happens anywhere, on any machine.
const FRACTION_BITS = 24;
const ONE = 2 ** FRACTION_BITS;
const TWO = 2 * ONE;
// Score of a (vanishingly unlikely) all-zero mixed value: worse than any real score.
const ZERO_SCORE = 65 * ONE;
// The mantissa's first TABLE_BITS bits index LOG_TABLE; the next
// INTERPOLATION_BITS interpolate linearly between two entries.
const TABLE_BITS = 10;
const INTERPOLATION_BITS = 16;

/**
 * Weighted rendezvous (highest random weight) placement: the full, stable
 * ranking of `shards` for `key`, best first. The owner of a key is the first
 * ranked shard that can take traffic; the next ones are its stand-ins.
 * Shorthand for `new Placement(shards).rank(key)` (shard seeds are cached by
 * name, so repeated calls stay cheap); ShardingStore keeps a Placement.
 */
export function rank(key: string, shards: readonly WeightedShard[]): string[] {
  const seeds = shards.map((s) => cachedSeed(s.name));
  return orderBy(keyHi(key), LOW[KEY]!, shards, seeds).map((i) => shards[i]!.name);
}

/**
 * A shard set prepared for placement. The algorithm, exactly, so that any
 * implementation can match it bit for bit (all arithmetic on unsigned 64-bit
 * integers, wrapping):
 *
 * 1. Shard seed S: the first 8 bytes of SHA-256(UTF-8 name), big-endian.
 * 2. Key value K: if the key's first 16 characters are all in [0-9a-f] (a
 *    digest hash), their value as a hex number; otherwise (shorter keys too)
 *    the first 8 bytes of SHA-256(UTF-8 key), big-endian.
 * 3. x = mix(K xor S), where mix is the splitmix64 finalizer:
 *    z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
 *    z *= 0x94d049bb133111eb; z ^= z >> 31.
 * 4. Score, -log2(x / 2^64) in units of 2^-24: 65 * 2^24 if x = 0; otherwise
 *    with p = floor(log2 x), f = the 26 bits of x below its leading one (zero
 *    padded when p < 26), i = f >> 16 and r = f & 0xffff:
 *    64 * 2^24 - (p * 2^24 + T[i] + floor((T[i+1] - T[i]) * r / 2^16)),
 *    where T[j] = log2Fraction(2^24 + j * 2^14) for j < 1024 and
 *    T[1024] = 2^24 (log2Fraction below is itself integer-only).
 * 5. Order: a before b when score_a * weight_b < score_b * weight_a; equal
 *    products go to the lexicographically smaller name (by UTF-16 code units).
 *
 * Why it is right: scoring -log2(u) / weight for a uniform u is the classic
 * weighted HRW score -ln(u)/w (the base of the log does not change the
 * order), under which a shard wins a key with probability
 * weight / sum(weights). A shard's score depends only on its own seed, so
 * removing a shard moves only the keys it won, each to its runner-up, and
 * adding it back moves exactly those keys back. The interpolated table is
 * within about 2^-21 of the true logarithm, so two shards tie only when their
 * scores agree that closely (rare, and resolved deterministically by name).
 *
 * Integer-only so that every edge ranks identically (no Math.log, whose last
 * bit may differ between libms), and cheap: one parse of the key, then per
 * shard a xor, two 64-bit multiplications done in 16-bit limbs, a count of
 * leading zeros and a table lookup; about 50 ns per key for three shards,
 * against a few µs when each shard hashed the key with SHA-256. Weights must
 * be integers in 1..MAX_WEIGHT.
 */
export class Placement {
  readonly #shards: readonly WeightedShard[];
  readonly #seeds: readonly Seed[];

  constructor(shards: readonly WeightedShard[]) {
    this.#shards = shards.slice();
    this.#seeds = this.#shards.map((s) => seedOf(s.name));
  }

  /** Indices into the shards given to the constructor, best first. */
  order(key: string): number[] {
    return orderBy(keyHi(key), LOW[KEY]!, this.#shards, this.#seeds);
  }

  /** Shard names, best first. */
  rank(key: string): string[] {
    return this.order(key).map((i) => this.#shards[i]!.name);
  }
}

/**
 * Checks a shard set: at least one shard, unique non-empty names, integer
 * weights in 1..MAX_WEIGHT. Throws INVALID_ARGUMENT naming the culprit.
 */
export function validateShards(shards: readonly WeightedShard[]): void {
  if (shards.length === 0) {
    throw new ConnectError('sharding needs at least one shard', Code.InvalidArgument);
  }
  const seen = new Set<string>();
  for (const s of shards) {
    if (typeof s.name !== 'string' || s.name.length === 0) {
      throw new ConnectError('shard name is empty', Code.InvalidArgument);
    }
    if (seen.has(s.name)) {
      throw new ConnectError(`shard ${s.name}: name is used twice`, Code.InvalidArgument);
    }
    seen.add(s.name);
    if (!Number.isSafeInteger(s.weight) || s.weight < 1 || s.weight > MAX_WEIGHT) {
      throw new ConnectError(
        `shard ${s.name}: weight ${s.weight} is not an integer in 1..${MAX_WEIGHT}`,
        Code.InvalidArgument,
      );
    }
  }
}

/**
 * -log2(x / 2^64) in 24-bit fixed point for the mixed value x of (key, name)
 * (steps 1-4 of Placement): an integer in (0, 65 * 2^24]. Lower is better.
 * Exported for tests.
 */
export function score(key: string, name: string): number {
  const s = seedOf(name);
  return scoreOf(keyHi(key), LOW[KEY]!, s);
}

/**
 * floor-ish(2^24 * log2(m / 2^24)) for m in [2^24, 2^25), by repeated
 * squaring: squaring x in [1, 2) doubles its log, and whether the square
 * reaches 2 is the next bit of the logarithm. Truncating each square makes the
 * result at most a few units low in the last place; it is the same few units
 * on every machine, which is what matters. Builds the lookup table once;
 * exported for tests.
 */
export function log2Fraction(m: number): number {
  let x = m;
  let result = 0;
  for (let bit = ONE / 2; bit >= 1; bit /= 2) {
    // x < 2^25, so x * x < 2^50 is exact, and so is the division by 2^24.
    x = Math.floor((x * x) / ONE);
    if (x >= TWO) {
      x = Math.floor(x / 2);
      result += bit;
    }
  }
  return result;
}

// --- internals ---------------------------------------------------------------

/** A 64-bit seed as two unsigned 32-bit halves. */
interface Seed {
  readonly hi: number;
  readonly lo: number;
}

const LOG_TABLE = (() => {
  const size = 1 << TABLE_BITS;
  const table = new Int32Array(size + 1);
  for (let j = 0; j < size; j++) table[j] = log2Fraction(ONE + j * (ONE / size));
  table[size] = ONE;
  return table;
})();

function seedOf(name: string): Seed {
  const digest = hash('sha256', name, 'buffer') as Buffer;
  return { hi: digest.readUInt32BE(0), lo: digest.readUInt32BE(4) };
}

const SEED_CACHE_MAX = 4096;
const seedCache = new Map<string, Seed>();

function cachedSeed(name: string): Seed {
  let s = seedCache.get(name);
  if (s === undefined) {
    if (seedCache.size >= SEED_CACHE_MAX) seedCache.clear();
    s = seedOf(name);
    seedCache.set(name, s);
  }
  return s;
}

// The helpers below return the high half of a 64-bit value and leave the low
// half in a slot here, read right after the call: the hot path allocates
// nothing (a typed array slot, unlike a module variable, stores a uint32
// without boxing it).
const LOW = new Uint32Array(3);
const KEY = 0;
const MIX = 1;
const MUL = 2;

/** Step 2: K of a key; returns its high 32 bits, sets LOW[KEY] to the low 32. */
function keyHi(key: string): number {
  if (key.length >= 16) {
    const hi = hex8(key, 0);
    const lo = hi < 0 ? -1 : hex8(key, 8);
    if (lo >= 0) {
      LOW[KEY] = lo;
      return hi;
    }
  }
  const digest = hash('sha256', key, 'buffer') as Buffer;
  LOW[KEY] = digest.readUInt32BE(4);
  return digest.readUInt32BE(0);
}

/** The value of the 8 lowercase hex digits at `from`, or -1 if they are not. */
function hex8(key: string, from: number): number {
  let v = 0;
  for (let i = from; i < from + 8; i++) {
    const c = key.charCodeAt(i);
    if (c >= 48 && c <= 57) v = v * 16 + (c - 48);
    else if (c >= 97 && c <= 102) v = v * 16 + (c - 87);
    else return -1;
  }
  return v;
}

/** Step 3: the splitmix64 finalizer on (hi, lo); returns hi, sets LOW[MIX]. */
function mix(hi: number, lo: number): number {
  // z ^= z >> 30
  lo = (lo ^ ((lo >>> 30) | (hi << 2))) >>> 0;
  hi = (hi ^ (hi >>> 30)) >>> 0;
  hi = mulHi(hi, lo, 0xbf58476d, 0x1ce4e5b9);
  lo = LOW[MUL]!;
  // z ^= z >> 27
  lo = (lo ^ ((lo >>> 27) | (hi << 5))) >>> 0;
  hi = (hi ^ (hi >>> 27)) >>> 0;
  hi = mulHi(hi, lo, 0x94d049bb, 0x133111eb);
  lo = LOW[MUL]!;
  // z ^= z >> 31
  LOW[MIX] = (lo ^ ((lo >>> 31) | (hi << 1))) >>> 0;
  return (hi ^ (hi >>> 31)) >>> 0;
}

/**
 * (ah:al) * (bh:bl) mod 2^64 on unsigned 32-bit halves; returns the high
 * half, sets LOW[MUL]. al * bl is formed exactly from 16-bit limbs (every
 * partial sum stays below 2^35); the cross terms only matter mod 2^32, which
 * Math.imul gives.
 */
function mulHi(ah: number, al: number, bh: number, bl: number): number {
  const a0 = al & 0xffff;
  const a1 = al >>> 16;
  const b0 = bl & 0xffff;
  const b1 = bl >>> 16;
  const mid = a1 * b0 + a0 * b1; // < 2^33
  const midLo = mid % 0x10000;
  const low = a0 * b0 + midLo * 0x10000; // < 2^33
  LOW[MUL] = low;
  const carry = Math.floor(low / 0x1_0000_0000) + (mid - midLo) / 0x10000;
  return (a1 * b1 + carry + Math.imul(ah, bl) + Math.imul(al, bh)) >>> 0;
}

/** Step 4: the score of shard seed `s` for the key (kh:kl). */
function scoreOf(kh: number, kl: number, s: Seed): number {
  const hi = mix((kh ^ s.hi) >>> 0, (kl ^ s.lo) >>> 0);
  const lo = LOW[MIX]!;
  // w: x shifted so that its leading one is bit 31; p = floor(log2 x).
  let w: number;
  let p: number;
  if (hi !== 0) {
    const z = Math.clz32(hi);
    w = z === 0 ? hi : ((hi << z) | (lo >>> (32 - z))) >>> 0;
    p = 63 - z;
  } else if (lo !== 0) {
    const z = Math.clz32(lo);
    w = (lo << z) >>> 0;
    p = 31 - z;
  } else {
    return ZERO_SCORE;
  }
  // The 26 bits below the leading one: table index, then interpolation.
  const i = (w >>> (31 - TABLE_BITS)) & ((1 << TABLE_BITS) - 1);
  const r = (w >>> (31 - TABLE_BITS - INTERPOLATION_BITS)) & ((1 << INTERPOLATION_BITS) - 1);
  const t0 = LOG_TABLE[i]!;
  const frac = t0 + Math.floor(((LOG_TABLE[i + 1]! - t0) * r) / (1 << INTERPOLATION_BITS));
  return (64 - p) * ONE - frac;
}

/** Step 5: indices of `shards` best first, for the key (kh:kl). */
function orderBy(kh: number, kl: number, shards: readonly WeightedShard[], seeds: readonly Seed[]): number[] {
  const n = shards.length;
  const scores = new Array<number>(n);
  const order = new Array<number>(n);
  // Insertion sort: shard sets are small, and this allocates nothing more.
  for (let j = 0; j < n; j++) {
    const sc = scoreOf(kh, kl, seeds[j]!);
    scores[j] = sc;
    let k = j;
    while (k > 0 && before(sc, shards[j]!, scores[order[k - 1]!]!, shards[order[k - 1]!]!)) {
      order[k] = order[k - 1]!;
      k--;
    }
    order[k] = j;
  }
  return order;
}

/** True when a shard scoring `sa` ranks before one scoring `sb`. */
function before(sa: number, a: WeightedShard, sb: number, b: WeightedShard): boolean {
  const lhs = sa * b.weight;
  const rhs = sb * a.weight;
  if (lhs !== rhs) return lhs < rhs;
  return a.name < b.name;
}
