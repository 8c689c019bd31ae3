// gRPC's length-prefixed message framing (the body of an application/grpc
// HTTP/2 stream): each message is a 1-byte flag (bit 0: compressed), a 4-byte
// big-endian length, then the message bytes. Used by the ByteStream fast path
// on both sides (src/server/bytestream-fast-path.ts and
// src/stores/remote-bytestream.ts); every other RPC goes through Connect.
import { Code, ConnectError } from '@connectrpc/connect';

/** Bytes of the prefix in front of every gRPC message. */
export const PREFIX_BYTES = 5;

/** One message as it came off the wire. `data` is a view, never a copy, when the message arrived in one chunk. */
export interface Frame {
  readonly compressed: boolean;
  readonly data: Buffer;
}

/** Writes the 5-byte prefix for a message of `length` bytes into `out` at `at`. */
export function writePrefix(out: Buffer, at: number, length: number, compressed = false): void {
  out[at] = compressed ? 1 : 0;
  out.writeUInt32BE(length, at + 1);
}

/**
 * Memory shared by several decoders (the streams of one HTTP/2 connection):
 * reserve() throws (RESOURCE_EXHAUSTED) when the bytes do not fit.
 */
export interface BufferBudget {
  reserve(bytes: number): void;
  release(bytes: number): void;
}

export interface FrameDecoderOptions {
  /** The config field of maxMessageBytes, named in the error (a server's request limit, "limits.maxMessageBytes"). */
  readonly limitName?: string | undefined;
  /**
   * Charged with a message's announced length while it is assembled from
   * several chunks, released when it completes or on dispose(). A message
   * that arrives whole in one chunk is a view and costs nothing.
   */
  readonly budget?: BufferBudget | undefined;
}

/**
 * Splits a byte stream into gRPC messages, however the stream was cut into
 * chunks. A message that lies inside one chunk is returned as a view of it
 * (no copy); one spread over several chunks is joined once, when complete.
 * A message announced larger than `maxMessageBytes` fails with
 * RESOURCE_EXHAUSTED before any of it is buffered, and so does one that
 * would be assembled beyond the budget.
 */
export class FrameDecoder {
  readonly #maxMessageBytes: number;
  readonly #limitName: string | undefined;
  readonly #budget: BufferBudget | undefined;
  /** Chunks of the message (or prefix) being assembled. */
  #parts: Buffer[] = [];
  #partBytes = 0;
  /** The current message's length, or -1 while its prefix is incomplete. */
  #need = -1;
  #compressed = false;
  /** Bytes charged to the budget for the message being assembled. */
  #reserved = 0;

  constructor(maxMessageBytes: number, opts: FrameDecoderOptions = {}) {
    this.#maxMessageBytes = maxMessageBytes;
    this.#limitName = opts.limitName;
    this.#budget = opts.budget;
  }

  /** Drops a partial message and returns its budget (the stream ended or failed). Idempotent. */
  dispose(): void {
    this.#parts = [];
    this.#partBytes = 0;
    this.#need = -1;
    this.#unreserve();
  }

  #unreserve(): void {
    if (this.#reserved === 0) return;
    this.#budget?.release(this.#reserved);
    this.#reserved = 0;
  }

  /** True when no partial message is pending: the stream may end here. */
  get idle(): boolean {
    return this.#partBytes === 0 && this.#need === -1;
  }


  /** Bytes of a partial message held, for error messages. */
  get pendingBytes(): number {
    return this.#partBytes;
  }

  /** Feeds one chunk; calls `onFrame` for every message it completes, in order. */
  push(chunk: Buffer, onFrame: (frame: Frame) => void): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#need === -1) {
        // Reading a prefix, possibly split over chunks.
        if (this.#partBytes === 0 && chunk.length - pos >= PREFIX_BYTES) {
          this.#startMessage(chunk[pos]!, chunk.readUInt32BE(pos + 1));
          pos += PREFIX_BYTES;
        } else {
          const take = Math.min(PREFIX_BYTES - this.#partBytes, chunk.length - pos);
          this.#parts.push(chunk.subarray(pos, pos + take));
          this.#partBytes += take;
          pos += take;
          if (this.#partBytes < PREFIX_BYTES) return;
          const prefix = Buffer.concat(this.#parts, PREFIX_BYTES);
          this.#parts = [];
          this.#partBytes = 0;
          this.#startMessage(prefix[0]!, prefix.readUInt32BE(1));
        }
        if ((this.#need as number) === 0) {
          this.#need = -1;
          onFrame({ compressed: this.#compressed, data: Buffer.alloc(0) });
        }
        continue;
      }
      const missing = this.#need - this.#partBytes;
      const available = chunk.length - pos;
      if (this.#partBytes === 0 && available >= missing) {
        // The whole message is in this chunk: hand out a view.
        const data = chunk.subarray(pos, pos + missing);
        pos += missing;
        this.#need = -1;
        onFrame({ compressed: this.#compressed, data });
        continue;
      }
      const take = Math.min(missing, available);
      if (this.#partBytes === 0 && this.#budget !== undefined) {
        // Assembling starts: the whole message will be held until it completes.
        this.#budget.reserve(this.#need);
        this.#reserved = this.#need;
      }
      this.#parts.push(chunk.subarray(pos, pos + take));
      this.#partBytes += take;
      pos += take;
      if (this.#partBytes === this.#need) {
        const data = Buffer.concat(this.#parts, this.#partBytes);
        this.#parts = [];
        this.#partBytes = 0;
        this.#need = -1;
        this.#unreserve();
        onFrame({ compressed: this.#compressed, data });
      }
    }
  }

  /**
   * Feeds one chunk without assembling messages: calls `onPiece` with each
   * run of message bytes as it arrives (a view of `chunk`), its offset in
   * the message and the message's length. A message's pieces arrive in
   * order and end when offset + piece length equals the length; an empty
   * message is one empty piece. For large messages consumed in pieces (a
   * relayed ReadResponse), so nothing is copied.
   */
  pushPieces(chunk: Buffer, onPiece: (piece: Buffer, offset: number, length: number, compressed: boolean) => void): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#need === -1) {
        const take = Math.min(PREFIX_BYTES - this.#partBytes, chunk.length - pos);
        this.#parts.push(chunk.subarray(pos, pos + take));
        this.#partBytes += take;
        pos += take;
        if (this.#partBytes < PREFIX_BYTES) return;
        const prefix = this.#parts.length === 1 ? this.#parts[0]! : Buffer.concat(this.#parts, PREFIX_BYTES);
        this.#parts = [];
        this.#partBytes = 0;
        this.#startMessage(prefix[0]!, prefix.readUInt32BE(1));
        this.#got = 0;
        if ((this.#need as number) === 0) {
          this.#need = -1;
          onPiece(Buffer.alloc(0), 0, 0, this.#compressed);
        }
        continue;
      }
      const take = Math.min(this.#need - this.#got, chunk.length - pos);
      const piece = chunk.subarray(pos, pos + take);
      pos += take;
      const offset = this.#got;
      this.#got += take;
      const length = this.#need;
      if (this.#got === this.#need) this.#need = -1;
      onPiece(piece, offset, length, this.#compressed);
    }
  }

  /** pushPieces: bytes of the current message delivered so far. */
  #got = 0;

  #startMessage(flags: number, length: number): void {
    if ((flags & ~1) !== 0) {
      throw new ConnectError(`gRPC message prefix has unknown flags 0x${flags.toString(16)}`, Code.Internal);
    }
    if (length > this.#maxMessageBytes) {
      throw new ConnectError(
        this.#limitName === undefined
          ? `gRPC message of ${length} bytes exceeds the limit of ${this.#maxMessageBytes} bytes`
          : `request message of ${length} bytes is larger than ${this.#limitName} (${this.#maxMessageBytes} bytes)`,
        Code.ResourceExhausted,
      );
    }
    this.#compressed = (flags & 1) === 1;
    this.#need = length;
  }
}
