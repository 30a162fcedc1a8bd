#!/usr/bin/env bash
# Regenerate the committed gRPC code from proto/ (grpcio-tools pinned in the test extra so
# the output matches the protobuf runtime tritonclient allows). tests/test_protos.py
# checks that the committed files equal a fresh generation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/python}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT/proto"
"$PY" -m grpc_tools.protoc -I. --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    triton_al/admin/v1/admin.proto
