"""Reload a model whose Python-backend process died.

When a stub process dies (killed, out of memory), Triton keeps reporting the model ready
but fails every request with "Stub process … is not healthy" until the model is loaded
again. With explicit model control the watchdog notices the missing process (from /proc,
as children of the server's PID) and reloads that model; requests in between fail with
Triton's message, and nothing the step had accepted is lost (the outbox is durable).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("triton_al.watchdog")


def stub_models(server) -> dict[int, str]:
    """PID -> model name of every Python-backend stub of this server."""
    models = {}
    for pid in server.stub_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if len(args) > 1 and args[1].endswith(b".py"):
            models[pid] = Path(args[1].decode()).parent.parent.name
    return models


class StubWatchdog:
    def __init__(self, server, interval_s: float = 0.5) -> None:
        self.server = server
        self.interval_s = interval_s
        self.reloads: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)

    def start(self) -> StubWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as e:  # noqa: BLE001 - never silently: say why watching stopped
            self.failures.append(f"watchdog stopped: {e!r}")
            log.exception("the stub watchdog stopped")

    def _watch(self) -> None:
        known = stub_models(self.server)
        missing_since: dict[str, int] = {}
        while not self._stop.wait(self.interval_s):
            if self.server.process is None or self.server.process.poll() is not None:
                return
            current = stub_models(self.server)
            alive = set(current.values())
            for pid, model in known.items():
                if pid not in current and model not in alive:
                    missing_since[model] = missing_since.get(model, 0) + 1
            for model in list(missing_since):
                if model in alive:
                    del missing_since[model]  # a reload (e.g. a deploy) replaced it
                elif missing_since[model] >= 2:  # gone for two checks: not a reload in flight
                    del missing_since[model]
                    self._reload(model)
            known = {**{p: m for p, m in known.items() if m not in alive and m in missing_since}, **current}

    def _reload(self, model: str) -> None:
        log.error("the Python-backend process of model %r died; reloading it", model)
        try:
            # A plain load of an unchanged config is a no-op: unload first so that Triton
            # starts a new process (ensembles that use the model follow it).
            self.server.unload_model(model)
            self.server.load_model(model)
            self.reloads.append(model)
            log.warning("model %r reloaded after its process died", model)
        except Exception as e:  # noqa: BLE001 - keep watching the others
            self.failures.append(f"{model}: {e}")
            log.error("reloading model %r failed: %s", model, e)
