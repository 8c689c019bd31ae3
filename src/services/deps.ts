import type { Logger } from 'pino';
import type { InstancesConfig, LimitsConfig } from '../config.ts';
import type { BlobStore } from '../stores/blob-store.ts';

/** What the gRPC services need: the two store trees and a few limits. */
export interface ServiceDeps {
  /** The content-addressable storage tree. */
  readonly cas: BlobStore;
  /** The action cache tree (keys are action digests, values ActionResult bytes). */
  readonly ac: BlobStore;
  readonly logger: Logger;
  /** Largest sum of blob sizes accepted or returned by one Batch call. */
  readonly maxBatchTotalSizeBytes: number;
  /** Whether the process is ready to serve (drives grpc.health.v1). */
  readonly isReady: () => boolean;
  /** Input limits; DEFAULT_LIMITS when absent. */
  readonly limits?: LimitsConfig | undefined;
  /** How instance names map to action-cache namespaces; DEFAULT_INSTANCES when absent. */
  readonly instances?: InstancesConfig | undefined;
}
