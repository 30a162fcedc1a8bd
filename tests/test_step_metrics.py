"""The step's Triton metrics, outside Triton: a recording stand-in for `pb_utils`'s
MetricFamily (the real one exists only inside the stub; test_pipeline.py reads the real
/metrics end to end). Checks the histogram the flush thread computes, including when
batches pile up faster than it flushes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from triton_al.scoring import REASONS
from triton_al.serving import active_learning


class RecordingFamily:
    COUNTER = "counter"
    values: dict[tuple, float] = defaultdict(float)

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str]):  # noqa: N802 - pb_utils' spelling
        family, key = self, (self.name, tuple(sorted(labels.items())))

        class Counter:
            def increment(self, value: float) -> None:
                assert value >= 0, f"{family.name}: counters only go up"
                RecordingFamily.values[key] += value

        return Counter()


@pytest.fixture
def metrics(monkeypatch):
    RecordingFamily.values = defaultdict(float)
    monkeypatch.setattr(active_learning, "pb_utils", type("pb_utils", (), {"MetricFamily": RecordingFamily}))
    monkeypatch.setattr(active_learning._Metrics, "FLUSH_S", 3600.0)  # flushed by the test only
    monkeypatch.setattr(active_learning._Metrics, "MAX_PENDING", 8)
    m = active_learning._Metrics("active_learning")
    yield m
    m.close()


def value(name: str, **labels: str) -> float:
    return RecordingFamily.values[(name, tuple(sorted({"model": "active_learning", **labels}.items())))]


def test_flushed_histogram_matches_the_scores_even_when_batches_pile_up(metrics):
    rng = np.random.default_rng(0)
    all_scores, all_codes = [], []
    for _ in range(50):  # more than MAX_PENDING between flushes: folded on the way
        scores = rng.random(rng.integers(1, 40)).astype(np.float32)
        scores[rng.random(len(scores)) < 0.1] = np.nan
        codes = rng.integers(0, len(REASONS), len(scores)).astype(np.uint8)
        metrics.observe(scores, codes)
        all_scores.append(scores)
        all_codes.append(codes)
    metrics.error(2)
    metrics.invalid_embedding(3)
    metrics.flush()
    scores, codes = np.concatenate(all_scores), np.concatenate(all_codes)
    finite = scores[np.isfinite(scores)]
    assert value("triton_al_items_scored_total") == len(scores)
    assert value("triton_al_score_count") == len(finite)
    assert value("triton_al_score_sum") == pytest.approx(float(finite.sum()), rel=1e-5)
    for bound in (0.01, 0.25, 0.5, 0.99, 1.0):
        assert value("triton_al_score_bucket", le=f"{bound:g}") == np.count_nonzero(finite.astype(np.float64) <= bound), bound
    assert value("triton_al_score_bucket", le="+Inf") == len(finite)
    for code, reason in enumerate(REASONS):
        if reason:
            assert value("triton_al_items_flagged_total", reason=reason) == np.count_nonzero(codes == code)
    assert value("triton_al_outbox_errors_total") == 2
    assert value("triton_al_invalid_embeddings_total") == 3
    metrics.flush()  # nothing new: nothing changes
    assert value("triton_al_items_scored_total") == len(scores)
