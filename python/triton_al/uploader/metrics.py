"""Prometheus metrics of the uploader, served on `/metrics`.

Queue state and totals are read from the outbox at scrape time (the outbox keeps them for
every process, so writer-side counts such as duplicates and overflow drops appear here
too); batch latency and sink failures are measured in this process.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from triton_al.outbox import Outbox, OutboxError
from triton_al.uploader.near_duplicates import COUNTER_PREFIX as NEAR_DUPLICATES_PREFIX

# outbox counter name -> (metric name, help, labels)
OUTBOX_COUNTERS = {
    "appended": ("triton_al_outbox_appended", "Items queued (one per upload group)", {}),
    "duplicates": ("triton_al_outbox_duplicates", "Items not queued: same image already queued or delivered for that group", {}),
    "uploaded": ("triton_al_uploader_uploaded", "Items the sink confirmed", {}),
    "retries": ("triton_al_uploader_retries", "Failed upload attempts that will be retried", {}),
    "dead_lettered": ("triton_al_uploader_dead_lettered", "Items moved to the dead letters", {}),
    "dead_letters_retried": ("triton_al_uploader_dead_letters_retried", "Dead letters queued again by command", {}),
    "dropped_overflow": ("triton_al_outbox_dropped", "Items dropped, by reason", {"reason": "overflow"}),
    "evicted_overflow": ("triton_al_outbox_dropped", "Items dropped, by reason", {"reason": "evicted"}),
    "dropped_rate_limit": ("triton_al_outbox_dropped", "Items dropped, by reason", {"reason": "rate_limit"}),
    "dead_letters_purged": ("triton_al_uploader_dead_letters_purged", "Dead letters deleted by their bounds or by command", {}),
    "delivered_forgotten": ("triton_al_uploader_delivered_forgotten", "Delivery records forgotten (dedup memory bounded, or --forget-deliveries)", {}),
}


class OutboxCollector(Collector):
    """Reads the outbox at scrape time; yields nothing from it while it is unusable (the
    `triton_al_uploader_outbox_usable` gauge says so) rather than failing the scrape."""

    def __init__(self, outbox: Outbox | Callable[[], Outbox | None]) -> None:
        self._outbox = outbox if callable(outbox) and not isinstance(outbox, Outbox) else (lambda: outbox)

    def collect(self):
        outbox = self._outbox()
        if outbox is None:
            return
        try:
            counters = outbox.counters()
            status = outbox.status()
        except (OutboxError, sqlite3.Error):
            return
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, help_text, labels) in OUTBOX_COUNTERS.items():
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), counters.get(key, 0))
        yield from families.values()
        near = CounterMetricFamily("triton_al_uploader_near_duplicates", "Items not uploaded: within the near-duplicate distance "
                                   "of an item queued or delivered for that group, by perceptual hash (--near-duplicate-distance) "
                                   "or by the model's embedding (--near-duplicate-embedding-distance)", labels=["group"])
        for key, value in counters.items():
            if key.startswith(NEAR_DUPLICATES_PREFIX):
                near.add_metric([key[len(NEAR_DUPLICATES_PREFIX):]], value)
        yield near
        yield GaugeMetricFamily("triton_al_outbox_bytes", "Bytes of queued items: assets once, plus their embeddings (what the outbox's max_bytes bounds)", value=counters.get("stored_bytes", 0))
        yield GaugeMetricFamily("triton_al_uploader_dead_letter_bytes", "Bytes held by dead letters only (assets and embeddings)", value=counters.get("dead_letter_bytes", 0))
        queued = GaugeMetricFamily("triton_al_uploader_queued", "Items waiting for upload", labels=["group"])
        dead = GaugeMetricFamily("triton_al_uploader_dead_letters", "Items in the dead letters", labels=["group"])
        age = GaugeMetricFamily("triton_al_uploader_oldest_item_age_seconds", "Age of the oldest queued item", labels=["group"])
        paused = GaugeMetricFamily("triton_al_uploader_paused", "1 when the group is paused", labels=["group"])
        now = time.time()
        for s in status:
            queued.add_metric([s.upload_group], s.queued)
            dead.add_metric([s.upload_group], s.dead_letters)
            age.add_metric([s.upload_group], max(0.0, now - s.oldest_created_at) if s.oldest_created_at else 0.0)
            paused.add_metric([s.upload_group], 1.0 if s.paused else 0.0)
        yield from (queued, dead, age, paused)


class UploaderMetrics:
    def __init__(self, outbox: Outbox | Callable[[], Outbox | None], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(OutboxCollector(outbox))
        self.upload_seconds = Histogram(
            "triton_al_uploader_batch_seconds", "Time for the sink to confirm a batch", registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_items = Histogram(
            "triton_al_uploader_batch_items", "Items per uploaded batch", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.sink_failures = Counter(
            "triton_al_uploader_sink_failures", "Whole batches the sink failed, by kind (unavailable, auth, error)",
            ["kind"], registry=self.registry,
        )
        self.backoff = Gauge("triton_al_uploader_backoff_seconds", "Current wait before retrying the sink", registry=self.registry)
        self.backoff_total = Counter("triton_al_uploader_backoff_waited_seconds", "Seconds spent backing off an unavailable sink", registry=self.registry)
        self.isolations = Counter("triton_al_uploader_isolations", "Batches that failed as a whole and were split to find the items failing alone", registry=self.registry)
        self.isolated_items = Counter("triton_al_uploader_isolated_items", "Items the sink failed on alone while accepting others", registry=self.registry)
        self.outbox_usable = Gauge("triton_al_uploader_outbox_usable", "1 when the outbox file can be used, 0 while it cannot (corrupt, unreadable); see the log", registry=self.registry)
        self.outbox_usable.set(1)
        self.outbox_errors = Counter("triton_al_uploader_outbox_errors", "Failed attempts to use the outbox file", registry=self.registry)
        # Label pulls (--pull-labels-every): samples appear once pulls are enabled.
        self.label_pulls = Counter("triton_al_label_pulls", "Scheduled label pulls, by outcome (ok, failed, stopped)", ["outcome"],
                                   registry=self.registry)
        self.labels_pulled = Counter("triton_al_labels_pulled", "Labels brought into the store by scheduled pulls, by kind (new, relabelled)",
                                     ["kind"], registry=self.registry)
        self.label_pull_fetched = Counter("triton_al_label_pull_items_fetched", "Labelled items fetched from the sink into the store",
                                          registry=self.registry)
        self.label_pull_not_taken = Gauge("triton_al_label_pull_not_taken",
                                          "Annotations the last label pull reported and did not take (unmappable; see the log)",
                                          registry=self.registry)
        self.label_pull_seconds = Histogram("triton_al_label_pull_seconds", "Time a scheduled label pull took", registry=self.registry,
                                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.label_pull_last_success = Gauge("triton_al_label_pull_last_success_timestamp_seconds",
                                             "When the last label pull that succeeded started (Unix time)", registry=self.registry)

    def enable_label_pulls(self) -> None:
        """Show the label-pull counters at zero from the start (for rates and alerts)."""
        for outcome in ("ok", "failed", "stopped"):
            self.label_pulls.labels(outcome)
        for kind in ("new", "relabelled"):
            self.labels_pulled.labels(kind)

    def observe_label_pull(self, pull) -> None:
        self.label_pulls.labels(pull.outcome).inc()
        self.label_pull_seconds.observe(pull.seconds)
        if pull.outcome == "ok":
            self.label_pull_last_success.set(pull.started_at)
        self.labels_pulled.labels("new").inc(pull.new)
        self.labels_pulled.labels("relabelled").inc(pull.relabelled)
        self.label_pull_fetched.inc(pull.fetched)
        if pull.outcome == "ok":
            self.label_pull_not_taken.set(pull.problems)

    def observe_batch(self, seconds: float, outcome) -> None:
        self.upload_seconds.observe(seconds)
        self.batch_items.observe(outcome.uploaded + outcome.failed + outcome.dead_lettered)
        self.backoff.set(0)

    def observe_isolation(self, items: int) -> None:
        self.isolations.inc()
        self.isolated_items.inc(items)

    def observe_outbox(self, *, usable: bool) -> None:
        self.outbox_usable.set(1 if usable else 0)
        if not usable:
            self.outbox_errors.inc()

    def observe_sink_failure(self, kind: str, items: int, delay: float) -> None:
        self.sink_failures.labels(kind).inc()
        self.backoff.set(delay)
        self.backoff_total.inc(delay)


def serve_metrics(registry: CollectorRegistry, address: str, port: int):
    """Start `/metrics` on a background thread; returns (server, bound port)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, server.server_port
