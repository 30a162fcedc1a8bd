"""Stopping a server a test started: by its PID, politely first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


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


def wait_listening(proc: subprocess.Popen, port: int, what: str, timeout_s: float = 20.0) -> None:
    """Until `proc` accepts connections on 127.0.0.1:`port`; fails naming `what` if it exits
    or does not listen in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited ({proc.returncode})"
            assert time.monotonic() < deadline, f"{what} did not listen on port {port} in {timeout_s:.0f} s"
            time.sleep(0.05)
