// The C-core gRPC client for interop tests: Debian's python3-grpcio with
// stubs generated at test time (test/e2e/gen-grpcio-stubs.sh) from the REAPI
// protos bazel-bootstrap-source ships.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

export const python = '/usr/bin/python3';
export const protoRoot = '/usr/src/bazel-bootstrap/third_party/remoteapis/build/bazel/remote/execution/v2';

/** Why the python client cannot run here, or undefined when it can. */
export function pythonGrpcMissing(): string | undefined {
  if (!existsSync(python)) return `${python} not found`;
  if (spawnSync(python, ['-c', 'import grpc, grpc_tools.protoc']).status !== 0) return 'python3-grpcio / python3-grpc-tools not installed';
  if (!existsSync(protoRoot)) return `${protoRoot} not found (bazel-bootstrap-source not installed)`;
  return undefined;
}
