"""The local project store against the sink conformance suite, plus its own guarantees."""

from __future__ import annotations

import contextlib
import json

import pytest
from sink_conformance import GROUP, SinkConformance, upload

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
    pass


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
