// Limits on what a client may make the server hold: the size of one request
// message, the size of a Connect/JSON body, and the bytes of partly received
// messages one HTTP/2 connection may have buffered at once. Used by the
// gRPC routes in app.ts and the ByteStream fast path; the limits themselves
// are config (LimitsConfig, config.json "limits").
import { Code, ConnectError } from '@connectrpc/connect';
import type { UniversalHandler, UniversalServerRequest } from '@connectrpc/connect/protocol';
import type { BufferBudget } from '../grpc/framing.ts';
import { PREFIX_BYTES } from '../grpc/framing.ts';

/** The config field each limit comes from, as error messages name it. */
export const MESSAGE_LIMIT = 'limits.maxMessageBytes';
export const JSON_LIMIT = 'limits.maxJsonBodyBytes';
export const CONNECTION_LIMIT = 'limits.maxConnectionBufferBytes';

export function messageTooLarge(bytes: number, limit: number, field = MESSAGE_LIMIT): ConnectError {
  return new ConnectError(`request message of ${bytes} bytes is larger than ${field} (${limit} bytes)`, Code.ResourceExhausted);
}

/**
 * The bytes of partly received request messages one HTTP/2 connection
 * holds, over all its streams. A message's announced length is charged when
 * the server starts assembling it and released when it is complete or its
 * stream ends, so a client cannot make the server hold more than `limit`
 * bytes of unfinished messages by opening many streams. A message that
 * would pass the limit fails its own call with RESOURCE_EXHAUSTED (gRPC
 * clients, Bazel included, retry that with backoff); the other streams are
 * untouched.
 */
export class ConnectionBudget implements BufferBudget {
  readonly limit: number;
  #used = 0;

  constructor(limit: number) {
    this.limit = limit;
  }

  get used(): number {
    return this.#used;
  }

  reserve(bytes: number): void {
    if (this.#used + bytes > this.limit) {
      throw new ConnectError(
        `this connection already holds ${this.#used} bytes of partly received request messages; ` +
          `a further message of ${bytes} bytes would pass ${CONNECTION_LIMIT} (${this.limit} bytes)`,
        Code.ResourceExhausted,
      );
    }
    this.#used += bytes;
  }

  release(bytes: number): void {
    this.#used -= bytes;
  }
}

/** One ConnectionBudget per HTTP/2 session, made on first use and dropped with the session. */
export function connectionBudgets(limit: number): (session: object | undefined) => ConnectionBudget | undefined {
  const budgets = new WeakMap<object, ConnectionBudget>();
  return (session) => {
    if (session === undefined) return undefined;
    let budget = budgets.get(session);
    if (budget === undefined) {
      budget = new ConnectionBudget(limit);
      budgets.set(session, budget);
    }
    return budget;
  };
}

/**
 * Watches a stream of enveloped messages (gRPC, gRPC-web, Connect
 * streaming: a flag byte and a 4-byte big-endian length before each) go by
 * without holding or copying any of it: each message announced larger than
 * `limit` fails at its prefix, and a message that will not arrive in the
 * chunk that announced it is charged to `budget` until its last byte has
 * gone by. Per chunk it costs a few comparisons; per message one read of
 * the length.
 */
export class EnvelopeWatcher {
  readonly #limit: number;
  readonly #field: string;
  readonly #budget: BufferBudget | undefined;
  /** Bytes of the current message still to come; 0 between messages. */
  #remaining = 0;
  /** A prefix split over chunks. */
  #prefix: Uint8Array | undefined;
  #prefixFill = 0;
  #reserved = 0;

  constructor(limit: number, field: string, budget?: BufferBudget) {
    this.#limit = limit;
    this.#field = field;
    this.#budget = budget;
  }

  /** True between messages: a stream that ends here ends cleanly. */
  get idle(): boolean {
    return this.#remaining === 0 && this.#prefixFill === 0;
  }

  /** Inspects one chunk; throws RESOURCE_EXHAUSTED for a message past a limit. */
  push(chunk: Uint8Array): void {
    const n = chunk.byteLength;
    let pos = 0;
    while (pos < n) {
      if (this.#remaining > 0) {
        const take = Math.min(this.#remaining, n - pos);
        pos += take;
        this.#remaining -= take;
        if (this.#remaining === 0) this.release();
        continue;
      }
      let length: number;
      if (this.#prefixFill === 0 && n - pos >= PREFIX_BYTES) {
        length = readLength(chunk, pos + 1);
        pos += PREFIX_BYTES;
      } else {
        const prefix = (this.#prefix ??= new Uint8Array(PREFIX_BYTES));
        while (this.#prefixFill < PREFIX_BYTES && pos < n) prefix[this.#prefixFill++] = chunk[pos++]!;
        if (this.#prefixFill < PREFIX_BYTES) return;
        this.#prefixFill = 0;
        length = readLength(prefix, 1);
      }
      if (length > this.#limit) throw messageTooLarge(length, this.#limit, this.#field);
      this.#remaining = length;
      if (length > n - pos && this.#budget !== undefined) {
        this.#budget.reserve(length);
        this.#reserved = length;
      }
    }
  }

  /** Returns what is charged to the budget (the message completed, or the stream ended). Idempotent. */
  release(): void {
    if (this.#reserved === 0) return;
    this.#budget?.release(this.#reserved);
    this.#reserved = 0;
  }
}

function readLength(bytes: Uint8Array, at: number): number {
  return bytes[at]! * 0x1000000 + ((bytes[at + 1]! << 16) | (bytes[at + 2]! << 8) | bytes[at + 3]!);
}

export interface BodyLimits {
  /** Binary messages (protobuf), one at a time. */
  readonly maxMessageBytes: number;
  /** Connect/JSON bodies (and JSON messages of the streaming protocols). */
  readonly maxJsonBodyBytes: number;
}

/**
 * Wraps a Connect handler so that its request body is held to the limit of
 * its encoding before Connect reads it: binary messages to maxMessageBytes,
 * JSON to maxJsonBodyBytes. Connect itself has one readMaxBytes for every
 * protocol, set to the larger of the two; this narrows it per request, and
 * names the config field in the error. Enveloped protocols (gRPC, gRPC-web,
 * Connect streaming) are checked message by message as they arrive, a
 * Connect unary body by its Content-Length and then as it is read (the
 * header is checked here and not passed on, so that Connect's own check of
 * it against readMaxBytes does not answer first with a vaguer message).
 * Compressed messages are held to the limit as sent; Connect bounds their
 * decompressed size by readMaxBytes. After a violation the rest of the
 * body is read and dropped: over HTTP/1.1 the connection can only carry the
 * next request once this one's body is consumed, and over HTTP/2 the client
 * is not left stalled on flow control before it reads the answer.
 */
export function limitRequestBody(
  handler: UniversalHandler,
  limits: BodyLimits,
  budgetOf: (req: UniversalServerRequest) => BufferBudget | undefined,
): UniversalHandler {
  const limited = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== 'object' || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    const contentType = (req.header.get('content-type') ?? '').toLowerCase();
    const json = /^application\/(?:(?:connect|grpc|grpc-web)\+)?json(?:;|$)/.test(contentType);
    const limit = json ? limits.maxJsonBodyBytes : limits.maxMessageBytes;
    const field = json ? JSON_LIMIT : MESSAGE_LIMIT;
    // Connect unary: the body is the message, unenveloped.
    const unary = /^application\/(?:json|proto)(?:;|$)/.test(contentType);
    const chunks = body as AsyncIterable<Uint8Array>;
    if (!unary) return handler({ ...req, body: watchedBody(chunks, new EnvelopeWatcher(limit, field, budgetOf(req))) });
    const header = new Headers(req.header);
    const contentLength = header.get('content-length');
    header.delete('content-length');
    return handler({ ...req, header, body: checkedUnaryBody(chunks, contentLength, limit, field) });
  };
  return Object.assign(limited, {
    requestPath: handler.requestPath,
    protocolNames: handler.protocolNames,
    supportedContentType: handler.supportedContentType,
    allowedMethods: handler.allowedMethods,
    service: handler.service,
    method: handler.method,
  }) as UniversalHandler;
}

async function* checkedUnaryBody(
  body: AsyncIterable<Uint8Array>,
  contentLength: string | null,
  limit: number,
  field: string,
): AsyncGenerator<Uint8Array> {
  const it = body[Symbol.asyncIterator]();
  const announced = contentLength === null ? undefined : Number(contentLength);
  if (announced !== undefined && announced > limit) {
    drain(it);
    throw messageTooLarge(announced, limit, field);
  }
  let total = 0;
  for (;;) {
    const r = await it.next();
    if (r.done === true) break;
    total += r.value.byteLength;
    if (total > limit) {
      drain(it);
      throw new ConnectError(`request body is larger than ${field} (${limit} bytes)`, Code.ResourceExhausted);
    }
    yield r.value;
  }
  if (announced !== undefined && Number.isSafeInteger(announced) && total !== announced) {
    throw new ConnectError(`protocol error: promised ${announced} bytes, received ${total}`, Code.InvalidArgument);
  }
}

async function* watchedBody(body: AsyncIterable<Uint8Array>, watcher: EnvelopeWatcher): AsyncGenerator<Uint8Array> {
  const it = body[Symbol.asyncIterator]();
  try {
    for (;;) {
      const r = await it.next();
      if (r.done === true) return;
      try {
        watcher.push(r.value);
      } catch (err) {
        drain(it);
        throw err;
      }
      yield r.value;
    }
  } finally {
    watcher.release();
  }
}

/** Reads what is left of a request body and drops it, in the background. */
function drain(it: AsyncIterator<Uint8Array>): void {
  void (async () => {
    for (;;) if ((await it.next()).done === true) return;
  })().catch(() => {});
}
