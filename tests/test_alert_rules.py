"""deploy/observability/alerts.yaml evaluated by Prometheus' own rule engine (`promtool`,
Debian's prometheus package, installed by scripts/test.sh): the rules load, and each alert
fires on the series it is written for (after its `for:`), with the labels and rendered
annotations a receiver gets, and stays quiet on healthy series.

tests/test_observability.py checks that the names the rules use are ones the code exports;
this file checks what the rules *do* with them. The cases are promtool unit tests generated
here; an expected annotation is the rule's own template with its `{{ $labels.x }}` filled in
and `{{ $value | f }}` replaced by the text the case states (so a wrong threshold, a lost
label in a `by (...)` or a template that renders differently all fail)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "observability" / "alerts.yaml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

POD = {"namespace": "prod", "pod": "triton-al-0"}
UPLOADER = {**POD, "container": "uploader"}
STEP = {**POD, "container": "tritonserver", "model": "active_learning"}


def series(name: str, labels: dict[str, str], values: str) -> dict:
    inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inside}}}", "values": values}


# Each case: the alert, the input series (one sample a minute), when it is evaluated, the
# labels the alert must carry (besides alertname and the rule's own), and the text each
# `{{ $value | ... }}` renders to; `fires=False`: no alert at that time.
CASES = [
    ("TritonALUploaderDown", [series("up", UPLOADER, "0x20")], "6m", UPLOADER, None, True),
    ("TritonALUploaderDown", [series("up", UPLOADER, "0x3 1x20")], "10m", UPLOADER, None, False),
    ("TritonALUploaderDown", [series("up", UPLOADER, "0x20")], "4m", UPLOADER, None, False),  # still pending
    ("TritonALOutboxUnusable", [series("triton_al_uploader_outbox_usable", UPLOADER, "0x20")], "6m", UPLOADER, None, True),
    ("TritonALOutboxUnusable", [series("triton_al_uploader_outbox_usable", UPLOADER, "1x20")], "6m", UPLOADER, None, False),
    ("TritonALBacklogTooOld", [series("triton_al_uploader_oldest_item_age_seconds", {**UPLOADER, "group": "g"}, "4000x30")],
     "16m", {**POD, "group": "g"}, "1h 6m 40s", True),
    ("TritonALBacklogTooOld", [series("triton_al_uploader_oldest_item_age_seconds", {**UPLOADER, "group": "g"}, "600x30")],
     "16m", {**POD, "group": "g"}, None, False),
    ("TritonALDeadLettersGrowing", [series("triton_al_uploader_dead_lettered_total", UPLOADER, "0+1x120")],
     "90m", POD, "60", True),
    ("TritonALDeadLettersGrowing", [series("triton_al_uploader_dead_lettered_total", UPLOADER, "5x120")],
     "90m", POD, None, False),
    ("TritonALSinkFailing", [series("triton_al_uploader_sink_failures_total", {**UPLOADER, "kind": "unavailable"}, "0+1x60")],
     "40m", {**POD, "kind": "unavailable"}, None, True),
    ("TritonALOutboxDropping", [series("triton_al_outbox_dropped_total", {**STEP, "reason": "full"}, "0+2x60")],
     "50m", {**POD, "reason": "full"}, "60", True),
    ("TritonALOutboxDropping", [series("triton_al_outbox_dropped_total", {**STEP, "reason": "rate_limit"}, "0+2x60")],
     "50m", {**POD, "reason": "rate_limit"}, None, False),
    ("TritonALLabelPullsFailing", [series("triton_al_label_pulls_total", {**UPLOADER, "outcome": "failed"}, "0+1x120"),
                                   series("triton_al_label_pulls_total", {**UPLOADER, "outcome": "ok"}, "3x120")],
     "90m", POD, None, True),
    ("TritonALLabelPullsFailing", [series("triton_al_label_pulls_total", {**UPLOADER, "outcome": "failed"}, "0+1x120"),
                                   series("triton_al_label_pulls_total", {**UPLOADER, "outcome": "ok"}, "0+1x120")],
     "90m", POD, None, False),
    ("TritonALLedgerDown", [series("triton_al_uploader_ledger_up", UPLOADER, "0x20")], "6m", POD, None, True),
    ("TritonALLedgerDown", [series("triton_al_uploader_ledger_up", UPLOADER, "0 0 1x20")], "10m", POD, None, False),
    ("TritonALStepOutboxErrors", [series("triton_al_outbox_errors_total", STEP, "0+2x60")],
     "30m", {"namespace": "prod", "pod": "triton-al-0", "model": "active_learning"}, "20", True),
    # 30 of every 100 items flagged: above the 20% band; 5 of 100: inside it.
    ("TritonALFlagRateHigh", [series("triton_al_items_flagged_total", {**STEP, "reason": "uncertain"}, "0+30x120"),
                              series("triton_al_items_scored_total", STEP, "0+100x120")],
     "90m", {"namespace": "prod", "model": "active_learning"}, "30%", True),
    ("TritonALFlagRateHigh", [series("triton_al_items_flagged_total", {**STEP, "reason": "uncertain"}, "0+5x120"),
                              series("triton_al_items_scored_total", STEP, "0+100x120")],
     "90m", {"namespace": "prod", "model": "active_learning"}, None, False),
    ("TritonALFlagRateHigh", [series("triton_al_items_flagged_total", {**STEP, "reason": "invalid_output"}, "0+30x120"),
                              series("triton_al_items_scored_total", STEP, "0+100x120")],
     "90m", {"namespace": "prod", "model": "active_learning"}, None, False),  # invalid outputs have their own alert
    ("TritonALFlagRateLow", [series("triton_al_items_flagged_total", {**STEP, "reason": "uncertain"}, "0x200"),
                             series("triton_al_items_scored_total", STEP, "0+100x200")],
     "120m", {"namespace": "prod", "model": "active_learning"}, None, True),
    ("TritonALFlagRateLow", [series("triton_al_items_flagged_total", {**STEP, "reason": "uncertain"}, "0x200"),
                             series("triton_al_items_scored_total", STEP, "0x200")],
     "120m", {"namespace": "prod", "model": "active_learning"}, None, False),  # no traffic: nothing to flag
    ("TritonALInvalidOutputs", [series("triton_al_items_flagged_total", {**STEP, "reason": "invalid_output"}, "0+5x120"),
                                series("triton_al_items_scored_total", STEP, "0+100x120")],
     "60m", {"namespace": "prod", "model": "active_learning"}, "5%", True),
    ("TritonALScoreDrift", [series("triton_al_score_drift", {**POD, "model": "active_learning", "scored_model": "fashion_cnn",
                                                             "version": "2", "statistic": "psi"}, "0.5x30")],
     "11m", {"namespace": "prod", "model": "active_learning", "scored_model": "fashion_cnn", "version": "2"}, "0.50", True),  # not "500m", as humanize writes it
    ("TritonALScoreDrift", [series("triton_al_score_drift", {**POD, "model": "active_learning", "scored_model": "fashion_cnn",
                                                             "version": "2", "statistic": "psi"}, "0.1x30")],
     "11m", {"namespace": "prod", "model": "active_learning", "scored_model": "fashion_cnn", "version": "2"}, None, False),
    ("TritonALFlagRateOutOfBand", [series("triton_al_flag_rate_out_of_band", {**POD, "model": "active_learning",
                                                                              "scored_model": "fashion_cnn", "version": "2"}, "1x30")],
     "16m", {"namespace": "prod", "model": "active_learning", "scored_model": "fashion_cnn", "version": "2"}, None, True),
]


def rules() -> dict[str, dict]:
    spec = yaml.safe_load(ALERTS.read_text())["spec"]
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"] if "alert" in r}


def rendered(template: str, labels: dict[str, str], value_text: str | None) -> str:
    """The rule's annotation as Prometheus renders it for these labels and this value."""
    def fill(m: re.Match) -> str:
        expr = m.group(1).strip()
        if expr.startswith("$labels."):
            return labels.get(expr[len("$labels."):], "")
        if expr.startswith("$value") or expr.endswith("$value"):
            assert value_text is not None, f"the case must state how {{{{ {expr} }}}} renders"
            return value_text
        raise AssertionError(f"a template this test does not know: {expr}")

    return re.sub(r"\{\{(.*?)\}\}", fill, template)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    """alerts.yaml's `spec` as the plain rules file a Prometheus without the operator loads."""
    out = tmp_path_factory.mktemp("rules") / "rules.yaml"
    out.write_text(yaml.safe_dump({"groups": yaml.safe_load(ALERTS.read_text())["spec"]["groups"]}))
    return out


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def test_promtool_loads_every_rule(rules_file):
    done = promtool("check", "rules", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def unit_tests(rules_file: Path, cases) -> dict:
    by_name = rules()
    tests = []
    for alert, inputs, at, labels, value_text, fires in cases:
        rule = by_name[alert]
        expected = []
        if fires:
            expected.append({"exp_labels": {**labels, **rule.get("labels", {})},
                             "exp_annotations": {k: rendered(v, labels, value_text) for k, v in rule["annotations"].items()}})
        tests.append({"interval": "1m", "input_series": inputs,
                      "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}]})
    return {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}


def test_each_alert_fires_on_its_condition_and_not_on_healthy_series(rules_file, tmp_path):
    assert {c[0] for c in CASES} == set(rules()), "every alert has a case here (and no case names a rule that is gone)"
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(unit_tests(rules_file, CASES), sort_keys=False))
    done = promtool("test", "rules", str(spec))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "SUCCESS" in done.stdout


def test_a_wrong_expectation_fails(rules_file, tmp_path):
    """The harness can fail: the backlog alert expected on a young backlog, and the flag-rate
    alert expected without its model label, are both reported by promtool."""
    wrong = [("TritonALBacklogTooOld", [series("triton_al_uploader_oldest_item_age_seconds", {**UPLOADER, "group": "g"}, "600x30")],
              "16m", {**POD, "group": "g"}, "10m 0s", True),
             ("TritonALFlagRateHigh", [series("triton_al_items_flagged_total", {**STEP, "reason": "uncertain"}, "0+30x120"),
                                       series("triton_al_items_scored_total", STEP, "0+100x120")],
              "90m", {"namespace": "prod"}, "30%", True)]
    for case in wrong:
        spec = tmp_path / f"{case[0]}.yaml"
        spec.write_text(yaml.safe_dump(unit_tests(rules_file, [case]), sort_keys=False))
        done = promtool("test", "rules", str(spec))
        assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr, case[0]
