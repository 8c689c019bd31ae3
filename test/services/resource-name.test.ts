import t from 'tap';
import { Code, ConnectError } from '@connectrpc/connect';
import { EMPTY_SHA256 } from '../../src/digest.ts';
import {
  parseReadResourceName,
  parseWriteResourceName,
  readResourceName,
  writeResourceName,
} from '../../src/services/resource-name.ts';

const H = 'ab'.repeat(32);

function invalidArgument(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (!(err instanceof ConnectError)) throw err;
    if (err.code !== Code.InvalidArgument) throw new Error(`expected INVALID_ARGUMENT, got ${Code[err.code]}: ${err.message}`);
    return err.rawMessage;
  }
  throw new Error('expected an error, got none');
}

t.test('read resource names that parse', async (t) => {
  const cases: [string, { instanceName: string; compressor: string; size: number }][] = [
    [`blobs/${H}/5`, { instanceName: '', compressor: 'identity', size: 5 }],
    [`main/blobs/${H}/5`, { instanceName: 'main', compressor: 'identity', size: 5 }],
    [`a/b/c/blobs/${H}/123`, { instanceName: 'a/b/c', compressor: 'identity', size: 123 }],
    [`blobs/${H}/5/some/file.txt`, { instanceName: '', compressor: 'identity', size: 5 }],
    [`ci/compressed-blobs/zstd/${H}/9`, { instanceName: 'ci', compressor: 'zstd', size: 9 }],
    [`compressed-blobs/identity/${H}/9`, { instanceName: '', compressor: 'identity', size: 9 }],
    [`blobs/sha256/${H}/7`, { instanceName: '', compressor: 'identity', size: 7 }],
    [`compressed-blobs/zstd/sha256/${H}/7`, { instanceName: '', compressor: 'zstd', size: 7 }],
    [`blobs/${EMPTY_SHA256}/0`, { instanceName: '', compressor: 'identity', size: 0 }],
  ];
  for (const [name, want] of cases) {
    const r = parseReadResourceName(name);
    t.same(
      { instanceName: r.instanceName, compressor: r.compressor, size: r.digest.size, hash: r.digest.hash },
      { ...want, hash: want.size === 0 ? EMPTY_SHA256 : H },
      name,
    );
  }
});

t.test('write resource names that parse', async (t) => {
  const cases: [string, { instanceName: string; uuid: string; compressor: string }][] = [
    [`uploads/u-1/blobs/${H}/5`, { instanceName: '', uuid: 'u-1', compressor: 'identity' }],
    [`x/y/uploads/0c1e/blobs/${H}/5/foo/bar/baz.cc`, { instanceName: 'x/y', uuid: '0c1e', compressor: 'identity' }],
    [`uploads/u/compressed-blobs/zstd/${H}/5`, { instanceName: '', uuid: 'u', compressor: 'zstd' }],
    [`i/uploads/u/compressed-blobs/zstd/${H}/5/meta`, { instanceName: 'i', uuid: 'u', compressor: 'zstd' }],
    [`uploads/u/blobs/sha256/${H}/5`, { instanceName: '', uuid: 'u', compressor: 'identity' }],
  ];
  for (const [name, want] of cases) {
    const r = parseWriteResourceName(name);
    t.same({ instanceName: r.instanceName, uuid: r.uuid, compressor: r.compressor }, want, name);
    t.same(r.digest, { hash: H, size: 5 }, `${name}: digest`);
  }
});

t.test('malformed read resource names are INVALID_ARGUMENT with a precise message', async (t) => {
  const cases: [string, RegExp][] = [
    ['', /resource_name is empty/],
    ['foo/bar', /no "blobs" or "compressed-blobs" segment/],
    ['blobs', /missing hash after "blobs\/"/],
    ['blobs/', /missing hash after "blobs\/"/],
    [`blobs/${H}`, /missing size after the hash/],
    [`blobs/${H}/`, /missing size after the hash/],
    [`blobs/${'AB'.repeat(32)}/5`, /is not lowercase hexadecimal/],
    [`blobs/${'zz'.repeat(32)}/5`, /is not lowercase hexadecimal/],
    [`blobs/abc/5`, /has length 3, SHA-256 needs 64/],
    [`blobs/${H}ab/5`, /has length 66/],
    [`blobs/${H}/-1`, /size -1 is negative/],
    [`blobs/${H}/1x`, /size "1x" is not a decimal integer/],
    [`blobs/${H}/0x10`, /size "0x10" is not a decimal integer/],
    [`blobs/${H}/99999999999999999999`, /is too large/],
    [`blobs/${H}/0`, /size 0 but hash is not the SHA-256 of the empty blob/],
    [`../blobs/${H}/5`, /instance_name "\.\." contains the segment "\.\."/],
    [`a/../b/blobs/${H}/5`, /contains the segment "\.\."/],
    [`./blobs/${H}/5`, /contains the segment "\."/],
    [`/blobs/${H}/5`, /starts with "\/"/],
    [`a//b/blobs/${H}/5`, /empty segment/],
    [`uploads/u/blobs/${H}/5`, /reserved segment "uploads"/],
    ['compressed-blobs', /missing compressor after "compressed-blobs\/"/],
    [`compressed-blobs/${H}/5`, /compressor "ab.*" is not supported; supported: identity, zstd/],
    [`compressed-blobs/deflate/${H}/5`, /compressor "deflate" is not supported; supported: identity, zstd/],
    [`compressed-blobs/ZSTD/${H}/5`, /compressor "ZSTD" is not supported/],
    ['compressed-blobs/zstd', /missing hash after "compressed-blobs\/zstd\/"/],
    [`blobs/blake3/${H}/5`, /digest function "blake3" is not supported; this server only supports sha256/],
    [`blobs/sha1/${H}/5`, /digest function "sha1" is not supported/],
    [`compressed-blobs/zstd/sha256tree/${H}/5`, /digest function "sha256tree" is not supported/],
    ['blobs/sha256', /missing hash after "blobs\/sha256\/"/],
  ];
  for (const [name, want] of cases) {
    const msg = invalidArgument(() => parseReadResourceName(name));
    t.match(msg, want, JSON.stringify(name));
  }
});

t.test('malformed write resource names are INVALID_ARGUMENT with a precise message', async (t) => {
  const cases: [string, RegExp][] = [
    ['', /resource_name is empty/],
    [`blobs/${H}/5`, /no "uploads" segment/],
    ['uploads', /missing upload id after "uploads\/"/],
    ['uploads/', /missing upload id after "uploads\/"/],
    [`uploads/blobs/${H}/5`, /missing upload id between "uploads\/" and "blobs\/"/],
    ['uploads/u', /expected "blobs" or "compressed-blobs" after the upload id, found nothing/],
    [`uploads/u/${H}/5`, /expected "blobs" or "compressed-blobs" after the upload id, found "ab/],
    [`uploads/u/blobs/${H}`, /missing size after the hash/],
    [`uploads/u/blobs/${H}/five`, /size "five" is not a decimal integer/],
    [`uploads/u/blobs/${H}/-3`, /size -3 is negative/],
    [`uploads/u/compressed-blobs/brotli/${H}/5`, /compressor "brotli" is not supported/],
    [`uploads/u/blobs/blake3/${H}/5`, /digest function "blake3" is not supported/],
    [`a/../uploads/u/blobs/${H}/5`, /contains the segment "\.\."/],
    [`a/blobs/uploads/u/blobs/${H}/5`, /reserved segment "blobs"/],
    [`/uploads/u/blobs/${H}/5`, /starts with "\/"/],
  ];
  for (const [name, want] of cases) {
    const msg = invalidArgument(() => parseWriteResourceName(name));
    t.match(msg, want, JSON.stringify(name));
  }
});

t.test('formatting round-trips through parsing', async (t) => {
  const d = { hash: H, size: 42 };
  t.equal(readResourceName('', d), `blobs/${H}/42`);
  t.equal(readResourceName('a/b', d, 'zstd'), `a/b/compressed-blobs/zstd/${H}/42`);
  t.equal(writeResourceName('', 'u', d), `uploads/u/blobs/${H}/42`);
  const w = parseWriteResourceName(writeResourceName('a/b', 'u', d, 'zstd'));
  t.same(w, { instanceName: 'a/b', uuid: 'u', digest: d, compressor: 'zstd' });
});
