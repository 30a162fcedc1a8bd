"""ActiveLearningConfig: defaults, validation errors that name the field, the JSON schema,
and `evaluate` (threshold, reasons, random share)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import triton_al
from triton_al.config import ActiveLearningConfig, DetectionOptions

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "config.schema.json"


def test_defaults():
    c = ActiveLearningConfig()
    assert (c.strategy, c.threshold, c.task, c.upload_groups) == ("entropy", 0.5, "classification", ["active-learning"])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"strategy": "bald"}, ["strategy"]),
        ({"threshold": 1.5}, ["threshold"]),
        ({"threshold": -0.1}, ["threshold"]),
        ({"upload_groups": []}, ["upload_groups"]),
        ({"upload_groups": ["../etc"]}, ["upload_groups", "../etc"]),
        ({"upload_groups": ["/abs"]}, ["/abs"]),
        ({"upload_groups": [".hidden"]}, [".hidden"]),
        ({"upload_groups": ["a", "a"]}, ["duplicates"]),
        ({"upload_groups": ["review\n"]}, ["upload_groups", "review"]),  # a trailing newline is not a name
        ({"task": "caption"}, ["task"]),
        ({"task": "detection", "task_options": {"layout": "nchw"}}, ["task_options", "detection", "layout"]),
        ({"task": "detection", "task_options": {"k": 0}}, ["task_options", "k"]),
        ({"task": "segmentation", "task_options": {"quantile": 2}}, ["quantile"]),
        ({"random_fraction": 2}, ["random_fraction"]),
        ({"unknown": 1}, ["unknown"]),
    ],
)
def test_bad_values_are_named(kwargs, words):
    with pytest.raises(ValidationError) as info:
        ActiveLearningConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_task_options_are_parsed_for_their_task():
    c = ActiveLearningConfig(task="detection", task_options={"aggregate": "least_confident_mean", "k": 2})
    assert isinstance(c.task_options, DetectionOptions) and c.task_options.k == 2
    assert c.kernel_options()["aggregate"] == "least_confident_mean"


def test_json_schema_is_published_and_current():
    schema = ActiveLearningConfig.model_json_schema()
    assert schema["properties"]["threshold"]["maximum"] == 1.0
    assert json.loads(SCHEMA_FILE.read_text()) == schema, (
        "docs/config.schema.json is stale: regenerate with "
        "`python -m triton_al.config > docs/config.schema.json`"
    )


def test_evaluate_flags_below_threshold_and_invalid_output():
    p = np.array([[0.5, 0.5], [0.99, 0.01], [np.nan, 1.0]], np.float32)
    e = triton_al.evaluate(p, ActiveLearningConfig(threshold=0.5))
    assert e.flagged.tolist() == [True, False, True]
    assert e.reasons == ["uncertain", None, "invalid_output"]
    assert np.isnan(e.scores[2])
    # A higher threshold flags more.
    assert triton_al.evaluate(p, ActiveLearningConfig(threshold=0.99)).flagged.tolist() == [True, True, True]
    assert triton_al.evaluate(p, ActiveLearningConfig(threshold=0.0)).flagged.tolist() == [False, False, True]


def test_random_share_flags_about_that_fraction_of_confident_items():
    p = np.tile(np.array([[0.999, 0.001]], np.float32), (10_000, 1))
    e = triton_al.evaluate(p, ActiveLearningConfig(threshold=0.1, random_fraction=0.2), seed=3)
    assert set(e.reasons) == {None, "random"}
    assert abs(e.flagged.mean() - 0.2) < 0.02
    again = triton_al.evaluate(p, ActiveLearningConfig(threshold=0.1, random_fraction=0.2), seed=3)
    np.testing.assert_array_equal(e.reason_codes, again.reason_codes)


def test_evaluate_passes_per_call_detection_arrays():
    x = np.full((2, 3, 2), 0.5, np.float32)
    c = ActiveLearningConfig(task="detection", task_options={"empty_score": 0.0})
    e = triton_al.evaluate(x, c, valid_counts=[0, 3])
    assert e.scores.tolist() == [0.0, 0.0] and e.flagged.all()


def test_an_evaluator_kept_across_batches_matches_evaluate_and_forgets_per_call_arrays():
    x = np.tile(np.array([0.99, 0.01], np.float32), (2, 3, 1))
    c = ActiveLearningConfig(task="detection", task_options={"empty_score": 0.0}, threshold=0.5)
    evaluator = triton_al.Evaluator(c)
    with_counts = evaluator(x, seed=1, valid_counts=[0, 3])
    assert with_counts.scores[0] == 0.0 and with_counts.scores[1] > 0.9
    np.testing.assert_array_equal(with_counts.scores, triton_al.evaluate(x, c, seed=1, valid_counts=[0, 3]).scores)
    without = evaluator(x, seed=1)  # the previous call's valid_counts must not stick
    assert (without.scores > 0.9).all() and not without.flagged.any()
    np.testing.assert_array_equal(without.reason_codes, triton_al.evaluate(x, c, seed=1).reason_codes)
