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

/**
 * Throws INVALID_ARGUMENT unless `name` is a well-formed REAPI instance name:
 * "" (no instance), or "/"-separated segments none of which is empty
 * (leading, trailing or double slash), "." or "..", or a reserved word.
 *
 * Instance names are accepted but not used to partition data: every instance
 * shares one CAS and one action cache. That is safe for the CAS (content
 * addressed) and is what a single-tenant cache wants for the AC; a deployment
 * that needs isolated instances runs separate nodes.
 */
export function validateInstanceName(name: string): void {
  if (name === '') return;
  const segments = name.split('/');
  for (let i = 0; i < segments.length; i++) {
    const s = segments[i]!;
    let problem: string | undefined;
    if (s === '') {
      problem =
        i === 0
          ? 'starts with "/"'
          : i === segments.length - 1
            ? 'ends with "/"'
            : 'contains an empty segment ("//")';
    } else if (s === '.' || s === '..') {
      problem = `contains the segment "${s}"`;
    } else if (RESERVED_INSTANCE_SEGMENTS.has(s)) {
      problem = `contains the reserved segment "${s}"`;
    }
    if (problem !== undefined) {
      throw new ConnectError(`instance_name "${clip(name)}" ${problem}`, Code.InvalidArgument);
    }
  }
}

function clip(s: string): string {
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}
