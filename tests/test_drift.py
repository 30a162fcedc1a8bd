"""Score drift alarm (issue 15): the statistic (PSI over reference-quantile bins of the step's
0.01 buckets, Jeffreys smoothing; KS) on known values; the reference file and the errors of bad
input; and on the example served by a real tritonserver (the native step): the false-alarm
rate of test-set traffic and the detection of shifted traffic (inverted, rotated, noised,
random-noise images), measured on the scores the served model returned, then the command
itself against the live server (record, check with --fail-on-alarm, the gauges it exports for
the alerting rules, a new version without a reference).

`pytest tests/test_drift.py -s -k measured` prints the numbers benchmarks/RESULTS.md quotes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from triton_al.drift import (DEFAULT_MIN_ITEMS, DEFAULT_PSI_THRESHOLD, DriftError, Reference, Window, bins_for, coarsen,
                             evaluate, histogram, ks, load_references, make_reference, out_of_band, per_bucket, psi,
                             save_reference, wilson)

BOUNDS = [round(0.01 * i, 2) for i in range(1, 101)] + [math.inf]
STEP = "active_learning"


def window(scores, flagged: float = 0.0, bounds=BOUNDS, scored: float | None = None) -> Window:
    return Window(buckets=histogram(np.asarray(scores), bounds), scored=len(scores) if scored is None else scored,
                  flagged=flagged, source="test")


def reference(scores, flagged: float = 0.0, version: str = "1", bounds=BOUNDS, band=None) -> Reference:
    return make_reference(window(scores, flagged, bounds), STEP, "fashion_cnn", version, band=band, min_items=1)


# --------------------------------------------------------------------------------------------
# The statistic


def test_psi_known_values():
    # Two bins, 50/50 against 90/10. Without smoothing: 0.4 ln 1.8 + 0.4 ln 5.
    assert psi(np.array([50, 50]), np.array([90, 10]), smoothing=0) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5))
    # With the default 0.5 pseudo-count per bin: shares 50.5/101 and 90.5/101, 10.5/101.
    p, q = np.array([0.5, 0.5]), np.array([90.5, 10.5]) / 101
    assert psi(np.array([50, 50]), np.array([90, 10])) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    assert psi(np.array([50, 50]), np.array([90, 10])) == pytest.approx(0.85306, abs=1e-4)
    # Symmetric in its two arguments.
    assert psi(np.array([3, 7, 0]), np.array([5, 1, 9])) == pytest.approx(psi(np.array([5, 1, 9]), np.array([3, 7, 0])))


def test_identical_distributions_give_zero():
    counts = np.array([0, 4, 10, 0, 7, 1], dtype=float)
    assert psi(counts, counts) == 0.0
    assert ks(counts, counts) == 0.0
    rng = np.random.default_rng(0)
    scores = rng.beta(5, 1, size=3000)
    v = evaluate(reference(scores), window(scores), min_items=1)
    assert v.psi == 0.0 and v.ks == 0.0 and not v.alarm and v.judged


def test_empty_buckets_are_smoothed_not_infinite():
    p, q = np.array([100.0, 0.0]), np.array([0.0, 100.0])
    value = psi(p, q)
    # shares (100.5/101, 0.5/101) against the reverse: 2 (100/101) ln(201)
    assert value == pytest.approx(2 * (100 / 101) * math.log(201))
    assert math.isfinite(value)
    with pytest.raises(DriftError, match="infinite when a bin is empty"):
        psi(p, q, smoothing=0)
    with pytest.raises(DriftError, match="same bins"):
        psi(np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0]))


def test_ks_known_values():
    assert ks(np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1])) == 1.0
    assert ks(np.array([2, 2]), np.array([3, 1])) == pytest.approx(0.25)
    with pytest.raises(DriftError, match="empty"):
        ks(np.array([0, 0]), np.array([1, 1]))


def test_bins_hold_about_a_tenth_of_the_reference_each():
    rng = np.random.default_rng(1)
    _, counts = per_bucket(histogram(rng.beta(2, 2, size=20_000), BOUNDS))
    edges = bins_for(counts, 10)
    shares = coarsen(counts, edges) / counts.sum()
    assert len(shares) == 10 and shares.sum() == pytest.approx(1.0)
    assert all(0.08 < s < 0.12 for s in shares), shares
    # One bucket holding 60% of the scores: it is one bin, the rest are split around it.
    scores = np.concatenate([np.full(6000, 0.995), rng.uniform(size=4000)])
    _, counts = per_bucket(histogram(scores, BOUNDS))
    edges = bins_for(counts, 10)
    shares = coarsen(counts, edges) / counts.sum()
    assert max(shares) >= 0.6 and len(shares) < 10
    assert edges[0] == 0 and edges[-1] == len(counts)


def test_a_shift_gives_a_large_psi_and_the_same_distribution_a_small_one():
    rng = np.random.default_rng(2)
    ref = reference(rng.beta(5, 1, size=5000))
    same = evaluate(ref, window(rng.beta(5, 1, size=500)))
    shifted = evaluate(ref, window(rng.beta(2, 1, size=500)))
    assert same.psi < 0.05 and not same.drift_alarm
    assert shifted.psi > DEFAULT_PSI_THRESHOLD and shifted.drift_alarm and shifted.ks > 0.2


def test_a_small_window_is_not_judged():
    rng = np.random.default_rng(3)
    ref = reference(rng.beta(5, 1, size=5000))
    v = evaluate(ref, window(rng.uniform(size=DEFAULT_MIN_ITEMS - 1)))
    assert not v.judged and v.psi is None and not v.alarm
    assert "not judged" in v.describe()


def test_flag_rate_band_uses_the_windows_interval():
    assert wilson(0, 100)[0] == 0.0 and wilson(100, 100)[1] == pytest.approx(1.0)
    band = (0.025, 0.10)
    assert not out_of_band(10, 200, band)  # 5%: inside
    assert not out_of_band(25, 200, band)  # 12.5%, but 200 items cannot tell it from 10%
    assert out_of_band(60, 200, band)  # 30%
    assert out_of_band(0, 2000, band)  # nothing flagged out of 2,000
    rng = np.random.default_rng(4)
    ref = reference(rng.uniform(size=2000), flagged=100)  # 5%: band 2.5%-10%
    assert ref.band == pytest.approx((0.025, 0.10))
    v = evaluate(ref, window(rng.uniform(size=400), flagged=120))
    assert v.band_alarm and v.alarm and not v.drift_alarm and "FLAG RATE OUT OF BAND" in v.describe()


# --------------------------------------------------------------------------------------------
# The reference file and bad input


def test_reference_file_keeps_one_reference_per_version(tmp_path):
    path = tmp_path / "refs.json"
    rng = np.random.default_rng(5)
    save_reference(path, reference(rng.uniform(size=300), version="1"))
    save_reference(path, reference(rng.beta(5, 1, size=400), flagged=8, version="2", band=(0.01, 0.05)))
    refs = load_references(path)
    assert sorted(refs) == [f"{STEP}/fashion_cnn/1", f"{STEP}/fashion_cnn/2"]
    two = refs[f"{STEP}/fashion_cnn/2"]
    assert sum(two.counts) == 400 and two.flag_rate == pytest.approx(0.02) and two.band == (0.01, 0.05)
    assert two.bounds == BOUNDS
    save_reference(path, reference(rng.uniform(size=500), version="1"))  # replaced, not added
    assert sum(load_references(path)[f"{STEP}/fashion_cnn/1"].counts) == 500


def test_bad_input_says_what_was_wrong(tmp_path):
    with pytest.raises(DriftError, match=r"reference file .*missing.json does not exist: record one with `triton-al drift record"):
        load_references(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"references": []}))
    with pytest.raises(DriftError, match="expected format 'triton-al-drift-reference/1'"):
        load_references(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DriftError, match="not readable JSON"):
        load_references(tmp_path / "broken.json")
    coarse = [round(0.05 * i, 2) for i in range(1, 21)] + [math.inf]
    ref = reference(np.linspace(0, 1, 300), bounds=coarse)
    with pytest.raises(DriftError, match=r"has 21 buckets \(0.05, 0.1 .. \+Inf\) but test exports 101 \(0.01, 0.02 .. \+Inf\).*another bucket layout"):
        evaluate(ref, window(np.linspace(0, 1, 300)))
    with pytest.raises(DriftError, match="only 10 scores"):
        make_reference(window(np.linspace(0, 1, 10)), STEP, "m", "1", min_items=100)


def snapshot_of(scores, source: str, at: float, flagged: dict | None = None):
    """One replica's scrape, as prometheus_client writes the exposition text."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from triton_al.calibrate import parse_metrics

    registry = CollectorRegistry()
    h = Histogram("triton_al_score", "scores", ["model"], buckets=BOUNDS[:-1], registry=registry)
    c = Counter("triton_al_items_scored", "scored", ["model"], registry=registry)
    f = Counter("triton_al_items_flagged", "flagged", ["model", "reason"], registry=registry)
    for x in scores:
        h.labels(model=STEP).observe(float(x))
    c.labels(model=STEP).inc(len(scores))
    for reason, n in (flagged or {}).items():
        f.labels(model=STEP, reason=reason).inc(n)
    return parse_metrics(generate_latest(registry).decode(), model=STEP, at=at, source=source)


def test_a_fleets_window_adds_each_replicas_difference():
    from triton_al.drift import window_of

    rng = np.random.default_rng(9)
    a0, a1, b0, b1 = (rng.uniform(size=n) for n in (100, 300, 50, 200))
    before = [snapshot_of(a0, "a", 0.0, {"uncertain": 5}), snapshot_of(b0, "b", 0.0, {"uncertain": 1})]
    after = [snapshot_of(np.concatenate([a0, a1]), "a", 60.0, {"uncertain": 20, "invalid_output": 7}),
             snapshot_of(np.concatenate([b0, b1]), "b", 60.0, {"uncertain": 4, "random": 2})]
    w = window_of(before, after)
    assert w.scored == 500 and w.flagged == (20 - 5) + (4 - 1) + 2  # invalid_output is not the flag rate's
    assert w.buckets == pytest.approx(histogram(np.concatenate([a1, b1]), BOUNDS))
    with pytest.raises(Exception, match=r"a: its counters went down"):
        window_of([after[0]], [snapshot_of(a0[:10], "a", 90.0)])


def cli(*args: str):
    from typer.testing import CliRunner

    from triton_al.cli import app

    return CliRunner().invoke(app, list(args))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "refs.json"
    save_reference(path, reference(rng.uniform(size=300)))
    port = closed_port()
    r = cli("drift", "--reference", str(path), "--metrics-url", f"http://127.0.0.1:{port}/metrics", "--version", "1",
            "--scored-model", "fashion_cnn", "--window", "0")
    assert r.exit_code == 2 and f"http://127.0.0.1:{port}/metrics: unreachable" in r.output
    r = cli("drift", "--reference", str(path), "--metrics-url", "http://127.0.0.1:1/metrics", "--url", f"127.0.0.1:{port}")
    assert r.exit_code == 2 and f"cannot ask Triton at 127.0.0.1:{port} which version" in r.output
    r = cli("drift", "--metrics-url", "http://127.0.0.1:1/metrics")
    assert r.exit_code == 2 and "--reference FILE is required" in r.output
    r = cli("drift", "--reference", str(tmp_path / "none.json"), "--metrics-url", "http://127.0.0.1:1/metrics",
            "--version", "1", "--scored-model", "fashion_cnn")
    assert r.exit_code == 2 and "none.json does not exist" in r.output
    r = cli("drift", "--reference", str(path), "--metrics-url", "http://127.0.0.1:1/metrics", "--version", "3",
            "--scored-model", "fashion_cnn")
    assert r.exit_code == 2 and f"no reference for step 'active_learning', model 'fashion_cnn' version 3 in {path}" in r.output
    r = cli("drift", "--reference", str(path), "--metrics-url", "http://127.0.0.1:1/metrics", "--version", "1")
    assert r.exit_code == 2 and "--version needs --scored-model" in r.output
    r = cli("drift", "record", "--reference", str(path), "--metrics-url", "http://127.0.0.1:1/metrics", "--version", "1",
            "--scored-model", "m", "--flag-rate-band", "0.3:0.1")
    assert r.exit_code == 2 and "expected 0 <= LOW <= HIGH <= 1" in r.output


# --------------------------------------------------------------------------------------------
# On the example served by a real tritonserver

N_REFERENCE = 2000
N_SHIFTED = 1000


def shifted_sets(images: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    base = images[:N_SHIFTED]
    return {
        "inverted": 255 - base,
        "rotated 90°": np.ascontiguousarray(np.rot90(base, axes=(1, 2))),
        "gaussian noise (sd 60) added": np.clip(base.astype(float) + rng.normal(0, 60, base.shape), 0, 255).astype(np.uint8),
        "random-noise images": rng.integers(0, 256, base.shape, dtype=np.uint8),
    }


def pngs_of(images: np.ndarray) -> np.ndarray:
    from triton_al.example.data import encode_png

    return np.array([[encode_png(x)] for x in images], dtype=object)


def send(client, pngs: np.ndarray) -> np.ndarray:
    from triton_helpers import infer_al

    return np.concatenate([infer_al(client, pngs[i:i + 64])[1] for i in range(0, len(pngs), 64)])


def scored_total(server) -> float:
    from triton_helpers import metric_sum, triton_metrics

    return metric_sum(triton_metrics(server), "triton_al_items_scored_total", model=STEP)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The example served by a real tritonserver (native step, threshold 0.5 as shipped). The
    first 2,000 test images are sent and recorded as version 1's reference by `triton-al drift
    record` (cumulative); then the rest of the test set and 1,000 images of each shift are sent,
    keeping the scores the server returned."""
    from outbox_helpers import wait_for
    from triton_helpers import copy_repository, grpcclient

    from triton_al.example.data import load
    from triton_al.serving.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("drift")
    repository = copy_repository(tmp)
    images, _ = load("test")
    test_pngs = pngs_of(images)
    shifted = {name: pngs_of(x) for name, x in shifted_sets(images).items()}
    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", STEP]
    with Pipeline(repository, tmp / "data", uploader=False, model_control_mode="explicit", load_models=models) as p:
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            reference_scores = send(client, test_pngs[:N_REFERENCE])
            wait_for(lambda: scored_total(p.server) == N_REFERENCE, 15, "the reference traffic in the step's metrics")
            refs = tmp / "drift-reference.json"
            r = cli("drift", "record", "--reference", str(refs), "--metrics-url", p.server.metrics_url,
                    "--url", p.server.grpc_url, "--min-items", "1000")
            assert r.exit_code == 0, r.output
            recorded = json.loads(r.stdout)
            rest = send(client, test_pngs[N_REFERENCE:])
            shifted_scores = {name: send(client, x) for name, x in shifted.items()}
        total = len(images) + N_SHIFTED * len(shifted)
        wait_for(lambda: scored_total(p.server) == total, 15, "all traffic in the step's metrics")
        yield {"pipeline": p, "repository": repository, "reference_file": refs, "recorded": recorded,
               "reference_scores": reference_scores, "test_scores": rest, "shifted_scores": shifted_scores,
               "test_pngs": test_pngs, "shifted_pngs": shifted, "threshold": 0.5}


def test_record_keys_the_reference_by_the_served_version(served):
    assert served["recorded"]["recorded"] == f"{STEP}/fashion_cnn/1"
    ref = load_references(served["reference_file"])[f"{STEP}/fashion_cnn/1"]
    assert sum(ref.counts) == N_REFERENCE and ref.scored == N_REFERENCE
    # The live histogram is the histogram of the scores the server returned (bucket by bucket,
    # within one count for scores on a bound).
    _, own = per_bucket(histogram(served["reference_scores"], ref.bounds))
    assert np.abs(np.array(ref.counts) - own).sum() <= 2
    assert ref.flagged == int((served["reference_scores"] < served["threshold"]).sum())


def windows_psi(ref: Reference, pool: np.ndarray, n: int, threshold: float, shuffles: int = 0, seed: int = 0):
    """(PSI, band alarm) of every disjoint window of n scores of the pool, in order, and then
    of `shuffles` random orders (each cut into disjoint windows)."""
    rng = np.random.default_rng(seed)
    orders = [pool] + [rng.permutation(pool) for _ in range(shuffles)]
    out = []
    for order in orders:
        for i in range(0, len(order) - n + 1, n):
            w = order[i:i + n]
            v = evaluate(ref, window(w, flagged=float((w < threshold).sum())), min_items=n)
            out.append((v.psi, v.band_alarm))
    return out


def test_measured_false_alarms_and_detection_delay(served):
    """Windows of test-set traffic (the 8,000 images after the reference) against the
    recorded reference: the false-alarm rate; windows of each shift: the share that alarms,
    per window size."""
    ref = load_references(served["reference_file"])[f"{STEP}/fashion_cnn/1"]
    t = served["threshold"]
    report = {"psi_threshold": DEFAULT_PSI_THRESHOLD, "reference_items": sum(ref.counts),
              "reference_flag_rate": ref.flag_rate, "band": ref.band, "false_alarms": {}, "detection": {}}
    for n in (50, 100, 200, 500):
        ordered = windows_psi(ref, served["test_scores"], n, t)
        many = windows_psi(ref, served["test_scores"], n, t, shuffles=25)
        values = np.array([v for v, _ in many])
        report["false_alarms"][n] = {
            "disjoint_windows_in_order": len(ordered),
            "psi_alarms_in_order": sum(v > DEFAULT_PSI_THRESHOLD for v, _ in ordered),
            "windows_with_shuffles": len(many),
            "psi_alarm_rate": float((values > DEFAULT_PSI_THRESHOLD).mean()),
            "band_alarm_rate": float(np.mean([b for _, b in many])),
            "psi_p50": float(np.quantile(values, 0.5)), "psi_p99": float(np.quantile(values, 0.99)),
            "psi_max": float(values.max()),
        }
        report["detection"][n] = {}
        for name, scores in served["shifted_scores"].items():
            shifted = windows_psi(ref, scores, n, t)
            report["detection"][n][name] = {
                "windows": len(shifted), "alarmed": sum(v > DEFAULT_PSI_THRESHOLD or b for v, b in shifted),
                "psi_min": float(min(v for v, _ in shifted)), "band_alarms": sum(b for _, b in shifted),
                "flag_rate": float((scores < t).mean()),
            }
    # Windows of 200 in which only a share of the traffic is shifted (the rest from the test set).
    rng = np.random.default_rng(8)
    report["mixed"] = {}
    for share in (0.1, 0.25, 0.5):
        k = int(DEFAULT_MIN_ITEMS * share)
        report["mixed"][share] = {}
        for name, scores in served["shifted_scores"].items():
            alarmed = []
            for _ in range(100):
                w = np.concatenate([rng.choice(scores, k, replace=False),
                                    rng.choice(served["test_scores"], DEFAULT_MIN_ITEMS - k, replace=False)])
                v = evaluate(ref, window(w, flagged=float((w < t).sum())))
                alarmed.append(v.alarm)
            report["mixed"][share][name] = float(np.mean(alarmed))
    print("\nDRIFT MEASUREMENT " + json.dumps(report, indent=1, default=float))
    at = report["false_alarms"][DEFAULT_MIN_ITEMS]
    # The default window (200 scores) at PSI > 0.2: no false alarm in order, under 1% shuffled.
    assert at["psi_alarms_in_order"] == 0 and at["disjoint_windows_in_order"] == 40
    assert at["psi_alarm_rate"] < 0.01 and at["band_alarm_rate"] < 0.01
    # Every window of 200 scores of every shift alarms: detected within one window.
    for name, d in report["detection"][DEFAULT_MIN_ITEMS].items():
        assert d["alarmed"] == d["windows"] == N_SHIFTED // DEFAULT_MIN_ITEMS, (name, d)
    # The statistic separates: the smallest shifted PSI is far above the largest in-distribution one.
    assert min(d["psi_min"] for d in report["detection"][DEFAULT_MIN_ITEMS].values()) > 2 * at["psi_max"]


@contextlib.contextmanager
def drift_process(*args: str):
    """`triton-al drift ...` as a child process, stopped by its PID."""
    proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "drift", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()


def check_live(served, pngs: np.ndarray) -> tuple[int, dict, str]:
    """One `triton-al drift --fail-on-alarm` run against the live server, with PNGS sent inside
    its window."""
    from triton_helpers import grpcclient

    p = served["pipeline"]
    with drift_process("--reference", str(served["reference_file"]), "--metrics-url", p.server.metrics_url,
                       "--url", p.server.grpc_url, "--window", "8", "--fail-on-alarm") as proc:
        line = proc.stderr.readline()
        assert "the window closes in 8 s" in line, line + proc.stderr.read()
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            send(client, pngs)
        out, err = proc.communicate(timeout=60)
    print(f"\nLIVE rc={proc.returncode} {out.strip()}")
    return proc.returncode, json.loads(out), err


def test_live_test_set_traffic_does_not_alarm(served):
    rc, verdict, err = check_live(served, served["test_pngs"][N_REFERENCE:N_REFERENCE + 400])
    assert rc == 0, err
    assert verdict["judged"] and verdict["items"] == 400 and verdict["psi"] < DEFAULT_PSI_THRESHOLD
    assert verdict["reference"] == f"{STEP}/fashion_cnn/1" and not verdict["alarm"]


def test_live_inverted_images_alarm(served):
    rc, verdict, err = check_live(served, served["shifted_pngs"]["inverted"][:400])
    assert rc == 1, err
    assert verdict["items"] == 400 and verdict["drift_alarm"] and verdict["psi"] > DEFAULT_PSI_THRESHOLD
    assert "SCORE DRIFT" in err


def test_gauges_are_exported_and_the_alert_rules_name_them(served, tmp_path):
    """The watcher's gauges, scraped over HTTP; the alert rules on drift name only series (and
    labels) that it and Triton export (test_observability's own checker, fed this scrape)."""
    from outbox_helpers import wait_for
    from triton_helpers import grpcclient, triton_metrics

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_observability as obs

    p = served["pipeline"]
    ports = tmp_path / "ports.json"
    with drift_process("--reference", str(served["reference_file"]), "--metrics-url", p.server.metrics_url,
                       "--url", p.server.grpc_url, "--window", "1", "--serve-metrics", "0", "--ports-file", str(ports)) as proc:
        for line in proc.stderr:  # the gauges listen, then the first scrape opens a window
            if "a window starts for fashion_cnn version 1" in line or proc.poll() is not None:
                break
        assert proc.poll() is None and ports.exists(), proc.stderr.read()
        url = f"http://127.0.0.1:{json.loads(ports.read_text())['metrics']}/metrics"
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            send(client, served["shifted_pngs"]["random-noise images"][:300])

        def scraped():
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            return text if "triton_al_score_drift{" in text else None

        text = wait_for(scraped, 30, "a judged window in the gauges")
    series = obs.exported_series(text)
    labels = {"model": STEP, "scored_model": "fashion_cnn", "version": "1"}
    assert series["triton_al_score_drift"] == [labels]
    value = float(next(line for line in text.splitlines() if line.startswith("triton_al_score_drift{")).rsplit(" ", 1)[1])
    assert value > DEFAULT_PSI_THRESHOLD
    assert series["triton_al_flag_rate_out_of_band"] == [labels]
    rules = [(w, e) for w, e in obs.rule_expressions(obs.load_rules())
             if "triton_al_score_drift" in e or "triton_al_flag_rate_out_of_band" in e]
    assert {w for w, _ in rules} == {"rule TritonALScoreDrift", "rule TritonALFlagRateOutOfBand"}
    assert obs.name_problems(rules, obs.exported_series(text, triton_metrics(p.server))) == []
    assert obs.name_problems([(w, e.replace("scored_model", "served_model")) for w, e in rules],
                             obs.exported_series(text)) != []
    assert obs.rules_problems(obs.load_rules()) == []


def test_watch_records_the_first_scores_of_a_version_without_reference(served, tmp_path):
    """--record-first N: no reference file yet; the watcher records the first 300 scores it
    sees as version 1's reference, then judges the next windows against it."""
    from outbox_helpers import wait_for
    from triton_helpers import grpcclient

    p = served["pipeline"]
    refs = tmp_path / "first.json"
    with drift_process("--reference", str(refs), "--metrics-url", p.server.metrics_url, "--url", p.server.grpc_url,
                       "--window", "1", "--watch", "--record-first", "300") as proc:
        for line in proc.stderr:
            if "a window starts for fashion_cnn version 1" in line or proc.poll() is not None:
                break
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            send(client, served["test_pngs"][N_REFERENCE:N_REFERENCE + 320])
            wait_for(lambda: refs.exists(), 30, "the reference of the first scores")
            ref = load_references(refs)[f"{STEP}/fashion_cnn/1"]
            # Recorded at the first scrape holding 300 or more (the step hands its counts to
            # Triton once a second, so a scrape may fall inside the 320).
            assert 300 <= sum(ref.counts) <= 320 and f"first {sum(ref.counts):g} scores" in ref.how
            out: list[str] = []
            reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
            reader.start()
            send(client, served["test_pngs"][N_REFERENCE + 320:N_REFERENCE + 620])
        wait_for(lambda: any('"psi"' in x for x in out), 30, "a judged window")
    verdict = json.loads(next(x for x in out if '"psi"' in x))
    assert verdict["items"] >= DEFAULT_MIN_ITEMS and verdict["judged"] and not verdict["drift_alarm"]
    assert verdict["reference"] == f"{STEP}/fashion_cnn/1"


def test_through_prometheus_the_window_is_its_increase(served, tmp_path):
    """--prometheus-url: the window is Prometheus' increase over --window. A real Prometheus
    (Debian's) scrapes the served step every second while 300 inverted images are sent; the
    window then holds those 300 items (plus at most the extrapolation `increase` does at the
    range's edges: ≤ 1.6 scrape intervals of the traffic's rate) and alarms. A query
    Prometheus refuses comes from the stand-in of tests/test_calibrate.py (a real one cannot
    be made to refuse on demand)."""
    import time

    from outbox_helpers import wait_for
    from prometheus_helpers import running_prometheus
    from test_calibrate import FakePrometheus, http_server, series_of
    from triton_helpers import grpcclient, triton_metrics

    p = served["pipeline"]
    selector = f'model="{STEP}"'
    with running_prometheus(tmp_path / "prometheus", [(p.server.metrics_url, {"namespace": "prod", "pod": "triton-al-0"})]) as prom:
        started = time.monotonic()
        start = scored_total(p.server)
        prom.wait_for(f"sum(triton_al_items_scored_total{{{selector}}})", lambda v: v == start, 30, "the scores so far")
        time.sleep(2)  # a few scrapes before the traffic
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            send(client, served["shifted_pngs"]["inverted"][:300])
        wait_for(lambda: scored_total(p.server) == start + 300, 15, "the traffic in the step's metrics")
        prom.wait_for(f"sum(triton_al_items_scored_total{{{selector}}})", lambda v: v == start + 300, 30, "the traffic")
        span = time.monotonic() - started
        window = str(math.ceil(span) + 5)
        args = ["drift", "--reference", str(served["reference_file"]), "--prometheus-url", prom.url, "--prometheus-selector",
                'namespace="prod"', "--window", window, "--version", "1", "--scored-model", "fashion_cnn", "--fail-on-alarm"]
        r = cli(*args)
        assert r.exit_code == 1, r.output
        verdict = json.loads(r.stdout)
        assert 300 <= verdict["items"] <= 300 * (1 + 1.6 / span) + 1, (verdict, span)
        assert verdict["drift_alarm"] and verdict["psi"] > 1.0

    target = {"namespace": "prod", "pod": "triton-al-0", "instance": "10.0.0.1:8002", "job": "prod/triton-al"}
    fake = FakePrometheus(series_of(triton_metrics(p.server), target), series_of(triton_metrics(p.server), target))
    fake.error = "query timed out"
    with http_server(fake.answer) as url:
        args[args.index("--prometheus-url") + 1] = url
        r = cli(*args)
        assert r.exit_code == 2 and f"Prometheus at {url} refused the query" in r.output and "query timed out" in r.output


def test_calibrate_records_a_reference_with_the_calibrated_band(served, tmp_path):
    p = served["pipeline"]
    refs = tmp_path / "calibrated.json"
    r = cli("calibrate", "--metrics-url", p.server.metrics_url, "--flag-rate", "0.05", "--window", "0",
            "--url", p.server.grpc_url, "--drift-reference", str(refs))
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["drift_reference"] == f"{STEP}/fashion_cnn/1"
    ref = load_references(refs)[f"{STEP}/fashion_cnn/1"]
    assert ref.band == pytest.approx((0.025, 0.10)) and sum(ref.counts) == scored_total(p.server)
    r = cli("calibrate", "--metrics-url", p.server.metrics_url, "--flag-rate", "0.05", "--window", "0",
            "--url", f"127.0.0.1:{closed_port()}", "--drift-reference", str(tmp_path / "x.json"))
    assert r.exit_code == 2 and "the drift reference was not recorded (proposal: {" in r.output
    assert "which version" in r.output


def gauges(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_a_new_version_needs_its_own_reference(served, tmp_path):
    """Version 2 deployed (explicit model control) while a watcher runs: it starts a new
    window, drops version 1's gauges and records version 2's first scores (--record-first);
    the one-shot check refuses, naming the version; a reference recorded for it sits beside
    version 1's."""
    from outbox_helpers import wait_for
    from triton_helpers import grpcclient

    p, repository = served["pipeline"], served["repository"]
    watched, ports = tmp_path / "watched.json", tmp_path / "ports.json"
    shutil.copy(served["reference_file"], watched)
    with drift_process("--reference", str(watched), "--metrics-url", p.server.metrics_url, "--url", p.server.grpc_url,
                       "--window", "1", "--serve-metrics", "0", "--ports-file", str(ports), "--record-first", "200") as proc:
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
        wait_for(lambda: any("a window starts for fashion_cnn version 1" in x for x in err), 30, "the watcher's first window")
        url = f"http://127.0.0.1:{json.loads(ports.read_text())['metrics']}/metrics"
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            send(client, served["test_pngs"][N_REFERENCE:N_REFERENCE + 250])
            wait_for(lambda: 'triton_al_score_drift{model="active_learning",scored_model="fashion_cnn",version="1"}' in gauges(url),
                     30, "version 1 judged")
            shutil.copytree(repository / "fashion_cnn" / "1", repository / "fashion_cnn" / "2")
            client.load_model("fashion_cnn")
            wait_for(lambda: client.is_model_ready("fashion_cnn", "2") and not client.is_model_ready("fashion_cnn", "1"),
                     60, "version 2 serving alone")
            wait_for(lambda: any("now serving fashion_cnn version 2: a new window starts" in x for x in err), 30,
                     "the watcher to see version 2")
            assert "triton_al_score_drift{" not in gauges(url)  # version 1's alarms do not outlive it
            send(client, served["test_pngs"][N_REFERENCE + 250:N_REFERENCE + 500])
            wait_for(lambda: f"{STEP}/fashion_cnn/2" in load_references(watched), 30, "version 2's first scores recorded")
        # The first scrape holding 200 or more of version 2's scores (the step hands its counts
        # over once a second, so a scrape may fall inside the 250).
        assert 200 <= sum(load_references(watched)[f"{STEP}/fashion_cnn/2"].counts) <= 250
    refs = served["reference_file"]
    r = cli("drift", "--reference", str(refs), "--metrics-url", p.server.metrics_url, "--url", p.server.grpc_url, "--window", "0")
    assert r.exit_code == 2
    assert f"no reference for step 'active_learning', model 'fashion_cnn' version 2 in {refs} (it has: active_learning/fashion_cnn/1)" in r.output
    r = cli("drift", "record", "--reference", str(refs), "--metrics-url", p.server.metrics_url, "--url", p.server.grpc_url)
    assert r.exit_code == 0, r.output
    assert sorted(load_references(refs)) == [f"{STEP}/fashion_cnn/1", f"{STEP}/fashion_cnn/2"]
