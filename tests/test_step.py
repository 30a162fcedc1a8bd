"""The active-learning step without Triton: settings from config.pbtxt parameters, batching
of several requests into one kernel call, per-request errors, and what gets stored."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from PIL import Image

import triton_al
from triton_al.step import ActiveLearningStep, RequestError, RequestInputs, asset_bytes, prediction_of, sniff_media_type
from triton_al.step_settings import PARAMETERS_FILE as PARAMETERS_TABLE
from triton_al.step_settings import StepSettings


def settings(**params) -> StepSettings:
    base = {"model_name": "fashion_cnn", "outbox_path": ""}
    return StepSettings.from_parameters({**base, **params}, env={})


def png(value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parameters_parse_into_one_config():
    s = settings(strategy="margin", threshold="0.3", upload_groups="review, hard-cases", task="detection",
                 aggregate="least_confident_mean", k="2", from_logits="true", outbox_max_items="10",
                 outbox_path="/tmp/x/outbox.db")
    al = s.active_learning
    assert (al.strategy, al.threshold, al.upload_groups, al.from_logits) == ("margin", 0.3, ["review", "hard-cases"], True)
    assert al.task_options.aggregate == "least_confident_mean" and al.task_options.k == 2
    assert s.outbox.max_items == 10 and str(s.outbox.path) == "/tmp/x/outbox.db"


def test_outbox_comes_from_the_environment_when_not_a_parameter():
    s = StepSettings.from_parameters({"model_name": "m"}, env={"TRITON_AL_OUTBOX": "/data/outbox.db"})
    assert str(s.outbox.path) == "/data/outbox.db"
    with pytest.raises(ValueError, match="outbox_path.*TRITON_AL_OUTBOX"):
        StepSettings.from_parameters({"model_name": "m"}, env={})
    assert settings().outbox is None  # empty outbox_path: score only


@pytest.mark.parametrize(
    "params, words",
    [
        ({"strategy": "bald"}, ["strategy"]),
        ({"threshold": "high"}, ["threshold"]),
        ({"threshold": "1.5"}, ["threshold"]),
        ({"upload_groups": "../x"}, ["upload_groups", "../x"]),
        ({"tresh": "0.1"}, ["unknown", "tresh"]),
        ({"outbox_size": "1"}, ["unknown", "outbox_size"]),
        ({"task": "classification", "layout": "nchw"}, ["layout"]),
        ({"outbox_max_items": "-1", "outbox_path": "/tmp/o.db"}, ["max_items"]),
        ({"outbox_sync": "fast", "outbox_path": "/tmp/o.db"}, ["sync", "full", "normal"]),
    ],
)
def test_bad_parameters_fail_with_their_name(params, words):
    with pytest.raises(ValueError) as info:
        settings(**params)
    for w in words:
        assert w in str(info.value)


def test_requests_are_scored_together_and_split_back():
    step = ActiveLearningStep(settings(threshold="0.5"))
    rng = np.random.default_rng(0)
    requests = [RequestInputs(rng.dirichlet(np.ones(10), size=n).astype(np.float32)) for n in (1, 8, 3)]
    results = step.process(requests)
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result.scores, triton_al.score(request.outputs))
    assert step.counts.scored == 12


def test_a_bad_request_fails_alone():
    step = ActiveLearningStep(settings())
    good = RequestInputs(np.full((2, 4), 0.25, np.float32))
    flat = RequestInputs(np.zeros(4, np.float32))
    mismatch = RequestInputs(np.full((2, 4), 0.25, np.float32), assets=np.array([png()], dtype=object))
    ints = RequestInputs(np.zeros((2, 4), np.int32))
    results = step.process([good, flat, mismatch, ints, good])
    assert isinstance(results[1], RequestError) and "shape" in str(results[1])
    assert isinstance(results[2], RequestError) and "1 assets for 2 items" in str(results[2])
    assert isinstance(results[3], RequestError) and "int32" in str(results[3])
    assert results[0].flagged.all() and results[4].flagged.all()


def test_nan_outputs_are_flagged_invalid_without_failing():
    step = ActiveLearningStep(settings())
    x = np.full((3, 4), np.nan, np.float32)
    (result,) = step.process([RequestInputs(x)])
    assert result.reasons == ["invalid_output"] * 3
    assert step.counts.flagged == {"invalid_output": 3}


def test_assets_and_predictions():
    assert sniff_media_type(png()) == "image/png"
    data, kind = asset_bytes(np.array([png()], dtype=object))
    assert kind == "image/png" and data.startswith(b"\x89PNG")
    data, kind = asset_bytes(np.zeros((1, 28, 28), np.float32))
    assert kind == "application/x-npy" and np.load(io.BytesIO(data)).shape == (1, 28, 28)
    p = prediction_of(np.array([0.1, 0.7, 0.2], np.float32), "classification")
    assert p["label"] == 1 and abs(sum(p["probs"]) - 1) < 1e-5
    assert prediction_of(np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), "detection")["boxes"][1]["label"] == 1


def test_flagged_items_land_in_a_real_outbox_once_with_their_prediction(tmp_path):
    from triton_al.outbox import Outbox

    path = tmp_path / "outbox.db"
    step = ActiveLearningStep(settings(outbox_path=str(path), upload_groups="review,hard", threshold="0.5"))
    uncertain, confident = [0.5, 0.5], [0.999, 0.001]
    outputs = np.array([uncertain, confident, uncertain], np.float32)
    assets = np.array([png(1), png(2), png(1)], dtype=object)  # the same image twice
    (result,) = step.process([RequestInputs(outputs, assets, model_version="3")])
    assert list(result.flagged) == [True, False, True]
    assert step.counts.stored == 2 and step.counts.duplicates == 2  # one row per group, repeat deduplicated
    with Outbox(path) as o:
        rows = o.due(10)
    assert sorted(r.upload_group for r in rows) == ["hard", "review"]
    assert all(r.asset == png(1) and r.media_type == "image/png" and r.model_version == "3" for r in rows)
    assert rows[0].prediction["label"] == 0 and rows[0].score == pytest.approx(0.0, abs=1e-6)


def test_outbox_sync_chooses_the_durability_of_appends(tmp_path):
    full = ActiveLearningStep(settings(outbox_path=str(tmp_path / "a.db")))
    normal = ActiveLearningStep(settings(outbox_path=str(tmp_path / "b.db"), outbox_sync="normal"))
    assert full.outbox.durable and not normal.outbox.durable
    uncertain = np.array([[0.5, 0.5]], np.float32)
    for step in (full, normal):
        (result,) = step.process([RequestInputs(uncertain, np.array([png(1)], dtype=object))])
        assert list(result.flagged) == [True] and step.counts.stored == 1
        stats = step.outbox.writer_stats()
        assert (stats["appends"], stats["flushes"]) == (1, 1 if step is full else 0)


def test_a_broken_outbox_never_fails_inference(tmp_path):
    path = tmp_path / "outbox.db"
    step = ActiveLearningStep(settings(outbox_path=str(path)))
    path.unlink()
    path.mkdir()  # the file is gone and a directory sits in its place: appends must fail
    step.outbox.close()
    (result,) = step.process([RequestInputs(np.array([[0.5, 0.5]], np.float32), np.array([png()], dtype=object))])
    assert list(result.flagged) == [True]
    assert step.counts.outbox_errors == 1 and step.counts.stored == 0


def test_invalid_outputs_are_stored_with_a_json_safe_prediction(tmp_path):
    from triton_al.outbox import Outbox

    step = ActiveLearningStep(settings(outbox_path=str(tmp_path / "o.db")))
    outputs = np.array([[np.nan, 0.5], [np.inf, -1.0]], np.float32)
    (result,) = step.process([RequestInputs(outputs, np.array([png(1), png(2)], dtype=object))])
    assert list(result.reasons) == ["invalid_output", "invalid_output"]
    assert step.counts.stored == 2 and step.counts.outbox_errors == 0
    with Outbox(tmp_path / "o.db") as o:
        first, second = o.due(10)
    assert first.prediction == {"probs": [None, 0.5], "label": 1}
    assert second.prediction == {"probs": [None, -1.0], "label": 1}


def test_pass_through_outputs_must_copy_an_input_of_the_same_name_and_shape():
    from triton_al.serving.active_learning import passthrough_outputs

    probs = {"name": "PROBS", "data_type": "TYPE_FP32", "dims": ["10"]}
    config = {"input": [probs], "output": [dict(probs), {"name": "SCORE"}, {"name": "FLAGGED"}]}
    assert passthrough_outputs(config) == ["PROBS"]
    with pytest.raises(ValueError, match="'LOGITS' is neither SCORE, FLAGGED nor a pass-through"):
        passthrough_outputs({**config, "output": [{**probs, "name": "LOGITS"}]})
    with pytest.raises(ValueError, match="type and dims of input 'PROBS'"):
        passthrough_outputs({**config, "output": [{**probs, "dims": ["11"]}]})


CASES = json.loads((Path(__file__).parent / "step_parameter_cases.json").read_text())


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: ",".join(c["params"]) or "defaults")
def test_shared_parameter_cases(case):
    """The same file runs in `cargo test -p triton-al-step`: both steps read parameters alike."""
    params = {**CASES["base"], **case["params"]}
    params = {k: v for k, v in params.items() if v is not None}
    env = {} if case.get("env") is None else {"TRITON_AL_OUTBOX": case["env"]}
    if "error" in case:
        with pytest.raises(ValueError) as e:
            StepSettings.from_parameters(params, env=env)
        assert str(e.value) == case["error"]
        return
    settings = StepSettings.from_parameters(params, env=env)  # the pydantic models accept what Rust parsed
    parsed = triton_al._core.parse_step_parameters(params, env.get("TRITON_AL_OUTBOX"))
    for key, expected in case["parsed"].items():
        assert parsed[key] == expected, key
    assert settings.active_learning.threshold == parsed["threshold"]


def test_the_parameter_table_is_generated_from_the_models():
    from triton_al.step_settings import PARAMETERS_FILE, parameter_table

    assert json.loads(PARAMETERS_FILE.read_text()) == parameter_table(), (
        "rust/step/src/parameters.json is stale: regenerate with `python -m triton_al.step_settings`")


_VALUES = st.sampled_from(["", " ", "0", "1", "-1", "0.5", "1.5", "3", "1e-3", "nan", "inf", "true", "no", "maybe",
                           "entropy", "margin", "random", "detection", "segmentation", "multilabel", "mean",
                           "least_confident_mean", "quantile", "nhwc", "drop_newest", "normal", "a,b", "a,a",
                           "../x", "g\n", "18446744073709551616"])
_KEYS = st.sampled_from(sorted(json.loads(PARAMETERS_TABLE.read_text())["parameters"]) + ["k", "aggregate", "layout",
                        "quantile", "confidence_floor", "empty_score", "bogus"])


@settings_(max_examples=400, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_the_rust_rules_and_the_pydantic_models_agree(params):
    """Whatever Rust accepts, the pydantic models accept too (else the table is wrong), and
    what Rust refuses it refuses with one message naming the step."""
    params = {"model_name": "m", "outbox_path": "", **params}
    try:
        parsed = triton_al._core.parse_step_parameters(params, None)
    except ValueError as e:
        assert str(e).startswith("active_learning step: ")
        return
    settings = StepSettings.from_parameters(params, env={})
    assert settings.active_learning.task == parsed["task"]
    assert settings.active_learning.upload_groups == parsed["upload_groups"]


def test_an_unusable_outbox_file_does_not_stop_the_step(tmp_path):
    """A corrupt outbox must not fail the load (so the whole ensemble): the step scores and
    counts every flagged item as an outbox error."""
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not SQLite" * 1000)
    step = ActiveLearningStep(settings(outbox_path=str(path)))
    assert step.outbox is None
    (result,) = step.process([RequestInputs(np.array([[0.5, 0.5], [1.0, 0.0]], np.float32),
                                            np.array([png(1), png(2)], dtype=object))])
    assert list(result.flagged) == [True, False]
    assert step.counts.outbox_errors == 1 and step.counts.stored == 0
    assert path.read_bytes() == b"this is not SQLite" * 1000  # left as it was
    step.close()  # stops it trying again


def test_a_kernel_failure_fails_only_the_request_at_fault(monkeypatch):
    """A RuntimeError from the kernels (or anything else) must not fail the other requests
    of the dynamic batch: the step scores them one by one to find the culprit."""
    step = ActiveLearningStep(settings())
    real = step.evaluate

    def flaky(outputs, seed=None):
        if np.any(outputs == 0.25):  # the poisoned request
            raise RuntimeError("kernel exploded")
        return real(outputs, seed=seed)

    monkeypatch.setattr(step, "evaluate", flaky)
    good = np.array([[0.5, 0.5]], np.float32)
    bad = np.array([[0.25, 0.75]], np.float32)
    results = step.process([RequestInputs(good), RequestInputs(bad), RequestInputs(good)])
    assert isinstance(results[1], RequestError) and "kernel exploded" in str(results[1])
    assert [type(r).__name__ for r in results] == ["Evaluation", "RequestError", "Evaluation"]


def test_class_names_from_the_label_file_name_the_stored_labels(tmp_path):
    from triton_al.outbox import Outbox

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labels.txt").write_text("cat\ndog\n")
    s = settings(outbox_path=str(tmp_path / "o.db"), label_file="m/labels.txt")
    step = ActiveLearningStep(s, repository=tmp_path)
    step.process([RequestInputs(np.array([[0.45, 0.55]], np.float32), np.array([png(3)], dtype=object))])
    with Outbox(tmp_path / "o.db") as o:
        (row,) = o.due(10)
    assert row.prediction["label"] == 1 and row.prediction["label_name"] == "dog"
    with pytest.raises(ValueError, match="label_file 'm/nope.txt': cannot read"):
        ActiveLearningStep(settings(label_file="m/nope.txt"), repository=tmp_path)


def detection_settings(tmp_path, **params):
    return settings(outbox_path=str(tmp_path / "o.db"), task="detection", scores_input="DET", boxes_input="BOXES", **params)


def test_detection_boxes_are_stored_with_each_box_of_a_flagged_item(tmp_path):
    from triton_al.outbox import Outbox

    step = ActiveLearningStep(detection_settings(tmp_path))
    scores = np.array([[[0.5, 0.5], [0.9, 0.1]], [[0.99, 0.01], [0.98, 0.02]]], np.float32)  # item 0 is uncertain
    boxes = np.array([[[1, 2, 10, 20], [3.5, 4, np.nan, 8]], [[0, 0, 1, 1], [0, 0, 2, 2]]], np.float32)
    (result,) = step.process([RequestInputs(scores, np.array([png(1), png(2)], dtype=object), boxes=boxes)])
    assert list(result.flagged) == [True, False]
    with Outbox(tmp_path / "o.db") as o:
        (row,) = o.due(10)
    assert row.prediction == {"boxes": [{"label": 0, "confidence": 0.5, "box": [1.0, 2.0, 10.0, 20.0]},
                                        {"label": 0, "confidence": 0.9, "box": [3.5, 4.0, None, 8.0]}]}


def test_boxes_of_the_wrong_type_or_shape_fail_only_their_request(tmp_path):
    step = ActiveLearningStep(detection_settings(tmp_path))
    scores = np.array([[[0.5, 0.5], [0.9, 0.1]]], np.float32)
    good = np.zeros((1, 2, 4), np.float32)
    results = step.process([RequestInputs(scores, boxes=good), RequestInputs(scores, boxes=good.astype(np.float64)),
                            RequestInputs(scores, boxes=np.zeros((1, 2, 3), np.float32)),
                            RequestInputs(scores, boxes=np.zeros((1, 3, 4), np.float32))])
    assert type(results[0]).__name__ == "Evaluation"
    assert str(results[1]) == "BOXES: expected FP32 boxes, got FP64"
    assert str(results[2]) == "BOXES: expected shape [1, 2, 4] (x0, y0, x1, y1 for each box of DET), got [1, 2, 3]"
    assert str(results[3]) == "BOXES: expected shape [1, 2, 4] (x0, y0, x1, y1 for each box of DET), got [1, 3, 4]"
    assert step.counts.scored == 1


def test_predictions_name_boxes_only_with_a_place_per_box():
    p = prediction_of(np.array([[0.9, 0.1]], np.float32), "detection", boxes=np.array([[0, 1, 2, 3]], np.float32))
    assert p == {"boxes": [{"label": 0, "confidence": 0.9, "box": [0.0, 1.0, 2.0, 3.0]}]}
    with pytest.raises(ValueError, match=r"boxes: expected shape \[1, 4\]"):
        prediction_of(np.array([[0.9, 0.1]], np.float32), "detection", boxes=np.zeros((2, 4), np.float32))


def embedding_settings(tmp_path, **params):
    return settings(outbox_path=str(tmp_path / "o.db"), embedding_input="EMB", threshold="0.5", **params)


def test_flagged_items_are_stored_with_their_embedding_and_unflagged_ones_are_not_read(tmp_path):
    from triton_al.outbox import Outbox, content_hash

    step = ActiveLearningStep(embedding_settings(tmp_path))
    outputs = np.array([[0.5, 0.5], [0.999, 0.001], [0.6, 0.4]], np.float32)  # items 0 and 2 are flagged
    embedding = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assets = np.array([png(1), png(2), png(3)], dtype=object)
    (result,) = step.process([RequestInputs(outputs, assets, embedding=embedding)])
    assert list(result.flagged) == [True, False, True]
    with Outbox(tmp_path / "o.db") as o:
        stored = {i.content_hash: i.embedding for i in o.due(10)}
    assert set(stored) == {content_hash(png(1)), content_hash(png(3))}
    np.testing.assert_array_equal(stored[content_hash(png(1))], embedding[0])
    np.testing.assert_array_equal(stored[content_hash(png(3))], embedding[2])
    assert step.counts.invalid_embeddings == 0


def test_an_embedding_with_nan_or_inf_is_left_out_the_item_still_stored_and_the_problem_reported(tmp_path, caplog):
    from triton_al.outbox import Outbox, content_hash

    step = ActiveLearningStep(embedding_settings(tmp_path))
    outputs = np.full((3, 2), 0.5, np.float32)  # all flagged
    embedding = np.array([[1, np.nan], [np.inf, 0], [3, 4]], np.float32)
    with caplog.at_level("WARNING", logger="triton_al.step"):
        (result,) = step.process([RequestInputs(outputs, np.array([png(1), png(2), png(3)], dtype=object), embedding=embedding)])
    assert result.flagged.all() and step.counts.stored == 3 and step.counts.outbox_errors == 0
    assert step.counts.invalid_embeddings == 2
    assert "2 flagged items stored without their embedding: EMB held NaN or Inf (request 0, item 0; request 0, item 1)" in caplog.text
    assert caplog.text.count("NaN or Inf") == 1  # one line per batch
    caplog.clear()
    good = RequestInputs(outputs[:1], np.array([png(4)], dtype=object), embedding=embedding[2:])
    bad = RequestInputs(outputs[:1], np.array([png(5)], dtype=object), embedding=embedding[:1])
    with caplog.at_level("WARNING", logger="triton_al.step"):
        step.process([good, bad])
    assert "1 flagged items stored without their embedding: EMB held NaN or Inf (request 1, item 0)" in caplog.text
    with Outbox(tmp_path / "o.db") as o:
        stored = {i.content_hash: i.embedding for i in o.due(10)}
    assert stored[content_hash(png(1))] is None and stored[content_hash(png(2))] is None
    np.testing.assert_array_equal(stored[content_hash(png(3))], [3, 4])


def test_embeddings_of_the_wrong_type_shape_or_batch_fail_only_their_request_naming_the_input(tmp_path):
    """The Rust step's messages (rust/step/src/step.rs tests), word for word; the type check is the native step's."""
    step = ActiveLearningStep(embedding_settings(tmp_path))
    scores = np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)
    good = np.zeros((2, 3), np.float32)
    bad = [good.astype(np.float64), good.astype(np.float16), np.zeros(2, np.float32), np.zeros((2, 3, 1), np.float32),
           np.zeros((3, 2), np.float32), np.zeros((2, 0), np.float32), np.zeros((2, 4097), np.float32), None]
    results = step.process([RequestInputs(scores, embedding=good), *(RequestInputs(scores, embedding=e) for e in bad)])
    assert type(results[0]).__name__ == "Evaluation"
    shape = "EMB: expected shape [2, D] (one embedding of D values, 1 <= D <= 4096, per item of PROBS), got {}"
    assert [str(r) for r in results[1:]] == [
        "EMB: expected FP32 embeddings, got FP64", "EMB: expected FP32 embeddings, got FP16", shape.format([2]),
        shape.format([2, 3, 1]), shape.format([3, 2]), shape.format([2, 0]), shape.format([2, 4097]), "missing input 'EMB'"]
    assert all(isinstance(r, RequestError) for r in results[1:]) and step.counts.scored == 2


def test_without_embedding_input_nothing_is_asked_or_stored(tmp_path):
    from triton_al.outbox import Outbox

    step = ActiveLearningStep(settings(outbox_path=str(tmp_path / "o.db")))
    assert step.settings.embedding_input is None
    (result,) = step.process([RequestInputs(np.full((1, 2), 0.5, np.float32), np.array([png(1)], dtype=object))])
    assert result.flagged.all()
    with Outbox(tmp_path / "o.db") as o:
        (row,) = o.due(10)
    assert row.embedding is None


def test_an_outbox_unusable_at_load_is_reopened_and_a_closed_step_stops_trying(tmp_path, monkeypatch):
    import triton_al.step as step_module

    monkeypatch.setattr(step_module, "OUTBOX_RETRY_INTERVAL_S", 0.02)
    bad, other = tmp_path / "bad.db", tmp_path / "other.db"
    for path in (bad, other):
        path.write_bytes(b"not an SQLite file " * 500)
    step = ActiveLearningStep(settings(outbox_path=str(bad)))
    closed = ActiveLearningStep(settings(outbox_path=str(other)))
    assert step.outbox is None and closed.outbox is None
    closed.close()
    bad.unlink()
    other.unlink()
    deadline = time.monotonic() + 10
    while step.outbox is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert step.outbox is not None and step.outbox.path == bad and bad.exists()
    time.sleep(0.1)
    assert closed.outbox is None and not other.exists(), "a closed step opened its outbox"
    step.close()
    assert step.outbox is None
