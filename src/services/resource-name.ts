import { Code, ConnectError } from '@connectrpc/connect';
import type { Digest } from '../digest.ts';
import { parseDigest, SHA256_HEX_LENGTH } from '../digest.ts';
import { withPrefix } from '../errors.ts';
import { quote, validateInstanceName } from './instance-name.ts';

/**
 * Encodings a ByteStream resource name may ask for. `identity` under
 * `compressed-blobs/` is accepted as a synonym for plain `blobs/`.
 */
export type ResourceCompressor = 'identity' | 'zstd';

export const RESOURCE_COMPRESSORS: readonly ResourceCompressor[] = ['identity', 'zstd'];

/** A blob named by a ByteStream Read resource name. */
export interface BlobResource {
  /** '' when the resource name has no instance part. */
  readonly instanceName: string;
  /** The digest of the uncompressed blob. */
  readonly digest: Digest;
  /** How the bytes travel on the wire. */
  readonly compressor: ResourceCompressor;
}

/** A blob named by a ByteStream Write resource name. */
export interface UploadResource extends BlobResource {
  /** The client's upload id; opaque to us, never empty. */
  readonly uuid: string;
}

const READ_FORMS =
  '"{instance_name}/blobs/{hash}/{size}" or "{instance_name}/compressed-blobs/{compressor}/{hash}/{size}"';
const WRITE_FORMS =
  '"{instance_name}/uploads/{uuid}/blobs/{hash}/{size}[/...]" or ' +
  '"{instance_name}/uploads/{uuid}/compressed-blobs/{compressor}/{hash}/{size}[/...]"';

/**
 * Lowercase names of REAPI DigestFunction values. The spec puts one of these
 * between `blobs/` and the hash for digest functions whose hash length is
 * ambiguous; we recognise them only to reject all but sha256 clearly.
 */
const DIGEST_FUNCTIONS = new Set([
  'sha256',
  'sha1',
  'md5',
  'vso',
  'sha384',
  'sha512',
  'murmur3',
  'sha256tree',
  'blake3',
  'gitsha1',
]);

/**
 * Parses `{instance_name}/blobs/{hash}/{size}[/...]` or
 * `{instance_name}/compressed-blobs/{compressor}/{hash}/{size}[/...]`.
 * The instance name is everything before the first `blobs` or
 * `compressed-blobs` segment; anything after the size is ignored.
 * Throws INVALID_ARGUMENT naming the exact problem.
 */
export function parseReadResourceName(name: string): BlobResource {
  const segments = splitName(name);
  const k = segments.findIndex((s) => s === 'blobs' || s === 'compressed-blobs');
  if (k < 0) {
    throw invalid(name, `no "blobs" or "compressed-blobs" segment; expected ${READ_FORMS}`);
  }
  const instanceName = parseInstance(name, segments, k);
  const { digest, compressor } = parseBlobPart(name, segments, k);
  return { instanceName, digest, compressor };
}

/**
 * Parses `{instance_name}/uploads/{uuid}/blobs/{hash}/{size}[/...]` or
 * `{instance_name}/uploads/{uuid}/compressed-blobs/{compressor}/{hash}/{size}[/...]`.
 * The instance name is everything before the first `uploads` segment;
 * trailing metadata after the size is ignored. Throws INVALID_ARGUMENT.
 */
export function parseWriteResourceName(name: string): UploadResource {
  const segments = splitName(name);
  const k = segments.indexOf('uploads');
  if (k < 0) {
    throw invalid(name, `no "uploads" segment; expected ${WRITE_FORMS}`);
  }
  const instanceName = parseInstance(name, segments, k);
  const uuid = segments[k + 1];
  if (uuid === undefined || uuid === '') {
    throw invalid(name, `missing upload id after "uploads/"; expected ${WRITE_FORMS}`);
  }
  if (uuid === 'blobs' || uuid === 'compressed-blobs') {
    throw invalid(name, `missing upload id between "uploads/" and "${uuid}/"`);
  }
  const kind = segments[k + 2];
  if (kind !== 'blobs' && kind !== 'compressed-blobs') {
    const found = kind === undefined ? 'nothing' : quote(clip(kind));
    throw invalid(name, `expected "blobs" or "compressed-blobs" after the upload id, found ${found}`);
  }
  const { digest, compressor } = parseBlobPart(name, segments, k + 2);
  return { instanceName, uuid, digest, compressor };
}

/** Formats a read resource name; the inverse of parseReadResourceName. */
export function readResourceName(instanceName: string, digest: Digest, compressor: ResourceCompressor = 'identity'): string {
  const tail = compressor === 'identity' ? 'blobs' : `compressed-blobs/${compressor}`;
  return `${instanceName === '' ? '' : `${instanceName}/`}${tail}/${digest.hash}/${digest.size}`;
}

/** Formats a write resource name; the inverse of parseWriteResourceName. */
export function writeResourceName(
  instanceName: string,
  uuid: string,
  digest: Digest,
  compressor: ResourceCompressor = 'identity',
): string {
  return readResourceName(`${instanceName === '' ? '' : `${instanceName}/`}uploads/${uuid}`, digest, compressor);
}

function splitName(name: string): string[] {
  if (name === '') {
    throw new ConnectError('resource_name is empty', Code.InvalidArgument);
  }
  return name.split('/');
}

function parseInstance(name: string, segments: readonly string[], k: number): string {
  if (k === 0) return '';
  const instanceName = segments.slice(0, k).join('/');
  // The instance-name validator cannot see this case: "/blobs/..." yields an
  // empty instance name, which is valid, from a name that is not.
  if (instanceName === '') {
    throw invalid(name, 'starts with "/"; a resource name without an instance name has no leading slash');
  }
  try {
    validateInstanceName(instanceName);
  } catch (err) {
    throw withPrefix(`resource name ${quote(clip(name))}`, err);
  }
  return instanceName;
}

/** Parses `blobs/...` or `compressed-blobs/...` starting at segments[k]. */
function parseBlobPart(
  name: string,
  segments: readonly string[],
  k: number,
): { digest: Digest; compressor: ResourceCompressor } {
  let i = k + 1;
  let compressor: ResourceCompressor = 'identity';
  if (segments[k] === 'compressed-blobs') {
    const c = segments[i++];
    if (c === undefined || c === '') {
      throw invalid(name, 'missing compressor after "compressed-blobs/"');
    }
    if (!(RESOURCE_COMPRESSORS as readonly string[]).includes(c)) {
      throw invalid(name, `compressor ${quote(clip(c))} is not supported; supported: ${RESOURCE_COMPRESSORS.join(', ')}`);
    }
    compressor = c as ResourceCompressor;
  }
  const maybeFunction = segments[i];
  if (maybeFunction !== undefined && maybeFunction.length !== SHA256_HEX_LENGTH && DIGEST_FUNCTIONS.has(maybeFunction)) {
    if (maybeFunction !== 'sha256') {
      throw invalid(name, `digest function "${maybeFunction}" is not supported; this server only supports sha256`);
    }
    i++;
  }
  const hash = segments[i];
  const size = segments[i + 1];
  if (hash === undefined || hash === '') {
    throw invalid(name, `missing hash after "${segments.slice(k, i).join('/')}/"`);
  }
  if (size === undefined || size === '') {
    throw invalid(name, 'missing size after the hash');
  }
  if (!/^-?[0-9]+$/.test(size)) {
    throw invalid(name, `size ${quote(clip(size))} is not a decimal integer`);
  }
  const digest = parseDigest(hash, size, `resource name ${quote(clip(name))}`);
  return { digest, compressor };
}

function invalid(name: string, problem: string): ConnectError {
  return new ConnectError(`resource name ${quote(clip(name))}: ${problem}`, Code.InvalidArgument);
}

/** Clips a part of a name for a message; quote() then escapes whatever in it is not printable. */
function clip(s: string): string {
  return s.length > 200 ? `${s.slice(0, 197)}...` : s;
}
