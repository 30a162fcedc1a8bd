"""Threshold calibration: pick the threshold that flags about as many items as the annotators
can label; and the fleet's view of the step's metrics (`calibrate` and `report` over many
replicas).

The active_learning step publishes, in Triton's own `/metrics`, a histogram of every score it
computes (`triton_al_score`, buckets 0.01 wide) and a counter of items scored. Two scrapes a
window apart give the recent score distribution and the traffic rate; the threshold is the
quantile of that distribution matching the target flag rate (interpolated linearly inside
a bucket).

Many replicas: each replica's `/metrics` is scraped (`scrape_fleet`) and the histograms are
summed bucket by bucket, refusing replicas that cannot be reached or whose bucket bounds
differ from the others' (a sum of different bounds is no histogram); or one Prometheus that
scrapes them all is asked for the sums (`prometheus_snapshot`).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "triton_al_score"
SCORED = "triton_al_items_scored"  # the parser strips the _total suffix of counters
FLAGGED = "triton_al_items_flagged"
OUTBOX_ERRORS = "triton_al_outbox_errors"
SECONDS_PER_DAY = 86_400.0


class CalibrationError(ValueError):
    """Not enough information to propose a threshold; the message says what is missing."""


@dataclass(frozen=True)
class ScoreSnapshot:
    """Cumulative histogram counts per upper bound, and the items scored, at one moment
    (one replica's, or a fleet's sums)."""

    buckets: dict[float, float]
    scored: float
    at: float
    flagged: float = 0.0
    flagged_by_reason: dict[str, float] = field(default_factory=dict)
    outbox_errors: float = 0.0
    score_sum: float = 0.0
    source: str = ""
    """Where it came from: a /metrics URL, or a Prometheus URL."""
    replicas: int = 1
    """How many replicas the numbers add up."""

    @property
    def finite_scores(self) -> float:
        """Scores that went into the histogram (NaN scores of invalid outputs do not)."""
        return self.buckets.get(math.inf, max(self.buckets.values(), default=0.0))

    def summary(self) -> dict:
        """The numbers a report shows, JSON-ready."""
        return {
            "source": self.source, "replicas": self.replicas, "scored": self.scored, "flagged": self.flagged,
            "flagged_by_reason": dict(sorted(self.flagged_by_reason.items())),
            "flag_rate": self.flagged / self.scored if self.scored else None,
            "outbox_errors": self.outbox_errors, "score_count": self.finite_scores, "score_sum": self.score_sum,
            "mean_score": self.score_sum / self.finite_scores if self.finite_scores else None,
            "buckets": {_le(b): v for b, v in sorted(self.buckets.items())},
        }


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else f"{bound:g}"


def parse_metrics(text: str, model: str | None = None, at: float | None = None, source: str = "") -> ScoreSnapshot:
    """Read the step's histogram and counters from Prometheus exposition text (summed over
    models unless `model` names one)."""
    buckets: dict[float, float] = {}
    scored = flagged = errors = score_sum = 0.0
    by_reason: dict[str, float] = {}
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
            elif sample.name in (f"{HISTOGRAM}_sum", f"{HISTOGRAM}_sum_total"):
                score_sum += sample.value
            elif sample.name in (SCORED, f"{SCORED}_total"):
                scored += sample.value
            elif sample.name in (FLAGGED, f"{FLAGGED}_total"):
                flagged += sample.value
                reason = sample.labels.get("reason", "")
                by_reason[reason] = by_reason.get(reason, 0.0) + sample.value
            elif sample.name in (OUTBOX_ERRORS, f"{OUTBOX_ERRORS}_total"):
                errors += sample.value
    if not found:
        raise CalibrationError(
            f"no {HISTOGRAM} histogram in the metrics (is the active_learning step loaded"
            + (f" as model {model!r}" if model else "")
            + " and has it scored anything?)"
        )
    return ScoreSnapshot(buckets=buckets, scored=scored, at=time.time() if at is None else at, flagged=flagged,
                         flagged_by_reason=by_reason, outbox_errors=errors, score_sum=score_sum, source=source)


def scrape(url: str, model: str | None = None, timeout: float = 5.0) -> ScoreSnapshot:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
        return parse_metrics(response.read().decode(), model, source=url)


# ------------------------------------------------------------------------------------------
# Many replicas, scraped one by one


def _why(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _check_urls(urls: Sequence[str]) -> list[str]:
    if not urls:
        raise CalibrationError("no --metrics-url given")
    seen: set[str] = set()
    for url in urls:
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise CalibrationError(f"--metrics-url {url!r}: expected an http:// or https:// URL of a /metrics endpoint")
        if url in seen:
            raise CalibrationError(f"--metrics-url {url} is given twice: its counts would be added twice")
        seen.add(url)
    return list(urls)


def check_same_bounds(snapshots: Sequence[ScoreSnapshot]) -> None:
    """Refuse to add histograms whose bucket bounds differ, naming the replicas."""
    if not snapshots:
        return
    reference = snapshots[0]
    bounds = set(reference.buckets)
    differing = []
    for s in snapshots[1:]:
        other = set(s.buckets)
        if other != bounds:
            details = []
            if other - bounds:
                details.append("has " + ", ".join(_le(b) for b in sorted(other - bounds)[:5]) + " that the first has not")
            if bounds - other:
                details.append("lacks " + ", ".join(_le(b) for b in sorted(bounds - other)[:5]))
            differing.append(f"{s.source} ({'; '.join(details)})")
    if differing:
        raise CalibrationError(
            f"the score histograms' bucket bounds differ from those of {reference.source} "
            f"({len(bounds)} bounds) at: {'; '.join(differing)}. Refusing to add them up: run the same "
            "step version everywhere, or calibrate those replicas apart")


def scrape_fleet(urls: Sequence[str], model: str | None = None, timeout: float = 5.0) -> list[ScoreSnapshot]:
    """One snapshot per replica, scraped at about the same moment (in parallel). Raises
    CalibrationError naming every replica that cannot be reached or read, or whose bucket
    bounds differ from the first one's."""
    urls = _check_urls(urls)

    def one(url: str) -> ScoreSnapshot | str:
        try:
            return scrape(url, model, timeout)
        except CalibrationError as e:
            return f"{url}: {e}"
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, refused, unparsable text
            return f"{url}: unreachable or unreadable ({_why(e)})"

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        results = list(pool.map(one, urls))
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise CalibrationError(f"{len(problems)} of {len(urls)} replicas could not be read: " + "; ".join(problems))
    snapshots = [r for r in results if isinstance(r, ScoreSnapshot)]
    check_same_bounds(snapshots)
    return snapshots


def _add(a: dict[float, float] | dict[str, float], b) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


def fleet_sum(snapshots: Sequence[ScoreSnapshot], source: str = "fleet") -> ScoreSnapshot:
    """The replicas' histograms and counters added up, bucket by bucket."""
    if not snapshots:
        raise CalibrationError("no replica to add up")
    check_same_bounds(snapshots)
    buckets: dict[float, float] = {}
    by_reason: dict[str, float] = {}
    for s in snapshots:
        buckets = _add(buckets, s.buckets)
        by_reason = _add(by_reason, s.flagged_by_reason)
    return ScoreSnapshot(
        buckets=buckets, scored=sum(s.scored for s in snapshots), at=max(s.at for s in snapshots),
        flagged=sum(s.flagged for s in snapshots), flagged_by_reason=by_reason,
        outbox_errors=sum(s.outbox_errors for s in snapshots), score_sum=sum(s.score_sum for s in snapshots),
        source=source, replicas=sum(s.replicas for s in snapshots))


# ------------------------------------------------------------------------------------------
# Many replicas, through Prometheus

_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
SELECTOR = re.compile(rf"(?:{_MATCHER})(?:,(?:{_MATCHER}))*,?")


def prometheus_selector(model: str, extra: str | None = None) -> str:
    """The label matchers of every query: the step's model, and the user's own (e.g.
    `namespace="prod"`), checked to be label matchers only."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model):
        raise CalibrationError(f"step model name {model!r}: expected letters, digits, '.', '_' or '-'")
    matchers = f'model="{model}"'
    if extra and extra.strip():
        extra = extra.strip().strip("{}")
        if not SELECTOR.fullmatch(extra):
            raise CalibrationError(f'--prometheus-selector {extra!r}: expected label matchers such as namespace="prod",pod=~"triton-al-.*"')
        matchers += "," + extra.rstrip(", ")
    return matchers


def query_prometheus(base_url: str, query: str, timeout: float = 10.0) -> list[dict]:
    """An instant query (GET /api/v1/query); the result vector. Errors name the server, the
    query and Prometheus' own reason."""
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise CalibrationError(f"--prometheus-url {base_url!r}: expected an http:// or https:// URL")
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL the user gave
            body = response.read().decode()
    except urllib.error.HTTPError as e:  # Prometheus answers 400/422/503 with a JSON error body
        try:
            answer = json.loads(e.read().decode())
            reason = f"{answer.get('errorType', '')}: {answer.get('error', '')}"
        except (ValueError, OSError):
            reason = f"HTTP {e.code} {e.reason}"
        raise CalibrationError(f"Prometheus at {base_url} refused the query {query!r}: {reason}") from None
    except (OSError, ValueError) as e:
        raise CalibrationError(f"Prometheus at {base_url} is unreachable: {_why(e)}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise CalibrationError(f"{base_url} did not answer the Prometheus query API with JSON (is it a Prometheus?)") from None
    if not isinstance(answer, dict) or answer.get("status") != "success":
        reason = f"{answer.get('errorType', '')}: {answer.get('error', '')}" if isinstance(answer, dict) else body[:200]
        raise CalibrationError(f"Prometheus at {base_url} refused the query {query!r}: {reason}")
    data = answer.get("data") or {}
    if data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise CalibrationError(f"Prometheus at {base_url} answered {query!r} with a {data.get('resultType')!r}, not a vector")
    return data["result"]


def _value(item: dict) -> float:
    try:
        return float(item["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise CalibrationError(f"a Prometheus result without a numeric value: {item}") from None


def prometheus_queries(model: str, window: float, extra_selector: str | None = None) -> dict[str, str]:
    """The PromQL the fleet's numbers come from: cumulative sums (`window` 0) or the
    increase over the last `window` seconds, summed over every replica Prometheus scrapes."""
    sel = prometheus_selector(model, extra_selector)

    def over(name: str) -> str:
        return f"{name}{{{sel}}}" if window <= 0 else f"increase({name}{{{sel}}}[{int(round(window))}s])"

    if 0 < window < 1:
        raise CalibrationError(f"--window {window}: a Prometheus range needs at least 1 s")
    return {
        "buckets": f"sum by (le) ({over(HISTOGRAM + '_bucket')})",
        "scored": f"sum({over(SCORED + '_total')})",
        "flagged": f"sum by (reason) ({over(FLAGGED + '_total')})",
        "outbox_errors": f"sum({over(OUTBOX_ERRORS + '_total')})",
        "score_sum": f"sum({over(HISTOGRAM + '_sum')})",
        "series": f"count by (instance, pod, le) ({HISTOGRAM}_bucket{{{sel}}})",
    }


def prometheus_snapshot(base_url: str, model: str, window: float = 0.0, extra_selector: str | None = None,
                        timeout: float = 10.0) -> ScoreSnapshot:
    """The fleet's histogram and counters from one Prometheus: summed over every replica it
    scrapes (cumulative with `window` 0, else their increase over the last `window`
    seconds). Refuses when replicas export different bucket bounds, naming them."""
    queries = prometheus_queries(model, window, extra_selector)
    series = query_prometheus(base_url, queries["series"], timeout)
    if not series:
        raise CalibrationError(f"Prometheus at {base_url} has no {HISTOGRAM}_bucket series for {{{prometheus_selector(model, extra_selector)}}} "
                               "(is the step loaded, does Prometheus scrape Triton's /metrics, are the label matchers right?)")
    bounds_of: dict[str, set[float]] = {}
    twice: set[str] = set()
    for item in series:
        labels = item.get("metric") or {}
        replica = labels.get("pod") or labels.get("instance") or "?"
        bounds_of.setdefault(replica, set()).add(float(labels.get("le", "nan")))
        if _value(item) > 1:
            twice.add(replica)
    if twice:
        raise CalibrationError(f"replicas {', '.join(sorted(twice))} have more than one {HISTOGRAM}_bucket series per bound "
                               "(scraped by two jobs, or two steps of that name?): their counts would be added twice; "
                               'narrow --prometheus-selector (e.g. job="...")')
    reference = max(bounds_of.values(), key=lambda b: sum(1 for other in bounds_of.values() if other == b))
    differing = sorted(r for r, b in bounds_of.items() if b != reference)
    if differing:
        raise CalibrationError(f"replicas {', '.join(differing)} export other score bucket bounds than the other "
                               f"{len(bounds_of) - len(differing)}: refusing to add them up (narrow --prometheus-selector, "
                               "or run the same step version everywhere)")
    buckets = {float(item["metric"]["le"]): _value(item) for item in query_prometheus(base_url, queries["buckets"], timeout)}
    if not buckets:
        raise CalibrationError(f"Prometheus at {base_url} returned no buckets for {queries['buckets']!r}")
    if buckets.keys() != reference:
        raise CalibrationError(f"Prometheus at {base_url}: the summed histogram has other bounds than the series "
                               "(a replica appeared or went away between two queries?): run again")

    def total(name: str) -> float:
        return sum(_value(item) for item in query_prometheus(base_url, queries[name], timeout))

    by_reason = {(item.get("metric") or {}).get("reason", ""): _value(item)
                 for item in query_prometheus(base_url, queries["flagged"], timeout)}
    return ScoreSnapshot(buckets=buckets, scored=total("scored"), at=time.time(), flagged=sum(by_reason.values()),
                         flagged_by_reason=by_reason, outbox_errors=total("outbox_errors"), score_sum=total("score_sum"),
                         source=base_url, replicas=len(bounds_of))


# ------------------------------------------------------------------------------------------
# The threshold


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
    replicas: int = 1
    """Replicas whose scores were added up."""


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


def window_delta(before: ScoreSnapshot, after: ScoreSnapshot) -> tuple[dict[float, float], float, float | None]:
    """(bucket counts, items scored, items per day) between two snapshots of one replica.
    Counters that went down mean the replica restarted in between: refused, naming it."""
    if set(before.buckets) != set(after.buckets):
        raise CalibrationError(f"{after.source or 'the replica'}: its bucket bounds changed between the two scrapes "
                               "(another step version loaded?): run again")
    buckets = {b: after.buckets[b] - before.buckets[b] for b in after.buckets}
    scored = after.scored - before.scored
    if scored < 0 or any(v < 0 for v in buckets.values()):
        raise CalibrationError(f"{after.source or 'the replica'}: its counters went down between the two scrapes "
                               "(tritonserver or the step restarted?): run again")
    elapsed = after.at - before.at
    return buckets, scored, (scored / elapsed * SECONDS_PER_DAY if elapsed > 0 else None)


def propose_fleet(
    before: Sequence[ScoreSnapshot] | None,
    after: Sequence[ScoreSnapshot],
    *,
    capacity_per_day: float | None = None,
    flag_rate: float | None = None,
) -> Proposal:
    """`propose` over many replicas: each replica's window (or cumulative counts without
    `before`), added up bucket by bucket; the traffic rate is the sum of the replicas'."""
    if (capacity_per_day is None) == (flag_rate is None):
        raise CalibrationError("give exactly one of a capacity (N/day) or a target flag rate")
    if not after:
        raise CalibrationError("no replica to calibrate on")
    check_same_bounds(after)
    if before is None:
        total = fleet_sum(after)
        buckets, scored, per_day = total.buckets, total.scored, None
    else:
        if len(before) != len(after):
            raise CalibrationError("the two scrapes cover different replicas")
        buckets, scored, per_day = {}, 0.0, 0.0
        for b, a in zip(before, after):
            delta, n, rate = window_delta(b, a)
            buckets = _add(buckets, delta)
            scored += n
            per_day = None if rate is None or per_day is None else per_day + rate
    if capacity_per_day is not None:
        if per_day is None:
            raise CalibrationError("a capacity needs the traffic rate: scrape twice (a --window > 0)")
        if per_day <= 0:
            raise CalibrationError("no traffic in the window: cannot turn a capacity into a flag rate")
        flag_rate = min(1.0, capacity_per_day / per_day)
    t = threshold_for_fraction(buckets, flag_rate)
    return Proposal(threshold=round(t, 4), flag_rate=flag_rate, items_per_day=per_day, observed=int(round(scored)),
                    replicas=sum(s.replicas for s in after))


def propose(
    before: ScoreSnapshot | None,
    after: ScoreSnapshot,
    *,
    capacity_per_day: float | None = None,
    flag_rate: float | None = None,
) -> Proposal:
    """The threshold flagging `flag_rate` of traffic, or `capacity_per_day` items a day at the
    traffic rate seen between the two snapshots."""
    return propose_fleet(None if before is None else [before], [after], capacity_per_day=capacity_per_day,
                         flag_rate=flag_rate)


def propose_from_prometheus(snapshot: ScoreSnapshot, window: float, *, capacity_per_day: float | None = None,
                            flag_rate: float | None = None) -> Proposal:
    """`propose` on a Prometheus snapshot: with a `window`, its counts are already the
    increase over the window and the traffic rate is their rate."""
    if (capacity_per_day is None) == (flag_rate is None):
        raise CalibrationError("give exactly one of a capacity (N/day) or a target flag rate")
    per_day = snapshot.scored / window * SECONDS_PER_DAY if window > 0 else None
    if capacity_per_day is not None:
        if per_day is None:
            raise CalibrationError("a capacity needs the traffic rate: give --window > 0 (the range Prometheus looks back)")
        if per_day <= 0:
            raise CalibrationError("no traffic in the window: cannot turn a capacity into a flag rate")
        flag_rate = min(1.0, capacity_per_day / per_day)
    t = threshold_for_fraction(snapshot.buckets, flag_rate)
    return Proposal(threshold=round(t, 4), flag_rate=flag_rate, items_per_day=per_day,
                    observed=int(round(snapshot.scored)), replicas=snapshot.replicas)


# ------------------------------------------------------------------------------------------
# The fleet in `triton-al report`


def write_fleet_report(out, replicas: Sequence[ScoreSnapshot], total: ScoreSnapshot) -> str:
    """Writes OUT/fleet.json (every replica's numbers and their sum) and OUT/fleet_scores.png
    (the score distribution of the fleet and of each replica); returns the HTML section."""
    import html
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps({"fleet": total.summary(), "replicas": [r.summary() for r in replicas]}, indent=1))

    def shares(s: ScoreSnapshot) -> tuple[list[float], list[float]]:
        bounds = sorted(b for b in s.buckets if b != math.inf)
        cumulative = [s.buckets[b] for b in bounds]
        counts = [c - p for c, p in zip(cumulative, [0.0] + cumulative[:-1])]
        n = sum(counts)
        return bounds, [c / n if n else 0.0 for c in counts]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(*shares(total), where="pre", linewidth=2, label=f"fleet ({total.replicas} replicas)")
    for r in replicas:
        ax.step(*shares(r), where="pre", alpha=0.6, linewidth=1, label=r.source)
    ax.set_xlabel("score (confidence)")
    ax.set_ylabel("share of scores")
    ax.set_title("Score distribution across the fleet")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fleet_scores.png", dpi=110)
    plt.close(fig)

    def row(s: ScoreSnapshot, bold: bool = False) -> str:
        x = s.summary()
        rate = "" if x["flag_rate"] is None else f"{x['flag_rate']:.4f}"
        mean = "" if x["mean_score"] is None else f"{x['mean_score']:.4f}"
        reasons = ", ".join(f"{k}: {v:g}" for k, v in x["flagged_by_reason"].items() if v)
        cells = [html.escape(s.source), f"{s.scored:g}", f"{s.flagged:g}", html.escape(reasons), rate, mean, f"{s.outbox_errors:g}"]
        tag = "th" if bold else "td"
        return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"

    rows = "".join(row(r) for r in replicas) + row(total, bold=True)
    return (f'<h2 id="fleet">Fleet: the step\'s metrics across {total.replicas} replicas</h2>'
            "<p>Counts are cumulative since each replica's server started (from Prometheus: over the window asked for); "
            "the fleet's histogram is the replicas' added up bucket by bucket. Numbers: fleet.json.</p>"
            "<table><tr><th>replica</th><th>scored</th><th>flagged</th><th>by reason</th><th>flag rate</th>"
            f"<th>mean score</th><th>outbox errors</th></tr>{rows}</table>"
            '<figure><img src="fleet_scores.png" alt="score distribution across the fleet">'
            "<figcaption>Score distribution of the fleet and of each replica.</figcaption></figure>")
