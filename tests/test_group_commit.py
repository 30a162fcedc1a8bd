"""Group commit of the outbox's WAL: a durable append is flushed before it returns, one flush
covers every commit numbered before it (across connections, as across processes), and when
the shared counters are missing or torn every commit is flushed on its own."""

from __future__ import annotations

import os

import pytest
from outbox_helpers import item, wal_flushes, wal_inode  # noqa: F401 (a fixture)

from triton_al.group_commit import GroupCommit
from triton_al.outbox import Outbox


@pytest.mark.parametrize("durable", [True, False])
def test_a_durable_append_flushes_the_wal_before_it_returns(tmp_path, wal_flushes, durable):
    path = tmp_path / "o.db"
    with Outbox(path, durable=durable) as o:
        o.append(item(1))
        assert wal_flushes == ([wal_inode(path)] if durable else [])
        assert o.due(10)[0].prediction["label"] == 1


def deferred_commit(outbox: Outbox, n: int):
    """Append, but stop before waiting for the disk; returns the wait to run later."""
    waiting = []
    wait = outbox._group_commit.wait_durable
    outbox._group_commit.wait_durable = lambda seq, timeout_s: waiting.append(seq)
    try:
        outbox.append(item(n))
    finally:
        outbox._group_commit.wait_durable = wait
    return lambda: wait(waiting[0], 2.0)


def test_one_flush_covers_every_commit_numbered_before_it(tmp_path, wal_flushes):
    # Two connections, each with its own lock-file descriptors: to the locks and the shared
    # counters they are two processes.
    path = tmp_path / "o.db"
    with Outbox(path) as a, Outbox(path) as b:
        a.append(item(0))
        b.append(item(1))
        wal_flushes.clear()
        wait_a = deferred_commit(a, 2)
        b.append(item(3))  # b commits after a and flushes: that covers a's commit too
        assert len(wal_flushes) == 1
        wait_a()  # a finds its commit already on disk
        assert len(wal_flushes) == 1
        wait_a = deferred_commit(a, 4)
        wait_b = deferred_commit(b, 5)
        wait_a()  # a flushes first: that covers b's later commit, made before the flush began
        wait_b()
        assert len(wal_flushes) == 2
        a.append(item(6))  # a commit after the last flush needs a flush of its own
        assert len(wal_flushes) == 3
        assert sorted(i.prediction["label"] for i in a.due(10)) == list(range(7))


def test_without_usable_counters_every_commit_is_flushed(tmp_path, wal_flushes):
    path = tmp_path / "o.db"
    with Outbox(path) as o:
        o.append(item(0))
        # Counters torn beyond repair: never trusted, so never used to skip a flush.
        with open(f"{path}.lock", "r+b") as f:
            f.write(b"\xff" * 32)
        wal_flushes.clear()
        o.append(item(1))
        o.append(item(2))
        assert wal_flushes == [wal_inode(path)] * 2
        assert len(o.due(10)) == 3
    # A lock file the counters cannot be written to (as on a full disk at first use).
    read_only = os.open(f"{path}.lock", os.O_RDONLY)
    os.truncate(f"{path}.lock", 0)
    with Outbox(path) as keep_open:
        keep_open.counters()  # an open connection keeps the WAL file there to flush
        group = GroupCommit(path, read_only)
        try:
            assert group.committed() == 0
            wal_flushes.clear()
            group.wait_durable(0, 2.0)
            group.wait_durable(0, 2.0)
            assert len(wal_flushes) == 2
        finally:
            group.close()
            os.close(read_only)


def test_a_stalled_flush_elsewhere_fails_the_append_fast_with_outbox_busy_and_keeps_the_item(tmp_path):
    import fcntl
    import time

    from triton_al.outbox import OutboxBusy

    path = tmp_path / "o.db"
    with Outbox(path, busy_timeout_s=0.3) as o:
        o.append(item(0))
        stalled = os.open(f"{path}.sync", os.O_RDWR)  # another process, stuck in its flush
        fcntl.flock(stalled, fcntl.LOCK_EX)
        try:
            started = time.monotonic()
            with pytest.raises(OutboxBusy, match="committed, but not confirmed on disk"):
                o.append(item(1))
            assert time.monotonic() - started < 2.0
        finally:
            os.close(stalled)
        assert sorted(i.prediction["label"] for i in o.due(10)) == [0, 1]  # stored all the same
        o.append(item(2))  # and the next append goes through once the flush is done
        assert len(o.due(10)) == 3
