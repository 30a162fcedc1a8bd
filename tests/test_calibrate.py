"""Threshold calibration from the step's score histogram (Prometheus exposition text made by
prometheus_client itself, as Triton's /metrics presents it); and over many replicas: their
histograms added up bucket by bucket, checked against two real tritonservers serving the
example (the fleet's numbers equal the sum of each replica's, read line by line from their
/metrics), refusals naming the replica (unreachable, other bucket bounds), and the
--prometheus-url path against a real Prometheus (Debian's) scraping both replicas; the
answers Prometheus gives only when something is wrong (a query refused, a replica scraped
by two jobs, other bucket bounds) come from a stand-in that evaluates the same queries
(FakePrometheus), because a real one cannot be made to give them on demand."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import promql_parser  # the test extra: promql-parser (the Prometheus stand-in parses the queries it is sent)
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from triton_al.calibrate import (CalibrationError, ScoreSnapshot, fleet_sum, parse_capacity, parse_metrics, prometheus_selector,
                                 propose, propose_fleet, scrape_fleet, threshold_for_fraction)

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


# --------------------------------------------------------------------------------------------
# Many replicas: the histograms added up bucket by bucket (no server)


def snapshot(scores, source: str, bounds=BUCKETS, at: float = 0.0, reasons: dict | None = None) -> ScoreSnapshot:
    registry = CollectorRegistry()
    h = Histogram("triton_al_score", "scores", ["model"], buckets=bounds, registry=registry)
    c = Counter("triton_al_items_scored", "scored", ["model"], registry=registry)
    f = Counter("triton_al_items_flagged", "flagged", ["model", "reason"], registry=registry)
    for s in scores:
        h.labels(model="active_learning").observe(float(s))
    c.labels(model="active_learning").inc(len(scores))
    for reason, n in (reasons or {}).items():
        f.labels(model="active_learning", reason=reason).inc(n)
    return parse_metrics(generate_latest(registry).decode(), model="active_learning", at=at, source=source)


def test_fleet_sum_adds_every_bucket_and_counter():
    rng = np.random.default_rng(2)
    a, b, c = rng.uniform(size=300), rng.beta(2, 5, size=500), rng.beta(5, 2, size=200)
    parts = [snapshot(a, "a", reasons={"uncertain": 7}), snapshot(b, "b", reasons={"uncertain": 5, "random": 2}),
             snapshot(c, "c")]
    total = fleet_sum(parts)
    whole = snapshot(np.concatenate([a, b, c]), "whole")
    assert total.buckets == pytest.approx(whole.buckets)
    assert total.scored == 1000 and total.replicas == 3
    assert total.flagged == 14 and total.flagged_by_reason == {"uncertain": 12, "random": 2}
    assert total.score_sum == pytest.approx(whole.score_sum)
    p = propose_fleet(None, parts, flag_rate=0.1)
    assert p.threshold == propose(None, whole, flag_rate=0.1).threshold and p.observed == 1000 and p.replicas == 3


def test_fleet_window_sums_each_replicas_delta_and_rate():
    rng = np.random.default_rng(3)
    a0, a1 = rng.uniform(size=100), rng.uniform(size=600)
    b0, b1 = rng.uniform(size=50), rng.uniform(size=300)
    before = [snapshot(a0, "a", at=0.0), snapshot(b0, "b", at=1.0)]
    after = [snapshot(np.concatenate([a0, a1]), "a", at=60.0), snapshot(np.concatenate([b0, b1]), "b", at=31.0)]
    p = propose_fleet(before, after, capacity_per_day=86_400)
    # a: 600 in 60 s, b: 300 in 30 s -> 20 items/s; 86,400 a day is 1 item/s: 5%.
    assert p.items_per_day == pytest.approx(20 * 86_400)
    assert p.flag_rate == pytest.approx(0.05) and p.observed == 900
    window = np.concatenate([a1, b1])
    assert abs((window < p.threshold).mean() - 0.05) < 0.01


def test_fleet_refuses_other_bounds_restarts_and_duplicates_naming_the_replica():
    rng = np.random.default_rng(4)
    scores = rng.uniform(size=100)
    other = [round(0.05 * i - 0.025, 3) for i in range(1, 21)]
    with pytest.raises(CalibrationError, match=r"bucket bounds differ .* at: http://b:8002/metrics \(has 0.025, 0.075"):
        fleet_sum([snapshot(scores, "http://a:8002/metrics"), snapshot(scores, "http://b:8002/metrics", bounds=other)])
    with pytest.raises(CalibrationError, match="http://b:8002/metrics"):
        propose_fleet(None, [snapshot(scores, "http://a:8002/metrics"), snapshot(scores, "http://b:8002/metrics", bounds=other)], flag_rate=0.1)
    restarted = snapshot(scores[:10], "http://a:8002/metrics", at=10.0)
    with pytest.raises(CalibrationError, match=r"http://a:8002/metrics: its counters went down .*restarted"):
        propose_fleet([snapshot(scores, "http://a:8002/metrics")], [restarted], flag_rate=0.1)
    with pytest.raises(CalibrationError, match="given twice"):
        scrape_fleet(["http://127.0.0.1:1/metrics", "http://127.0.0.1:1/metrics"])
    with pytest.raises(CalibrationError, match="expected an http"):
        scrape_fleet(["127.0.0.1:8002/metrics"])


def test_prometheus_selectors_are_label_matchers_only():
    assert prometheus_selector("active_learning") == 'model="active_learning"'
    assert prometheus_selector("s", 'namespace="prod", pod=~"triton-al-.*"') == 'model="s",namespace="prod", pod=~"triton-al-.*"'
    assert prometheus_selector("s", '{job="x"}') == 'model="s",job="x"'
    for bad in ('namespace=prod', 'x="a"} or vector(1) or {y="b"', 'a="b",,'):
        with pytest.raises(CalibrationError, match="prometheus-selector"):
            prometheus_selector("s", bad)
    with pytest.raises(CalibrationError, match="step model name"):
        prometheus_selector('a"}')


# --------------------------------------------------------------------------------------------
# Many replicas for real: two tritonservers serving the example, a real Prometheus, and a
# stand-in for the answers Prometheus gives only when something is wrong

STEP = "active_learning"
SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series_of(text: str, extra: dict[str, str]) -> dict[tuple, float]:
    """{(name, sorted labels): value} of an exposition text, with target labels added."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line) if line and not line.startswith("#") else None
        if m:
            labels = {**dict(LABEL.findall(m.group(2) or "")), **extra}
            out[(m.group(1), tuple(sorted(labels.items())))] = float(m.group(3))
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def http_server(answer):
    """A 127.0.0.1 HTTP server on a free port; `answer(path, query) -> (status, body)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's spelling
            url = urllib.parse.urlsplit(self.path)
            status, body = answer(url.path, dict(urllib.parse.parse_qsl(url.query)))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class FakePrometheus:
    """Answers GET /api/v1/query as Prometheus does, for the shapes of query triton-al sends
    (`sum`/`count` with `by`, `increase(...[range])`, label matchers), over the series of
    real replicas' /metrics scraped at two moments: an instant query reads the second
    scrape, `increase` is the second minus the first (the range is not checked: the test
    chooses the two moments). The queries are parsed with the real PromQL parser
    (promql-parser); any other shape is answered with Prometheus' error format. Used for
    the failures (a refused query, a replica scraped twice, other bounds) that a real
    Prometheus cannot be made to give on demand; the normal path runs against a real one."""

    def __init__(self, before: dict[tuple, float], after: dict[tuple, float]):
        self.before, self.after, self.queries = before, after, []
        self.error: str | None = None

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, str]:
        if path != "/api/v1/query" or "query" not in params:
            return 404, "not found"
        self.queries.append(params["query"])
        if self.error:
            return 422, json.dumps({"status": "error", "errorType": "execution", "error": self.error})
        try:
            result = self.evaluate(promql_parser.parse(params["query"]))
        except (ValueError, SyntaxError, NotImplementedError) as e:
            return 400, json.dumps({"status": "error", "errorType": "bad_data", "error": str(e)})
        vector = [{"metric": dict(labels), "value": [1700000000.0, repr(value)]} for labels, value in result]
        return 200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": vector}})

    @staticmethod
    def _select(db: dict[tuple, float], selector) -> list[tuple[tuple, float]]:
        out = []
        for (name, labels), value in db.items():
            if name != selector.name:
                continue
            have = dict(labels)
            if all(FakePrometheus._matches(m, have.get(m.name, "")) for m in selector.matchers.matchers):
                out.append(((("__name__", name),) + labels, value))
        return out

    @staticmethod
    def _matches(matcher, value: str) -> bool:
        op = str(matcher.op).rsplit(".", 1)[-1].split("(")[0]  # promql-parser's MatchOp
        if op == "Equal":
            return value == matcher.value
        if op == "NotEqual":
            return value != matcher.value
        if op in ("Re", "NotRe"):
            return (re.fullmatch(matcher.value, value) is not None) == (op == "Re")
        raise NotImplementedError(f"matcher {op}")

    def evaluate(self, node) -> list[tuple[tuple, float]]:
        if isinstance(node, promql_parser.VectorSelector):
            return self._select(self.after, node)
        if isinstance(node, promql_parser.Call) and node.func.name == "increase":
            selector = node.args[0].vector_selector
            before = dict(self._select(self.before, selector))
            return [(labels, value - before.get(labels, 0.0)) for labels, value in self._select(self.after, selector)]
        if isinstance(node, promql_parser.ParenExpr):
            return self.evaluate(node.expr)
        if isinstance(node, promql_parser.AggregateExpr):
            op = str(node.op).lower()
            if node.modifier is not None and str(node.modifier.type).rsplit(".", 1)[-1] != "By":
                raise NotImplementedError("without (...)")
            labels = list(node.modifier.labels) if node.modifier is not None else []
            groups: dict[tuple, list[float]] = {}
            for series, value in self.evaluate(node.expr):
                have = dict(series)
                key = tuple((k, have[k]) for k in labels if k in have)
                groups.setdefault(key, []).append(value)
            if op.endswith("sum"):
                return [(k, sum(v)) for k, v in groups.items()]
            if op.endswith("count"):
                return [(k, float(len(v))) for k, v in groups.items()]
        raise NotImplementedError(f"the fake Prometheus does not evaluate {node}")


def cli(*args: str):
    from typer.testing import CliRunner

    from triton_al.cli import app

    return CliRunner().invoke(app, list(args))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two tritonservers serving the example repository (the native step, flagging below
    0.85 so that small traffic flags some), each sent a different small batch of images."""
    from outbox_helpers import wait_for
    from triton_helpers import copy_repository, fashion_pngs, grpcclient, infer_al, metric_sum, set_parameter, triton_metrics

    from triton_al.serving.pipeline import Pipeline

    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", STEP]
    with contextlib.ExitStack() as stack:
        servers = []
        for i, n in enumerate((24, 40)):
            tmp = tmp_path_factory.mktemp(f"replica{i}")
            repository = copy_repository(tmp)
            set_parameter(repository / STEP / "config.pbtxt", "threshold", "0.85")
            p = stack.enter_context(Pipeline(repository, tmp / "data", uploader=False, model_control_mode="explicit",
                                             load_models=models))
            pngs, _, _ = fashion_pngs(n, start=1000 + 100 * i)
            with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
                for k in range(0, n, 8):
                    infer_al(client, pngs[k:k + 8])
            servers.append(p.server)
        for s, n in zip(servers, (24, 40)):
            wait_for(lambda s=s, n=n: metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) == n,
                     15, f"{n} items in the step's metrics")
        yield servers


def replica_numbers(text: str) -> dict:
    """One replica's numbers, read from its exposition text line by line (not by the code
    under test)."""
    from triton_helpers import metric_sum

    les = sorted({m for m in re.findall(r'triton_al_score_bucket\{[^}]*le="([^"]+)"', text)}, key=float)
    return {
        "scored": metric_sum(text, "triton_al_items_scored_total", model=STEP),
        "flagged": {r: metric_sum(text, "triton_al_items_flagged_total", model=STEP, reason=r) for r in ("uncertain", "invalid_output", "random")},
        "buckets": {le: metric_sum(text, "triton_al_score_bucket", model=STEP, le=le) for le in les},
        "score_sum": metric_sum(text, "triton_al_score_sum", model=STEP),
    }


def summed(numbers: list[dict]) -> dict:
    return {
        "scored": sum(n["scored"] for n in numbers),
        "flagged": {r: sum(n["flagged"][r] for n in numbers) for r in numbers[0]["flagged"]},
        "buckets": {le: sum(n["buckets"][le] for n in numbers) for le in numbers[0]["buckets"]},
        "score_sum": sum(n["score_sum"] for n in numbers),
    }


def test_fleet_calibrate_and_report_equal_the_sum_of_the_replicas(fleet, tmp_path):
    from triton_helpers import triton_metrics

    urls = [s.metrics_url for s in fleet]
    each = [replica_numbers(triton_metrics(s)) for s in fleet]
    total = summed(each)
    assert [n["scored"] for n in each] == [24, 40] and len(total["buckets"]) == 101
    assert total["flagged"]["uncertain"] > 0, "nothing flagged: pick other images"

    result = cli("calibrate", "--metrics-url", urls[0], "--metrics-url", urls[1], "--flag-rate", "0.3", "--window", "0")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = threshold_for_fraction({float(le): v for le, v in total["buckets"].items()}, 0.3)
    assert out["observed"] == 64 and out["replicas"] == 2 and out["threshold"] == round(expected, 4)

    result = cli("report", "--metrics-url", urls[0], "--metrics-url", urls[1], "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "fleet.json").read_text())
    fleet_numbers = report["fleet"]
    assert fleet_numbers["replicas"] == 2 and fleet_numbers["scored"] == total["scored"] == 64
    assert fleet_numbers["buckets"] == {le if le == "+Inf" else f"{float(le):g}": v for le, v in total["buckets"].items()}
    assert fleet_numbers["flagged"] == sum(total["flagged"].values())
    assert {r: v for r, v in fleet_numbers["flagged_by_reason"].items() if v} == {r: v for r, v in total["flagged"].items() if v}
    assert fleet_numbers["score_sum"] == pytest.approx(total["score_sum"])
    assert [r["scored"] for r in report["replicas"]] == [24, 40]
    assert [r["source"] for r in report["replicas"]] == urls
    page = (tmp_path / "report" / "index.html").read_text()
    assert "across 2 replicas" in page and (tmp_path / "report" / "fleet_scores.png").stat().st_size > 0

    # Beside the store's own report: the fleet's section is added to its page. (A subprocess:
    # an empty store's plots warn, which pytest turns into errors in-process.)
    from triton_al.sinks.local import LocalStore

    LocalStore(tmp_path / "store")
    done = subprocess.run([sys.executable, "-m", "triton_al.cli", "report", "--store", str(tmp_path / "store"),
                           "--out", str(tmp_path / "both"), "--metrics-url", urls[0], "--metrics-url", urls[1]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "both" / "index.html").read_text()
    assert "<h1>Active learning report</h1>" in page and "across 2 replicas" in page and page.count("</body>") == 1
    assert json.loads((tmp_path / "both" / "fleet.json").read_text())["fleet"]["scored"] == 64
    result = cli("report", "--store", str(tmp_path / "no-store"), "--metrics-url", urls[0])
    assert result.exit_code == 2 and "no project store at" in result.output


def test_fleet_window_counts_only_the_traffic_in_between(fleet):
    from outbox_helpers import wait_for
    from triton_helpers import fashion_pngs, grpcclient, infer_al, metric_sum, triton_metrics

    urls = [s.metrics_url for s in fleet]
    counts = [metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) for s in fleet]
    before = scrape_fleet(urls, model=STEP)
    sent = []
    for s, n in zip(fleet, (8, 16)):
        pngs, _, _ = fashion_pngs(n, start=2000 + n)
        with grpcclient.InferenceServerClient(s.grpc_url) as client:
            sent.append(infer_al(client, pngs)[1])
    for s, c, n in zip(fleet, counts, (8, 16)):
        wait_for(lambda s=s, c=c, n=n: metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) == c + n, 15, "the window's items")
    after = scrape_fleet(urls, model=STEP)
    p = propose_fleet(before, after, flag_rate=0.5)
    assert p.observed == 24 and p.replicas == 2 and p.items_per_day > 0
    scores = np.concatenate(sent)
    # The window's histogram is these 24 scores: half of them lie below the proposed threshold
    # (to within a bucket's worth of items).
    assert abs(int((scores < p.threshold).sum()) - 12) <= max(2, int((np.abs(scores - p.threshold) <= 0.01).sum()))


def test_an_unreachable_replica_is_refused_by_name(fleet):
    dead = closed_port_url()
    for command in ("calibrate", "report"):
        args = ["--metrics-url", fleet[0].metrics_url, "--metrics-url", dead]
        args += ["--flag-rate", "0.3", "--window", "0"] if command == "calibrate" else ["--out", "unused-report"]
        result = cli(command, *args)
        assert result.exit_code == 2, result.output
        assert f"{dead}: unreachable" in result.output and "1 of 2 replicas" in result.output
        assert f"{fleet[0].metrics_url}:" not in result.output


def test_replicas_with_other_bucket_bounds_are_refused_by_name(fleet):
    from triton_helpers import triton_metrics

    text = triton_metrics(fleet[1]).replace('le="0.5"', 'le="0.505"')
    with http_server(lambda path, q: (200, text)) as base:
        other = base + "/metrics"
        result = cli("calibrate", "--metrics-url", fleet[0].metrics_url, "--metrics-url", other, "--flag-rate", "0.3", "--window", "0")
        assert result.exit_code == 2, result.output
        assert "bucket bounds differ" in result.output and f"at: {other} (has 0.505 that the first has not; lacks 0.5)" in result.output, result.output


@pytest.fixture
def prometheus(fleet):
    """A Prometheus stand-in that 'scraped' both replicas twice, some traffic apart."""
    from outbox_helpers import wait_for
    from triton_helpers import fashion_pngs, grpcclient, infer_al, metric_sum, triton_metrics

    def scrape_all():
        return {k: v for i, s in enumerate(fleet)
                for k, v in series_of(triton_metrics(s), {"namespace": "prod", "pod": f"triton-al-{i}",
                                                         "instance": f"10.0.0.{i}:8002", "job": "prod/triton-al"}).items()}

    before = scrape_all()
    for s, n in zip(fleet, (8, 8)):
        c = metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP)
        pngs, _, _ = fashion_pngs(n, start=3000)
        with grpcclient.InferenceServerClient(s.grpc_url) as client:
            infer_al(client, pngs)
        wait_for(lambda s=s, c=c, n=n: metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) == c + n, 15, "the items")
    fake = FakePrometheus(before, scrape_all())
    with http_server(fake.answer) as url:
        fake.url = url
        yield fake


def test_prometheus_gives_the_fleet_sums(fleet, prometheus, tmp_path):
    """The --prometheus-url path against the Prometheus stand-in (see FakePrometheus): the
    same numbers as scraping every replica, and the window's increase."""
    from triton_helpers import triton_metrics

    urls = [s.metrics_url for s in fleet]
    direct = cli("calibrate", "--metrics-url", urls[0], "--metrics-url", urls[1], "--flag-rate", "0.3", "--window", "0")
    via = cli("calibrate", "--prometheus-url", prometheus.url, "--prometheus-selector", 'namespace="prod"',
              "--flag-rate", "0.3", "--window", "0")
    assert direct.exit_code == 0 and via.exit_code == 0, (direct.output, via.output)
    direct, via = json.loads(direct.stdout), json.loads(via.stdout)
    assert via["observed"] == direct["observed"] and via["threshold"] == direct["threshold"] and via["replicas"] == 2
    assert all('namespace="prod"' in q and f'model="{STEP}"' in q for q in prometheus.queries)

    # With a window: the increase between the two scrapes (8 items on each replica).
    windowed = cli("calibrate", "--prometheus-url", prometheus.url, "--capacity", "100/day", "--window", "3600")
    assert windowed.exit_code == 0, windowed.output
    out = json.loads(windowed.stdout)
    assert out["observed"] == 16 and out["items_per_day"] == pytest.approx(16 / 3600 * 86_400)

    result = cli("report", "--prometheus-url", prometheus.url, "--out", str(tmp_path / "via"))
    assert result.exit_code == 0, result.output
    via_report = json.loads((tmp_path / "via" / "fleet.json").read_text())["fleet"]
    total = summed([replica_numbers(triton_metrics(s)) for s in fleet])
    assert via_report["scored"] == total["scored"] and via_report["replicas"] == 2
    assert via_report["buckets"] == {le if le == "+Inf" else f"{float(le):g}": v for le, v in total["buckets"].items()}
    assert via_report["flagged"] == sum(total["flagged"].values())


def test_prometheus_errors_name_the_problem(fleet, prometheus):
    prometheus.error = "query timed out in expression evaluation"
    result = cli("calibrate", "--prometheus-url", prometheus.url, "--flag-rate", "0.3", "--window", "0")
    assert result.exit_code == 2 and "refused the query" in result.output and "timed out" in result.output
    prometheus.error = None

    result = cli("calibrate", "--prometheus-url", prometheus.url, "--step", "other_step", "--flag-rate", "0.3", "--window", "0")
    assert result.exit_code == 2 and "no triton_al_score_bucket series" in result.output

    dead = closed_port_url().rsplit("/", 1)[0]
    result = cli("report", "--prometheus-url", dead, "--out", "unused-report")
    assert result.exit_code == 2 and f"Prometheus at {dead} is unreachable" in result.output

    # A replica scraped by two jobs would be counted twice: refused, named.
    original = dict(prometheus.after)
    prometheus.after = {**original, **{(name, tuple((k, "other-job" if k == "job" else v) for k, v in labels)): value
                                       for (name, labels), value in original.items() if ("pod", "triton-al-0") in labels}}
    result = cli("calibrate", "--prometheus-url", prometheus.url, "--flag-rate", "0.3", "--window", "0")
    assert result.exit_code == 2 and "replicas triton-al-0 have more than one triton_al_score_bucket series" in result.output, result.output
    prometheus.after = original

    # One replica with other bounds: named.
    prometheus.after = {(name, tuple((k, "0.505" if (k, v) == ("le", "0.5") and ("pod", "triton-al-1") in labels else v) for k, v in labels)): value
                        for (name, labels), value in prometheus.after.items()}
    result = cli("calibrate", "--prometheus-url", prometheus.url, "--flag-rate", "0.3", "--window", "0")
    assert result.exit_code == 2 and "replicas triton-al-1 export other score bucket bounds" in result.output

    for args, complaint in [
        (["--metrics-url", fleet[0].metrics_url, "--prometheus-url", prometheus.url], "exactly one of them"),
        ([], "exactly one of them"),
        (["--prometheus-url", prometheus.url, "--prometheus-selector", "namespace=prod"], "--prometheus-selector"),
        (["--metrics-url", fleet[0].metrics_url, "--metrics-url", fleet[1].metrics_url, "--apply", "--model-repository", "."], "one server"),
        (["--metrics-url", fleet[0].metrics_url, "--window", "-1"], "--window -1"),
    ]:
        result = cli("calibrate", "--flag-rate", "0.3", *args)
        assert result.exit_code == 2 and complaint in result.output, (args, result.output)
    result = cli("report", "--out", "unused-report")
    assert result.exit_code == 2 and "give --store" in result.output


def test_a_real_prometheus_scraping_both_replicas_gives_the_fleet_sums(fleet, tmp_path):
    """--prometheus-url against a real Prometheus (Debian's) scraping both tritonservers every
    second: the cumulative numbers equal scraping every replica directly, and with --window
    the counts are Prometheus' increase over that range: the 16 items sent meanwhile, plus
    at most the extrapolation `increase` does at the range's edges (≤ 1.6 scrape intervals
    of the traffic's rate)."""
    import math
    import time

    from outbox_helpers import wait_for
    from prometheus_helpers import running_prometheus
    from triton_helpers import fashion_pngs, grpcclient, infer_al, metric_sum, triton_metrics

    urls = [s.metrics_url for s in fleet]
    targets = [(u, {"namespace": "prod", "pod": f"triton-al-{i}"}) for i, u in enumerate(urls)]
    with running_prometheus(tmp_path / "prometheus", targets) as prom:
        started = time.monotonic()
        scored = sum(metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) for s in fleet)
        prom.wait_for(f'sum(triton_al_items_scored_total{{model="{STEP}"}})', lambda v: v == scored, 30, f"{scored} items scored")

        direct = cli("calibrate", *[a for u in urls for a in ("--metrics-url", u)], "--flag-rate", "0.3", "--window", "0")
        via = cli("calibrate", "--prometheus-url", prom.url, "--prometheus-selector", 'namespace="prod"',
                  "--flag-rate", "0.3", "--window", "0")
        assert direct.exit_code == 0 and via.exit_code == 0, (direct.output, via.output)
        direct, via = json.loads(direct.stdout), json.loads(via.stdout)
        assert via["replicas"] == 2 and via["observed"] == direct["observed"] == scored
        assert via["threshold"] == direct["threshold"]

        time.sleep(3)  # a few scrapes of the counts before the window's traffic
        for s in fleet:
            pngs, _, _ = fashion_pngs(8, start=4000)
            with grpcclient.InferenceServerClient(s.grpc_url) as client:
                infer_al(client, pngs)
        wait_for(lambda: sum(metric_sum(triton_metrics(s), "triton_al_items_scored_total", model=STEP) for s in fleet) == scored + 16,
                 15, "the window's items in the step's metrics")
        prom.wait_for(f'sum(triton_al_items_scored_total{{model="{STEP}"}})', lambda v: v == scored + 16, 30, "the window's items")
        span = time.monotonic() - started
        window = math.ceil(span) + 5  # every sample Prometheus has lies in the range
        result = cli("calibrate", "--prometheus-url", prom.url, "--capacity", "100/day", "--window", str(window))
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert 16 <= out["observed"] <= 16 * (1 + 1.6 / span) + 1, (out, span)
        assert out["replicas"] == 2 and out["items_per_day"] > 0
        assert out["flag_rate"] == pytest.approx(min(1.0, 100 / out["items_per_day"]))

        # The same Prometheus names what it lacks: a step it does not scrape.
        result = cli("calibrate", "--prometheus-url", prom.url, "--step", "other_step", "--flag-rate", "0.3", "--window", "0")
        assert result.exit_code == 2 and "no triton_al_score_bucket series" in result.output
