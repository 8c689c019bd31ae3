import { getSystemErrorMessage } from 'node:util';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from './digest.ts';
import { digestString } from './digest.ts';

/**
 * Codes that mean "the backend could not answer", as opposed to an answer
 * ("not found", "bad request"). Only these count against a shard's circuit
 * breaker and only these make a router try another backend.
 */
const INFRASTRUCTURE_CODES = new Set<Code>([
  Code.Unavailable,
  Code.Internal,
  Code.Unknown,
  Code.DeadlineExceeded,
]);

const NETWORK_ERROR_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ERR_STREAM_DESTROYED',
  'ERR_HTTP2_STREAM_CANCEL',
  'ERR_HTTP2_SESSION_ERROR',
  'ERR_HTTP2_GOAWAY_SESSION',
  'ERR_HTTP2_STREAM_ERROR',
  'ERR_HTTP2_INVALID_SESSION',
  'ERR_HTTP2_ERROR',
]);

/** True for failures that should open a circuit breaker or trigger a retry elsewhere. */
export function isInfrastructureError(err: unknown): boolean {
  if (err instanceof ConnectError) {
    if (INFRASTRUCTURE_CODES.has(err.code)) return true;
    // connect-node wraps socket errors; look at the causes too.
    return hasNetworkCause(err.cause);
  }
  return hasNetworkCause(err);
}

/** True if a socket or HTTP/2 session error is anywhere in the cause chain. */
export function hasNetworkCause(err: unknown): boolean {
  const seen = new Set<unknown>();
  for (let e: unknown = err; typeof e === 'object' && e !== null && !seen.has(e); e = (e as { cause?: unknown }).cause) {
    seen.add(e);
    if (isNetworkError(e)) return true;
  }
  return false;
}

function isNetworkError(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' && NETWORK_ERROR_CODES.has(code);
}

/**
 * Converts anything thrown into a ConnectError, keeping internals in `cause`.
 * A file system error (ENOSPC, EACCES, ...) becomes storageError()'s generic
 * message: Node's own message names the server's path.
 */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (isNetworkError(err)) {
    return new ConnectError(String((err as Error).message), Code.Unavailable, undefined, undefined, err);
  }
  if (isFileSystemError(err)) return storageError(err);
  if (err instanceof Error && err.name === 'AbortError') {
    return new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, err);
  }
  return ConnectError.from(err, Code.Internal);
}

export function isCode(err: unknown, code: Code): boolean {
  return err instanceof ConnectError && err.code === code;
}

export function notFound(d: Digest, what = 'blob'): ConnectError {
  return new ConnectError(`${what} ${digestString(d)} not found`, Code.NotFound);
}

/**
 * Prefixes the message of an error with the name of the component it passed
 * through ("shard b: ..."), keeping the code. A code changes only on purpose.
 */
export function withPrefix(prefix: string, err: unknown): ConnectError {
  const ce = toConnectError(err);
  return new ConnectError(`${prefix}: ${ce.rawMessage}`, ce.code, ce.metadata, undefined, ce.cause ?? ce);
}

/** Throws the signal's reason as a CANCELED ConnectError if it has fired. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    throw new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, signal.reason);
  }
}

/**
 * True for an error of a file system call: a string errno code with the
 * `syscall` or `path` Node sets on them. Their messages name server paths
 * ("EACCES: permission denied, open '/srv/cas/tmp/...'").
 */
export function isFileSystemError(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; syscall?: unknown; path?: unknown };
  return typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code) && (typeof e.syscall === 'string' || typeof e.path === 'string');
}

/**
 * What a client is told about a failed file system call: "storage error: no
 * space left on device (ENOSPC)", never the path or the syscall, which stay
 * in `cause` for the log. ENOSPC and EDQUOT are RESOURCE_EXHAUSTED (the cache
 * is full, not broken); everything else INTERNAL.
 */
export function storageError(err: unknown, context?: string): ConnectError {
  const e = err as { code?: unknown; errno?: unknown };
  const code = typeof e.code === 'string' ? e.code : 'EIO';
  let description: string;
  try {
    description = typeof e.errno === 'number' ? getSystemErrorMessage(e.errno) : (SYSTEM_ERROR_TEXT[code] ?? code);
  } catch {
    description = SYSTEM_ERROR_TEXT[code] ?? code;
  }
  const grpc = code === 'ENOSPC' || code === 'EDQUOT' ? Code.ResourceExhausted : Code.Internal;
  const what = context === undefined ? '' : `${context}: `;
  return new ConnectError(`storage error: ${what}${description} (${code})`, grpc, undefined, undefined, err);
}

/** Descriptions for errors built without an errno number (tests, some wrappers). */
const SYSTEM_ERROR_TEXT: Readonly<Record<string, string>> = {
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOENT: 'no such file or directory',
  ENOTDIR: 'not a directory',
  EISDIR: 'illegal operation on a directory',
  EROFS: 'read-only file system',
  EIO: 'i/o error',
  EMFILE: 'too many open files',
};

/**
 * How long a request stream that ended where it should not (inside a
 * message, or a Write without finish_write) waits for a reset before it is
 * judged a client error. Node's http2 client cancels a stream by ending it
 * (END_STREAM) and then resetting it (RST_STREAM CANCEL) a moment later, so
 * a cancellation by a Node client (the edge's own calls to its shards among
 * them) first looks like a truncated request; on loopback the reset follows
 * within a millisecond.
 */
export const RESET_GRACE_MS = 50;

/** Resolves true as soon as `signal` aborts, or false after `ms`. */
export function abortedWithin(signal: AbortSignal, ms: number): Promise<boolean> {
  if (signal.aborted) return Promise.resolve(true);
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve(true);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve(signal.aborted);
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
