"""The Datature Nexus sink, through the official `datature` SDK, against a LOCAL FAKE of the
Nexus API (tests/nexus_fake_server.py): the real service cannot be reached from here.

The SDK needs protobuf 5 and tritonclient protobuf < 5, so the SDK runs in its own
environment, `.venv/nexus/`, created here on first use (about 50 s)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.serving.server import free_port
from triton_al.sinks import open_sink
from triton_al.sinks.base import PermanentSinkError, Upload
from triton_al.sinks.nexus import NexusSink

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "nexus"
SECRET = "nexus-secret-key-that-must-not-leak"
PROJECT = "proj_triton_al_test"


def ensure_sdk() -> str:
    python = VENV / "bin" / "python"
    with open(ROOT / ".venv" / ".nexus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (VENV / ".installed").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", "datature==1.12.2"], check=True, timeout=900)
            (VENV / ".installed").touch()
    return str(python)


class FakeNexus:
    def __init__(self, data: Path) -> None:
        self.data, self.port, self.proc = data, free_port(), None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nexus_fake_server.py"), "--port", str(self.port),
                                      "--data", str(self.data), "--project", PROJECT],
                                     env={**os.environ, "FAKE_NEXUS_SECRET": SECRET}, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the fake Nexus server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)

    def state(self) -> dict:
        path = self.data / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"assets": {}, "sessions": []}


@pytest.fixture(scope="module")
def python():
    return ensure_sdk()


@pytest.fixture
def server(tmp_path):
    s = FakeNexus(tmp_path / "nexus")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def env(server, monkeypatch, python):
    monkeypatch.setenv("DATATURE_SECRET_KEY", SECRET)
    monkeypatch.setenv("DATATURE_API_ENDPOINT", server.url)
    monkeypatch.setenv("TRITON_AL_NEXUS_PYTHON", python)


@pytest.fixture
def sink(env):
    return open_sink(f"nexus://{PROJECT}")


@pytest.fixture
def stored(server):
    def read(group):
        out = {}
        for name, asset in server.state()["assets"].items():
            if group not in asset["groups"]:
                continue
            assert (server.data / "assets" / name).exists()
            custom = asset.get("custom", {})
            out[name.split(".")[0]] = {"score": custom.get("triton_al_score"),
                                      "model_version": str(custom.get("triton_al_model", ":")).split(":")[1],
                                      "prediction": {"label": custom.get("triton_al_label")}}
        return out

    return read


@pytest.fixture
def outage(server):
    @contextlib.contextmanager
    def down():
        server.stop()
        try:
            yield
        finally:
            server.start()

    return down


@pytest.fixture
def bad_credentials_sink(env, monkeypatch):
    monkeypatch.setenv("DATATURE_SECRET_KEY", "wrong-" + SECRET)
    return open_sink(f"nexus://{PROJECT}")


@pytest.fixture
def secret():
    return SECRET


class TestNexusSink(SinkConformance):
    pass


def test_groups_reach_the_upload_session_and_files_are_named_by_hash(sink, server):
    batch = [upload(1, group="hard-cases"), upload(2, group="review")]
    assert sink.upload(batch) == [None, None]
    sessions = server.state()["sessions"]
    assert sorted((s["groups"], s["files"]) for s in sessions) == sorted(
        [(["hard-cases"], [batch[0].filename]), (["review"], [batch[1].filename])])
    assert (server.data / "assets" / batch[0].filename).read_bytes() == batch[0].asset


def test_an_asset_nexus_refuses_is_a_permanent_error_for_that_item_only(sink, server):
    """A non-image asset: refused by the SDK's own file-type check (or by the service)."""
    npy = b"\x93NUMPY-not-an-image"
    refused = Upload(GROUP, __import__("hashlib").sha256(npy).hexdigest(), npy, "application/x-npy", {"score": 0.1})
    results = sink.upload([upload(3), refused, upload(4)])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentSinkError)
    assert "refused by the SDK" in str(results[1]) or "unsupported file type" in str(results[1])
    assert sorted(server.state()["assets"]) == sorted([upload(3).filename, upload(4).filename])


@pytest.mark.parametrize("uri", ["nexus://", "nexus://a/b", "nexus://proj-x!"])
def test_bad_uris_are_refused(uri, env):
    with pytest.raises(ValueError, match="expected nexus://PROJECT_ID"):
        open_sink(uri)


def test_without_the_sdk_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    import triton_al.sinks.nexus as nexus

    monkeypatch.delenv("TRITON_AL_NEXUS_PYTHON", raising=False)
    monkeypatch.setattr(nexus, "PACKAGE_ROOT", tmp_path / "python")
    monkeypatch.setattr(nexus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install datature"):
        NexusSink("proj_x")
