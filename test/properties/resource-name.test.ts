// ByteStream resource names, property-based (src/services/resource-name.ts):
// on names built from the words the grammar cares about (blobs,
// compressed-blobs, uploads, compressors, digest functions, hashes and sizes
// of every bad shape, instance prefixes, "..", unicode, control characters,
// overlong parts, missing parts) and on arbitrary strings, both parsers
// either return a well-formed resource or throw a ConnectError
// INVALID_ARGUMENT whose message is bounded and carries no raw control
// character; and a valid name, formatted from its parts, parses back to them.
import { Code, ConnectError } from '@connectrpc/connect';
import fc from 'fast-check';
import t from 'tap';
import { EMPTY_SHA256, isSha256Hex } from '../../src/digest.ts';
import { instanceNameError } from '../../src/services/instance-name.ts';
import type { BlobResource, ResourceCompressor, UploadResource } from '../../src/services/resource-name.ts';
import {
  parseReadResourceName,
  parseWriteResourceName,
  readResourceName,
  writeResourceName,
} from '../../src/services/resource-name.ts';
import { Tally, check, hex64, nastyString } from './property.ts';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

// ---- generators ----

const badHash = fc.oneof(
  hex64.map((h) => h.toUpperCase()),
  hex64.map((h) => h.slice(0, 63)),
  hex64.map((h) => `${h}0`),
  hex64.map((h) => `${h.slice(0, 10)}g${h.slice(11)}`),
  hex64.map((h) => `${h.slice(0, 20)}\u0000${h.slice(21)}`),
  hex64.map((h) => `${h.slice(0, 30)}\u0661${h.slice(31)}`),
  fc.constantFrom('', 'sha256', 'md5', 'blake3', 'SHA256', 'e3b0c442'),
);
const hash = fc.oneof({ weight: 4, arbitrary: hex64 }, { weight: 1, arbitrary: fc.constant(EMPTY_SHA256) }, { weight: 3, arbitrary: badHash });
const size = fc.oneof(
  { weight: 4, arbitrary: fc.bigInt({ min: 1n, max: MAX_SAFE }).map(String) },
  { weight: 2, arbitrary: fc.bigInt({ min: -(1n << 70n), max: 1n << 70n }).map(String) },
  {
    weight: 2,
    arbitrary: fc.constantFrom('0', '-0', '00012', '+5', '1.5', '1e3', '0x10', '0b1', ' 5', '5 ', '\u0663', '\uff15', '', '-1',
      '9007199254740991', '9007199254740992', '18446744073709551616', '5n', 'NaN', 'Infinity'),
  },
  { weight: 1, arbitrary: fc.stringMatching(/^[0-9]{20,400}$/) },
);
const segment = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom('blobs', 'compressed-blobs', 'uploads') },
  { weight: 2, arbitrary: fc.constantFrom('zstd', 'identity', 'gzip', 'deflate', 'sha256', 'md5', 'blake3', 'sha256tree', 'vso') },
  { weight: 3, arbitrary: hash },
  { weight: 3, arbitrary: size },
  { weight: 2, arbitrary: fc.constantFrom('main', 'a', 'ci', '.', '..', '', 'actions', 'Blobs', 'operations') },
  { weight: 1, arbitrary: fc.uuid() },
  { weight: 2, arbitrary: nastyString(8) },
  { weight: 1, arbitrary: fc.integer({ min: 1000, max: 5000 }).map((n) => 'i'.repeat(n)) },
);
/** Names shaped like resource names (mostly near-misses), joined from segments. */
const structured = fc
  .tuple(fc.boolean(), fc.array(segment, { minLength: 0, maxLength: 9 }), fc.boolean())
  .map(([lead, segs, trail]) => `${lead ? '/' : ''}${segs.join('/')}${trail ? '/' : ''}`);
/** A valid name with one part spoiled: the others stay right, so the error is about that part. */
const nearMiss = fc
  .record({
    form: fc.constantFrom('read', 'write'),
    instance: fc.constantFrom('', 'main', 'a/b'),
    compressor: fc.constantFrom('identity', 'zstd') as fc.Arbitrary<ResourceCompressor>,
    hash,
    size,
    uuid: fc.oneof(fc.uuid(), fc.constantFrom('', 'blobs', 'compressed-blobs', 'u/v')),
  })
  .map(({ form, instance, compressor, hash, size, uuid }) => {
    const digestPart = `${compressor === 'identity' ? 'blobs' : `compressed-blobs/${compressor}`}/${hash}/${size}`;
    const upload = form === 'write' ? `uploads/${uuid}/` : '';
    return `${instance === '' ? '' : `${instance}/`}${upload}${digestPart}`;
  });
const anyName = fc.oneof(
  { weight: 5, arbitrary: structured },
  { weight: 4, arbitrary: nearMiss },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 40 }) },
);

// ---- checks ----

function wellFormed(r: BlobResource): boolean {
  return (
    isSha256Hex(r.digest.hash) &&
    Number.isSafeInteger(r.digest.size) &&
    r.digest.size >= 0 &&
    (r.digest.size > 0 || r.digest.hash === EMPTY_SHA256) &&
    instanceNameError(r.instanceName) === undefined &&
    (r.compressor === 'identity' || r.compressor === 'zstd')
  );
}

/** Runs a parser; "ok" or "INVALID_ARGUMENT", or throws (failing the property) for anything else. */
function outcome(parse: () => BlobResource, check: (r: BlobResource) => boolean): string {
  let r: BlobResource;
  try {
    r = parse();
  } catch (err) {
    if (!(err instanceof ConnectError)) throw new Error(`threw a non-ConnectError: ${String(err)}`);
    if (err.code !== Code.InvalidArgument) throw new Error(`threw ${Code[err.code]}: ${err.rawMessage}`);
    const m = err.rawMessage;
    if (m.length > 1200) throw new Error(`message of ${m.length} characters`);
    if (/[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u.test(m)) throw new Error(`raw non-printable character in message: ${JSON.stringify(m)}`);
    return 'INVALID_ARGUMENT';
  }
  if (!check(r)) throw new Error(`parsed to a malformed resource: ${JSON.stringify(r)}`);
  return 'ok';
}

t.test('read and write parsers: a well-formed resource or INVALID_ARGUMENT, never anything else', async (t) => {
  const read = new Tally();
  const write = new Tally();
  check(
    t,
    'parseReadResourceName / parseWriteResourceName',
    fc.property(anyName, (name) => {
      read.add(outcome(() => parseReadResourceName(name), wellFormed));
      write.add(
        outcome(
          () => parseWriteResourceName(name),
          (r) => {
            const uuid = (r as UploadResource).uuid;
            return wellFormed(r) && typeof uuid === 'string' && uuid !== '' && !uuid.includes('/');
          },
        ),
      );
      return true;
    }),
    3000,
  );
  t.comment(`resource names (read form): ${read.summary()}`);
  t.comment(`resource names (write form): ${write.summary()}`);
});

// ---- round trip ----

const instanceSegment = fc
  .oneof({ weight: 5, arbitrary: fc.stringMatching(/^[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]{0,9}$/) }, { weight: 1, arbitrary: fc.constantFrom('...', 'Blobs', 'blobs2', 'é', '主', '\u{1f600}', 'sha256', 'zstd') })
  .filter((s) => instanceNameError(s) === undefined);
const validInstance = fc.array(instanceSegment, { maxLength: 4 }).map((s) => s.join('/'));
const validDigest = fc.oneof(
  { weight: 9, arbitrary: fc.record({ hash: hex64, size: fc.oneof(fc.integer({ min: 1, max: 1 << 30 }), fc.constant(Number.MAX_SAFE_INTEGER)) }) },
  { weight: 1, arbitrary: fc.constant({ hash: EMPTY_SHA256, size: 0 }) },
);
const validUuid = fc.oneof(fc.uuid(), fc.stringMatching(/^[A-Za-z0-9._-]{1,20}$/).filter((u) => u !== 'blobs' && u !== 'compressed-blobs'));
const metadata = fc.array(fc.stringMatching(/^[^/]{0,12}$/), { maxLength: 3 });

t.test('a valid name formatted from its parts parses back to them, whatever metadata follows the size', async (t) => {
  const tally = new Tally();
  check(
    t,
    'round trip',
    fc.property(
      validInstance,
      validUuid,
      validDigest,
      fc.constantFrom('identity', 'zstd') as fc.Arbitrary<ResourceCompressor>,
      fc.boolean(),
      metadata,
      (instanceName, uuid, digest, compressor, spelledFunction, meta) => {
        const tail = meta.length === 0 ? '' : `/${meta.join('/')}`;
        let read = readResourceName(instanceName, digest, compressor) + tail;
        let write = writeResourceName(instanceName, uuid, digest, compressor) + tail;
        if (spelledFunction) {
          // ".../blobs/sha256/{hash}/{size}" names the digest function explicitly.
          const inst = instanceName === '' ? '' : `${instanceName}/`;
          const kind = compressor === 'identity' ? 'blobs' : `compressed-blobs/${compressor}`;
          read = `${inst}${kind}/sha256/${digest.hash}/${digest.size}${tail}`;
          write = `${inst}uploads/${uuid}/${kind}/sha256/${digest.hash}/${digest.size}${tail}`;
        }
        const r = parseReadResourceName(read);
        const w = parseWriteResourceName(write);
        tally.add(`${compressor}${spelledFunction ? '+sha256' : ''}`);
        return (
          r.instanceName === instanceName &&
          r.compressor === compressor &&
          r.digest.hash === digest.hash &&
          r.digest.size === digest.size &&
          w.instanceName === instanceName &&
          w.uuid === uuid &&
          w.compressor === compressor &&
          w.digest.hash === digest.hash &&
          w.digest.size === digest.size
        );
      },
    ),
    2000,
  );
  t.comment(`resource names (round trip): ${tally.summary()}`);
});

t.test('error messages quote the name with its control characters escaped', async (t) => {
  const cases: [(name: string) => unknown, string, RegExp][] = [
    [parseReadResourceName, 'a\nb/blobs/x/1', /^resource name "a\\nb\/blobs\/x\/1": instance_name "a\\nb" contains the control character U\+000A/],
    [parseReadResourceName, 'blobs/\u202e/1', /^resource name "blobs\/\\u202e\/1": hash "\\u202e" has length 1/],
    [parseWriteResourceName, 'uploads/u/blobs\u0000/x', /^resource name "uploads\/u\/blobs\\u0000\/x": expected "blobs" or "compressed-blobs" after the upload id, found "blobs\\u0000"$/],
    [parseReadResourceName, `blobs/${'a'.repeat(64)}/1\u0085`, /^resource name "blobs\/a{64}\/1\\u0085": size "1\\u0085" is not a decimal integer$/],
  ];
  for (const [parse, name, want] of cases) {
    try {
      parse(name);
      t.fail(`${JSON.stringify(name)} accepted`);
    } catch (err) {
      t.match((err as ConnectError).rawMessage, want, JSON.stringify(name));
    }
  }
});
