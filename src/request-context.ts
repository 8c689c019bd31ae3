import { AsyncLocalStorage } from 'node:async_hooks';

/** What the logs know about the RPC being served. */
export interface RequestContext {
  readonly reqId: string;
  /** Shards that served (part of) this RPC, in the order they were chosen. */
  readonly shards: Set<string>;
}

/**
 * The RPC on whose behalf code runs, carried through async calls, so log
 * lines written deep in the store tree (a breaker opening, a handoff) name
 * the request that caused them, and the RPC's own log line names the shards
 * it was routed to.
 */
export const requestContext = new AsyncLocalStorage<RequestContext>();

/** Records that the current RPC was routed to `shard`. Cheap; no-op outside an RPC. */
export function noteShard(shard: string): void {
  requestContext.getStore()?.shards.add(shard);
}

/** pino `mixin`: adds the current request id to every log line written during an RPC. */
export function logMixin(): Record<string, unknown> {
  const ctx = requestContext.getStore();
  return ctx === undefined ? {} : { reqId: ctx.reqId };
}
