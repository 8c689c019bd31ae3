import type { Logger } from 'pino';
import type { StoreConfig } from '../config.ts';
import type { BlobStore } from './blob-store.ts';
import { CompletenessCheckingStore } from './completeness-checking-store.ts';
import { DiskStore } from './disk-store.ts';
import { FallbackStore } from './fallback-store.ts';
import { MemoryStore } from './memory-store.ts';
import { RemoteStore } from './remote-store.ts';
import { ShardingStore } from './sharding-store.ts';

export interface StoreTrees {
  readonly cas: BlobStore;
  readonly ac: BlobStore;
}

export interface BuildOptions {
  readonly logger: Logger;
}

interface BuildContext {
  readonly tree: 'cas' | 'ac';
  /** The built CAS tree; set while building the AC tree. */
  readonly cas?: BlobStore | undefined;
  readonly logger: Logger;
  /** Every store built so far, so a failure half-way can close them. */
  readonly built: BlobStore[];
}

/**
 * Builds the CAS tree, then the AC tree (which may check completeness against
 * the CAS tree), from their configs. If any store fails to open, the ones
 * already opened are closed before the error propagates.
 */
export async function buildStores(config: { readonly cas: StoreConfig; readonly ac: StoreConfig }, opts: BuildOptions): Promise<StoreTrees> {
  const built: BlobStore[] = [];
  try {
    const cas = await buildStore(config.cas, { tree: 'cas', logger: opts.logger, built });
    const ac = await buildStore(config.ac, { tree: 'ac', cas, logger: opts.logger, built });
    return { cas, ac };
  } catch (err) {
    await Promise.allSettled(built.reverse().map((s) => s.close()));
    throw err;
  }
}

/** Closes the AC tree first (it may read the CAS tree), then the CAS tree. */
export async function closeStores(stores: StoreTrees): Promise<void> {
  const results = [await settle(stores.ac.close()), await settle(stores.cas.close())];
  const failed = results.find((r) => r.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
}

/** The one switch over store kinds; decorators recurse into their children. */
async function buildStore(config: StoreConfig, ctx: BuildContext): Promise<BlobStore> {
  const contentAddressed = ctx.tree === 'cas';
  const logger = ctx.logger.child({ store: config.kind, tree: ctx.tree });
  let store: BlobStore;
  switch (config.kind) {
    case 'memory':
      store = new MemoryStore({ maxSizeBytes: config.maxSizeBytes, contentAddressed });
      break;
    case 'disk':
      store = await DiskStore.open({ path: config.path, maxSizeBytes: config.maxSizeBytes, contentAddressed, logger });
      break;
    case 'completenessChecking': {
      if (ctx.cas === undefined) {
        // config.ts only allows this kind in the AC tree.
        throw new Error('completenessChecking store built without a CAS tree');
      }
      const backend = await buildStore(config.backend, ctx);
      store = new CompletenessCheckingStore({ backend, cas: ctx.cas, logger });
      break;
    }
    case 'remote':
      store = new RemoteStore({
        url: config.url,
        instanceName: config.instanceName,
        tree: ctx.tree,
        timeoutMs: config.timeoutMs,
        healthTimeoutMs: config.healthTimeoutMs,
        logger,
      });
      break;
    case 'sharding': {
      const shards = [];
      for (const shard of config.shards) {
        const backend = await buildStore(shard.backend, ctx);
        shards.push({ name: shard.name, weight: shard.weight, store: backend, check: healthCheckOf(backend) });
      }
      store = await ShardingStore.open({
        shards,
        handoff: { dir: config.handoffDir, maxHints: config.maxHints },
        healthCheckIntervalMs: config.healthCheckIntervalMs,
        healthCheckTimeoutMs: config.healthCheckTimeoutMs,
        probeDepth: config.probeDepth,
        probeWindowMs: config.probeWindowMs,
        logger,
      });
      break;
    }
    case 'fallback': {
      const primary = await buildStore(config.primary, ctx);
      const secondary = await buildStore(config.secondary, ctx);
      store = await FallbackStore.open({
        primary,
        secondary,
        journalDir: config.journalDir,
        maxJournalEntries: config.maxJournalEntries,
        replication: config.replication,
        primaryHealthCheck: healthCheckOf(primary),
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
  return store;
}

/**
 * A remote backend has a real health check (grpc.health.v1); for other kinds
 * the owning router falls back to its own cheap probe.
 */
function healthCheckOf(store: BlobStore): ((signal: AbortSignal) => Promise<void>) | undefined {
  return store instanceof RemoteStore ? (signal) => store.healthCheck(signal) : undefined;
}

async function settle(p: Promise<void>): Promise<PromiseSettledResult<void>> {
  return (await Promise.allSettled([p]))[0]!;
}
