import { Code, ConnectError } from '@connectrpc/connect';
import type { InstancesConfig } from '../config.ts';

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

/** Not printable in an instance name: see instanceNameError. */
const NON_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u;

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
  // C0 and C1 controls, DEL, the Unicode line/paragraph separators; invisible
  // format characters (bidi overrides, zero-width ones, BOM: two names that
  // print alike would differ); lone surrogates (not Unicode: config.json can
  // spell one as "\ud800", but UTF-8 cannot carry it, so a shard would see
  // U+FFFD and alias another name).
  const bad = NON_PRINTABLE.exec(name);
  if (bad !== null) {
    const c = bad[0];
    const what = /\p{Cf}/u.test(c) ? 'invisible format character' : /\p{Cs}/u.test(c) ? 'lone surrogate' : 'control character';
    return `contains the ${what} U+${c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')} at offset ${bad.index}`;
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

/**
 * The action-cache namespace of a request under `instanceName`: its alias
 * if `instances.aliases` names one, else the instance name itself; "" for
 * every name when isolation is off. The namespace travels with each AC call
 * (CallOptions.namespace), so an entry written under one namespace is
 * NOT_FOUND under every other, on this node and, through the remote store's
 * instance name, on every storage node behind it. The CAS is not
 * partitioned: a blob is named by its content, so sharing it lets no
 * instance change what another reads (it can only learn, through
 * FindMissing or a read, whether a blob whose digest it knows exists).
 */
export function acNamespace(instances: InstancesConfig, instanceName: string): string {
  if (!instances.isolateActionCache) return '';
  return instances.aliases.get(instanceName) ?? instanceName;
}

/** JSON-quotes `s` with every non-printable character escaped, so a message never carries one raw. */
export function quote(s: string): string {
  return JSON.stringify(s).replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) =>
    c.split('').map((u) => `\\u${u.charCodeAt(0).toString(16).padStart(4, '0')}`).join(''),
  );
}

function clip(s: string): string {
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}
