import type { DescMethod } from '@bufbuild/protobuf';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Interceptor } from '@connectrpc/connect';
import type { Logger } from 'pino';
import {
  ActionCache,
  Capabilities,
  ContentAddressableStorage,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { Health } from '../../gen/grpc/health/v1/health_pb.ts';
import type { AuthConfig } from '../config.ts';
import { kPeer } from '../server/peer.ts';
import { validateInstanceName } from '../services/instance-name.ts';
import { parseReadResourceName, parseWriteResourceName } from '../services/resource-name.ts';
import { kIdentity } from './context.ts';
import { Authenticator } from './credentials.ts';
import type { AuthenticatorOptions, Identity } from './credentials.ts';
import { permits } from './grants.ts';
import type { Need } from './grants.ts';

export interface AuthorizerOptions extends AuthenticatorOptions {
  readonly logger: Logger;
  /** Denials are logged at info, at most one line per identity and code this often (default 10 s), with a count of the rest. */
  readonly denialLogIntervalMs?: number | undefined;
}

/** How a method is authorized: what it needs, and where its instance name is. */
interface Rule {
  readonly need: Need;
  /** The instance name the call is about, from its (first) request message; throws INVALID_ARGUMENT. */
  readonly instanceOf: (message: object) => string;
}

const fromField = (m: object): string => {
  const name = (m as { instanceName?: unknown }).instanceName;
  const instance = typeof name === 'string' ? name : '';
  // Validated here, before any grant is matched: a name like "a/../b"
  // must not be judged by the grant for "a".
  validateInstanceName(instance);
  return instance;
};
const fromReadResource = (m: object): string => parseReadResourceName(resourceNameOf(m)).instanceName;
const fromWriteResource = (m: object): string => parseWriteResourceName(resourceNameOf(m)).instanceName;
const resourceNameOf = (m: object): string => {
  const name = (m as { resourceName?: unknown }).resourceName;
  return typeof name === 'string' ? name : '';
};

const methodKey = (serviceTypeName: string, methodName: string) => `${serviceTypeName}/${methodName}`;

/**
 * Every method a caller may be authorized for; anything else (Execution,
 * methods added to the protos later) is denied to everyone. SplitBlob and
 * SpliceBlob are here so an authorized caller learns they are UNIMPLEMENTED.
 */
const RULES = new Map<string, Rule>();
const allow = (methods: readonly DescMethod[], need: Need, instanceOf: Rule['instanceOf']) => {
  for (const m of methods) RULES.set(methodKey(m.parent.typeName, m.name), { need, instanceOf });
};
const casMethods = ContentAddressableStorage.method;
allow([Capabilities.method.getCapabilities], 'read', fromField);
allow([casMethods.findMissingBlobs, casMethods.batchReadBlobs, casMethods.getTree, casMethods.splitBlob], 'read', fromField);
allow([casMethods.batchUpdateBlobs, casMethods.spliceBlob], 'write', fromField);
allow([ActionCache.method.getActionResult], 'read', fromField);
allow([ActionCache.method.updateActionResult], 'write', fromField);
allow([ByteStream.method.read], 'read', fromReadResource);
allow([ByteStream.method.queryWriteStatus], 'read', fromWriteResource);
allow([ByteStream.method.write], 'write', fromWriteResource);

/** Services open to every caller, with or without credentials: load balancers' health checks. */
const EXEMPT_SERVICES: ReadonlySet<string> = new Set([Health.typeName]);

const EXEMPT = 'exempt';
type Resolved = Rule | typeof EXEMPT | undefined;

/**
 * The authorizer: a Connect interceptor that decides, for every RPC on
 * either path (Connect's handlers and the ByteStream fast path run the same
 * chain), who is calling and whether they may.
 *
 * - grpc.health.v1 is open to all.
 * - The caller comes from the Authenticator (see credentials.ts). Rejected
 *   credentials: UNAUTHENTICATED, whatever `anonymous` says. No
 *   credentials: anonymous, which with `anonymous: "read"` may read every
 *   instance and gets UNAUTHENTICATED for anything else (it is not known
 *   who is calling, so PERMISSION_DENIED would be the wrong answer; gRPC's
 *   status code guide says the same), and with "none" gets UNAUTHENTICATED
 *   for everything.
 * - An identity over its rate limit: RESOURCE_EXHAUSTED, naming the limit.
 * - The method decides the need (read or write, RULES); an unknown method
 *   is denied. The instance name comes from the request (instance_name, or
 *   the ByteStream resource name); for a streamed request (ByteStream Write,
 *   and Read on the fast path) the first message is taken before the
 *   handler runs and checked, and only then handed on with the rest, so a
 *   denied Write never reaches the store, not even its existence check.
 * - The identity's longest matching grant decides (grants.ts); no grant, or
 *   a read grant for a write: PERMISSION_DENIED naming the identity, what
 *   was needed and the instance.
 *
 * The caller's name goes into the call's context (kIdentity) for the
 * per-RPC log line. Denials are logged at info with the identity's name,
 * never a credential, at most one line per identity and code every
 * denialLogIntervalMs.
 */
export function createAuthorizer(config: AuthConfig, opts: AuthorizerOptions): Interceptor {
  const authenticator = new Authenticator(config, opts);
  const anonymousMayRead = config.anonymous === 'read';
  const logDenial = denialLogger(opts.logger, opts.denialLogIntervalMs ?? 10_000);
  const howTo = howToAuthenticate(authenticator.accepts);
  const missing = `missing credentials: ${howTo}`;
  const resolved = new WeakMap<DescMethod, Resolved>();
  const ruleOf = (method: DescMethod): Resolved => {
    let r = resolved.get(method);
    if (r === undefined && !resolved.has(method)) {
      r = EXEMPT_SERVICES.has(method.parent.typeName) ? EXEMPT : RULES.get(methodKey(method.parent.typeName, method.name));
      resolved.set(method, r);
    }
    return r;
  };

  return (next) => async (req) => {
    const rule = ruleOf(req.method);
    if (rule === EXEMPT) return next(req);
    const rpc = `${req.service.typeName}/${req.method.name}`;
    const peer = req.contextValues.get(kPeer);
    const deny = (code: Code, message: string, who: string | undefined): ConnectError => {
      logDenial({ identity: who, code, rpc, reason: message, peer: peer.address });
      return new ConnectError(message, code);
    };

    let caller = authenticator.authenticate(req.header.get('authorization'), peer);
    if (caller instanceof Promise) caller = await caller;
    let identity: Identity | undefined;
    if (caller.kind === 'rejected') {
      throw deny(caller.code, caller.message, undefined);
    } else if (caller.kind === 'identity') {
      identity = caller.identity;
      req.contextValues.set(kIdentity, identity.name);
      const bucket = identity.rateLimit;
      if (bucket !== undefined && !bucket.take()) {
        throw deny(
          Code.ResourceExhausted,
          `identity "${identity.name}" is over its rate limit of ${bucket.perSecond} calls/s (burst ${bucket.burst}); retry later`,
          identity.name,
        );
      }
    } else {
      if (!anonymousMayRead) {
        throw deny(Code.Unauthenticated, caller.note === undefined ? missing : `${missing} (${caller.note})`, undefined);
      }
      req.contextValues.set(kIdentity, 'anonymous');
    }

    if (rule === undefined) {
      throw identity === undefined
        ? deny(Code.Unauthenticated, `${rpc} is not open to anonymous callers`, 'anonymous')
        : deny(Code.PermissionDenied, `${rpc} is not open to any identity on this server`, identity.name);
    }

    const check = (message: object): void => {
      const instance = rule.instanceOf(message);
      if (identity === undefined) {
        if (rule.need === 'read') return;
        throw deny(
          Code.Unauthenticated,
          `anonymous callers may only read: ${rpc} on instance ${quote(instance)} needs an identity with read-write access: ${howTo}`,
          'anonymous',
        );
      }
      const grant = identity.grants.match(instance);
      if (permits(grant, rule.need)) return;
      throw deny(
        Code.PermissionDenied,
        grant === undefined
          ? `identity "${identity.name}" has no access to instance ${quote(instance)} (${rpc} needs ${rule.need} access)`
          : `identity "${identity.name}" may only read instance ${quote(instance)} (its grant for ${quote(grant.instancePrefix)} is read-only); ${rpc} needs read-write access`,
        identity.name,
      );
    };

    if (!req.stream) {
      check(req.message);
      return next(req);
    }
    // A streamed request: judge it by its first message before the handler
    // sees any, then hand that message on ahead of the rest.
    const it = req.message[Symbol.asyncIterator]();
    const first = await it.next();
    if (first.done !== true) {
      try {
        check(first.value as object);
      } catch (err) {
        await it.return?.();
        throw err;
      }
    }
    return next({ ...req, message: replay(first, it) });
  };
}

/** `first`, then whatever `rest` still yields; return() reaches `rest`. */
function replay<T>(first: IteratorResult<T>, rest: AsyncIterator<T>): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      let pending: IteratorResult<T> | undefined = first;
      return {
        next() {
          const step = pending;
          pending = undefined;
          return step !== undefined ? Promise.resolve(step) : rest.next();
        },
        return(value?: unknown) {
          pending = undefined;
          return rest.return !== undefined ? rest.return(value) : Promise.resolve({ done: true as const, value: undefined as never });
        },
      };
    },
  };
}

/** "send ..." naming only the kinds of credential some identity accepts. */
function howToAuthenticate(accepts: { bearer: boolean; basic: boolean; certificate: boolean }): string {
  const ways: string[] = [];
  if (accepts.bearer) ways.push('Authorization: Bearer <token> (Bazel: --remote_header=Authorization=Bearer <token>)');
  if (accepts.basic) ways.push('Authorization: Basic <base64 of user:password>');
  if (accepts.certificate) ways.push('a client certificate');
  return ways.length === 0 ? 'this server has no identities configured' : `send ${ways.join(', or ')}`;
}

interface Denial {
  readonly identity: string | undefined;
  readonly code: Code;
  readonly rpc: string;
  readonly reason: string;
  readonly peer: string | undefined;
}

/**
 * Logs denials at info, at most one line per (identity, code) every
 * `intervalMs`; the next line says how many were left out. Identities are
 * few (the config's, "anonymous", none), so the map stays small.
 */
function denialLogger(logger: Logger, intervalMs: number): (d: Denial) => void {
  const last = new Map<string, { at: number; suppressed: number }>();
  return (d) => {
    const key = `${d.identity ?? ''}\0${d.code}`;
    const now = performance.now();
    const seen = last.get(key);
    if (seen !== undefined && now - seen.at < intervalMs) {
      seen.suppressed++;
      return;
    }
    last.set(key, { at: now, suppressed: 0 });
    if (!logger.isLevelEnabled('info')) return;
    const fields: Record<string, unknown> = {
      identity: d.identity ?? null,
      code: Code[d.code],
      rpc: d.rpc,
      reason: d.reason,
      peer: d.peer,
    };
    if (seen !== undefined && seen.suppressed > 0) fields.suppressed = seen.suppressed;
    logger.info(fields, 'call denied');
  };
}

function quote(instance: string): string {
  return JSON.stringify(instance.length > 120 ? `${instance.slice(0, 117)}...` : instance);
}
