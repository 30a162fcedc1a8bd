"""The example pipeline on a real tritonserver over real gRPC, with the real outbox, uploader
and project store: batch sizes, concurrency, scores equal to the Rust core on the returned
PROBS, flagged items in the store, bad inputs, NaN outputs, a killed backend process,
custom metrics and a live settings reload."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image
from outbox_helpers import wait_for
from triton_helpers import copy_repository, grpcclient, infer_al, metric_sum, set_parameter, fashion_pngs, triton_metrics
from tritonclient.utils import InferenceServerException

import triton_al
from triton_al.outbox import Outbox, content_hash
from triton_al.serving.pipeline import Pipeline
from triton_al.sinks.local import LocalStore

THRESHOLD = 0.85

NAN_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", np.full((len(x), 10), np.nan, np.float32))]))
        return out
'''

NAN_CONFIG = '''
name: "nan_model"
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] } ]
'''


@pytest.fixture(scope="module", params=["native", "python"])
def pipeline(tmp_path_factory, request):
    """The example pipeline with the step of each kind: the native Triton backend (what the
    example ships) and the Python-backend model."""
    step = request.param
    tmp = tmp_path_factory.mktemp(f"pipeline-{step}")
    repository = copy_repository(tmp)
    # A model whose output is all NaN, with active learning attached the usual way.
    nan = repository / "nan_model"
    (nan / "1").mkdir(parents=True)
    (nan / "1" / "model.py").write_text(NAN_MODEL.replace("x\")", "IMAGE\")"))
    (nan / "config.pbtxt").write_text(NAN_CONFIG)
    from triton_al.attach import attach

    attach(repository, "nan_model", output="PROBS", kind="probs", step=step)
    attach(repository, "fashion_cnn", preprocess="preprocess", step_name="active_learning", kind="probs", step=step,
           embedding_output="EMBEDDING")  # as committed: the step stores each flagged item's embedding
    # The example model is confident: flag more so that small test batches flag something.
    set_parameter(repository / "active_learning" / "config.pbtxt", "threshold", str(THRESHOLD))
    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", "active_learning", "nan_model_al"]
    with Pipeline(repository, tmp / "data", model_control_mode="explicit", load_models=models) as p:
        p.repository = repository
        p.step = step
        yield p


@pytest.fixture
def client(pipeline):
    with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
        yield c


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_scores_and_flags_equal_the_rust_core_on_the_returned_probs(client, batch):
    pngs, _, labels = fashion_pngs(batch, start=100)
    probs, score, flagged = infer_al(client, pngs)
    assert probs.shape == (batch, 10) and score.shape == (batch,) and flagged.dtype == bool
    np.testing.assert_allclose(score, triton_al.score(probs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flagged, score < THRESHOLD)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    if batch == 64:
        assert (probs.argmax(1) == labels).mean() > 0.8


OUTPUT_SUBSETS = [("PROBS",), ("SCORE",), ("FLAGGED",), ("PROBS", "SCORE"), ("PROBS", "FLAGGED"), ("SCORE", "FLAGGED"),
                  ("PROBS", "SCORE", "FLAGGED")]


@pytest.mark.parametrize("model, start", [("fashion_cnn_al", 7000), ("nan_model_al", 7500)])
def test_a_client_naming_any_subset_of_outputs_gets_them_and_every_item_is_scored_and_delivered(pipeline, client, model, start):
    """Drop-in clients name the outputs they want (often only the model's own). Each subset
    is answered, and the items are scored, flagged and delivered whatever was asked for."""
    expected_in_store = set()
    for k, subset in enumerate(OUTPUT_SUBSETS):
        pngs, _, _ = fashion_pngs(6, start=start + 6 * k)
        inp = grpcclient.InferInput("IMAGE", list(pngs.shape), "BYTES")
        inp.set_data_from_numpy(pngs)
        result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in subset])
        got = {n: result.as_numpy(n) for n in ("PROBS", "SCORE", "FLAGGED")}
        assert {n for n, v in got.items() if v is not None} == set(subset)
        assert all(len(got[n]) == 6 for n in subset)
        if subset == ("PROBS",):  # what an existing client asks for: its items must still be flagged and stored
            probs = got["PROBS"]
            threshold = THRESHOLD if model == "fashion_cnn_al" else 0.5
            flagged = np.isnan(triton_al.score(probs)) | (triton_al.score(probs) < threshold)
            assert flagged.any(), "nothing flagged among these images; pick others"
            expected_in_store |= {content_hash(p[0]) for p, f in zip(pngs, flagged) if f}
        full = infer_al(client, pngs, model=model)  # the same images, every output
        for n, value in zip(("PROBS", "SCORE", "FLAGGED"), full):
            if got[n] is not None:
                np.testing.assert_array_equal(got[n].reshape(value.shape), value)
    assert pipeline.flush(30).complete
    stored = {r["content_hash"] for r in LocalStore(pipeline.store).index("active-learning")}
    assert expected_in_store <= stored


def test_the_embedding_is_served_to_clients_that_ask_for_it(client):
    """EMBEDDING passes through the step like the model's other outputs: a client naming it
    gets the model's own values (the layer whose softmax-head gives PROBS); others don't."""
    pngs, _, _ = fashion_pngs(5, start=300)
    inp = grpcclient.InferInput("IMAGE", list(pngs.shape), "BYTES")
    inp.set_data_from_numpy(pngs)
    names = ("PROBS", "EMBEDDING", "SCORE")
    result = client.infer("fashion_cnn_al", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names])
    embedding, score = result.as_numpy("EMBEDDING"), result.as_numpy("SCORE")
    assert embedding.shape == (5, 64) and embedding.dtype == np.float32 and (embedding >= 0).all()
    plain = client.infer("fashion_cnn_al", [inp], outputs=[grpcclient.InferRequestedOutput("SCORE")])
    assert plain.as_numpy("EMBEDDING") is None
    np.testing.assert_array_equal(plain.as_numpy("SCORE"), score)


def test_the_plain_model_keeps_working_beside_the_ensemble(client):
    pngs, pixels, _ = fashion_pngs(4)
    probs_al, _, _ = infer_al(client, pngs)
    inp = grpcclient.InferInput("image", [4, 1, 28, 28], "FP32")
    inp.set_data_from_numpy((pixels.astype(np.float32) / 255)[:, None])
    probs = client.infer("fashion_cnn", [inp]).as_numpy("PROBS")
    np.testing.assert_allclose(probs, probs_al, rtol=1e-5, atol=1e-7)


def test_concurrent_clients(pipeline):
    results, errors = {}, []

    def run(k: int) -> None:
        with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
            for j in range(5):
                pngs, _, _ = fashion_pngs(8, start=1000 + 40 * k + 8 * j)
                try:
                    results[(k, j)] = infer_al(c, pngs)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 40
    for probs, score, _ in results.values():
        np.testing.assert_allclose(score, triton_al.score(probs), rtol=1e-5, atol=1e-6)


def test_flagged_items_arrive_in_the_store_with_their_prediction(pipeline, client):
    pngs, _, _ = fashion_pngs(64, start=2000)
    probs, score, flagged = infer_al(client, pngs)
    assert flagged.any(), "nothing flagged in 64 images; pick other images"
    assert pipeline.flush(30).complete
    store = LocalStore(pipeline.store)
    index = {r["content_hash"]: r for r in store.index("active-learning")}
    for i in np.flatnonzero(flagged):
        h = content_hash(pngs[i, 0])
        assert h in index, "a flagged image did not reach the store"
        assert index[h]["score"] == pytest.approx(float(score[i]), rel=1e-6)
        assert index[h]["model_version"] == "1"  # from the model's MODEL_VERSION output: the version that served
        sidecar = (store.group_dir("active-learning") / f"{h}.json").read_text()
        assert f'"label":{int(probs[i].argmax())}' in sidecar.replace(" ", "")
        from triton_al.example.data import CLASS_NAMES  # the model's label_filename names it

        assert json.loads(sidecar)["prediction"]["label_name"] == CLASS_NAMES[int(probs[i].argmax())]
    for i in np.flatnonzero(~flagged):
        assert content_hash(pngs[i, 0]) not in index


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"\x89PNG\r\n\x1a\n this is not an image", "item 0: not a decodable image"),
        (png_of(np.zeros((32, 32), np.uint8)), "item 0: expected a 28x28 image, got 32x32"),
        (b"", "item 0: expected encoded image bytes"),
    ],
)
def test_a_bad_image_fails_only_its_own_request(pipeline, bad, message):
    good_pngs, _, _ = fashion_pngs(8)
    outcome = {}

    def good():
        with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
            outcome["good"] = [infer_al(c, good_pngs)[1] for _ in range(20)]

    t = threading.Thread(target=good)
    t.start()
    with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c, pytest.raises(InferenceServerException) as e:
        for _ in range(5):
            infer_al(c, np.array([[bad]], dtype=object))
    t.join()
    assert message in e.value.message()
    assert len(outcome["good"]) == 20


def test_a_wrong_input_shape_is_refused_with_a_clear_message(client):
    pngs, _, _ = fashion_pngs(2)
    inp = grpcclient.InferInput("IMAGE", [1, 2], "BYTES")
    inp.set_data_from_numpy(pngs.reshape(1, 2))
    with pytest.raises(InferenceServerException, match=r"IMAGE.*shape|unexpected shape"):
        client.infer("fashion_cnn_al", [inp])
    infer_al(client, pngs)  # and the server is fine


def test_a_model_output_full_of_nan_is_scored_nan_flagged_and_stored_as_invalid(pipeline, client):
    pngs, _, _ = fashion_pngs(3, start=3000)
    probs, score, flagged = infer_al(client, pngs, model="nan_model_al")
    assert np.isnan(probs).all() and np.isnan(score).all() and flagged.all()
    assert pipeline.flush(30).complete
    records = LocalStore(pipeline.store).index("active-learning")
    invalid = {r["content_hash"] for r in records if r["reason"] == "invalid_output"}
    assert {content_hash(p[0]) for p in pngs} <= invalid
    wait_for(lambda: metric_sum(triton_metrics(pipeline.server), "triton_al_items_flagged_total", reason="invalid_output") >= 3,
             10, "the invalid_output counter")


def test_custom_metrics_appear_in_tritons_metrics_and_calibrate_reads_them(pipeline, client):
    from triton_al.calibrate import parse_metrics

    scored = lambda: metric_sum(triton_metrics(pipeline.server), "triton_al_items_scored_total", model="active_learning")  # noqa: E731
    def settled() -> bool:  # earlier tests' deltas are flushed: nothing changes for longer than a flush interval
        first = scored()
        time.sleep(1.3)  # the step hands metrics to Triton once a second
        return scored() == first

    wait_for(settled, 15, "metrics to settle")
    before_text = triton_metrics(pipeline.server)
    before, earlier = scored(), parse_metrics(before_text, model="active_learning")
    flagged_before = metric_sum(before_text, "triton_al_items_flagged_total", model="active_learning")
    pngs, _, _ = fashion_pngs(16, start=4000)
    _, score, flagged = infer_al(client, pngs)
    wait_for(lambda: scored() == before + 16, 10, "16 more items scored")
    text = triton_metrics(pipeline.server)
    assert "triton_al_outbox_errors_total" in text
    snapshot = parse_metrics(text, model="active_learning")
    assert snapshot.buckets[float("inf")] == metric_sum(text, "triton_al_score_count", model="active_learning")
    # The counters are cumulative over the whole module: compare what these 16 added.
    assert metric_sum(text, "triton_al_items_flagged_total", model="active_learning") - flagged_before == flagged.sum()
    for le in (0.1, 0.5, 0.9, 0.99, float("inf")):
        added = snapshot.buckets[le] - earlier.buckets.get(le, 0)
        assert added == int((score <= le).sum()), f"bucket le={le}"


def test_changed_settings_take_effect_on_reload_with_no_failed_request(pipeline):
    config = pipeline.repository / "active_learning" / "config.pbtxt"
    original = config.read_text()
    pngs, _, _ = fashion_pngs(32, start=5000)
    failures, rates, stop = [], [], threading.Event()

    def keep_sending():
        with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
            while not stop.is_set():
                try:
                    rates.append(float(infer_al(c, pngs)[2].mean()))
                except Exception as e:  # noqa: BLE001
                    failures.append(e)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(0.5)
        set_parameter(config, "threshold", "1.0")  # flags everything not perfectly certain
        pipeline.server.load_model("active_learning")
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join()
        config.write_text(original)
        pipeline.server.load_model("active_learning")
    assert failures == [], f"{len(failures)} requests failed during the reload: {failures[:1]}"
    assert rates[0] < 0.5 and rates[-1] > 0.95, "the new threshold did not take effect"


def test_a_bad_setting_fails_the_load_naming_it(pipeline):
    config = pipeline.repository / "active_learning" / "config.pbtxt"
    original = config.read_text()
    try:
        with pytest.raises(ValueError, match="threshold"):  # the product's editor refuses it ...
            set_parameter(config, "threshold", "lots")
        config.write_text(original.replace('string_value: "0.85"', 'string_value: "lots"'))  # ... a hand edit does not
        assert "lots" in config.read_text()
        with pytest.raises(Exception, match="threshold"):
            pipeline.server.load_model("active_learning")
    finally:
        config.write_text(original)
        pipeline.server.load_model("active_learning")
    with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
        infer_al(c, fashion_pngs(2)[0])  # the old settings kept serving, and serve again


def _stub_of(pipeline, model: str) -> int:
    """The newest stub process serving `model` (an older one may still be exiting after a reload)."""
    from triton_al.serving.watchdog import stub_models

    pids = [pid for pid, name in stub_models(pipeline.server).items() if name == model]
    assert pids, f"no stub process found for {model}"
    return max(pids, key=lambda pid: os.stat(f"/proc/{pid}").st_mtime)


def test_a_killed_backend_process_is_reloaded_and_nothing_accepted_is_lost(pipeline, client):
    pngs, _, _ = fashion_pngs(64, start=6000)
    _, _, flagged = infer_al(client, pngs)
    accepted = {content_hash(p[0]) for p, f in zip(pngs, flagged) if f}
    # The native step has no process of its own: kill the model's (a Python-backend model).
    victim = "active_learning" if pipeline.step == "python" else "fashion_cnn"
    os.kill(_stub_of(pipeline, victim), signal.SIGKILL)
    with Outbox(pipeline.outbox) as o:
        assert o.integrity_check() == "ok"
    errors, deadline = [], time.monotonic() + 30
    while True:  # Triton answers with a clear error until the watchdog has reloaded the model
        try:
            infer_al(client, pngs[:4])
            break
        except InferenceServerException as e:
            errors.append(e.message())
            assert time.monotonic() < deadline, f"not recovered: {errors[-1]}; watchdog: {pipeline.watchdog.failures}"
            time.sleep(0.2)
    # While it is reloaded the ensemble is briefly unavailable too; both errors say what is wrong.
    assert all((victim in m and "not healthy" in m) or "no available versions" in m for m in errors), errors[:2]
    assert victim in pipeline.watchdog.reloads
    assert pipeline.flush(30).complete
    stored = {r["content_hash"] for r in LocalStore(pipeline.store).index("active-learning")}
    assert accepted <= stored
