"""A real Prometheus (Debian's prometheus package, installed by scripts/test.sh) scraping
servers the tests started, on a free 127.0.0.1 port, stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from process_helpers import stop_process

from triton_al.serving.server import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def query(self, promql: str) -> list[dict]:
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(address, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, predicate, timeout_s: float, what: str) -> float | None:
        """Polls an instant query until `predicate(value)`; fails naming `what`."""
        deadline, value = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            value = self.value(promql)
            if value is not None and predicate(value):
                return value
            time.sleep(0.25)
        raise AssertionError(f"Prometheus never showed {what} within {timeout_s} s (last {promql} = {value})")


@contextlib.contextmanager
def running_prometheus(tmp: Path, targets: Sequence[tuple[str, dict[str, str]]], *, job: str = "triton-al",
                       scrape_interval: str = "1s") -> Iterator[Prometheus]:
    """Prometheus scraping each `(metrics_url, extra target labels)`: one job per metrics
    path (`job`, then `job-2`, ... for the other paths)."""
    tmp.mkdir(parents=True, exist_ok=True)
    by_path: dict[str, list[dict]] = {}
    for metrics_url, labels in targets:
        parts = urllib.parse.urlsplit(metrics_url)
        by_path.setdefault(parts.path or "/metrics", []).append({"targets": [parts.netloc], "labels": dict(labels)})
    jobs = [{"job_name": job if i == 0 else f"{job}-{i + 1}", "metrics_path": path, "static_configs": configs}
            for i, (path, configs) in enumerate(by_path.items())]
    config = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}, "scrape_configs": jobs}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"Prometheus exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus not ready in 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        prometheus = Prometheus(url, proc, log)
        prometheus.wait_for("count(up == 1)", lambda v: v == len(targets), 30, "every target up")
        yield prometheus
    finally:
        stop_process(proc)
