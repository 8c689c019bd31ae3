import { hash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';

/** A placement target: a unique name and a positive integer weight. */
export interface WeightedShard {
  readonly name: string;
  readonly weight: number;
}

/** Largest accepted weight; keeps every product in `beats` below 2^53. */
export const MAX_WEIGHT = 1_000_000;

// Fixed-point fraction bits of the logarithm. 24 bits keep each squaring in
// log2Fraction below 2^50 and every score below 2^31, so plain Numbers hold
// them exactly: no rounding happens anywhere, on any machine.
const FRACTION_BITS = 24;
const ONE = 2 ** FRACTION_BITS;
const TWO = 2 * ONE;
// Score of a (vanishingly unlikely) all-zero hash: worse than any real score.
const ZERO_HASH_SCORE = 65 * ONE;

/**
 * Weighted rendezvous (highest random weight) placement: the full, stable
 * ranking of `shards` for `key`, best first. The owner of a key is the first
 * ranked shard that can take traffic; the next ones are its stand-ins.
 *
 * Each shard draws u = H(name, key) / 2^64 from a 64-bit hash (the first 8
 * bytes of SHA-256) and scores -log2(u) / weight; the lowest score wins. That
 * is the classic weighted HRW score -ln(u)/w (the base of the log does not
 * change the order), under which a shard wins a key with probability
 * weight / sum(weights). Since a shard's score depends only on its own name,
 * removing a shard moves only the keys it won, each to its runner-up, and
 * adding it back moves exactly those keys back.
 *
 * Integer-only so that every edge ranks identically: -log2(u) is computed in
 * 24-bit fixed point by the bit-by-bit squaring method (no Math.log, whose
 * last bit may differ between libms), and scores are compared by
 * cross-multiplication (L_a * w_b < L_b * w_a), never divided. Trade-offs:
 * weights must be integers in 1..MAX_WEIGHT, and two shards whose scores agree
 * to 24 fraction bits tie (about 2^-25 per pair and key); ties go to the
 * lexicographically smaller name, which is deterministic too. The simpler
 * "tickets" scheme (max over weight-many hashes) is exact but costs
 * sum(weights) hashes per key; this costs one hash per shard whatever the
 * weights. Cost: about a microsecond per shard per key, dominated by SHA-256.
 */
export function rank(key: string, shards: readonly WeightedShard[]): string[] {
  const scored = shards.map((s) => ({ name: s.name, weight: s.weight, score: score(key, s.name) }));
  scored.sort((a, b) => {
    // a before b when a.score / a.weight < b.score / b.weight.
    const lhs = a.score * b.weight;
    const rhs = b.score * a.weight;
    if (lhs !== rhs) return lhs < rhs ? -1 : 1;
    return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
  });
  return scored.map((s) => s.name);
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
 * -log2(H(name, key) / 2^64) in 24-bit fixed point: an integer in
 * (0, 64 * 2^24]. Lower is better. Exported for tests.
 */
export function score(key: string, name: string): number {
  // The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
  const digest = hash('sha256', `${name}\0${key}`, 'buffer') as Buffer;
  const h = digest.readBigUInt64BE(0);
  if (h === 0n) return ZERO_HASH_SCORE;
  // h = 2^p * m / 2^24 with m in [2^24, 2^25): log2(h) = p + log2(m / 2^24).
  const p = h.toString(2).length - 1;
  const m = p >= FRACTION_BITS ? Number(h >> BigInt(p - FRACTION_BITS)) : Number(h << BigInt(FRACTION_BITS - p));
  // -log2(u) = 64 - log2(h); always > 0 since log2(h) < p + 1 <= 64.
  return (64 - p) * ONE - log2Fraction(m);
}

/**
 * floor-ish(2^24 * log2(m / 2^24)) for m in [2^24, 2^25), by repeated
 * squaring: squaring x in [1, 2) doubles its log, and whether the square
 * reaches 2 is the next bit of the logarithm. Truncating each square makes the
 * result at most a few units low in the last place; it is the same few units
 * on every machine, which is what matters. Exported for tests.
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
