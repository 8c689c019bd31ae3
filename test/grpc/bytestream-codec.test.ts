// The hand-written google.bytestream codecs (src/grpc/bytestream-codec.ts)
// against protobuf-es on the generated schemas: the same bytes out, the same
// values in, over many random messages, and INVALID_ARGUMENT naming the
// message type for malformed input.
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import type { DescMessage } from '@bufbuild/protobuf';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import type { Test } from 'tap';
import {
  ReadRequestSchema,
  ReadResponseSchema,
  WriteRequestSchema,
  WriteResponseSchema,
} from '../../gen/google/bytestream/bytestream_pb.ts';
import {
  ReadResponseData,
  decodeReadRequest,
  decodeReadResponse,
  decodeWriteRequest,
  decodeWriteResponse,
  encodeReadRequest,
  encodeWriteResponse,
  readResponseHeader,
  writeRequestHeader,
} from '../../src/grpc/bytestream-codec.ts';
import { FrameDecoder, PREFIX_BYTES, writePrefix } from '../../src/grpc/framing.ts';

/** mulberry32: a small seeded PRNG, so a failure replays exactly. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

type Rand = () => number;
const int = (r: Rand, n: number) => Math.floor(r() * n);
const pick = <T>(r: Rand, xs: readonly T[]): T => xs[int(r, xs.length)]!;

function randomBytes(r: Rand, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = int(r, 256);
  return out;
}

function randomLength(r: Rand): number {
  const k = r();
  if (k < 0.15) return 0;
  if (k < 0.5) return int(r, 130);
  if (k < 0.8) return pick(r, [127, 128, 129, 16383, 16384, 16385]);
  if (k < 0.98) return int(r, 70_000);
  return 2_097_152 + int(r, 3); // 2^21: a 4-byte length varint
}

const STRING_PARTS = ['', 'a', 'blobs/', 'instance', '/uploads/', 'é', 'ü', '日本', '😀', ' ', '%', '\u0000', '\u007f', '\uffff'];
function randomString(r: Rand): string {
  let s = '';
  const n = int(r, 8);
  for (let i = 0; i < n; i++) s += pick(r, STRING_PARTS);
  if (r() < 0.1) s += 'x'.repeat(200); // a length varint of two bytes
  return s;
}

const INT64_EDGES: readonly bigint[] = [
  0n,
  1n,
  -1n,
  127n,
  128n,
  2n ** 31n,
  2n ** 32n,
  2n ** 49n - 1n,
  2n ** 49n,
  2n ** 53n,
  2n ** 53n + 1n,
  2n ** 56n + 3n,
  2n ** 63n - 1n,
  -(2n ** 63n),
  -(2n ** 53n) - 1n,
  -123456789012345678n,
];
function randomInt64(r: Rand): bigint {
  if (r() < 0.5) return pick(r, INT64_EDGES);
  // Any 64-bit pattern, as two's complement.
  const hi = BigInt(int(r, 2 ** 32));
  const lo = BigInt(int(r, 2 ** 32));
  return BigInt.asIntN(64, (hi << 32n) | lo);
}

/** A field as it goes on the wire; `known` fields are checked against protobuf-es, the rest must be skipped. */
type Field = (w: BinaryWriter) => void;

/** An unknown field of the given wire type (groups nest other unknown fields). */
function unknownField(r: Rand, no: number, wireType: WireType, depth = 0): Field {
  switch (wireType) {
    case WireType.Varint: {
      const v = randomInt64(r);
      return (w) => w.tag(no, WireType.Varint).int64(v);
    }
    case WireType.Bit64: {
      const v = BigInt.asUintN(64, randomInt64(r));
      return (w) => w.tag(no, WireType.Bit64).fixed64(v);
    }
    case WireType.LengthDelimited: {
      const b = randomBytes(r, int(r, 40));
      return (w) => w.tag(no, WireType.LengthDelimited).bytes(b);
    }
    case WireType.Bit32: {
      const v = int(r, 2 ** 32);
      return (w) => w.tag(no, WireType.Bit32).fixed32(v);
    }
    case WireType.StartGroup: {
      const inner: Field[] = [];
      const n = depth < 2 ? int(r, 3) : 0;
      for (let i = 0; i < n; i++) inner.push(unknownField(r, 1 + int(r, 20), pick(r, UNKNOWN_WIRE_TYPES), depth + 1));
      return (w) => {
        w.tag(no, WireType.StartGroup);
        for (const f of inner) f(w);
        w.tag(no, WireType.EndGroup);
      };
    }
    default:
      throw new Error(`no unknown field of wire type ${wireType}`);
  }
}

const UNKNOWN_WIRE_TYPES: readonly WireType[] = [
  WireType.Varint,
  WireType.Bit64,
  WireType.LengthDelimited,
  WireType.Bit32,
  WireType.StartGroup,
];

function randomUnknownFields(r: Rand, known: readonly number[]): Field[] {
  const out: Field[] = [];
  const n = r() < 0.4 ? 0 : 1 + int(r, 4);
  for (let i = 0; i < n; i++) {
    let no: number;
    do {
      no = r() < 0.7 ? 1 + int(r, 20) : 1 + int(r, 2 ** 29 - 1); // up to the largest field number
    } while (known.includes(no));
    out.push(unknownField(r, no, pick(r, UNKNOWN_WIRE_TYPES)));
  }
  return out;
}

function shuffle<T>(r: Rand, xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = int(r, i + 1);
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

/**
 * Random wire bytes of a message: each known field 0-2 times (protobuf's
 * last-one-wins then applies), unknown fields of every wire type, in random
 * order.
 */
function randomMessage(r: Rand, known: Record<number, () => Field>): Uint8Array {
  const fields: Field[] = [];
  for (const make of Object.values(known)) {
    const times = pick(r, [0, 1, 1, 1, 2]);
    for (let i = 0; i < times; i++) fields.push(make());
  }
  fields.push(...randomUnknownFields(r, Object.keys(known).map(Number)));
  const w = new BinaryWriter();
  for (const f of shuffle(r, fields)) f(w);
  return w.finish();
}

function framed(body: Uint8Array): Buffer {
  const out = Buffer.alloc(PREFIX_BYTES + body.byteLength);
  writePrefix(out, 0, body.byteLength);
  out.set(body, PREFIX_BYTES);
  return out;
}

function expectInvalid(t: Test, fn: () => unknown, typeName: string, problem: string | RegExp, what: string): void {
  try {
    fn();
  } catch (err) {
    t.ok(err instanceof ConnectError, `${what}: a ConnectError`);
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], 'InvalidArgument', `${what}: INVALID_ARGUMENT`);
    const prefix = `request is not a valid ${typeName} message: `;
    t.ok(ce.rawMessage.startsWith(prefix), `${what}: names ${typeName} (${ce.rawMessage})`);
    if (typeof problem === 'string') t.equal(ce.rawMessage.slice(prefix.length), problem, `${what}: says what is wrong`);
    else t.match(ce.rawMessage.slice(prefix.length), problem, `${what}: says what is wrong`);
    return;
  }
  t.fail(`${what}: expected INVALID_ARGUMENT, the input was accepted`);
}

function protobufEsRejects<Desc extends DescMessage>(schema: Desc, bytes: Uint8Array): boolean {
  try {
    fromBinary(schema, bytes);
    return false;
  } catch {
    return true;
  }
}

const ROUNDS = 400;

// ---- decoders against protobuf-es ----------------------------------------

t.test('decodeReadRequest agrees with protobuf-es on random messages', async (t) => {
  const r = rng(1);
  const bad: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const bytes = randomMessage(r, {
      1: () => {
        const s = randomString(r);
        return (w) => w.tag(1, WireType.LengthDelimited).string(s);
      },
      2: () => {
        const v = randomInt64(r);
        return (w) => w.tag(2, WireType.Varint).int64(v);
      },
      3: () => {
        const v = randomInt64(r);
        return (w) => w.tag(3, WireType.Varint).int64(v);
      },
    });
    let ours: unknown;
    try {
      ours = decodeReadRequest(Buffer.from(bytes));
    } catch (err) {
      bad.push(`#${i} ${Buffer.from(bytes).toString('hex')}: ${String(err)}`);
      continue;
    }
    const want = fromBinary(ReadRequestSchema, bytes);
    const expected = { resourceName: want.resourceName, readOffset: want.readOffset, readLimit: want.readLimit };
    if (!sameValues(ours, expected)) bad.push(`#${i} ${Buffer.from(bytes).toString('hex')}: ${show(ours)} != ${show(expected)}`);
  }
  t.same(bad, [], `${ROUNDS} random ReadRequests decode as protobuf-es decodes them`);
});

t.test('decodeWriteRequest agrees with protobuf-es on random messages, data a view of the input', async (t) => {
  const r = rng(2);
  const bad: string[] = [];
  let views = 0;
  for (let i = 0; i < ROUNDS; i++) {
    const bytes = randomMessage(r, {
      1: () => {
        const s = randomString(r);
        return (w) => w.tag(1, WireType.LengthDelimited).string(s);
      },
      2: () => {
        const v = randomInt64(r);
        return (w) => w.tag(2, WireType.Varint).int64(v);
      },
      3: () => {
        // Any non-zero varint is true.
        const v = pick(r, [0n, 1n, 2n, 255n, 2n ** 40n, 2n ** 63n, 2n ** 64n - 1n]);
        return (w) => w.tag(3, WireType.Varint).uint64(v);
      },
      10: () => {
        const d = randomBytes(r, randomLength(r));
        return (w) => w.tag(10, WireType.LengthDelimited).bytes(d);
      },
    });
    const input = Buffer.from(bytes);
    let ours;
    try {
      ours = decodeWriteRequest(input);
    } catch (err) {
      bad.push(`#${i} ${input.subarray(0, 200).toString('hex')}: ${String(err)}`);
      continue;
    }
    const want = fromBinary(WriteRequestSchema, bytes);
    const expected = {
      resourceName: want.resourceName,
      writeOffset: want.writeOffset,
      finishWrite: want.finishWrite,
      data: Buffer.from(want.data).toString('hex'),
    };
    const got = { ...ours, data: Buffer.from(ours.data).toString('hex') };
    if (!sameValues(got, expected)) bad.push(`#${i}: ${show(got)} != ${show(expected)}`);
    if (ours.data.byteLength > 0) {
      if (ours.data.buffer === input.buffer && ours.data.byteOffset >= input.byteOffset) views++;
      else bad.push(`#${i}: data is a copy, not a view of the input`);
    }
  }
  t.same(bad, [], `${ROUNDS} random WriteRequests decode as protobuf-es decodes them`);
  t.ok(views > ROUNDS / 4, `data was checked to be a view ${views} times`);
});

t.test('decodeReadResponse and decodeWriteResponse agree with protobuf-es on random messages', async (t) => {
  const r = rng(3);
  const bad: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const rr = randomMessage(r, {
      10: () => {
        const d = randomBytes(r, randomLength(r));
        return (w) => w.tag(10, WireType.LengthDelimited).bytes(d);
      },
    });
    try {
      const got = Buffer.from(decodeReadResponse(Buffer.from(rr)));
      const want = Buffer.from(fromBinary(ReadResponseSchema, rr).data);
      if (!got.equals(want)) bad.push(`ReadResponse #${i}: ${got.length} bytes != ${want.length} bytes`);
    } catch (err) {
      bad.push(`ReadResponse #${i} ${Buffer.from(rr).subarray(0, 100).toString('hex')}: ${String(err)}`);
    }

    const wr = randomMessage(r, {
      1: () => {
        const v = randomInt64(r);
        return (w) => w.tag(1, WireType.Varint).int64(v);
      },
    });
    try {
      const got = decodeWriteResponse(Buffer.from(wr));
      const want = fromBinary(WriteResponseSchema, wr).committedSize;
      if (got !== want) bad.push(`WriteResponse #${i} ${Buffer.from(wr).toString('hex')}: ${got} != ${want}`);
    } catch (err) {
      bad.push(`WriteResponse #${i} ${Buffer.from(wr).toString('hex')}: ${String(err)}`);
    }
  }
  t.same(bad, [], `${ROUNDS} random ReadResponses and WriteResponses decode as protobuf-es decodes them`);
});

t.test('each wire type of unknown field is skipped (one message per wire type)', async (t) => {
  // The focused form of the random tests above: a failure here names the wire type.
  const r = rng(4);
  for (const wt of UNKNOWN_WIRE_TYPES) {
    const w = new BinaryWriter();
    unknownField(r, 7, wt)(w);
    w.tag(1, WireType.LengthDelimited).string('blobs/abc/1');
    unknownField(r, 99, wt)(w);
    w.tag(2, WireType.Varint).int64(5n);
    const bytes = Buffer.from(w.finish());
    let got;
    try {
      got = decodeReadRequest(bytes);
    } catch (err) {
      t.fail(`an unknown field of wire type ${WireType[wt]} is rejected: ${String(err)}`);
      continue;
    }
    t.same(got, { resourceName: 'blobs/abc/1', readOffset: 5n, readLimit: 0n }, `unknown ${WireType[wt]} fields skipped`);
    t.same(
      { ...fromBinary(ReadRequestSchema, bytes), $unknown: undefined },
      { ...create(ReadRequestSchema, { resourceName: 'blobs/abc/1', readOffset: 5n }), $unknown: undefined },
      'protobuf-es reads it the same',
    );
  }
});

// ---- encoders against protobuf-es ----------------------------------------

t.test('encodeReadRequest writes exactly what protobuf-es writes', async (t) => {
  const r = rng(5);
  const bad: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const fields = {
      resourceName: r() < 0.1 ? '' : randomString(r),
      readOffset: r() < 0.2 ? 0n : randomInt64(r),
      readLimit: r() < 0.2 ? 0n : randomInt64(r),
    };
    const got = encodeReadRequest(fields);
    const want = framed(toBinary(ReadRequestSchema, create(ReadRequestSchema, fields)));
    if (!got.equals(want)) bad.push(`${show(fields)}: ${got.toString('hex')} != ${want.toString('hex')}`);
  }
  t.same(bad, [], `${ROUNDS} ReadRequests`);
});

t.test('writeRequestHeader + data is exactly what protobuf-es writes', async (t) => {
  const r = rng(6);
  const bad: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const resourceName = r() < 0.5 ? '' : randomString(r);
    const writeOffset = pick(r, [0, 1, 127, 128, 16384, 2 ** 31, 2 ** 32 + 1, 2 ** 40, Number.MAX_SAFE_INTEGER, int(r, 2 ** 30)]);
    const finishWrite = r() < 0.5;
    const data = randomBytes(r, randomLength(r));
    const got = Buffer.concat([writeRequestHeader(resourceName, writeOffset, finishWrite, data.length), data]);
    const want = framed(
      toBinary(WriteRequestSchema, create(WriteRequestSchema, { resourceName, writeOffset: BigInt(writeOffset), finishWrite, data })),
    );
    if (!got.equals(want)) {
      bad.push(`${show({ resourceName, writeOffset, finishWrite, n: data.length })}: ${got.subarray(0, 60).toString('hex')} != ${want.subarray(0, 60).toString('hex')}`);
    }
  }
  t.same(bad, [], `${ROUNDS} WriteRequests`);
});

t.test('readResponseHeader + data and encodeWriteResponse are exactly what protobuf-es writes', async (t) => {
  const r = rng(7);
  const bad: string[] = [];
  const lengths = [0, 1, 127, 128, 16383, 16384, 65536, 262144, 2_097_151, 2_097_152, 4 * 1024 * 1024];
  for (let i = 0; i < 60; i++) lengths.push(randomLength(r));
  for (const n of lengths) {
    const data = randomBytes(r, n);
    const got = Buffer.concat([readResponseHeader(n), data]);
    const want = framed(toBinary(ReadResponseSchema, create(ReadResponseSchema, { data })));
    if (!got.equals(want)) bad.push(`ReadResponse of ${n} bytes: ${got.subarray(0, 12).toString('hex')} != ${want.subarray(0, 12).toString('hex')}`);
  }
  // Lengths too large to build here: the header against protobuf-es's writer.
  for (const n of [2 ** 28 - 1, 2 ** 28, 2 ** 31, 2 ** 32 - 7]) {
    const fieldHeader = new BinaryWriter().tag(10, WireType.LengthDelimited).uint32(n).finish();
    const want = Buffer.alloc(PREFIX_BYTES + fieldHeader.length);
    writePrefix(want, 0, fieldHeader.length + n);
    want.set(fieldHeader, PREFIX_BYTES);
    const got = readResponseHeader(n);
    if (!got.equals(want)) bad.push(`ReadResponse header for ${n} bytes: ${got.toString('hex')} != ${want.toString('hex')}`);
  }
  for (let i = 0; i < ROUNDS; i++) {
    const v = randomInt64(r);
    const got = encodeWriteResponse(v);
    const want = framed(toBinary(WriteResponseSchema, create(WriteResponseSchema, { committedSize: v })));
    if (!got.equals(want)) bad.push(`WriteResponse ${v}: ${got.toString('hex')} != ${want.toString('hex')}`);
  }
  t.same(bad, [], 'every encoding matches');
});

t.test('encoders and decoders round-trip', async (t) => {
  const r = rng(8);
  for (let i = 0; i < 100; i++) {
    const rq = { resourceName: randomString(r), readOffset: randomInt64(r), readLimit: randomInt64(r) };
    t.same(decodeReadRequest(encodeReadRequest(rq).subarray(PREFIX_BYTES)), rq);
    const v = randomInt64(r);
    t.equal(decodeWriteResponse(encodeWriteResponse(v).subarray(PREFIX_BYTES)), v);
  }
});

// ---- malformed input -----------------------------------------------------

const DECODERS: readonly [string, (b: Buffer) => unknown, DescMessage][] = [
  ['google.bytestream.ReadRequest', decodeReadRequest, ReadRequestSchema],
  ['google.bytestream.WriteRequest', decodeWriteRequest, WriteRequestSchema],
  ['google.bytestream.ReadResponse', decodeReadResponse, ReadResponseSchema],
  ['google.bytestream.WriteResponse', decodeWriteResponse, WriteResponseSchema],
];

t.test('malformed input of any type: INVALID_ARGUMENT naming the type', async (t) => {
  // protobuf-es skips an over-long varint of an unknown field; protobuf's C++ and Go runtimes reject it.
  const lenientInProtobufEs = new Set(['varint longer than 10 bytes']);
  const cases: readonly [string, number[], string][] = [
    ['truncated tag varint', [0x80], 'truncated varint'],
    ['truncated varint value (unknown field)', [0x38, 0xff, 0xff], 'truncated varint'],
    ['varint longer than 10 bytes', [0x38, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 'varint longer than 10 bytes'],
    ['truncated length (unknown field)', [0x3a, 0x05, 0x61, 0x62], 'truncated length-delimited field'],
    ['truncated length varint', [0x3a, 0x85], 'truncated varint'],
    ['truncated fixed64', [0x39, 1, 2, 3], 'truncated fixed-width field'],
    ['truncated fixed32', [0x3d, 1, 2], 'truncated fixed-width field'],
    ['field number 0', [0x00, 0x00], 'field number 0'],
    ['field number 0, length-delimited', [0x02, 0x00], 'field number 0'],
    ['wire type 6', [0x3e, 0x00], 'unsupported wire type 6'],
    ['wire type 7', [0x3f, 0x00], 'unsupported wire type 7'],
  ];
  for (const [typeName, decode, schema] of DECODERS) {
    for (const [what, bytes, problem] of cases) {
      const input = Buffer.from(bytes);
      expectInvalid(t, () => decode(input), typeName, problem, `${typeName}: ${what}`);
      if (!lenientInProtobufEs.has(what)) t.ok(protobufEsRejects(schema, input), `${typeName}: ${what}: protobuf-es rejects it too`);
    }
  }
});

t.test('malformed groups: unterminated, mismatched or stray end-group', async (t) => {
  for (const [typeName, decode, schema] of DECODERS) {
    for (const [what, bytes] of [
      ['an unterminated group', [0x3b, 0x38, 0x01]],
      ['an end-group tag of another field', [0x3b, 0x44]],
      ['a stray end-group tag', [0x3c]],
    ] as const) {
      const input = Buffer.from(bytes);
      expectInvalid(t, () => decode(input), typeName, /./, `${typeName}: ${what}`);
      t.ok(protobufEsRejects(schema, input), `${typeName}: ${what}: protobuf-es rejects it too`);
    }
  }
});

t.test('a known field with the wrong wire type is INVALID_ARGUMENT', async (t) => {
  const cases: readonly [string, (b: Buffer) => unknown, number[], string][] = [
    ['google.bytestream.ReadRequest', decodeReadRequest, [0x08, 0x01], 'field 1 has wire type 0, expected 2'],
    ['google.bytestream.ReadRequest', decodeReadRequest, [0x12, 0x01, 0x00], 'field 2 has wire type 2, expected 0'],
    ['google.bytestream.ReadRequest', decodeReadRequest, [0x1d, 0, 0, 0, 0], 'field 3 has wire type 5, expected 0'],
    ['google.bytestream.WriteRequest', decodeWriteRequest, [0x08, 0x01], 'field 1 has wire type 0, expected 2'],
    ['google.bytestream.WriteRequest', decodeWriteRequest, [0x11, 0, 0, 0, 0, 0, 0, 0, 0], 'field 2 has wire type 1, expected 0'],
    ['google.bytestream.WriteRequest', decodeWriteRequest, [0x1a, 0x01, 0x01], 'field 3 has wire type 2, expected 0'],
    ['google.bytestream.WriteRequest', decodeWriteRequest, [0x50, 0x05], 'field 10 has wire type 0, expected 2'],
    ['google.bytestream.ReadResponse', decodeReadResponse, [0x55, 0, 0, 0, 0], 'field 10 has wire type 5, expected 2'],
    ['google.bytestream.WriteResponse', decodeWriteResponse, [0x0a, 0x01, 0x05], 'field 1 has wire type 2, expected 0'],
  ];
  for (const [typeName, decode, bytes, problem] of cases) {
    expectInvalid(t, () => decode(Buffer.from(bytes)), typeName, problem, `${typeName} ${Buffer.from(bytes).toString('hex')}`);
  }
});

t.test('an invalid UTF-8 resource_name is INVALID_ARGUMENT', async (t) => {
  for (const bad of [[0xc3, 0x28], [0xff], [0xed, 0xa0, 0x80] /* a surrogate */, [0x61, 0xe2, 0x82]]) {
    const body = [0x0a, bad.length, ...bad];
    expectInvalid(t, () => decodeReadRequest(Buffer.from(body)), 'google.bytestream.ReadRequest', 'resource_name is not valid UTF-8', `ReadRequest ${Buffer.from(bad).toString('hex')}`);
    expectInvalid(t, () => decodeWriteRequest(Buffer.from(body)), 'google.bytestream.WriteRequest', 'resource_name is not valid UTF-8', `WriteRequest ${Buffer.from(bad).toString('hex')}`);
  }
  // Valid multi-byte UTF-8 is fine.
  t.equal(decodeReadRequest(Buffer.from([0x0a, 0x04, 0xf0, 0x9f, 0x98, 0x80])).resourceName, '😀');
});

// ---- ReadResponseData: data of pieces, as protobuf-es would decode the messages ----

/** Feeds framed messages through FrameDecoder.pushPieces and ReadResponseData; returns the data emitted per message. */
function dataOfPieces(chunks: readonly Buffer[]): { perMessage: Buffer[]; emitted: Buffer[] } {
  const decoder = new FrameDecoder(64 * 1024 * 1024);
  const rrd = new ReadResponseData();
  const perMessage: Buffer[] = [];
  const emitted: Buffer[] = [];
  let current: Buffer[] = [];
  for (const chunk of chunks) {
    decoder.pushPieces(chunk, (piece, offset, length) => {
      rrd.piece(piece, offset, length, (data) => {
        emitted.push(data);
        current.push(Buffer.from(data));
      });
      if (offset + piece.length === length) {
        perMessage.push(Buffer.concat(current));
        current = [];
      }
    });
  }
  return { perMessage, emitted };
}

function ownBuffer(bytes: Uint8Array): Buffer {
  const ab = new ArrayBuffer(bytes.length);
  new Uint8Array(ab).set(bytes);
  return Buffer.from(ab);
}

function cut(buf: Buffer, at: readonly number[]): Buffer[] {
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of [...at, buf.length]) {
    chunks.push(ownBuffer(buf.subarray(from, p)));
    from = p;
  }
  return chunks;
}

/** ReadResponse bodies of every shape ReadResponseData must handle. */
function readResponseShapes(r: Rand): Uint8Array[] {
  const plain = (n: number) => toBinary(ReadResponseSchema, create(ReadResponseSchema, { data: randomBytes(r, n) }));
  const w = () => new BinaryWriter();
  return [
    plain(0), // an empty message
    plain(1),
    plain(5),
    plain(127),
    plain(128), // a two-byte length varint
    plain(300),
    w().tag(10, WireType.LengthDelimited).bytes(new Uint8Array(0)).finish(), // data present but empty
    w().tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 20)).tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 9)).finish(), // last one wins
    w().tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 9)).tag(10, WireType.LengthDelimited).bytes(new Uint8Array(0)).finish(), // last (empty) wins
    w().tag(3, WireType.Varint).uint64(7n).tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 12)).finish(), // unknown field first
    w().tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 12)).tag(11, WireType.Bit32).fixed32(1).finish(), // unknown field after
    w().tag(10, WireType.LengthDelimited).bytes(randomBytes(r, 3)).tag(12, WireType.StartGroup).tag(1, WireType.Varint).uint32(1).tag(12, WireType.EndGroup).finish(),
    // A non-minimal length varint (0x85 0x80 0x00 = 5): still the data field alone.
    Uint8Array.from([0x52, 0x85, 0x80, 0x00, 1, 2, 3, 4, 5]),
  ];
}

function expectedData(bodies: readonly Uint8Array[]): Buffer[] {
  return bodies.map((b) => Buffer.from(fromBinary(ReadResponseSchema, b).data));
}

function sameBuffers(a: readonly Buffer[], b: readonly Buffer[]): boolean {
  return a.length === b.length && a.every((x, i) => x.equals(b[i]!));
}

t.test('ReadResponseData: every split position of each message shape yields what protobuf-es decodes', async (t) => {
  const bodies = readResponseShapes(rng(9));
  const want = expectedData(bodies);
  const bad: string[] = [];
  bodies.forEach((body, k) => {
    const bytes = framed(body);
    // Every split in two and, for the header region, every split in three (inside the tag and the varint).
    for (let i = 0; i <= bytes.length; i++) {
      const ends = i < 12 ? [...Array(Math.min(bytes.length, 14) - i + 1).keys()].map((d) => i + d) : [i];
      for (const j of ends) {
        const { perMessage } = dataOfPieces(cut(bytes, [i, j]));
        if (!sameBuffers(perMessage, [want[k]!])) {
          bad.push(`shape ${k} (${Buffer.from(body).subarray(0, 8).toString('hex')}) split at ${i},${j}: ${perMessage.map((m) => m.toString('hex')).join('|')} != ${want[k]!.toString('hex')}`);
        }
      }
    }
  });
  t.same(bad.slice(0, 20), [], `every split (${bad.length} failures)`);
});

t.test('ReadResponseData: random messages under random piece splits (seeded)', async (t) => {
  const r = rng(10);
  const bad: string[] = [];
  for (let round = 0; round < 200; round++) {
    const bodies: Uint8Array[] = [];
    const count = 1 + int(r, 6);
    for (let i = 0; i < count; i++) {
      const k = r();
      if (k < 0.5) {
        bodies.push(toBinary(ReadResponseSchema, create(ReadResponseSchema, { data: randomBytes(r, randomLength(r)) })));
      } else if (k < 0.6) {
        bodies.push(pick(r, readResponseShapes(r)));
      } else {
        bodies.push(
          randomMessage(r, {
            10: () => {
              const d = randomBytes(r, randomLength(r) % 5000);
              return (w) => w.tag(10, WireType.LengthDelimited).bytes(d);
            },
          }),
        );
      }
    }
    const stream = Buffer.concat(bodies.map(framed));
    const cuts: number[] = [];
    const n = int(r, 16);
    for (let i = 0; i < n; i++) cuts.push(int(r, stream.length + 1));
    // Small pieces near message starts, where the header is.
    let pos = 0;
    for (const b of bodies) {
      if (r() < 0.5) cuts.push(pos + PREFIX_BYTES + int(r, 4));
      pos += PREFIX_BYTES + b.length;
    }
    cuts.sort((a, b) => a - b);
    const { perMessage } = dataOfPieces(cut(stream, cuts));
    const want = expectedData(bodies);
    if (!sameBuffers(perMessage, want)) {
      bad.push(`round ${round}: ${perMessage.map((m) => m.length).join(',')} bytes != ${want.map((m) => m.length).join(',')} bytes, or different content`);
    }
  }
  t.same(bad, [], '200 rounds');
});

t.test('ReadResponseData: a plain data message is handed on as views of the pieces', async (t) => {
  const data = randomBytes(rng(11), 100_000);
  const bytes = framed(toBinary(ReadResponseSchema, create(ReadResponseSchema, { data })));
  const chunks = cut(bytes, [16_384, 32_768, 49_152, 65_536, 81_920]);
  const { perMessage, emitted } = dataOfPieces(chunks);
  t.ok(perMessage[0]!.equals(data));
  t.equal(emitted.length, chunks.length, 'one emitted run per piece');
  t.ok(
    emitted.every((e, i) => e.buffer === chunks[i]!.buffer),
    'every run is a view of the chunk it came in',
  );
});

t.test('ReadResponseData: a data header split across pieces still hands on views of the pieces after it', async (t) => {
  const data = randomBytes(rng(12), 100_000); // a 3-byte length varint
  const bytes = framed(toBinary(ReadResponseSchema, create(ReadResponseSchema, { data })));
  // Pieces: prefix + tag + 1st varint byte | 2nd varint byte | 3rd varint byte + data ... | data
  const chunks = cut(bytes, [PREFIX_BYTES + 2, PREFIX_BYTES + 3, 50_000, 80_000]);
  const { perMessage, emitted } = dataOfPieces(chunks);
  t.ok(perMessage[0]!.equals(data));
  t.equal(emitted.length, 3, 'one run per piece once the header is complete');
  t.ok(
    emitted.every((e, i) => e.buffer === chunks[i + 2]!.buffer),
    'every run is a view of its piece (the message is not assembled)',
  );
});

t.test('ReadResponseData: a malformed message is INVALID_ARGUMENT naming ReadResponse', async (t) => {
  // A data field announcing more bytes than the message holds, and a message of garbage.
  for (const body of [Uint8Array.from([0x52, 0x10, 1, 2, 3]), Uint8Array.from([0x52, 0x03, 1, 2, 3, 0xff])]) {
    const chunks = cut(framed(body), [3, 6]);
    expectInvalid(t, () => dataOfPieces(chunks), 'google.bytestream.ReadResponse', /truncated/, Buffer.from(body).toString('hex'));
  }
});

// ---- helpers ----

function sameValues(a: unknown, b: unknown): boolean {
  return show(a) === show(b);
}

function show(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x));
}
