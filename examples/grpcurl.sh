#!/usr/bin/env sh
# The gateway serves gRPC reflection, so grpcurl needs no .proto files.
# Usage: examples/grpcurl.sh [HOST:PORT]        (default 127.0.0.1:50051)
set -eu
target="${1:-127.0.0.1:50051}"

grpcurl -plaintext "$target" list
grpcurl -plaintext "$target" pagewire.v1.Generation/ListModels
grpcurl -plaintext -d '{
  "chat": {"messages": [{"role": "user", "content": "Name three colours."}]},
  "sampling": {"temperature": 0, "maxTokens": 32}
}' "$target" pagewire.v1.Generation/Complete
