"""The upload loop: take due items from the outbox, hand them to the sink, record the verdict.

Delivery is at-least-once: an item leaves the outbox only after the sink confirmed it, so
a crash between the two repeats the upload, and sinks write idempotently by content hash.
Whole-batch failures (sink down, credentials refused) back off the whole loop, so work is
neither lost nor reordered; one item's transient failure backs off that item alone; a
permanent rejection moves it to the dead letters.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from triton_al.outbox import Outbox, OutboxBusy, QueuedItem
from triton_al.sinks.base import PermanentSinkError, Sink, SinkAuthError, SinkError, Upload
from triton_al.uploader.limits import RateLimit, limits_for

log = logging.getLogger("triton_al.uploader")
SIGNAL_CHECK_S = 0.25


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base·2ⁿ)),
    but at least `floor` so a hot loop is impossible."""

    base_s: float = 0.5
    cap_s: float = 60.0
    floor_s: float = 0.05

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return max(self.floor_s, rng.uniform(0.0, ceiling))


@dataclass
class BatchOutcome:
    uploaded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    sink_failed: bool = False


@dataclass
class Uploader:
    outbox: Outbox
    sink: Sink
    batch_size: int = 64
    poll_interval_s: float = 0.2
    backoff: Backoff = field(default_factory=Backoff)
    limits: dict[str, list[RateLimit]] = field(default_factory=dict)
    rate_overflow: str = "keep"
    """Items over a group's rate limit or budget: `keep` them queued, or `drop` them (counted)."""
    max_attempts: int = 20
    """Per-item transient failures before the item is dead-lettered (a whole sink being down never counts)."""
    metrics: object | None = None
    clock: Callable[[], float] = time.time
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rate_overflow not in ("keep", "drop"):
            raise ValueError(f"rate_overflow: expected 'keep' or 'drop', got {self.rate_overflow!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        self._rng = random.Random(self.seed)
        # A plain flag, not an Event: setting it takes no lock, so a signal handler may.
        self._stop_requested = False
        self._wake = threading.Event()
        self.sink_failures = 0
        self.sink_retry_at = 0.0
        self.last_error = ""
        self._ignore_backoff = False
        self._step_lock = threading.Lock()  # `flush` (admin thread) and `run` take turns

    # Control (signal handlers and the admin API call these from other threads) ---------

    def stop(self) -> None:
        """Finish the batch in flight, then return from `run` (call from any thread)."""
        self._stop_requested = True
        self._wake.set()

    def stop_from_signal(self) -> None:
        """The same, safe inside a signal handler: it skips the wake-up, whose Event.set
        would take a lock the interrupted main thread may hold in Event.wait (a deadlock).
        `run` notices within `SIGNAL_CHECK_S`."""
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def wake(self) -> None:
        self._wake.set()

    def sink_backoff_remaining(self) -> float:
        return max(0.0, self.sink_retry_at - self.clock())

    # The loop ----------------------------------------------------------------------

    def run(self) -> None:
        log.info("uploader started: %s -> %s", self.outbox.path, self.sink.describe())
        while not self.stopping:
            wait = self.sink_backoff_remaining()
            if wait <= 0:
                try:
                    outcome = self.step()
                except OutboxBusy as e:  # another process held the outbox too long: try again
                    log.warning("outbox busy, retrying in %.2f s: %s", self.poll_interval_s, e)
                    outcome = None
                if outcome is not None and not outcome.sink_failed:
                    continue  # more may be due: no sleep between full batches
                wait = self.sink_backoff_remaining() or self.poll_interval_s
            self._wake.wait(min(wait, SIGNAL_CHECK_S))
            self._wake.clear()
        log.info("uploader stopped")

    def step(self, *, ignore_backoff: bool = False) -> BatchOutcome | None:
        """Upload one batch; None when nothing was due."""
        with self._step_lock:
            return self._step(ignore_backoff)

    def _step(self, ignore_backoff: bool) -> BatchOutcome | None:
        now = self.clock()
        allowance = self._allowance(now)
        exclude = [g for g, n in allowance.items() if n <= 0] if self.rate_overflow == "keep" else []
        batch = self.outbox.due(self.batch_size, now=now, exclude_groups=exclude, ignore_backoff=ignore_backoff or self._ignore_backoff)
        if not batch:
            return None
        batch, over = self._apply_limits(batch, allowance)
        outcome = BatchOutcome()
        if over:
            self.outbox.drop([i.id for i in over], "dropped_rate_limit")
            outcome.dropped = len(over)
            log.warning("dropped %d items over their group's rate limit or budget", len(over))
        if not batch:
            return outcome
        return self._upload(batch, outcome)

    def _allowance(self, now: float) -> dict[str, int]:
        """How many more items each rate-limited group may deliver right now."""
        if not self.limits:
            return {}
        groups = {s.upload_group for s in self.outbox.status() if s.queued}
        allowance = {}
        for group in groups:
            rules = limits_for(self.limits, group)
            if rules:
                allowance[group] = min(r.count - self.outbox.delivered_since(group, now - r.window_s) for r in rules)
        return allowance

    def _apply_limits(self, batch: list[QueuedItem], allowance: dict[str, int]) -> tuple[list[QueuedItem], list[QueuedItem]]:
        if not allowance:
            return batch, []
        left = dict(allowance)
        keep, over = [], []
        for item in batch:
            if item.upload_group not in left:
                keep.append(item)
            elif left[item.upload_group] > 0:
                left[item.upload_group] -= 1
                keep.append(item)
            elif self.rate_overflow == "drop":
                over.append(item)
            # else: stays queued until the window frees up
        return keep, over

    def _upload(self, batch: list[QueuedItem], outcome: BatchOutcome) -> BatchOutcome:
        uploads = [Upload(i.upload_group, i.content_hash, i.asset, i.media_type, i.metadata()) for i in batch]
        started = time.perf_counter()
        try:
            results = self.sink.upload(uploads)
            if len(results) != len(batch):
                raise SinkError(f"sink returned {len(results)} results for {len(batch)} uploads")
        except Exception as e:  # the whole batch failed: back off the sink, keep order
            self._sink_failed(batch, e)
            outcome.sink_failed = True
            outcome.failed = len(batch)
            return outcome
        elapsed = time.perf_counter() - started
        now = self.clock()
        delivered, retry, dead = [], [], []
        for item, result in zip(batch, results):
            if result is None:
                delivered.append(item.id)
            elif isinstance(result, PermanentSinkError):
                dead.append((item.id, str(result)))
            elif item.attempts + 1 >= self.max_attempts:
                dead.append((item.id, f"gave up after {item.attempts + 1} attempts: {result}"))
            else:
                retry.append((item.id, str(result), now + self.backoff.delay(item.attempts + 1, self._rng)))
        # Record the sink's verdicts; a crash before this line repeats the (idempotent) upload.
        self.outbox.mark_delivered(delivered, now=now)
        self.outbox.dead_letter(dead, now=now)
        self.outbox.mark_failed(retry)
        self.outbox.checkpoint("PASSIVE")
        self.sink_failures = 0
        self.sink_retry_at = 0.0
        outcome.uploaded, outcome.failed, outcome.dead_lettered = len(delivered), len(retry), len(dead)
        for _, error in dead:
            log.error("dead-lettered an item: %s", error)
        if retry:
            self.last_error = retry[-1][1]
            log.warning("%d items failed and will be retried; last error: %s", len(retry), self.last_error)
        if self.metrics is not None:
            self.metrics.observe_batch(elapsed, outcome)
        return outcome

    def _sink_failed(self, batch: list[QueuedItem], error: Exception) -> None:
        self.sink_failures += 1
        delay = self.backoff.delay(self.sink_failures, self._rng)
        self.sink_retry_at = self.clock() + delay
        kind = "auth" if isinstance(error, SinkAuthError) else "unavailable" if isinstance(error, SinkError) else "error"
        self.last_error = f"{type(error).__name__}: {error}"
        # Attempts are counted for visibility, but the items stay due: when the sink is
        # back they go first, in their original order.
        self.outbox.mark_failed([(i.id, self.last_error, 0.0) for i in batch])
        if isinstance(error, SinkError):
            log.warning("sink %s failed (%s, attempt %d): %s; retrying in %.2f s",
                        self.sink.describe(), kind, self.sink_failures, error, delay)
        else:
            log.exception("sink %s raised an unexpected error; retrying in %.2f s", self.sink.describe(), delay)
        if self.metrics is not None:
            self.metrics.observe_sink_failure(kind, len(batch), delay)

    def flush(self, timeout_s: float = 30.0) -> tuple[int, int, bool]:
        """Upload everything due or backing off now (the admin API's Flush).

        Call from another thread while `run` is running, or alone; returns
        (uploaded, still queued, complete)."""
        deadline = time.monotonic() + timeout_s
        uploaded = 0
        while time.monotonic() < deadline and not self.stopping:
            if self.sink_backoff_remaining() > 0:
                time.sleep(min(0.05, self.sink_backoff_remaining()))
                continue
            outcome = self.step(ignore_backoff=True)
            if outcome is None:
                break
            uploaded += outcome.uploaded
            if outcome.uploaded == 0 and outcome.dropped == 0 and outcome.dead_lettered == 0:
                time.sleep(0.05)
        queued = sum(s.queued for s in self.outbox.status() if not s.paused)
        return uploaded, queued, queued == 0
