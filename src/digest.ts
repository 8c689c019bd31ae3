import { createHash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';
import { quote } from './services/instance-name.ts';

/**
 * A content digest as the stores see it: lowercase hex SHA-256 and a size in
 * bytes. Services convert the protobuf Digest (int64 size as bigint) into this
 * shape once, at the edge of the process, after validating it.
 */
export interface Digest {
  readonly hash: string;
  readonly size: number;
}

export const SHA256_HEX_LENGTH = 64;

// 1 for the UTF-16 code units of lowercase hex digits. A table lookup per
// character is ~3x faster than /^[0-9a-f]{64}$/.test() per hash, which
// matters at 10,000 digests per FindMissingBlobs.
const LOWER_HEX = new Uint8Array(65536);
for (const c of '0123456789abcdef') LOWER_HEX[c.charCodeAt(0)] = 1;

/** True if `hash` is 64 lowercase hex characters: a well-formed SHA-256 hash. */
export function isSha256Hex(hash: string): boolean {
  if (hash.length !== SHA256_HEX_LENGTH) return false;
  const t = LOWER_HEX;
  for (let i = 0; i < SHA256_HEX_LENGTH; i += 4) {
    if ((t[hash.charCodeAt(i)]! & t[hash.charCodeAt(i + 1)]! & t[hash.charCodeAt(i + 2)]! & t[hash.charCodeAt(i + 3)]!) === 0) {
      return false;
    }
  }
  return true;
}

const MAX_SAFE_SIZE = BigInt(Number.MAX_SAFE_INTEGER);

export const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';
export const EMPTY_DIGEST: Digest = Object.freeze({ hash: EMPTY_SHA256, size: 0 });

export function isEmptyDigest(d: Digest): boolean {
  return d.size === 0 && d.hash === EMPTY_SHA256;
}

/** A stable map key for a digest. */
export function digestKey(d: Digest): string {
  return `${d.hash}/${d.size}`;
}

export function digestString(d: Digest): string {
  return `${d.hash}-${d.size}`;
}

/**
 * Validates a hash and size taken off the wire. `what` names the field in the
 * error so the client learns exactly which digest was rejected.
 */
export function parseDigest(hash: string, size: bigint | number | string, what = 'digest'): Digest {
  if (typeof hash !== 'string') {
    throw new ConnectError(`${what}: hash is not a string`, Code.InvalidArgument);
  }
  if (hash.length === 0) {
    throw new ConnectError(`${what}: hash is empty`, Code.InvalidArgument);
  }
  if (hash.length !== SHA256_HEX_LENGTH) {
    throw new ConnectError(
      `${what}: hash ${quote(truncate(hash))} has length ${hash.length}, SHA-256 needs ${SHA256_HEX_LENGTH} hex characters`,
      Code.InvalidArgument,
    );
  }
  if (!isSha256Hex(hash)) {
    throw new ConnectError(`${what}: hash ${quote(truncate(hash))} is not lowercase hexadecimal`, Code.InvalidArgument);
  }
  let n: bigint;
  try {
    // Decimal only: BigInt() alone also takes "" (as 0), " 5 ", "0x10" and "0b1".
    if (typeof size === 'string' ? !/^-?[0-9]+$/.test(size) : typeof size !== 'bigint' && typeof size !== 'number') {
      throw new TypeError('not a decimal integer');
    }
    n = BigInt(size);
  } catch {
    throw new ConnectError(`${what}: size ${quote(truncate(String(size)))} is not an integer`, Code.InvalidArgument);
  }
  if (n < 0n) {
    throw new ConnectError(`${what}: size ${truncate(String(n))} is negative`, Code.InvalidArgument);
  }
  if (n > MAX_SAFE_SIZE) {
    throw new ConnectError(`${what}: size ${truncate(String(n))} is too large`, Code.InvalidArgument);
  }
  const d = { hash, size: Number(n) };
  if (d.size === 0 && hash !== EMPTY_SHA256) {
    throw new ConnectError(`${what}: size 0 but hash is not the SHA-256 of the empty blob`, Code.InvalidArgument);
  }
  return d;
}

/**
 * The hot-path form of fromProtoDigest for requests carrying many digests:
 * returns the digest if it is valid, else undefined and allocates nothing;
 * the caller then calls fromProtoDigest with the field's name for the precise
 * error. Accepts exactly what parseDigest accepts.
 */
export function validProtoDigest(d: { hash: string; sizeBytes: bigint } | undefined): Digest | undefined {
  if (d === undefined) return undefined;
  const { hash, sizeBytes } = d;
  if (typeof hash !== 'string' || typeof sizeBytes !== 'bigint' || !isSha256Hex(hash)) return undefined;
  if (sizeBytes < 0n || sizeBytes > MAX_SAFE_SIZE) return undefined;
  const size = Number(sizeBytes);
  if (size === 0 && hash !== EMPTY_SHA256) return undefined;
  return { hash, size };
}

/** Validates a protobuf Digest message; a missing digest is an error. */
export function fromProtoDigest(d: { hash: string; sizeBytes: bigint } | undefined, what = 'digest'): Digest {
  if (d === undefined) {
    throw new ConnectError(`${what}: missing`, Code.InvalidArgument);
  }
  return parseDigest(d.hash, d.sizeBytes, what);
}

export function toProtoDigest(d: Digest): { hash: string; sizeBytes: bigint } {
  return { hash: d.hash, sizeBytes: BigInt(d.size) };
}

export function sha256Hex(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

export function digestOf(data: Uint8Array): Digest {
  return { hash: sha256Hex(data), size: data.byteLength };
}

function truncate(s: string): string {
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}
