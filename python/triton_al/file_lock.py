"""Exclusive `flock`s that can give up: what the outbox's writers queue on.

An `flock` dies with its holder, so a killed process never leaves it taken; but a blocking
one cannot time out. Two ways around that, for two kinds of wait:
- `flock_within`: the kernel hands the lock over the moment it is free (a helper thread
  blocks on it), for the writers' lock, where a waiter may sit behind a long transaction;
- `flock_polling`: no thread, retries at short growing intervals, for waits that are short
  and frequent (the group commit's flush lock, held for one fdatasync), where starting a
  thread per wait cost more than the wait itself.
"""

from __future__ import annotations

import fcntl
import threading
import time

POLL_FIRST_S = 0.00002
POLL_MAX_S = 0.00025


def flock_within(fd: int, timeout_s: float) -> bool:
    """Take an exclusive flock on `fd`, waiting at most `timeout_s`; False on timeout.

    `flock` cannot time out by itself: when the lock is taken, a helper thread blocks on
    it and the caller waits for that thread; a helper that wins after the caller gave up
    releases the lock at once."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    acquired = threading.Event()
    state = threading.Lock()
    abandoned = False

    def wait_for_lock() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with state:
            if abandoned:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                acquired.set()

    threading.Thread(target=wait_for_lock, name="outbox-lock", daemon=True).start()
    if acquired.wait(timeout_s):
        return True
    with state:
        if acquired.is_set():
            return True
        abandoned = True
    return False


def flock_polling(fd: int, timeout_s: float) -> bool:
    """Take an exclusive flock on `fd`, retrying after 20 µs, growing to 0.25 ms, for at
    most `timeout_s`; False on timeout."""
    deadline = time.monotonic() + timeout_s
    pause = POLL_FIRST_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)
