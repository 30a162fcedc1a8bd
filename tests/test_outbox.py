"""The outbox on a real SQLite file: dedup, caps and overflow policies, validation,
dead letters, pauses, fork safety, a busy database, a corrupt file and a full disk."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from outbox_helpers import item, png, small_filesystem

from triton_al.outbox import AppendResult, Outbox, OutboxBusy, OutboxError, OutboxFull, content_hash


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db") as o:
        yield o


def test_one_row_per_group_and_the_asset_stored_once(outbox):
    r = outbox.append_many([item(1, groups=["a", "b"])])
    assert r == AppendResult(accepted=2)
    due = outbox.due(10)
    assert [(i.upload_group, i.content_hash) for i in due] == [("a", content_hash(png(1))), ("b", content_hash(png(1)))]
    assert due[0].asset == png(1) and due[0].prediction["label"] == 1
    assert outbox.counters()["stored_bytes"] == len(png(1))


def test_the_same_image_is_queued_once_per_group_even_after_delivery(outbox):
    assert outbox.append_many([item(1), item(1)]) == AppendResult(accepted=1, duplicates=1)
    outbox.mark_delivered([i.id for i in outbox.due(10)])
    assert outbox.append_many([item(1)]).duplicates == 1
    assert outbox.append_many([item(1, groups=["other"])]).accepted == 1  # per group
    assert outbox.counters()["duplicates"] == 2


def test_drop_newest_keeps_what_was_accepted(tmp_path):
    with Outbox(tmp_path / "o.db", max_items=3, overflow_policy="drop_newest") as o:
        r = o.append_many([item(i, score=0.01 * i) for i in range(5)])
        assert r == AppendResult(accepted=3, dropped=2)
        assert [i.content_hash for i in o.due(10)] == [content_hash(png(i)) for i in range(3)]
        assert o.counters()["dropped_overflow"] == 2


def test_drop_least_uncertain_evicts_the_most_confident_and_keeps_invalid_outputs(tmp_path):
    with Outbox(tmp_path / "o.db", max_items=3) as o:
        o.append_many([item(1, score=0.3), item(2, score=math.nan), item(3, score=0.2)])
        assert o.append_many([item(4, score=0.1)]) == AppendResult(accepted=1)  # evicts 0.3
        assert o.append_many([item(5, score=0.25)]) == AppendResult(dropped=1)  # more confident than all
        scores = sorted((i.score for i in o.due(10)), key=lambda s: (not math.isnan(s), s))
        assert math.isnan(scores[0]) and scores[1:] == [0.1, 0.2]
        c = o.counters()
        assert c["evicted_overflow"] == 1 and c["dropped_overflow"] == 1 and c["queued_items"] == 3


def test_byte_cap(tmp_path):
    size = len(png(0))
    with Outbox(tmp_path / "o.db", max_bytes=int(size * 2.5), overflow_policy="drop_newest") as o:
        assert o.append_many([item(i) for i in range(4)]).accepted == 2
        assert o.counters()["stored_bytes"] <= size * 2.5


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(groups=["../etc"]), "upload group name '../etc' is not allowed"),
        (dict(groups=[".hidden"]), "not allowed"),
        (dict(groups=[]), "upload_groups"),
        (dict(asset=b""), "asset"),
    ],
)
def test_bad_items_are_refused_with_a_clear_message_and_nothing_of_the_call_is_stored(outbox, bad, message):
    with pytest.raises(ValueError, match=message):
        outbox.append_many([item(1), item(2, **bad)])
    assert outbox.due(10) == [] and outbox.counters().get("appended", 0) == 0


def test_unserialisable_prediction_is_refused(outbox):
    bad = item(1)
    object.__setattr__(bad, "prediction", {"x": object()})
    with pytest.raises(ValueError, match="prediction: not JSON-serialisable"):
        outbox.append_many([bad])


def test_nan_score_round_trips_and_metadata_is_json_clean(outbox):
    outbox.append_many([item(1, score=math.nan)])
    (queued,) = outbox.due(1)
    assert math.isnan(queued.score) and queued.metadata()["score"] is None


def test_dead_letters_keep_their_asset_and_can_be_retried(outbox):
    outbox.append_many([item(1), item(2)])
    first, second = outbox.due(10)
    outbox.dead_letter([(first.id, "rejected: corrupt image")])
    outbox.mark_delivered([second.id])
    (dead,) = outbox.dead_letters()
    assert dead["error"] == "rejected: corrupt image" and dead["attempts"] == 1
    # The dead letter's asset is kept, counted apart from the queue's bytes (the writer's cap).
    c = outbox.counters()
    assert c["stored_bytes"] == 0 and c["dead_letter_bytes"] == len(png(1))
    assert outbox.retry_dead_letters() == 1
    (again,) = outbox.due(10)
    assert again.asset == png(1) and outbox.dead_letters() == []
    c = outbox.counters()
    assert c["stored_bytes"] == len(png(1)) and c["dead_letter_bytes"] == 0


def test_failed_attempts_back_off_and_paused_groups_wait(outbox):
    outbox.append_many([item(1, groups=["a"]), item(2, groups=["b"])])
    a, b = outbox.due(10)
    outbox.mark_failed([(a.id, "timeout", 1e18)])
    assert [i.upload_group for i in outbox.due(10)] == ["b"]
    assert [i.attempts for i in outbox.due(10, ignore_backoff=True)] == [1, 0]
    outbox.set_paused(["b"], True)
    assert outbox.due(10) == [] and outbox.paused_groups() == {"b"}
    outbox.set_paused(["b"], False)
    assert [i.upload_group for i in outbox.due(10)] == ["b"]


FORK = """
import os, sys
sys.path.insert(0, sys.argv[2])
from outbox_helpers import item
from triton_al.outbox import Outbox
outbox = Outbox(sys.argv[1])
outbox.append_many([item(1)])
pid = os.fork()
if pid == 0:  # the child uses the inherited object, then leaves without cleanup
    try:
        outbox.append_many([item(2)])
        os._exit(0)
    except BaseException:
        os._exit(1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child could not append"
outbox.append_many([item(3)])
assert len(outbox.due(10)) == 3 and outbox.integrity_check() == "ok"
"""


def test_a_forked_child_opens_its_own_connection(tmp_path):
    # In a fresh interpreter: forking this test process (threads from other tests) is unsafe.
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", FORK, str(tmp_path / "o.db"), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


KILLED_AFTER_APPEND = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from outbox_helpers import item
from triton_al.outbox import Outbox
outbox = Outbox(sys.argv[1], durable=sys.argv[3] == "full")
for seed in range(50):
    outbox.append_many([item(seed)])
os.kill(os.getpid(), signal.SIGKILL)  # at once after the last append returned: no close, no cleanup
"""


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_a_writer_killed_right_after_appending_loses_nothing(tmp_path, sync):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", KILLED_AFTER_APPEND, str(tmp_path / "o.db"), str(Path(__file__).parent), sync],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with Outbox(tmp_path / "o.db") as o:
        assert sorted(i.content_hash for i in o.due(100)) == sorted(content_hash(png(s)) for s in range(50))
        assert o.integrity_check() == "ok"


def test_a_busy_database_fails_fast_with_outbox_busy(tmp_path):
    path = tmp_path / "o.db"
    Outbox(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Outbox(path, busy_timeout_s=0.2) as o, pytest.raises(OutboxBusy, match="held the write lock for more than 200ms"):
            o.append_many([item(1)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_corrupt_file_or_missing_directory_is_named(tmp_path):
    bad = tmp_path / "not-a-db"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(OutboxError, match="not-a-db: cannot open it as an SQLite outbox"):
        Outbox(bad)
    with pytest.raises(OutboxError, match="directory .*missing.* does not exist"):
        Outbox(tmp_path / "missing" / "o.db")


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="overflow_policy"):
        Outbox(tmp_path / "o.db", overflow_policy="drop_oldest")
    with pytest.raises(ValueError, match="max_items"):
        Outbox(tmp_path / "o.db", max_items=0)


def test_a_full_disk_refuses_appends_cleanly_and_keeps_what_was_accepted(tmp_path):
    with small_filesystem(tmp_path / "small", "2m") as fs:
        with Outbox(fs / "o.db", reserve_bytes=256 * 1024) as o:
            assert (fs / "o.db.reserve").stat().st_size == 256 * 1024
            accepted, error = [], None
            for i in range(2000):
                try:
                    o.append_many([item(i, asset=png(i, size=64))])
                    accepted.append(i)
                except OutboxFull as e:
                    error = e
                    break
                if i % 10 == 9:
                    o.checkpoint("PASSIVE")  # as the uploader does after each batch
            assert error is not None and "the disk is full" in str(error), "the disk never filled"
            assert "nothing of this append was stored" in str(error)
            assert len(accepted) > 10
            assert o.integrity_check() == "ok"
            assert sorted(i.content_hash for i in o.due(5000)) == sorted(content_hash(png(i, size=64)) for i in accepted)
            o.mark_delivered([i.id for i in o.due(5000)])  # the reserve lets the uploader drain ...
            assert o.due(5000) == []
        with Outbox(fs / "o.db") as o:  # ... and appends come back, on the same (still small) disk
            assert o.append_many([item(99_999)]).accepted == 1
            assert o.integrity_check() == "ok"




def test_dead_letters_do_not_count_against_the_queue_byte_cap(tmp_path):
    size = len(png(0))
    with Outbox(tmp_path / "o.db", max_bytes=int(size * 3.5), overflow_policy="drop_newest") as o:
        assert o.append_many([item(i) for i in range(3)]).accepted == 3
        o.dead_letter([(i.id, "rejected") for i in o.due(10)])  # three rejected items keep their assets ...
        assert o.append_many([item(i) for i in range(10, 13)]).accepted == 3  # ... and starve nobody
        c = o.counters()
        assert c["stored_bytes"] == sum(len(png(i)) for i in range(10, 13))
        assert c["dead_letter_bytes"] == sum(len(png(i)) for i in range(3))


def test_an_asset_shared_by_a_dead_letter_and_a_queued_item_is_counted_once(tmp_path):
    with Outbox(tmp_path / "o.db") as o:
        o.append_many([item(1, groups=["a"])])
        o.dead_letter([(o.due(1)[0].id, "rejected by a")])
        o.append_many([item(1, groups=["b"])])  # same image, another group: the asset is already stored
        c = o.counters()
        assert c["stored_bytes"] + c["dead_letter_bytes"] == len(png(1))
        o.mark_delivered([o.due(1)[0].id])
        assert o.purge_dead_letters(keep=0) == 1
        c = o.counters()
        assert c["stored_bytes"] == 0 and c["dead_letter_bytes"] == 0
        assert o._connect().execute("SELECT count(*) FROM assets").fetchone()[0] == 0


def test_dead_letters_are_purged_by_age_count_and_bytes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "o.db"
    now = 1_000_000_000.0
    with Outbox(path) as o:
        o.append_many([item(i, groups=["a" if i % 2 else "b"]) for i in range(8)])
        for n, queued in enumerate(o.due(10)):  # failed one day apart: item 0 eight days ago ... item 7 one day ago
            o.dead_letter([(queued.id, "rejected")], now=now - (8 - n) * 86400)
        assert o.purge_dead_letters(older_than_s=6.5 * 86400, now=now) == 2
        assert o.purge_dead_letters(keep=4) == 2
        left = sorted(d["content_hash"] for d in o.dead_letters())
        assert left == sorted(content_hash(png(i)) for i in range(4, 8))
        assert o.purge_dead_letters(max_bytes=len(png(7)) + len(png(6)) + 1) == 2
        assert sorted(d["content_hash"] for d in o.dead_letters()) == sorted(content_hash(png(i)) for i in (6, 7))
        assert o.counters()["dead_letter_bytes"] == len(png(6)) + len(png(7))
        assert o.counters()["dead_letters_purged"] == 6
        with pytest.raises(ValueError, match="give older_than_s, keep or max_bytes"):
            o.purge_dead_letters()
    cli = [sys.executable, "-m", "triton_al.cli", "outbox", "purge-dead-letters", "--outbox", str(path)]
    r = subprocess.run([*cli, "--keep", "1", "--group", "a"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "purged 0 dead letters; 1 left" in r.stdout, r.stderr  # group a holds item 7 only
    r = subprocess.run([*cli, "--older-than", "1h"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "purged 2 dead letters; 0 left" in r.stdout, r.stderr
    r = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--older-than, --keep or --max-bytes" in " ".join(re.sub("[│╭╮╰╯─]", " ", r.stderr).split())


def test_delivery_records_are_bounded_but_kept_inside_the_rate_window(tmp_path):
    now = 2_000_000_000.0
    with Outbox(tmp_path / "o.db") as o:
        o.prepare_for_uploader()
        o.append_many([item(i) for i in range(10)])
        for n, queued in enumerate(o.due(10)):  # delivered one hour apart: item 0 ten hours ago ... item 9 one hour ago
            o.mark_delivered([queued.id], now=now - (10 - n) * 3600)
        # by age: older than 7.5 hours go (items 0-2)
        assert o.trim_delivered(max_age_s=7.5 * 3600, max_rows=100, now=now) == 3
        # by count: 2 rows at most, but the 5-hour rate window keeps items 5-9
        assert o.trim_delivered(max_age_s=1e9, max_rows=2, keep_since=now - 5 * 3600, now=now) == 2
        rows = o._connect().execute("SELECT content_hash FROM delivered").fetchall()
        assert sorted(r[0] for r in rows) == sorted(content_hash(png(i)) for i in range(5, 10))
        assert o.append_many([item(0)]).accepted == 1  # forgotten: queued (and re-sent idempotently)
        assert o.append_many([item(9)]).duplicates == 1  # remembered
        # status counts deliveries without reading the records
        (group,) = o.status()
        assert group.delivered == 10 and group.queued == 1
        plans = " ".join(str(r) for r in o._connect().execute(
            "EXPLAIN QUERY PLAN SELECT delivered_at FROM delivered WHERE delivered_at < ? ORDER BY delivered_at", (now,)))
        assert "delivered_by_age" in plans


def test_deliveries_dated_in_the_future_are_dated_now(tmp_path):
    with Outbox(tmp_path / "o.db") as o:
        o.append_many([item(i) for i in range(3)])
        future = time_now() + 86400
        o.mark_delivered([i.id for i in o.due(10)], now=future)
        assert o.clamp_future() == 3
        assert o.delivered_since("active-learning", time_now() - 10) == 3
        assert o._connect().execute("SELECT max(delivered_at) FROM delivered").fetchone()[0] < time_now() + 1


def time_now() -> float:
    import time

    return time.time()


def test_batches_are_bounded_by_bytes_and_retry_times_beyond_the_longest_backoff_are_due(tmp_path):
    with Outbox(tmp_path / "o.db") as o:
        o.append_many([item(i) for i in range(5)])
        size = max(len(png(i)) for i in range(5))
        assert len(o.due(10, max_bytes=2 * size)) == 2
        assert len(o.due(10, max_bytes=1)) == 1  # at least one item, however big
        first = o.due(1)[0]
        o.mark_failed([(first.id, "timeout", time_now() + 3600)])  # a retry time from before the clock stepped back
        assert first.id not in [i.id for i in o.due(10)]
        assert first.id in [i.id for i in o.due(10, max_delay_s=60)]
        assert o.next_attempt_at(max_delay_s=60) is not None


def test_an_outbox_remembers_its_sink(tmp_path):
    from triton_al.outbox import SinkChanged

    with Outbox(tmp_path / "o.db") as o:
        assert o.delivery_target() is None
        assert o.claim_sink("local:/a") == 0
        o.claim_sink("local:/b")  # nothing delivered yet: switching loses nothing
        o.append_many([item(1)])
        o.mark_delivered([o.due(1)[0].id])
        with pytest.raises(SinkChanged, match="delivered 1 items to local:/b, not to s3://x/y.*--forget-deliveries"):
            o.claim_sink("s3://x/y")
        assert o.sink_conflict("s3://x/y") is not None and o.sink_conflict("local:/b") is None
        assert o.claim_sink("s3://x/y", forget_deliveries=True) == 1
        assert o.delivery_target() == "s3://x/y" and o.append_many([item(1)]).accepted == 1


# Embeddings (schema version 2) ------------------------------------------------------------

SCHEMA_V1 = (Path(__file__).parent / "outbox_schema_v1.sql").read_text()  # the schema as version 1 had it


def with_embedding(seed: int, embedding, **kwargs):
    return dataclasses.replace(item(seed, **kwargs), embedding=embedding)


def version_1_file(path: Path) -> None:
    """An outbox as version 1 made it, with a queued item and a dead letter."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_V1 + "INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');")
    conn.execute("INSERT INTO assets VALUES (?, 'image/png', ?, ?)", (content_hash(png(1)), len(png(1)), png(1)))
    conn.execute("INSERT INTO assets VALUES (?, 'image/png', ?, ?)", (content_hash(png(2)), len(png(2)), png(2)))
    conn.execute("INSERT INTO items (upload_group, content_hash, model_name, model_version, prediction, score, strategy, "
                 "threshold, reason, created_at) VALUES ('active-learning', ?, 'm', '1', '{}', 0.25, 'entropy', 0.5, "
                 "'uncertain', 1.0)", (content_hash(png(1)),))
    conn.execute("INSERT INTO dead_letters VALUES (9, 'active-learning', ?, 'm', '1', '{}', 0.1, 'entropy', 0.5, "
                 "'uncertain', 1.0, 3, 2.0, 'rejected')", (content_hash(png(2)),))
    conn.close()


def columns(path: Path, table: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return [(r[1], r[2]) for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def test_a_version_1_file_gets_the_embedding_columns_at_open_and_keeps_its_rows(tmp_path):
    old = tmp_path / "v1.db"
    version_1_file(old)
    with Outbox(old) as o:
        (queued,) = o.due(10)
        assert queued.content_hash == content_hash(png(1)) and queued.embedding is None
        assert o.append_many([with_embedding(3, [0.5, -1.0])]).accepted == 1
        assert o.retry_dead_letters() == 1  # the version-1 dead letter comes back, without an embedding
        embeddings = {i.content_hash: i.embedding for i in o.due(10)}
    assert embeddings[content_hash(png(2))] is None
    np.testing.assert_array_equal(embeddings[content_hash(png(3))], np.array([0.5, -1.0], np.float32))
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    conn.close()
    with Outbox(tmp_path / "new.db"):
        pass
    for table in ("items", "dead_letters"):  # the same columns, in the same order, as a new file's
        assert columns(old, table) == columns(tmp_path / "new.db", table)
        assert columns(old, table)[-1] == ("embedding", "BLOB")


MIGRATE_AT_ONCE = """
import sys, time
from triton_al import _core
from triton_al.outbox import Outbox, FlaggedItem
path, kind, k, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
if kind == "rust":  # the writer opens (and migrates) the file itself
    writer = _core.OutboxWriter(path, max_items=1000, max_bytes=1 << 30, overflow_policy="drop_newest", durable=False,
                                busy_timeout_s=30.0, max_asset_bytes=1 << 20)
    writer.append([(f"asset {k}".encode(), "image/png", "m", "1", "{}", 0.1, "entropy", 0.5, "uncertain", ["g"], [k] * 4)], 30.0)
    writer.close()
else:
    with Outbox(path, busy_timeout_s=30.0) as o:
        o.append(FlaggedItem(f"asset {k}".encode(), "image/png", "m", "1", {}, 0.1, "entropy", 0.5, "uncertain", ["g"], [k] * 4))
"""


def test_both_openers_migrating_a_version_1_file_at_once_migrate_it_once(tmp_path):
    import subprocess
    import sys
    import time

    old = tmp_path / "v1.db"
    version_1_file(old)
    start = time.time() + 2.0  # every process opens at this moment
    kinds = ["python", "rust"] * 4
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE_AT_ONCE, str(old), kind, str(k), str(start)],
                              stderr=subprocess.PIPE, text=True) for k, kind in enumerate(kinds)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Outbox(old) as o:
        stored = {i.content_hash: i.embedding for i in o.due(100) if i.upload_group == "g"}
        assert o.integrity_check() == "ok"
    assert len(stored) == len(kinds)
    for k in range(len(kinds)):
        np.testing.assert_array_equal(stored[content_hash(f"asset {k}".encode())], np.full(4, k, np.float32))
    assert [name for name, _ in columns(old, "items")].count("embedding") == 1


def test_a_newer_schema_version_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "o.db"
    Outbox(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(OutboxError, match=r"o\.db: schema version 3, this triton-al expects 2$"):
        Outbox(path)
    from triton_al import _core

    with pytest.raises(OutboxError, match="schema version 3, this triton-al-outbox expects 2"):  # the writer too
        _core.OutboxWriter(str(path), max_items=10, max_bytes=1 << 20, overflow_policy="drop_newest", durable=False,
                           busy_timeout_s=1.0, max_asset_bytes=1 << 20)


def test_embeddings_round_trip_as_float32_through_every_query(outbox):
    values = np.linspace(-3, 3, 4096, dtype=np.float64)  # any float dtype, any 1-D sequence
    outbox.append_many([with_embedding(1, values, groups=["a", "b"]), with_embedding(2, [1, 2.5, -0.25]),
                        with_embedding(3, np.arange(8, dtype=np.float32)[::2]), item(4)])
    expected = {content_hash(png(1)): values.astype(np.float32), content_hash(png(2)): np.array([1, 2.5, -0.25], np.float32),
                content_hash(png(3)): np.array([0, 2, 4, 6], np.float32), content_hash(png(4)): None}
    due = outbox.due(10)
    assert len(due) == 5
    for queued in [*due, *outbox.queued_items([i.id for i in due])]:
        want = expected[queued.content_hash]
        if want is None:
            assert queued.embedding is None
        else:
            assert queued.embedding.dtype == np.float32 and queued.embedding.ndim == 1
            np.testing.assert_array_equal(queued.embedding, want)
    candidates = outbox.selection_candidates("active-learning", 10, with_embeddings=True)
    assert {c[2]: None if c[4] is None else c[4].tolist() for c in candidates} == {
        h: None if e is None else e.tolist() for h, e in expected.items() if h != content_hash(png(1))}
    assert {c[5] for c in candidates} == {f"{i.model_name}/{i.model_version}" for i in due}
    assert all(len(c) == 4 for c in outbox.selection_candidates("a", 10))  # unchanged without with_embeddings
    # The byte cap counts the assets once and every row's embedding (png(1)'s twice: two groups).
    assert outbox.counters()["stored_bytes"] == sum(len(png(s)) for s in (1, 2, 3, 4)) + 4 * (2 * 4096 + 3 + 4)


@pytest.mark.parametrize(
    "embedding, message",
    [
        ([0.5, 1.0, math.nan], "item 1: embedding: expected finite values, got NaN at index 2"),
        (np.array([0.0, np.inf], np.float32), "item 1: embedding: expected finite values, got inf at index 1"),
        ([1e300], "item 1: embedding: expected finite values, got inf at index 0"),  # not a float32
        ([], "item 1: embedding: expected 1 to 4096 values, got 0"),
        (np.zeros(4097), "item 1: embedding: expected 1 to 4096 values, got 4097"),
        (np.zeros((2, 3), np.float32), r"item 1: embedding: expected a 1-D sequence of numbers, got shape \[2, 3\]"),
        (["a", "b"], "item 1: embedding: expected a 1-D sequence of numbers; could not convert"),
    ],
)
def test_a_bad_embedding_is_refused_naming_it_and_nothing_of_the_call_is_stored(outbox, embedding, message):
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=message):
        outbox.append_many([with_embedding(1, [0.5]), with_embedding(2, embedding)])
    assert outbox.due(10) == [] and outbox.counters().get("appended", 0) == 0


def test_dead_letters_keep_the_embedding_and_a_retry_brings_it_back(outbox):
    outbox.append_many([with_embedding(1, [0.25, 0.5, 0.75]), with_embedding(2, [9.0])])
    first, second = outbox.due(10)
    outbox.dead_letter([(first.id, "rejected"), (second.id, "rejected")])
    assert outbox.due(10) == []
    assert outbox.retry_dead_letters(ids=[first.id]) == 1
    (again,) = outbox.due(10)
    assert again.id == first.id
    np.testing.assert_array_equal(again.embedding, np.array([0.25, 0.5, 0.75], np.float32))
    assert outbox.retry_dead_letters() == 1
    np.testing.assert_array_equal({i.id: i for i in outbox.due(10)}[second.id].embedding, np.array([9.0], np.float32))


# Embedding bytes in the byte accounting -----------------------------------------------------

EMBEDDING_TRIGGERS = ["dead_embedding_added", "dead_embedding_removed", "items_embedding_added", "items_embedding_removed"]


def recounted(path: Path) -> dict[str, int]:
    """`stored_bytes` and `dead_letter_bytes` as the tables say they should be: assets once (in
    the dead letters' count when a dead letter refers to them), embeddings once per row."""
    conn = sqlite3.connect(path)
    try:
        stored, dead = conn.execute(
            "SELECT coalesce(sum(CASE WHEN d IS NULL THEN size END), 0) + (SELECT coalesce(sum(length(embedding)), 0) FROM items), "
            "coalesce(sum(CASE WHEN d IS NOT NULL THEN size END), 0) + (SELECT coalesce(sum(length(embedding)), 0) FROM dead_letters) "
            "FROM (SELECT a.size, (SELECT 1 FROM dead_letters WHERE content_hash = a.content_hash LIMIT 1) AS d FROM assets a)"
        ).fetchone()
    finally:
        conn.close()
    return {"stored_bytes": stored, "dead_letter_bytes": dead}


def byte_counters(o: Outbox) -> dict[str, int]:
    c = o.counters()
    return {"stored_bytes": c.get("stored_bytes", 0), "dead_letter_bytes": c.get("dead_letter_bytes", 0)}


def test_the_byte_cap_counts_embeddings_refusing_or_evicting_as_the_policy_says(tmp_path):
    row = max(len(png(i)) for i in range(5)) + 4 * 4096  # the PNGs' sizes differ by a few bytes at most
    assert 4 * (min(len(png(i)) for i in range(5)) + 4 * 4096) > 3 * row + 100
    with Outbox(tmp_path / "newest.db", max_bytes=3 * row + 100, overflow_policy="drop_newest") as o:
        r = o.append_many([with_embedding(i, np.full(4096, 0.5)) for i in range(4)])
        assert r == AppendResult(accepted=3, dropped=1)  # the assets alone would all fit
        assert o.append_many([with_embedding(0, np.full(4096, 0.5), groups=["b"])]) == AppendResult(dropped=1)  # a row's copy costs
        assert o.append_many([item(0, groups=["b"])]) == AppendResult(accepted=1)  # without one, nothing new
        assert byte_counters(o)["stored_bytes"] == sum(len(png(i)) for i in range(3)) + 3 * 4 * 4096 == recounted(o.path)["stored_bytes"]
    with Outbox(tmp_path / "evict.db", max_bytes=3 * row + 100) as o:  # drop_least_uncertain
        o.append_many([with_embedding(i, np.full(4096, 0.5), score=0.5 + 0.1 * i) for i in range(3)])
        r = o.append_many([with_embedding(3, np.full(4096, 0.5), score=0.1)])
        assert r == AppendResult(accepted=1) and o.counters()["evicted_overflow"] == 1
        assert sorted(i.score for i in o.due(10)) == pytest.approx([0.1, 0.5, 0.6])
        assert byte_counters(o)["stored_bytes"] <= 3 * row + 100
        assert byte_counters(o) == recounted(o.path)
        assert o.append_many([with_embedding(4, np.full(4096, 0.5), score=0.9)]) == AppendResult(dropped=1)  # more confident


def test_byte_counters_match_the_tables_through_every_change(tmp_path):
    with Outbox(tmp_path / "o.db", max_bytes=12 * (len(png(0)) + 4 * 256)) as o:
        o.prepare_for_uploader()
        checks = 0

        def check():
            nonlocal checks
            assert byte_counters(o) == recounted(o.path), checks
            checks += 1

        o.append_many([with_embedding(i, np.full(256, i, np.float32), score=0.01 * i, groups=["a", "b"]) for i in range(6)])
        o.append_many([item(6), item(7, groups=["a"])])
        check()
        due = {(i.upload_group, i.content_hash): i.id for i in o.due(100)}
        o.mark_delivered([due[("a", content_hash(png(0)))], due[("active-learning", content_hash(png(6)))]])
        check()
        o.dead_letter([(due[("a", content_hash(png(1)))], "rejected"), (due[("b", content_hash(png(1)))], "rejected"),
                       (due[("a", content_hash(png(2)))], "rejected"), (due[("a", content_hash(png(7)))], "rejected")])
        check()
        assert o.retry_dead_letters(ids=[due[("a", content_hash(png(1)))]]) == 1
        check()
        o.drop([due[("b", content_hash(png(3)))]], "dropped_budget")
        check()
        assert o.purge_dead_letters(keep=1) == 2
        check()
        # Evictions by the writer: more confident rows go for less confident newcomers.
        o.append_many([with_embedding(i, np.full(256, 1.0), score=0.001) for i in range(20, 30)])
        assert o.counters()["evicted_overflow"] > 0
        check()
        o.purge_dead_letters(keep=0)
        o.mark_delivered([i.id for i in o.due(100)])
        check()
        assert byte_counters(o) == {"stored_bytes": 0, "dead_letter_bytes": 0}


def test_purging_dead_letters_by_bytes_counts_their_embeddings(tmp_path):
    with Outbox(tmp_path / "o.db") as o:
        o.append_many([with_embedding(i, np.zeros(1024)) for i in range(3)])
        for n, queued in enumerate(o.due(10)):
            o.dead_letter([(queued.id, "rejected")], now=1000.0 + n)
        assert o.dead_letter_bytes() == sum(len(png(i)) + 4096 for i in range(3))
        # Room for the newest two assets, not for their embeddings too: only the newest stays.
        assert o.purge_dead_letters(max_bytes=len(png(1)) + len(png(2)) + 4096 + 10) == 2
        assert [d["content_hash"] for d in o.dead_letters()] == [content_hash(png(2))]
        assert byte_counters(o) == recounted(o.path) == {"stored_bytes": 0, "dead_letter_bytes": len(png(2)) + 4096}


def triggers(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%embedding%' ORDER BY name")]
    finally:
        conn.close()


def version_2_file_without_embedding_triggers(path: Path) -> None:
    """A version-2 file as this morning's build left it: embeddings queued and dead-lettered,
    counted in neither byte counter (the dead letters' assets already in `dead_letter_bytes`)."""
    with Outbox(path) as o:
        o.append_many([with_embedding(1, np.zeros(100), groups=["a", "b"]), with_embedding(2, np.zeros(20))])
        o.dead_letter([(o.due(10)[-1].id, "rejected")])
    conn = sqlite3.connect(path, isolation_level=None)
    for name in EMBEDDING_TRIGGERS:
        conn.execute(f"DROP TRIGGER {name}")
    # What the counters were without the triggers: the assets only.
    conn.execute("UPDATE counters SET value = ? WHERE name = 'stored_bytes'", (len(png(1)),))
    conn.execute("UPDATE counters SET value = ? WHERE name = 'dead_letter_bytes'", (len(png(2)),))
    conn.close()


OPEN_WITH_THE_WRITER = """
import sys
from triton_al import _core
_core.OutboxWriter(sys.argv[1], max_items=1000, max_bytes=1 << 30, overflow_policy="drop_newest", durable=False,
                   busy_timeout_s=30.0, max_asset_bytes=1 << 20).close()
"""


@pytest.mark.parametrize("opener", ["python", "rust"])
def test_a_version_2_file_without_the_embedding_triggers_gets_them_at_open_and_its_embeddings_counted_once(tmp_path, opener):
    import subprocess
    import sys

    path = tmp_path / "o.db"
    version_2_file_without_embedding_triggers(path)
    assert triggers(path) == [] and recounted(path) != {"stored_bytes": len(png(1)), "dead_letter_bytes": len(png(2))}
    for _ in range(2):  # a second open neither adds them again nor counts the embeddings twice
        if opener == "python":
            Outbox(path).close()
        else:
            r = subprocess.run([sys.executable, "-c", OPEN_WITH_THE_WRITER, str(path)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        assert triggers(path) == EMBEDDING_TRIGGERS
        with Outbox(path) as o:
            assert byte_counters(o) == recounted(path) == {"stored_bytes": len(png(1)) + 2 * 400, "dead_letter_bytes": len(png(2)) + 80}


def test_a_version_1_file_migrated_by_either_opener_counts_embeddings(tmp_path):
    from triton_al import _core

    for opener in ("python", "rust"):
        old = tmp_path / f"v1-{opener}.db"
        version_1_file(old)
        if opener == "python":
            Outbox(old).close()
        else:
            _core.OutboxWriter(str(old), max_items=10, max_bytes=1 << 30, overflow_policy="drop_newest", durable=False,
                               busy_timeout_s=5.0, max_asset_bytes=1 << 20).close()
        assert triggers(old) == EMBEDDING_TRIGGERS, opener
        with Outbox(old) as o:
            o.prepare_for_uploader()  # the version-1 dead letter's asset moves to dead_letter_bytes
            o.append_many([with_embedding(3, np.zeros(8))])
            assert byte_counters(o) == recounted(old), opener
            assert byte_counters(o)["stored_bytes"] == len(png(1)) + len(png(3)) + 32



OPEN_A_NEW_FILE_AT_ONCE = """
import os, sys
from pathlib import Path
from triton_al import _core
from triton_al.outbox import Outbox

rounds, openers, directory = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
failures = []
for round_ in range(rounds):
    path = directory / f"o{round_}.db"
    go_r, go_w = os.pipe()
    children = []
    for k in range(openers):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # all start together
            try:
                if k % 2:
                    Outbox(path).close()
                else:
                    _core.OutboxWriter(str(path), max_items=10, max_bytes=1 << 20, overflow_policy="drop_newest",
                                       durable=False, busy_timeout_s=2.0, max_asset_bytes=1 << 20).close()
                os._exit(0)
            except BaseException as e:
                print(f"round {round_}, opener {k} ({'python' if k % 2 else 'rust'}): {e}", file=sys.stderr, flush=True)
                os._exit(1)
        children.append(pid)
    os.close(go_r)
    os.write(go_w, b"x" * openers)
    os.close(go_w)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures.append(round_)
sys.exit(1 if failures else 0)
"""


def test_processes_creating_one_new_outbox_at_once_all_open_it(tmp_path):
    """Switching a new file to WAL fails at once (SQLITE_BUSY, no busy handler) when another
    connection reads it: before opening retried, 19 rounds in 100 failed here (six Python
    openers each)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", OPEN_A_NEW_FILE_AT_ONCE, "60", "6", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for path in tmp_path.glob("o*.db"):
        with Outbox(path) as o:
            assert o.integrity_check() == "ok" and o.due(1) == []
