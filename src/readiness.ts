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

/**
 * Whether every shard of every sharding node in the tree is taking traffic
 * (breaker closed). Only then is a NOT_FOUND from the tree an answer about
 * the blob: with a shard open or drained, a read skips the blob's owner and
 * asks the next-ranked shards, which may well not have it.
 */
export function allShardsClosed(node: StoreDescription): boolean {
  if (node.kind === 'sharding') {
    const shards = Array.isArray(node.shards) ? (node.shards as { state?: unknown }[]) : [];
    if (!shards.every((s) => s.state === 'closed')) return false;
  }
  return (node.children ?? []).every(allShardsClosed);
}

/**
 * Why a ready store tree is serving with less redundancy than configured:
 * one line per fallback pair whose writes now land on one side only (plus a
 * journal entry for the other), prefixed with the pair's path in the tree.
 * Empty when nothing is degraded. /readyz stays 200 (traffic must keep
 * flowing: that is what the one-copy mode is for) and lists these.
 */
export function degradedReasons(node: StoreDescription, path = segment(node)): string[] {
  const out: string[] = [];
  if (node.kind === 'fallback' && typeof node.oneCopy === 'string') out.push(`${path}: ${node.oneCopy}`);
  for (const child of node.children ?? []) out.push(...degradedReasons(child, `${path}/${segment(child)}`));
  return out;
}

// As admin/tree.ts names a node in a path: its role, name or kind.
function segment(node: StoreDescription): string {
  if (typeof node.role === 'string' && node.role !== '') return node.role;
  if (typeof node.name === 'string' && node.name !== '') return node.name;
  return node.kind;
}
