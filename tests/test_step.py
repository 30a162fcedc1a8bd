"""The active-learning step without Triton: settings from config.pbtxt parameters, batching
of several requests into one kernel call, per-request errors, and what gets stored."""

from __future__ import annotations

import io

import numpy as np
import pytest
from outbox_helpers import wal_flushes, wal_inode  # noqa: F401 (a fixture)
from PIL import Image

import triton_al
from triton_al.step import ActiveLearningStep, RequestError, RequestInputs, asset_bytes, prediction_of, sniff_media_type
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


def test_outbox_sync_chooses_the_durability_of_appends(tmp_path, wal_flushes):
    full = ActiveLearningStep(settings(outbox_path=str(tmp_path / "a.db")))
    normal = ActiveLearningStep(settings(outbox_path=str(tmp_path / "b.db"), outbox_sync="normal"))
    assert full.outbox.durable and not normal.outbox.durable
    uncertain = np.array([[0.5, 0.5]], np.float32)
    for step, name in ((full, "a.db"), (normal, "b.db")):
        wal_flushes.clear()
        (result,) = step.process([RequestInputs(uncertain, np.array([png(1)], dtype=object))])
        assert list(result.flagged) == [True] and step.counts.stored == 1
        assert wal_flushes.count(wal_inode(tmp_path / name)) == (1 if step is full else 0), name


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
