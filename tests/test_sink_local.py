"""The local project store against the sink conformance suite, plus its own guarantees."""

from __future__ import annotations

import contextlib
import json

import pytest
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.sinks.base import PermanentSinkError
from triton_al.sinks.local import INDEX, LocalStore


@pytest.fixture
def sink(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def stored(sink):
    def read(group):
        out = {}
        for record in sink.index(group):
            out[record["content_hash"]] = json.loads((sink.root / group / f"{record['content_hash']}.json").read_text())
        return out

    return read


@pytest.fixture
def outage(sink, tmp_path):
    @contextlib.contextmanager
    def gone():  # the store's volume goes away, then comes back
        sink.root.rename(tmp_path / "away")
        try:
            yield
        finally:
            (tmp_path / "away").rename(sink.root)

    return gone


@pytest.fixture
def bad_credentials_sink():
    return None


@pytest.fixture
def secret():
    return None


class TestLocalStore(SinkConformance):
    def test_wrong_credentials_are_a_clear_error_without_the_secret(self, sink):
        """The local store takes no credentials (the process's own file permissions apply):
        nothing to refuse, so it must simply work (a skip would fail the run under CI=true)."""
        assert sink.upload([upload(40)]) == [None]


def test_a_torn_index_line_is_repaired_by_the_next_writer(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.upload([upload(1)])
    with open(tmp_path / "s" / GROUP / INDEX, "ab") as f:
        f.write(b'{"content_hash": "abc')  # a crash mid-append
    fresh = LocalStore(tmp_path / "s")
    fresh.upload([upload(2)])
    assert [r["content_hash"] for r in fresh.index(GROUP)] == [upload(1).content_hash, upload(2).content_hash]


def test_labels_round_trip_and_bad_hashes_are_refused(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.upload([upload(1)])
    store.write_label(GROUP, upload(1).content_hash, 7, annotator="alice")
    (a,) = store.annotations(GROUP)
    assert (a.content_hash, a.label, a.annotator) == (upload(1).content_hash, 7, "alice")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.write_label(GROUP, "../x", 1)


def test_a_missing_store_is_not_created_when_asked_not_to(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalStore(tmp_path / "nope", create=False)


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from sink_conformance import upload
from triton_al.sinks.local import LocalStore
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies between writing and renaming
LocalStore(sys.argv[1]).upload([upload(1)])
"""


def test_temporaries_of_killed_uploads_are_removed_by_the_next_writer(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(root), str(Path(__file__).parent)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    (dead,) = (root / GROUP).glob(".*.tmp")  # .<sha>.png.<pid>.tmp, its writer gone
    assert dead.name.startswith(f".{upload(1).filename}.") and dead.name.endswith(".tmp")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        fresh = root / GROUP / f".x.png.{sleeper.pid}.tmp"  # a live writer's: kept
        stale = root / GROUP / f".y.png.{sleeper.pid}.tmp"  # the same PID, but two hours old: reused, removed
        label = root / GROUP / "labels" / f".z.json.{dead.name.split('.')[-2]}.tmp"  # a killed label writer's
        for path in (fresh, stale, label):
            path.write_bytes(b"partial")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        store = LocalStore(root)
        assert store.upload([upload(2)]) == [None]
        left = sorted(p.name for p in (root / GROUP).rglob(".*.tmp"))
        assert left == [fresh.name]
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    assert [r["content_hash"] for r in store.index(GROUP)] == [upload(2).content_hash]


SECOND_WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from sink_conformance import upload
from triton_al.sinks.local import LocalStore
store = LocalStore(sys.argv[1])
for line in sys.stdin:  # one batch of seeds per line, each answered
    results = store.upload([upload(int(s)) for s in line.split()])
    print(sum(r is None for r in results), flush=True)
"""


def test_two_processes_on_one_store_index_each_asset_once(tmp_path):
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    root = tmp_path / "s"
    writers = [subprocess.Popen([sys.executable, "-c", SECOND_WRITER, str(root), str(Path(__file__).parent)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        def ask(writer, seeds):
            writer.stdin.write(" ".join(map(str, seeds)) + "\n")
            writer.stdin.flush()
            assert int(writer.stdout.readline()) == len(seeds)

        ask(writers[0], [1])  # the first writer has read the index (one line) ...
        ask(writers[1], [2, 3])  # ... the second appends two more ...
        ask(writers[0], [2, 3, 4])  # ... which the first must not append again
        ask(writers[1], [1, 4, 5])
        # and both at once, the same assets in opposite orders
        for w, seeds in zip(writers, (list(range(6, 30)), list(range(29, 5, -1)))):
            w.stdin.write(" ".join(map(str, seeds)) + "\n")
            w.stdin.flush()
        for w in writers:
            assert int(w.stdout.readline()) == 24
    finally:
        for w in writers:
            w.stdin.close()
            w.wait(30)
            w.stdout.close()
    counts = Counter(r["content_hash"] for r in LocalStore(root).index(GROUP))
    assert set(counts) == {upload(i).content_hash for i in range(1, 30)}
    assert max(counts.values()) == 1, f"{sum(n > 1 for n in counts.values())} assets indexed twice"


def test_an_image_too_large_to_decode_is_refused_alone(tmp_path):
    from test_uploader_faults import bomb_png

    store = LocalStore(tmp_path / "s")
    results = store.upload([upload(1), upload(2, asset=bomb_png()), upload(3)])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentSinkError) and "too large to decode" in str(results[1])
