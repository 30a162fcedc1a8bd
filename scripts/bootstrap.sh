#!/usr/bin/env bash
# Make .venv/ ready: Python dependencies, the Rust extension (release build), and the
# Debian packages the project uses. Sourced by scripts/demo.sh and scripts/test.sh.
# Each step is skipped when its inputs have not changed, so a second run takes about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMPS="$VENV/.stamps"
EXTRAS="${TRITON_AL_EXTRAS:-test,triton}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
mkdir -p "$STAMPS"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

# A stamp holds the hash of a step's inputs; the step reruns only when the hash changes.
fresh() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

deps_hash="$(printf '%s' "$EXTRAS" | cat - "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if ! fresh deps "$deps_hash"; then
    log "installing Python dependencies (extras: $EXTRAS)"
    # The dependency lists live in pyproject.toml only; read them from there.
    mapfile -t reqs < <("$VENV/bin/python" - "$ROOT/pyproject.toml" "$EXTRAS" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PY
)
    "$VENV/bin/pip" install --quiet "maturin>=1.7,<2" "${reqs[@]}"
    echo "$deps_hash" > "$STAMPS/deps"
fi

# Debian packages: Fashion-MNIST for the example model and the demo; SQLite's headers,
# because the Python extension links the system SQLite that Python's sqlite3 module uses.
ensure_debian_package() {  # ensure_debian_package PACKAGE PROBE_FILE [apt-get install options]
    local package="$1" probe="$2"; shift 2
    [ -e "$probe" ] && return 0
    log "installing Debian package $package"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" "$package" >/dev/null
}
ensure_debian_package dataset-fashion-mnist /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
ensure_debian_package libsqlite3-dev /usr/include/sqlite3.h
ensure_debian_package redis-server /usr/bin/redis-server  # the fleet ledger in tests/test_fleet.py

# The Rust parts: the Python extension (triton_al._core) and the native Triton backend
# (libtriton_active_learning.so, copied into the package so `serve` finds it).
NATIVE="$ROOT/python/triton_al/native/libtriton_active_learning.so"
# Compiled crates are kept outside the checkout, so that a fresh clone (CI) reuses them; the
# build and the copy of its result hold a lock, as other checkouts may share the folder.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/triton-al/cargo-target}"
mkdir -p "$CARGO_TARGET_DIR"
build_hash="$(cd "$ROOT" && hash_of Cargo.toml Cargo.lock pyproject.toml $(find rust -type f \( -name '*.rs' -o -name Cargo.toml -o -name '*.sql' -o -name '*.json' \) | sort))"
if ! fresh build "$build_hash" || ! ls "$ROOT"/python/triton_al/_core*.so >/dev/null 2>&1 || [ ! -f "$NATIVE" ]; then
    log "building the Rust extension and the native Triton backend (release)"
    mkdir -p "$(dirname "$NATIVE")"
    if ! (cd "$ROOT" && flock 9 && "$VENV/bin/maturin" develop --release > "$STAMPS/build.log" 2>&1 \
          && cargo build --release --quiet -p triton-al-backend >> "$STAMPS/build.log" 2>&1 \
          && cp "$CARGO_TARGET_DIR/release/libtriton_active_learning.so" "$NATIVE.tmp") 9> "$CARGO_TARGET_DIR/.build.lock"; then
        cat "$STAMPS/build.log" >&2; log "the Rust build failed (log above)"; exit 1
    fi
    mv "$NATIVE.tmp" "$NATIVE"
    "$VENV/bin/python" -c "import triton_al._core" || { log "the extension does not import"; exit 1; }
    echo "$build_hash" > "$STAMPS/build"
fi
