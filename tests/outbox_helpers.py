"""Helpers for outbox and uploader tests: real PNGs, writer processes, the uploader as a
subprocess (always stopped by PID), small filesystems."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from triton_al.outbox import FlaggedItem


def png(seed: int, size: int = 28) -> bytes:
    """A distinct small grayscale PNG per seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def item(seed: int, *, score: float = 0.1, groups=("active-learning",), asset: bytes | None = None,
         media_type: str = "image/png") -> FlaggedItem:
    return FlaggedItem(
        asset=png(seed) if asset is None else asset, media_type=media_type, model_name="fashion_cnn", model_version="1",
        prediction={"label": seed % 10, "probs": [0.1] * 10}, score=score, strategy="entropy", threshold=0.5,
        reason="uncertain", upload_groups=list(groups),
    )


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def store_index(store: Path, group: str) -> list[dict]:
    path = store / group / "index.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class UploaderProcess:
    """`triton-al uploader` as a child process; `stop()` is by PID and idempotent."""

    def __init__(self, outbox: Path, store: Path | None = None, *extra: str, sink: str | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.ports_file = Path(tempfile.mkdtemp(prefix="uploader-ports-")) / "ports.json"
        target = ["--sink", sink] if sink else ["--store", str(store)]
        self.args = [sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox), *target,
                     "--ports-file", str(self.ports_file), *extra]
        self.log_path = log_path or self.ports_file.with_name("uploader.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ports(self, timeout: float = 30) -> dict[str, int]:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"uploader exited with {self.proc.returncode}:\n{self.log()}")
            # a 1-tuple, so that "listening on no ports" ({}) still counts as ready
            return self.ports_file.exists() and (json.loads(self.ports_file.read_text()),)

        try:
            return wait_for(ready, timeout, "the uploader to listen")[0]
        except AssertionError:
            raise AssertionError(f"uploader not ready:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def uploaders() -> Iterator[Callable[..., UploaderProcess]]:
    """Start uploader processes; every one is stopped by PID at the end, pass or fail."""
    started: list[UploaderProcess] = []

    def start(*args, **kwargs) -> UploaderProcess:
        p = UploaderProcess(*args, **kwargs)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (needs CAP_SYS_ADMIN; the test is skipped
    without it). Unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}); needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)
