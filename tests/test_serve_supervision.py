"""`triton-al serve` and its uploader sidecar: a dead uploader is restarted with exponential
backoff, a failed restart never takes Triton down, and a sink the outbox never delivered to
is refused before anything starts."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from outbox_helpers import item, png, store_index, wait_for
from triton_helpers import ROOT, copy_repository, fashion_pngs, grpcclient, infer_al

from triton_al.outbox import Outbox, content_hash
from triton_al.serving.pipeline import Uploader as Sidecar
from triton_al.uploader.commands import lock_path

GROUP = "active-learning"


def hold_lock(outbox: Path) -> int:
    """Take the outbox's uploader lock as a rival uploader would (blocks until free)."""
    fd = os.open(lock_path(outbox), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_dead_uploader_is_restarted_with_exponential_backoff(tmp_path):
    outbox = tmp_path / "outbox.db"
    with Outbox(outbox) as o:
        o.append_many([item(i) for i in range(5)])
    sidecar = Sidecar(outbox, f"local:{tmp_path / 'store'}", tmp_path / "logs" / "uploader.log",
                      restart_delay_s=0.2, restart_max_delay_s=0.5, stable_after_s=30)
    sidecar.start()
    try:
        wait_for(lambda: len(store_index(tmp_path / "store", GROUP)) == 5, 30, "the first deliveries")
        ports = dict(sidecar.ports)
        os.kill(sidecar.pid, signal.SIGKILL)
        sidecar.process.wait()
        lock = hold_lock(outbox)  # every restart now fails at once: another uploader holds the outbox
        spawned: list[float] = []
        deaths: list[float] = []
        try:
            deadline = time.monotonic() + 20
            while len(spawned) < 3 and time.monotonic() < deadline:
                line = sidecar.supervise()
                if line and line.startswith("restarted"):
                    spawned.append(time.monotonic())
                elif line and "exited with code" in line:
                    deaths.append(time.monotonic())
                time.sleep(0.01)
        finally:
            os.close(lock)
        assert len(spawned) == 3, f"restarts at {spawned}"
        waits = [s - d for d, s in zip(deaths, spawned)]
        assert 0.15 < waits[0] < 0.35 and waits[1] > 1.7 * waits[0], waits  # 0.2, then 0.4 ...
        assert 0.45 < waits[2] < 0.7, f"the cap (0.5 s) was not applied: {waits}"  # ... then 0.5, not 0.8
        assert "another uploader is already draining" in sidecar.log_tail()
        wait_for(lambda: sidecar.supervise() is None and sidecar.ready(), 20, "a restart that stays up")
        assert sidecar.ports == ports, "restarted on other ports"
        with Outbox(outbox) as o:
            o.append_many([item(10)])
        wait_for(lambda: len(store_index(tmp_path / "store", GROUP)) == 6, 30, "delivery by the restarted uploader")
    finally:
        sidecar.stop()


def serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "serve.log"
    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "serve", *args], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    handle.close()
    return proc, log


def test_serve_keeps_triton_up_while_the_uploader_cannot_run(tmp_path):
    repo = copy_repository(tmp_path)
    data = tmp_path / "data"
    proc, log = serve(tmp_path, "--model-repository", str(repo), "--data-dir", str(data), "--quiet",
                      "--uploader-restart-delay", "0.2", "--uploader-restart-max-delay", "0.5")
    try:
        def info():
            assert proc.poll() is None, log.read_text()
            m = re.search(r"^serving: (.*)$", log.read_text(), re.M)
            return m and json.loads(m.group(1))

        served = wait_for(info, 90, "serve to start")
        os.kill(served["uploader_pid"], signal.SIGKILL)
        lock = hold_lock(data / "outbox.db")
        try:
            wait_for(lambda: len(re.findall("restarting it in", log.read_text())) >= 4, 30, "four failed restarts")
            assert proc.poll() is None, log.read_text()
            with grpcclient.InferenceServerClient(served["grpc"]) as c:  # Triton kept serving all along
                _, score, flagged = infer_al(c, fashion_pngs(4)[0])
            assert score.shape == (4,)
            delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+) s", log.read_text())]
            assert delays[:4] == [0.2, 0.4, 0.5, 0.5], delays  # doubling from 0.2, capped at 0.5
        finally:
            os.close(lock)
        # The lock is free: the next restart stays up and delivers what was flagged meanwhile.
        flagged_count = int(flagged.sum())
        wait_for(lambda: len(store_index(data / "store", GROUP)) == flagged_count, 30, "delivery after the restart")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_refuses_a_sink_the_outbox_never_delivered_to(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with Outbox(data / "outbox.db") as o:
        o.claim_sink(f"local:{tmp_path / 'old'}")
        o.append_many([item(1)])
        o.mark_delivered([o.due(1)[0].id])
    repo = tmp_path / "repo"
    repo.mkdir()
    proc, log = serve(tmp_path, "--model-repository", str(repo), "--data-dir", str(data), "--store", str(tmp_path / "new"), "--quiet")
    try:
        assert proc.wait(60) == 2, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    text = " ".join(log.read_text().split())
    assert f"delivered 1 items to local:{tmp_path / 'old'}, not to local:{tmp_path / 'new'}" in text
    assert "--forget-deliveries" in text
    assert content_hash(png(1))  # the image stays remembered for the old store
