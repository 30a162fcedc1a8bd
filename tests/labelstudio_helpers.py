"""A real Label Studio server for the tests: from PyPI, in its own virtual environment
`.venv/label-studio/` made by scripts/test.sh (its Django pins stay out of the serving
environment), started on a free 127.0.0.1 port, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from process_helpers import stop_process

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "label-studio"
VERSION = "1.23.2"
TOKEN = "0123456789abcdef0123456789abcdef0badc0de"  # a test-only token: 40 hex digits


def ensure_installed() -> Path:
    """Label Studio's own environment, made by scripts/test.sh before pytest starts (the
    tests install nothing)."""
    binary = VENV / "bin" / "label-studio"
    if not binary.exists():
        pytest.fail(f"Label Studio {VERSION} is not installed in {VENV}: run the tests with `bash scripts/test.sh`, "
                    "which installs it first")
    return binary


class LabelStudioServer:
    def __init__(self, data_dir: Path, port: int, template: Path | None = None) -> None:
        """`template`: a data folder a server has already set up (see the session fixture
        `label_studio_template` in conftest.py), copied to `data_dir` before the start."""
        self.data_dir, self.port = data_dir, port
        self.binary = ensure_installed()
        if template is not None:
            shutil.copytree(template, data_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("label-studio.log"))
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
        stop_process(self.proc, 20)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def set_up_template(data_dir: Path) -> Path:
    """Starts Label Studio once on an empty folder (its database migrations, its user and
    token: ~2 min under load) and stops it; servers copied from the folder start in ~30 s."""
    from triton_al.serving.server import free_port

    server = LabelStudioServer(data_dir, free_port())
    server.start()
    server.stop()
    return data_dir


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory, label_studio_template):
    """One real Label Studio per test module, from the session's set-up copy (import this
    fixture where it is used)."""
    from triton_al.serving.server import free_port

    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"), free_port(), template=label_studio_template)
    server.start()
    try:
        yield server
    finally:
        server.stop()
