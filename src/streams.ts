import { createHash } from 'node:crypto';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from './digest.ts';
import { digestString } from './digest.ts';

/**
 * Reads a whole stream into one buffer, or returns undefined (and stops
 * reading) once it exceeds `maxBytes`.
 */
export async function readAtMost(chunks: AsyncIterable<Uint8Array>, maxBytes: number): Promise<Uint8Array | undefined> {
  const parts: Uint8Array[] = [];
  let total = 0;
  for await (const c of chunks) {
    total += c.byteLength;
    if (total > maxBytes) return undefined;
    parts.push(c);
  }
  if (parts.length === 1) return parts[0]!;
  return Buffer.concat(parts, total);
}

/**
 * Reads a whole stream into one buffer; RESOURCE_EXHAUSTED beyond
 * `maxBytes`. Only for blobs known to be small.
 */
export async function collect(chunks: AsyncIterable<Uint8Array>, maxBytes = Number.MAX_SAFE_INTEGER): Promise<Uint8Array> {
  const data = await readAtMost(chunks, maxBytes);
  if (data === undefined) throw new ConnectError(`stream exceeds ${maxBytes} bytes`, Code.ResourceExhausted);
  return data;
}

export async function* once(data: Uint8Array): AsyncIterable<Uint8Array> {
  if (data.byteLength > 0) yield data;
}

/**
 * Passes chunks through while hashing them; throws INVALID_ARGUMENT if the
 * stream is longer or shorter than the digest says, or hashes differently.
 * The check on the final chunk happens before the iterator completes, so a
 * consumer that commits only on completion never commits bad data.
 */
export async function* verifying(digest: Digest, chunks: AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
  const h = createHash('sha256');
  let n = 0;
  for await (const c of chunks) {
    n += c.byteLength;
    if (n > digest.size) {
      throw new ConnectError(
        `blob ${digestString(digest)}: received more than ${digest.size} bytes`,
        Code.InvalidArgument,
      );
    }
    h.update(c);
    yield c;
  }
  if (n !== digest.size) {
    throw new ConnectError(
      `blob ${digestString(digest)}: received ${n} bytes, digest says ${digest.size}`,
      Code.InvalidArgument,
    );
  }
  const got = h.digest('hex');
  if (got !== digest.hash) {
    throw new ConnectError(
      `blob ${digestString(digest)}: content hashes to ${got}, not to the digest's hash`,
      Code.InvalidArgument,
    );
  }
}

/** Applies offset/limit to a blob's size; throws OUT_OF_RANGE like ByteStream Read. */
export function resolveRange(size: number, offset = 0, limit = 0): { start: number; end: number } {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new ConnectError(`read offset ${offset} is negative`, Code.OutOfRange);
  }
  if (!Number.isSafeInteger(limit) || limit < 0) {
    throw new ConnectError(`read limit ${limit} is negative`, Code.OutOfRange);
  }
  if (offset > size) {
    throw new ConnectError(`read offset ${offset} is past the end of a ${size}-byte blob`, Code.OutOfRange);
  }
  const end = limit === 0 ? size : Math.min(size, offset + limit);
  return { start: offset, end };
}
