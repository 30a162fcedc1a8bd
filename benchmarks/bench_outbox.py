"""Outbox and uploader speed, side by side with the floor each one stands on.

    scripts/bench.sh outbox

- append latency from one process: `Outbox.append_many` of one flagged PNG (durable:
  the WAL is fsynced before it returns) against a bare sqlite3 insert+commit of the same
  bytes with the same durability (the least any durable SQLite append can cost);
- appends from 4 writer processes at once (Triton's model instances): per-call p50/p99 and
  appends per second;
- uploader throughput into the local project store (asset + sidecar + index, fsynced)
  against writing the same two files per item with fsync and nothing else.
Targets (issue 4): appends add under 1 ms p99 to the caller; the uploader keeps up with at
least 500 flagged items per second.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from triton_al.outbox import FlaggedItem, Outbox
from triton_al.sinks.local import LocalStore, write_atomic
from triton_al.uploader.worker import Uploader


def pngs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # Fashion-MNIST-like: a 28x28 grayscale image, ~0.8 KB as PNG
        pixels = (rng.random((28, 28)) ** 3 * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def flagged(asset: bytes) -> FlaggedItem:
    return FlaggedItem(asset, "image/png", "fashion_cnn", "1", {"label": 3, "probs": [0.1] * 10}, 0.2, "entropy", 0.5,
                       "uncertain", ["active-learning"])


@pytest.fixture(scope="module")
def assets() -> list[bytes]:
    return pngs(20_000)


@pytest.mark.parametrize("impl", ["triton_al", "triton_al-sync-normal", "sqlite-bare", "fdatasync-only"])
def test_append_latency(benchmark, tmp_path, assets, impl):
    """One writer. Baselines: a bare SQLite insert of the same bytes at the same durability,
    and the disk's own floor: rewriting 11 pages (what an append adds to the WAL) in a file
    and `fdatasync`-ing it, with no database at all."""
    it = itertools.cycle(assets)
    if impl == "fdatasync-only":
        fd = os.open(tmp_path / "raw.bin", os.O_RDWR | os.O_CREAT)
        pages = os.urandom(11 * 4096)
        os.pwrite(fd, pages * 64, 0)
        offsets = itertools.cycle(range(0, 64 * len(pages), len(pages)))

        def write_and_sync():
            os.pwrite(fd, pages, next(offsets))
            os.fdatasync(fd)

        benchmark.pedantic(write_and_sync, rounds=3000, warmup_rounds=50)
        os.close(fd)
    elif impl.startswith("triton_al"):
        outbox = Outbox(tmp_path / "outbox.db", max_items=10**7, durable=impl == "triton_al")
        # cycle() repeats assets after 20k appends: repeats are deduplicated, which is cheaper,
        # so the rounds below stay under that.
        benchmark.pedantic(lambda: outbox.append_many([flagged(next(it))]), rounds=3000, warmup_rounds=50)
        outbox.close()
    else:
        conn = sqlite3.connect(tmp_path / "bare.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")

        def insert():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (data) VALUES (?)", (next(it),))
            conn.execute("COMMIT")

        benchmark.pedantic(insert, rounds=3000, warmup_rounds=50)
        conn.close()
    data = np.array(benchmark.stats.stats.data) * 1e3
    benchmark.extra_info.update(workload="append-1-process", impl=impl, p50_ms=float(np.percentile(data, 50)),
                                p99_ms=float(np.percentile(data, 99)))
    print(json.dumps({impl: benchmark.extra_info}))


def _writer(path: str, offset: int, n: int, rate: float, durable: bool, start, queue) -> None:
    items = [flagged(a) for a in pngs(n, seed=1000 + offset)]
    outbox = Outbox(path, max_items=10**7, durable=durable)
    start.wait()  # all writers begin together, after making their images (not timed)
    rng = np.random.default_rng(offset)
    latencies = []
    # Poisson arrivals on a fixed schedule (open loop): an append that runs late does not
    # push the next arrivals back, so the offered load stays `rate` per second.
    due = time.perf_counter()
    for item in items:
        if rate:
            due += rng.exponential(1 / rate)
            time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        outbox.append_many([item])
        latencies.append(time.perf_counter() - t0)
    queue.put(latencies)


WRITER_CASES = {
    # id: (writer processes; appends per second per writer, 0 = as fast as it can; durable;
    # uploader draining)
    "paced-4x250-per-s": (4, 250, True, True),
    "paced-4x250-per-s-no-uploader": (4, 250, True, False),
    "paced-4x250-per-s-sync-normal": (4, 250, False, True),
    "paced-1x250-per-s-no-uploader": (1, 250, True, False),
    "paced-1x250-per-s-no-uploader-sync-normal": (1, 250, False, False),
    "saturated": (4, 0, True, True),
    "saturated-sync-normal": (4, 0, False, True),
}


@pytest.mark.parametrize("case", list(WRITER_CASES))
def test_append_from_writer_processes(benchmark, tmp_path, case):
    """Four writer processes (Triton model instances) appending one item per call: paced at
    250 flagged items per second each (1,000/s in all: a busy server flagging a lot), and
    saturated (each appends as fast as it can: the lock's capacity, where queueing sets
    the tail). Variants take the uploader away, use `outbox_sync=normal` (no flush per
    append), or keep one writer (no contention at all: what an append costs when it comes
    after an idle gap, against `test_append_latency`'s back-to-back calls)."""
    writers, rate, durable, draining = WRITER_CASES[case]
    path = str(tmp_path / "outbox.db")
    Outbox(path).close()
    n = 1500
    result = {}
    # The uploader drains at the same time, as in production (its deletes take the same lock).
    uploader = None
    if draining:
        uploader = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", path,
                                     "--store", str(tmp_path / "store"), "--log-format", "text"], stderr=subprocess.DEVNULL)

    def run():
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        start = ctx.Barrier(writers + 1)
        procs = [ctx.Process(target=_writer, args=(path, w, n, rate, durable, start, queue)) for w in range(writers)]
        try:
            for p in procs:
                p.start()
            start.wait(timeout=600)
            t0 = time.perf_counter()
            latencies = np.concatenate([queue.get(timeout=600) for _ in procs])
            wall = time.perf_counter() - t0
        finally:
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    p.join(5)
                    p.kill()
        result.update(p50_ms=float(np.percentile(latencies, 50) * 1e3), p99_ms=float(np.percentile(latencies, 99) * 1e3),
                      max_ms=float(latencies.max() * 1e3), appends_per_s=len(latencies) / wall)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        if uploader is not None:
            os.kill(uploader.pid, signal.SIGTERM)
            uploader.wait(30)
    result["uploaded"] = Outbox(path).counters().get("uploaded", 0)
    benchmark.extra_info.update(workload=f"append-{writers}-processes-{case}", impl="triton_al", **result)
    print(json.dumps({"case": case, **result}))


@pytest.mark.parametrize("impl", ["triton_al-uploader", "files+fsync"])
def test_upload_throughput(benchmark, tmp_path, assets, impl):
    n = 3000
    batch = assets[:n]
    result = {}
    rounds = iter(range(100))

    def setup():
        r = next(rounds)
        root = tmp_path / f"round{r}"
        root.mkdir()
        if impl == "triton_al-uploader":
            outbox = Outbox(root / "outbox.db", max_items=10**7)
            outbox.append_many([flagged(a) for a in batch])
            uploader = Uploader(outbox, LocalStore(root / "store"), batch_size=64)
            return (uploader,), {}
        return (root / "files",), {}

    def drain(uploader: Uploader):
        while uploader.step() is not None:
            pass

    def files(folder: Path):
        folder.mkdir()
        for i, asset in enumerate(batch):
            write_atomic(folder / f"{i}.png", asset)
            write_atomic(folder / f"{i}.json", b'{"score": 0.2}')
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    benchmark.pedantic(drain if impl == "triton_al-uploader" else files, setup=setup, rounds=3)
    result["items_per_s"] = n / benchmark.stats.stats.median
    benchmark.extra_info.update(workload="upload-local-store", impl=impl, items=n, **result)
    print(json.dumps({impl: result}))
