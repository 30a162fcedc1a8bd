"""A real Label Studio server for the tests: installed from PyPI into its own virtual
environment inside `.venv/` (its Django pins stay out of the serving environment), started
on a free 127.0.0.1 port, stopped by PID."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "label-studio"
VERSION = "1.23.2"
TOKEN = "0123456789abcdef0123456789abcdef0badc0de"  # a test-only token: 40 hex digits


def ensure_installed() -> Path:
    binary = VENV / "bin" / "label-studio"
    with open(ROOT / ".venv" / ".label-studio.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if not binary.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", f"label-studio=={VERSION}"], check=True, timeout=900)
    return binary


class LabelStudioServer:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.binary = ensure_installed()
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "label-studio.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> None:
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir), "LABEL_STUDIO_USERNAME": "ci@example.com",
               "LABEL_STUDIO_PASSWORD": "not-a-real-password-123", "LABEL_STUDIO_USER_TOKEN": TOKEN,
               "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LATEST_VERSION_CHECK": "false"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(self.binary), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                          "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.data_dir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"Label Studio did not become healthy:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
