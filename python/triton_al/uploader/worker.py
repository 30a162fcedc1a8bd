"""The upload loop: take due items from the outbox, hand them to the sink, record the verdict.

Delivery is at-least-once: an item leaves the outbox only after the sink confirmed it, so
a crash between the two repeats the upload, and sinks write idempotently by content hash.

- One item's failure (the sink's verdict for it) backs off that item alone, with its own
  exponential backoff; a permanent rejection moves it to the dead letters; so does the
  `max_attempts`-th failure.
- A whole batch failing (the sink raised) is *isolated*: the uploader asks whether the
  sink answers at all (re-uploading a small asset it accepted before, idempotent) and
  bisects the batch (random half first) to find the item(s) that fail alone. An item the sink fails on alone
  while it accepts others is dead-lettered with the reason when the error is not a
  `SinkError` (the sink crashed on it) or is permanent, and retried with backoff otherwise.
  When nothing goes through, the sink is down: the whole loop backs off (exponential,
  jitter), no attempt of any item is spent, and the queue keeps its order.
- An outbox that cannot be used (corrupt, unreadable, not SQLite) is reported (log line,
  metric, admin status) and opened again with backoff; the process stays up.

Durations (backoff, deadlines) use the monotonic clock; times stored in the outbox use the
wall clock and are read so that a clock step cannot stall delivery (see `Outbox`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from triton_al.outbox import Outbox, OutboxBusy, OutboxError, QueuedItem, SinkChanged
from triton_al.sinks.base import PermanentSinkError, Sink, SinkAuthError, SinkError, Upload
from triton_al.uploader.limits import RateLimit, limits_for
from triton_al.uploader.near_duplicates import COUNTER_PREFIX as NEAR_DUPLICATES_PREFIX
from triton_al.uploader.near_duplicates import UnsettledScreening

log = logging.getLogger("triton_al.uploader")
SIGNAL_CHECK_S = 0.25
DAY_S = 86400.0


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


@dataclass(frozen=True)
class Bounds:
    """What the uploader keeps of finished work (checked at start and every `interval_s`)."""

    dead_letter_max_age_s: float = 14 * DAY_S
    dead_letter_max_count: int = 10_000
    dead_letter_max_bytes: int = 256 * 1024**2
    """Asset bytes dead letters may hold (they do not count against the outbox's `max_bytes`)."""
    delivered_max_age_s: float = 30 * DAY_S
    """How long a delivery is remembered for dedup (never less than the longest rate window)."""
    delivered_max_rows: int = 500_000
    interval_s: float = 60.0


@dataclass
class BatchOutcome:
    uploaded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    sink_failed: bool = False
    isolated: int = 0
    """Items the sink failed on alone, found by splitting a batch that failed as a whole."""
    held: int = 0
    """Items the fleet ledger kept queued this time (another replica's claim, budget spent, ledger down)."""
    elsewhere: int = 0
    """Items another replica had delivered: recorded as delivered without an upload."""
    near_duplicates: int = 0
    """Items within the near-duplicate distance of one queued or delivered before: counted, not uploaded."""
    delivered_ids: list[int] = field(default_factory=list)

    @property
    def only_held(self) -> bool:
        """Nothing happened but items held back: wait before asking again."""
        return bool(self.held) and not (self.uploaded or self.failed or self.dead_lettered or self.dropped or self.elsewhere)


@dataclass
class FlushResult:
    uploaded: int
    still_queued: int
    complete: bool
    """Nothing left in the queue (paused groups aside)."""
    timed_out: bool
    """The deadline passed while items could still have been delivered (backing off, sink down)."""
    last_error: str = ""


class _Alone:
    """The verdict for an item that failed when uploaded alone while the sink accepted others."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_UNDECIDED = object()


@dataclass
class Uploader:
    outbox: Outbox | None
    """None until `open_outbox` manages to open it (see `run`)."""
    sink: Sink
    batch_size: int = 64
    batch_max_bytes: int = 32 * 1024**2
    """Asset bytes per batch (a batch holds at least one item, however big)."""
    poll_interval_s: float = 0.2
    backoff: Backoff = field(default_factory=Backoff)
    limits: dict[str, list[RateLimit]] = field(default_factory=dict)
    rate_overflow: str = "keep"
    """Items over a group's rate limit or budget: `keep` them queued, or `drop` them (counted)."""
    max_attempts: int = 20
    """Per-item failures before the item is dead-lettered (a whole sink being down never counts)."""
    metrics: Any | None = None
    clock: Callable[[], float] = time.time
    """Wall clock: times stored in the outbox (retry times, deliveries, rate windows)."""
    monotonic: Callable[[], float] = time.monotonic
    """For durations: sink backoff, deadlines."""
    seed: int | None = None
    bounds: Bounds = field(default_factory=Bounds)
    open_outbox: Callable[[], Outbox] | None = None
    """Opens (and prepares) the outbox; called again with backoff while it fails."""
    isolation_budget_s: float = 30.0
    """Longest time spent probing a failed batch before calling the sink down."""
    fleet: Any | None = None
    """A `ledger.FleetGate`: budgets and claims shared by a fleet of uploaders (`--budget-ledger`)."""
    near_duplicates: Any | None = None
    """A `near_duplicates.NearDuplicateIndex` (`--near-duplicate-distance`, `--near-duplicate-embedding-distance`), or None: off."""
    selection: Any | None = None
    """A `selection.Selector` (`--selection`): which items go when a group's budget binds; None: FIFO."""

    def __post_init__(self) -> None:
        if self.rate_overflow not in ("keep", "drop"):
            raise ValueError(f"rate_overflow: expected 'keep' or 'drop', got {self.rate_overflow!r}")
        if self.batch_size <= 0 or self.batch_max_bytes <= 0:
            raise ValueError(f"batch_size and batch_max_bytes must be positive, got {self.batch_size} and {self.batch_max_bytes}")
        if self.outbox is None and self.open_outbox is None:
            raise ValueError("give an outbox or a way to open it")
        self._rng = random.Random(self.seed)
        # A plain flag, not an Event: setting it takes no lock, so a signal handler may.
        self._stop_requested = False
        self._wake = threading.Event()
        self.sink_failures = 0
        self.sink_retry_at = 0.0  # on the monotonic clock
        self.last_error = ""
        self.outbox_error = ""
        self._outbox_failures = 0
        self._outbox_retry_at = 0.0
        self._maintained_at: float | None = None
        self._canary: Upload | None = None  # a small upload the sink accepted: re-uploading it is idempotent
        self._step_lock = threading.Lock()  # `flush` (admin thread) and `run` take turns
        self._outbox_lock = threading.Lock()

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
        return max(0.0, self.sink_retry_at - self.monotonic())

    # The outbox: opened, and opened again, with backoff ---------------------------------

    def ensure_outbox(self) -> bool:
        """True when the outbox is usable; otherwise try to (re)open it once its backoff
        has passed. A `SinkChanged` (wrong sink for this outbox) is not retried: it is raised."""
        if self.outbox is not None and not self.outbox_error:
            return True
        with self._outbox_lock:  # `run` and an admin flush may both get here
            if self.outbox is not None and not self.outbox_error:
                return True
            if self.monotonic() < self._outbox_retry_at:
                return False
            return self._open_outbox()

    def _open_outbox(self) -> bool:
        try:
            if self.open_outbox is not None:  # the whole opening again: the file may be a new one
                fresh, stale = self.open_outbox(), self.outbox
                self.outbox = fresh
                if stale is not None and stale is not fresh:
                    stale.close()
            else:
                assert self.outbox is not None
                self.outbox.prepare_for_uploader()  # reconnects, reads and writes: a real probe
        except SinkChanged:
            raise
        except OutboxError as e:
            self._outbox_failed(e)
            return False
        if self.outbox_error:
            log.warning("outbox %s is usable again", self.outbox.path)
        self.outbox_error = ""
        self._outbox_failures = 0
        if self.metrics is not None:
            self.metrics.observe_outbox(usable=True)
        return True

    def _outbox_failed(self, error: OutboxError) -> None:
        self._outbox_failures += 1
        delay = self.backoff.delay(self._outbox_failures, self._rng)
        self._outbox_retry_at = self.monotonic() + delay
        self.outbox_error = str(error)
        if self.outbox is not None:
            try:
                self.outbox.close()  # the next use opens the file again
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
        log.error("the outbox is unusable (attempt %d), trying again in %.1f s: %s", self._outbox_failures, delay, error)
        if self.metrics is not None:
            self.metrics.observe_outbox(usable=False)

    def outbox_retry_in(self) -> float:
        return max(0.0, self._outbox_retry_at - self.monotonic())

    # The loop ----------------------------------------------------------------------

    def run(self) -> None:
        log.info("uploader started: %s", self.sink.describe())
        if self.outbox is not None and self.open_outbox is None and not self.outbox_error:
            try:
                self.outbox.prepare_for_uploader()
            except OutboxError as e:
                self._outbox_failed(e)
        while not self.stopping:
            if not self.ensure_outbox():
                self._wait(self.outbox_retry_in() or self.poll_interval_s)
                continue
            wait = self.sink_backoff_remaining()
            if wait <= 0:
                try:
                    self.maintain()
                    outcome = self.step()
                except OutboxBusy as e:  # another process held the outbox too long: try again
                    log.warning("outbox busy, retrying in %.2f s: %s", self.poll_interval_s, e)
                    outcome = None
                except OutboxError as e:
                    self._outbox_failed(e)
                    continue
                if outcome is not None and not outcome.sink_failed and not outcome.only_held:
                    continue  # more may be due: no sleep between full batches
                wait = self.sink_backoff_remaining() or self.poll_interval_s
            self._wait(wait)
        log.info("uploader stopped")

    def _wait(self, seconds: float) -> None:
        self._wake.wait(min(seconds, SIGNAL_CHECK_S))
        self._wake.clear()

    def maintain(self, *, force: bool = False) -> None:
        """Keep the outbox bounded (every `bounds.interval_s`): dead letters by age, count and
        bytes; delivery records by age and count (never inside the longest rate window);
        deliveries dated in the future (a clock step) dated now."""
        now_m = self.monotonic()
        if not force and self._maintained_at is not None and now_m - self._maintained_at < self.bounds.interval_s:
            return
        self._maintained_at = now_m
        assert self.outbox is not None
        b, now = self.bounds, self.clock()
        self.outbox.clamp_future(now=now)
        purged = self.outbox.purge_dead_letters(
            older_than_s=b.dead_letter_max_age_s, keep=b.dead_letter_max_count, max_bytes=b.dead_letter_max_bytes, now=now)
        if purged:
            log.warning("purged %d dead letters (bounds: %.0f s, %d letters, %d bytes)", purged,
                        b.dead_letter_max_age_s, b.dead_letter_max_count, b.dead_letter_max_bytes)
        longest = max((r.window_s for rules in self.limits.values() for r in rules), default=0.0)
        trimmed = self.outbox.trim_delivered(max_age_s=b.delivered_max_age_s, max_rows=b.delivered_max_rows,
                                             keep_since=now - longest, now=now)
        if trimmed:
            log.info("forgot %d old delivery records (dedup memory bounded to %.0f s and %d records)", trimmed,
                     b.delivered_max_age_s, b.delivered_max_rows)
        if self.near_duplicates is not None:
            try:
                self.near_duplicates.maintain(now=now)
            except Exception as e:  # noqa: BLE001 - its bounds are checked again next time
                log.error("near-duplicate index: could not apply its bounds: %s: %s", type(e).__name__, e)

    def step(self, *, ignore_backoff: bool = False) -> BatchOutcome | None:
        """Upload one batch; None when nothing was due."""
        with self._step_lock:
            if self.outbox is None or self.outbox_error:
                return None
            return self._step(ignore_backoff)

    def _step(self, ignore_backoff: bool) -> BatchOutcome | None:
        assert self.outbox is not None
        now = self.clock()
        allowance = self._allowance(now)
        held = self._held_back(allowance)
        if self.fleet is not None:
            held += self.fleet.held_groups(self.outbox.queued_groups)
        batch, chosen_for = self._selected(allowance, held, now, ignore_backoff)
        if len(batch) < self.batch_size:
            batch += self.outbox.due(self.batch_size - len(batch), now=now, exclude_groups=held + chosen_for,
                                     ignore_backoff=ignore_backoff, max_bytes=self.batch_max_bytes,
                                     max_delay_s=self.backoff.cap_s)
        if not batch:
            if self.fleet is not None and self.fleet.error:
                self.last_error = self.fleet.error
            return None
        outcome = BatchOutcome()
        if self.near_duplicates is not None:
            batch = self._suppress_near_duplicates(batch, outcome, now)
            if not batch:
                return outcome
        batch, over = self._apply_limits(batch, allowance)
        if self.fleet is not None:
            return self._fleet_upload(batch, over, outcome, now)
        if over:
            self._forget_near_duplicates(over)
            self.outbox.drop([i.id for i in over], "dropped_rate_limit")
            outcome.dropped = len(over)
            log.warning("dropped %d items over their group's rate limit or budget", len(over))
        if not batch:
            return outcome
        return self._upload(batch, outcome)

    def _suppress_near_duplicates(self, batch: list[QueuedItem], outcome: BatchOutcome, now: float) -> list[QueuedItem]:
        """Items within the distance of one queued or delivered before in their group leave
        the outbox uncounted as uploads (counted per group as near-duplicates, and on the
        first one in the index); the rest go on. A failing index lets everything through."""
        assert self.outbox is not None and self.near_duplicates is not None
        try:
            matches = self.near_duplicates.screen(batch, now=now)
        except UnsettledScreening as e:  # the fleet must see the batch's entries before it goes; claims hold it meanwhile
            log.debug("near-duplicate index: %s", e)
            if self.fleet is not None:
                self.fleet.check()  # the gate's own view (and hint: a refused password, a certificate) of the ledger
            self.last_error = (self.fleet.error if self.fleet is not None else "") or str(e)
            outcome.held += len(batch)
            return []
        except Exception as e:  # noqa: BLE001 - the index only saves uploads: never stop delivery for it
            log.error("near-duplicate index: %s: %s; uploading this batch unscreened", type(e).__name__, e)
            return batch
        if not matches:
            return batch
        by_group: dict[str, list[int]] = {}
        for m in matches:
            by_group.setdefault(m.upload_group, []).append(m.item_id)
        for group, ids in by_group.items():
            self.outbox.drop(ids, f"{NEAR_DUPLICATES_PREFIX}{group}")
        try:
            self.near_duplicates.record(matches, now=now)
        except Exception as e:  # noqa: BLE001 - the evidence only
            log.error("near-duplicate index: could not count %d near-duplicates: %s", len(matches), e)
        outcome.near_duplicates = len(matches)
        by_embedding = sum(1 for m in matches if getattr(m, "kind", "hash") == "embedding")
        kinds = []
        if len(matches) > by_embedding:
            kinds.append(f"{len(matches) - by_embedding} by hash, within {self.near_duplicates.max_distance} bits")
        if by_embedding:
            kinds.append(f"{by_embedding} by embedding, within cosine distance "
                         f"{getattr(self.near_duplicates, 'max_embedding_distance', 0.0):g}")
        remote = sum(1 for m in matches if getattr(m, "origin", None) is not None)
        fleet = f", {remote} of them of another replica's" if remote else ""
        log.info("%d near-duplicates not uploaded (%s of an item queued or delivered%s)", len(matches), "; ".join(kinds), fleet)
        gone = {m.item_id for m in matches}
        return [i for i in batch if i.id not in gone]

    def _forget_near_duplicates(self, items: list[QueuedItem]) -> None:
        """Items leaving the outbox undelivered leave the near-duplicate index (first: a crash
        in between only hashes them again)."""
        if self.near_duplicates is None or not items:
            return
        try:
            self.near_duplicates.forget(items)
        except Exception as e:  # noqa: BLE001
            log.error("near-duplicate index: could not forget %d items: %s", len(items), e)

    def _selected(self, allowance: dict[str, int], held: list[str], now: float,
                  ignore_backoff: bool) -> tuple[list[QueuedItem], list[str]]:
        """`--selection`: for each group whose budget binds (more items due than its allowance),
        the items the selection chose (as many as the batch has room for) and those groups;
        the rest of the batch comes first-in-first-out from the other groups. A failing
        selection falls back to FIFO for that group."""
        if self.selection is None or not self.selection.active or not allowance:
            return [], []
        assert self.outbox is not None
        items: list[QueuedItem] = []
        groups: list[str] = []
        size = 0
        for group, n in allowance.items():
            room = self.batch_size - len(items)
            if group in held or n <= 0 or room <= 0:
                continue
            try:
                ids = self.selection.select(self.outbox, group, n, room, now=now, max_delay_s=self.backoff.cap_s,
                                            ignore_backoff=ignore_backoff)
            except OutboxError:
                raise
            except Exception as e:  # noqa: BLE001 - choosing is an optimisation: never stop delivery for it
                log.error("selection for group %s failed, first in first out instead: %s: %s", group,
                          type(e).__name__, e)
                continue
            if ids is None:
                continue
            groups.append(group)
            for item in self.outbox.queued_items(ids):
                if items and size + len(item.asset) > self.batch_max_bytes:
                    break
                items.append(item)
                size += len(item.asset)
        return items, groups

    def _held_back(self, allowance: dict[str, int]) -> list[str]:
        return [g for g, n in allowance.items() if n <= 0] if self.rate_overflow == "keep" else []

    def _allowance(self, now: float) -> dict[str, int]:
        """How many more items each rate-limited group may deliver right now."""
        if not self.limits:
            return {}
        assert self.outbox is not None
        self.outbox.clamp_future(now=now)  # a delivery dated in the future (clock stepped back) counts as now
        allowance = {}
        for group in self.outbox.queued_groups():
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

    def _fleet_upload(self, batch: list[QueuedItem], over: list[QueuedItem], outcome: BatchOutcome, now: float) -> BatchOutcome:
        """The batch through the fleet ledger: claimed and within the fleet's budget, uploaded;
        delivered by another replica, recorded as delivered; the rest held (or dropped, over
        budget in drop mode); then the ledger is told what was delivered."""
        assert self.outbox is not None and self.fleet is not None
        admission = self.fleet.admit(batch, now)
        if self.fleet.error:
            self.last_error = self.fleet.error
        outcome.held = len(admission.held)
        try:
            if admission.elsewhere:
                outcome.elsewhere = self.outbox.mark_delivered([i.id for i in admission.elsewhere], now=now)
            over = over + admission.over
            if over:
                self._forget_near_duplicates(over)
                self.outbox.drop([i.id for i in over], "dropped_rate_limit")
                outcome.dropped = len(over)
                log.warning("dropped %d items over their group's rate limit or budget", len(over))
            if admission.upload:
                self._upload(admission.upload, outcome)
        finally:
            self.fleet.settle(admission, outcome.delivered_ids)
        return outcome

    # Uploading and isolating -----------------------------------------------------------

    def _send(self, uploads: list[Upload]) -> list[SinkError | None]:
        results = self.sink.upload(uploads)
        if len(results) != len(uploads):
            raise SinkError(f"sink returned {len(results)} results for {len(uploads)} uploads")
        self._remember_canary(uploads, results)
        return list(results)

    def _remember_canary(self, uploads: list[Upload], results: list) -> None:
        accepted = [u for u, r in zip(uploads, results) if r is None]
        if accepted:
            smallest = min(accepted, key=lambda u: len(u.asset))
            if self._canary is None or len(smallest.asset) <= len(self._canary.asset) or self._rng.random() < 0.05:
                self._canary = smallest

    def _upload(self, batch: list[QueuedItem], outcome: BatchOutcome) -> BatchOutcome:
        assert self.outbox is not None
        uploads = [Upload(i.upload_group, i.content_hash, i.asset, i.media_type, i.metadata()) for i in batch]
        started = time.perf_counter()
        verdicts: list[Any]
        try:
            verdicts = self._send(uploads)
        except Exception as e:  # the whole batch failed: the sink is down, or an item breaks it
            isolated = self._isolate(uploads, e)
            if isolated is None:
                self._sink_failed(batch, e)
                outcome.sink_failed = True
                outcome.failed = len(batch)
                return outcome
            verdicts = isolated
        elapsed = time.perf_counter() - started
        now = self.clock()
        delivered, retry, dead = [], [], []
        for item, result in zip(batch, verdicts):
            if result is _UNDECIDED:
                continue  # not tried alone before the isolation budget ran out: next batch
            if isinstance(result, _Alone):
                outcome.isolated += 1
                error = result.error
                text = f"failed alone while the sink accepted other items ({type(error).__name__}: {error})"
                if isinstance(error, PermanentSinkError) or not isinstance(error, SinkError):
                    dead.append((item.id, text))
                    continue
                result = SinkError(text)
            if result is None:
                delivered.append(item.id)
            elif isinstance(result, PermanentSinkError):
                dead.append((item.id, str(result)))
            elif item.attempts + 1 >= self.max_attempts:
                dead.append((item.id, f"gave up after {item.attempts + 1} attempts: {result}"))
            else:
                retry.append((item.id, str(result), now + self.backoff.delay(item.attempts + 1, self._rng)))
        # Record the sink's verdicts; a crash before this line repeats the (idempotent) upload.
        outcome.delivered_ids = delivered  # what the sink took counts against a fleet budget, recorded here or not
        if dead and self.near_duplicates is not None:
            dead_ids = {i for i, _ in dead}
            self._forget_near_duplicates([i for i in batch if i.id in dead_ids])
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

    def _isolate(self, uploads: list[Upload], error: Exception) -> list[Any] | None:
        """The batch failed as a whole. Find out whether the sink is up (a re-upload of the
        canary failing says it is down; any part of the batch getting through, that it is
        up), and bisect the batch down to the items that fail alone. Returns a verdict per
        upload, or None when the sink looks down: nothing went through and two items failed
        alone (or one, in a batch of one), or `isolation_budget_s` passed."""
        started = self.monotonic()
        verdicts: list[Any] = [_UNDECIDED] * len(uploads)
        alone: list[tuple[int, BaseException]] = []
        state = {"up": False, "probes": 0}
        if self._canary is not None:
            # Failing an upload it accepted before, the sink is down: no need to bisect. Its
            # success proves less (a re-upload may write nothing): only items of this batch
            # getting through show that the sink takes uploads.
            state["probes"] += 1
            try:
                canary_ok = self.sink.upload([self._canary]) == [None]
            except Exception as e:  # noqa: BLE001 - any failure of a known-good upload
                log.info("the sink failed a batch and an upload it had accepted before: it is down (%s)", e)
                return None
            if not canary_ok:
                return None

        def probe(indices: list[int]) -> BaseException | None:
            state["probes"] += 1
            try:
                results = self._send([uploads[i] for i in indices])
            except Exception as e:  # noqa: BLE001 - judged below
                return e
            state["up"] = True
            for i, r in zip(indices, results):
                verdicts[i] = r
            return None

        def down() -> bool:
            if state["up"]:
                return False
            return len(alone) >= min(2, len(uploads)) or self.monotonic() - started > self.isolation_budget_s

        def resolve(indices: list[int], failure: BaseException) -> bool:
            """`indices` failed together with `failure`; False once the sink looks down."""
            if len(indices) == 1:
                alone.append((indices[0], failure))
                return not down()
            mid = len(indices) // 2
            halves = [indices[:mid], indices[mid:]]
            if self._rng.random() < 0.5:
                halves.reverse()
            for half in halves:
                if self.stopping or self.monotonic() - started > self.isolation_budget_s:
                    return state["up"]
                e = probe(half)
                if e is not None and not resolve(half, e):
                    return False
            return True

        if len(uploads) == 1:
            ok = resolve([0], error)
        else:
            ok = resolve(list(range(len(uploads))), error)
        if not ok or not state["up"]:
            return None
        for i, e in alone:
            verdicts[i] = _Alone(e)
        log.warning("a batch of %d failed as a whole (%s: %s); split it with %d uploads: %d items fail alone",
                    len(uploads), type(error).__name__, error, state["probes"], len(alone))
        if self.metrics is not None:
            self.metrics.observe_isolation(len(alone))
        return verdicts

    def _sink_failed(self, batch: list[QueuedItem], error: Exception) -> None:
        assert self.outbox is not None
        self.sink_failures += 1
        delay = self.backoff.delay(self.sink_failures, self._rng)
        self.sink_retry_at = self.monotonic() + delay
        kind = "auth" if isinstance(error, SinkAuthError) else "unavailable" if isinstance(error, SinkError) else "error"
        self.last_error = f"{type(error).__name__}: {error}"
        # No attempt is spent and no item is delayed: when the sink is back they go first,
        # in their original order.
        self.outbox.note_sink_failure([i.id for i in batch], self.last_error)
        if isinstance(error, SinkError):
            log.warning("sink %s failed (%s, attempt %d): %s; retrying in %.2f s",
                        self.sink.describe(), kind, self.sink_failures, error, delay)
        else:
            log.error("sink %s raised an unexpected error; retrying in %.2f s", self.sink.describe(), delay, exc_info=error)
        if self.metrics is not None:
            self.metrics.observe_sink_failure(kind, len(batch), delay)

    # Flush ---------------------------------------------------------------------------

    def flush(self, timeout_s: float = 60.0) -> FlushResult:
        """Deliver everything queued now, within `timeout_s` (the admin API's Flush and
        `--once`). Items waiting for a retry, and the sink, get one immediate try; after
        that every backoff applies, so a transient failure never burns an item's attempts.
        Returns when nothing deliverable is left (paused groups and groups over their rate
        limit wait), at the deadline (`timed_out`), or when stopped."""
        deadline = self.monotonic() + timeout_s
        uploaded = 0
        timed_out = False
        first = True
        while not self.stopping:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                if not self.ensure_outbox():
                    self._sleep(min(self.outbox_retry_in() or self.poll_interval_s, remaining))
                    continue
                assert self.outbox is not None
                if first:
                    self.outbox.retry_now(now=self.clock())
                    self.sink_retry_at = 0.0
                    first = False
                wait = self.sink_backoff_remaining()
                if wait > 0:
                    self._sleep(min(wait, remaining))
                    continue
                outcome = self.step()
                if outcome is not None:
                    uploaded += outcome.uploaded
                    if outcome.only_held:  # another replica holds them, or the ledger is down
                        self._sleep(min(self.poll_interval_s, remaining))
                    continue
                now = self.clock()
                spent = self.fleet.spent_groups() if self.fleet is not None else []  # the fleet's budget, like a local one
                next_at = self.outbox.next_attempt_at(now=now, exclude_groups=self._held_back(self._allowance(now)) + spent,
                                                      max_delay_s=self.backoff.cap_s)
            except OutboxBusy:
                self._sleep(min(self.poll_interval_s, remaining))
                continue
            except SinkChanged:
                raise
            except OutboxError as e:
                self._outbox_failed(e)
                continue
            if next_at is None:
                break  # nothing deliverable is left
            self._sleep(min(max(next_at - now, 0.01), remaining))
        queued = -1
        if self.outbox is not None and not self.outbox_error:
            try:
                queued = sum(s.queued for s in self.outbox.status() if not s.paused)
            except OutboxError as e:
                self.outbox_error = str(e)
        return FlushResult(uploaded, queued, queued == 0, timed_out and queued != 0,
                           self.outbox_error or (self.last_error if timed_out else ""))

    def _sleep(self, seconds: float) -> None:
        end = self.monotonic() + seconds
        while not self.stopping:
            left = end - self.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, SIGNAL_CHECK_S))
