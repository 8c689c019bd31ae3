import type { DescMethod } from '@bufbuild/protobuf';
import type { HandlerContext, Interceptor } from '@connectrpc/connect';
import { Code, ConnectError, createContextKey, createContextValues } from '@connectrpc/connect';
import { fastifyConnectPlugin } from '@connectrpc/connect-fastify';
import fastify, { LogController } from 'fastify';
import type { FastifyInstance, FastifyServerFactory } from 'fastify';
import type { Http2Server } from 'node:http2';
import type { Logger } from 'pino';
import type { ServiceDeps } from '../services/deps.ts';
import { type RequestContext, requestContext } from '../request-context.ts';
import { createByteStreamCore } from '../services/bytestream.ts';
import { registerServices } from '../services/index.ts';
import { createByteStreamFastPath } from './bytestream-fast-path.ts';
import { createOnePortServer } from './listen.ts';
import type { OnePortServerOptions, RequestHandler } from './listen.ts';

const MiB = 1024 * 1024;

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
}

/** Per-call state for the one log line per RPC. */
interface CallInfo {
  readonly peer: string | undefined;
  readonly requestId: string;
  readonly started: number;
  /** Set once the RPC's line is written, so it is written once. */
  logged: boolean;
}

const kCall = createContextKey<CallInfo>({ peer: undefined, requestId: '', started: 0, logged: true });

/**
 * Builds (but does not start) the storage node's fastify app: every gRPC
 * service from src/services/index.ts over gRPC, gRPC-web and Connect, on one
 * port that speaks HTTP/2 cleartext (Bazel) and HTTP/1.1 (curl).
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
  const deps: ServiceDeps = {
    ...opts.deps,
    isReady: () => !draining.signal.aborted && opts.deps.isReady(),
  };

  // Large enough for a full batch or a 16 MiB ActionResult plus framing.
  const maxMessageBytes = Math.max(17 * MiB, deps.maxBatchTotalSizeBytes + MiB);
  const shutdownError = new ConnectError('server is shutting down', Code.Unavailable);
  const interceptors = [...(opts.interceptors ?? []), rpcInterceptor(logger, shutdownError)];
  const callValues = (peer: string | undefined, requestId: string) =>
    createContextValues().set(kCall, { peer, requestId, started: performance.now(), logged: false });
  let fastCalls = 0;

  // ByteStream Read/Write over gRPC bypass fastify and Connect (see
  // bytestream-fast-path.ts for why); everything else goes to fastify.
  const fastPath = createByteStreamFastPath({
    core: createByteStreamCore(deps),
    interceptors,
    // Ids of their own ("bs-N"), apart from fastify's "req-N".
    contextValues: (req) => callValues(req.socket?.remoteAddress, `bs-${++fastCalls}`),
    maxMessageBytes,
    logger: logger.child({ component: 'bytestream-fast-path' }),
  });
  let fastPathKill: NodeJS.Timeout | undefined;

  const serverFactory = ((handler: RequestHandler) =>
    createOnePortServer((req, res) => {
      if ('stream' in req && fastPath.handles(req)) fastPath.serve(req);
      else handler(req, res);
    }, {
      drainTimeoutMs: shutdownTimeoutMs + 2000,
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
    routes: (router) => registerServices(router, deps, { draining: draining.signal }),
    interceptors,
    requestGate: watchEarlyErrors(logger),
    readMaxBytes: maxMessageBytes,
    writeMaxBytes: maxMessageBytes,
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
    contextValues: (req) => callValues(req.ip, String(req.id)),
  });
  return app;
}

/**
 * Logs one line per RPC (debug; warn for infrastructure failures, error
 * for internal ones) and makes sure clients never see internals: anything
 * thrown that is not a ConnectError becomes INTERNAL "internal error", with
 * the original kept in the log only. An RPC cancelled by the shutdown
 * timeout fails with UNAVAILABLE (retry elsewhere), whatever error the store
 * made of the cancellation.
 */
function rpcInterceptor(logger: Logger, shutdownError: ConnectError): Interceptor {
  return (next) => async (req) => {
    const call = req.contextValues.get(kCall);
    let requestMessages = req.stream ? 0 : 1;
    const mapError = (err: unknown): ConnectError => {
      const ce = toClientError(err);
      if (req.signal.reason === shutdownError && ce !== shutdownError) {
        return new ConnectError(`${shutdownError.rawMessage} (${ce.rawMessage})`, shutdownError.code, undefined, undefined, ce);
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
      const fields: Record<string, unknown> = {
        rpc: `${req.service.typeName}/${req.method.name}`,
        code: ce === undefined ? 'ok' : Code[ce.code],
        ms: elapsedMs(call),
        peer: call.peer,
        reqId: call.requestId,
      };
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

function toClientError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof Error && err.name === 'AbortError') {
    return new ConnectError('operation was cancelled', Code.Canceled, undefined, undefined, err);
  }
  return new ConnectError('internal error', Code.Internal, undefined, undefined, err);
}

const WARN_CODES = new Set<Code>([Code.Unavailable, Code.DeadlineExceeded, Code.ResourceExhausted]);
const ERROR_CODES = new Set<Code>([Code.Internal, Code.Unknown, Code.DataLoss]);

function logRpc(logger: Logger, fields: Record<string, unknown>, code: Code | undefined): void {
  if (code !== undefined && ERROR_CODES.has(code)) logger.error(fields, 'rpc failed');
  else if (code !== undefined && WARN_CODES.has(code)) logger.warn(fields, 'rpc failed');
  else logger.debug(fields, 'rpc');
}

/**
 * connect-es reports a request body that is not valid protobuf as INTERNAL
 * ("parse binary: ..."). That is the client's fault, and INTERNAL would also
 * count against a shard's circuit breaker, so we report INVALID_ARGUMENT
 * naming the message type. Returns undefined for any other error.
 */
function reclassify(err: unknown, method: DescMethod): ConnectError | undefined {
  if (!(err instanceof ConnectError) || err.code !== Code.Internal) return undefined;
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
 * the error is a deliberate hack, confined to this one case.
 */
function watchEarlyErrors(logger: Logger): (ctx: HandlerContext) => void {
  return (ctx) => {
    const call = ctx.values.get(kCall);
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
        if (call.logged) return;
        call.logged = true;
        logRpc(
          logger,
          {
            rpc: `${ctx.service.typeName}/${ctx.method.name}`,
            code: Code[reason.code],
            ms: elapsedMs(call),
            peer: call.peer,
            reqId: call.requestId,
            error: reason.rawMessage,
          },
          reason.code,
        );
      },
      { once: true },
    );
  };
}

function elapsedMs(call: CallInfo): number {
  return Math.round((performance.now() - call.started) * 10) / 10;
}
