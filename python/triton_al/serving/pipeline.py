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
import re
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
    """`triton-al uploader` as a child process, stopped by PID, and restarted when it dies:
    with exponential backoff (`restart_delay_s` doubling up to `restart_max_delay_s`, back
    to the start once a run lasted `stable_after_s`), on the ports it had (the addresses
    printed by `serve` stay right)."""

    outbox: Path
    sink: str
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)
    restart_delay_s: float = 1.0
    restart_max_delay_s: float = 60.0
    stable_after_s: float = 60.0
    restarts: int = 0
    _log: object = field(default=None, repr=False)
    _delay_s: float = 0.0
    _restart_at: float | None = None
    _started_at: float = 0.0
    _listened: bool = True

    @property
    def ports_file(self) -> Path:
        return self.log_path.with_name("uploader.ports.json")

    def spawn(self) -> None:
        """Start the process; its ports are read once it listens (`ready`)."""
        self.ports_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = open(self.log_path, "ab")
        if not self._listened and re.search(r"cannot bind|[Aa]ddress already in use", self.log_tail(5)):
            self.ports = {}  # its port was taken meanwhile: any free one
        self._listened = False
        ports = ["--metrics-port", str(self.ports.get("metrics", 0)), "--admin-port", str(self.ports.get("admin", 0))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(self.outbox), "--sink", self.sink,
             *ports, "--ports-file", str(self.ports_file), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._started_at = time.monotonic()

    def ready(self) -> bool:
        """True once the running uploader listens (its ports are known)."""
        if not self.alive():
            return False
        if self.ports_file.exists():
            if not self._listened:
                try:
                    self.ports = json.loads(self.ports_file.read_text())
                except (OSError, ValueError):
                    return False
                self._listened = True
            return True
        return False

    def start(self, timeout_s: float = 30.0) -> Uploader:
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"the uploader exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the uploader did not start within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def supervise(self, now: float | None = None) -> str | None:
        """Call periodically: restarts a dead uploader once its backoff has passed. Never
        raises for the uploader's sake; returns a line worth showing, or None."""
        now = time.monotonic() if now is None else now
        if self.alive():
            self.ready()  # picks up the ports of a restarted uploader
            if self._delay_s and now - self._started_at >= self.stable_after_s:
                self._delay_s = 0.0  # it stayed up: the next crash restarts quickly again
            return None
        if self._restart_at is None:
            code = None if self.process is None else self.process.returncode
            ran = now - self._started_at
            if ran >= self.stable_after_s:
                self._delay_s = 0.0
            self._delay_s = self.restart_delay_s if not self._delay_s else min(self.restart_max_delay_s, self._delay_s * 2)
            self._restart_at = now + self._delay_s
            return (f"the uploader exited with code {code} after {ran:.1f} s; restarting it in {self._delay_s:.1f} s "
                    f"(queued items are safe in the outbox; Triton keeps serving). Log tail:\n{self.log_tail(5)}")
        if now < self._restart_at:
            return None
        self._restart_at = None
        self.restarts += 1
        try:
            self.spawn()
        except OSError as e:
            self._started_at = now
            self.process = None
            return f"could not start the uploader: {e}"
        return f"restarted the uploader (pid {self.process.pid}, restart {self.restarts})"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.ports['admin']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        self._restart_at = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)  # finishes the batch in flight
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
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
        uploader_required: bool = True,
        uploader_restart_delay_s: float = 1.0,
        uploader_restart_max_delay_s: float = 60.0,
    ) -> None:
        self.heal = heal and model_control_mode == "explicit"
        self.messages: list[str] = []
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
        self.uploader = Uploader(self.outbox, self.sink, self.logs / "uploader.log", uploader_args or [],
                                 restart_delay_s=uploader_restart_delay_s,
                                 restart_max_delay_s=uploader_restart_max_delay_s) if uploader else None
        self.uploader_required = uploader_required
        """False (`serve`): an uploader that fails to start is reported and restarted with
        backoff while Triton serves; True: `start` raises."""

    def start(self) -> Pipeline:
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        from triton_al.outbox import Outbox

        Outbox(self.outbox).close()  # created before any writer or reader races to do it
        try:
            if self.uploader is not None:
                try:
                    self.uploader.start()
                except ServerError as e:
                    if self.uploader_required:
                        raise
                    self.uploader.supervise()  # schedules the restart
                    self.messages.append(f"the uploader did not start; retrying with backoff while Triton serves: {e}")
            self.server.start()
            if self.heal:
                from triton_al.serving.watchdog import StubWatchdog

                self.watchdog = StubWatchdog(self.server).start()
        except BaseException:
            self.stop()
            raise
        return self

    def supervise(self) -> list[str]:
        """Call periodically while serving: restarts a dead uploader (with backoff). Never
        touches Triton. Returns the lines worth showing since the last call."""
        if self.uploader is not None:
            line = self.uploader.supervise()
            if line:
                self.messages.append(line)
        out, self.messages = self.messages, []
        return out

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
