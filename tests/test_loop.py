"""The whole cycle, small: serve, send images, flagged items reach the store, the simulated
annotator labels them, retrain, deploy the new version while a client keeps sending (no
failed request), the new version answers, the cycle records show both versions; plus a
version that fails to load, rollback, the report and calibrate --apply."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from triton_helpers import ROOT, copy_repository, grpcclient, infer_al

from triton_al.example.data import CLASS_NAMES, encode_png, load
from triton_al.loop.cycles import read_cycles
from triton_al.loop.deploy import served_versions
from triton_al.serving.pipeline import Pipeline
from triton_al.sinks.local import LocalStore

pytest.importorskip("jax", reason="retraining needs the train extra (jax)")
GROUP = "active-learning"


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"triton-al {args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def pool(n: int, start: int) -> np.ndarray:
    images = load("train")[0][start : start + n]  # unlabelled traffic: training images the base set did not use
    return np.array([[encode_png(x)] for x in images], dtype=object)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    repo = copy_repository(tmp)
    from triton_al.attach import set_step_parameter

    set_step_parameter(repo, "active_learning", "threshold", "0.9")
    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", "active_learning"]
    with Pipeline(repo, tmp / "data", model_control_mode="explicit", load_models=models) as p:
        p.repository = repo
        yield p


@pytest.mark.slow
def test_one_full_cycle_with_a_deploy_under_load(loop):
    repo, store, url = str(loop.repository), str(loop.store), loop.server.grpc_url
    cli("evaluate", "--model-repository", repo, "--store", store, "--base-size", "60000")
    with grpcclient.InferenceServerClient(url) as c:
        for start in range(30000, 30600, 50):
            infer_al(c, pool(50, start))
    assert loop.flush(60).complete
    flagged = LocalStore(loop.store).index(GROUP)
    assert len(flagged) > 20 and {r["model_version"] for r in flagged} == {"1"}

    out = json.loads(cli("annotate", "--store", store, "--simulate"))
    assert out["simulated"] and out["labelled"] == len(flagged) and out["unknown"] == 0
    labels = list(LocalStore(loop.store).annotations(GROUP))
    assert labels[0].annotator == "simulated (ground truth)"

    out = json.loads(cli("retrain", "--model-repository", repo, "--store", store, "--base-size", "500",
                         "--epochs", "2", "--min-steps", "60", "--metrics-url", loop.server.metrics_url))
    assert out["model_version"] == 2 and out["annotated"] == len(flagged) and out["labels_used"] == 500 + len(flagged)

    failures, answered, stop = [], [], threading.Event()

    def keep_sending():
        with grpcclient.InferenceServerClient(url) as c:
            batch = pool(8, 40000)
            while not stop.is_set():
                try:
                    answered.append(infer_al(c, batch)[0])
                except Exception as e:  # noqa: BLE001
                    failures.append(e)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(0.5)
        assert "serving fashion_cnn version 2" in cli("deploy", "--model-repository", repo, "--url", url)
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
    assert failures == [], f"{len(failures)} requests failed during the deploy: {failures[:1]}"
    assert served_versions(url, "fashion_cnn") == [2]
    assert not np.allclose(answered[0], answered[-1]), "the answers did not change: the new version is not serving"

    with grpcclient.InferenceServerClient(url) as c:  # new flagged items are recorded under version 2
        for start in range(50000, 50200, 50):
            infer_al(c, pool(50, start))
    assert loop.flush(60).complete
    assert "2" in {r["model_version"] for r in LocalStore(loop.store).index(GROUP)}

    cycles = read_cycles(loop.store)
    assert [c["model_version"] for c in cycles] == [1, 2]
    assert cycles[1]["flag_rate"] is not None and 0 < cycles[1]["flag_rate"] < 1
    assert set(cycles[1]["per_class"]) == set(CLASS_NAMES) and cycles[1]["threshold"] == 0.9

    report = cli("report", "--store", store, "--out", str(loop.data_dir / "report"))
    assert "index.html" in report
    for name in ("metrics.png", "scores.png", "flag_rate.png", "index.html"):
        assert (loop.data_dir / "report" / name).stat().st_size > 1000


@pytest.mark.slow
def test_a_version_that_fails_to_load_leaves_the_old_one_serving_and_rollback_goes_back(loop):
    repo, url = loop.repository, loop.server.grpc_url
    current = served_versions(url, "fashion_cnn")[-1]
    if current == 1:  # run alone: deploy a second good version, so there is one to roll back to
        shutil.copytree(repo / "fashion_cnn" / "1", repo / "fashion_cnn" / "2")
        assert "serving fashion_cnn version 2" in cli("deploy", "--model-repository", str(repo), "--url", url)
        current = 2
    broken = repo / "fashion_cnn" / str(current + 1)
    broken.mkdir()
    (broken / "model.py").write_text((repo / "fashion_cnn" / "1" / "model.py").read_text())
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "deploy", "--model-repository", str(repo), "--url", url],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert f"version {current + 1} of 'fashion_cnn' does not load" in r.stderr and "no live server was touched" in r.stderr, r.stderr
    assert served_versions(url, "fashion_cnn") == [current]
    assert (repo / "fashion_cnn" / f"failed-{current + 1}").is_dir()
    with grpcclient.InferenceServerClient(url) as c:
        infer_al(c, pool(4, 0))
    assert f"serving fashion_cnn version {current - 1}" in cli("rollback", "--model-repository", str(repo), "--url", url)
    assert served_versions(url, "fashion_cnn") == [current - 1]
    assert (repo / "fashion_cnn" / f"rolled-back-{current}").is_dir()


@pytest.mark.slow
def test_calibrate_proposes_and_applies_a_threshold_without_a_restart(loop):
    url, metrics = loop.server.grpc_url, loop.server.metrics_url
    with grpcclient.InferenceServerClient(url) as c:
        for start in range(10000, 10400, 50):
            infer_al(c, pool(50, start))
    time.sleep(0.7)  # the step hands its metrics over every 0.5 s
    out = json.loads(cli("calibrate", "--metrics-url", metrics, "--flag-rate", "0.3", "--window", "0", "--apply",
                         "--model-repository", str(loop.repository), "--url", url))
    assert out["applied"] and 0 < out["threshold"] < 1
    assert f'string_value: "{out["threshold"]:g}"' in (loop.repository / "active_learning" / "config.pbtxt").read_text()
    with grpcclient.InferenceServerClient(url) as c:
        flagged = np.concatenate([infer_al(c, pool(50, s))[2] for s in range(20000, 20400, 50)])
    assert 0.15 < flagged.mean() < 0.45, f"flag rate {flagged.mean():.2f} after calibrating for 0.3"
