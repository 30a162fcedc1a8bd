"""Stopping a server a test started: by its PID, politely first."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code (None if never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
