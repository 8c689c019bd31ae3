// Hand-written protobuf codecs for the four google.bytestream messages the
// fast path carries. Field numbers and wire types are those of
// proto/google/bytestream/bytestream.proto:
//
//   ReadRequest   1 resource_name string, 2 read_offset int64, 3 read_limit int64
//   ReadResponse  10 data bytes
//   WriteRequest  1 resource_name string, 2 write_offset int64, 3 finish_write bool, 10 data bytes
//   WriteResponse 1 committed_size int64
//
// Why by hand: protobuf-es builds a message object per message and copies the
// data field into (and out of) a fresh buffer; here `data` stays a view of the
// received bytes and an outgoing message is a few header bytes written in
// front of the caller's buffer. Decoding follows protobuf's rules (unknown
// fields skipped, the last value of a repeated scalar wins, int64 as two's
// complement varints); test/grpc/bytestream-codec.test.ts checks every codec
// against protobuf-es on the generated schemas.
import { isUtf8 } from 'node:buffer';
import { Code, ConnectError } from '@connectrpc/connect';
import { PREFIX_BYTES, writePrefix } from './framing.ts';

export interface ReadRequestFields {
  readonly resourceName: string;
  readonly readOffset: bigint;
  readonly readLimit: bigint;
}

export interface WriteRequestFields {
  readonly resourceName: string;
  readonly writeOffset: bigint;
  readonly finishWrite: boolean;
  /** A view of the received message, valid as long as the caller keeps it. */
  readonly data: Uint8Array;
}

const WIRE_VARINT = 0;
const WIRE_I64 = 1;
const WIRE_LEN = 2;
const WIRE_SGROUP = 3;
const WIRE_EGROUP = 4;
const WIRE_I32 = 5;

const EMPTY = new Uint8Array(0);

/** A protobuf reader over one message; throws INVALID_ARGUMENT naming `typeName` on malformed input. */
class Reader {
  readonly buf: Buffer;
  pos = 0;
  readonly #typeName: string;

  constructor(buf: Buffer, typeName: string) {
    this.buf = buf;
    this.#typeName = typeName;
  }

  get done(): boolean {
    return this.pos >= this.buf.length;
  }

  fail(problem: string): ConnectError {
    return new ConnectError(`request is not a valid ${this.#typeName} message: ${problem}`, Code.InvalidArgument);
  }

  /** A varint of up to 64 bits as a bigint (int64 two's complement). */
  varint64(): bigint {
    const buf = this.buf;
    // Fast path: up to 7 bytes (49 bits) fit a double exactly.
    let lo = 0;
    let shift = 0;
    for (let i = 0; i < 7; i++) {
      if (this.pos >= buf.length) throw this.fail('truncated varint');
      const b = buf[this.pos++]!;
      lo += (b & 0x7f) * 2 ** shift;
      if ((b & 0x80) === 0) return BigInt(lo);
      shift += 7;
    }
    let big = BigInt(lo);
    let bigShift = 49n;
    for (let i = 7; i < 10; i++) {
      if (this.pos >= buf.length) throw this.fail('truncated varint');
      const b = buf[this.pos++]!;
      big |= BigInt(b & 0x7f) << bigShift;
      if ((b & 0x80) === 0) return BigInt.asIntN(64, big);
      bigShift += 7n;
    }
    throw this.fail('varint longer than 10 bytes');
  }

  /** A varint known to be small (a tag or a length). */
  uint32(): number {
    const v = this.varint64();
    if (v < 0n || v > 0xffffffffn) throw this.fail(`value ${v} out of range`);
    return Number(v);
  }

  lengthDelimited(): Buffer {
    const len = this.uint32();
    if (len > this.buf.length - this.pos) throw this.fail('truncated length-delimited field');
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }

  /** Skips an unknown field; groups (deprecated, still valid on the wire) up to their matching end-group tag. */
  skip(wireType: number, field: number, depth = 0): void {
    switch (wireType) {
      case WIRE_VARINT:
        this.varint64();
        return;
      case WIRE_I64:
        this.#advance(8);
        return;
      case WIRE_LEN:
        this.lengthDelimited();
        return;
      case WIRE_I32:
        this.#advance(4);
        return;
      case WIRE_SGROUP:
        if (depth >= 100) throw this.fail('groups nested too deeply');
        for (;;) {
          if (this.done) throw this.fail(`group ${field} has no end-group tag`);
          const tag = this.uint32();
          const inner = tag >>> 3;
          const wt = tag & 7;
          if (inner === 0) throw this.fail('field number 0');
          if (wt === WIRE_EGROUP) {
            if (inner !== field) throw this.fail(`group ${field} ended by the end-group tag of field ${inner}`);
            return;
          }
          this.skip(wt, inner, depth + 1);
        }
      default:
        throw this.fail(`unsupported wire type ${wireType}`);
    }
  }

  #advance(n: number): void {
    if (n > this.buf.length - this.pos) throw this.fail('truncated fixed-width field');
    this.pos += n;
  }
}

function expectWireType(r: Reader, field: number, wireType: number, want: number): void {
  if (wireType !== want) throw r.fail(`field ${field} has wire type ${wireType}, expected ${want}`);
}

function utf8(r: Reader, bytes: Buffer, field: string): string {
  if (!isUtf8(bytes)) throw r.fail(`${field} is not valid UTF-8`);
  return bytes.toString('utf8');
}

/** One known field: its wire type and what to do with its value. */
type FieldReader = readonly [wireType: number, read: (r: Reader) => void];

/**
 * Walks a message's fields: known ones (by number) are checked for their
 * wire type and read, unknown ones skipped, field number 0 rejected.
 */
function readFields(r: Reader, known: (field: number) => FieldReader | undefined): void {
  while (!r.done) {
    const tag = r.uint32();
    const field = tag >>> 3;
    const wt = tag & 7;
    if (field === 0) throw r.fail('field number 0');
    const reader = known(field);
    if (reader === undefined) {
      r.skip(wt, field);
      continue;
    }
    expectWireType(r, field, wt, reader[0]);
    reader[1](r);
  }
}

export function decodeReadRequest(buf: Buffer): ReadRequestFields {
  const r = new Reader(buf, 'google.bytestream.ReadRequest');
  let resourceName = '';
  let readOffset = 0n;
  let readLimit = 0n;
  readFields(r, (field) => {
    if (field === 1) return [WIRE_LEN, () => (resourceName = utf8(r, r.lengthDelimited(), 'resource_name'))];
    if (field === 2) return [WIRE_VARINT, () => (readOffset = r.varint64())];
    if (field === 3) return [WIRE_VARINT, () => (readLimit = r.varint64())];
    return undefined;
  });
  return { resourceName, readOffset, readLimit };
}

export function decodeWriteRequest(buf: Buffer): WriteRequestFields {
  const r = new Reader(buf, 'google.bytestream.WriteRequest');
  let resourceName = '';
  let writeOffset = 0n;
  let finishWrite = false;
  let data: Uint8Array = EMPTY;
  readFields(r, (field) => {
    if (field === 10) return [WIRE_LEN, () => (data = r.lengthDelimited())];
    if (field === 2) return [WIRE_VARINT, () => (writeOffset = r.varint64())];
    if (field === 1) return [WIRE_LEN, () => (resourceName = utf8(r, r.lengthDelimited(), 'resource_name'))];
    if (field === 3) return [WIRE_VARINT, () => (finishWrite = r.varint64() !== 0n)];
    return undefined;
  });
  return { resourceName, writeOffset, finishWrite, data };
}

/** The `data` of a ReadResponse (a view), with unknown fields skipped. */
export function decodeReadResponse(buf: Buffer): Uint8Array {
  const r = new Reader(buf, 'google.bytestream.ReadResponse');
  let data: Uint8Array = EMPTY;
  readFields(r, (field) => (field === 10 ? [WIRE_LEN, () => (data = r.lengthDelimited())] : undefined));
  return data;
}

/**
 * The data of ReadResponses fed piece by piece (FrameDecoder.pushPieces),
 * handed on as views without assembling the messages. The usual message is
 * the data field alone: its tag and length are read from the first bytes
 * (buffered if they straddle pieces) and every later byte is data. Any
 * other shape (unknown fields, several data fields) is assembled and
 * decoded whole, which keeps protobuf's rules.
 */
export class ReadResponseData {
  /** Bytes of the current message before its data is known to start; or the whole message in fallback mode. */
  #held: Buffer[] = [];
  #heldBytes = 0;
  #mode: 'header' | 'data' | 'whole' = 'header';

  /** Feeds one piece; calls `emit` with data bytes as they become known. */
  piece(piece: Buffer, offset: number, length: number, emit: (data: Buffer) => void): void {
    if (offset === 0) {
      this.#held = [];
      this.#heldBytes = 0;
      this.#mode = 'header';
    }
    const last = offset + piece.length === length;
    if (this.#mode === 'data') {
      if (piece.length > 0) emit(piece);
      return;
    }
    this.#held.push(piece);
    this.#heldBytes += piece.length;
    if (this.#mode === 'header') {
      // A header is at most 6 bytes (tag and a 5-byte length): join no more than that.
      const head = this.#held.length === 1 ? piece : Buffer.concat(this.#held, Math.min(this.#heldBytes, 6));
      const parsed = dataFieldHeader(head);
      if (parsed === 'more' && !last && this.#heldBytes < 11) return;
      if (parsed !== 'more' && parsed !== 'other' && parsed.headerBytes + parsed.dataBytes === length) {
        // The header ends in this piece (it was incomplete before): the
        // data after it is a view of the piece, not of a joined copy.
        const rest = piece.subarray(parsed.headerBytes - (this.#heldBytes - piece.length));
        this.#mode = 'data';
        this.#held = [];
        this.#heldBytes = 0;
        if (rest.length > 0) emit(rest);
        return;
      }
      this.#mode = 'whole';
    }
    if (last) {
      const whole = this.#held.length === 1 ? this.#held[0]! : Buffer.concat(this.#held, this.#heldBytes);
      this.#held = [];
      this.#heldBytes = 0;
      const data = decodeReadResponse(whole);
      if (data.byteLength > 0) emit(data as Buffer);
    }
  }
}

/** The tag and length of a leading field-10 LEN header, 'more' if `head` is too short to tell, 'other' for anything else. */
function dataFieldHeader(head: Buffer): { headerBytes: number; dataBytes: number } | 'more' | 'other' {
  if (head.length === 0) return 'more';
  if (head[0] !== ((10 << 3) | WIRE_LEN)) return 'other';
  let value = 0;
  for (let i = 1; i < Math.min(head.length, 6); i++) {
    const b = head[i]!;
    value += (b & 0x7f) * 2 ** (7 * (i - 1));
    if ((b & 0x80) === 0) return { headerBytes: i + 1, dataBytes: value };
  }
  return head.length >= 6 ? 'other' : 'more';
}

export function decodeWriteResponse(buf: Buffer): bigint {
  const r = new Reader(buf, 'google.bytestream.WriteResponse');
  let committedSize = 0n;
  readFields(r, (field) => (field === 1 ? [WIRE_VARINT, () => (committedSize = r.varint64())] : undefined));
  return committedSize;
}

// ---- encoding ----

function varintSize(v: bigint | number): number {
  let x = BigInt.asUintN(64, BigInt(v));
  let n = 1;
  while (x >= 0x80n) {
    x >>= 7n;
    n++;
  }
  return n;
}

function putVarint(out: Buffer, at: number, v: bigint | number): number {
  if (typeof v === 'number' && v >= 0 && v < 0x80) {
    out[at] = v;
    return at + 1;
  }
  let x = BigInt.asUintN(64, BigInt(v));
  while (x >= 0x80n) {
    out[at++] = Number(x & 0x7fn) | 0x80;
    x >>= 7n;
  }
  out[at++] = Number(x);
  return at;
}

/** Small non-negative integers (lengths) without BigInt. */
function uintSize(v: number): number {
  let n = 1;
  while (v >= 0x80) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

function putUint(out: Buffer, at: number, v: number): number {
  while (v >= 0x80) {
    out[at++] = (v & 0x7f) | 0x80;
    v = Math.floor(v / 128);
  }
  out[at++] = v;
  return at;
}

/**
 * The gRPC prefix and the protobuf bytes of a ReadResponse that precede
 * `dataLength` bytes of data: write these, then the data itself.
 */
export function readResponseHeader(dataLength: number): Buffer {
  if (dataLength === 0) {
    const out = Buffer.allocUnsafe(PREFIX_BYTES);
    writePrefix(out, 0, 0);
    return out;
  }
  const fieldHeader = 1 + uintSize(dataLength);
  const out = Buffer.allocUnsafe(PREFIX_BYTES + fieldHeader);
  writePrefix(out, 0, fieldHeader + dataLength);
  out[PREFIX_BYTES] = (10 << 3) | WIRE_LEN;
  putUint(out, PREFIX_BYTES + 1, dataLength);
  return out;
}

/** A whole framed ReadRequest. */
export function encodeReadRequest(req: ReadRequestFields): Buffer {
  const name = Buffer.from(req.resourceName, 'utf8');
  let size = 0;
  if (name.length > 0) size += 1 + uintSize(name.length) + name.length;
  if (req.readOffset !== 0n) size += 1 + varintSize(req.readOffset);
  if (req.readLimit !== 0n) size += 1 + varintSize(req.readLimit);
  const out = Buffer.allocUnsafe(PREFIX_BYTES + size);
  writePrefix(out, 0, size);
  let at = PREFIX_BYTES;
  if (name.length > 0) {
    out[at++] = (1 << 3) | WIRE_LEN;
    at = putUint(out, at, name.length);
    at += name.copy(out, at);
  }
  if (req.readOffset !== 0n) {
    out[at++] = (2 << 3) | WIRE_VARINT;
    at = putVarint(out, at, req.readOffset);
  }
  if (req.readLimit !== 0n) {
    out[at++] = (3 << 3) | WIRE_VARINT;
    at = putVarint(out, at, req.readLimit);
  }
  return out;
}

/**
 * The gRPC prefix and every field of a WriteRequest except the data, which
 * follows: write these, then `dataLength` bytes of data. `resourceName` is
 * sent in the first message only ('' elsewhere).
 */
export function writeRequestHeader(resourceName: string, writeOffset: number, finishWrite: boolean, dataLength: number): Buffer {
  const name = resourceName === '' ? undefined : Buffer.from(resourceName, 'utf8');
  let size = 0;
  if (name !== undefined) size += 1 + uintSize(name.length) + name.length;
  if (writeOffset !== 0) size += 1 + uintSize(writeOffset);
  if (finishWrite) size += 2;
  const dataHeader = dataLength > 0 ? 1 + uintSize(dataLength) : 0;
  const out = Buffer.allocUnsafe(PREFIX_BYTES + size + dataHeader);
  writePrefix(out, 0, size + dataHeader + dataLength);
  let at = PREFIX_BYTES;
  if (name !== undefined) {
    out[at++] = (1 << 3) | WIRE_LEN;
    at = putUint(out, at, name.length);
    at += name.copy(out, at);
  }
  if (writeOffset !== 0) {
    out[at++] = (2 << 3) | WIRE_VARINT;
    at = putUint(out, at, writeOffset);
  }
  if (finishWrite) {
    out[at++] = (3 << 3) | WIRE_VARINT;
    out[at++] = 1;
  }
  if (dataLength > 0) {
    out[at++] = (10 << 3) | WIRE_LEN;
    at = putUint(out, at, dataLength);
  }
  return out;
}

/** A whole framed WriteResponse. */
export function encodeWriteResponse(committedSize: bigint): Buffer {
  const size = committedSize === 0n ? 0 : 1 + varintSize(committedSize);
  const out = Buffer.allocUnsafe(PREFIX_BYTES + size);
  writePrefix(out, 0, size);
  if (size > 0) {
    out[PREFIX_BYTES] = (1 << 3) | WIRE_VARINT;
    putVarint(out, PREFIX_BYTES + 1, committedSize);
  }
  return out;
}
