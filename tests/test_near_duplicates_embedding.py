"""Near-duplicates by the model's embedding (issue 15): the index's second check (cosine
distance among entries of the same model name, version and dimension), its persistence and
bookkeeping in real SQLite files, the exact pruned lookup of large spaces, the flag, and the
uploader (in process) draining a real outbox whose items carry embeddings into a local store."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from image_helpers import jpeg
from outbox_helpers import store_index, uploaders  # noqa: F401

from triton_al.example.data import encode_png, load
from triton_al.outbox import FlaggedItem, Outbox, content_hash
from triton_al.sinks.local import LocalStore
from triton_al.uploader import near_duplicates as nd
from triton_al.uploader.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_EMBEDDING_DISTANCE,
    HASH_NAME,
    NearDuplicateIndex,
    image_hash,
    index_path,
    parse_embedding_distance,
)
from triton_al.uploader.worker import Uploader

GROUP = "active-learning"
D = 64


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    images, _ = load("test")
    return images


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x)).astype(np.float32)


def at_distance(e: np.ndarray, d: float, seed: int) -> np.ndarray:
    """A unit vector at cosine distance d (1 - cos) from unit vector e."""
    r = np.random.default_rng(seed).standard_normal(len(e))
    r -= (r @ e) * e
    r /= np.linalg.norm(r)
    return unit((1 - d) * e + np.sqrt(1 - (1 - d) ** 2) * r)


def queued(i: int, embedding=None, *, asset: bytes | None = None, media_type: str = "application/x-npy",
           model: str = "fashion_cnn", version: str = "1", group: str = GROUP) -> SimpleNamespace:
    """What the index reads of a queued outbox item; by default an asset that is not an image
    (checked by its embedding alone)."""
    asset = f"tensor {i}".encode() if asset is None else asset
    return SimpleNamespace(id=i, upload_group=group, content_hash=content_hash(asset), media_type=media_type, asset=asset,
                           model_name=model, model_version=version, embedding=embedding)


def index(path, **kw) -> NearDuplicateIndex:
    kw.setdefault("max_distance", DEFAULT_MAX_DISTANCE)
    kw.setdefault("max_embedding_distance", 0.02)
    return NearDuplicateIndex(path, **kw)


@pytest.fixture
def base() -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal(D))


# The check -------------------------------------------------------------------------------


def test_an_embedding_within_the_distance_matches_one_beyond_does_not(tmp_path, base):
    ix = index(tmp_path / "ix")
    assert ix.screen([queued(1, base)]) == []
    (m,) = ix.screen([queued(2, at_distance(base, 0.01, 1))])
    assert (m.item_id, m.first, m.kind, m.distance) == (2, content_hash(b"tensor 1"), "embedding", None)
    assert m.embedding_distance == pytest.approx(0.01, abs=1e-5)
    assert ix.screen([queued(3, at_distance(base, 0.03, 2))]) == []  # beyond 0.02: uploaded, and added
    assert ix.sizes() == {GROUP: 2}
    # The stored row: unit length, little-endian float32, with its model.
    e = ix.entry(GROUP, content_hash(b"tensor 1"))
    assert e["hash"] is None and e["embedding_model"] == "fashion_cnn/1"
    assert np.allclose(e["embedding"], base, atol=1e-6) and abs(np.linalg.norm(e["embedding"]) - 1) < 1e-6
    # Scaled: the same direction (cosine ignores length).
    (scaled,) = ix.screen([queued(4, 7.5 * base)])
    assert scaled.embedding_distance < 1e-5
    # Groups are apart.
    assert ix.screen([queued(5, base, group="other")]) == []
    ix.close()


def test_other_model_versions_and_dimensions_never_match(tmp_path, base):
    ix = index(tmp_path / "ix", max_embedding_distance=1.0)  # anything within the space matches
    assert ix.screen([queued(1, base)]) == []
    assert ix.screen([queued(2, base, version="2")]) == []  # a redeploy: a new space
    assert ix.screen([queued(3, base, model="other_model")]) == []
    assert ix.screen([queued(4, base[:32])]) == []  # same model and version, another dimension
    assert ix.sizes() == {GROUP: 4}
    assert [m.first for m in ix.screen([queued(5, at_distance(base, 0.5, 3), version="2")])] == [content_hash(b"tensor 2")]
    assert [m.first for m in ix.screen([queued(6, unit(-base[:32]) + 0)])] == []  # 1 - cos = 2 > 1
    ix.close()


def test_either_check_suffices_and_each_can_be_off(tmp_path, fashion, base):
    a, b = encode_png(fashion[0]), encode_png(fashion[1])
    copy = jpeg(fashion[0], 75)
    assert nd.distance(image_hash(a), image_hash(copy)) <= DEFAULT_MAX_DISTANCE
    assert nd.distance(image_hash(a), image_hash(b)) > 2 * DEFAULT_MAX_DISTANCE
    far = at_distance(base, 0.5, 4)
    both = index(tmp_path / "both")
    assert both.screen([queued(1, base, asset=a, media_type="image/png")]) == []
    (by_hash,) = both.screen([queued(2, far, asset=copy, media_type="image/jpeg")])  # embedding far, hash near
    assert (by_hash.kind, by_hash.embedding_distance) == ("hash", None) and by_hash.distance <= DEFAULT_MAX_DISTANCE
    (by_embedding,) = both.screen([queued(3, at_distance(base, 0.005, 5), asset=b, media_type="image/png")])  # hash far
    assert by_embedding.kind == "embedding" and by_embedding.first == content_hash(a)
    # An image Pillow cannot decode is still checked by its embedding, and indexed by it.
    broken = b"\x89PNG\r\n\x1a\n-truncated-"
    (undecodable,) = both.screen([queued(4, at_distance(base, 0.01, 6), asset=broken, media_type="image/png")])
    assert undecodable.kind == "embedding"
    assert both.screen([queued(5, far, asset=broken + b"2", media_type="image/png")]) == []
    assert both.entry(GROUP, content_hash(broken + b"2"))["hash"] is None
    both.close()
    # The embedding check off: only hashes; items with nothing but an embedding are not indexed.
    hashes = index(tmp_path / "hashes", max_embedding_distance=0)
    assert hashes.screen([queued(1, base, asset=a, media_type="image/png"), queued(2, base)]) == []
    assert hashes.screen([queued(3, at_distance(base, 0.001, 7), asset=b, media_type="image/png")]) == []
    assert hashes.sizes() == {GROUP: 2} and hashes.entry(GROUP, content_hash(a))["embedding"] is None
    hashes.close()
    # The hash check off: images are not hashed; only embeddings.
    embeddings = index(tmp_path / "embeddings", max_distance=0)
    assert embeddings.screen([queued(1, base, asset=a, media_type="image/png")]) == []
    assert embeddings.screen([queued(2, far, asset=copy, media_type="image/jpeg")]) == []  # a hash copy: not checked
    assert embeddings.screen([queued(3, None, asset=b, media_type="image/png")]) == []  # no embedding: not indexed
    assert embeddings.entry(GROUP, content_hash(a))["hash"] is None and embeddings.sizes() == {GROUP: 2}
    assert len(embeddings.screen([queued(4, at_distance(base, 0.01, 8))])) == 1
    embeddings.close()
    with pytest.raises(ValueError, match="1-255 bits"):
        NearDuplicateIndex(tmp_path / "none", max_distance=0, max_embedding_distance=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_embedding_distance"):
            NearDuplicateIndex(tmp_path / "bad", max_distance=4, max_embedding_distance=bad)


def test_bad_embeddings_are_ignored_with_a_debug_line_never_a_crash(tmp_path, fashion, base, caplog):
    ix = index(tmp_path / "ix")
    nan = base.copy()
    nan[3] = np.nan
    a = encode_png(fashion[0])
    bad = [nan, np.full(D, np.inf, np.float32), np.zeros(D, np.float32), base.reshape(8, 8), np.zeros(0, np.float32),
           np.ones(nd.EMBEDDING_MAX_DIM + 1, np.float32), "not numbers", [1.0, None]]
    with caplog.at_level(logging.DEBUG, logger="triton_al.uploader"):
        assert ix.screen([queued(1, base)]) == []
        assert ix.screen([queued(10 + i, e) for i, e in enumerate(bad)]) == []  # nothing else to go by: not indexed
        assert ix.screen([queued(30, nan, asset=a, media_type="image/png")]) == []  # an image: by its hash alone
    assert ix.sizes() == {GROUP: 2} and ix.entry(GROUP, content_hash(a))["embedding"] is None
    notes = [r.getMessage() for r in caplog.records if "embedding not used" in r.getMessage()]
    assert len(notes) == len(bad) + 1 and all(r.levelno == logging.DEBUG for r in caplog.records if "embedding not used" in r.getMessage())
    assert any("NaN or Inf" in n for n in notes) and any("all zero" in n for n in notes)
    ix.close()


# Persistence and bookkeeping ---------------------------------------------------------------


def test_embeddings_persist_across_reopening(tmp_path, base):
    path = tmp_path / "ix"
    ix = index(path)
    others = [at_distance(base, 0.5, 10 + i) for i in range(5)]
    assert ix.screen([queued(1, base), *(queued(2 + i, e) for i, e in enumerate(others))]) == []
    ix.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        blob, model = db.execute("SELECT embedding, embedding_model FROM entries WHERE content_hash = ?",
                                 (content_hash(b"tensor 1"),)).fetchone()
    assert model == "fashion_cnn/1" and np.allclose(np.frombuffer(blob, "<f4"), base, atol=1e-6)
    again = index(path)  # a restart
    (m,) = again.screen([queued(20, at_distance(base, 0.01, 20))])
    assert (m.kind, m.first) == ("embedding", content_hash(b"tensor 1"))
    assert [x.first for x in again.screen([queued(21, at_distance(others[3], 0.01, 21))])] == [content_hash(b"tensor 5")]
    again.close()
    # Reopened with the check off, the stored embeddings stay in the file (and match again later).
    off = index(path, max_embedding_distance=0)
    assert off.screen([queued(22, base)]) == []
    off.close()
    last = index(path)
    assert len(last.screen([queued(23, base)])) == 1
    last.close()


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    upload_group TEXT NOT NULL, content_hash TEXT NOT NULL, hash BLOB NOT NULL, item_id INTEGER NOT NULL,
    added_at REAL NOT NULL, seen INTEGER NOT NULL DEFAULT 0, last_seen_at REAL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX entries_by_age ON entries (upload_group, added_at);
"""


def test_an_index_written_before_the_embeddings_gains_the_columns_and_keeps_its_entries(tmp_path, fashion, base):
    path = tmp_path / "outbox.db.near-duplicates"
    a = encode_png(fashion[0])
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('hash', ?)", (HASH_NAME,))
        db.execute("INSERT INTO meta VALUES ('sink', 'local:/one')")
        db.execute("INSERT INTO entries VALUES (?, ?, ?, 1, 1000.0, 2, 1001.0)", (GROUP, content_hash(a), nd._blob(image_hash(a))))
    ix = index(path, sink="local:/one")
    assert ix.sizes() == {GROUP: 1}  # not moved aside: the same hash
    assert not [p for p in tmp_path.iterdir() if ".near-duplicates." in p.name]
    old = ix.entry(GROUP, content_hash(a))
    assert (old["seen"], old["embedding"], old["embedding_model"]) == (2, None, None)
    (m,) = ix.screen([queued(2, base, asset=jpeg(fashion[0], 75), media_type="image/jpeg")])  # the old entry still matches
    assert (m.kind, m.first) == ("hash", content_hash(a))
    assert ix.screen([queued(3, base)]) == []  # a new entry, with its embedding
    ix.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(entries)")]
        assert columns[-4:] == ["embedding", "embedding_model", "origin", "unsettled"]
        assert db.execute("SELECT count(*) FROM entries WHERE embedding IS NOT NULL").fetchone() == (1,)
    again = index(path, sink="local:/one")  # opened again: nothing to add
    assert len(again.screen([queued(4, at_distance(base, 0.01, 1))])) == 1 and again.sizes() == {GROUP: 2}
    again.close()


def test_forgetting_evicting_and_expiring_keep_the_matrix_in_step(tmp_path, base):
    ix = index(tmp_path / "ix", max_entries=6, max_age_s=100)
    vectors = [base] + [at_distance(base, 0.4, 30 + i) for i in range(5)]
    items = [queued(i, v) for i, v in enumerate(vectors)]
    for i, it in enumerate(items):
        assert ix.screen([it], now=1000.0 + i) == []
    # Forget one in the middle: the last row moves into its place; both answer correctly.
    assert ix.forget([items[2]]) == 1
    assert ix.screen([queued(40, at_distance(vectors[2], 0.005, 40))], now=1010.0) == []  # gone: uploaded, added
    (last,) = ix.screen([queued(41, at_distance(vectors[5], 0.005, 41))], now=1010.0)
    assert last.first == items[5].content_hash
    for k in (0, 1, 3, 4):
        (m,) = ix.screen([queued(50 + k, at_distance(vectors[k], 0.005, 50 + k))], now=1010.0)
        assert m.first == items[k].content_hash
    # The bound (6): one more evicts the oldest (item 0): it no longer matches.
    assert ix.sizes() == {GROUP: 6}
    assert ix.screen([queued(60, at_distance(base, 0.9, 60))], now=1011.0) == []
    assert ix.sizes() == {GROUP: 6} and ix.entry(GROUP, items[0].content_hash) is None
    assert ix.screen([queued(61, at_distance(vectors[0], 0.005, 61))], now=1012.0) == []  # evicted: added again (item 1 goes)
    assert ix.entry(GROUP, items[1].content_hash) is None
    assert ix.screen([queued(62, at_distance(vectors[1], 0.005, 62))], now=1012.0) == []  # added: item 3 goes
    assert ix.forget([queued(62, None)]) == 1  # (an embedding-only entry leaves like any other)
    assert ix.screen([queued(63, at_distance(vectors[3], 0.005, 63))], now=1012.0) == []
    assert [m.first for m in ix.screen([queued(64, at_distance(vectors[4], 0.005, 64))], now=1012.0)] == [items[4].content_hash]
    # Age: entries added before 1111.5 - 100 go: 4, 5 (1004-1005), 40 (1010), 60 (1011); 61 and 63 stay.
    assert ix.maintain(now=1111.5) == 4
    assert ix.sizes() == {GROUP: 2}
    assert ix.screen([queued(70, at_distance(vectors[5], 0.005, 70))], now=1112.0) == []
    ix.close()


# The pruned lookup of large spaces ------------------------------------------------------------


def brute(rows: np.ndarray, v: np.ndarray, d: float):
    sims = rows @ v
    j = int(np.argmax(sims))
    return (j, 1 - float(sims[j])) if 1 - float(sims[j]) <= d else None


def survivors(space, v: np.ndarray, d: float) -> int:
    """Rows whose bound reaches 1 - d: those the pruned lookup compares in full."""
    q = v @ space.axes
    bound = space.rows.view(1)[:, :-1] @ q + space.rows.view(1)[:, -1] * float(nd._tail(float(q @ q)))
    return int((bound >= 1 - d - nd._SLACK).sum())


@pytest.mark.parametrize("dim,structured", [(64, True), (512, True), (512, False), (32, False)])
def test_a_large_space_gives_the_same_answers_as_the_full_product(dim, structured):
    """Past `_LEAD_MIN_ROWS` rows, a lookup prunes by a bound on the leading principal
    coordinates: it must find exactly what the full product finds (before and after a refit,
    and after removals), on embeddings with structure (a low-rank ReLU layer, like a model's)
    and without (random directions)."""
    rng = np.random.default_rng(dim)
    first = nd._LEAD_MIN_ROWS + 4  # then a third removed, and enough added for a refit (4x)
    n = first + 4 * first - first * 2 // 3 + 50
    if structured:
        z = rng.standard_normal((n, 12)) @ rng.standard_normal((12, dim))
        rows = np.maximum(z + 0.3 * rng.standard_normal((n, dim)), 0) + 0.01
    else:
        rows = rng.standard_normal((n, dim))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    space = nd._Space(dim)
    for i, r in enumerate(rows[:first]):
        space.add(f"k{i}", r)

    def check(queries, d):
        held = space.rows.view(0)
        found = 0
        for v in queries:
            got, want = space.nearest(v, d), brute(held, v, d)
            assert (got is None) == (want is None), (got, want)
            if got is not None:
                found += 1
                assert abs(got[1] - want[1]) < 1e-5
                assert np.allclose(held[got[0]], held[want[0]]) or abs(got[1] - want[1]) < 1e-6
        return found

    picks = rng.choice(first, 60, replace=False)
    queries = [at_distance(rows[i], d, int(i)) for i, d in zip(picks, np.repeat([0.001, 0.01, 0.04], 20))]
    queries += [unit(rng.standard_normal(dim)) for _ in range(20)]
    for d, at_least in ((0.002, 20), (0.02, 40), (0.2, 60)):
        assert check(queries, d) >= at_least
    if space.m:  # the pruned path was taken (most rows' bounds below 1 - d), not the full product
        assert space.axes is not None and space.fitted_at == first
        assert np.median([survivors(space, v, 0.02) for v in queries]) < len(space) // 8
    for i in range(0, first, 3):  # removals: the last row moves into each gap, its lead and tail with it
        assert space.remove(f"k{i}")
    assert not space.remove("k0")
    held = [int(k[1:]) for k in space.rows.keys]
    assert np.array_equal(space.rows.view(0), rows[held])
    if space.m:
        assert np.allclose(space.rows.view(1)[:, :-1], rows[held] @ space.axes, atol=1e-6)
    check(queries, 0.02)
    for i, r in enumerate(rows[first:], start=first):
        space.add(f"k{i}", r)
    assert np.array_equal(space.rows.view(0), rows[[int(k[1:]) for k in space.rows.keys]])
    check(queries, 0.02)
    if space.m:
        assert space.fitted_at == len(space) >= 4 * first  # fitted again, on all the rows
        assert np.allclose(space.rows.view(1)[:, :-1], space.rows.view(0) @ space.axes, atol=1e-6)
    removed = [at_distance(rows[i], 0.001, int(i)) for i in range(0, 60, 3)]
    check(removed, 0.002)  # a removed row's near-copy: what the full product says (no longer it)


def test_the_bound_prunes_most_rows_of_a_real_model_s_embeddings():
    """The example model's 64-value embeddings of Fashion-MNIST (the committed ONNX file): the
    bound leaves few rows to compare in full."""
    ort = pytest.importorskip("onnxruntime")
    from pathlib import Path

    from triton_al.example.data import to_model_input

    model = Path(__file__).resolve().parents[1] / "model_repository" / "fashion_cnn" / "1" / "model.onnx"
    session = ort.InferenceSession(str(model))
    images, _ = load("test")
    e = session.run(["embedding"], {"image": to_model_input(images[:8000])})[0]
    rows = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    space = nd._Space(rows.shape[1])
    for i, r in enumerate(rows[:7000]):
        space.add(str(i), r)
    space.nearest(rows[7000], 0.02)  # fits the axes
    left = []
    for v in rows[7000:7200]:
        left.append(survivors(space, v, 0.005))
        got, want = space.nearest(v, 0.005), brute(space.rows.view(0), v, 0.005)
        assert (got is None) == (want is None) and (got is None or abs(got[1] - want[1]) < 1e-5)
    assert np.median(left) < 0.1 * len(space)


# The flag -----------------------------------------------------------------------------------


def test_the_distance_parses_or_is_refused_naming_the_flag():
    assert parse_embedding_distance(None) == DEFAULT_MAX_EMBEDDING_DISTANCE == 0.0  # off unless turned on (measured)
    assert parse_embedding_distance("off") == 0.0 and parse_embedding_distance("0") == 0.0 and parse_embedding_distance("0.0") == 0.0
    assert parse_embedding_distance(" 0.05 ") == 0.05 and parse_embedding_distance("1") == 1.0 and parse_embedding_distance(0.1) == 0.1
    for bad in ("1.5", "-0.01", "nan", "inf", "close", ""):
        with pytest.raises(ValueError, match="--near-duplicate-embedding-distance.*in \\(0, 1\\]"):
            parse_embedding_distance(bad)


def test_bad_values_of_the_flag_are_refused_by_the_uploader_and_by_serve(tmp_path):
    outbox = tmp_path / "outbox.db"
    Outbox(outbox).close()
    for value in ("2", "nearby"):
        r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox), "--store", str(tmp_path / "s"),
                            "--once", "--near-duplicate-embedding-distance", value], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "--near-duplicate-embedding-distance" in r.stderr and value in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "serve", "--near-duplicate-embedding-distance", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--near-duplicate-embedding-distance" in r.stderr, r.stderr
    # Both checks off: no index file at all.
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox), "--store", str(tmp_path / "s"),
                        "--once", "--near-duplicate-distance", "off", "--near-duplicate-embedding-distance", "off"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not index_path(outbox).exists()


# The uploader --------------------------------------------------------------------------------


def flagged(seed: int, asset: bytes, embedding, *, version: str = "1", media_type: str = "image/png") -> FlaggedItem:
    return FlaggedItem(asset=asset, media_type=media_type, model_name="fashion_cnn", model_version=version,
                       prediction={"label": seed % 10, "probs": [0.1] * 10}, score=0.1, strategy="entropy", threshold=0.5,
                       reason="uncertain", upload_groups=[GROUP], embedding=embedding)


def store_hashes(store) -> set[str]:
    return {r["content_hash"] for r in store_index(store, GROUP)}


def drain(uploader: Uploader) -> None:
    for _ in range(100):
        if uploader.step() is None:
            return
    raise AssertionError("the queue never drained")


def test_the_uploader_suppresses_near_duplicates_by_embedding_or_hash_and_remembers_them(tmp_path, fashion, base, caplog):
    """A real outbox whose items carry the model's embedding, drained by the uploader into a
    local store: a distinct image with a near embedding, and an undecodable one with a near
    embedding, are counted not uploaded (by embedding); a JPEG copy with a far embedding too (by
    hash); the same embedding from another model version, and an image without an embedding,
    are uploaded."""
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    a, b, d, e = (encode_png(fashion[i]) for i in (0, 1, 2, 3))
    copy = jpeg(fashion[0], 75)
    broken = encode_png(fashion[4])[:60]
    items = [flagged(0, a, base), flagged(1, b, at_distance(base, 0.005, 1)), flagged(2, copy, at_distance(base, 0.6, 2)),
             flagged(3, d, base, version="2"), flagged(4, e, None), flagged(5, broken, at_distance(base, 0.01, 5))]
    with Outbox(outbox) as o:
        o.append_many(items)
        assert [i.embedding is not None for i in o.due(10)] == [True, True, True, True, False, True]
        ix = NearDuplicateIndex(index_path(outbox), max_distance=DEFAULT_MAX_DISTANCE,
                                max_embedding_distance=0.02)
        sink = LocalStore(store)
        with caplog.at_level(logging.INFO, logger="triton_al.uploader"):
            drain(Uploader(o, sink, near_duplicates=ix, seed=1))
        counters = o.counters()
        assert counters.get("queued_items", 0) == 0 and counters["uploaded"] == 3
        assert counters[f"near_duplicates/{GROUP}"] == 3
        assert o.dead_letters() == []  # the undecodable image never reached the store
    assert store_hashes(store) == {content_hash(x) for x in (a, d, e)}
    (line,) = [r.getMessage() for r in caplog.records if "near-duplicates not uploaded" in r.getMessage()]
    assert "1 by hash, within 20 bits" in line and "2 by embedding, within cosine distance 0.02" in line, line
    first = ix.entry(GROUP, content_hash(a))
    assert first["seen"] == 3 and first["embedding_model"] == "fashion_cnn/1"
    assert ix.entry(GROUP, content_hash(d))["embedding_model"] == "fashion_cnn/2"
    ix.close()
    # A restart (a new index over the same file): another near embedding of version 1 is not uploaded.
    with Outbox(outbox) as o:
        o.append_many([flagged(6, encode_png(fashion[5]), at_distance(base, 0.01, 6))])
        ix = NearDuplicateIndex(index_path(outbox), max_distance=DEFAULT_MAX_DISTANCE,
                                max_embedding_distance=0.02)
        drain(Uploader(o, LocalStore(store), near_duplicates=ix, seed=2))
        assert o.counters()[f"near_duplicates/{GROUP}"] == 4
        ix.close()
    assert store_hashes(store) == {content_hash(x) for x in (a, d, e)}


def test_the_uploader_process_takes_the_flag(tmp_path, uploaders, fashion, base):
    """`triton-al uploader`: by default only the hash check is on (a near embedding is
    uploaded, a JPEG copy held back); `--near-duplicate-embedding-distance 0.02` holds back the
    near embedding too; with the hash off and a wide embedding distance, the copy (far
    embedding) goes and the near embedding not."""
    a, b, copy = encode_png(fashion[0]), encode_png(fashion[1]), jpeg(fashion[0], 75)
    cases = (("default", (), {a, b}),
             ("on", ("--near-duplicate-embedding-distance", "0.02"), {a}),
             ("off", ("--near-duplicate-embedding-distance", "off"), {a, b}),
             ("wide", ("--near-duplicate-embedding-distance", "0.5", "--near-duplicate-distance", "off"), {a, copy}))
    for name, extra, stored in cases:
        outbox, store = tmp_path / name / "outbox.db", tmp_path / name / "store"
        outbox.parent.mkdir()
        with Outbox(outbox) as o:
            o.append_many([flagged(0, a, base), flagged(1, b, at_distance(base, 0.01 if name != "wide" else 0.3, 1)),
                           flagged(2, copy, at_distance(base, 0.9, 2), media_type="image/jpeg")])
        up = uploaders(outbox, store, "--once", "--log-format", "text", *extra)
        assert up.proc.wait(60) == 0, up.log()
        assert store_hashes(store) == {content_hash(x) for x in stored}, (name, up.log())
