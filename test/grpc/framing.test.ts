// FrameDecoder (src/grpc/framing.ts): gRPC's 5-byte length-prefixed framing,
// however the byte stream is cut into chunks.
import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import type { Test } from 'tap';
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

function randomBytes(next: () => number, n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(next() * 256);
  return out;
}

interface Msg {
  readonly compressed: boolean;
  readonly data: Buffer;
}

function frame(msg: Msg): Buffer {
  const out = Buffer.alloc(PREFIX_BYTES + msg.data.length);
  writePrefix(out, 0, msg.data.length, msg.compressed);
  msg.data.copy(out, PREFIX_BYTES);
  return out;
}

function stream(msgs: readonly Msg[]): Buffer {
  return Buffer.concat(msgs.map(frame));
}

/**
 * A copy in an ArrayBuffer of its own (never Buffer's shared 8 KiB pool), so
 * that "is a view of this chunk" can be told by comparing ArrayBuffers.
 */
function ownBuffer(bytes: Uint8Array): Buffer {
  const ab = new ArrayBuffer(bytes.length);
  new Uint8Array(ab).set(bytes);
  return Buffer.from(ab);
}

/** Cuts `buf` at the given positions (sorted, within 0..length), copying each chunk into its own buffer. */
function cut(buf: Buffer, at: readonly number[]): Buffer[] {
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of [...at, buf.length]) {
    chunks.push(ownBuffer(buf.subarray(from, p)));
    from = p;
  }
  return chunks;
}

function randomCuts(next: () => number, length: number): number[] {
  const n = Math.floor(next() * 12);
  const at: number[] = [];
  for (let i = 0; i < n; i++) at.push(Math.floor(next() * (length + 1)));
  return at.sort((a, b) => a - b);
}

function decodeAll(chunks: readonly Buffer[], max = 1 << 20): { frames: Msg[]; decoder: FrameDecoder } {
  const decoder = new FrameDecoder(max);
  const frames: Msg[] = [];
  for (const c of chunks) decoder.push(c, (f) => frames.push({ compressed: f.compressed, data: Buffer.from(f.data) }));
  return { frames, decoder };
}

/** pushPieces, with the pieces put back together by their offsets; checks the piece protocol on the way. */
function reassemble(t: Test, chunks: readonly Buffer[], max = 1 << 20): { frames: Msg[]; decoder: FrameDecoder; bad: string[] } {
  const decoder = new FrameDecoder(max);
  const frames: Msg[] = [];
  const bad: string[] = [];
  let parts: Buffer[] = [];
  let expectOffset = 0;
  for (const c of chunks) {
    decoder.pushPieces(c, (piece, offset, length, compressed) => {
      if (offset !== expectOffset) bad.push(`piece at offset ${offset}, expected ${expectOffset}`);
      if (piece.length > 0 && piece.buffer !== c.buffer) bad.push('a piece is not a view of the chunk being pushed');
      if (piece.length === 0 && length !== 0) bad.push(`an empty piece of a ${length}-byte message`);
      parts.push(Buffer.from(piece));
      expectOffset = offset + piece.length;
      if (expectOffset > length) bad.push(`piece runs past the message length ${length}`);
      if (expectOffset === length) {
        frames.push({ compressed, data: Buffer.concat(parts) });
        parts = [];
        expectOffset = 0;
      }
    });
  }
  t.same(bad, [], 'pieces arrive in order, as views, and end at the message length');
  return { frames, decoder, bad };
}

function same(t: Test, got: readonly Msg[], want: readonly Msg[], what: string): boolean {
  const ok =
    got.length === want.length &&
    got.every((g, i) => g.compressed === want[i]!.compressed && g.data.equals(want[i]!.data));
  if (!ok) {
    t.fail(`${what}: decoded messages differ`, {
      got: got.map((m) => `${m.compressed ? 'z' : ''}${m.data.toString('hex')}`),
      want: want.map((m) => `${m.compressed ? 'z' : ''}${m.data.toString('hex')}`),
    });
  }
  return ok;
}

function expectConnectError(t: Test, fn: () => void, code: Code, message: string): void {
  try {
    fn();
  } catch (err) {
    t.ok(err instanceof ConnectError, 'a ConnectError');
    const ce = ConnectError.from(err);
    t.equal(Code[ce.code], Code[code]);
    t.equal(ce.rawMessage, message);
    return;
  }
  t.fail(`expected ${Code[code]} "${message}", nothing was thrown`);
}

// Small messages of every interesting size, empty ones included, some flagged compressed.
const SMALL: Msg[] = [
  { compressed: false, data: Buffer.from('hello') },
  { compressed: false, data: Buffer.alloc(0) },
  { compressed: true, data: Buffer.from([0, 1, 2, 3, 4, 5, 6, 7, 8]) },
  { compressed: false, data: Buffer.from([0xff]) },
  { compressed: false, data: Buffer.alloc(0) },
  { compressed: true, data: Buffer.alloc(0) },
  { compressed: false, data: Buffer.from('the last message') },
];

t.test('push: the stream split in two at every byte position decodes the same messages', async (t) => {
  const bytes = stream(SMALL);
  let failures = 0;
  for (let i = 0; i <= bytes.length; i++) {
    const { frames, decoder } = decodeAll(cut(bytes, [i]));
    if (!same(t, frames, SMALL, `split at ${i}`)) failures++;
    if (!decoder.idle) {
      failures++;
      t.fail(`split at ${i}: decoder not idle at the end`);
    }
  }
  t.equal(failures, 0, `all ${bytes.length + 1} two-way splits decode exactly`);
});

t.test('push: every pair of split positions (three chunks) and one byte at a time', async (t) => {
  const bytes = stream(SMALL.slice(0, 4));
  let failures = 0;
  for (let i = 0; i <= bytes.length; i++) {
    for (let j = i; j <= bytes.length; j++) {
      if (!same(t, decodeAll(cut(bytes, [i, j])).frames, SMALL.slice(0, 4), `split at ${i},${j}`)) failures++;
    }
  }
  t.equal(failures, 0, 'all three-way splits decode exactly');
  const oneByOne = [...bytes].map((b) => Buffer.from([b]));
  same(t, decodeAll(oneByOne).frames, SMALL.slice(0, 4), 'one byte per chunk');
});

t.test('push and pushPieces: random messages under random chunkings (seeded)', async (t) => {
  const next = rng(0x5eed);
  let cases = 0;
  let failures = 0;
  for (let round = 0; round < 300; round++) {
    const count = 1 + Math.floor(next() * 8);
    const msgs: Msg[] = [];
    for (let i = 0; i < count; i++) {
      const kind = next();
      const size = kind < 0.2 ? 0 : kind < 0.7 ? Math.floor(next() * 20) : Math.floor(next() * 70_000);
      msgs.push({ compressed: next() < 0.3, data: randomBytes(next, size) });
    }
    const bytes = stream(msgs);
    const chunks = cut(bytes, randomCuts(next, bytes.length));
    const a = decodeAll(chunks);
    const b = reassemble(t, chunks);
    cases++;
    if (!same(t, a.frames, msgs, `round ${round} push`)) failures++;
    if (!same(t, b.frames, msgs, `round ${round} pushPieces`)) failures++;
    if (!a.decoder.idle || !b.decoder.idle) {
      failures++;
      t.fail(`round ${round}: decoder not idle at the end of the stream`);
    }
  }
  t.equal(cases, 300);
  t.equal(failures, 0, 'push and pushPieces give back exactly the messages sent, every time');
});

t.test('pushPieces: reassembles identically at every split position, empty messages as one empty piece', async (t) => {
  const bytes = stream(SMALL);
  let failures = 0;
  for (let i = 0; i <= bytes.length; i++) {
    for (const j of [i, Math.min(bytes.length, i + 1), Math.min(bytes.length, i + 7)]) {
      if (!same(t, reassemble(t, cut(bytes, [i, j])).frames, SMALL, `split at ${i},${j}`)) failures++;
    }
  }
  t.equal(failures, 0);

  const decoder = new FrameDecoder(100);
  const seen: [number, number, number, boolean][] = [];
  decoder.pushPieces(Buffer.from([1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), (piece, offset, length, compressed) =>
    seen.push([piece.length, offset, length, compressed]),
  );
  t.same(seen, [
    [0, 0, 0, true],
    [0, 0, 0, false],
  ], 'each empty message is exactly one empty piece, with its flag');
  t.ok(decoder.idle);
});

t.test('push: empty messages, alone and in a run, each yield one empty frame', async (t) => {
  const decoder = new FrameDecoder(10);
  const frames: Msg[] = [];
  decoder.push(Buffer.from([0, 0, 0, 0, 0]), (f) => frames.push(f));
  t.equal(frames.length, 1);
  t.equal(frames[0]!.data.length, 0);
  t.equal(frames[0]!.compressed, false);
  t.ok(decoder.idle, 'idle after an empty message');
  decoder.push(Buffer.from([0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]), (f) => frames.push(f));
  t.equal(frames.length, 3, 'the second empty message completes; the third prefix is partial');
  t.equal(frames[2]!.compressed, true);
  t.notOk(decoder.idle, 'not idle inside a prefix');
  t.equal(decoder.pendingBytes, 3, 'the three prefix bytes are held');
  decoder.push(Buffer.from([0, 0]), (f) => frames.push(f));
  t.equal(frames.length, 4);
  t.ok(decoder.idle);
  // An empty chunk changes nothing.
  decoder.push(Buffer.alloc(0), () => t.fail('no frame from an empty chunk'));
  t.ok(decoder.idle);
});

t.test('push: a message that lies in one chunk is a view of it, not a copy', async (t) => {
  const a = { compressed: false, data: Buffer.from('first message') };
  const b = { compressed: false, data: Buffer.from('second') };
  const chunk = ownBuffer(stream([a, b]));
  const got: Buffer[] = [];
  new FrameDecoder(100).push(chunk, (f) => got.push(f.data));
  t.equal(got.length, 2);
  t.equal(got[0]!.buffer, chunk.buffer, 'first message shares the chunk memory');
  t.equal(got[0]!.byteOffset, chunk.byteOffset + PREFIX_BYTES);
  t.equal(got[1]!.buffer, chunk.buffer, 'second message shares the chunk memory');
  t.equal(got[1]!.byteOffset, chunk.byteOffset + PREFIX_BYTES + a.data.length + PREFIX_BYTES);
  // Proof it is a view: writing to the chunk shows through.
  chunk[PREFIX_BYTES] = 'F'.charCodeAt(0);
  t.equal(got[0]!.toString(), 'First message');

  // A prefix split over two chunks, the body wholly in the second: still a view of the second.
  const whole = frame({ compressed: false, data: Buffer.from('body in one piece') });
  const [c1, c2] = cut(whole, [3]);
  const views: Buffer[] = [];
  const d = new FrameDecoder(100);
  d.push(c1!, (f) => views.push(f.data));
  t.equal(views.length, 0);
  d.push(c2!, (f) => views.push(f.data));
  t.equal(views.length, 1);
  t.equal(views[0]!.buffer, c2!.buffer, 'the body is a view of the chunk that carried it');
  t.equal(views[0]!.toString(), 'body in one piece');

  // A body spread over two chunks is joined, correctly, into a buffer of its own.
  const [s1, s2] = cut(whole, [10]);
  const joined: Buffer[] = [];
  const e = new FrameDecoder(100);
  e.push(s1!, (f) => joined.push(f.data));
  e.push(s2!, (f) => joined.push(f.data));
  t.equal(joined.length, 1);
  t.equal(joined[0]!.toString(), 'body in one piece');
  t.not(joined[0]!.buffer, s1!.buffer);
  t.not(joined[0]!.buffer, s2!.buffer);
});

t.test('a message announced larger than the limit fails with RESOURCE_EXHAUSTED before any of it is buffered', async (t) => {
  const limit = 1000;
  const prefix = Buffer.alloc(PREFIX_BYTES);
  writePrefix(prefix, 0, limit + 1);
  const message = `gRPC message of ${limit + 1} bytes exceeds the limit of ${limit} bytes`;

  // Only the prefix arrives: the decoder must not wait for (or hold) the body.
  const d1 = new FrameDecoder(limit);
  expectConnectError(t, () => d1.push(prefix, () => t.fail('no frame')), Code.ResourceExhausted, message);
  t.equal(d1.pendingBytes, 0, 'nothing of the message is held');

  // The prefix split over chunks: fails when its last byte arrives.
  const d2 = new FrameDecoder(limit);
  d2.push(prefix.subarray(0, 4), () => t.fail('no frame'));
  expectConnectError(t, () => d2.push(prefix.subarray(4), () => t.fail('no frame')), Code.ResourceExhausted, message);

  // The same through pushPieces: no piece is handed out.
  const d3 = new FrameDecoder(limit);
  const withBody = Buffer.concat([prefix, Buffer.alloc(limit + 1)]);
  expectConnectError(t, () => d3.pushPieces(withBody, () => t.fail('no piece of an oversized message')), Code.ResourceExhausted, message);

  // A huge announced length (4 GiB - 1) too.
  const huge = Buffer.from([0, 0xff, 0xff, 0xff, 0xff]);
  expectConnectError(
    t,
    () => new FrameDecoder(limit).push(huge, () => {}),
    Code.ResourceExhausted,
    `gRPC message of 4294967295 bytes exceeds the limit of ${limit} bytes`,
  );

  // Exactly the limit is fine.
  const atLimit = frame({ compressed: false, data: Buffer.alloc(limit, 7) });
  const got: Buffer[] = [];
  new FrameDecoder(limit).push(atLimit, (f) => got.push(f.data));
  t.equal(got.length, 1);
  t.equal(got[0]!.length, limit);
});

t.test('unknown flag bits in the prefix are an error, in push and in pushPieces', async (t) => {
  for (const flags of [0x02, 0x03, 0x80, 0xff]) {
    const bytes = Buffer.from([flags, 0, 0, 0, 1, 42]);
    const message = `gRPC message prefix has unknown flags 0x${flags.toString(16)}`;
    expectConnectError(t, () => new FrameDecoder(10).push(bytes, () => t.fail('no frame')), Code.Internal, message);
    expectConnectError(t, () => new FrameDecoder(10).pushPieces(bytes, () => t.fail('no piece')), Code.Internal, message);
    // Split inside the prefix, after a good message.
    const good = frame({ compressed: false, data: Buffer.from('ok') });
    const d = new FrameDecoder(10);
    const got: Buffer[] = [];
    d.push(Buffer.concat([good, bytes.subarray(0, 2)]), (f) => got.push(f.data));
    t.equal(got.length, 1, 'the good message before it is delivered');
    expectConnectError(t, () => d.push(bytes.subarray(2), () => t.fail('no frame')), Code.Internal, message);
  }
});

t.test('idle and pendingBytes report a partial message', async (t) => {
  const d = new FrameDecoder(100);
  t.ok(d.idle);
  const bytes = frame({ compressed: false, data: Buffer.from('0123456789') });
  d.push(bytes.subarray(0, 2), () => {});
  t.notOk(d.idle, 'inside the prefix');
  t.equal(d.pendingBytes, 2);
  d.push(bytes.subarray(2, PREFIX_BYTES), () => {});
  t.notOk(d.idle, 'prefix complete, body not started');
  d.push(bytes.subarray(PREFIX_BYTES, PREFIX_BYTES + 4), () => {});
  t.notOk(d.idle);
  t.equal(d.pendingBytes, 4, 'four body bytes held');
  let n = 0;
  d.push(bytes.subarray(PREFIX_BYTES + 4), () => n++);
  t.equal(n, 1);
  t.ok(d.idle);
  t.equal(d.pendingBytes, 0);

  const p = new FrameDecoder(100);
  p.pushPieces(bytes.subarray(0, PREFIX_BYTES + 3), () => {});
  t.notOk(p.idle, 'pushPieces: inside a message');
  p.pushPieces(bytes.subarray(PREFIX_BYTES + 3), () => {});
  t.ok(p.idle, 'pushPieces: idle at the message end');
});
