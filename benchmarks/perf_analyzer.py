"""Running Triton's `perf_analyzer` (shipped in the tritonclient wheel) from the benchmarks.

It needs two things this machine lacks out of the box (DESIGN.md, "running Triton here"):
the Debian package `libb64-0d` (scripts/bench.sh installs it), and `libcudart.so.12`, which
the nvidia-pytriton wheel bundles under a hashed name: a folder with a link of the plain
name goes on LD_LIBRARY_PATH. Nothing here needs a GPU.

Input data: a JSON file with one entry ("step") per distinct input. A BYTES tensor's `b64`
is the base64 of the *serialized* element (4-byte little-endian length, then the bytes), so
each entry holds one PNG and the model gets `--shape IMAGE:1`. perf_analyzer walks through
the entries in order, so distinct images reach the server as distinct items (checked by
counting the rows a flag-everything step appends to the outbox).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def binary() -> Path | None:
    found = VENV_BIN / "perf_analyzer"
    return found if found.is_file() else (Path(shutil.which("perf_analyzer")) if shutil.which("perf_analyzer") else None)


def _cudart() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    found = sorted(libs.glob("libcudart-*.so.12*"))
    return found[0] if found else None


def environment(scratch: Path) -> tuple[dict[str, str] | None, str]:
    """(env for perf_analyzer, "") when it can run here, else (None, why not)."""
    exe = binary()
    if exe is None:
        return None, "perf_analyzer not found (pip install tritonclient[all]==2.51.0 ships it)"
    cudart = _cudart()
    if cudart is None:
        return None, "no libcudart-*.so.12 in the nvidia-pytriton wheel's nvidia_pytriton.libs"
    libdir = scratch / "perf_analyzer_libs"
    libdir.mkdir(parents=True, exist_ok=True)
    link = libdir / "libcudart.so.12"
    if not link.exists():
        link.symlink_to(cudart)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"perf_analyzer does not run: {(probe.stderr or probe.stdout).strip()[-300:]} (is libb64-0d installed?)"
    return env, ""


def serialized_b64(data: bytes) -> str:
    """A BYTES element as perf_analyzer's JSON wants it: base64 of length-prefixed bytes."""
    return base64.b64encode(struct.pack("<I", len(data)) + data).decode()


def write_input_data(path: Path, images: list[bytes], probs=None, constant: dict | None = None) -> Path:
    """One step per image: `{"data": [{"IMAGE": {"b64": ...}}, ...]}`; with `probs` (one row
    of class probabilities per image) each step also holds `PROBS`, for calling the step
    model directly, and `constant` adds the same value of other inputs to every step
    (e.g. `{"MODEL_VERSION": [1]}`)."""
    steps = [{"IMAGE": {"b64": serialized_b64(png)}, **(constant or {})} for png in images]
    if probs is not None:
        for step, row in zip(steps, probs):
            step["PROBS"] = [float(v) for v in row]
    path.write_text(json.dumps({"data": steps}))
    return path


def run(env: dict[str, str], url: str, model: str, input_data: Path, *, batch: int = 1, concurrency: int | None = None,
        rate: float | None = None, window_ms: int = 2000, windows: int = 3,
        distribution: str = "constant", timeout_s: float = 300.0) -> dict:
    """One perf_analyzer measurement over gRPC, closed loop (`concurrency`, synchronous
    calls, one thread per concurrent request) or open loop (`rate` requests/s, asynchronous
    calls on a fixed schedule). Exactly `windows` time windows are measured and averaged:
    the stability criterion is switched off (`-s 1000`), because on this shared 2-core
    machine perf_analyzer otherwise often gives up with "Failed to obtain stable
    measurement" and writes no result. Returns its CSV row: throughput (items/s) and
    latency percentiles per request in ms."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give concurrency or rate")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        args = [
            str(binary()), "-m", model, "-i", "grpc", "-u", url, "-b", str(batch),
            "--input-data", str(input_data), "--shape", "IMAGE:1",
            "--measurement-mode", "time_windows", "-p", str(window_ms), "-r", str(windows), "-s", "1000",
            "-f", str(out),
        ]
        if concurrency is not None:
            args += ["--concurrency-range", f"{concurrency}:{concurrency}"]
        else:
            args += ["--async", "--request-rate-range", f"{rate}:{rate}", "--request-distribution", distribution]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
        stdout = done.stdout
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {' '.join(args)}\n{stdout[-2000:]}\n{done.stderr[-2000:]}")
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
    row = rows[-1]
    us = lambda key: float(row[key]) / 1000.0  # noqa: E731 - microseconds to ms
    return {
        "items_per_s": float(row["Inferences/Second"]),
        "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"), "p95_ms": us("p95 latency"), "p99_ms": us("p99 latency"),
        "server_queue_ms": us("Server Queue"), "server_compute_infer_ms": us("Server Compute Infer"),
        "delayed": _delayed(stdout),
        "command": " ".join(args),
    }


def _delayed(stdout: str) -> float | None:
    """The share of requests perf_analyzer could not send on schedule (open loop), if it said."""
    found = re.search(r"([0-9.]+)% of the requests were delayed", stdout)
    return float(found.group(1)) if found else 0.0
