import { createHash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';

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
const HEX64 = /^[0-9a-f]{64}$/;

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
  if (typeof hash !== 'string' || hash.length === 0) {
    throw new ConnectError(`${what}: hash is empty`, Code.InvalidArgument);
  }
  if (hash.length !== SHA256_HEX_LENGTH) {
    throw new ConnectError(
      `${what}: hash "${truncate(hash)}" has length ${hash.length}, SHA-256 needs ${SHA256_HEX_LENGTH} hex characters`,
      Code.InvalidArgument,
    );
  }
  if (!HEX64.test(hash)) {
    throw new ConnectError(`${what}: hash "${truncate(hash)}" is not lowercase hexadecimal`, Code.InvalidArgument);
  }
  let n: bigint;
  try {
    n = BigInt(size);
  } catch {
    throw new ConnectError(`${what}: size "${String(size)}" is not an integer`, Code.InvalidArgument);
  }
  if (n < 0n) {
    throw new ConnectError(`${what}: size ${n} is negative`, Code.InvalidArgument);
  }
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new ConnectError(`${what}: size ${n} is too large`, Code.InvalidArgument);
  }
  const d = { hash, size: Number(n) };
  if (d.size === 0 && hash !== EMPTY_SHA256) {
    throw new ConnectError(`${what}: size 0 but hash is not the SHA-256 of the empty blob`, Code.InvalidArgument);
  }
  return d;
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
