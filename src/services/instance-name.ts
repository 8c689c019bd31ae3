import { Code, ConnectError } from '@connectrpc/connect';

/**
 * Words that may not be a segment of an instance name: they mark where the
 * instance name ends in ByteStream resource names
 * (`{instance}/uploads/{uuid}/blobs/...`, `{instance}/compressed-blobs/...`)
 * and in the REAPI's HTTP paths.
 */
export const RESERVED_INSTANCE_SEGMENTS: ReadonlySet<string> = new Set([
  'blobs',
  'uploads',
  'actions',
  'actionResults',
  'operations',
  'capabilities',
  'compressed-blobs',
]);

/** Longest instance name accepted, in UTF-16 code units. */
export const MAX_INSTANCE_NAME_LENGTH = 1024;

/**
 * Why `name` is not a well-formed REAPI instance name, or undefined if it
 * is: "" (no instance), or "/"-separated segments none of which is empty
 * (leading, trailing or double slash), "." or "..", or a reserved word, made
 * of printable characters only (no control characters: they end up in
 * logs, file names and HTTP headers), at most MAX_INSTANCE_NAME_LENGTH long.
 */
export function instanceNameError(name: string): string | undefined {
  if (name === '') return undefined;
  if (name.length > MAX_INSTANCE_NAME_LENGTH) return `is longer than ${MAX_INSTANCE_NAME_LENGTH} characters`;
  // C0 and C1 controls, DEL, and the Unicode line/paragraph separators.
  const bad = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.exec(name);
  if (bad !== null) {
    return `contains the control character U+${bad[0].charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')} at offset ${bad.index}`;
  }
  const segments = name.split('/');
  for (let i = 0; i < segments.length; i++) {
    const s = segments[i]!;
    if (s === '') {
      return i === 0 ? 'starts with "/"' : i === segments.length - 1 ? 'ends with "/"' : 'contains an empty segment ("//")';
    }
    if (s === '.' || s === '..') return `contains the segment "${s}"`;
    if (RESERVED_INSTANCE_SEGMENTS.has(s)) return `contains the reserved segment "${s}"`;
  }
  return undefined;
}

/** Throws INVALID_ARGUMENT unless `name` is a well-formed instance name (see instanceNameError). */
export function validateInstanceName(name: string): void {
  const problem = instanceNameError(name);
  if (problem !== undefined) {
    throw new ConnectError(`instance_name ${quote(clip(name))} ${problem}`, Code.InvalidArgument);
  }
}

/** JSON-quotes `s` with every control character escaped, so a message never carries one raw. */
export function quote(s: string): string {
  return JSON.stringify(s).replace(/[\u007f-\u009f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

function clip(s: string): string {
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}
