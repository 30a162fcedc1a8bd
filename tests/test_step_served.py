"""The step's behaviour, served by a real tritonserver, against both steps (native backend and
Python-backend model): scores and flags equal `triton_al.evaluate` for every task and
strategy; bad requests fail alone and the server stays up; flagged items reach the outbox;
and a tritonserver killed under load loses no item whose response said FLAGGED."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from triton_helpers import direct_step_config, grpcclient, write_direct_steps
from tritonclient.utils import InferenceServerException

import triton_al
from triton_al.outbox import Outbox, content_hash
from triton_al.serving.server import TritonServer

STRATEGIES = ["entropy", "least_confidence", "margin", "ratio", "random"]
THRESHOLD = 0.5
MAX_ASSET_BYTES = 4096

# task -> (per-item dims of the scores, extra parameters, from_logits)
TASKS = {
    "classification": ([10], {}, False),
    "logits": ([10], {}, True),
    "multilabel": ([5], {"aggregate": "mean"}, False),
    "detection": ([6, 4], {"aggregate": "least_confident_mean", "k": "2"}, False),
    "segmentation": ([3, 4, 4], {"aggregate": "quantile", "quantile": "0.2"}, False),
}


def step_config(name: str, step: str, task: str, strategy: str, outbox: Path, dtype: str = "FP32") -> str:
    dims, extra, logits = TASKS[task]
    params = {
        "model_name": "scorer", "model_version": "7", "strategy": strategy, "threshold": str(THRESHOLD),
        "task": "classification" if task == "logits" else task, "from_logits": str(logits).lower(),
        "upload_groups": f"{name}", "outbox_path": str(outbox), "outbox_max_asset_bytes": str(MAX_ASSET_BYTES),
        "scores_input": "PROBS", "asset_input": "IMAGE", **extra,
    }
    dims_text = ", ".join(map(str, dims))
    return (
        f'name: "{name}"\nbackend: "{"active_learning" if step == "native" else "python"}"\nmax_batch_size: 16\n'
        f'input [ {{ name: "PROBS" data_type: TYPE_{dtype} dims: [ {dims_text} ] }},\n'
        f'        {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] optional: true }} ]\n'
        f'output [ {{ name: "PROBS" data_type: TYPE_{dtype} dims: [ {dims_text} ] }},\n'
        f'         {{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }},\n'
        f'         {{ name: "FLAGGED" data_type: TYPE_BOOL dims: [ 1 ] }} ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
        + "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in params.items())
    )


def write_model(repo: Path, name: str, step: str, task: str, strategy: str, outbox: Path, dtype: str = "FP32") -> None:
    write_direct_steps(repo, step, {name: step_config(name, step, task, strategy, outbox, dtype)})


@pytest.fixture(scope="module", params=["native", "python"])
def served(request, tmp_path_factory):
    """One server with a step model per task (strategy changed by reloading)."""
    step = request.param
    tmp = tmp_path_factory.mktemp(f"served-{step}")
    repo = tmp / "repo"
    outbox = tmp / "outbox.db"
    for task in TASKS:
        write_model(repo, task, step, task, "entropy", outbox)
    for dtype in ("FP16", "FP64"):
        write_model(repo, f"classification_{dtype.lower()}", step, "classification", "margin", outbox, dtype)
    models = [*TASKS, "classification_fp16", "classification_fp64"]
    server = TritonServer(repo, model_control_mode="explicit", load_models=models, log_path=tmp / "triton.log")
    with server:
        server.step, server.repo, server.outbox_path = step, repo, outbox
        yield server


def scores_for(task: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    dims, _, logits = TASKS[task]
    if task == "multilabel":
        return rng.uniform(0, 1, (batch, *dims)).astype(np.float32)
    if logits:
        return rng.normal(0, 3, (batch, *dims)).astype(np.float32)
    class_axis = {"classification": 1, "detection": 2, "segmentation": 1}[task]
    x = rng.gamma(0.3, size=(batch, *dims)).astype(np.float32) + 1e-6
    return (x / x.sum(axis=class_axis, keepdims=True)).astype(np.float32)


def pngs(n: int, seed: int) -> np.ndarray:
    from triton_al.example.data import encode_png

    rng = np.random.default_rng(seed)
    return np.array([[encode_png(rng.integers(0, 255, (8, 8), dtype=np.uint8))] for _ in range(n)], dtype=object)


def infer(server, model: str, x: np.ndarray | None, images: np.ndarray | None = None, *, probs_dtype: str = "FP32"):
    inputs = []
    if x is not None:
        p = grpcclient.InferInput("PROBS", list(x.shape), probs_dtype)
        p.set_data_from_numpy(x)
        inputs.append(p)
    if images is not None:
        i = grpcclient.InferInput("IMAGE", list(images.shape), "BYTES")
        i.set_data_from_numpy(images)
        inputs.append(i)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        r = c.infer(model, inputs)
    return r.as_numpy("PROBS"), r.as_numpy("SCORE").reshape(-1), r.as_numpy("FLAGGED").reshape(-1)


def expected(task: str, strategy: str, x: np.ndarray):
    dims, extra, logits = TASKS[task]
    options = {k: (int(v) if k == "k" else float(v) if k == "quantile" else v) for k, v in extra.items()}
    config = triton_al.ActiveLearningConfig(
        strategy=strategy, threshold=THRESHOLD, task="classification" if task == "logits" else task,
        from_logits=logits, task_options=options)
    return triton_al.evaluate(x, config)


@pytest.mark.parametrize("task", list(TASKS))
def test_scores_and_flags_equal_evaluate_for_every_task_and_strategy(served, task):
    rng = np.random.default_rng(hash(task) % 2**32)
    for strategy in STRATEGIES:
        if strategy != "entropy":
            write_model(served.repo, task, served.step, task, strategy, served.outbox_path)
            served.load_model(task)
        x = scores_for(task, 8, rng)
        probs, score, flagged = infer(served, task, x)
        np.testing.assert_array_equal(probs, x)  # passed through unchanged
        if strategy == "random":  # seeded per batch inside the step: check the convention only
            assert ((score >= 0) & (score < 1)).all()
            np.testing.assert_array_equal(flagged, score < THRESHOLD)
            continue
        want = expected(task, strategy, x)
        np.testing.assert_allclose(score, want.scores, rtol=2e-5, atol=2e-6, err_msg=f"{task}/{strategy}")
        np.testing.assert_array_equal(flagged, want.flagged, err_msg=f"{task}/{strategy}")
    write_model(served.repo, task, served.step, task, "entropy", served.outbox_path)
    served.load_model(task)


@pytest.mark.parametrize("dtype", ["FP16", "FP64"])
def test_half_and_double_precision_scores(served, dtype):
    numpy_dtype = np.float16 if dtype == "FP16" else np.float64
    x = scores_for("classification", 6, np.random.default_rng(9)).astype(numpy_dtype)
    probs, score, flagged = infer(served, f"classification_{dtype.lower()}", x, probs_dtype=dtype)
    assert probs.dtype == numpy_dtype
    np.testing.assert_array_equal(probs, x)
    want = expected("classification", "margin", x)
    np.testing.assert_allclose(score, want.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flagged, want.flagged)


def test_flagged_items_reach_the_outbox_with_their_prediction_and_version(served):
    x = np.tile(np.full((1, 10), 0.1, np.float32), (4, 1))  # maximally uncertain: all flagged
    x[1] = np.eye(10, dtype=np.float32)[3]  # certain: not flagged
    images = pngs(4, seed=11)
    _, _, flagged = infer(served, "classification", x, images)
    assert list(flagged) == [True, False, True, True]
    with Outbox(served.outbox_path) as o:
        rows = {i.content_hash: i for i in o.due(10_000) if i.upload_group == "classification"}
    for k in (0, 2, 3):
        row = rows[content_hash(images[k, 0])]
        assert (row.model_name, row.model_version, row.reason, row.strategy) == ("scorer", "7", "uncertain", "entropy")
        assert row.prediction["probs"] == [0.1] * 10 and row.media_type == "image/png"
    assert content_hash(images[1, 0]) not in rows


def test_nan_and_inf_are_scored_nan_and_flagged_as_invalid_output(served):
    x = scores_for("classification", 3, np.random.default_rng(3))
    x[0, 2], x[2, 5] = np.nan, np.inf
    images = pngs(3, seed=12)
    _, score, flagged = infer(served, "classification", x, images)
    assert np.isnan(score[[0, 2]]).all() and np.isfinite(score[1]) and flagged[[0, 2]].all()
    with Outbox(served.outbox_path) as o:
        rows = {i.content_hash: i for i in o.due(10_000)}
    assert rows[content_hash(images[0, 0])].reason == "invalid_output"
    assert rows[content_hash(images[0, 0])].prediction["probs"][2] is None


def test_without_the_optional_asset_input_it_scores_and_stores_nothing(served):
    with Outbox(served.outbox_path) as o:
        before = len(o.due(10_000))
    x = np.full((2, 10), 0.1, np.float32)
    _, score, flagged = infer(served, "classification", x)
    assert flagged.all() and np.allclose(score, 0, atol=1e-6)
    with Outbox(served.outbox_path) as o:
        assert len(o.due(10_000)) == before


def test_an_oversized_asset_is_refused_by_the_outbox_and_the_request_still_answered(served):
    big = np.array([[b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_ASSET_BYTES * 2)], [pngs(1, seed=13)[0, 0]]], dtype=object)
    x = np.full((2, 10), 0.1, np.float32)
    _, _, flagged = infer(served, "classification", x, big)
    assert flagged.all()
    with Outbox(served.outbox_path) as o:
        stored = {i.content_hash for i in o.due(10_000)}
        assert o.counters().get("refused_oversize", 0) >= 1
    assert content_hash(big[0, 0]) not in stored and content_hash(big[1, 0]) in stored


@pytest.mark.parametrize("bad", ["dtype", "shape", "item_count", "empty_batch", "no_probs"])
def test_a_bad_request_fails_alone_and_the_server_stays_up(served, bad):
    good_x = scores_for("classification", 2, np.random.default_rng(5))
    outcome, stop = {"ok": 0, "errors": []}, threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            try:
                infer(served, "classification", good_x)
                outcome["ok"] += 1
            except Exception as e:  # noqa: BLE001
                outcome["errors"].append(e)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        with pytest.raises(InferenceServerException) as e:
            for _ in range(5):
                if bad == "dtype":
                    infer(served, "classification", good_x.astype(np.float64), probs_dtype="FP64")
                elif bad == "shape":
                    infer(served, "classification", np.zeros((2, 11), np.float32))
                elif bad == "item_count":  # two scores rows, three assets
                    infer(served, "classification", good_x, pngs(3, seed=14))
                elif bad == "empty_batch":
                    infer(served, "classification", np.zeros((0, 10), np.float32))
                else:
                    infer(served, "classification", None, pngs(1, seed=15))
        assert e.value.message()
    finally:
        stop.set()
        sender.join()
    assert outcome["errors"] == [] and outcome["ok"] > 0
    infer(served, "classification", good_x)  # and it serves on


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(0, 5),
    classes=st.integers(1, 12),
    dtype=st.sampled_from(["FP32", "FP64", "FP16", "INT32"]),
    values=st.sampled_from(["probs", "zeros", "negative", "huge", "nan"]),
    asset=st.sampled_from([None, "png", "empty", "garbage"]),
)
def test_fuzzed_requests_get_one_answer_each_and_never_take_the_server_down(served, batch, classes, dtype, values, asset):
    rng = np.random.default_rng(batch * 100 + classes)
    x = {"probs": rng.dirichlet(np.ones(classes), batch) if batch else np.zeros((0, classes)),
         "zeros": np.zeros((batch, classes)), "negative": -np.ones((batch, classes)),
         "huge": np.full((batch, classes), 1e30), "nan": np.full((batch, classes), np.nan)}[values]
    numpy_dtype = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT32": np.int32}[dtype]
    with np.errstate(over="ignore", invalid="ignore"):  # 1e30 is inf in FP16: a value to send, on purpose
        x = x.astype(numpy_dtype) if dtype != "INT32" else np.nan_to_num(x).astype(np.int32)
    images = None
    if asset is not None:
        images = np.array([[{"png": b"\x89PNG\r\n\x1a\n....", "empty": b"", "garbage": os.urandom(16)}[asset]]] * batch,
                          dtype=object).reshape(batch, 1)
    try:
        _, score, flagged = infer(served, "classification", x, images, probs_dtype=dtype)
    except InferenceServerException as e:
        assert e.message(), "an error must say what was wrong"
    else:
        assert score.shape == (batch,) and flagged.shape == (batch,)
        assert (np.isnan(score) | ((score >= 0) & (score <= 1))).all()
    assert served.is_ready()


def test_sigkill_under_load_loses_no_item_whose_response_said_flagged(served, tmp_path):
    """outbox_sync=full: a response says FLAGGED only after the item is on disk. Kill the
    server in the middle of a load and check every such item is in the outbox."""
    from triton_al.example.data import encode_png

    repo = tmp_path / "repo"
    outbox = tmp_path / "outbox.db"
    write_model(repo, "classification", served.step, "classification", "entropy", outbox)
    server = TritonServer(repo, model_control_mode="explicit", load_models=["classification"], log_path=tmp_path / "t.log")
    answered, lock, stop, holding = [], threading.Lock(), threading.Event(), threading.Event()
    uncertain = np.full((2, 10), 0.1, np.float32)

    def client(k: int) -> None:
        seq = 0
        while not stop.is_set():
            images = np.array([[encode_png(np.full((4, 4), (k * 100_000 + seq) % 251, np.uint8) + np.eye(4, dtype=np.uint8) * (seq // 251 % 200))],
                               [encode_png(np.full((5, 5), (k * 7 + seq) % 253, np.uint8) + np.uint8(seq // 253 % 3))]], dtype=object)
            seq += 1
            try:
                _, _, flagged = infer(server, "classification", uncertain, images)
            except Exception:  # noqa: BLE001 - the server is being killed
                return
            with lock:
                answered.extend(content_hash(images[j, 0]) for j in range(2) if flagged[j])

    def rival() -> None:
        """Another writer (as the uploader is) holding the write lock most of the time, so
        appends wait: a step answering before its append is stored would be caught."""
        import sqlite3

        conn = sqlite3.connect(outbox, isolation_level=None, timeout=10)
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            holding.set()
            time.sleep(0.03)
            holding.clear()
            conn.execute("COMMIT")
            time.sleep(0.005)
        conn.close()

    with server:
        Outbox(outbox).close()  # created before the rival opens it
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)] + [threading.Thread(target=rival)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        holding.wait(5)
        time.sleep(0.02)  # appends are now waiting for the rival's lock
        os.kill(server.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(30)
    assert len(answered) > 20, "too little load to mean anything"
    with Outbox(outbox) as o:
        stored = {i.content_hash for i in o.due(1_000_000)}
        assert o.integrity_check() == "ok"
    missing = set(answered) - stored
    assert not missing, f"{len(missing)} of {len(set(answered))} items answered FLAGGED are not in the outbox"


def test_the_uploader_drains_rows_written_by_both_steps_alike(tmp_path):
    """One outbox, one definition of its rows: the native step and the Python step append to
    the same file, the uploader delivers both, and the same input gives the same record."""
    from triton_al.sinks.local import LocalStore
    from triton_al.uploader.worker import Uploader

    repo, outbox = tmp_path / "repo", tmp_path / "outbox.db"
    for step in ("native", "python"):
        write_model(repo, step, step, "classification", "margin", outbox)
    x = scores_for("classification", 3, np.random.default_rng(21))
    x[1] = np.eye(10, dtype=np.float32)[0]  # certain: not flagged
    server = TritonServer(repo, model_control_mode="explicit", load_models=["native", "python"], log_path=tmp_path / "t.log")
    with server:
        answers = {step: infer(server, step, x, pngs(3, seed=31)) for step in ("native", "python")}
    for name in ("SCORE", "FLAGGED"):
        i = {"SCORE": 1, "FLAGGED": 2}[name]
        np.testing.assert_array_equal(answers["native"][i], answers["python"][i], err_msg=name)
    store = LocalStore(tmp_path / "store")
    with Outbox(outbox) as o:
        assert len(o.due(100)) == 4  # two flagged items, one row per step's group
        assert Uploader(o, store).flush(30).complete
        assert o.due(100) == []
    import json

    def sidecars(group: str) -> dict[str, dict]:
        hashes = [r["content_hash"] for r in store.index(group)]
        keep = ("prediction", "score", "reason", "strategy", "threshold", "model_name", "model_version")
        return {h: {k: json.loads((store.group_dir(group) / f"{h}.json").read_text())[k] for k in keep} for h in hashes}

    native, python = sidecars("native"), sidecars("python")
    assert len(native) == 2 and native == python
    assert all(r["prediction"]["label"] is not None and r["reason"] == "uncertain" for r in native.values())


SCORER = """name: "scorer"
backend: "python"
max_batch_size: 4
version_policy: { specific: { versions: [ 1 ] } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 10 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""

IDENTITY = """import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


@pytest.mark.parametrize("step", ["native", "python"])
def test_without_a_version_output_the_version_the_server_serves_is_recorded(tmp_path, step):
    """Not the newest folder on disk: the scored model has folders 1 and 2, the server serves 1."""
    repo, outbox = tmp_path / "repo", tmp_path / "outbox.db"
    for v in ("1", "2"):
        (repo / "scorer" / v).mkdir(parents=True)
        (repo / "scorer" / v / "model.py").write_text(IDENTITY)
    (repo / "scorer" / "config.pbtxt").write_text(SCORER)
    write_model(repo, "step", step, "classification", "entropy", outbox)
    config = repo / "step" / "config.pbtxt"
    config.write_text(config.read_text().replace('parameters { key: "model_version" value { string_value: "7" } }\n', ""))
    assert "model_version" not in config.read_text()
    server = TritonServer(repo, model_control_mode="explicit", load_models=["scorer", "step"], log_path=tmp_path / "t.log")
    with server:
        images = pngs(1, seed=41)
        _, _, flagged = infer(server, "step", np.full((1, 10), 0.1, np.float32), images)
    assert flagged.all()
    with Outbox(outbox) as o:
        (row,) = o.due(10)
    assert (row.model_name, row.model_version) == ("scorer", "1")


def detection_config(name: str, step: str, outbox: Path, boxes_type: str = "FP32") -> str:
    params = {"model_name": "detector", "model_version": "1", "threshold": "0.5", "task": "detection",
              "upload_groups": name, "outbox_path": str(outbox), "scores_input": "PROBS", "asset_input": "IMAGE",
              "boxes_input": "BOXES"}
    return direct_step_config(name, step, params, "3, 2", f'{{ name: "BOXES" data_type: TYPE_{boxes_type} dims: [ -1, -1 ] optional: true }}')


@pytest.mark.parametrize("step", ["native", "python"])
def test_detection_boxes_are_stored_and_bad_boxes_fail_their_request_alike_in_both_steps(tmp_path, step):
    repo, outbox = tmp_path / "repo", tmp_path / "outbox.db"
    write_direct_steps(repo, step, {name: detection_config(name, step, outbox, kind) for name, kind in (("det", "FP32"), ("det_fp64", "FP64"))})
    scores = np.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]], np.float32)  # uncertain: flagged
    boxes = np.array([[[1, 2, 10, 12], [0, 0, 4.5, 4], [3, 3, 7, 7]]], np.float32)

    def send(model: str, box_values: np.ndarray | None, images: np.ndarray | None = None):
        inputs = [grpcclient.InferInput("PROBS", list(scores.shape), "FP32")]
        inputs[0].set_data_from_numpy(scores)
        if box_values is not None:
            b = grpcclient.InferInput("BOXES", list(box_values.shape), "FP32" if box_values.dtype == np.float32 else "FP64")
            b.set_data_from_numpy(box_values)
            inputs.append(b)
        if images is not None:
            i = grpcclient.InferInput("IMAGE", list(images.shape), "BYTES")
            i.set_data_from_numpy(images)
            inputs.append(i)
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            return c.infer(model, inputs).as_numpy("FLAGGED").reshape(-1)

    server = TritonServer(repo, model_control_mode="explicit", load_models=["det", "det_fp64"], log_path=tmp_path / "t.log")
    with server:
        images = pngs(1, seed=51)
        assert list(send("det", boxes, images)) == [True]
        failures = {}
        for case, model, values in (("shape", "det", np.zeros((1, 3, 3), np.float32)),
                                    ("count", "det", np.zeros((1, 2, 4), np.float32)),
                                    ("dtype", "det_fp64", boxes.astype(np.float64)),
                                    ("missing", "det", None)):
            with pytest.raises(InferenceServerException) as e:
                send(model, values)
            failures[case] = e.value.message()
        assert list(send("det", boxes)) == [True]  # and it serves on
    assert "BOXES: expected shape [1, 3, 4] (x0, y0, x1, y1 for each box of PROBS), got [1, 3, 3]" in failures["shape"]
    assert "BOXES: expected shape [1, 3, 4] (x0, y0, x1, y1 for each box of PROBS), got [1, 2, 4]" in failures["count"]
    assert "BOXES: expected FP32 boxes, got FP64" in failures["dtype"]
    assert "missing input 'BOXES'" in failures["missing"]
    with Outbox(outbox) as o:
        (row,) = o.due(10)
    assert row.content_hash == content_hash(images[0, 0])
    assert row.prediction == {"boxes": [{"label": 0, "confidence": 0.5, "box": [1.0, 2.0, 10.0, 12.0]},
                                        {"label": 0, "confidence": 0.9, "box": [0.0, 0.0, 4.5, 4.0]},
                                        {"label": 1, "confidence": 0.8, "box": [3.0, 3.0, 7.0, 7.0]}]}


@pytest.mark.parametrize("step", ["native", "python"])
def test_an_outbox_unusable_at_load_is_used_as_soon_as_it_can_be(tmp_path, step):
    """A bad file where the outbox should be: the step serves (flagged items counted as lost),
    and once the file is removed it opens the outbox by itself, without a reload."""
    repo, outbox = tmp_path / "repo", tmp_path / "outbox.db"
    outbox.write_bytes(b"not an SQLite file " * 500)
    write_model(repo, "step", step, "classification", "entropy", outbox)
    uncertain = np.full((1, 10), 0.1, np.float32)
    server = TritonServer(repo, model_control_mode="explicit", load_models=["step"], log_path=tmp_path / "t.log")
    with server:
        _, _, flagged = infer(server, "step", uncertain, pngs(1, seed=61))
        assert flagged.all(), "it serves without its outbox"
        outbox.unlink()
        deadline, seed = time.monotonic() + 20, 62
        stored: list = []
        while not stored and time.monotonic() < deadline:
            seed += 1
            _, _, flagged = infer(server, "step", uncertain, pngs(1, seed=seed))
            assert flagged.all()
            if outbox.exists():
                with Outbox(outbox) as o:
                    stored = o.due(10)
            time.sleep(0.1)
    log = (tmp_path / "t.log").read_text()
    assert stored, f"the outbox was never opened again; log:\n{log[-3000:]}"
    assert {row.content_hash for row in stored} <= {content_hash(pngs(1, seed=s)[0, 0]) for s in range(63, seed + 1)}
    assert content_hash(pngs(1, seed=61)[0, 0]) not in {row.content_hash for row in stored}
    assert "the outbox cannot be used, flagged items will not be stored until it can" in log
    assert "the outbox is open, flagged items are stored again" in log
