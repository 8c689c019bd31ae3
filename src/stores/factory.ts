import type { Logger } from 'pino';
import type { Registry } from 'prom-client';
import type { LimitsConfig, StoreConfig } from '../config.ts';
import type { BlobStore } from './blob-store.ts';
import { CompletenessCheckingStore } from './completeness-checking-store.ts';
import { DiskStore } from './disk-store.ts';
import { FallbackStore } from './fallback-store.ts';
import { MemoryStore } from './memory-store.ts';
import { MetricsStore } from './metrics-store.ts';
import { RemoteStore } from './remote-store.ts';
import { readShardCredentials } from '../transport.ts';
import { ShardingStore } from './sharding-store.ts';

export interface StoreTrees {
  readonly cas: BlobStore;
  readonly ac: BlobStore;
  /** Every sharding store of each tree, for drain control from the admin API. */
  readonly sharding: { readonly cas: readonly ShardingStore[]; readonly ac: readonly ShardingStore[] };
}

export interface BuildOptions {
  readonly logger: Logger;
  /**
   * When given, every node of both trees is wrapped in a MetricsStore
   * labelled with its tree, kind and path in the tree (e.g.
   * "fallback/primary/shard-a"), as bb-storage wraps every node.
   */
  readonly registry?: Registry | undefined;
  /** How errors name the config holding the trees (default "config"; a child's is "config.children.NAME"). */
  readonly field?: string | undefined;
  /** The node's limits: a disk CAS takes its partial-upload bounds from them. Default DEFAULT_LIMITS. */
  readonly limits?: LimitsConfig | undefined;
}

interface BuildContext {
  readonly tree: 'cas' | 'ac';
  /** The built CAS tree; set while building the AC tree. */
  readonly cas?: BlobStore | undefined;
  readonly logger: Logger;
  readonly registry: Registry | undefined;
  /** Where this node sits in its tree, for metric labels. */
  readonly path: string;
  /** The node's config path, for errors ("config.cas.sharding.shards.a.backend"). */
  readonly field: string;
  /** Every store built so far, so a failure half-way can close them. */
  readonly built: BlobStore[];
  readonly sharding: ShardingStore[];
  readonly limits: LimitsConfig | undefined;
}

/**
 * Builds the CAS tree, then the AC tree (which may check completeness against
 * the CAS tree), from their configs. If any store fails to open, the ones
 * already opened are closed before the error propagates.
 */
export async function buildStores(config: { readonly cas: StoreConfig; readonly ac: StoreConfig }, opts: BuildOptions): Promise<StoreTrees> {
  const built: BlobStore[] = [];
  const common = { logger: opts.logger, registry: opts.registry, path: '', built, limits: opts.limits };
  try {
    const casSharding: ShardingStore[] = [];
    const acSharding: ShardingStore[] = [];
    const cas = await buildStore(config.cas, { ...common, tree: 'cas', field: `${opts.field ?? 'config'}.cas`, sharding: casSharding });
    const ac = await buildStore(config.ac, { ...common, tree: 'ac', field: `${opts.field ?? 'config'}.ac`, cas, sharding: acSharding });
    return { cas, ac, sharding: { cas: casSharding, ac: acSharding } };
  } catch (err) {
    await Promise.allSettled(built.reverse().map((s) => s.close()));
    throw err;
  }
}

/** Closes the AC tree first (it may read the CAS tree), then the CAS tree. */
export async function closeStores(stores: Pick<StoreTrees, 'cas' | 'ac'>): Promise<void> {
  const results = [await settle(stores.ac.close()), await settle(stores.cas.close())];
  const failed = results.find((r) => r.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
}

/** The one switch over store kinds; decorators recurse into their children. */
async function buildStore(config: StoreConfig, ctx: BuildContext): Promise<BlobStore> {
  const contentAddressed = ctx.tree === 'cas';
  const logger = ctx.logger.child({ store: config.kind, tree: ctx.tree });
  // The node's path as the admin page and metrics name it: the root's kind,
  // then per level the role (primary, secondary), shard name or kind.
  const path = ctx.path === '' ? config.kind : ctx.path;
  const child = (segment: string, field: string): BuildContext => ({ ...ctx, path: `${path}/${segment}`, field: `${ctx.field}.${config.kind}.${field}` });
  let store: BlobStore;
  switch (config.kind) {
    case 'memory':
      store = new MemoryStore({ maxSizeBytes: config.maxSizeBytes, contentAddressed });
      break;
    case 'disk':
      store = await DiskStore.open({
        path: config.path,
        maxSizeBytes: config.maxSizeBytes,
        contentAddressed,
        logger,
        ...(ctx.limits === undefined
          ? {}
          : {
              partialUploads: {
                maxCount: ctx.limits.maxPartialUploads,
                maxBytes: ctx.limits.maxPartialUploadBytes,
                ttlMs: ctx.limits.partialUploadTtlMs,
              },
            }),
      });
      break;
    case 'completenessChecking': {
      if (ctx.cas === undefined) {
        // config.ts only allows this kind in the AC tree.
        throw new Error('completenessChecking store built without a CAS tree');
      }
      const backend = await buildStore(config.backend, child(config.backend.kind, 'backend'));
      store = new CompletenessCheckingStore({ backend, cas: ctx.cas, logger });
      break;
    }
    case 'remote': {
      // Files and variables are read once, now: a missing one stops the start.
      const credentials = await readShardCredentials(config, `${ctx.field}.remote`);
      store = new RemoteStore({
        url: config.url,
        tls: credentials.tls,
        bearerToken: credentials.bearerToken,
        instanceName: config.instanceName,
        tree: ctx.tree,
        timeoutMs: config.timeoutMs,
        healthTimeoutMs: config.healthTimeoutMs,
        logger,
      });
      break;
    }
    case 'sharding': {
      const shards = [];
      for (const shard of config.shards) {
        const backend = await buildStore(shard.backend, child(shard.name, `shards.${shard.name}.backend`));
        shards.push({ name: shard.name, weight: shard.weight, store: backend, check: healthCheckOf(backend) });
      }
      store = await ShardingStore.open({
        shards,
        handoff: { dir: config.handoffDir, maxHints: config.maxHints },
        healthCheckIntervalMs: config.healthCheckIntervalMs,
        healthCheckTimeoutMs: config.healthCheckTimeoutMs,
        probeDepth: config.probeDepth,
        probeWindowMs: config.probeWindowMs,
        existenceCache: { maxEntries: config.existenceCacheMaxEntries, ttlMs: config.existenceCacheTtlMs },
        logger,
      });
      ctx.sharding.push(store as ShardingStore);
      break;
    }
    case 'fallback': {
      const primary = await buildStore(config.primary, child('primary', 'primary'));
      const secondary = await buildStore(config.secondary, child('secondary', 'secondary'));
      store = await FallbackStore.open({
        primary,
        secondary,
        journalDir: config.journalDir,
        maxJournalEntries: config.maxJournalEntries,
        replication: config.replication,
        primaryHealthCheck: healthCheckOf(primary),
        durability: config.durability,
        secondaryHealthCheck: healthCheckOf(secondary),
        healthCheckIntervalMs: config.healthCheckIntervalMs,
        logger,
      });
      break;
    }
    default: {
      const unknown: never = config;
      throw new Error(`unknown store kind ${JSON.stringify((unknown as { kind: unknown }).kind)}`);
    }
  }
  ctx.built.push(store);
  if (ctx.registry === undefined) return store;
  return new MetricsStore(store, { registry: ctx.registry, tree: ctx.tree, kind: config.kind, name: path });
}

/**
 * A remote backend has a real health check (grpc.health.v1); for other kinds
 * the owning router falls back to its own cheap probe.
 */
function healthCheckOf(wrapped: BlobStore): ((signal: AbortSignal) => Promise<void>) | undefined {
  const store = wrapped instanceof MetricsStore ? wrapped.inner : wrapped;
  return store instanceof RemoteStore ? (signal) => store.healthCheck(signal) : undefined;
}

async function settle(p: Promise<void>): Promise<PromiseSettledResult<void>> {
  return (await Promise.allSettled([p]))[0]!;
}
