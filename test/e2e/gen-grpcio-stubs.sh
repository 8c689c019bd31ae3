#!/bin/bash
# Generates Python gRPC stubs for the REAPI, ByteStream and their googleapis
# dependencies into OUT_DIR, from the protos shipped by the Debian package
# bazel-bootstrap-source (an older REAPI v2 revision; the wire format of the
# calls the interop test makes is unchanged). Uses Debian's grpc_tools.
# Usage: gen-grpcio-stubs.sh OUT_DIR
set -euo pipefail
out=${1:?usage: gen-grpcio-stubs.sh OUT_DIR}
python=${PYTHON:-/usr/bin/python3}
third_party=${BAZEL_THIRD_PARTY:-/usr/src/bazel-bootstrap/third_party}
mkdir -p "$out"
"$python" -m grpc_tools.protoc \
  -I"$third_party/remoteapis" \
  -I"$third_party/googleapis" \
  --python_out="$out" \
  --grpc_python_out="$out" \
  build/bazel/remote/execution/v2/remote_execution.proto \
  build/bazel/semver/semver.proto \
  google/api/annotations.proto \
  google/api/http.proto \
  google/bytestream/bytestream.proto \
  google/longrunning/operations.proto \
  google/rpc/status.proto
