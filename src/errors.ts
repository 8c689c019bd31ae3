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

/** Converts anything thrown into a ConnectError, keeping internals in `cause`. */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (isNetworkError(err)) {
    return new ConnectError(String((err as Error).message), Code.Unavailable, undefined, undefined, err);
  }
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
