"""`triton-al uploader --pull-labels-every SECONDS`: the uploader runs `labels pull` on a
schedule, for the groups it uploads, from its own sink into a local project store.

The pulls run in a thread of their own with a sink object of their own, so uploading never
waits for them; a pull that fails (sink down, credentials refused, a store it cannot write)
is logged and counted (`triton_al_label_pulls_total{outcome="failed"}`) and the next one
runs at its time. The first pull runs at start. At shutdown a pull in progress is asked to
stop between two annotations (what it wrote stays written: every label file is replaced
atomically) and waited for a bounded time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from triton_al.sinks.base import Sink

log = logging.getLogger("triton_al.uploader")
MAX_LOGGED_PROBLEMS = 20
"""Newly unmappable annotations logged one by one per pull; beyond, one line says how many more.
One still unmappable at the next pull is not logged again (the gauge and the status count it)."""


@dataclass
class LastPull:
    """What the admin status shows of the latest pull."""

    started_at: float = 0.0
    """Wall-clock time (Unix seconds)."""
    seconds: float = 0.0
    outcome: str = ""
    """"ok" (done; unmappable annotations are reported, not failures), "failed", "stopped"."""
    new: int = 0
    relabelled: int = 0
    unchanged: int = 0
    fetched: int = 0
    problems: int = 0
    error: str = ""
    groups: list[str] = field(default_factory=list)


class LabelPuller:
    """Pulls the sink's annotations into `store` every `interval_s` seconds (see the module)."""

    def __init__(self, open_sink: Callable[[], Sink], store: Path, interval_s: float, groups: Callable[[], list[str]], *,
                 class_names: list[str] | None = None, metrics=None, join_timeout_s: float = 10.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"the label pull interval must be positive, got {interval_s}")
        self.open_sink, self.store, self.interval_s = open_sink, Path(store), interval_s
        self.groups, self.class_names, self.metrics = groups, class_names, metrics
        self.join_timeout_s = join_timeout_s
        self.last: LastPull | None = None
        self.pulls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink: Sink | None = None
        self._next_at = 0.0  # monotonic
        self._reported: set[str] = set()  # problems the previous pull logged

    def start(self) -> LabelPuller:
        self._thread = threading.Thread(target=self._run, name="label-puller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask a pull in progress to stop between two annotations; wait for it (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout_s)
            if self._thread.is_alive():
                log.warning("the label pull did not stop within %.0f s; leaving it (label files are written atomically)",
                            self.join_timeout_s)
        if self._sink is not None and (self._thread is None or not self._thread.is_alive()):
            try:
                self._sink.close()
            except Exception:  # noqa: BLE001 - closing is best effort at shutdown
                pass
            self._sink = None

    def next_in(self) -> float:
        return max(0.0, self._next_at - time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pull_once()
            self._next_at = time.monotonic() + self.interval_s
            self._stop.wait(self.interval_s)

    def pull_once(self) -> LastPull:
        """One pull, whatever happens: never raises (the outcome says how it went)."""
        from triton_al.loop.labels import LabelsPullError, pull_labels
        from triton_al.sinks.base import SinkError
        from triton_al.sinks.local import LocalStore

        started, wall = time.monotonic(), time.time()
        last = LastPull(started_at=wall)
        try:
            groups = sorted(set(self.groups()))
            last.groups = groups
            if self._sink is None:
                self._sink = self.open_sink()
            store = LocalStore(self.store)
            try:
                result = pull_labels(self._sink, store, groups, class_names=self.class_names, should_stop=self._stop.is_set)
            finally:
                store.close()
        except (SinkError, LabelsPullError, ValueError, OSError) as e:
            last.outcome, last.error = "failed", f"{type(e).__name__}: {e}"
            log.error("label pull from %s into %s failed (uploading goes on; next pull in %.0f s): %s",
                      self._describe(), self.store, self.interval_s, last.error)
            self._drop_sink()
        except Exception as e:  # noqa: BLE001 - a bug in a pull must not take the uploader down
            last.outcome, last.error = "failed", f"{type(e).__name__}: {e}"
            log.error("label pull failed unexpectedly (uploading goes on)", exc_info=e)
            self._drop_sink()
        else:
            last.outcome = "stopped" if result.stopped else "ok"
            last.new, last.relabelled, last.unchanged = result.new, result.relabelled, result.unchanged
            last.fetched, last.problems = result.fetched, len(result.problems)
            fresh = [p for p in result.problems if p not in self._reported]
            for problem in fresh[:MAX_LOGGED_PROBLEMS]:
                log.warning("label not taken: %s", problem)
            if len(fresh) > MAX_LOGGED_PROBLEMS:
                log.warning("%d more labels not taken (see `triton-al labels pull` for the full list)",
                            len(fresh) - MAX_LOGGED_PROBLEMS)
            if not result.stopped:
                self._reported = set(result.problems)
            if result.taken or result.fetched or result.problems:
                log.info("label pull from %s into %s: %d new, %d relabelled, %d unchanged, %d items fetched, %d not taken",
                         self._describe(), self.store, result.new, result.relabelled, result.unchanged, result.fetched,
                         len(result.problems))
        last.seconds = time.monotonic() - started
        self.last = last
        self.pulls += 1
        if self.metrics is not None:
            self.metrics.observe_label_pull(last)
        return last

    def _describe(self) -> str:
        return self._sink.describe() if self._sink is not None else "the sink"

    def _drop_sink(self) -> None:
        """After a failure, the next pull starts with a fresh sink object (new connections)."""
        if self._sink is not None:
            try:
                self._sink.close()
            except Exception:  # noqa: BLE001
                pass
            self._sink = None


def check_options(sink_uri: str, pull_every: float | None, labels_store: Path | None, labels: Path | None,
                  once: bool = False) -> str | None:
    """Why these label-pull options cannot work together (a message naming the flags), or None."""
    from triton_al.sinks import sink_scheme

    if pull_every is None:
        if labels_store is not None:
            return "--labels-store is where --pull-labels-every brings labels: give --pull-labels-every SECONDS too"
        if labels is not None:
            return "--labels (class names for the label pull) needs --pull-labels-every SECONDS"
        return None
    if pull_every <= 0:
        return f"--pull-labels-every: expected a positive number of seconds, got {pull_every:g}"
    if once:
        return "--pull-labels-every runs label pulls on a schedule, which --once does not have; run `triton-al labels pull` after it"
    scheme = sink_scheme(sink_uri)
    if scheme == "local":
        from triton_al.uploader.commands import sink_identity

        sink_dir = sink_identity(sink_uri).split(":", 1)[1]
        if labels_store is None or Path(labels_store).expanduser().resolve() == Path(sink_dir):
            return ("--pull-labels-every: the sink is the local project store itself, where annotators' label files "
                    "already are (retrain reads them there); there is nothing to pull. To copy its labels into another "
                    "store, give that store with --labels-store DIR")
    elif labels_store is None:
        return (f"--pull-labels-every with the {scheme} sink needs --labels-store DIR: the local project store that "
                "the labels (and the labelled items, fetched from the sink) are brought into, where retrain reads them")
    return None
