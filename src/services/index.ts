import type { ConnectRouter } from '@connectrpc/connect';
import {
  ActionCache,
  Capabilities,
  ContentAddressableStorage,
  Execution,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { Health } from '../../gen/grpc/health/v1/health_pb.ts';
import { createActionCacheService } from './action-cache.ts';
import { createByteStreamService } from './bytestream.ts';
import { createCapabilitiesService } from './capabilities.ts';
import { createCasService } from './cas.ts';
import type { ServiceDeps } from './deps.ts';
import { createHealthService } from './health.ts';

/** The REAPI services a storage node serves, by fully qualified name. */
export const REAPI_SERVICE_NAMES: readonly string[] = [
  Capabilities.typeName,
  ContentAddressableStorage.typeName,
  ActionCache.typeName,
  ByteStream.typeName,
];

export interface RegisterOptions {
  /** Fires when the server begins a graceful shutdown (see createHealthService). */
  readonly draining?: AbortSignal | undefined;
}

/**
 * Registers every gRPC service of a storage node on `router`: Capabilities,
 * ContentAddressableStorage, ActionCache, ByteStream and grpc.health.v1.
 * Execution is registered without methods, so its RPCs answer UNIMPLEMENTED
 * with the method's name rather than a bare HTTP 404.
 */
export function registerServices(router: ConnectRouter, deps: ServiceDeps, opts: RegisterOptions = {}): void {
  router
    .service(Capabilities, createCapabilitiesService(deps))
    .service(ContentAddressableStorage, createCasService(deps))
    .service(ActionCache, createActionCacheService(deps))
    .service(ByteStream, createByteStreamService(deps))
    .service(Execution, {})
    .service(
      Health,
      createHealthService({
        isReady: deps.isReady,
        services: [...REAPI_SERVICE_NAMES, Health.typeName],
        draining: opts.draining,
      }),
    );
}
