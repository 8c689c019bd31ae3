import type { StoreDescription } from './stores/blob-store.ts';

/**
 * Whether a store tree can serve at all, judged from its description: a
 * sharding store needs at least one shard taking traffic (breaker closed), a
 * fallback pair needs either side, a decorator its backend. Leaves and remote
 * shards count as able; their failures show up in the routers above them.
 * This drives /readyz and grpc.health.v1, so a load balancer stops sending
 * builds to an edge with nothing behind it, and only then.
 */
export function canServe(node: StoreDescription): boolean {
  const children = node.children ?? [];
  switch (node.kind) {
    case 'sharding': {
      const shards = Array.isArray(node.shards) ? (node.shards as { state?: unknown }[]) : [];
      return shards.some((s) => s.state === 'closed');
    }
    case 'fallback':
      return children.some(canServe);
    default:
      return children.every(canServe);
  }
}
