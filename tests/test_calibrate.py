"""Threshold calibration from the step's score histogram (Prometheus exposition text made by
prometheus_client itself, as Triton's /metrics presents it)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from triton_al.calibrate import CalibrationError, parse_capacity, parse_metrics, propose, threshold_for_fraction

BUCKETS = [round(0.01 * i, 2) for i in range(1, 101)]


def exposition(scores: np.ndarray, model: str = "active_learning") -> str:
    registry = CollectorRegistry()
    h = Histogram("triton_al_score", "scores", ["model"], buckets=BUCKETS, registry=registry)
    c = Counter("triton_al_items_scored", "scored", ["model"], registry=registry)
    for s in scores:
        h.labels(model=model).observe(float(s))
    c.labels(model=model).inc(len(scores))
    return generate_latest(registry).decode()


def test_threshold_matches_the_quantile():
    rng = np.random.default_rng(0)
    scores = rng.beta(2, 5, size=20_000)
    snap = parse_metrics(exposition(scores))
    for fraction in (0.01, 0.1, 0.5, 0.9):
        t = threshold_for_fraction(snap.buckets, fraction)
        assert abs((scores < t).mean() - fraction) < 0.01, (fraction, t)


def test_capacity_uses_the_traffic_rate_between_two_scrapes():
    rng = np.random.default_rng(1)
    first = rng.uniform(size=1000)
    later = rng.uniform(size=3000)
    before = parse_metrics(exposition(first), at=0.0)
    after = parse_metrics(exposition(np.concatenate([first, later])), at=60.0)
    # 3000 items a minute is 4.32M a day; 43,200 a day is 1% of that.
    p = propose(before, after, capacity_per_day=43_200)
    assert p.items_per_day == pytest.approx(3000 * 1440)
    assert p.flag_rate == pytest.approx(0.01)
    assert abs((later < p.threshold).mean() - 0.01) < 0.005
    assert p.observed == 3000


def test_flag_rate_without_a_window():
    scores = np.linspace(0, 1, 1001)[:-1]
    p = propose(None, parse_metrics(exposition(scores)), flag_rate=0.25)
    assert p.threshold == pytest.approx(0.25, abs=0.011)


def test_errors_say_what_is_missing():
    with pytest.raises(CalibrationError, match="no triton_al_score"):
        parse_metrics("# nothing here\n")
    with pytest.raises(CalibrationError, match="model 'other'"):
        parse_metrics(exposition(np.array([0.5])), model="other")
    snap = parse_metrics(exposition(np.array([0.5])))
    with pytest.raises(CalibrationError, match="scrape twice"):
        propose(None, snap, capacity_per_day=10)
    later = parse_metrics(exposition(np.array([0.5])), at=snap.at + 10)
    with pytest.raises(CalibrationError, match="no traffic"):
        propose(snap, later, capacity_per_day=10)
    with pytest.raises(CalibrationError, match="exactly one"):
        propose(None, snap)
    with pytest.raises(CalibrationError, match="N/day"):
        parse_capacity("lots")
    assert parse_capacity("500/day") == 500 and parse_capacity("20/hour") == 480
