// gRPC status over HTTP/2 headers, for the ByteStream fast path: the
// grpc-status and grpc-message trailers, grpc-timeout, and the HTTP status a
// non-gRPC answer maps to (per the gRPC-over-HTTP/2 protocol description).
import type { IncomingHttpHeaders } from 'node:http2';
import { Code, ConnectError } from '@connectrpc/connect';

/**
 * grpc-message is percent-encoded: bytes outside printable ASCII, and '%'
 * itself, become %XX of their UTF-8 bytes.
 */
export function encodeGrpcMessage(message: string): string {
  let plain = true;
  for (let i = 0; i < message.length; i++) {
    const c = message.charCodeAt(i);
    if (c < 0x20 || c > 0x7e || c === 0x25) {
      plain = false;
      break;
    }
  }
  if (plain) return message;
  let out = '';
  for (const byte of Buffer.from(message, 'utf8')) {
    out += byte < 0x20 || byte > 0x7e || byte === 0x25 ? `%${byte.toString(16).toUpperCase().padStart(2, '0')}` : String.fromCharCode(byte);
  }
  return out;
}

export function decodeGrpcMessage(value: string): string {
  if (!value.includes('%')) return value;
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

const TIMEOUT_UNITS: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };

/**
 * grpc-timeout ("100m", "30S": at most 8 digits and a unit) in milliseconds;
 * undefined when absent. A malformed value fails with INVALID_ARGUMENT.
 */
export function parseGrpcTimeout(value: string | string[] | undefined): number | undefined {
  if (value === undefined) return undefined;
  const v = Array.isArray(value) ? value[0] ?? '' : value;
  const m = /^(\d{1,8})([HMSmun])$/.exec(v);
  if (m === null) throw new ConnectError(`grpc-timeout header "${v}" is malformed`, Code.InvalidArgument);
  return Number(m[1]) * TIMEOUT_UNITS[m[2]!]!;
}

/** The gRPC code for a response that is not gRPC (an HTTP error from a proxy or a non-gRPC server). */
export function codeFromHttpStatus(status: number): Code {
  switch (status) {
    case 400:
      return Code.Internal;
    case 401:
      return Code.Unauthenticated;
    case 403:
      return Code.PermissionDenied;
    case 404:
      return Code.Unimplemented;
    case 429:
    case 502:
    case 503:
    case 504:
      return Code.Unavailable;
    default:
      return Code.Unknown;
  }
}

/** A ConnectError from grpc-status / grpc-message values; undefined for status 0. */
export function errorFromStatus(status: string | string[] | undefined, message: string | string[] | undefined): ConnectError | undefined {
  const s = Array.isArray(status) ? status[0] : status;
  const code = Number(s);
  if (s === undefined || !Number.isInteger(code) || code < 0 || code > 16) {
    return new ConnectError(`invalid grpc-status "${String(s)}"`, Code.Internal);
  }
  if (code === 0) return undefined;
  const m = Array.isArray(message) ? message[0] : message;
  return new ConnectError(decodeGrpcMessage(m ?? ''), code as Code);
}

/**
 * An HTTP/2 request's headers as WHATWG Headers, as Connect's interceptors
 * and handlers take them: pseudo-headers (":path", ...) left out, repeated
 * headers appended in order.
 */
export function headersFromHttp2(h: IncomingHttpHeaders): Headers {
  const out = new Headers();
  for (const name in h) {
    if (name.charCodeAt(0) === 58) continue; // ':' pseudo-headers
    const v = h[name];
    if (typeof v === 'string') out.append(name, v);
    else if (Array.isArray(v)) for (const item of v) out.append(name, item);
  }
  return out;
}
