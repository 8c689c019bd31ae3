import { create } from '@bufbuild/protobuf';
import type { ServiceImpl } from '@connectrpc/connect';
import {
  Capabilities,
  Compressor_Value,
  DigestFunction_Value,
  ServerCapabilitiesSchema,
  SymlinkAbsolutePathStrategy_Value,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { ServerCapabilities } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { ServiceDeps } from './deps.ts';
import { validateInstanceName } from './instance-name.ts';

/**
 * Compressors the ByteStream service accepts and serves under
 * `compressed-blobs/{compressor}/...`. Advertised as-is: whoever changes the
 * compressors src/services/bytestream.ts implements changes this list too.
 */
export const SUPPORTED_COMPRESSORS: readonly Compressor_Value[] = [Compressor_Value.ZSTD];

/**
 * Compressors accepted for inline data in BatchUpdateBlobs / returned by
 * BatchReadBlobs. None: batch compression is not implemented.
 */
export const SUPPORTED_BATCH_COMPRESSORS: readonly Compressor_Value[] = [];

/**
 * API versions. 2.0 is what Bazel up to 7 speaks. 2.3 is the newest minor
 * version whose additions we serve: compressed-blobs resource names (zstd),
 * the digest_function request fields and digest-function resource-name
 * segments (we accept SHA256/unset and reject others with INVALID_ARGUMENT).
 * Later additions (SplitBlob/SpliceBlob, chunking parameters) are not
 * implemented, so we do not claim them.
 */
export const LOW_API_VERSION = { major: 2, minor: 0, patch: 0, prerelease: '' };
export const HIGH_API_VERSION = { major: 2, minor: 3, patch: 0, prerelease: '' };
export const DEPRECATED_API_VERSION = LOW_API_VERSION;

/**
 * Capabilities.GetCapabilities: advertises exactly what this node implements,
 * a cache (CAS + AC, SHA-256 only, AC writes allowed) without remote
 * execution. The answer is the same for every instance name, since all
 * instances share one cache.
 */
export function createCapabilitiesService(deps: ServiceDeps): ServiceImpl<typeof Capabilities> {
  const capabilities = buildServerCapabilities(deps.maxBatchTotalSizeBytes);
  return {
    getCapabilities(req) {
      validateInstanceName(req.instanceName);
      return capabilities;
    },
  };
}

export function buildServerCapabilities(maxBatchTotalSizeBytes: number): ServerCapabilities {
  return create(ServerCapabilitiesSchema, {
    cacheCapabilities: {
      digestFunctions: [DigestFunction_Value.SHA256],
      actionCacheUpdateCapabilities: { updateEnabled: true },
      maxBatchTotalSizeBytes: BigInt(maxBatchTotalSizeBytes),
      // ActionResults are stored as opaque bytes; absolute symlink targets are
      // accepted like any other.
      symlinkAbsolutePathStrategy: SymlinkAbsolutePathStrategy_Value.ALLOWED,
      supportedCompressors: [...SUPPORTED_COMPRESSORS],
      supportedBatchUpdateCompressors: [...SUPPORTED_BATCH_COMPRESSORS],
      // 0: no limit on a single blob beyond what the stores hold.
      maxCasBlobSizeBytes: 0n,
      splitBlobSupport: false,
      spliceBlobSupport: false,
    },
    // No executionCapabilities: this is a cache, not an executor.
    deprecatedApiVersion: DEPRECATED_API_VERSION,
    lowApiVersion: LOW_API_VERSION,
    highApiVersion: HIGH_API_VERSION,
  });
}
