#!/usr/bin/env bash
# Run every test: the Rust crates (cargo test) and the Python suite (pytest), on .venv/.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow" -x`.
# Everything the tests use is installed here, before pytest starts: the tests install nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRITON_AL_EXTRAS="${TRITON_AL_EXTRAS:-test,triton,train,s3,fleet}"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

# The sinks whose clients pin packages that clash with ours get environments of their own.
sink_env() {  # sink_env NAME PACKAGE==VERSION
    local dir="$VENV/$1" spec="$2"
    local installed
    installed="$("$dir/bin/python" -c "import importlib.metadata as m; print(m.version('${spec%%==*}'))" 2>/dev/null || true)"
    if [ "$installed" != "${spec##*==}" ]; then
        log "installing $spec into $dir"
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir"
        "$dir/bin/pip" install --quiet "$spec"
    fi
}
# Prometheus' rule engine (promtool) for tests/test_alert_rules.py, and Prometheus itself for
# the --prometheus-url path in tests/test_calibrate.py.
ensure_debian_package prometheus /usr/bin/promtool --no-install-recommends
sink_env label-studio "label-studio==1.23.2"
sink_env nexus "datature==1.12.2"

echo "== cargo test (kernels, outbox writer, step)"
cargo test --release -p triton-al-kernels -p triton-al-outbox -p triton-al-step --quiet
echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
