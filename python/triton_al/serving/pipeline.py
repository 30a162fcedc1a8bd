"""Triton plus the uploader sidecar, started and stopped together (`triton-al serve`, the
demo, the tests and the benchmarks all use this).

Layout of the data directory (default `triton-al-data/`):

    outbox.db     the outbox the active_learning step appends to ($TRITON_AL_OUTBOX)
    store/        the local project store the uploader delivers to (unless --sink says otherwise)
    logs/         tritonserver.log, uploader.log
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from triton_al.serving.server import ControlMode, ServerError, TritonServer
from triton_al.step_settings import OUTBOX_ENV


@dataclass
class Uploader:
    """`triton-al uploader` as a child process, stopped by PID."""

    outbox: Path
    sink: str
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, timeout_s: float = 30.0) -> Uploader:
        ports_file = self.log_path.with_name("uploader.ports.json")
        ports_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(self.outbox), "--sink", self.sink,
             "--metrics-port", "0", "--admin-port", "0", "--ports-file", str(ports_file), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not ports_file.exists():
            if self.process.poll() is not None:
                raise ServerError(f"the uploader exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the uploader did not start within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.ports = json.loads(ports_file.read_text())
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.ports['admin']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)  # finishes the batch in flight
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


class Pipeline:
    """A model repository served by Triton, with the outbox and the uploader wired in."""

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        data_dir: str | os.PathLike[str] = "triton-al-data",
        *,
        sink: str | None = None,
        outbox: str | os.PathLike[str] | None = None,
        uploader: bool = True,
        uploader_args: list[str] | None = None,
        model_control_mode: ControlMode = "none",
        load_models: list[str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        tritonserver: str | None = None,
        console: bool = False,
        startup_timeout_s: float = 90.0,
        env: dict[str, str] | None = None,
        heal: bool = True,
    ) -> None:
        self.heal = heal and model_control_mode == "explicit"
        self.watchdog = None
        self.data_dir = Path(data_dir).absolute()
        self.outbox = Path(outbox).absolute() if outbox else self.data_dir / "outbox.db"
        self.store = self.data_dir / "store"
        self.sink = sink or f"local:{self.store}"
        self.logs = self.data_dir / "logs"
        self.server = TritonServer(
            model_repository, binary=tritonserver, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
            model_control_mode=model_control_mode, load_models=load_models or [], console=console,
            log_path=self.logs / "tritonserver.log", startup_timeout_s=startup_timeout_s,
            env={OUTBOX_ENV: str(self.outbox), **(env or {})},
        )
        self.uploader = Uploader(self.outbox, self.sink, self.logs / "uploader.log", uploader_args or []) if uploader else None

    def start(self) -> Pipeline:
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        from triton_al.outbox import Outbox

        Outbox(self.outbox).close()  # created before any writer or reader races to do it
        try:
            if self.uploader is not None:
                self.uploader.start()
            self.server.start()
            if self.heal:
                from triton_al.serving.watchdog import StubWatchdog

                self.watchdog = StubWatchdog(self.server).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        try:
            self.server.stop()
        finally:
            if self.uploader is not None:
                self.uploader.stop()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout_s: float = 60.0):
        """Ask the uploader to deliver everything queued now; returns its FlushResponse."""
        from triton_al.uploader.admin import AdminClient

        if self.uploader is None:
            raise ServerError("no uploader running")
        with AdminClient(self.uploader.admin_address) as admin:
            return admin.flush(timeout_s)
