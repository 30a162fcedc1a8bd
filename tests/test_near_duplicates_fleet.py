"""Near-duplicate entries shared by a fleet through the ledger's Redis: a real redis-server
(Debian's, started as tests/test_fleet.py does, stopped by PID), real outboxes, indexes and
uploaders in process, and `triton-al uploader` processes sharing one local store."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from image_helpers import jpeg, noisy
from outbox_helpers import store_index, uploaders, wait_for  # noqa: F401 - uploaders is a fixture

from triton_al.example.data import encode_png
from triton_al.outbox import FlaggedItem, Outbox, content_hash
from triton_al.sinks.local import LocalStore
from triton_al.uploader.commands import sink_identity
from triton_al.uploader.ledger import FleetGate, Ledger, owner_id
from triton_al.uploader.near_duplicates import (LATE, REMOTE_ITEM_ID, WRITTEN, NearDuplicateIndex, UnsettledScreening, index_path,
                                                 seen_entries)
from triton_al.uploader.near_duplicates_share import Event, ShareCollector, SharedEntries, encode
from triton_al.uploader.worker import Backoff, Uploader

redis = pytest.importorskip("redis", reason="the fleet extra (redis) is not installed")
from test_fleet import ledger_server  # noqa: E402,F401 - after the importorskip; ledger_server is a fixture
from test_near_duplicates_embedding import at_distance, fashion, unit  # noqa: E402,F401 - fashion is a fixture

GROUP = "active-learning"
D = 64


def queued(i: int, asset: bytes, *, media_type: str = "image/png", embedding=None, version: str = "1",
           group: str = GROUP) -> SimpleNamespace:
    """What the index reads of a queued outbox item."""
    return SimpleNamespace(id=i, upload_group=group, content_hash=content_hash(asset), media_type=media_type, asset=asset,
                           model_name="fashion_cnn", model_version=version, embedding=embedding)


def tensor(i: int) -> bytes:
    return f"tensor {i}".encode()  # not an image: checked by its embedding alone


class Fleet:
    """Indexes of several replicas (one outbox path each) sharing one ledger namespace."""

    def __init__(self, root: Path, url: str, namespace: str = "local:/fleet-store") -> None:
        self.root, self.url, self.namespace = root, url, namespace
        self.opened: list[tuple[NearDuplicateIndex, Ledger]] = []

    def index(self, name: str, *, share: bool = True, claims: bool = True, **kw) -> NearDuplicateIndex:
        outbox = self.root / f"{name}.db"
        ledger = Ledger.open(self.url, self.namespace, owner_id(outbox), timeout_s=0.5)
        shared = SharedEntries.for_ledger(ledger, max_len=1000, ttl_s=86400, defer_exact=claims, backoff_base_s=0.02,
                                          backoff_cap_s=0.05) if share else None
        kw.setdefault("max_distance", 20)
        kw.setdefault("max_embedding_distance", 0.02)
        ix = NearDuplicateIndex(index_path(outbox), sink=self.namespace, share=shared, **kw)
        self.opened.append((ix, ledger))
        return ix

    def close(self) -> None:
        for ix, ledger in self.opened:
            ix.close()
            ledger.close()


@pytest.fixture
def fleet(tmp_path, ledger_server):
    f = Fleet(tmp_path, ledger_server.url)
    try:
        yield f
    finally:
        f.close()


# The indexes ---------------------------------------------------------------------------------


def test_a_near_copy_of_another_replicas_image_matches_its_entry_and_the_evidence_is_kept(fleet, fashion):
    a, b = fleet.index("a"), fleet.index("b")
    original, copy = encode_png(fashion[10]), jpeg(fashion[10], 75)
    assert a.screen([queued(1, original)]) == []
    (m,) = b.screen([queued(7, copy, media_type="image/jpeg")])
    assert (m.first, m.kind, m.origin) == (content_hash(original), "hash", a.share.owner)
    b.record([m])
    entry = b.entry(GROUP, content_hash(original))
    assert (entry["item_id"], entry["origin"], entry["seen"]) == (REMOTE_ITEM_ID, a.share.owner, 1)
    (row,) = seen_entries(b.path)
    assert (row["content_hash"], row["seen"], row["origin"]) == (content_hash(original), 1, a.share.owner)
    # A's own index is left alone by its own publication; a distinct image is nobody's copy.
    assert a.entry(GROUP, content_hash(original))["origin"] is None
    assert b.screen([queued(8, encode_png(fashion[11]))]) == []
    assert a.screen([queued(2, noisy(fashion[11], 4, 1))])[0].origin == b.share.owner


def test_an_embedding_near_copy_matches_across_replicas_only_for_the_same_model_version(fleet):
    a, b = fleet.index("a"), fleet.index("b")
    base = unit(np.random.default_rng(0).standard_normal(D))
    assert a.screen([queued(1, tensor(1), media_type="application/x-npy", embedding=base)]) == []
    (m,) = b.screen([queued(5, tensor(5), media_type="application/x-npy", embedding=at_distance(base, 0.01, 1))])
    assert (m.kind, m.first, m.origin) == ("embedding", content_hash(tensor(1)), a.share.owner)
    assert m.embedding_distance == pytest.approx(0.01, abs=1e-3)
    other_version = queued(6, tensor(6), media_type="application/x-npy", embedding=at_distance(base, 0.001, 2), version="2")
    assert b.screen([other_version]) == [], "another model version is another space"
    assert b.screen([queued(7, tensor(7), media_type="application/x-npy", embedding=at_distance(base, 0.3, 3))]) == []
    assert a.screen([queued(2, tensor(2), media_type="application/x-npy", embedding=at_distance(base, 0.001, 4),
                            version="2")])[0].origin == b.share.owner


def screening_with(first: NearDuplicateIndex, rival) -> list:
    """Make `first`'s next screening read the stream, then let `rival()` run (another replica
    screening and publishing in full), then go on: the two screen at the same moment. Returns
    what `rival()` returned, once it ran."""
    real = first.share.publish_then_read
    ran: list = []

    def read_then_let_the_rival_in(events, cursors):
        answer = real(events, cursors)
        if not ran:  # the read before the screening
            ran.append(rival())
        return answer

    first.share.publish_then_read = read_then_let_the_rival_in
    return ran


@pytest.mark.parametrize("kind", ["hash", "embedding"])
def test_near_copies_screened_on_two_replicas_at_the_same_moment_are_uploaded_once(fleet, fashion, kind):
    a, b = fleet.index("a"), fleet.index("b")
    if kind == "hash":
        mine, theirs = queued(1, encode_png(fashion[20])), queued(7, jpeg(fashion[20], 75), media_type="image/jpeg")
    else:
        base = unit(np.random.default_rng(3).standard_normal(D))
        mine = queued(1, tensor(1), media_type="application/x-npy", embedding=base)
        theirs = queued(7, tensor(7), media_type="application/x-npy", embedding=at_distance(base, 0.01, 5))
    later = queued(2, noisy(fashion[20], 4, 2)) if kind == "hash" else \
        queued(3, tensor(3), media_type="application/x-npy", embedding=at_distance(base, 0.005, 6))
    rival = screening_with(a, lambda: b.screen([theirs]))
    # A screened `mine` without B's entry (read before B published), and B without A's: both
    # were new. B published first, so A's is the near-duplicate, on both replicas' terms.
    (m, also) = sorted(a.screen([mine, later]), key=lambda match: match.item_id)
    assert rival == [[]], "B screened first and keeps its item"
    assert (m.item_id, m.first, m.origin, m.kind) == (1, theirs.content_hash, b.share.owner, kind)
    assert (also.item_id, also.first, also.origin) == (later.id, theirs.content_hash, b.share.owner), \
        "a match of this batch on the withdrawn entry points at the one it lost to"
    assert a.entry(GROUP, mine.content_hash) is None
    assert a.entry(GROUP, theirs.content_hash)["origin"] == b.share.owner
    a.record([m, also])
    assert a.entry(GROUP, theirs.content_hash)["seen"] == 2
    assert share_metrics(a.share)[("triton_al_uploader_near_duplicate_share_settled_total",)] == 1
    assert share_metrics(b.share)[("triton_al_uploader_near_duplicate_share_settled_total",)] == 0
    # B hears of A's entry and of its withdrawal: only its own stays, on both.
    assert b.screen([queued(8, encode_png(fashion[21]))]) == []
    assert b.entry(GROUP, mine.content_hash) is None
    assert b.entry(GROUP, theirs.content_hash)["origin"] is None


def test_a_batch_whose_publication_the_ledger_did_not_answer_is_withdrawn_and_settled_when_it_answers(
        fleet, ledger_server, fashion, monkeypatch):
    a, b = fleet.index("a", max_entries=2), fleet.index("b")
    mine, theirs = queued(1, encode_png(fashion[30])), queued(7, jpeg(fashion[30], 75), media_type="image/jpeg")
    full = [queued(90, encode_png(fashion[90])), queued(91, encode_png(fashion[91]))]
    assert a.screen(full) == [] and a.sizes() == {GROUP: 2}

    def b_screens_then_the_ledger_stops():
        screened = b.screen([theirs])
        ledger_server.stop()
        return screened

    rival = screening_with(a, b_screens_then_the_ledger_stops)
    # A read before B published; its publication then met no ledger: whether its entry came
    # first is unknown, so it withdraws it and the batch is held (its claims would hold it too).
    with pytest.raises(UnsettledScreening, match="did not answer the publication of 1 new"):
        a.screen([mine])
    assert rival == [[]]
    assert a.entry(GROUP, mine.content_hash) is None
    assert [(e.op, e.key) for e in a.share.pending] == [("del", mine.content_hash)], "in case Redis did add it"
    assert share_metrics(a.share)[("triton_al_uploader_near_duplicate_share_unanswered_total",)] == 1
    assert all(a.entry(GROUP, i.content_hash) for i in full), "a held batch evicts nothing"
    # While the ledger does not answer (its backoff not over), a batch is held before anything is hashed.
    a.share.monotonic = lambda: float("-inf")
    hashed: list = []
    monkeypatch.setattr("triton_al.uploader.near_duplicates.image_hash", hashed.append)
    with pytest.raises(UnsettledScreening, match="does not answer"):
        a.screen([mine])
    assert hashed == []
    monkeypatch.undo()
    a.share.monotonic = time.monotonic
    ledger_server.start()
    time.sleep(0.1)  # past the backoff (capped at 0.05 s here)
    (m,) = a.screen([mine])
    assert (m.item_id, m.first, m.origin) == (1, theirs.content_hash, b.share.owner), "B's came first: one upload"


class Killed(BaseException):
    """The process stops here, as a SIGKILL would stop it: nothing after this point runs."""


def killed_at_the_publication(ix: NearDuplicateIndex) -> None:
    real = ix.share.publish_then_read

    def publish_then_read(events, cursors):
        if events:
            raise Killed
        return real(events, cursors)

    ix.share.publish_then_read = publish_then_read


def unsettled(ix: NearDuplicateIndex) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(ix.path)) as conn:
        return conn.execute("SELECT content_hash, unsettled FROM entries WHERE unsettled != 0").fetchall()


@pytest.mark.parametrize("claims", [True, False])
def test_entries_a_killed_replica_screened_but_never_published_are_screened_again_after_its_restart(fleet, fashion, claims):
    a, b = fleet.index("a", claims=claims), fleet.index("b", claims=claims)
    mine, theirs = queued(1, encode_png(fashion[40])), queued(7, jpeg(fashion[40], 75), media_type="image/jpeg")
    killed_at_the_publication(a)
    with pytest.raises(Killed):
        a.screen([mine])
    assert unsettled(a) == [(mine.content_hash, WRITTEN)], "in the file; its item has not gone on"
    assert b.screen([theirs]) == [], "B never heard of A's entry"
    restarted = fleet.index("a", claims=claims)  # the same outbox: the same index file and owner
    assert restarted.entry(GROUP, mine.content_hash) is None and unsettled(restarted) == []
    (m,) = restarted.screen([mine])  # its item is still queued: screened again, as if new
    assert (m.first, m.origin) == (theirs.content_hash, b.share.owner)


def test_without_claims_an_entry_screened_while_the_ledger_was_down_is_published_even_after_a_restart(
        fleet, ledger_server, fashion):
    a, b = fleet.index("a", claims=False), fleet.index("b", claims=False)
    mine, theirs = queued(1, encode_png(fashion[41])), queued(7, jpeg(fashion[41], 75), media_type="image/jpeg")
    ledger_server.stop()
    assert a.screen([mine]) == [], "screened alone: its item goes on"
    assert unsettled(a) == [(mine.content_hash, LATE)] and len(a.share.pending) == 1
    ledger_server.start()
    restarted = fleet.index("a", claims=False)  # A stopped before publishing it: what waited in memory is gone
    assert restarted.entry(GROUP, mine.content_hash)["origin"] is None and len(restarted.share.pending) == 1
    restarted.maintain()
    assert not restarted.share.pending and unsettled(restarted) == []
    (m,) = b.screen([theirs])
    assert (m.first, m.origin) == (mine.content_hash, restarted.share.owner)


def test_a_forgotten_entry_leaves_every_replica_so_a_later_near_copy_is_taken(fleet, fashion):
    a, b = fleet.index("a"), fleet.index("b")
    original = queued(1, encode_png(fashion[10]))
    assert a.screen([original]) == []
    assert b.screen([queued(5, encode_png(fashion[12]))]) == []  # B has read A's entry now
    assert b.entry(GROUP, original.content_hash)["origin"] == a.share.owner
    assert a.forget([original]) == 1  # A dead-lettered it
    copy = queued(6, jpeg(fashion[10], 75), media_type="image/jpeg")
    assert b.screen([copy]) == [], "the near-copy is no longer anybody's duplicate"
    assert b.entry(GROUP, original.content_hash) is None
    assert a.screen([queued(2, noisy(fashion[10], 4, 3))])[0].first == copy.content_hash, "B's copy is the fleet's entry now"


def test_a_replica_started_later_catches_up_and_a_restart_reads_only_what_it_missed(fleet, fashion):
    a = fleet.index("a")
    firsts = [queued(i, encode_png(fashion[i])) for i in range(100)]
    assert a.screen(firsts) == []
    late = fleet.index("late")
    matches = late.screen([queued(1000 + i, jpeg(fashion[i], 75), media_type="image/jpeg") for i in (3, 50, 99)])
    assert [m.first for m in matches] == [firsts[i].content_hash for i in (3, 50, 99)]
    assert late.sizes() == {GROUP: 100}
    late.close()
    assert a.screen([queued(200, encode_png(fashion[200]))]) == []
    again = fleet.index("late")  # restarted on its file: only the one entry published since
    trips = again.share.round_trips
    assert again.screen([queued(2000, jpeg(fashion[200], 75), media_type="image/jpeg")])[0].first == content_hash(encode_png(fashion[200]))
    assert again.share.round_trips - trips == 1 and again.sizes() == {GROUP: 101}


def test_without_sharing_the_indexes_stay_apart(fleet, fashion):
    a, b = fleet.index("a", share=False), fleet.index("b", share=False)
    assert a.screen([queued(1, encode_png(fashion[10]))]) == []
    assert b.screen([queued(2, jpeg(fashion[10], 75), media_type="image/jpeg")]) == []
    assert not fleet.opened[0][1].client.keys("*:n:*"), "nothing published"


def test_an_exact_copy_is_left_to_the_claims_and_suppressed_here_without_them(fleet, fashion):
    asset = encode_png(fashion[10])
    a = fleet.index("a")
    assert a.screen([queued(1, asset)]) == []
    with_claims = fleet.index("b")
    assert with_claims.screen([queued(9, asset)]) == [], "the ledger's claim decides (delivered elsewhere, or held)"
    entry = with_claims.entry(GROUP, content_hash(asset))
    assert (entry["item_id"], entry["origin"]) == (9, None), "taken over as this replica's entry"
    assert with_claims.screen([queued(9, asset)]) == [], "and it matches itself when screened again"
    without = fleet.index("c", claims=False)
    (m,) = without.screen([queued(4, asset)])
    assert (m.distance, m.first, m.origin) == (0, content_hash(asset), a.share.owner)


def test_garbage_in_the_stream_is_skipped_and_a_stream_of_the_wrong_type_never_crashes(fleet, fashion, caplog):
    a = fleet.index("a")
    client = fleet.opened[0][1].client
    key = a.share.stream_key(GROUP)
    good = encode(Event("add", GROUP, content_hash(b"x"), "someone", 1e12, np.zeros(8, np.uint64)))[b"d"]
    with_embedding = encode(Event("add", GROUP, content_hash(b"y"), "someone", 1e12, None, "m/1", unit(np.ones(4))))[b"d"]
    head = 1 + 1 + 1 + 8 + 2 * 4
    nan = bytearray(with_embedding)
    nan[-4:] = np.array([np.nan], "<f4").tobytes()
    bad = [
        {"d": good[:-1]}, {"d": good + b"\0"},  # a hash one byte short, one byte too many
        {"d": good[:10]}, {"d": b""}, {"junk": b"\xff\xfe"}, {"d": b"\xff" * 200},
        {"d": bytes([2]) + good[1:]},  # another layout version
        {"d": good[:1] + bytes([7]) + good[2:]},  # an unknown op
        {"d": good[:2] + bytes([0]) + good[3:]},  # says no hash, holds 64 bytes more
        {"d": good[:3] + np.array([np.nan], "<f8").tobytes() + good[11:]},  # added_at NaN
        {"d": good[:head] + b"\xff" * 64 + good[head + 64:]},  # a key that is not UTF-8
        {"d": bytes(nan)},  # an embedding holding NaN
        {"d": with_embedding[:-4]},  # an embedding one value short
    ]
    for fields in bad:
        client.xadd(key, fields)
    far = queued(50, encode_png(fashion[50]))
    client.xadd(key, encode(Event("add", GROUP, far.content_hash, "someone", 1e12, a_hash(far))))
    with caplog.at_level(logging.DEBUG, logger="triton_al.uploader"):
        (m,) = a.screen([queued(1, jpeg(fashion[50], 75), media_type="image/jpeg")])
    assert m.first == far.content_hash and m.origin == "someone", "the good entry after the garbage is read"
    assert a.share.skipped == len(bad) and a.share.up
    assert sum("stream entry" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records) == len(bad)
    # Another group's stream is not a stream at all: reading answers an error; screening goes on alone.
    client.set(a.share.stream_key("other"), "not a stream")
    with caplog.at_level(logging.WARNING, logger="triton_al.uploader"):
        assert a.screen([queued(2, encode_png(fashion[60]), group="other")]) == [], "an answer, if unusable: not held"
    assert not a.share.up and "WRONGTYPE" in a.share.error
    assert unsettled(a) == [(content_hash(encode_png(fashion[60])), LATE)], "its item goes on: published later, not withdrawn"
    # Publishing to it is refused for that entry alone (logged): the others' publication goes on.
    assert len(a.share.pending) == 1
    a.share.up = True
    assert a.screen([queued(4, encode_png(fashion[62]))]) == []
    assert not a.share.pending and a.share.up
    assert client.xlen(key) == len(bad) + 2
    assert unsettled(a) == [], "refused by a key of the wrong type: never to be published"


def a_hash(item) -> np.ndarray:
    from triton_al.uploader.near_duplicates import image_hash

    return image_hash(item.asset)


# Uploaders sharing a store ----------------------------------------------------------------


def flagged(asset: bytes, media_type: str = "image/png") -> FlaggedItem:
    return FlaggedItem(asset=asset, media_type=media_type, model_name="fashion_cnn", model_version="1",
                       prediction={"label": 1, "probs": [0.1] * 10}, score=0.1, strategy="entropy", threshold=0.5,
                       reason="uncertain", upload_groups=[GROUP])


def replica(root: Path, name: str, url: str, store: Path, *, claims: bool = True) -> Uploader:
    outbox = Outbox(root / f"{name}.db")
    target = sink_identity(f"local:{store}")
    ledger = Ledger.open(url, target, owner_id(outbox.path), timeout_s=0.5)
    gate = FleetGate(ledger, {}, claims=claims, backoff_base_s=0.02, backoff_cap_s=0.05)
    share = SharedEntries.for_ledger(ledger, max_len=1000, ttl_s=86400, defer_exact=claims, backoff_base_s=0.02, backoff_cap_s=0.05)
    index = NearDuplicateIndex(index_path(outbox.path), max_distance=20, max_embedding_distance=0.02, sink=target, share=share)
    return Uploader(outbox, LocalStore(store), batch_size=16, poll_interval_s=0.02, backoff=Backoff(0.02, 0.05, 0.01),
                    fleet=gate, near_duplicates=index, seed=1)


def drain(u: Uploader) -> None:
    for _ in range(200):
        if u.step() is None:
            return
    raise AssertionError("the queue never drained")


def close(*workers: Uploader) -> None:
    for w in workers:
        w.near_duplicates.close()
        w.fleet.ledger.close()
        w.outbox.close()


def stored(store: Path) -> set[str]:
    return {r["content_hash"] for r in store_index(store, GROUP)}


def test_a_jpeg_copy_queued_on_b_of_an_image_delivered_via_a_is_not_uploaded_and_is_counted(tmp_path, ledger_server, fashion):
    store = tmp_path / "store"
    a, b = replica(tmp_path, "a", ledger_server.url, store), replica(tmp_path, "b", ledger_server.url, store)
    try:
        original, distinct = encode_png(fashion[10]), encode_png(fashion[11])
        a.outbox.append_many([flagged(original)])
        drain(a)
        b.outbox.append_many([flagged(jpeg(fashion[10], 75), "image/jpeg"), flagged(distinct), flagged(original)])
        drain(b)
        assert stored(store) == {content_hash(original), content_hash(distinct)}
        counters = b.outbox.counters()
        assert counters[f"near_duplicates/{GROUP}"] == 1 and counters.get("queued_items", 0) == 0
        assert counters["uploaded"] == 2, "the distinct image, and the exact copy recorded as delivered by A (the claim's 'done')"
        assert b.near_duplicates.entry(GROUP, content_hash(original))["seen"] == 1
    finally:
        close(a, b)


def share_metrics(share: SharedEntries) -> dict[tuple, float]:
    """What the uploader's /metrics says of the sharing: (sample name, labels...) -> value."""
    return {(m.name, *m.labels.values()): m.value for family in ShareCollector(share).collect() for m in family.samples}


def test_a_batch_whose_entries_the_fleet_could_not_see_is_held_until_it_can(tmp_path, ledger_server, fashion):
    store = tmp_path / "store"
    a, b = replica(tmp_path, "a", ledger_server.url, store), replica(tmp_path, "b", ledger_server.url, store)
    try:
        a.outbox.append_many([flagged(encode_png(fashion[33]))])
        b.outbox.append_many([flagged(jpeg(fashion[33], 75), "image/jpeg")])

        def b_uploads_then_the_ledger_stops():
            drain(b)
            ledger_server.stop()

        screening_with(a.near_duplicates, b_uploads_then_the_ledger_stops)
        outcome = a.step()
        assert (outcome.held, outcome.uploaded) == (1, 0) and outcome.only_held
        assert a.outbox.counters().get("queued_items") == 1, "still queued, nothing lost"
        assert "Connection refused" in a.last_error and not a.fleet.up, "the gate asked the ledger too: it holds the groups"
        ledger_server.start()
        time.sleep(0.1)
        drain(a)
        assert stored(store) == {content_hash(jpeg(fashion[33], 75))}, "B's went first; A's is its near-duplicate"
        assert a.outbox.counters()[f"near_duplicates/{GROUP}"] == 1
    finally:
        close(a, b)


def test_with_the_ledger_killed_b_keeps_uploading_alone_and_catches_up_after_its_restart(tmp_path, ledger_server, fashion, caplog):
    store = tmp_path / "store"
    # Without claims, groups without a fleet budget do not wait for the ledger: B goes on uploading.
    a = replica(tmp_path, "a", ledger_server.url, store, claims=False)
    b = replica(tmp_path, "b", ledger_server.url, store, claims=False)
    try:
        a.outbox.append_many([flagged(encode_png(fashion[1]))])
        drain(a)
        b.outbox.append_many([flagged(encode_png(fashion[5]))])
        drain(b)  # B screened a batch: it has read A's entry
        ledger_server.stop()
        a.outbox.append_many([flagged(encode_png(fashion[2]))])
        with caplog.at_level(logging.WARNING, logger="triton_al.uploader"):
            drain(a)  # screened and uploaded, its entry waits to be published
            b.outbox.append_many([flagged(jpeg(fashion[1], 75), "image/jpeg"), flagged(encode_png(fashion[3])),
                                  flagged(noisy(fashion[3], 4, 1))])
            for _ in range(3):
                drain(b)
        assert a.near_duplicates.share.pending and not b.near_duplicates.share.up
        assert share_metrics(b.near_duplicates.share)[("triton_al_uploader_near_duplicate_share_up",)] == 0
        assert share_metrics(a.near_duplicates.share)[("triton_al_uploader_near_duplicate_share_waiting",)] == 1
        assert content_hash(encode_png(fashion[3])) in stored(store), "B uploads with its local index"
        assert b.outbox.counters()[f"near_duplicates/{GROUP}"] == 2, "its own near-copy and A's (read before the outage)"
        logged = [r.getMessage() for r in caplog.records if "near-duplicate sharing" in r.getMessage()]
        assert len(logged) == 2 and all("screening with this replica's index alone" in m for m in logged), "once per replica"
        ledger_server.start()  # the same port
        time.sleep(0.1)  # past both replicas' backoff (capped at 0.05 s here): their next calls ask the ledger
        a.outbox.append_many([flagged(encode_png(fashion[4]))])
        drain(a)  # publishes what waited, unless its first call met a connection the restart broke:
        deadline = time.monotonic() + 10
        while a.near_duplicates.share.pending:  # then its maintenance does, once the backoff allows
            assert time.monotonic() < deadline, a.near_duplicates.share.error
            time.sleep(0.06)
            a.maintain(force=True)
        b.outbox.append_many([flagged(jpeg(fashion[2], 75), "image/jpeg")])
        drain(b)
        assert b.near_duplicates.share.up
        assert b.outbox.counters()[f"near_duplicates/{GROUP}"] == 3, "A's image of the outage, caught up"
        seen_by_b, seen_by_a = share_metrics(b.near_duplicates.share), share_metrics(a.near_duplicates.share)
        assert seen_by_b[("triton_al_uploader_near_duplicate_share_up",)] == 1
        assert seen_by_a[("triton_al_uploader_near_duplicate_share_waiting",)] == 0
        assert seen_by_a[("triton_al_uploader_near_duplicate_share_changes_total", "published")] == 3  # A's three images
        assert seen_by_b[("triton_al_uploader_near_duplicate_share_changes_total", "received")] == 3
        assert content_hash(jpeg(fashion[2], 75)) not in stored(store)
    finally:
        close(a, b)


# The uploader processes ---------------------------------------------------------------------


def run(uploaders, outbox: Path, store: Path, url: str, *extra: str) -> str:  # noqa: F811
    up = uploaders(outbox, store, "--once", "--log-format", "text", "--budget-ledger", url, *extra)
    assert up.proc.wait(60) == 0, up.log()
    return up.log()


def test_uploader_processes_share_entries_through_the_ledger_unless_told_not_to(tmp_path, ledger_server, uploaders, fashion):  # noqa: F811
    original, copy = encode_png(fashion[10]), jpeg(fashion[10], 75)
    for mode, extra in (("shared", ()), ("apart", ("--no-near-duplicate-share",))):
        store, a, b = tmp_path / mode / "store", tmp_path / mode / "a.db", tmp_path / mode / "b.db"
        store.parent.mkdir()
        with Outbox(a) as o:
            o.append_many([flagged(original)])
        log_a = run(uploaders, a, store, ledger_server.url, *extra)
        with Outbox(b) as o:
            o.append_many([flagged(copy, "image/jpeg")])
        log_b = run(uploaders, b, store, ledger_server.url, *extra)
        if mode == "shared":
            assert "shared through the budget ledger" in log_a
            assert stored(store) == {content_hash(original)}, log_b
            assert "1 of them of another replica's" in log_b
            with Outbox(b) as o:
                assert o.counters()[f"near_duplicates/{GROUP}"] == 1
            listed = subprocess.run([sys.executable, "-m", "triton_al.cli", "outbox", "near-duplicates", "--outbox", str(b)],
                                    capture_output=True, text=True, timeout=60, check=True)
            (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
            assert (row["content_hash"], row["seen"], row["origin"]) == (content_hash(original), 1, owner_id(a))
        else:
            assert "shared through" not in log_a
            assert stored(store) == {content_hash(original), content_hash(copy)}
            with sqlite3.connect(index_path(b)) as db:
                assert db.execute("SELECT count(*) FROM entries WHERE origin IS NOT NULL").fetchone() == (0,)


def test_serve_passes_the_setting_on_to_its_uploader(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import triton_al.serving.pipeline as pipeline
    from triton_al.cli import app

    seen = []

    class Stop(Exception):
        pass

    def fake(*args, uploader_args, **kwargs):
        seen.append(uploader_args)
        raise Stop

    monkeypatch.setattr(pipeline, "Pipeline", fake)
    base = ["serve", "--model-repository", str(tmp_path), "--data-dir", str(tmp_path / "data"), "--budget-ledger", "redis://127.0.0.1:1/0"]
    for extra, expected in (([], False), (["--no-near-duplicate-share"], True), (["--near-duplicate-share"], False)):
        r = CliRunner().invoke(app, base + extra)
        assert isinstance(r.exception, Stop), r.output
        assert ("--no-near-duplicate-share" in seen[-1]) is expected, seen[-1]


def written_entries(outbox: Path) -> list[str]:
    """Entries the uploader of `outbox` wrote to its index file and has not yet heard the fleet answer for."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{index_path(outbox)}?mode=ro", uri=True, timeout=1)) as conn:
            return [r[0] for r in conn.execute("SELECT content_hash FROM entries WHERE unsettled = ?", (WRITTEN,))]
    except sqlite3.OperationalError:  # not created yet, or its table not yet
        return []


def test_an_uploader_killed_while_publishing_its_batch_screens_it_again_after_its_restart(tmp_path, ledger_server, uploaders,  # noqa: F811
                                                                                          fashion):
    store, a, b = tmp_path / "store", tmp_path / "a.db", tmp_path / "b.db"
    original, copy = encode_png(fashion[12]), jpeg(fashion[12], 75)
    with Outbox(a) as o:
        o.append_many([flagged(original)])
    client = redis.Redis.from_url(ledger_server.url)
    # Redis answers reads but holds every write: A screens its batch and writes its entry to the
    # file, then waits on the XADD publishing it, and is killed there (SIGKILL, by PID).
    client.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
    try:
        up = uploaders(a, store, "--once", "--log-format", "text", "--budget-ledger", ledger_server.url)
        wait_for(lambda: written_entries(a), 30, "A to write its entry, then publish it", interval=0.01)
        up.kill()
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    ledger = Ledger.open(ledger_server.url, sink_identity(f"local:{store}"), "reader")
    try:
        assert client.xlen(SharedEntries.for_ledger(ledger).stream_key(GROUP)) == 0, "the killed client's XADD never ran"
    finally:
        ledger.close()
        client.close()
    with Outbox(b) as o:
        o.append_many([flagged(copy, "image/jpeg")])
    run(uploaders, b, store, ledger_server.url)  # B never heard of A's entry: it uploads its copy
    log_a = run(uploaders, a, store, ledger_server.url)
    assert "never settled with the fleet; their items are screened again" in log_a
    assert stored(store) == {content_hash(copy)}, "A's image, screened again, is the near-duplicate of B's"
    with Outbox(a) as o:
        assert o.counters()[f"near_duplicates/{GROUP}"] == 1
    assert written_entries(a) == []
