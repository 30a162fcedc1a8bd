"""Threshold calibration: pick the threshold that flags about as many items as the annotators
can label.

The active_learning step publishes, in Triton's own `/metrics`, a histogram of every score it
computes (`triton_al_score`, buckets 0.01 wide) and a counter of items scored. Two scrapes a
window apart give the recent score distribution and the traffic rate; the threshold is the
quantile of that distribution matching the target flag rate (interpolated linearly inside
a bucket).
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "triton_al_score"
SCORED = "triton_al_items_scored"  # the parser strips the _total suffix of counters
FLAGGED = "triton_al_items_flagged"
SECONDS_PER_DAY = 86_400.0


class CalibrationError(ValueError):
    """Not enough information to propose a threshold; the message says what is missing."""


@dataclass(frozen=True)
class ScoreSnapshot:
    """Cumulative histogram counts per upper bound, and the items scored, at one moment."""

    buckets: dict[float, float]
    scored: float
    at: float
    flagged: float = 0.0


def parse_metrics(text: str, model: str | None = None, at: float | None = None) -> ScoreSnapshot:
    """Read the step's histogram and counter from Prometheus exposition text (summed over
    models unless `model` names one)."""
    buckets: dict[float, float] = {}
    scored = flagged = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model is not None and sample.labels.get("model") != model:
                continue
            # A real histogram, or the step's cumulative counters of the same name (the
            # parser gives counter samples a _total suffix).
            if sample.name in (f"{HISTOGRAM}_bucket", f"{HISTOGRAM}_bucket_total"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
                found = True
            elif sample.name in (SCORED, f"{SCORED}_total"):
                scored += sample.value
            elif sample.name in (FLAGGED, f"{FLAGGED}_total"):
                flagged += sample.value
    if not found:
        raise CalibrationError(
            f"no {HISTOGRAM} histogram in the metrics (is the active_learning step loaded"
            + (f" as model {model!r}" if model else "")
            + " and has it scored anything?)"
        )
    return ScoreSnapshot(buckets=buckets, scored=scored, at=time.time() if at is None else at, flagged=flagged)


def scrape(url: str, model: str | None = None, timeout: float = 5.0) -> ScoreSnapshot:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
        return parse_metrics(response.read().decode(), model)


def parse_capacity(text: str) -> float:
    """'500/day', '20/hour', '2/minute' → items per day."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(day|d|hour|h|minute|min|m)\s*", text)
    if not m:
        raise CalibrationError(f"capacity {text!r}: expected N/day, N/hour or N/minute (e.g. 500/day)")
    per = {"day": 1, "d": 1, "hour": 24, "h": 24, "minute": 1440, "min": 1440, "m": 1440}[m.group(2)]
    return float(m.group(1)) * per


@dataclass(frozen=True)
class Proposal:
    threshold: float
    flag_rate: float
    """Share of items the threshold flags on the observed distribution."""
    items_per_day: float | None
    """Observed traffic, when known."""
    observed: int


def threshold_for_fraction(buckets: dict[float, float], fraction: float) -> float:
    """Smallest threshold t with P(score < t) ≈ fraction, from cumulative bucket counts."""
    if not 0.0 <= fraction <= 1.0:
        raise CalibrationError(f"flag rate {fraction}: expected a value in [0, 1]")
    bounds = sorted(b for b in buckets if b != float("inf"))
    total = buckets.get(float("inf"), max(buckets.values(), default=0.0))
    if total <= 0:
        raise CalibrationError("no scores observed in the window: send traffic or widen --window")
    target = fraction * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= target:
            if count == lower_count:
                return lower_bound
            return lower_bound + (bound - lower_bound) * (target - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return 1.0


def propose(
    before: ScoreSnapshot | None,
    after: ScoreSnapshot,
    *,
    capacity_per_day: float | None = None,
    flag_rate: float | None = None,
) -> Proposal:
    """The threshold flagging `flag_rate` of traffic, or `capacity_per_day` items a day at the
    traffic rate seen between the two snapshots."""
    if (capacity_per_day is None) == (flag_rate is None):
        raise CalibrationError("give exactly one of a capacity (N/day) or a target flag rate")
    buckets = dict(after.buckets)
    scored = after.scored
    per_day = None
    if before is not None:
        buckets = {b: after.buckets.get(b, 0.0) - before.buckets.get(b, 0.0) for b in after.buckets}
        scored = after.scored - before.scored
        elapsed = after.at - before.at
        if elapsed > 0:
            per_day = scored / elapsed * SECONDS_PER_DAY
    if capacity_per_day is not None:
        if per_day is None:
            raise CalibrationError("a capacity needs the traffic rate: scrape twice (a --window > 0)")
        if per_day <= 0:
            raise CalibrationError("no traffic in the window: cannot turn a capacity into a flag rate")
        flag_rate = min(1.0, capacity_per_day / per_day)
    t = threshold_for_fraction(buckets, flag_rate)
    return Proposal(threshold=round(t, 4), flag_rate=flag_rate, items_per_day=per_day, observed=int(scored))
