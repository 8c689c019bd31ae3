// Digest parsing, property-based (src/digest.ts): parseDigest on hashes of
// every bad shape (case, length, non-hex, unicode) and sizes of every bad
// shape (negative, beyond 2^53, beyond int64, non-integer, non-decimal
// strings, NaN, Infinity, -0), and the protobuf Digest forms the services
// use (validProtoDigest, the hot path, and fromProtoDigest, the precise
// error) with int64 sizes as bigints: each agrees with a reference model
// written from the rules, and every refusal is a ConnectError
// INVALID_ARGUMENT, never a crash.
import { Code, ConnectError } from '@connectrpc/connect';
import fc from 'fast-check';
import t from 'tap';
import type { Digest } from '../../src/digest.ts';
import { EMPTY_SHA256, fromProtoDigest, parseDigest, validProtoDigest } from '../../src/digest.ts';
import { Tally, check, hex64, nastyString } from './property.ts';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;

// ---- the reference model ----

/** The digest a (hash, size) names, or undefined if it names none, from the rules alone. */
function model(hash: unknown, size: unknown): Digest | undefined {
  if (typeof hash !== 'string' || !/^[0-9a-f]{64}$/.test(hash)) return undefined;
  let n: bigint;
  if (typeof size === 'bigint') n = size;
  else if (typeof size === 'number' && Number.isInteger(size)) n = BigInt(size);
  else if (typeof size === 'string' && /^-?[0-9]+$/.test(size)) n = BigInt(size);
  else return undefined;
  if (n < 0n || n > MAX_SAFE) return undefined;
  if (n === 0n && hash !== EMPTY_SHA256) return undefined;
  return { hash, size: Number(n) };
}

// ---- generators ----

const hash = fc.oneof(
  { weight: 4, arbitrary: hex64 },
  { weight: 2, arbitrary: fc.constant(EMPTY_SHA256) },
  { weight: 1, arbitrary: hex64.map((h) => h.toUpperCase()) },
  { weight: 1, arbitrary: fc.tuple(hex64, fc.nat(63)).map(([h, i]) => h.slice(0, i) + h[i]!.toUpperCase() + h.slice(i + 1)) },
  { weight: 1, arbitrary: fc.tuple(hex64, fc.integer({ min: 0, max: 70 })).map(([h, n]) => (h + h).slice(0, n)) },
  { weight: 1, arbitrary: fc.tuple(hex64, fc.nat(63), nastyString(1)).map(([h, i, c]) => h.slice(0, i) + c + h.slice(i + 1)) },
  { weight: 1, arbitrary: nastyString(70) },
);
const bigSize = fc.oneof(
  fc.bigInt({ min: 0n, max: MAX_SAFE }),
  fc.bigInt({ min: INT64_MIN, max: INT64_MAX }),
  fc.constantFrom(0n, 1n, -1n, MAX_SAFE, MAX_SAFE + 1n, INT64_MIN, INT64_MAX, 1n << 64n),
);
const size = fc.oneof(
  { weight: 3, arbitrary: bigSize },
  { weight: 2, arbitrary: fc.oneof(fc.integer(), fc.double(), fc.constantFrom(0, -0, 1.5, NaN, Infinity, -Infinity, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e21)) },
  { weight: 2, arbitrary: bigSize.map(String) },
  {
    weight: 2,
    arbitrary: fc.constantFrom('', ' 5', '5 ', '+5', '-0', '00012', '0x10', '0b1', '0o7', '1e3', '1.0', '5n', 'NaN', '\u0663', '１', '1_000', '-', '--1'),
  },
  { weight: 1, arbitrary: fc.stringMatching(/^-?[0-9]{1,30}$/) },
);

function outcome(run: () => Digest, want: Digest | undefined): string {
  let got: Digest;
  try {
    got = run();
  } catch (err) {
    if (!(err instanceof ConnectError)) throw new Error(`threw a non-ConnectError: ${String(err)}`);
    if (err.code !== Code.InvalidArgument) throw new Error(`threw ${Code[err.code]}: ${err.rawMessage}`);
    if (want !== undefined) throw new Error(`refused a valid digest: ${err.rawMessage}`);
    if (err.rawMessage.length > 400) throw new Error(`message of ${err.rawMessage.length} characters`);
    if (/[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u.test(err.rawMessage)) throw new Error(`raw non-printable character in ${JSON.stringify(err.rawMessage)}`);
    return 'INVALID_ARGUMENT';
  }
  if (want === undefined) throw new Error(`accepted ${JSON.stringify(got)}, the model refuses it`);
  if (got.hash !== want.hash || got.size !== want.size) throw new Error(`parsed to ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  return 'ok';
}

t.test('parseDigest agrees with the model; refusals are INVALID_ARGUMENT', async (t) => {
  const tally = new Tally();
  check(
    t,
    'parseDigest',
    fc.property(hash, size, (h, s) => {
      tally.add(outcome(() => parseDigest(h, s as bigint | number | string, 'digest'), model(h, s)));
      return true;
    }),
    4000,
  );
  t.comment(`digests (parseDigest): ${tally.summary()}`);
});

t.test('proto Digests: validProtoDigest and fromProtoDigest agree with the model and each other', async (t) => {
  const tally = new Tally();
  const proto = fc.oneof(
    { weight: 8, arbitrary: fc.record({ hash, sizeBytes: bigSize }) },
    { weight: 1, arbitrary: fc.constant(undefined) },
  );
  check(
    t,
    'validProtoDigest / fromProtoDigest',
    fc.property(proto, (pd) => {
      const want = pd === undefined ? undefined : model(pd.hash, pd.sizeBytes);
      const fast = validProtoDigest(pd);
      if ((fast === undefined) !== (want === undefined)) throw new Error(`validProtoDigest says ${JSON.stringify(fast)}, the model ${JSON.stringify(want)}`);
      tally.add(outcome(() => fromProtoDigest(pd, 'blob_digests[0]'), want));
      return fast === undefined || (fast.hash === want!.hash && fast.size === want!.size);
    }),
    3000,
  );
  t.comment(`digests (proto Digest): ${tally.summary()}`);
});

t.test('proto Digests with fields of the wrong JavaScript type are refused, not crashed on', async (t) => {
  const tally = new Tally();
  const junk = fc.oneof(fc.constantFrom(undefined, null, true, {}, [], Symbol('s')), fc.double(), fc.string(), fc.bigInt());
  check(
    t,
    'fromProtoDigest with junk fields',
    fc.property(fc.oneof(hash, junk), fc.oneof(bigSize, junk), (h, s) => {
      const pd = { hash: h, sizeBytes: s } as unknown as { hash: string; sizeBytes: bigint };
      tally.add(outcome(() => fromProtoDigest(pd), model(h, s)));
      return true;
    }),
    1500,
  );
  t.comment(`digests (wrong JS types): ${tally.summary()}`);
});

// What the model found in the first version: BigInt() took "" (as 0), " 5 ",
// "0x10", "0b1" and `true` as sizes, and size strings went into messages
// unbounded and unescaped.
t.test('sizes are decimal integers only, and messages stay bounded and escaped', async (t) => {
  const message = (size: unknown) => {
    try {
      parseDigest(EMPTY_SHA256, size as string);
      return 'accepted';
    } catch (err) {
      return (err as ConnectError).rawMessage;
    }
  };
  t.equal(message(''), 'digest: size "" is not an integer');
  t.equal(message(' 0 '), 'digest: size " 0 " is not an integer');
  t.equal(message('0x0'), 'digest: size "0x0" is not an integer');
  t.equal(message('0b0'), 'digest: size "0b0" is not an integer');
  t.equal(message(false), 'digest: size "false" is not an integer');
  t.equal(message('0\u202e'), 'digest: size "0\\u202e" is not an integer');
  t.equal(message('-0'), 'accepted', '"-0" is zero');
  t.equal(message('1'.repeat(500)).length < 200, true, 'a 500-digit size is clipped in the message');
  t.equal(message(null), 'digest: size "null" is not an integer');
  t.match(
    (() => {
      try {
        return parseDigest(undefined as unknown as string, 1n), 'accepted';
      } catch (err) {
        return (err as ConnectError).rawMessage;
      }
    })(),
    'digest: hash is not a string',
  );
});
