// An anchor for bench/wire.ts, not product code: the runtime's limit for the
// ByteStream data path. A bare node:http2 h2c gRPC server with no Connect and
// no protobuf-es objects, serving only what the bench needs:
//   - ByteStream Read of a whole blob (no offset/limit): the file is read in
//     256 KiB pieces, each written as ONE buffer holding the 5-byte gRPC
//     prefix, the ReadResponse field-10 tag and varint length, then the bytes
//     (read straight into that buffer: no copy); then trailers grpc-status 0.
//   - ByteStream Write: WriteRequests parsed by hand as the bytes arrive (gRPC
//     framing and protobuf fields may straddle chunk boundaries; the data
//     field is never copied), sha256 on the fly, written to a temp file,
//     verified against the resource name's digest and renamed into place;
//     answers WriteResponse{committed_size}.
// Blobs live in a temp dir removed at exit. Announces "LISTENING <port>" on
// stdout. With --tls-cert and --tls-key the port speaks TLS (ALPN h2 only,
// http2.createSecureServer, same settings): the runtime's limit over TLS.
// Usage: node bench/anchors/bare-http2-server.ts [--port 0] [--tls-cert PEM --tls-key PEM]
import { createHash, randomUUID } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, unlinkSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import http2 from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const PIECE = 256 * 1024;
const WINDOW = 16 * 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'bare-http2-'));
const blobPath = (hash: string, size: number) => join(dir, `${hash}-${size}`);

/** "{instance}/blobs/{hash}/{size}" or "{instance}/uploads/{uuid}/blobs/{hash}/{size}". */
function parseResource(name: string): { hash: string; size: number } | undefined {
  const m = /(?:^|\/)blobs\/([0-9a-f]{64})\/(\d+)(?:\/|$)/.exec(name);
  return m ? { hash: m[1]!, size: Number(m[2]) } : undefined;
}

function trailersOnly(stream: http2.ServerHttp2Stream, code: number, message: string): void {
  stream.respond(
    { ':status': 200, 'content-type': 'application/grpc', 'grpc-status': String(code), 'grpc-message': encodeURIComponent(message) },
    { endStream: true },
  );
}

function varint(n: number, out: Buffer, at: number): number {
  while (n >= 0x80) {
    out[at++] = (n % 0x80) | 0x80;
    n = Math.floor(n / 0x80);
  }
  out[at++] = n;
  return at;
}

/** The length of a varint for n. */
function varintLength(n: number): number {
  let len = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    len++;
  }
  return len;
}

async function collect(stream: http2.ServerHttp2Stream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

/** ReadRequest.resource_name (field 1) from a unary gRPC request body. */
function readRequestName(body: Buffer): string {
  let pos = 5; // gRPC prefix; one message
  while (pos < body.length) {
    const key = body[pos++]!;
    if (key >> 3 === 1 && (key & 7) === 2) {
      let len = 0;
      let shift = 1;
      for (;;) {
        const b = body[pos++]!;
        len += (b & 0x7f) * shift;
        shift *= 0x80;
        if (b < 0x80) break;
      }
      return body.toString('utf8', pos, pos + len);
    }
    return ''; // offset and limit are not supported by this anchor
  }
  return '';
}

async function serveRead(stream: http2.ServerHttp2Stream): Promise<void> {
  const name = readRequestName(await collect(stream));
  const blob = parseResource(name);
  if (!blob) return trailersOnly(stream, 3, `bad resource name ${name}`);
  let file;
  try {
    file = await open(blobPath(blob.hash, blob.size));
  } catch {
    return trailersOnly(stream, 5, `blob ${blob.hash}/${blob.size} not found`);
  }
  try {
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    const headerRoom = 5 + 1 + varintLength(PIECE);
    for (let offset = 0; offset < blob.size; ) {
      const buf = Buffer.allocUnsafe(headerRoom + PIECE);
      const { bytesRead } = await file.read(buf, headerRoom, Math.min(PIECE, blob.size - offset), offset);
      if (bytesRead === 0) throw new Error('file shorter than its name says');
      offset += bytesRead;
      // The header goes right before the data: [0, flags, len32][0x52][varint n][data]
      const start = headerRoom - (1 + varintLength(bytesRead)) - 5;
      buf[start] = 0;
      buf.writeUInt32BE(1 + varintLength(bytesRead) + bytesRead, start + 1);
      buf[start + 5] = (10 << 3) | 2;
      varint(bytesRead, buf, start + 6);
      if (!stream.write(buf.subarray(start, headerRoom + bytesRead))) {
        await new Promise<void>((res, rej) => {
          const onClose = () => rej(new Error('stream closed'));
          stream.once('close', onClose);
          stream.once('drain', () => {
            stream.off('close', onClose);
            res();
          });
        });
      }
    }
    stream.end();
  } finally {
    await file.close();
  }
}

/**
 * A push parser for a stream of gRPC-framed WriteRequests: resource_name (1),
 * write_offset (2), finish_write (3), data (10). Prefixes, keys and varints
 * are taken a byte at a time (a few per message), strings are gathered, data
 * is handed on as subarrays of the arriving chunks.
 */
class WriteRequestParser {
  onName: (name: string) => void = () => {};
  onData: (bytes: Buffer) => void = () => {};
  onFinish: () => void = () => {};
  #state: 'prefix' | 'key' | 'varint' | 'length' | 'bytes' = 'prefix';
  #prefixLeft = 5;
  #messageLeft = 0; // bytes of the current message not yet consumed
  #field = 0;
  #num = 0;
  #mul = 1;
  #bytesLeft = 0;
  #str: Buffer[] = [];

  push(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#state === 'bytes') {
        const n = Math.min(this.#bytesLeft, chunk.length - pos);
        const part = chunk.subarray(pos, pos + n);
        if (this.#field === 10) this.onData(part);
        else if (this.#field === 1) this.#str.push(part);
        pos += n;
        this.#messageLeft -= n;
        this.#bytesLeft -= n;
        if (this.#bytesLeft === 0) {
          if (this.#field === 1) this.onName(Buffer.concat(this.#str).toString('utf8'));
          this.#str = [];
          this.#next();
        }
        continue;
      }
      const b = chunk[pos++]!;
      if (this.#state === 'prefix') {
        if (this.#prefixLeft <= 4) this.#messageLeft = this.#messageLeft * 256 + b; // bytes 1-4: length
        else if (b !== 0) throw new Error('compressed gRPC messages are not supported');
        if (--this.#prefixLeft === 0) this.#next();
        continue;
      }
      this.#messageLeft--;
      this.#num += (b & 0x7f) * this.#mul;
      this.#mul *= 0x80;
      if (b >= 0x80) continue;
      const value = this.#num;
      this.#num = 0;
      this.#mul = 1;
      if (this.#state === 'key') {
        this.#field = Math.floor(value / 8);
        const wire = value % 8;
        if (wire === 0) this.#state = 'varint';
        else if (wire === 2) this.#state = 'length';
        else throw new Error(`unexpected wire type ${wire}`);
      } else if (this.#state === 'varint') {
        if (this.#field === 3 && value !== 0) this.onFinish();
        this.#next();
      } else {
        this.#bytesLeft = value;
        this.#state = 'bytes';
        if (value === 0) this.#next();
      }
    }
  }

  /** After a field: the next key, or the next message's prefix. */
  #next(): void {
    if (this.#messageLeft > 0) {
      this.#state = 'key';
    } else {
      this.#state = 'prefix';
      this.#prefixLeft = 5;
      this.#messageLeft = 0;
    }
  }
}

function serveWrite(stream: http2.ServerHttp2Stream): void {
  let blob: { hash: string; size: number } | undefined;
  let temp = '';
  let fd = -1;
  let received = 0;
  let finished = false;
  let failed = false;
  const hash = createHash('sha256');
  const fail = (code: number, message: string) => {
    failed = true;
    if (fd >= 0) closeSync(fd);
    fd = -1;
    if (temp) rmSync(temp, { force: true });
    if (!stream.headersSent) trailersOnly(stream, code, message);
    stream.resume(); // drain the rest of the request
  };
  const parser = new WriteRequestParser();
  parser.onName = (name) => {
    if (blob) return; // only the first message names the blob
    blob = parseResource(name);
    if (!blob) throw new Error(`bad resource name ${name}`);
    temp = join(dir, `tmp-${randomUUID()}`);
    fd = openSync(temp, 'w');
  };
  parser.onData = (bytes) => {
    if (fd < 0) throw new Error('data before a resource name');
    hash.update(bytes);
    writeSync(fd, bytes, 0, bytes.length, received);
    received += bytes.length;
  };
  parser.onFinish = () => {
    finished = true;
  };
  stream.on('data', (chunk: Buffer) => {
    if (failed) return;
    try {
      parser.push(chunk);
    } catch (err) {
      fail(3, (err as Error).message);
    }
  });
  stream.on('end', () => {
    if (failed) return;
    if (!blob || fd < 0) return fail(3, 'no WriteRequest named a blob');
    closeSync(fd);
    fd = -1;
    const got = hash.digest('hex');
    if (!finished || received !== blob.size || got !== blob.hash) {
      unlinkSync(temp);
      return fail(3, `received ${received} bytes hashing to ${got}, finish_write ${finished}`);
    }
    renameSync(temp, blobPath(blob.hash, blob.size));
    const msg = Buffer.alloc(5 + 1 + 10);
    const end = varint(blob.size, msg, 6);
    msg[5] = (1 << 3) | 0; // WriteResponse.committed_size
    msg.writeUInt32BE(end - 5, 1);
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(msg.subarray(0, end));
  });
}

const argValue = (flag: string): string | undefined => {
  const i = process.argv.indexOf(flag);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const tlsCert = argValue('--tls-cert');
const tlsKey = argValue('--tls-key');
if ((tlsCert === undefined) !== (tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
const settings = { initialWindowSize: WINDOW, maxFrameSize: 1024 * 1024 - 1 };
const server =
  tlsCert !== undefined && tlsKey !== undefined
    ? http2.createSecureServer({ settings, cert: readFileSync(tlsCert), key: readFileSync(tlsKey), ALPNProtocols: ['h2'] })
    : http2.createServer({ settings });
server.on('session', (session) => {
  session.on('error', () => {});
  session.setLocalWindowSize(4 * WINDOW); // the connection window, for uploads
});
server.on('stream', (stream, headers) => {
  stream.on('error', () => {});
  const path = headers[':path'];
  if (path === '/google.bytestream.ByteStream/Read') {
    serveRead(stream).catch((err: Error) => {
      if (!stream.headersSent) trailersOnly(stream, 13, err.message);
      else stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
    });
  } else if (path === '/google.bytestream.ByteStream/Write') {
    serveWrite(stream);
  } else {
    stream.resume();
    trailersOnly(stream, 12, `${String(path)} is not served by this anchor`);
  }
});

const cleanup = () => rmSync(dir, { recursive: true, force: true });
process.on('exit', cleanup);
for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => process.exit(0));

server.listen(Number(argValue('--port') ?? 0), '127.0.0.1', () => {
  console.log(`LISTENING ${(server.address() as { port: number }).port}`);
});
