import type { ClientHttp2Stream, IncomingHttpHeaders } from 'node:http2';
import http2 from 'node:http2';
import { Code, ConnectError } from '@connectrpc/connect';
import { ReadResponseData } from './bytestream-codec.ts';
import { FrameDecoder } from './framing.ts';
import { codeFromHttpStatus, errorFromStatus } from './status.ts';

/** Received message bytes queued ahead of the consumer before the stream is paused. */
const QUEUE_HIGH_BYTES = 2 * 1024 * 1024;

/**
 * One gRPC call on a raw HTTP/2 client stream, for the ByteStream fast path
 * to shards (src/stores/remote-bytestream.ts): send framed messages with
 * backpressure, receive messages one at a time, and the final status.
 *
 * The call ends when the response stream ENDS, never when the trailers
 * arrive: node:http2 emits 'trailers' as soon as the frame comes in, while
 * data may still sit unread in the stream's buffer behind it (a slow
 * consumer). Taking the trailers as the end would drop that data and
 * report OK for a truncated blob, the defect that rules undici out
 * (src/transport.ts); test/stores/transport-backpressure.test.ts proves
 * this client against it.
 *
 * Every failure is a ConnectError: the server's grpc-status, INTERNAL for
 * a response that is not gRPC or breaks the protocol, UNAVAILABLE for a
 * stream reset or a lost connection.
 */
export class GrpcClientCall {
  readonly #stream: ClientHttp2Stream;
  readonly #queue: Buffer[] = [];
  #queuedBytes = 0;
  #status: ConnectError | null | undefined; // undefined: not yet known; null: OK
  #ended = false;
  #failure: ConnectError | undefined;
  #wake: (() => void) | undefined;
  #trailersOnly = false;

  /**
   * With `readResponseData`, next() returns the data of ReadResponses in
   * pieces as they arrive (views, never assembled or copied) rather than
   * whole messages.
   */
  constructor(
    stream: ClientHttp2Stream,
    maxMessageBytes: number,
    opts?: { readonly readResponseData?: boolean },
  ) {
    this.#stream = stream;
    const decoder = new FrameDecoder(maxMessageBytes);
    const enqueue = (data: Buffer) => {
      this.#queue.push(data);
      this.#queuedBytes += data.length;
    };
    const pieces = opts?.readResponseData === true ? new ReadResponseData() : undefined;
    const noCompression = () =>
      new ConnectError('the server sent a compressed message though none was offered', Code.Internal);
    stream.on('response', (headers: IncomingHttpHeaders) => {
      const status = Number(headers[':status']);
      if (status !== 200) {
        this.#fail(new ConnectError(`HTTP status ${status} instead of a gRPC response`, codeFromHttpStatus(status)));
        return;
      }
      const type = headers['content-type'] ?? '';
      if (!/^application\/grpc(\+proto)?($|;)/i.test(type)) {
        this.#fail(new ConnectError(`response content-type "${type}" is not gRPC`, Code.Internal));
        return;
      }
      if (headers['grpc-status'] !== undefined) {
        this.#trailersOnly = true;
        this.#status = errorFromStatus(headers['grpc-status'], headers['grpc-message']) ?? null;
      }
    });
    stream.on('data', (chunk: Buffer) => {
      if (this.#failure !== undefined) return;
      try {
        if (pieces !== undefined) {
          decoder.pushPieces(chunk, (piece, offset, length, compressed) => {
            if (compressed) throw noCompression();
            pieces.piece(piece, offset, length, enqueue);
          });
        } else {
          decoder.push(chunk, (frame) => {
            if (frame.compressed) throw noCompression();
            enqueue(frame.data);
          });
        }
      } catch (err) {
        this.#fail(err as ConnectError);
        return;
      }
      if (this.#queuedBytes > QUEUE_HIGH_BYTES) stream.pause();
      this.#notify();
    });
    stream.on('trailers', (trailers: IncomingHttpHeaders) => {
      // Only noted: the call ends at 'end', after every buffered byte.
      this.#status = errorFromStatus(trailers['grpc-status'], trailers['grpc-message']) ?? null;
    });
    // A response that ends without its status (or inside a message) is the
    // server's fault only if the connection is still fine; when the shard
    // died, node may end the stream before it reports the reset. 'close'
    // always follows 'end' and knows which it was.
    let endProblem: ConnectError | undefined;
    stream.on('end', () => {
      if (this.#failure !== undefined) return;
      if (!decoder.idle) {
        endProblem = new ConnectError(`the response ended inside a message (${decoder.pendingBytes} bytes of it received)`, Code.Internal);
      } else if (this.#status === undefined) {
        endProblem = new ConnectError('the response ended without a grpc-status', Code.Internal);
      } else {
        this.#ended = true;
        this.#notify();
      }
    });
    // A reset with an error code arrives as 'error' (before 'close'): the
    // server shedding load (ENHANCE_YOUR_CALM) is RESOURCE_EXHAUSTED there too.
    stream.on('error', (err) => {
      const code = stream.rstCode === http2.constants.NGHTTP2_ENHANCE_YOUR_CALM ? Code.ResourceExhausted : Code.Unavailable;
      this.#fail(new ConnectError(`HTTP/2 stream failed: ${err.message}`, code, undefined, undefined, err));
    });
    // node clears stream.session once the stream is destroyed, before 'close'.
    const session = stream.session;
    stream.on('close', () => {
      if (this.#ended || this.#failure !== undefined) return;
      const rst = stream.rstCode;
      const connectionLost = session === undefined || session.destroyed || session.closed;
      if (endProblem !== undefined && !connectionLost && (rst === undefined || rst === http2.constants.NGHTTP2_NO_ERROR)) {
        this.#fail(endProblem);
        return;
      }
      this.#fail(
        new ConnectError(
          connectionLost
            ? 'the connection to the server was lost mid-call'
            : rst === undefined || rst === http2.constants.NGHTTP2_NO_ERROR
              ? 'HTTP/2 stream closed before the call ended'
              : `HTTP/2 stream reset by the server (code ${rst})`,
          rst === http2.constants.NGHTTP2_ENHANCE_YOUR_CALM ? Code.ResourceExhausted : Code.Unavailable,
        ),
      );
    });
  }

  /** True once the server has sent its final status (it will read no more of the request). */
  get statusReceived(): boolean {
    return this.#status !== undefined || this.#failure !== undefined;
  }

  /** True for a trailers-only answer: the server failed (or answered) without sending a message. */
  get trailersOnly(): boolean {
    return this.#trailersOnly;
  }

  /**
   * Writes one message (its pieces in one writev); resolves once HTTP/2 flow
   * control lets more through. Rejects with the call's failure, if any.
   */
  async send(head: Buffer, body?: Uint8Array): Promise<void> {
    if (this.#failure !== undefined) throw this.#failure;
    const stream = this.#stream;
    stream.cork();
    stream.write(head);
    if (body !== undefined && body.byteLength > 0) stream.write(body);
    stream.uncork();
    if (!stream.writableNeedDrain) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        stream.removeListener('drain', done);
        stream.removeListener('close', done);
        this.#wakeSender = undefined;
        resolve();
      };
      stream.once('drain', done);
      stream.once('close', done);
      this.#wakeSender = done;
    });
    if (this.#failure !== undefined) throw this.#failure;
  }

  #wakeSender: (() => void) | undefined;

  /** Half-closes the request: no more messages. */
  endRequest(): void {
    if (!this.#stream.writableEnded) this.#stream.end();
  }

  /**
   * The next response message, or undefined once the response ended with
   * status OK. Throws the server's status, or the stream's failure.
   */
  async next(): Promise<Buffer | undefined> {
    for (;;) {
      const msg = this.#queue.shift();
      if (msg !== undefined) {
        this.#queuedBytes -= msg.length;
        if (this.#queuedBytes <= QUEUE_HIGH_BYTES / 2 && this.#stream.isPaused()) this.#stream.resume();
        return msg;
      }
      if (this.#failure !== undefined) throw this.#failure;
      if (this.#ended) {
        if (this.#status !== null && this.#status !== undefined) throw this.#status;
        return undefined;
      }
      if (this.#stream.isPaused()) this.#stream.resume();
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
  }

  /** Cancels the call (RST_STREAM CANCEL); pending and later next() calls fail with `reason`. */
  cancel(reason: ConnectError): void {
    this.#fail(reason);
    if (!this.#stream.closed && !this.#stream.destroyed) this.#stream.close(http2.constants.NGHTTP2_CANCEL);
  }

  #fail(err: ConnectError): void {
    if (this.#failure !== undefined || this.#ended) return;
    // A status the server already sent explains the reset better than the reset.
    this.#failure = this.#status ?? err;
    this.#notify();
    this.#wakeSender?.();
    if (!this.#stream.closed && !this.#stream.destroyed) this.#stream.close(http2.constants.NGHTTP2_CANCEL);
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }
}
