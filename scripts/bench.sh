#!/usr/bin/env bash
# Benchmarks (not part of the test suite): `scripts/bench.sh scoring|outbox|pipeline|loop|fleet|near-duplicates|all`.
# Installs the baselines (scipy, torch CPU) into .venv on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRITON_AL_EXTRAS="test,triton,train,s3,fleet,bench"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
mkdir -p benchmarks/results
what="${1:-scoring}"
shift || true
if [ "$what" = pipeline ] || [ "$what" = all ]; then
    # perf_analyzer (from the tritonclient wheel) needs libb64; see benchmarks/perf_analyzer.py.
    ensure_debian_package libb64-0d "/usr/lib/$(uname -m)-linux-gnu/libb64.so.0d"
fi
if [ "$what" = scoring ] || [ "$what" = all ]; then
    "$VENV/bin/python" -m pytest benchmarks/bench_scoring.py -q -p no:cacheprovider \
        --benchmark-json=benchmarks/results/scoring.json --benchmark-columns=median,iqr,rounds "$@"
    "$VENV/bin/python" benchmarks/report.py benchmarks/results/scoring.json
fi
if [ "$what" = near-duplicates ] || [ "$what" = all ]; then
    # A script, not pytest-benchmark: precision/recall tables and costs (benchmarks/RESULTS.md).
    args=(); if [ "$what" = near-duplicates ]; then args=("$@"); fi  # --originals N --background N --entries N
    "$VENV/bin/python" benchmarks/bench_near_duplicates.py --json benchmarks/results/near_duplicates.json "${args[@]}"
fi
if [ "$what" = fleet ] || [ "$what" = all ]; then
    # The fleet benchmark measures S3 delivery on rclone and on s3s-fs (the s3s project's
    # file-backed S3 server, Rust, from crates.io), built once into ~/.cargo, outside the checkout.
    if ! command -v s3s-fs >/dev/null && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
        log "installing s3s-fs (cargo install, a few minutes)"
        cargo install --quiet --locked s3s-fs@0.14.1 --features binary
    fi
fi
for name in outbox pipeline loop fleet; do
    if { [ "$what" = "$name" ] || [ "$what" = all ]; } && [ -f "benchmarks/bench_$name.py" ]; then
        "$VENV/bin/python" -m pytest "benchmarks/bench_$name.py" -q -p no:cacheprovider \
            --benchmark-json="benchmarks/results/$name.json" "$@"
    fi
done
