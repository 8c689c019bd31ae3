import type { StoreDescription } from '../stores/blob-store.ts';

/** The two store trees as their roots describe them. */
export interface TreeDescriptions {
  readonly cas: StoreDescription;
  readonly ac: StoreDescription;
}

export type TreeName = keyof TreeDescriptions;

export const TREE_NAMES: readonly TreeName[] = ['cas', 'ac'];

/**
 * Calls `visit` for every node of a store tree, parents first, with the
 * node's path: the root's kind, then one segment per level, the child's
 * role (fallback), name (a sharding store's shard) or kind. The page computes
 * the same paths (page/app.js), and metrics use them as the `store` label so
 * that two sharding stores in one tree (one nested under a fallback) stay
 * apart.
 */
export function walkTree(root: StoreDescription, visit: (node: StoreDescription, path: string) => void): void {
  const walk = (node: StoreDescription, path: string): void => {
    visit(node, path);
    for (const child of node.children ?? []) walk(child, `${path}/${segment(child)}`);
  };
  walk(root, segment(root));
}

function segment(node: StoreDescription): string {
  const role = node.role;
  if (typeof role === 'string' && role !== '') return role;
  if (typeof node.name === 'string' && node.name !== '') return node.name;
  return node.kind;
}

/** The per-shard fields of a sharding store's describe() that the admin surface reads. */
export interface ShardView {
  readonly name: string;
  readonly state: string;
  readonly manual: boolean;
  readonly since: number;
  readonly reason?: string;
  readonly recentFailures?: number;
  readonly recentRequests?: number;
  readonly lastHealthCheckMs?: number | null;
  readonly lastHealthCheckOk?: boolean | null;
  readonly inFlight?: number;
  readonly hintsPending?: number;
  readonly hintsHeld?: number;
  readonly bytesIn?: number;
  readonly bytesOut?: number;
}

/** The shards of a `sharding` node, or [] for any other node. */
export function shardsOf(node: StoreDescription): ShardView[] {
  if (node.kind !== 'sharding' || !Array.isArray(node.shards)) return [];
  return (node.shards as unknown[]).filter(
    (s): s is ShardView => typeof s === 'object' && s !== null && typeof (s as ShardView).name === 'string',
  );
}

/** A number field of a describe() record, or undefined when absent or not finite. */
export function num(record: unknown, key: string): number | undefined {
  if (typeof record !== 'object' || record === null) return undefined;
  const v = (record as Record<string, unknown>)[key];
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

/** A nested record field of a describe() record, or undefined. */
export function rec(record: unknown, key: string): Record<string, unknown> | undefined {
  if (typeof record !== 'object' || record === null) return undefined;
  const v = (record as Record<string, unknown>)[key];
  return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
}
