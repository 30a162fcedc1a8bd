#!/usr/bin/env bash
# Run every test: the Rust crates (cargo test) and the Python suite (pytest), on .venv/.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow" -x`.
# Everything the tests use is installed here, before pytest starts: the tests install nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TRITON_AL_EXTRAS="${TRITON_AL_EXTRAS:-test,triton,train,s3,fleet}"

# The sinks whose clients pin packages that clash with ours get environments of their own,
# installed in the background while bootstrap.sh installs and builds the rest (they need
# nothing from it but a Python).
SINK_PYTHON="${PYTHON:-python3.11}"
command -v "$SINK_PYTHON" >/dev/null 2>&1 || SINK_PYTHON=python3
sink_env() {  # sink_env NAME PACKAGE==VERSION
    local dir="$ROOT/.venv/$1" spec="$2"
    local installed
    installed="$("$dir/bin/python" -c "import importlib.metadata as m; print(m.version('${spec%%==*}'))" 2>/dev/null || true)"
    if [ "$installed" != "${spec##*==}" ]; then
        printf '\033[1m[test.sh]\033[0m installing %s into %s\n' "$spec" "$dir" >&2
        rm -rf "$dir"
        "$SINK_PYTHON" -m venv "$dir"
        "$dir/bin/pip" install --quiet "$spec"
    fi
}
mkdir -p "$ROOT/.venv"
sink_jobs=()
for sink in label-studio=label-studio==1.23.2 nexus=datature==1.12.2; do
    name="${sink%%=*}"
    sink_env "$name" "${sink#*=}" > "$ROOT/.venv/$name.install.log" 2>&1 &
    sink_jobs+=("$!:$name")
done

source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

# Prometheus' rule engine (promtool) for tests/test_alert_rules.py, and Prometheus itself for
# the --prometheus-url paths in tests/test_calibrate.py, tests/test_drift.py and
# tests/test_observability.py.
ensure_debian_package prometheus /usr/bin/promtool --no-install-recommends

for job in "${sink_jobs[@]}"; do
    if ! wait "${job%%:*}"; then
        cat "$ROOT/.venv/${job#*:}.install.log" >&2
        log "installing the ${job#*:} environment failed (log above)"; exit 1
    fi
    cat "$ROOT/.venv/${job#*:}.install.log" >&2
done

echo "== cargo test (kernels, outbox writer, step)"
cargo test --profile release-tests -p triton-al-kernels -p triton-al-outbox -p triton-al-step --quiet
echo "== pytest"
exec "$VENV/bin/python" -m pytest "$@"
