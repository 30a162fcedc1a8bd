"""Score drift alarm (issue 15): is the served model's recent score distribution still the one
it had when it was deployed (or calibrated), and is its flag rate still in its band?

- **Reference**: a score histogram per served model version, kept in a JSON file
  (`--reference FILE`, several versions in one file). Recorded by `triton-al drift record`
  (the cumulative histogram, or a window of `--window` seconds), or by the watcher from the
  first N scores it sees for a version that has none (`--record-first N`).
- **Window**: the step's histogram and counters from Triton's /metrics (one or several
  `--metrics-url`, summed as `calibrate` sums them) scraped twice; the window is their
  difference (or, with `--prometheus-url`, Prometheus' increase over `--window`).
- **Statistic**: PSI (population stability index) over B bins (default 10) made of whole
  0.01 buckets of the step's histogram, chosen on the reference so that each holds about 1/B
  of its scores (a bin holds more when one bucket does). Each side's bin shares are smoothed
  with a Jeffreys pseudo-count of 0.5 per bin, p_i = (c_i + 0.5) / (n + 0.5 B), so an empty
  bin gives a finite term:  PSI = sum_i (q_i - p_i) ln(q_i / p_i)  (0 for equal shares).
  The KS distance (max |F_ref - F_window| over the 0.01 bucket bounds) is reported beside it.
  A window is judged only when it holds at least `--min-items` scores (the PSI of a small
  sample is large by chance).
- **Flag rate**: items flagged (every reason but invalid_output) / items scored in the window,
  against the band recorded with the reference (`--flag-rate-band LOW:HIGH`, by default half
  to twice the reference's own flag rate). Out of band means the window's Wilson interval
  (z = 3) lies wholly outside the band, so sampling noise alone rarely alarms.

The version: the step's histogram is labelled by the step only (`model`), not by the version
of the scored model. The reference is keyed by (step, scored model, version), the version
being the newest one the server reports ready for the model the step scores (its `model_name`
parameter, asked through tritonclient), or `--version` when given (a fleet behind one
address, Prometheus). During a rollout in which two versions serve, a window mixes them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from triton_al.calibrate import CalibrationError, ScoreSnapshot, check_same_bounds, window_delta

REFERENCE_FORMAT = "triton-al-drift-reference/1"
SMOOTHING = 0.5
DEFAULT_BINS = 10
DEFAULT_PSI_THRESHOLD = 0.2
DEFAULT_MIN_ITEMS = 200
NOT_FLAG_RATE = {"invalid_output"}  # flags that are not the threshold's doing
BAND_Z = 3.0
"""The flag rate is out of its band when the window's Wilson interval at z = 3 (99.7%) lies
wholly outside it: a window of a few hundred items must not alarm on its sampling noise."""


class DriftError(ValueError):
    """A drift check that cannot be made; the message says what was wrong."""


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else f"{bound:g}"


# ------------------------------------------------------------------------------------------
# The statistic


def per_bucket(cumulative: dict[float, float]) -> tuple[list[float], np.ndarray]:
    """(sorted upper bounds, count in each bucket) from cumulative counts per bound."""
    bounds = sorted(cumulative)
    c = np.array([cumulative[b] for b in bounds], dtype=float)
    return bounds, np.diff(np.concatenate([[0.0], c]))


def histogram(scores: np.ndarray, bounds: Sequence[float]) -> dict[float, float]:
    """Cumulative counts of scores at or below each bound (as the step counts them; NaN
    scores are not counted)."""
    s = np.asarray(scores, dtype=float)
    s = np.sort(s[np.isfinite(s)])
    return {float(b): float(np.searchsorted(s, b, side="right")) for b in bounds}


def bins_for(reference_counts: np.ndarray, n_bins: int = DEFAULT_BINS) -> list[int]:
    """Bin edges as bucket indices (each bin is buckets [edges[k], edges[k+1])), so that each
    bin holds about 1/n_bins of the reference's scores; empty buckets at the ends join their
    neighbour bin."""
    counts = np.asarray(reference_counts, dtype=float)
    total = counts.sum()
    if n_bins < 2:
        raise DriftError(f"--bins {n_bins}: expected at least 2")
    if total <= 0:
        raise DriftError("the reference holds no scores")
    cumulative = np.cumsum(counts)
    last = int(np.nonzero(counts)[0][-1])  # the last bucket with reference scores
    edges = [0]
    for k in range(1, n_bins):
        i = int(np.searchsorted(cumulative, k * total / n_bins - 1e-9)) + 1  # cut after bucket i-1
        if edges[-1] < i <= last:
            edges.append(i)
    edges.append(len(counts))
    return edges


def coarsen(counts: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return np.array([counts[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])


def psi(reference: np.ndarray, window: np.ndarray, smoothing: float = SMOOTHING) -> float:
    """PSI between two count vectors over the same bins, each smoothed with `smoothing`
    pseudo-counts per bin: sum (q - p) ln(q / p)."""
    p = np.asarray(reference, dtype=float)
    q = np.asarray(window, dtype=float)
    if p.shape != q.shape or p.ndim != 1:
        raise DriftError(f"PSI needs counts over the same bins, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise DriftError("PSI of negative counts")
    if smoothing <= 0 and ((p == 0) | (q == 0)).any():
        raise DriftError("PSI without smoothing is infinite when a bin is empty on one side")
    p = (p + smoothing) / (p.sum() + smoothing * len(p))
    q = (q + smoothing) / (q.sum() + smoothing * len(q))
    return float(np.sum((q - p) * np.log(q / p)))


def ks(reference: np.ndarray, window: np.ndarray) -> float:
    """Largest distance between the two empirical CDFs at the bucket bounds."""
    p = np.cumsum(np.asarray(reference, dtype=float))
    q = np.cumsum(np.asarray(window, dtype=float))
    if p[-1] <= 0 or q[-1] <= 0:
        raise DriftError("KS of an empty histogram")
    return float(np.max(np.abs(p / p[-1] - q / q[-1])))


# ------------------------------------------------------------------------------------------
# The reference file


@dataclass
class Reference:
    step: str
    model: str
    version: str
    bounds: list[float]
    counts: list[float]
    """Scores per bucket (not cumulative), bucket i being (bounds[i-1], bounds[i]]."""
    scored: float
    flagged: float
    band: tuple[float, float]
    recorded_at: float = field(default_factory=time.time)
    how: str = ""
    source: str = ""

    @property
    def key(self) -> str:
        return key(self.step, self.model, self.version)

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.scored if self.scored else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["bounds"] = [_le(b) for b in self.bounds]
        d["band"] = list(self.band)
        d["n"] = float(sum(self.counts))
        d["flag_rate"] = self.flag_rate
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> Reference:
        try:
            ref = cls(step=str(d["step"]), model=str(d["model"]), version=str(d["version"]),
                      bounds=[float(b) for b in d["bounds"]], counts=[float(c) for c in d["counts"]],
                      scored=float(d["scored"]), flagged=float(d["flagged"]),
                      band=(float(d["band"][0]), float(d["band"][1])), recorded_at=float(d.get("recorded_at", 0)),
                      how=str(d.get("how", "")), source=str(d.get("source", "")))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DriftError(f"{where}: a reference entry is malformed ({type(e).__name__}: {e})") from None
        if len(ref.bounds) != len(ref.counts) or sorted(ref.bounds) != ref.bounds:
            raise DriftError(f"{where}: reference {ref.key}: bounds and counts do not match")
        return ref


def key(step: str, model: str, version: str) -> str:
    return f"{step}/{model}/{version}"


def load_references(path: Path) -> dict[str, Reference]:
    path = Path(path)
    if not path.exists():
        raise DriftError(f"reference file {path} does not exist: record one with `triton-al drift record --reference {path} ...` "
                         "(or let `triton-al drift --watch --record-first N` record it)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DriftError(f"reference file {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
        raise DriftError(f"reference file {path}: expected format {REFERENCE_FORMAT!r}, found "
                         f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
    refs = [Reference.from_json(d, str(path)) for d in data.get("references") or []]
    return {r.key: r for r in refs}


def save_reference(path: Path, ref: Reference) -> None:
    """Adds (or replaces) the reference of its version in the file, atomically."""
    path = Path(path)
    refs = load_references(path) if path.exists() else {}
    refs[ref.key] = ref
    body = {"format": REFERENCE_FORMAT, "references": [r.to_json() for r in sorted(refs.values(), key=lambda r: r.key)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)


def find_reference(refs: dict[str, Reference], path: Path, step: str, model: str, version: str) -> Reference:
    k = key(step, model, version)
    if k not in refs:
        have = ", ".join(sorted(refs)) or "none"
        raise DriftError(f"no reference for step {step!r}, model {model!r} version {version} in {path} (it has: {have}); "
                         f"record one with `triton-al drift record --reference {path}` while that version serves")
    return refs[k]


# ------------------------------------------------------------------------------------------
# Windows and verdicts


@dataclass(frozen=True)
class Window:
    buckets: dict[float, float]
    """Cumulative counts per bound over the window."""
    scored: float
    flagged: float
    """Flagged for any reason but invalid_output."""
    seconds: float | None = None
    source: str = ""


def _flagged(s: ScoreSnapshot) -> dict[str, float]:
    return {r: v for r, v in s.flagged_by_reason.items() if r not in NOT_FLAG_RATE}


def window_of(before: Sequence[ScoreSnapshot] | None, after: Sequence[ScoreSnapshot]) -> Window:
    """The fleet's window between two scrapes of each replica (cumulative counts without
    `before`; a Prometheus snapshot over a range is already a window)."""
    if not after:
        raise DriftError("no replica scraped")
    check_same_bounds(after)
    buckets: dict[float, float] = {}
    scored = flagged = 0.0
    if before is None:
        pairs = [(None, a) for a in after]
    else:
        if len(before) != len(after):
            raise DriftError("the two scrapes cover different replicas")
        pairs = list(zip(before, after))
    for b, a in pairs:
        if b is None:
            delta, n, f = dict(a.buckets), a.scored, sum(_flagged(a).values())
        else:
            delta, n, _ = window_delta(b, a)
            fa, fb = _flagged(a), _flagged(b)
            f = sum(fa.values()) - sum(fb.values())
        for k, v in delta.items():
            buckets[k] = buckets.get(k, 0.0) + v
        scored += n
        flagged += f
    seconds = None if before is None else max(a.at for a in after) - min(b.at for b in before)
    return Window(buckets=buckets, scored=scored, flagged=flagged, seconds=seconds,
                  source=", ".join(a.source for a in after))


def check_layout(ref: Reference, bounds: Sequence[float], where: str, source: str) -> None:
    if list(ref.bounds) != sorted(bounds):
        mine, theirs = ref.bounds, sorted(bounds)
        raise DriftError(
            f"the reference for {ref.key} in {where} has {len(mine)} buckets "
            f"({_le(mine[0])}, {_le(mine[1]) if len(mine) > 1 else ''} .. {_le(mine[-1])}) but {source} exports "
            f"{len(theirs)} ({_le(theirs[0])}, {_le(theirs[1]) if len(theirs) > 1 else ''} .. {_le(theirs[-1])}): "
            "another bucket layout (another step version?); record a new reference")


def default_band(flag_rate: float | None) -> tuple[float, float]:
    """Half to twice the reference's flag rate."""
    if flag_rate is None:
        return (0.0, 1.0)
    return (flag_rate / 2, min(1.0, flag_rate * 2))


def parse_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(":"))
    except ValueError:
        raise DriftError(f"--flag-rate-band {text!r}: expected LOW:HIGH, e.g. 0.02:0.08") from None
    if not 0.0 <= low <= high <= 1.0:
        raise DriftError(f"--flag-rate-band {text!r}: expected 0 <= LOW <= HIGH <= 1")
    return (low, high)


def make_reference(window: Window, step: str, model: str, version: str, *, band: tuple[float, float] | None = None,
                   min_items: int = DEFAULT_MIN_ITEMS, how: str = "") -> Reference:
    bounds, counts = per_bucket(window.buckets)
    n = float(counts.sum())
    if n < min_items:
        raise DriftError(f"only {n:g} scores to make the reference of {key(step, model, version)} from (at least "
                         f"{min_items} wanted, --min-items): send traffic or widen --window")
    rate = window.flagged / window.scored if window.scored else None
    return Reference(step=step, model=model, version=str(version), bounds=list(bounds), counts=counts.tolist(),
                     scored=window.scored, flagged=window.flagged, band=band or default_band(rate), how=how,
                     source=window.source)


def wilson(k: float, n: float, z: float = BAND_Z) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def out_of_band(flagged: float, scored: float, band: tuple[float, float], z: float = BAND_Z) -> bool:
    low, high = wilson(flagged, scored, z)
    return high < band[0] or low > band[1]


@dataclass(frozen=True)
class Verdict:
    reference: str
    items: float
    psi: float | None
    ks: float | None
    psi_threshold: float
    flag_rate: float | None
    band: tuple[float, float]
    judged: bool
    """False: fewer than min_items scores in the window (no alarm either way)."""
    drift_alarm: bool
    band_alarm: bool
    bins: int
    seconds: float | None = None

    @property
    def alarm(self) -> bool:
        return self.drift_alarm or self.band_alarm

    def to_json(self) -> dict:
        d = asdict(self)
        d["band"] = list(self.band)
        d["alarm"] = self.alarm
        return d

    def describe(self) -> str:
        if not self.judged:
            return f"{self.reference}: only {self.items:g} scores in the window, not judged"
        parts = [f"{self.reference}: PSI {self.psi:.3f} (alarm above {self.psi_threshold:g}), KS {self.ks:.3f}, "
                 f"{self.items:g} scores"]
        if self.flag_rate is not None:
            parts.append(f"flag rate {self.flag_rate:.4f} (band {self.band[0]:.4f}-{self.band[1]:.4f})")
        if self.drift_alarm:
            parts.append("SCORE DRIFT")
        if self.band_alarm:
            parts.append("FLAG RATE OUT OF BAND")
        return "; ".join(parts)


def evaluate(ref: Reference, window: Window, *, psi_threshold: float = DEFAULT_PSI_THRESHOLD,
             min_items: int = DEFAULT_MIN_ITEMS, n_bins: int = DEFAULT_BINS, where: str = "the reference file") -> Verdict:
    check_layout(ref, list(window.buckets), where, window.source or "the server")
    _, counts = per_bucket(window.buckets)
    n = float(counts.sum())
    rate = window.flagged / window.scored if window.scored else None
    judged = n >= min_items and n > 0
    value = k = None
    if judged:
        edges = bins_for(np.array(ref.counts), n_bins)
        value = psi(coarsen(ref.counts, edges), coarsen(counts, edges))
        k = ks(np.array(ref.counts), counts)
    band_alarm = judged and window.scored > 0 and out_of_band(window.flagged, window.scored, ref.band)
    return Verdict(reference=ref.key, items=n, psi=value, ks=k, psi_threshold=psi_threshold, flag_rate=rate,
                   band=ref.band, judged=judged, drift_alarm=bool(judged and value > psi_threshold),
                   band_alarm=bool(band_alarm), bins=n_bins, seconds=window.seconds)


# ------------------------------------------------------------------------------------------
# Which version serves


def served_version(url: str, step: str, timeout: float = 10.0) -> tuple[str, str]:
    """(scored model, version) for the step: the step's `model_name` parameter, and its
    `model_version` parameter or else the newest version of that model the server has ready
    (Triton's default version policy serves the newest)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as client:
            config = client.get_model_config(step, as_json=True, client_timeout=timeout)["config"]
            params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
            model = params.get("model_name")
            if not model:
                raise DriftError(f"the step {step!r} at {url} has no model_name parameter: pass --version and --scored-model")
            if params.get("model_version"):
                return model, params["model_version"]
            versions = client.get_model_metadata(model, as_json=True, client_timeout=timeout).get("versions") or []
            ready = sorted((int(v) for v in versions if str(v).isdigit()
                            and client.is_model_ready(model, str(v), client_timeout=timeout)), reverse=True)
    except InferenceServerException as e:
        raise DriftError(f"cannot ask Triton at {url} which version of the step {step!r}'s model serves: "
                         f"{e.message() if hasattr(e, 'message') else e}") from None
    if not ready:
        raise DriftError(f"Triton at {url} has no version of {model!r} ready")
    return model, str(ready[0])


# ------------------------------------------------------------------------------------------
# The exporter (--serve-metrics)


class Exporter:
    """Gauges for Prometheus, on their own registry and port."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = ["model", "scored_model", "version"]
        self.drift = Gauge("triton_al_score_drift", "PSI of the recent score window against the version's reference",
                           labels, registry=self.registry)
        self.ks = Gauge("triton_al_score_drift_ks", "KS distance of the recent score window to the reference", labels,
                        registry=self.registry)
        self.out_of_band = Gauge("triton_al_flag_rate_out_of_band",
                                 "1 when the window's flag rate is outside the reference's band", labels, registry=self.registry)
        self.flag_rate = Gauge("triton_al_drift_flag_rate", "Flag rate in the last judged window", labels, registry=self.registry)
        self.band = Gauge("triton_al_drift_flag_rate_band", "The reference's flag-rate band", labels + ["edge"],
                          registry=self.registry)
        self.items = Gauge("triton_al_drift_window_items", "Scores in the last window", labels, registry=self.registry)
        self.up = Gauge("triton_al_drift_up", "1 when the last check could be made (server read, reference found)",
                        ["model"], registry=self.registry)
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)
        self.port = self.server.server_port
        self._labels: tuple[str, str, str] | None = None

    def publish(self, step: str, model: str, version: str, verdict: Verdict) -> None:
        labels = (step, model, str(version))
        if self._labels is not None and self._labels != labels:
            self.forget()
        self._labels = labels
        self.up.labels(step).set(1)
        self.items.labels(*labels).set(verdict.items)
        self.band.labels(*labels, "low").set(verdict.band[0])
        self.band.labels(*labels, "high").set(verdict.band[1])
        if verdict.judged:
            self.drift.labels(*labels).set(verdict.psi)
            self.ks.labels(*labels).set(verdict.ks)
            self.out_of_band.labels(*labels).set(1 if verdict.band_alarm else 0)
            if verdict.flag_rate is not None:
                self.flag_rate.labels(*labels).set(verdict.flag_rate)

    def forget(self) -> None:
        """Drop the series of the previous version (its alarms must not outlive it)."""
        if self._labels is None:
            return
        for g in (self.drift, self.ks, self.out_of_band, self.flag_rate, self.items):
            try:
                g.remove(*self._labels)
            except KeyError:
                pass
        for edge in ("low", "high"):
            try:
                self.band.remove(*self._labels, edge)
            except KeyError:
                pass
        self._labels = None

    def failed(self, step: str) -> None:
        self.up.labels(step).set(0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------
# The command: `triton-al drift` (check once, or --watch / --serve-metrics) and `drift record`

import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

drift_app = typer.Typer(help="Score drift: the recent score distribution against the served version's reference.",
                        invoke_without_command=True)

ReferenceOpt = Annotated[Optional[Path], typer.Option("--reference", help="The reference file (JSON; one reference per step, model and version).")]
MetricsUrls = Annotated[Optional[list[str]], typer.Option("--metrics-url", help="Triton's /metrics URL; repeat it for every replica (their histograms are added up).")]
PrometheusUrl = Annotated[Optional[str], typer.Option(help="Instead of --metrics-url: one Prometheus scraping every replica (base URL).")]
PrometheusSelector = Annotated[Optional[str], typer.Option(help='Extra label matchers for the Prometheus queries, e.g. namespace="prod".')]
GrpcUrl = Annotated[str, typer.Option("--url", help="Triton's gRPC address, asked which version of the scored model is ready.")]
VersionOpt = Annotated[Optional[str], typer.Option("--version", help="The served version, instead of asking --url (needs --scored-model).")]
ScoredModel = Annotated[Optional[str], typer.Option(help="With --version: the model the step scores.")]
StepOpt = Annotated[str, typer.Option(help="The step model's name (the `model` label of its metrics).")]
MinItems = Annotated[int, typer.Option(min=1, help="Scores a window (or a reference) needs before it is judged.")]


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(2)


class _Source:
    """Where the step's numbers come from, and which version serves."""

    def __init__(self, metrics_url, prometheus_url, prometheus_selector, url, version, scored_model, step) -> None:
        if bool(metrics_url) == bool(prometheus_url):
            raise DriftError("give --metrics-url (repeat it for each replica) or --prometheus-url, exactly one of them")
        if version is not None and not scored_model:
            raise DriftError("--version needs --scored-model (the model the step scores)")
        self.metrics_url, self.prometheus_url, self.selector = metrics_url, prometheus_url, prometheus_selector
        self.url, self.version, self.scored_model, self.step = url, version, scored_model, step

    def served(self) -> tuple[str, str]:
        if self.version is not None:
            return self.scored_model, str(self.version)
        return served_version(self.url, self.step)

    def scrape(self) -> list[ScoreSnapshot]:
        from triton_al.calibrate import scrape_fleet

        try:
            return scrape_fleet(self.metrics_url, model=self.step)
        except CalibrationError as e:
            raise DriftError(str(e)) from None

    def window(self, seconds: float, wait=time.sleep) -> Window:
        """The window of the last `seconds` (0: everything counted since the servers started)."""
        try:
            if self.prometheus_url:
                from triton_al.calibrate import prometheus_snapshot

                snap = prometheus_snapshot(self.prometheus_url, self.step, seconds, self.selector)
                w = window_of(None, [snap])
                return Window(w.buckets, w.scored, w.flagged, seconds or None, self.prometheus_url)
            if seconds <= 0:
                return window_of(None, self.scrape())
            before = self.scrape()
            print(f"scraped {len(before)} replica(s); the window closes in {seconds:g} s", file=sys.stderr, flush=True)
            wait(seconds)
            return window_of(before, self.scrape())
        except CalibrationError as e:
            raise DriftError(str(e)) from None


@drift_app.callback()
def drift_command(
    ctx: typer.Context,
    reference: ReferenceOpt = None,
    metrics_url: MetricsUrls = None,
    prometheus_url: PrometheusUrl = None,
    prometheus_selector: PrometheusSelector = None,
    url: GrpcUrl = "127.0.0.1:8001",
    version: VersionOpt = None,
    scored_model: ScoredModel = None,
    step: StepOpt = "active_learning",
    window: Annotated[float, typer.Option(help="Seconds between the two scrapes (the window; with --watch it grows until it holds --min-items). With --prometheus-url: the range it looks back.")] = 60.0,
    min_items: MinItems = DEFAULT_MIN_ITEMS,
    psi_threshold: Annotated[float, typer.Option(help="Alarm when the window's PSI against the reference is above this.")] = DEFAULT_PSI_THRESHOLD,
    bins: Annotated[int, typer.Option(min=2, help="PSI bins (each about 1/BINS of the reference's scores).")] = DEFAULT_BINS,
    fail_on_alarm: Annotated[bool, typer.Option(help="Exit 1 when the window alarms (drift or flag rate out of band).")] = False,
    watch: Annotated[bool, typer.Option(help="Keep checking, one window after the other, until stopped (SIGTERM/SIGINT).")] = False,
    serve_metrics: Annotated[Optional[int], typer.Option(help="Export the gauges (triton_al_score_drift, triton_al_flag_rate_out_of_band, ...) for Prometheus on this port (0: any free one); implies --watch.")] = None,
    serve_address: Annotated[str, typer.Option(help="Address the gauges listen on.")] = "127.0.0.1",
    record_first: Annotated[Optional[int], typer.Option(help="With --watch: when the served version has no reference, record its first N scores as the reference.")] = None,
    ports_file: Annotated[Optional[Path], typer.Option(help="With --serve-metrics: write {\"metrics\": PORT} here once listening.")] = None,
) -> None:
    """Compare the recent score window with the served version's reference (PSI, KS) and the flag rate with its
    band; print the verdict as JSON. `triton-al drift record` records a reference."""
    if ctx.invoked_subcommand is not None:
        return
    if reference is None:
        _fail("triton-al drift: --reference FILE is required (record one with `triton-al drift record`)")
    if window < 0:
        _fail(f"triton-al drift: --window {window}: expected seconds >= 0")
    if psi_threshold <= 0:
        _fail(f"triton-al drift: --psi-threshold {psi_threshold}: expected a positive number")
    watch = watch or serve_metrics is not None
    if record_first is not None and not watch:
        _fail("triton-al drift: --record-first needs --watch (or --serve-metrics)")
    try:
        source = _Source(metrics_url, prometheus_url, prometheus_selector, url, version, scored_model, step)
        if not watch:
            model, served = source.served()
            ref = find_reference(load_references(reference), reference, step, model, served)  # before waiting
            w = source.window(window)
            verdict = evaluate(ref, w, psi_threshold=psi_threshold, min_items=min_items, n_bins=bins, where=str(reference))
        else:
            _watch(source, reference, window, min_items, psi_threshold, bins, serve_metrics, serve_address, record_first,
                   ports_file)
            return
    except (DriftError, OSError) as e:
        _fail(f"triton-al drift: {e}")
    typer.echo(json.dumps(verdict.to_json()))
    typer.echo(verdict.describe(), err=True)
    if fail_on_alarm and verdict.alarm:
        raise typer.Exit(1)


@drift_app.command("record")
def drift_record_command(
    reference: Annotated[Path, typer.Option("--reference", help="The reference file to add this version's reference to (created if missing).")],
    metrics_url: MetricsUrls = None,
    prometheus_url: PrometheusUrl = None,
    prometheus_selector: PrometheusSelector = None,
    url: GrpcUrl = "127.0.0.1:8001",
    version: VersionOpt = None,
    scored_model: ScoredModel = None,
    step: StepOpt = "active_learning",
    window: Annotated[float, typer.Option(help="0: every score counted since the server started (e.g. right after a deploy's first traffic); else the scores of a window of this many seconds.")] = 0.0,
    min_items: MinItems = 1000,
    flag_rate_band: Annotated[Optional[str], typer.Option(help="LOW:HIGH, the flag rate to expect (e.g. around calibrate's target); default: half to twice the reference's own.")] = None,
) -> None:
    """Record the served version's reference score distribution (and its flag-rate band)."""
    if window < 0:
        _fail(f"triton-al drift record: --window {window}: expected seconds >= 0")
    try:
        band = parse_band(flag_rate_band) if flag_rate_band else None
        if reference.exists():
            load_references(reference)  # refuse to overwrite a file that is not ours
        source = _Source(metrics_url, prometheus_url, prometheus_selector, url, version, scored_model, step)
        model, served = source.served()
        w = source.window(window)
        how = f"window of {window:g} s" if window else "cumulative since the server started"
        ref = make_reference(w, step, model, served, band=band, min_items=min_items, how=how)
        save_reference(reference, ref)
    except (DriftError, OSError) as e:
        _fail(f"triton-al drift record: {e}")
    body = ref.to_json()
    body.pop("bounds")
    body.pop("counts")
    typer.echo(json.dumps({"recorded": ref.key, "reference": str(reference), **body}))


def _watch(source: _Source, reference: Path, window: float, min_items: int, psi_threshold: float, bins: int,
           serve_metrics: int | None, serve_address: str, record_first: int | None, ports_file: Path | None) -> None:
    if source.prometheus_url:
        raise DriftError("--watch reads replicas' /metrics (--metrics-url); with Prometheus, evaluate the alert rules there")
    if window <= 0:
        raise DriftError("--watch needs --window > 0")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    exporter = Exporter(serve_metrics, serve_address) if serve_metrics is not None else None
    if exporter is not None:
        print(f"drift gauges on http://{serve_address}:{exporter.port}/metrics", file=sys.stderr, flush=True)
        if ports_file is not None:
            ports_file.write_text(json.dumps({"metrics": exporter.port}))
    start: list[ScoreSnapshot] | None = None
    served: tuple[str, str] | None = None
    try:
        while True:
            try:
                now_served = source.served()
                after = source.scrape()
                if now_served != served or start is None:
                    if served is not None and now_served != served:
                        print(f"now serving {now_served[0]} version {now_served[1]}: a new window starts", file=sys.stderr, flush=True)
                        if exporter is not None:
                            exporter.forget()
                    served, start = now_served, after
                    print(f"a window starts for {served[0]} version {served[1]}", file=sys.stderr, flush=True)
                else:
                    try:
                        w = window_of(start, after)
                    except CalibrationError as e:  # a restart: counting starts again
                        print(f"window dropped: {e}", file=sys.stderr, flush=True)
                        start = after
                    else:
                        refs = load_references(reference) if reference.exists() or record_first is None else {}
                        k = key(source.step, *served)
                        if k not in refs and record_first is not None:
                            if w.scored >= record_first:
                                ref = make_reference(w, source.step, *served, min_items=record_first,
                                                     how=f"first {w.scored:g} scores seen after version {served[1]} was ready")
                                save_reference(reference, ref)
                                print(json.dumps({"recorded": k, "scores": sum(ref.counts)}), flush=True)
                                start = after
                        else:
                            ref = find_reference(refs, reference, source.step, *served)
                            verdict = evaluate(ref, w, psi_threshold=psi_threshold, min_items=min_items, n_bins=bins,
                                               where=str(reference))
                            if exporter is not None:
                                exporter.publish(source.step, *served, verdict)
                            if verdict.judged:
                                print(json.dumps(verdict.to_json()), flush=True)
                                print(verdict.describe(), file=sys.stderr, flush=True)
                                start = after
            except (DriftError, OSError) as e:
                print(f"triton-al drift: {e}", file=sys.stderr, flush=True)
                if exporter is not None:
                    exporter.failed(source.step)
            if stop.wait(window):
                return
    finally:
        if exporter is not None:
            exporter.close()


def register(app: typer.Typer) -> None:
    app.add_typer(drift_app, name="drift")
