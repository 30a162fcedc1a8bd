"""Group commit of the outbox's WAL across writer processes.

With `synchronous=FULL`, SQLite fsyncs the WAL inside COMMIT, while the committing process
holds the one write lock: every other writer queues behind a disk flush (0.2 to 2 ms on a
virtual disk), and the flushes never overlap. Instead, writers commit at
`synchronous=NORMAL` (frames written to the WAL file, not flushed), number their commit
in a counter shared through the writers' lock file, release the lock, and only then wait
for the disk: one process at a time (a second lock file) checks whether a flush that began
after its commit has already finished; if not, it flushes the WAL itself and records that
every commit numbered so far is on disk. Under load one `fdatasync` serves several writers,
and nobody holds the write lock during it.

The guarantee is the one FULL gives: a commit is on disk before `wait_durable` returns.
SQLite syncs the WAL header when it restarts the WAL at NORMAL too, and a checkpoint that
moved our frames into the database synced them there before the WAL could be reused.

The counters live in the first 32 bytes of the lock file as (n, n XOR all-ones) pairs, so
a read that races a write is seen as torn and retried rather than trusted: a value read too
high could skip a flush, one read too low only costs an extra one. If the counters cannot
be set up (a full disk when the lock file is first used), every commit is flushed on its
own: slower, never less safe.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from triton_al.file_lock import flock_polling

_SLOT = struct.Struct("<QQ")
_COMMITTED, _SYNCED = 0, _SLOT.size
_MASK = (1 << 64) - 1
_READ_ATTEMPTS = 8


class GroupCommit:
    """Shared commit counters and the flush leader election for one outbox file.

    One per process (file descriptors and locks are per process). `committed()` must be
    called while holding the writers' lock, right after COMMIT."""

    def __init__(self, outbox_path: Path, lock_fd: int) -> None:
        self._lock_fd = lock_fd  # held exclusively by the caller of `committed`
        self._wal_path = f"{outbox_path}-wal"
        self._wal_fd: int | None = None
        self._sync_fd = os.open(f"{outbox_path}.sync", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._shared: bool | None = None  # counters usable; decided at the first commit

    def close(self) -> None:
        for fd in (self._wal_fd, self._sync_fd):
            if fd is not None:
                os.close(fd)
        self._wal_fd = None

    def _write(self, offset: int, value: int) -> None:
        os.pwrite(self._lock_fd, _SLOT.pack(value, value ^ _MASK), offset)

    def _read(self, offset: int) -> int | None:
        """The counter at `offset`, or None if every read was torn by a concurrent write."""
        for _ in range(_READ_ATTEMPTS):
            value, check = _SLOT.unpack(os.pread(self._lock_fd, _SLOT.size, offset).ljust(_SLOT.size, b"\0"))
            if value ^ check == _MASK:
                return value
        return None

    def _set_up(self) -> bool:
        """Create the counters in a lock file that has none (under the writers' lock, so
        no two processes do it at once, and only before anyone has used them)."""
        try:
            if os.fstat(self._lock_fd).st_size < 2 * _SLOT.size:
                os.pwrite(self._lock_fd, _SLOT.pack(0, _MASK) * 2, 0)
            return True
        except OSError:  # no room to create them: flush every commit on its own
            return False

    def committed(self) -> int:
        """Number a commit that just happened (0 when counters are unavailable)."""
        if self._shared is None:
            self._shared = self._set_up()
        if not self._shared:
            return 0
        last = self._read(_COMMITTED)
        if last is None:  # cannot happen under the writers' lock; be safe anyway
            return 0
        self._write(_COMMITTED, last + 1)
        return last + 1

    def wait_durable(self, seq: int, timeout_s: float) -> None:
        """Return once commit number `seq` (0: unknown, flush regardless) is on disk.

        Raises TimeoutError when another process's flush holds the flush lock longer than
        `timeout_s` (a stalled disk): the commit is made, only its flush is not confirmed."""
        if self._wal_fd is None:
            # Valid while our connection is open: SQLite deletes the WAL only when the last
            # connection closes.
            self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        if not flock_polling(self._sync_fd, timeout_s):
            raise TimeoutError(f"another process's flush took more than {timeout_s} s")
        try:
            synced = self._read(_SYNCED) if seq else None
            if synced is not None and synced >= seq:
                return  # a flush that began after our commit has finished
            # Everything numbered by now is in the WAL file: this flush covers it all.
            target = self._read(_COMMITTED) if seq else None
            os.fdatasync(self._wal_fd)
            if target is not None and target > (synced or 0):
                self._write(_SYNCED, target)
        finally:
            fcntl.flock(self._sync_fd, fcntl.LOCK_UN)
