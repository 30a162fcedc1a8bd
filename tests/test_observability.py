"""deploy/observability/: the Grafana dashboard and the Prometheus alerting rules.

- Every PromQL expression (each dashboard panel's targets, the dashboard variables' queries,
  each alert rule; and the queries `triton-al calibrate/report --prometheus-url` send) parses
  with a real PromQL parser (`promql-parser`, Python bindings of the Rust crate; Grafana's
  variables such as `$__rate_interval` and `$pod` are replaced by sample values first).
- Every metric name those expressions select is one the code really exports: the test
  serves the example repository (with the native step, as the example ships it, and with
  the Python step) with the uploader beside it (with a fleet ledger, a real redis-server, and
  near-duplicate suppression on), sends traffic that gets flagged, uploaded and, for
  near-copies of flagged images, suppressed, runs the real drift watcher (`triton-al drift
  --serve-metrics`) until it has recorded a reference and judged a window, and reads
  Triton's /metrics, the uploader's and the watcher's; the names come from those scrapes,
  not from a list. A family declared with no
  series yet (a labelled counter such as the sink failures, before the first failure) is
  exported by its `# TYPE` line and counts. The only names allowed without a scrape are
  Prometheus' own per-target series (`up`). Label names used in matchers and in `by (...)`
  must be on the series too, except the target labels Prometheus adds (namespace, pod, ...).
- A real Prometheus (Debian's) scraping those texts evaluates every dashboard query (the
  variables set as a user would) and every alert expression: none fails, and every panel
  the traffic feeds shows data. (tests/test_alert_rules.py runs the alerts themselves in
  promtool.)
- The rules file is a PrometheusRule of the right shape (kustomize-rendered by
  tests/deploy_kustomize.py), and the dashboard's datasource is a variable.

Each check is a function returning problems; `test_broken_*` feed them broken copies.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import promql_parser  # the test extra: promql-parser
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_kustomize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"

# Series Prometheus makes for every target itself, not scraped from it.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus (and the Prometheus Operator's PodMonitor) attach to every scraped series.
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "service", "node"}
# What the dashboard must show (a coverage check, not the list the names are checked against).
DASHBOARD_MUST_SHOW = {
    "flag rate": "triton_al_items_flagged_total",
    "score histogram": "triton_al_score_bucket",
    "outbox depth": "triton_al_uploader_queued",
    "outbox age": "triton_al_uploader_oldest_item_age_seconds",
    "dead letters": "triton_al_uploader_dead_letters",
    "upload rate": "triton_al_uploader_uploaded_total",
    "sink errors": "triton_al_uploader_sink_failures_total",
    "step outbox errors": "triton_al_outbox_errors_total",
    "score drift": "triton_al_score_drift",
    "flag rate against its band": "triton_al_flag_rate_out_of_band",
    "near-duplicates": "triton_al_uploader_near_duplicates_total",
    "fleet ledger": "triton_al_uploader_ledger_up",
}
ALERTS_MUST_COVER = {
    "backlog age": "triton_al_uploader_oldest_item_age_seconds",
    "dead letters growing": "triton_al_uploader_dead_lettered_total",
    "uploader down": "up",
    "step outbox errors": "triton_al_outbox_errors_total",
    "flag rate out of band": "triton_al_items_flagged_total",
    "score drift": "triton_al_score_drift",
    "calibrated band": "triton_al_flag_rate_out_of_band",
    "ledger down": "triton_al_uploader_ledger_up",
}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


# --------------------------------------------------------------------------------------------
# PromQL


def grafana_to_promql(expr: str) -> str:
    """A Grafana target's expression as Prometheus would receive it (variables replaced by
    sample values: durations for the interval ones, a word for the others)."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", "5m", expr)
    return re.sub(r"\$\{([A-Za-z0-9_]+)(:[a-z]+)?\}|\$([A-Za-z0-9_]+)", "x", expr)


def variable_query(variable: dict) -> str | None:
    """The PromQL inside a query variable's `label_values(EXPR, label)` (None: no PromQL)."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not isinstance(query, str):
        return None
    m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query, flags=re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, flags=re.S)
    return m.group(1) if m else query


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard.get("panels") or []:
        for inner in [panel, *(panel.get("panels") or [])]:
            for target in inner.get("targets") or []:
                out.append((f"panel {inner.get('title')!r} target {target.get('refId')}", target.get("expr", "")))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            out.append((f"variable {variable.get('name')}", variable_query(variable) or ""))
    return out


def rule_expressions(rules: dict) -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", str(rule.get("expr", "")))
            for group in (rules.get("spec") or {}).get("groups") or [] for rule in group.get("rules") or []]


def calibrate_expressions() -> list[tuple[str, str]]:
    from triton_al.calibrate import prometheus_queries

    return [(f"triton-al --prometheus-url ({name}, window {w})", q)
            for w in (0, 3600) for name, q in prometheus_queries("active_learning", w, 'namespace="prod"').items()]


def _children(node) -> list:
    out = []
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if isinstance(child, promql_parser.Expr):
            out.append(child)
    args = getattr(node, "args", None)
    if args is not None:
        out.extend(a for a in args if isinstance(a, promql_parser.Expr))
    return out


def match_op(matcher) -> str:
    """=, !=, =~ or !~ (promql-parser's MatchOp names them Equal, NotEqual, Re, NotRe)."""
    return {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}[str(matcher.op).rsplit(".", 1)[-1].split("(")[0]]


def selections(expr: str) -> tuple[list[tuple[str, dict[str, tuple[str, str]]]], list[tuple[list[str], set[str]]]]:
    """Parse EXPR (raises on a syntax error); returns (the selectors: metric name and its
    label matchers {label: (op, value)}, the aggregations: their `by` labels and the metric
    names beneath them)."""
    selectors, groupings = [], []

    def visit(node) -> set[str]:
        names: set[str] = set()
        if isinstance(node, promql_parser.VectorSelector):
            if node.matchers.or_matchers:
                raise ValueError("`or` inside a selector: not used here, not checked")
            matchers = {m.name: (match_op(m), m.value) for m in node.matchers.matchers}
            name = node.name or matchers.get("__name__", ("", ""))[1]
            selectors.append((name, {k: v for k, v in matchers.items() if k != "__name__"}))
            names.add(name)
        for child in _children(node):
            names |= visit(child)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if str(node.modifier.type).rsplit(".", 1)[-1] != "By":
                raise ValueError("`without (...)`: not used here, not checked")
            groupings.append((list(node.modifier.labels), names))
        return names

    visit(promql_parser.parse(expr))
    return selectors, groupings


# --------------------------------------------------------------------------------------------
# What the code exports, from scrapes

SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def exported_series(*texts: str) -> dict[str, list[dict[str, str]]]:
    """Series name -> the label sets of its samples, from Prometheus exposition texts; a
    family declared by `# TYPE` without samples maps its series names to []."""
    series: dict[str, list[dict[str, str]]] = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                suffixes = {"histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"]}.get(kind.strip(), [""])
                for suffix in suffixes:
                    series.setdefault(name + suffix, [])
            elif line and not line.startswith("#"):
                m = SAMPLE.match(line)
                if m:
                    series.setdefault(m.group(1), []).append(dict(LABEL.findall(m.group(2) or "")))
    return series


def name_problems(expressions: list[tuple[str, str]], series: dict[str, list[dict[str, str]]]) -> list[str]:
    problems = []
    for where, expr in expressions:
        try:
            selectors, groupings = selections(grafana_to_promql(expr))
        except (ValueError, SyntaxError) as e:
            problems.append(f"{where}: does not parse: {e}")
            continue
        for name, matchers in selectors:
            if not name:
                problems.append(f"{where}: a selector without a metric name")
                continue
            if name in PROMETHEUS_SERIES:
                continue
            if name not in series:
                problems.append(f"{where}: {name} is not exported by the step, the uploader or Triton")
                continue
            samples = series[name]
            own = set().union(*samples) if samples else None
            for label, (op, value) in matchers.items():
                if own is None or label in TARGET_LABELS:
                    continue
                if label not in own:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(own)})")
                elif op == "=" and "$" not in value and value not in {s.get(label) for s in samples}:
                    problems.append(f"{where}: {name}{{{label}={value!r}}}: no such series (values: {sorted({s.get(label, '') for s in samples})})")
        for labels, names in groupings:
            for label in labels:
                if label in TARGET_LABELS:
                    continue
                carriers = [n for n in names if n in series and series[n] and any(label in s for s in series[n])]
                known = [n for n in names if n in series and series[n]]
                if known and not carriers:
                    problems.append(f"{where}: by ({label}): no series beneath carries label {label!r} ({', '.join(sorted(known))})")
    return problems


# --------------------------------------------------------------------------------------------
# Shapes


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def _datasource_is_variable(ds) -> bool:
    if isinstance(ds, str):
        return ds in ("$datasource", "${datasource}")
    return isinstance(ds, dict) and ds.get("uid") in ("$datasource", "${datasource}")


def dashboard_problems(dashboard: dict) -> list[str]:
    problems = []
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"dashboard: no {key}")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource")
    if ds is None or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("dashboard: no variable 'datasource' of type datasource for prometheus")
    ids = set()
    for panel in dashboard.get("panels") or []:
        title = panel.get("title")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"panel {title!r}: gridPos {grid} is not a place on the 24-column grid")
        if panel.get("type") == "row":
            continue
        if not _datasource_is_variable(panel.get("datasource")):
            problems.append(f"panel {title!r}: datasource {panel.get('datasource')} is not the $datasource variable")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            problems.append(f"panel {title!r}: refIds must be present and unique: {refs}")
        for t in targets:
            if "datasource" in t and not _datasource_is_variable(t["datasource"]):
                problems.append(f"panel {title!r} target {t.get('refId')}: datasource {t['datasource']} is not the $datasource variable")
            if not t.get("expr"):
                problems.append(f"panel {title!r} target {t.get('refId')}: no expr")
    for name, v in variables.items():
        if v.get("type") == "query" and not _datasource_is_variable(v.get("datasource")):
            problems.append(f"variable {name}: datasource {v.get('datasource')} is not the $datasource variable")
    named = " ".join(expr for _, expr in dashboard_expressions(dashboard))
    for what, metric in DASHBOARD_MUST_SHOW.items():
        if not re.search(rf"\b{metric}\b", named):
            problems.append(f"dashboard: nothing shows the {what} ({metric})")
    if not any(p.get("type") == "heatmap" for p in dashboard.get("panels") or []):
        problems.append("dashboard: no heatmap of the score histogram")
    return problems


RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def rules_problems(obj: dict) -> list[str]:
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1" or obj.get("kind") != "PrometheusRule":
        problems.append(f"{obj.get('apiVersion')}/{obj.get('kind')}: expected monitoring.coreos.com/v1 PrometheusRule")
    if not (obj.get("metadata") or {}).get("name"):
        problems.append("PrometheusRule: no metadata.name")
    spec = obj.get("spec")
    if not isinstance(spec, dict) or set(spec) - {"groups"}:
        return problems + [f"PrometheusRule: spec must hold groups only, has {sorted(spec) if isinstance(spec, dict) else spec}"]
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return problems + ["PrometheusRule: spec.groups must be a non-empty list"]
    names, alerts = set(), set()
    for g in groups:
        if set(g) - {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset"}:
            problems.append(f"group {g.get('name')}: unknown fields {sorted(set(g) - {'name', 'interval', 'rules', 'limit'})}")
        if not g.get("name") or g.get("name") in names:
            problems.append(f"group {g.get('name')!r}: a group needs a unique name")
        names.add(g.get("name"))
        if "interval" in g and not DURATION.fullmatch(str(g["interval"])):
            problems.append(f"group {g.get('name')}: interval {g['interval']!r} is not a duration")
        if not isinstance(g.get("rules"), list) or not g["rules"]:
            problems.append(f"group {g.get('name')}: no rules")
            continue
        for r in g["rules"]:
            what = f"rule {r.get('alert') or r.get('record')}"
            if set(r) - RULE_FIELDS:
                problems.append(f"{what}: unknown fields {sorted(set(r) - RULE_FIELDS)}")
            if ("alert" in r) == ("record" in r):
                problems.append(f"{what}: needs exactly one of alert or record")
            name = r.get("alert") or r.get("record") or ""
            if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", str(name)):
                problems.append(f"{what}: {name!r} is not a valid name")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                problems.append(f"{what}: expr must be a non-empty string")
            for field in ("for", "keep_firing_for"):
                if field in r and not DURATION.fullmatch(str(r[field])):
                    problems.append(f"{what}: {field} {r[field]!r} is not a duration")
            if "alert" in r:
                if r["alert"] in alerts:
                    problems.append(f"{what}: the alert name is used twice")
                alerts.add(r["alert"])
                labels, annotations = r.get("labels") or {}, r.get("annotations") or {}
                if labels.get("severity") not in SEVERITIES:
                    problems.append(f"{what}: labels.severity {labels.get('severity')!r} is not one of {sorted(SEVERITIES)}")
                if not all(isinstance(v, str) for v in [*labels.values(), *annotations.values()]):
                    problems.append(f"{what}: label and annotation values must be strings")
                for key in ("summary", "description"):
                    if not annotations.get(key):
                        problems.append(f"{what}: no annotations.{key}")
                # {{ $labels.X }} in an annotation: X must survive the expression's aggregation.
                try:
                    _, groupings = selections(r.get("expr", ""))
                except (ValueError, SyntaxError):
                    groupings = []
                if groupings:  # the labels every aggregation keeps (conservative for nested ones)
                    kept = set.intersection(*(set(labels) for labels, _ in groupings))
                    for text in annotations.values():
                        for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", str(text)):
                            if label not in kept:
                                problems.append(f"{what}: its annotations use $labels.{label}, which `by ({', '.join(sorted(kept))})` drops")
    covered = " ".join(expr for _, expr in rule_expressions(obj))
    for what, metric in ALERTS_MUST_COVER.items():
        if not re.search(rf"\b{metric}\b", covered):
            problems.append(f"no alert on the {what} ({metric})")
    return problems


# --------------------------------------------------------------------------------------------
# Tests without a server


def test_dashboard_shape_and_its_datasource_is_a_variable():
    assert dashboard_problems(load_dashboard()) == []


def test_rules_are_a_prometheus_rule_of_the_right_shape():
    assert rules_problems(load_rules()) == []


def test_the_kustomization_renders_the_rules():
    objects = deploy_kustomize.render(OBSERVABILITY)
    assert [o["kind"] for o in objects] == ["PrometheusRule"]
    assert objects[0]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "triton-al"
    assert rules_problems(objects[0]) == []


def test_container_matchers_name_a_scraped_container_of_the_pod():
    """`up{container="uploader"}` and the like: the container exists in the rendered pod and
    the PodMonitor scrapes one of its ports (else the alert could never fire)."""
    objects = deploy_kustomize.render(ROOT / "deploy" / "kubernetes" / "overlays" / "cpu")
    spec = next(o for o in objects if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    ports = {c["name"]: {p.get("name") for p in c.get("ports") or []} for c in (spec.get("initContainers") or []) + spec["containers"]}
    scraped = {ep.get("port") for o in objects if o["kind"] == "PodMonitor" for ep in o["spec"]["podMetricsEndpoints"]}
    found = 0
    for where, expr in dashboard_expressions(load_dashboard()) + rule_expressions(load_rules()):
        for name, matchers in selections(grafana_to_promql(expr))[0]:
            if "container" in matchers:
                found += 1
                op, value = matchers["container"]
                assert op == "=" and value in ports, f"{where}: container {value!r} is not a container of the pod ({sorted(ports)})"
                assert ports[value] & scraped, f"{where}: the PodMonitor scrapes no port of container {value!r}"
    assert found >= 2  # the alert and the dashboard's "uploaders down"


def test_every_expression_parses():
    expressions = dashboard_expressions(load_dashboard()) + rule_expressions(load_rules()) + calibrate_expressions()
    assert len(expressions) > 30
    problems = []
    for where, expr in expressions:
        try:
            selectors, _ = selections(grafana_to_promql(expr))
            if not selectors:
                problems.append(f"{where}: selects no metric")
        except (ValueError, SyntaxError) as e:
            problems.append(f"{where}: {e}")
    assert problems == []


def test_broken_expressions_fail_to_parse():
    for broken in ("sum by (le (rate(triton_al_score_bucket[5m]))", "rate(triton_al_items_scored_total[5 m])",
                   'triton_al_items_flagged_total{reason="uncertain"', "sum(rate(x[5m])) >"):
        with pytest.raises((ValueError, SyntaxError)):
            selections(broken)


def test_broken_dashboards_and_rules_are_caught():
    cases = [
        (lambda d: d["panels"][1].update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}), "is not the $datasource variable"),
        (lambda d: d["templating"]["list"].pop(0), "no variable 'datasource'"),
        (lambda d: d["panels"][1]["targets"][0].update(datasource="Prometheus"), "is not the $datasource variable"),
        (lambda d: d.update(panels=[p for p in d["panels"] if p.get("type") != "heatmap"]), "no heatmap"),
        (lambda d: d["panels"][1].update(gridPos={"h": 8, "w": 12, "x": 16, "y": 0}), "24-column grid"),
        (lambda d: d.update(panels=[p for p in d["panels"] if p.get("title") != "Score drift (PSI)"]), "nothing shows the score drift"),
        (lambda d: d.update(panels=[p for p in d["panels"] if "Near-duplicates" not in p.get("title", "")]), "nothing shows the near-duplicates"),
    ]
    for breaker, complaint in cases:
        d = copy.deepcopy(load_dashboard())
        breaker(d)
        problems = dashboard_problems(d)
        assert any(complaint in p for p in problems), (complaint, problems)

    def rule(r, name):
        return next(x for g in r["spec"]["groups"] for x in g["rules"] if x.get("alert") == name)

    cases = [
        (lambda r: r.update(kind="PrometheusRules"), "expected monitoring.coreos.com/v1 PrometheusRule"),
        (lambda r: rule(r, "TritonALBacklogTooOld").update({"for": "15 minutes"}), "is not a duration"),
        (lambda r: rule(r, "TritonALBacklogTooOld")["labels"].update(severity="page"), "labels.severity"),
        (lambda r: rule(r, "TritonALBacklogTooOld").update(record="x"), "exactly one of alert or record"),
        (lambda r: rule(r, "TritonALBacklogTooOld")["annotations"].pop("summary"), "no annotations.summary"),
        (lambda r: rule(r, "TritonALDeadLettersGrowing")["annotations"].update(summary="{{ $labels.group }}"), "$labels.group"),
        (lambda r: r["spec"]["groups"][0].update(rulez=[]), "unknown fields"),
        (lambda r: r["spec"]["groups"][1].update(name=r["spec"]["groups"][0]["name"]), "unique name"),
        (lambda r: r["spec"]["groups"].pop(0), "no alert on the uploader down"),
        (lambda r: r["spec"].update(groups=[g for g in r["spec"]["groups"] if g["name"] != "triton-al.fleet"]), "no alert on the ledger down"),
    ]
    for breaker, complaint in cases:
        r = copy.deepcopy(load_rules())
        breaker(r)
        problems = rules_problems(r)
        assert any(complaint in p for p in problems), (complaint, problems)


# --------------------------------------------------------------------------------------------
# Against the real exporters


@pytest.fixture(scope="module", params=["native", "python"])
def scraped(tmp_path_factory, request):
    """Triton's /metrics (the example, with the step of each kind: the native backend it
    ships, and the Python-backend model), the uploader's (with a fleet ledger and
    near-duplicate suppression) and the drift watcher's, after traffic that flags, stores,
    uploads and suppresses some items and a judged drift window."""
    import urllib.request

    from outbox_helpers import wait_for
    from test_fleet import RedisServer
    from triton_helpers import copy_repository, fashion_pngs, grpcclient, infer_al, metric_sum, set_parameter, triton_metrics

    from triton_al.attach import attach
    from triton_al.example.data import encode_png
    from triton_al.serving.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp(f"observability-{request.param}")
    repository = copy_repository(tmp)
    attach(repository, "fashion_cnn", preprocess="preprocess", step_name="active_learning", kind="probs", step=request.param)
    assert ('backend: "python"' in (repository / "active_learning" / "config.pbtxt").read_text()) == (request.param == "python")
    set_parameter(repository / "active_learning" / "config.pbtxt", "threshold", "0.85")  # small traffic flags some
    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", "active_learning"]
    ledger = RedisServer(tmp / "redis")
    try:
        with Pipeline(repository, tmp / "data", model_control_mode="explicit", load_models=models,
                      uploader_args=["--budget-ledger", ledger.url, "--near-duplicate-distance", "4"]) as p:
            pngs, pixels, _ = fashion_pngs(48, start=300)
            with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
                flags = np.concatenate([infer_al(client, pngs[i:i + 16])[2] for i in range(0, 48, 16)])
                assert flags.sum() > 0, "nothing flagged: pick other images"
                wait_for(lambda: metric_sum(triton_metrics(p.server), "triton_al_items_scored_total") >= 48, 15, "the step's metrics")
                assert p.flush(30).complete
                # Near-copies (one pixel changed) of flagged images: flagged again, not uploaded again.
                copies = []
                for i in np.flatnonzero(flags)[:4]:
                    near = pixels[i].copy()
                    near[0, 0] = 1 if near[0, 0] == 0 else near[0, 0] - 1
                    copies.append([encode_png(near)])
                again = infer_al(client, np.array(copies, dtype=object))[2]
            assert again.sum() > 0, "no near-copy was flagged"
            assert p.flush(30).complete
            with urllib.request.urlopen(p.uploader.metrics_url, timeout=5) as r:
                uploader_text = r.read().decode()
            drift_text = drift_watcher_scrape(tmp, p)
            yield triton_metrics(p.server), uploader_text, drift_text
    finally:
        ledger.stop()


def drift_watcher_scrape(tmp: Path, p) -> str:
    """The real watcher (`triton-al drift --serve-metrics`, a child process stopped by PID):
    it records the first 32 scores as version 1's reference, then judges a window of 16 or
    more; its /metrics once the drift gauge has a series."""
    import subprocess
    import urllib.request

    from outbox_helpers import wait_for
    from process_helpers import stop_process
    from triton_helpers import fashion_pngs, grpcclient, infer_al

    ports, reference, log = tmp / "drift-ports.json", tmp / "drift-reference.json", tmp / "drift.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "drift", "--reference", str(reference),
                                 "--metrics-url", p.server.metrics_url, "--url", p.server.grpc_url, "--window", "1",
                                 "--serve-metrics", "0", "--ports-file", str(ports), "--record-first", "32",
                                 "--min-items", "16"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "a window starts" in log.read_text() or proc.poll() is not None, 60, "the drift watcher's first scrape")
        assert proc.poll() is None, log.read_text()
        url = f"http://127.0.0.1:{json.loads(ports.read_text())['metrics']}/metrics"
        pngs, _, _ = fashion_pngs(96, start=500)
        with grpcclient.InferenceServerClient(p.server.grpc_url) as client:
            for i in range(0, 48, 16):
                infer_al(client, pngs[i:i + 16])
            wait_for(reference.exists, 30, "the reference of the first 32 scores")
            for i in range(48, 96, 16):
                infer_al(client, pngs[i:i + 16])

        def judged():
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            return text if "triton_al_score_drift{" in text else None

        return wait_for(judged, 30, "a judged window in the watcher's gauges")
    finally:
        stop_process(proc)


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (those with these labels) in an exposition text."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            own = dict(LABEL.findall(m.group(2) or ""))
            if all(own.get(k) == v for k, v in labels.items()):
                total, found = total + float(line.split("}")[-1].split()[0] if "}" in line else line.split()[1]), True
    assert found, f"no sample of {name} {labels or ''}"
    return total


def test_scrapes_hold_the_step_and_uploader_metrics(scraped):
    triton_text, uploader_text, drift_text = scraped
    series = exported_series(triton_text, uploader_text)
    # The scrapes are real: the step's histogram and the uploader's deliveries are there.
    assert any(s.get("le") == "+Inf" for s in series["triton_al_score_bucket"])
    assert any(s.get("reason") == "uncertain" for s in series["triton_al_items_flagged_total"])
    assert "triton_al_uploader_uploaded_total" in series and "nv_inference_request_success" in series
    assert "triton_al_uploader_uploaded_total" in exported_series(uploader_text)
    # Near-copies were suppressed, the ledger answered, the watcher judged a window.
    assert sample_sum(uploader_text, "triton_al_uploader_near_duplicates_total") >= 1
    assert all(s.get("group") for s in series["triton_al_uploader_near_duplicates_total"])
    assert sample_sum(uploader_text, "triton_al_uploader_ledger_up") == 1
    assert sample_sum(uploader_text, "triton_al_uploader_fleet_items_total", outcome="uploaded") >= 1
    drift = exported_series(drift_text)
    labels = {"model": "active_learning", "scored_model": "fashion_cnn", "version": "1"}
    for name in ("triton_al_score_drift", "triton_al_score_drift_ks", "triton_al_flag_rate_out_of_band",
                 "triton_al_drift_flag_rate", "triton_al_drift_window_items"):
        assert drift[name] == [labels], (name, drift.get(name))
    assert drift["triton_al_drift_up"] == [{"model": "active_learning"}]
    assert {s["edge"] for s in drift["triton_al_drift_flag_rate_band"]} == {"low", "high"}


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(scraped):
    series = exported_series(*scraped)
    expressions = dashboard_expressions(load_dashboard()) + rule_expressions(load_rules()) + calibrate_expressions()
    assert name_problems(expressions, series) == []


def test_a_name_or_label_the_code_does_not_export_is_caught(scraped):
    series = exported_series(*scraped)
    cases = [
        ("sum(rate(triton_al_items_scroed_total[5m]))", "is not exported"),
        ("triton_al_uploader_queue_depth", "is not exported"),
        ('sum(rate(triton_al_items_flagged_total{reason="uncertian"}[5m]))', "no such series"),
        ('triton_al_uploader_queued{upload_group="x"}', "has no label 'upload_group'"),
        ("sum by (group) (rate(triton_al_items_scored_total[5m]))", "by (group)"),
        ("sum(rate(triton_al_score_bucket[5m]) >", "does not parse"),
    ]
    for expr, complaint in cases:
        problems = name_problems([("case", expr)], series)
        assert any(complaint in p for p in problems), (expr, problems)
    # The real rules, with one name changed, fail the same way.
    broken = [(w, e.replace("triton_al_uploader_oldest_item_age_seconds", "triton_al_uploader_oldest_age_seconds"))
              for w, e in rule_expressions(load_rules())]
    assert any("triton_al_uploader_oldest_age_seconds is not exported" in p for p in name_problems(broken, series))


def test_exported_series_reads_type_lines_and_samples():
    text = ("# TYPE a_total counter\n# TYPE h histogram\n# TYPE g gauge\ng{group=\"x\",le=\"1\"} 3\n"
            'c_total{model="m"} 1 1700000000\n')
    series = exported_series(text)
    assert series["a_total"] == [] and series["h_bucket"] == [] and series["h_count"] == []
    assert series["g"] == [{"group": "x", "le": "1"}] and series["c_total"] == [{"model": "m"}]
    assert "h" not in series and "a" not in series


# --------------------------------------------------------------------------------------------
# In a real Prometheus

# Grafana's variables as a user looking at one pod's step would set them.
VARIABLES = {"namespace": "prod", "pod": "triton-al-0", "step": "active_learning"}
# Panels that must show data after the fixture's traffic (each selects series the scrapes hold).
PANELS_WITH_DATA = {"Items scored / s", "Flag rate", "Flagged / s by pod", "Score distribution (heatmap)",
                    "Requests / s (Triton)", "Outbox depth", "Dead letters", "Uploads / s", "Batch latency",
                    "Backoff and health", "Outbox size", "Score drift (PSI)", "Flag rate against its band", "Drift watcher",
                    "Near-duplicates not uploaded / s", "Fleet ledger"}


def with_variables(expr: str, interval: str = "1m") -> str:
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", interval, expr)
    return re.sub(r"\$\{?([A-Za-z0-9_]+)(:[a-z]+)?\}?", lambda m: VARIABLES[m.group(1)], expr)


def test_the_dashboard_and_the_alerts_evaluate_in_a_real_prometheus(scraped, tmp_path):
    """Debian's Prometheus scrapes the fixture's real exposition texts (Triton's, the
    uploader's, the drift watcher's, as the PodMonitor labels them) every second; every
    dashboard query (the variables set as a user would) and every alert expression is
    evaluated: none fails (a many-to-many match, a vector where a scalar goes, ... only show
    when evaluated), and every panel that the traffic feeds returns series."""
    from prometheus_helpers import running_prometheus

    from test_calibrate import http_server

    triton_text, uploader_text, drift_text = scraped
    texts = {"/tritonserver": triton_text, "/uploader": uploader_text, "/drift-watcher": drift_text}
    with http_server(lambda path, query: (200, texts[path]) if path in texts else (404, "not found")) as base:
        targets = [(base + path, {"namespace": "prod", "pod": "triton-al-0", "container": path[1:]}) for path in texts]
        with running_prometheus(tmp_path / "prometheus", targets) as prom:
            prom.wait_for("min(count_over_time(up[1m]))", lambda v: v >= 4, 30, "four scrapes of every target")
            failed, shown, titles = [], set(), set()
            for key, expr in dashboard_expressions(load_dashboard()):
                title = re.match(r"panel '(.*)' target|(variable .*)", key)
                title = title.group(1) or title.group(2)
                titles.add(title)
                try:
                    if prom.query(with_variables(expr)):  # a panel with several queries shows data when one does
                        shown.add(title)
                except Exception as e:  # noqa: BLE001 - collected, reported together
                    failed.append(f"{key}: {with_variables(expr)}: {getattr(e, 'read', lambda: b'')().decode()[:300] or e}")
            for name, expr in rule_expressions(load_rules()):
                try:
                    prom.query(expr)
                except Exception as e:  # noqa: BLE001
                    failed.append(f"{name}: {expr}: {getattr(e, 'read', lambda: b'')().decode()[:300] or e}")
            for variable in load_dashboard()["templating"]["list"]:
                inner = variable_query(variable) if variable.get("type") == "query" else None
                if inner is not None:
                    assert prom.query(f"count({with_variables(inner)})"), f"variable {variable['name']} lists nothing"
    assert failed == []
    assert PANELS_WITH_DATA <= titles, PANELS_WITH_DATA - titles
    assert PANELS_WITH_DATA - shown == set(), f"no data in: {sorted(PANELS_WITH_DATA - shown)}"
