#!/usr/bin/env bash
# Run every test: the Rust kernels (cargo test) and the Python suite (pytest), on .venv/.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow" -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRITON_AL_EXTRAS="${TRITON_AL_EXTRAS:-test,triton,train,s3}"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "== cargo test (kernels, outbox writer, step)"
cargo test --release -p triton-al-kernels -p triton-al-outbox -p triton-al-step --quiet
echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
