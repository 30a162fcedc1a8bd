"""`triton-al deploy --url A --url B --url C`: a new version rolled over three real
tritonservers reading one model repository, one replica at a time, while a client sends to
all three; no request fails, and a version that does not load is set aside with every
replica back on the version it served."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading

import pytest
from triton_helpers import ROOT, copy_repository, fashion_pngs, grpcclient, infer_al

from triton_al.loop.deploy import served_versions
from triton_al.serving.pipeline import Pipeline

MODELS = ["fashion_cnn_al", "fashion_cnn", "preprocess", "active_learning"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    repository = copy_repository(tmp)
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(Pipeline(repository, tmp / f"data{i}", uploader=False, model_control_mode="explicit",
                                                 load_models=MODELS))
                    for i in range(3)]
        yield repository, [p.server.grpc_url for p in replicas]


class Traffic:
    """Requests to every replica in turn, from one thread per replica, until stopped."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self.answered, self.failures = urls, {u: 0 for u in urls}, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(u,)) for u in urls]
        self._pngs = fashion_pngs(4, start=500)[0]

    def _send(self, url: str) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while not self._stop.is_set():
                try:
                    infer_al(client, self._pngs)
                    self.answered[url] += 1
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    self.failures.append(f"{url}: {e}")

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def deploy(repository, urls, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "triton_al.cli", "deploy", "--model-repository", str(repository), "--model", "fashion_cnn",
            "--timeout", "60", *[a for u in urls for a in ("--url", u)], *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_version_rolls_over_every_replica_with_no_failed_request_and_a_broken_one_is_set_aside(fleet):
    repository, urls = fleet
    model_dir = repository / "fashion_cnn"
    assert all(served_versions(u, "fashion_cnn") == [1] for u in urls)

    shutil.copytree(model_dir / "1", model_dir / "2")
    with Traffic(urls) as traffic:
        done = deploy(repository, urls)
        before_end = dict(traffic.answered)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("serving fashion_cnn version 2 on 3 replicas")
    # Replica by replica, in the order given.
    assert [line.split(": ")[0] for line in done.stderr.splitlines() if "serving fashion_cnn" in line] == urls
    assert traffic.failures == [], traffic.failures[:3]
    assert all(n > 0 for n in before_end.values()), f"every replica answered during the roll-out: {before_end}"
    assert [served_versions(u, "fashion_cnn") for u in urls] == [[2], [2], [2]]

    # A version whose model file is broken fails the smoke test: no live server is touched.
    (model_dir / "3").mkdir()
    shutil.copy2(model_dir / "1" / "model.py", model_dir / "3" / "model.py")
    (model_dir / "3" / "model.onnx").write_bytes(b"not an onnx model")
    with Traffic(urls) as traffic:
        broken = deploy(repository, urls)
    assert broken.returncode != 0
    assert "version 3 of 'fashion_cnn' does not load" in broken.stderr and "no live server was touched" in broken.stderr, broken.stderr
    assert traffic.failures == [], traffic.failures[:3]
    assert not (model_dir / "3").exists() and (model_dir / "failed-3" / "model.onnx").exists()
    assert [served_versions(u, "fashion_cnn") for u in urls] == [[2], [2], [2]]


def test_a_version_whose_load_would_hang_never_reaches_a_live_server(fleet):
    """A version folder without its model.py makes the Python backend's load hang (and the
    model stay LOADING on that server): the smoke test's scratch server takes the hang."""
    repository, urls = fleet
    model_dir = repository / "fashion_cnn"
    new = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    (model_dir / str(new)).mkdir()
    shutil.copy2(model_dir / "1" / "model.onnx", model_dir / str(new) / "model.onnx")
    serving = [served_versions(u, "fashion_cnn") for u in urls]
    hung = deploy(repository, urls, "--timeout", "8")
    assert hung.returncode != 0 and "no live server was touched" in hung.stderr, hung.stderr
    assert (model_dir / f"failed-{new}").is_dir()
    assert [served_versions(u, "fashion_cnn") for u in urls] == serving
    shutil.copytree(model_dir / "1", model_dir / str(new))  # the next good version still deploys everywhere
    done = deploy(repository, urls)
    assert done.returncode == 0, done.stderr
    assert [served_versions(u, "fashion_cnn") for u in urls] == [[new]] * 3


def test_a_replica_named_twice_or_unreachable_changes_nothing(fleet, tmp_path):
    repository, urls = fleet
    serving = [served_versions(u, "fashion_cnn") for u in urls]
    twice = deploy(repository, [urls[0], urls[0]])
    assert twice.returncode != 0 and "named twice" in twice.stderr
    from triton_al.serving.server import free_port

    dead = f"127.0.0.1:{free_port()}"
    unreachable = deploy(repository, [*urls, dead])
    assert unreachable.returncode != 0 and f"replica {dead} does not answer" in unreachable.stderr, unreachable.stderr
    assert [served_versions(u, "fashion_cnn") for u in urls] == serving


def test_a_version_failing_on_a_later_replica_puts_the_switched_ones_back(fleet):
    """The version breaks after the first replica switched (its file is overwritten), so the
    second cannot load it: the first must go back to the version it served."""
    from triton_al.loop.deploy import DeployError, deploy_fleet

    repository, urls = fleet
    model_dir = repository / "fashion_cnn"
    serving = served_versions(urls[0], "fashion_cnn")
    new = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    shutil.copytree(model_dir / "1", model_dir / str(new))
    switched = []

    def break_it_after_the_first(url: str, version: int) -> None:
        switched.append((url, version))
        (model_dir / str(new) / "model.onnx").write_bytes(b"broken after the first replica loaded it")

    with Traffic(urls) as traffic, pytest.raises(DeployError) as error:
        deploy_fleet(urls, repository, "fashion_cnn", timeout_s=60, on_replica=break_it_after_the_first)
    assert switched == [(urls[0], new)], str(error.value)
    assert f"did not load on {urls[1]}" in str(error.value) and f"failed-{new}" in str(error.value)
    assert traffic.failures == [], traffic.failures[:3]
    assert [served_versions(u, "fashion_cnn") for u in urls] == [serving] * 3
