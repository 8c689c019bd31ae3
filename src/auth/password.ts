import { randomBytes, scrypt, timingSafeEqual } from 'node:crypto';

/**
 * Password hashes for HTTP basic, as stored in config.json:
 * `scrypt$N$r$p$<salt, base64>$<hash, base64>` (what `npm run hash-secret
 * password` prints). scrypt because a password, unlike a random token, can
 * be guessed: each guess against a leaked config has to pay for N x r x 128
 * bytes of memory and the time to fill them.
 */
export interface ScryptHash {
  readonly N: number;
  readonly r: number;
  readonly p: number;
  readonly salt: Buffer;
  readonly hash: Buffer;
}

/** What hash-secret writes: 16 MiB of memory and ~50 ms per check on a current core. */
export const DEFAULT_SCRYPT = { N: 16384, r: 8, p: 1, saltBytes: 16, keyBytes: 32 } as const;

/**
 * The largest cost accepted from config: N x r x 128 bytes is what one check
 * allocates, and a config typo (N=1048576000) must not take the process down.
 */
const MAX_SCRYPT_MEMORY = 256 * 1024 * 1024;

const FORMAT = /^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$/;

/**
 * Why `s` is not a usable password hash, or undefined when it is. Stricter
 * than the format check in config.ts: N a power of two, a salt of at least 8
 * bytes, a hash of 16 to 64 bytes, a cost within MAX_SCRYPT_MEMORY.
 */
export function scryptHashProblem(s: string): string | undefined {
  const m = FORMAT.exec(s);
  if (m === null) return 'expected "scrypt$N$r$p$salt$hash" (base64 salt and hash)';
  const [N, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (!Number.isSafeInteger(N) || N < 2 || (N & (N - 1)) !== 0) return `N=${m[1]} is not a power of two >= 2`;
  if (!Number.isSafeInteger(r) || r < 1) return `r=${m[2]} must be a positive integer`;
  if (!Number.isSafeInteger(p) || p < 1 || p > 16) return `p=${m[3]} must be between 1 and 16`;
  if (128 * N * r > MAX_SCRYPT_MEMORY) {
    return `N x r x 128 = ${128 * N * r} bytes per check is over the ${MAX_SCRYPT_MEMORY}-byte limit`;
  }
  const salt = Buffer.from(m[4]!, 'base64');
  const hash = Buffer.from(m[5]!, 'base64');
  if (salt.length < 8) return `the salt is ${salt.length} bytes; at least 8 are needed`;
  if (hash.length < 16 || hash.length > 64) return `the hash is ${hash.length} bytes; 16 to 64 are accepted`;
  return undefined;
}

/** Parses a password hash string; throws an Error saying what is wrong with it. */
export function parseScryptHash(s: string): ScryptHash {
  const problem = scryptHashProblem(s);
  if (problem !== undefined) throw new Error(`password hash: ${problem}`);
  const m = FORMAT.exec(s)!;
  return {
    N: Number(m[1]),
    r: Number(m[2]),
    p: Number(m[3]),
    salt: Buffer.from(m[4]!, 'base64'),
    hash: Buffer.from(m[5]!, 'base64'),
  };
}

/** scrypt on libuv's thread pool (never on the event loop). */
export function scryptAsync(password: Uint8Array, salt: Uint8Array, keyBytes: number, N: number, r: number, p: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // node refuses when 128 x N x r exceeds maxmem (32 MiB by default).
    scrypt(password, salt, keyBytes, { N, r, p, maxmem: 2 * 128 * N * r + 1024 * 1024 }, (err, key) => {
      if (err === null) resolve(key);
      else reject(err);
    });
  });
}

/** Whether `password` matches `h`; the final comparison is constant-time. */
export async function verifyPassword(password: Uint8Array, h: ScryptHash): Promise<boolean> {
  const key = await scryptAsync(password, h.salt, h.hash.length, h.N, h.r, h.p);
  return timingSafeEqual(key, h.hash);
}

/** A fresh hash string for `password` with DEFAULT_SCRYPT's cost and a random salt. */
export async function hashPassword(password: Uint8Array): Promise<string> {
  const { N, r, p, saltBytes, keyBytes } = DEFAULT_SCRYPT;
  const salt = randomBytes(saltBytes);
  const key = await scryptAsync(password, salt, keyBytes, N, r, p);
  return `scrypt$${N}$${r}$${p}$${salt.toString('base64')}$${key.toString('base64')}`;
}
