import type { DescMethod } from '@bufbuild/protobuf';
import type { HandlerContext, Interceptor } from '@connectrpc/connect';
import type { ContextValues } from '@connectrpc/connect';
import { Code, ConnectError, createContextKey, createContextValues } from '@connectrpc/connect';
import { fastifyConnectPlugin } from '@connectrpc/connect-fastify';
import { universalResponseToNodeResponse } from '@connectrpc/connect-node';
import type { UniversalHandler, UniversalServerRequest } from '@connectrpc/connect/protocol';
import { contentTypeRegExp as grpcContentType } from '@connectrpc/connect/protocol-grpc';
import fastify, { LogController } from 'fastify';
import type { FastifyInstance, FastifyServerFactory } from 'fastify';
import type { Http2Server, Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { Logger } from 'pino';
import type { AuthConfig, LimitsConfig, ServerTlsConfig } from '../config.ts';
import { isEarlyFailureRecorder } from '../admin/metrics.ts';
import type { EarlyFailureRecorder } from '../admin/metrics.ts';
import { DEFAULT_LIMITS } from '../config.ts';
import { RESET_GRACE_MS } from '../errors.ts';
import type { BufferBudget } from '../grpc/framing.ts';
import { createAuthorizer } from '../auth/authorizer.ts';
import { kIdentity } from '../auth/context.ts';
import type { ServiceDeps } from '../services/deps.ts';
import { type RequestContext, requestContext } from '../request-context.ts';
import { headersFromHttp2 } from '../grpc/status.ts';
import { createByteStreamCore } from '../services/bytestream.ts';
import { registerServices } from '../services/index.ts';
import { createByteStreamFastPath } from './bytestream-fast-path.ts';
import { connectionBudgets, EnvelopeWatcher, limitRequestBody, MESSAGE_LIMIT } from './input-limits.ts';
import { createOnePortServer, peerOf } from './listen.ts';
import type { OnePortServerOptions, RequestHandler } from './listen.ts';
import { kPeer } from './peer.ts';
import type { PeerInfo } from './peer.ts';
import { TlsContext } from './tls.ts';

export interface AppOptions {
  readonly deps: ServiceDeps;
  readonly logger: Logger;
  /**
   * On close, in-flight RPCs get this long to finish; then they are cancelled
   * and their clients see UNAVAILABLE. Default 10 s.
   */
  readonly shutdownTimeoutMs?: number | undefined;
  /**
   * Interceptors that run outside the logging one (e.g. metrics), so they
   * see the codes clients see.
   */
  readonly interceptors?: readonly Interceptor[] | undefined;
  /** HTTP/2 window sizes and the like; see createOnePortServer. */
  readonly server?: Omit<OnePortServerOptions, 'logger'> | undefined;
  /** Input limits (message sizes, streams, connections, timeouts); DEFAULT_LIMITS when absent. */
  readonly limits?: LimitsConfig | undefined;
  /** TLS on the port; absent: cleartext. */
  readonly tls?: ServerTlsConfig | undefined;
  /** Authentication and authorization; absent: every caller may do everything. */
  readonly auth?: AuthConfig | undefined;
}

/** Per-call state for the one log line per RPC. */
interface CallInfo {
  readonly peer: string | undefined;
  readonly requestId: string;
  readonly started: number;
  /** Set once the RPC's line is written, so it is written once. */
  logged: boolean;
  /** Set once the interceptors run (they count the RPC in metrics; before that, the request gate does). */
  intercepted?: boolean;
}

const kCall = createContextKey<CallInfo>({ peer: undefined, requestId: '', started: 0, logged: true, intercepted: true });

/**
 * Builds (but does not start) the storage node's fastify app: every gRPC
 * service from src/services/index.ts over gRPC, gRPC-web and Connect, on one
 * port that speaks HTTP/2 (Bazel) and HTTP/1.1 (curl), cleartext or, with
 * `tls`, TLS only (see createOnePortServer).
 * main.ts (or a test) calls `app.listen({host, port})` and `app.close()`.
 *
 * On close: health turns NOT_SERVING and Watch streams end, new connections
 * are refused, HTTP/2 clients get GOAWAY, in-flight RPCs have
 * shutdownTimeoutMs to finish before they are cancelled, and connections
 * still open shortly after that are destroyed. The stores are not closed
 * here: they belong to whoever built them.
 */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const { logger } = opts;
  const shutdownTimeoutMs = opts.shutdownTimeoutMs ?? 10_000;
  const draining = new AbortController();
  const limits = opts.limits ?? opts.deps.limits ?? DEFAULT_LIMITS;
  const deps: ServiceDeps = {
    ...opts.deps,
    limits: opts.deps.limits ?? limits,
    isReady: () => !draining.signal.aborted && opts.deps.isReady(),
  };

  // Request size limits (README, "Limits"): binary messages are held to
  // maxMessageBytes on every path (the fast path's and the direct routes'
  // framing, limitRequestBody on fastify's), Connect/JSON bodies to
  // maxJsonBodyBytes. Connect's own readMaxBytes, one for every protocol, is
  // the larger of the two and is what bounds decompressed messages.
  const { maxMessageBytes, maxJsonBodyBytes } = limits;
  const connectMaxBytes = Math.max(maxMessageBytes, maxJsonBodyBytes);
  // Bytes of partly received messages each HTTP/2 connection may hold.
  const budgetOf = connectionBudgets(limits.maxConnectionBufferBytes);
  const shutdownError = new ConnectError('server is shutting down', Code.Unavailable);
  // The authorizer runs inside the logging interceptor: a denied call still
  // gets its one log line (with the identity, which the authorizer puts in
  // the call's context) and its metrics (outermost), and whatever it throws
  // is mapped like any handler error. Both paths (Connect and the ByteStream
  // fast path) run this same chain.
  const interceptors = [
    ...(opts.interceptors ?? []),
    rpcInterceptor(logger, shutdownError),
    ...(opts.auth === undefined ? [] : [createAuthorizer(opts.auth, { logger: logger.child({ component: 'auth' }) })]),
  ];
  // kPeer: the connection's peer (address, TLS, verified client certificate CN), computed once per connection.
  const callValues = (peer: PeerInfo, requestId: string) =>
    createContextValues()
      .set(kCall, { peer: peer.address, requestId, started: performance.now(), logged: false })
      .set(kPeer, peer);
  let fastCalls = 0;

  // ByteStream Read/Write over gRPC bypass fastify and Connect (see
  // bytestream-fast-path.ts for why); everything else goes to fastify.
  const fastPath = createByteStreamFastPath({
    core: createByteStreamCore(deps),
    interceptors,
    // Ids of their own ("bs-N"), apart from fastify's "req-N".
    contextValues: (req) => callValues(peerOf(req), `bs-${++fastCalls}`),
    maxMessageBytes,
    maxMessageBytesName: MESSAGE_LIMIT,
    bufferBudget: (req) => budgetOf(req.stream.session),
    logger: logger.child({ component: 'bytestream-fast-path' }),
  });
  let fastPathKill: NodeJS.Timeout | undefined;
  // Filled once the Connect plugin has registered its handlers.
  let direct: DirectRoutes | undefined;

  // Read and checked now: a bad file fails buildApp with a ConfigError naming the field.
  const tls = opts.tls === undefined ? undefined : await TlsContext.load(opts.tls, { logger: logger.child({ component: 'tls' }) });
  const serverFactory = ((handler: RequestHandler) =>
    createOnePortServer((req, res) => {
      if ('stream' in req && fastPath.handles(req)) fastPath.serve(req);
      else if (!('stream' in req && direct?.serve(req, res as Http2ServerResponse))) handler(req, res);
    }, {
      drainTimeoutMs: shutdownTimeoutMs + 2000,
      limits: opts.limits,
      tls,
      ...opts.server,
      logger: logger.child({ component: 'server' }),
    })) as unknown as FastifyServerFactory<Http2Server>;

  const app = fastify({
    http2: true,
    serverFactory,
    loggerInstance: logger.child({ component: 'http' }),
    // One log line per RPC comes from the interceptor below instead.
    logController: new LogController({ disableRequestLogging: true }),
  }) as unknown as FastifyInstance;

  app.addHook('preClose', (done) => {
    draining.abort();
    // Fast-path calls get the same grace as Connect's (shutdownTimeoutMs below).
    fastPathKill = setTimeout(() => fastPath.abortAll(shutdownError), shutdownTimeoutMs).unref();
    done();
  });
  app.addHook('onClose', (_app, done) => {
    clearTimeout(fastPathKill);
    done();
  });

  await app.register(fastifyConnectPlugin, {
    grpc: true,
    grpcWeb: true,
    connect: true,
    routes: (router) => {
      registerServices(router, deps, { draining: draining.signal });
      direct = directRoutes(router.handlers, callValues, logger, draining.signal, { maxMessageBytes, budgetOf });
      // What fastify serves (Connect, gRPC-web, anything over HTTP/1.1) gets
      // its body held to the limit of its encoding (the direct routes check
      // their gRPC framing themselves, in requestBody).
      const limited = router.handlers.map((h) => limitRequestBody(h, limits, (req) => req.contextValues?.get(kBudget)));
      router.handlers.splice(0, router.handlers.length, ...limited);
    },
    interceptors,
    requestGate: watchEarlyErrors(
      logger,
      (opts.interceptors ?? []).filter((i): i is Interceptor & EarlyFailureRecorder => isEarlyFailureRecorder(i)),
    ),
    readMaxBytes: connectMaxBytes,
    writeMaxBytes: connectMaxBytes,
    // Never gzip responses: blobs are mostly incompressible or already
    // compressed, REAPI has its own compression (compressed-blobs/zstd), and
    // gzip of every read message made ByteStream reads 5-8x slower because
    // clients such as connect-node advertise gzip by default. Compressed
    // requests are still accepted.
    compressMinBytes: Number.MAX_SAFE_INTEGER,
    // For curl users: a misspelt field is an error, not silently ignored.
    jsonOptions: { ignoreUnknownFields: false },
    shutdownTimeoutMs,
    shutdownError,
    contextValues: (req) => {
      const raw = req.raw as Http2ServerRequest | { stream?: undefined };
      return callValues(peerOf(req.raw), String(req.id)).set(kBudget, budgetOf(raw.stream?.session));
    },
  });
  return app;
}

/** The buffer budget of a fastify-served call's HTTP/2 connection (none over HTTP/1.1). */
const kBudget = createContextKey<BufferBudget | undefined>(undefined);

/** What the direct routes hold request bodies to. */
interface DirectLimits {
  readonly maxMessageBytes: number;
  readonly budgetOf: (session: object | undefined) => BufferBudget | undefined;
}

/** gRPC calls over HTTP/2 straight to their Connect handler; see directRoutes. */
interface DirectRoutes {
  /** Serves the call and returns true, or returns false for fastify to route it. */
  serve(req: Http2ServerRequest, res: Http2ServerResponse): boolean;
}

/**
 * gRPC calls over HTTP/2 (Bazel's, the shards') skip fastify: they go
 * straight to the very Connect handlers the plugin registered, so the
 * interceptors, request gate, limits and shutdown handling are the plugin's
 * own; only fastify's routing, hooks and per-request child logger are left
 * out, which were ~5% of a storage node's CPU at 2,000 GetActionResult
 * calls/s; and the request is adapted by grpcRequest() below rather than by
 * connect-node's general adapter. The response is written by connect-node's
 * universalResponseToNodeResponse, as with fastify. The call ids are "rpc-N"
 * (fastify's are "req-N"). Connect JSON,
 * gRPC-web and anything over HTTP/1.1 still go through fastify, and so does
 * everything once the app is closing (fastify answers what arrives then).
 */
function directRoutes(
  handlers: readonly UniversalHandler[],
  callValues: (peer: PeerInfo, requestId: string) => ContextValues,
  logger: Logger,
  closing: AbortSignal,
  limits: DirectLimits,
): DirectRoutes {
  const byPath = new Map(handlers.map((h) => [h.requestPath, h]));
  let calls = 0;
  // peerOf: the peer once per connection (a WeakMap lookup by session);
  // req.socket is a Proxy onto the session's socket, and reading through it
  // cost ~1% per call.
  return {
    serve(req, res) {
      if (closing.aborted) return false;
      const handler = byPath.get(req.url);
      if (handler === undefined || !grpcContentType.test(req.headers['content-type'] ?? '')) return false;
      void (async () => {
        try {
          const values = callValues(peerOf(req), `rpc-${++calls}`);
          const watcher = new EnvelopeWatcher(limits.maxMessageBytes, MESSAGE_LIMIT, limits.budgetOf(req.stream.session));
          const uRes = await handler(grpcRequest(req, res, values, watcher));
          await universalResponseToNodeResponse(uRes, res);
        } catch (err) {
          const rpc = `${handler.service.typeName}/${handler.method.name}`;
          // As connect-fastify does: an aborted call is the client's doing;
          // so is a response that could not be written to a stream the
          // client reset or whose connection it closed (the RPC's own line
          // already says how it ended).
          const code = ConnectError.from(err).code;
          if (code === Code.Aborted || code === Code.Canceled || req.stream.destroyed || req.stream.rstCode !== undefined) {
            logger.debug({ rpc, error: err instanceof Error ? err.message : String(err) }, 'rpc response not delivered: the client went away');
            return;
          }
          logger.error({ err, rpc }, 'rpc handler failed');
        }
      })();
      return true;
    },
  };
}

/**
 * A gRPC call over HTTP/2 as Connect's universal handler takes it. What
 * connect-node's universalRequestFromNodeRequest does for every kind of
 * request cost 13% of a storage node's CPU at 2,000 GetActionResult calls/s
 * (profiled): a WHATWG URL parsed per call, an async generator around the
 * body, and a DOMException built when every stream closes. Here the URL is
 * concatenated, the body is read by requestBody() below, and a stream that
 * closes normally aborts the call's signal with
 * the shared CALL_ENDED. A stream reset by the client aborts it with the
 * ConnectError the gRPC HTTP/2 protocol maps the reset code to.
 */
function grpcRequest(
  req: Http2ServerRequest,
  res: Http2ServerResponse,
  contextValues: ContextValues,
  watcher: EnvelopeWatcher,
): UniversalServerRequest {
  const controller = new AbortController();
  // A stream that closes before the response was written was closed by the
  // client, even without a reset code (node closes the streams of a lost
  // connection so, bar the first): that is a cancellation too.
  req.once('close', () =>
    controller.abort(
      resetError(req.stream.rstCode) ??
        (res.writableEnded ? CALL_ENDED : new ConnectError('the client closed the stream or its connection', Code.Canceled)),
    ),
  );
  return {
    httpVersion: req.httpVersion,
    method: req.method,
    url: `http://${req.authority}${req.url}`,
    header: headersFromHttp2(req.headers),
    body: requestBody(req, watcher),
    signal: controller.signal,
    contextValues,
  };
}

/**
 * The request body as Connect reads it: chunks as they arrive, the stream
 * paused while more than a few wait. Hand-written over 'data'/'end'/'close'
 * because the Readable's own async iterator cost 3% of a storage node's CPU
 * at 3,000 GetActionResult calls/s; it keeps that iterator's semantics: a
 * stream closed before its end is an error (here ABORTED, or the error of
 * the client's reset), and stopping early destroys the stream.
 *
 * The gRPC framing is watched as it goes by (`watcher`): a message
 * announced larger than maxMessageBytes, or one the connection's buffer
 * budget cannot hold, fails the call with RESOURCE_EXHAUSTED at its prefix,
 * and the rest of the request is read and dropped. A stream that ends
 * inside a message waits RESET_GRACE_MS for the reset a cancelling Node
 * client sends after its END_STREAM, so such a cancellation is reported as
 * one rather than as a truncated request.
 */
function requestBody(req: Http2ServerRequest, watcher: EnvelopeWatcher): AsyncIterable<Uint8Array> {
  return {
    [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
      const queue: Uint8Array[] = [];
      let ended = false;
      let failure: unknown;
      // A limit the request broke; reported before anything else.
      let rejected: unknown;
      let endTimer: NodeJS.Timeout | undefined;
      let wake: (() => void) | undefined;
      const notify = () => {
        const w = wake;
        wake = undefined;
        w?.();
      };
      const onData = (chunk: Uint8Array) => {
        if (rejected !== undefined) return; // read and dropped, so the client is not stalled
        try {
          watcher.push(chunk);
        } catch (err) {
          rejected = err;
          watcher.release();
          queue.length = 0;
          if (req.isPaused()) req.resume();
          notify();
          return;
        }
        queue.push(chunk);
        if (queue.length >= BODY_QUEUE_HIGH) req.pause();
        notify();
      };
      const onEnd = () => {
        watcher.release();
        if (watcher.idle || rejected !== undefined) {
          ended = true;
          notify();
          return;
        }
        endTimer = setTimeout(() => {
          ended = true;
          notify();
        }, RESET_GRACE_MS);
      };
      const onError = (err: unknown) => {
        failure ??= err;
        notify();
      };
      const onClose = () => {
        watcher.release();
        clearTimeout(endTimer);
        if (!ended) failure ??= new Error('the request stream closed before its end');
        notify();
      };
      // The 'error' listener stays: an error after we are done must not
      // become an uncaught exception.
      const detach = () => {
        req.off('end', onEnd);
        req.off('close', onClose);
        clearTimeout(endTimer);
        watcher.release();
        if (rejected === undefined) req.off('data', onData);
      };
      req.on('data', onData);
      req.on('end', onEnd);
      req.on('error', onError);
      req.on('close', onClose);
      const next = async (): Promise<IteratorResult<Uint8Array>> => {
        for (;;) {
          const chunk = queue.shift();
          if (chunk !== undefined) {
            if (queue.length === 0 && req.isPaused()) req.resume();
            return { done: false, value: chunk };
          }
          if (rejected !== undefined) {
            detach();
            throw rejected;
          }
          if (ended) {
            detach();
            return { done: true, value: undefined };
          }
          if (failure !== undefined) {
            detach();
            const err = failure;
            throw err instanceof ConnectError
              ? err
              : (resetError(req.stream.rstCode) ??
                  new ConnectError(`reading the request failed: ${err instanceof Error ? err.message : String(err)}`, Code.Aborted, undefined, undefined, err));
          }
          await new Promise<void>((resolve) => (wake = resolve));
        }
      };
      return {
        next,
        return: async () => {
          detach();
          queue.length = 0;
          if (!ended && rejected === undefined) req.destroy();
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/** Request chunks waiting for Connect before the stream is paused. */
const BODY_QUEUE_HIGH = 16;

/**
 * The gRPC status for an HTTP/2 stream reset (gRPC's PROTOCOL-HTTP2.md,
 * "Errors"); undefined for NO_ERROR, STREAM_CLOSED or no reset.
 */
function resetError(rstCode: number | undefined): ConnectError | undefined {
  if (rstCode === undefined) return undefined;
  const code = RESET_CODES.get(rstCode);
  if (code === undefined) return undefined;
  return new ConnectError(`HTTP/2 stream reset by the client with code 0x${rstCode.toString(16)}`, code);
}

const RESET_CODES = new Map<number, Code>([
  [0x1, Code.Internal], // PROTOCOL_ERROR
  [0x2, Code.Internal], // INTERNAL_ERROR
  [0x3, Code.Internal], // FLOW_CONTROL_ERROR
  [0x4, Code.Internal], // SETTINGS_TIMEOUT
  [0x6, Code.Internal], // FRAME_SIZE_ERROR
  [0x7, Code.Unavailable], // REFUSED_STREAM
  [0x8, Code.Canceled], // CANCEL
  [0x9, Code.Internal], // COMPRESSION_ERROR
  [0xa, Code.Internal], // CONNECT_ERROR
  [0xb, Code.ResourceExhausted], // ENHANCE_YOUR_CALM
  [0xc, Code.PermissionDenied], // INADEQUATE_SECURITY
  [0xd, Code.Internal], // HTTP_1_1_REQUIRED
]);

/**
 * Logs one line per RPC (debug; warn for infrastructure failures, error
 * for internal ones) and makes sure clients never see internals: anything
 * thrown that is not a ConnectError becomes INTERNAL "internal error", with
 * the original kept in the log only. An RPC cancelled by the shutdown
 * timeout fails with UNAVAILABLE (retry elsewhere), whatever error the store
 * made of the cancellation. An RPC whose client went away while it ran
 * (reset its stream, closed the connection) is CANCELLED, logged at debug
 * without a stack and counted as such by the metrics interceptor outside,
 * whatever the handler made of the lost request (a premature close, a
 * truncated upload, a failed write).
 */
function rpcInterceptor(logger: Logger, shutdownError: ConnectError): Interceptor {
  return (next) => async (req) => {
    const call = req.contextValues.get(kCall);
    call.intercepted = true;
    let requestMessages = req.stream ? 0 : 1;
    const mapError = (err: unknown): ConnectError => {
      const ce = toClientError(err);
      if (req.signal.reason === shutdownError && ce !== shutdownError) {
        return new ConnectError(`${shutdownError.rawMessage} (${ce.rawMessage})`, shutdownError.code, undefined, undefined, ce);
      }
      if (ce.code !== Code.Canceled && clientWentAway(req.signal)) {
        return new ConnectError(`client cancelled (${ce.rawMessage})`, Code.Canceled, undefined, undefined, ce);
      }
      return ce;
    };
    let responseMessages = 0;
    let shardsOf: ReadonlySet<string> | undefined;
    let finished = false;
    const finish = (err: unknown): ConnectError | undefined => {
      if (finished) return undefined;
      finished = true;
      const ce = err === undefined ? undefined : mapError(err);
      if (call.logged) return ce; // the gate already logged it (the client cancelled)
      call.logged = true;
      // Most RPCs log at debug, which is usually off: skip building the line.
      if (!logger.isLevelEnabled(levelOf(ce?.code))) return ce;
      const fields: Record<string, unknown> = {
        rpc: `${req.service.typeName}/${req.method.name}`,
        code: ce === undefined ? 'ok' : Code[ce.code],
        ms: elapsedMs(call),
        peer: call.peer,
        reqId: call.requestId,
      };
      const identity = req.contextValues.get(kIdentity);
      if (identity !== undefined) fields.identity = identity;
      if (shardsOf !== undefined && shardsOf.size > 0) fields.shards = [...shardsOf];
      if (req.stream) fields.messagesIn = requestMessages;
      if (req.method.methodKind === 'server_streaming' || req.method.methodKind === 'bidi_streaming') {
        fields.messagesOut = responseMessages;
      }
      if (ce !== undefined) {
        fields.error = ce.rawMessage;
        // The internals (stack, cause) go to the log, never to the client.
        const internal = err instanceof ConnectError ? err.cause : err;
        if (internal !== undefined && (ERROR_CODES.has(ce.code) || WARN_CODES.has(ce.code))) fields.err = internal;
      }
      logRpc(logger, fields, ce?.code);
      return ce;
    };

    if (req.stream) {
      const input = req.message;
      req = {
        ...req,
        message: (async function* () {
          try {
            for await (const m of input) {
              requestMessages++;
              yield m;
            }
          } catch (err) {
            throw reclassify(err, req.method) ?? err;
          }
        })(),
      };
    }

    // The handler (and every store call it makes) runs inside the request's
    // context; a streamed response is resumed inside it too, since a
    // generator runs in the context of whoever calls next().
    const context: RequestContext = { reqId: call.requestId, shards: new Set() };
    shardsOf = context.shards;
    let res;
    try {
      res = await requestContext.run(context, () => next(req));
    } catch (err) {
      throw finish(err) ?? err;
    }
    if (!res.stream) {
      finish(undefined);
      return res;
    }
    const output = res.message[Symbol.asyncIterator]();
    return {
      ...res,
      message: (async function* () {
        let ok = false;
        try {
          for (;;) {
            const step = await requestContext.run(context, () => output.next());
            if (step.done === true) break;
            responseMessages++;
            yield step.value;
          }
          ok = true;
        } catch (err) {
          throw finish(err) ?? err;
        } finally {
          // Without `ok` and without an error the consumer stopped early:
          // the client cancelled. Let the handler's generator clean up.
          if (!ok) await output.return?.();
          finish(ok ? undefined : new ConnectError('client cancelled', Code.Canceled));
        }
      })(),
    };
  };
}

/**
 * True once the call's signal says the client is gone: its HTTP/2 stream was
 * reset with CANCEL (a closed connection resets its streams so too), or,
 * over HTTP/1.1, the connection closed or was reset before the call ended
 * (connect-node reports that as ABORTED). CALL_ENDED (normal completion) and
 * the reasons the server gives itself (deadline, shutdown) are not.
 */
function clientWentAway(signal: AbortSignal): boolean {
  if (!signal.aborted) return false;
  const reason: unknown = signal.reason;
  if (reason instanceof ConnectError) return reason.code === Code.Canceled || reason.code === Code.Aborted;
  return reason !== CALL_ENDED && reason instanceof Error && reason.name === 'AbortError';
}

function toClientError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof Error && err.name === 'AbortError') {
    return new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, err);
  }
  return new ConnectError('internal error', Code.Internal, undefined, undefined, err);
}

/** The reason a call's context is aborted with when connect-es gives none. */
const CALL_ENDED = new DOMException('This operation was aborted', 'AbortError');

const WARN_CODES = new Set<Code>([Code.Unavailable, Code.DeadlineExceeded, Code.ResourceExhausted]);
const ERROR_CODES = new Set<Code>([Code.Internal, Code.Unknown, Code.DataLoss]);

function levelOf(code: Code | undefined): 'error' | 'warn' | 'debug' {
  if (code === undefined) return 'debug';
  if (ERROR_CODES.has(code)) return 'error';
  if (WARN_CODES.has(code)) return 'warn';
  return 'debug';
}

function logRpc(logger: Logger, fields: Record<string, unknown>, code: Code | undefined): void {
  const level = levelOf(code);
  logger[level](fields, level === 'debug' ? 'rpc' : 'rpc failed');
}

/**
 * connect-es reports a request body that is not valid protobuf as INTERNAL
 * ("parse binary: ..."), and connect-node one that does not decompress as
 * INTERNAL "decompression failed". Both are the client's fault, and INTERNAL
 * would also count against a shard's circuit breaker, so we report
 * INVALID_ARGUMENT naming the message type. Returns undefined for any other
 * error.
 */
function reclassify(err: unknown, method: DescMethod): ConnectError | undefined {
  if (!(err instanceof ConnectError) || err.code !== Code.Internal) return undefined;
  // connect-node's word for a compressed message that does not inflate (the
  // fast path says INVALID_ARGUMENT too).
  if (err.rawMessage === 'decompression failed') {
    return new ConnectError(
      `request is not a valid ${method.input.typeName} message: it does not decompress with its grpc-encoding`,
      Code.InvalidArgument,
      undefined,
      undefined,
      err,
    );
  }
  const m = /^parse binary: (.*)$/s.exec(err.rawMessage);
  if (m === null) return undefined;
  return new ConnectError(
    `request is not a valid ${method.input.typeName} message: ${m[1]}`,
    Code.InvalidArgument,
    undefined,
    undefined,
    err,
  );
}

/**
 * For unary RPCs connect-es reads and parses the request before any
 * interceptor runs, so the interceptor never sees those failures (bad JSON,
 * bad protobuf, oversized message). Every protocol handler does abort the
 * call's context with the error before it serializes it, so an abort
 * listener installed by the request gate (which runs before the body is
 * read) sees it first: it logs the RPC's line and turns protobuf parse
 * failures into INVALID_ARGUMENT by rewriting the error in place. Mutating
 * the error is a deliberate hack, confined to this one case. An RPC that
 * ends so before any interceptor ran (its request never arrived whole: the
 * client cancelled it, or it broke a limit; or it did not parse) is counted
 * by `recorders` (the metrics interceptor), which never saw it.
 */
function watchEarlyErrors(logger: Logger, recorders: readonly EarlyFailureRecorder[]): (ctx: HandlerContext) => void {
  return (ctx) => {
    const call = ctx.values.get(kCall);
    // connect-es aborts every call's context when it ends, mostly without a
    // reason, and AbortController.abort() then builds a DOMException with a
    // stack trace: DOMExceptions were 4.5% of a storage node's CPU at 1,200
    // GetActionResult calls/s, two thirds of them from these aborts (the rest
    // from connect-node's abort of the request signal on close). The same
    // AbortError, built once, costs nothing and reads the same to anyone who
    // looks at the signal's reason.
    // (abort() is on the context object connect-es creates, not in its type.)
    const internal = ctx as { abort?: (reason?: unknown) => void };
    const abort = internal.abort;
    if (typeof abort === 'function') internal.abort = (reason?: unknown) => abort(reason ?? CALL_ENDED);
    ctx.signal.addEventListener(
      'abort',
      () => {
        const reason: unknown = ctx.signal.reason;
        if (!(reason instanceof ConnectError)) return; // normal completion, or a client disconnect
        const replacement = reclassify(reason, ctx.method);
        if (replacement !== undefined) {
          const target = reason as { code: Code; rawMessage: string; message: string };
          target.code = replacement.code;
          target.rawMessage = replacement.rawMessage;
          target.message = replacement.message;
        }
        // ABORTED on the signal is connect-node's word for a client that hung
        // up mid-request (ECONNRESET, a destroyed stream): a cancellation.
        const code = reason.code === Code.Aborted ? Code.Canceled : reason.code;
        if (call.intercepted !== true) {
          call.intercepted = true;
          const seconds = (performance.now() - call.started) / 1000;
          const counted = code === reason.code ? reason : new ConnectError(reason.rawMessage, code);
          for (const r of recorders) r.recordEarlyFailure(ctx.service.typeName, ctx.method.name, counted, seconds);
        }
        if (call.logged) return;
        call.logged = true;
        logRpc(
          logger,
          {
            rpc: `${ctx.service.typeName}/${ctx.method.name}`,
            code: Code[code],
            ms: elapsedMs(call),
            peer: call.peer,
            reqId: call.requestId,
            error: reason.rawMessage,
          },
          code,
        );
      },
      { once: true },
    );
  };
}

function elapsedMs(call: CallInfo): number {
  return Math.round((performance.now() - call.started) * 10) / 10;
}
