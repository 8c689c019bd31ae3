// Generators of REAPI request parts of every bad shape, shared by the
// surface tests (gRPC and Connect/JSON): instance names, digests (as the
// protobuf Digest), resource names, offsets.
import fc from 'fast-check';
import { EMPTY_SHA256 } from '../../src/digest.ts';
import { hex64, nastyString } from './property.ts';

export const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
export const INT64_MIN = -(1n << 63n);
export const INT64_MAX = (1n << 63n) - 1n;

/** Mostly "" or a plain name; sometimes one that breaks a rule. */
export const instanceName: fc.Arbitrary<string> = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom('', 'main', 'ci/linux') },
  {
    weight: 2,
    arbitrary: fc.constantFrom('/main', 'main/', 'a//b', '..', 'a/../b', 'blobs', 'x/uploads', 'a\u0000b', 'a\nb', 'a\u202eb', 'a\ud800', 'x'.repeat(1025)),
  },
  { weight: 1, arbitrary: nastyString(10) },
);

/** A hash: well-formed, the empty blob's, or wrong in case, length or alphabet. */
export const hash: fc.Arbitrary<string> = fc.oneof(
  { weight: 5, arbitrary: hex64 },
  { weight: 1, arbitrary: fc.constant(EMPTY_SHA256) },
  { weight: 1, arbitrary: hex64.map((h) => h.toUpperCase()) },
  { weight: 1, arbitrary: fc.tuple(hex64, fc.integer({ min: 0, max: 70 })).map(([h, n]) => (h + h).slice(0, n)) },
  { weight: 1, arbitrary: fc.tuple(hex64, fc.nat(63), nastyString(1)).map(([h, i, c]) => h.slice(0, i) + c + h.slice(i + 1)) },
);

/** An int64 size: ordinary, or negative, beyond 2^53, or at the int64 edges. */
export const sizeBytes: fc.Arbitrary<bigint> = fc.oneof(
  { weight: 4, arbitrary: fc.bigInt({ min: 1n, max: 1n << 20n }) },
  { weight: 1, arbitrary: fc.bigInt({ min: INT64_MIN, max: INT64_MAX }) },
  { weight: 1, arbitrary: fc.constantFrom(0n, -1n, MAX_SAFE, MAX_SAFE + 1n, INT64_MIN, INT64_MAX) },
);

/** The init shape of a protobuf Digest. */
export const protoDigest: fc.Arbitrary<{ hash: string; sizeBytes: bigint }> = fc.record({ hash, sizeBytes });

/** A size as text in a resource name. */
const sizeText = fc.oneof(
  { weight: 3, arbitrary: sizeBytes.map(String) },
  { weight: 1, arbitrary: fc.constantFrom('', '-0', '+5', '1.5', '0x10', ' 5', '\u0663', '18446744073709551616', 'x') },
);

/** Resource names: read and write forms, right or wrong in one part, or junk. */
export const resourceName: fc.Arbitrary<string> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .record({
        instance: instanceName,
        upload: fc.option(fc.oneof(fc.uuid(), fc.constantFrom('', 'blobs', 'u/v')), { freq: 2 }),
        compressor: fc.constantFrom('blobs', 'compressed-blobs/zstd', 'compressed-blobs/identity', 'compressed-blobs/gzip', 'compressed-blobs', 'blobs/sha256', 'blobs/md5'),
        hash,
        size: sizeText,
        tail: fc.constantFrom('', '/', '/meta/data', '/..'),
      })
      .map(({ instance, upload, compressor, hash, size, tail }) =>
        `${instance === '' ? '' : `${instance}/`}${upload === null ? '' : `uploads/${upload}/`}${compressor}/${hash}/${size}${tail}`,
      ),
  },
  { weight: 1, arbitrary: fc.constantFrom('', '/', 'blobs', 'uploads', 'uploads/u', 'a/b/c', '/blobs/x/1') },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 30 }) },
  { weight: 1, arbitrary: fc.integer({ min: 1000, max: 20_000 }).map((n) => `${'i'.repeat(n)}/blobs/${EMPTY_SHA256}/0`) },
);

/** An int64 offset or limit. */
export const offset: fc.Arbitrary<bigint> = fc.oneof(
  { weight: 3, arbitrary: fc.constant(0n) },
  { weight: 2, arbitrary: fc.bigInt({ min: 0n, max: 1n << 12n }) },
  { weight: 1, arbitrary: fc.bigInt({ min: INT64_MIN, max: INT64_MAX }) },
  { weight: 1, arbitrary: fc.constantFrom(-1n, INT64_MIN, INT64_MAX, MAX_SAFE + 1n) },
);
