"""Near-duplicate suppression on arrival (issue 15): the perceptual hash on real
Fashion-MNIST images, the per-group index (bounds, persistence, forgetting), and the real
uploader process draining a real outbox into a real local store with it on and off."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from image_helpers import jpeg, noisy
from outbox_helpers import item, store_index, uploaders, wait_for  # noqa: F401
from PIL import Image

from triton_al import _core
from triton_al.example.data import encode_png, load
from triton_al.outbox import Outbox, content_hash
from triton_al.uploader.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    HASH_NAME,
    PARTS,
    WORDS,
    NearDuplicateIndex,
    UndecodableImage,
    distance,
    distances,
    hash_pixels,
    image_hash,
    index_path,
    parse_distance,
    seen_entries,
)

GROUP = "active-learning"


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    images, _ = load("test")
    return images


def queued(i: int, asset: bytes, group: str = GROUP, media_type: str = "image/png") -> SimpleNamespace:
    """What the index reads of a queued outbox item."""
    return SimpleNamespace(id=i, upload_group=group, content_hash=content_hash(asset), media_type=media_type, asset=asset)


# The hash ------------------------------------------------------------------------------


def shifted_right(pixels: np.ndarray) -> np.ndarray:
    out = np.zeros_like(pixels)
    out[:, 1:] = pixels[:, :-1]
    return out


def test_the_hash_is_stable_and_near_copies_are_close_while_distinct_images_are_far(fashion):
    picks = fashion[:300]
    hashes = np.stack([image_hash(encode_png(p)) for p in picks])
    assert hashes.shape == (300, WORDS) and hashes.dtype == np.uint64
    assert np.array_equal(hashes, np.stack([image_hash(encode_png(p)) for p in picks]))  # deterministic
    assert np.array_equal(hash_pixels(picks[0]), hashes[0])
    # The same pixels in another container, and in colour, hash the same.
    rgb = io.BytesIO()
    Image.fromarray(picks[0]).convert("RGB").save(rgb, format="BMP")
    assert distance(image_hash(rgb.getvalue()), hashes[0]) == 0
    # Re-encoded as JPEG (q75): within the default distance for nearly all (measured: 98%).
    jpeg_d = np.array([distance(image_hash(jpeg(p, 75)), h) for p, h in zip(picks, hashes)])
    assert (jpeg_d <= DEFAULT_MAX_DISTANCE).mean() >= 0.9, np.bincount(jpeg_d)
    # Shifted by a pixel: within it for most (measured: 95%), thanks to the aligned half alone.
    shifted = np.stack([image_hash(encode_png(shifted_right(p))) for p in picks])
    shift_d = np.array([distance(a, b) for a, b in zip(shifted, hashes)])
    assert (shift_d <= DEFAULT_MAX_DISTANCE).mean() >= 0.85, np.bincount(shift_d)
    plain_d = np.unpackbits((shifted[:, :WORDS // PARTS] ^ hashes[:, :WORDS // PARTS]).view(np.uint8), axis=1).sum(1)
    assert (plain_d <= DEFAULT_MAX_DISTANCE).mean() < 0.05
    # Distinct images: about half the bits apart in the median, never within twice the default.
    pairwise = np.concatenate([distances(hashes[k + 1:], hashes[k]) for k in range(len(hashes) - 1)])
    assert np.median(pairwise) >= 96
    assert (pairwise <= 2 * DEFAULT_MAX_DISTANCE).mean() < 0.001
    # Flat images hash alike whatever their grey level (black: without the DC bit); unlike any picture.
    flat = [hash_pixels(np.full((28, 28), v, np.uint8)) for v in (0, 7, 200)]
    assert distance(flat[0], flat[1]) == 1 and distance(flat[1], flat[2]) == 0
    assert distances(hashes, flat[0]).min() > DEFAULT_MAX_DISTANCE


def naive_distance(row: np.ndarray, h: np.ndarray) -> int:
    width = WORDS // PARTS
    return min(sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(row[p * width:(p + 1) * width], h[p * width:(p + 1) * width]))
               for p in range(PARTS))


def test_distances_count_the_differing_bits_of_the_closer_hash():
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 2**64 - 1, (500, WORDS), dtype=np.uint64, endpoint=True)
    rows[:3] = [[0] * WORDS, [2**64 - 1] * WORDS, [1 << 63] * WORDS]
    near = rows[7].copy()
    near[WORDS - 1] ^= np.uint64(0b1001)  # the aligned half 2 bits away, the plain one far
    near[:WORDS // PARTS] = rng.integers(0, 2**64 - 1, WORDS // PARTS, dtype=np.uint64, endpoint=True)
    for h in [rows[0], rows[1], rows[7], near, rng.integers(0, 2**64 - 1, WORDS, dtype=np.uint64, endpoint=True)]:
        naive = [naive_distance(r, h) for r in rows]
        assert distances(rows, h).tolist() == naive
        # The index's lookup (Rust): the first nearest entry.
        assert _core.nearest_hamming_rows(rows, h, PARTS) == (naive.index(min(naive)), min(naive))
    assert _core.nearest_hamming_rows(rows, near, PARTS) == (7, 2)
    # The index's lookup: the nearest within a distance, reading the lead words first.
    lead = np.ascontiguousarray(rows[:, ::WORDS // PARTS])
    for h in [near, rows[2], rng.integers(0, 2**64 - 1, WORDS, dtype=np.uint64, endpoint=True)]:
        naive = [naive_distance(r, h) for r in rows]
        for limit in (0, 2, 20, 60, 255):
            expected = (naive.index(min(naive)), min(naive)) if min(naive) <= limit else None
            assert _core.nearest_hamming_within(rows, lead, h, PARTS, limit) == expected
    assert _core.nearest_hamming_rows(rows[:0], near, PARTS) is None
    with pytest.raises(ValueError, match="rows: expected a C-contiguous"):
        _core.nearest_hamming_rows(rows[::2], near, PARTS)
    with pytest.raises(ValueError, match="parts"):
        _core.nearest_hamming_rows(rows, near, 3)
    # The 64-bit scan (kept for other callers) still answers.
    words = np.ascontiguousarray(rows[:, 0])
    assert _core.nearest_hamming(words, int(words[9])) == (9, 0)


def test_undecodable_and_bad_input_is_refused_clearly():
    with pytest.raises(UndecodableImage):
        image_hash(b"\x89PNG\r\n\x1a\n-truncated-")
    with pytest.raises(UndecodableImage):
        image_hash(b"not an image at all")
    with pytest.raises(ValueError, match="2-D uint8"):
        hash_pixels(np.zeros((4, 4, 3), np.uint8))
    assert parse_distance("off") == 0 and parse_distance("0") == 0 and parse_distance(" 6 ") == 6
    assert parse_distance(None) == DEFAULT_MAX_DISTANCE > 0  # on unless turned off
    for bad, words in (("256", "1-255 bits"), ("-1", "1-255 bits"), ("near", "number of bits")):
        with pytest.raises(ValueError, match=words):
            parse_distance(bad)


# The index -----------------------------------------------------------------------------


def test_the_index_suppresses_near_copies_per_group_matches_an_item_seen_again_and_forgets(tmp_path, fashion):
    index = NearDuplicateIndex(tmp_path / "ix", max_distance=DEFAULT_MAX_DISTANCE)
    a, b = encode_png(fashion[0]), encode_png(fashion[1])
    copy = jpeg(fashion[0], 75)
    assert distance(image_hash(a), image_hash(copy)) <= DEFAULT_MAX_DISTANCE
    assert index.screen([queued(1, a), queued(2, b)]) == []
    assert index.screen([queued(1, a)]) == []  # a retry of item 1 is item 1
    (m,) = index.screen([queued(3, copy, media_type="image/jpeg")])
    assert (m.item_id, m.first) == (3, content_hash(a)) and m.distance <= DEFAULT_MAX_DISTANCE
    assert index.screen([queued(4, copy, group="other", media_type="image/jpeg")]) == []  # groups are apart
    (again,) = index.screen([queued(5, a)])  # the same image queued again (after its delivery record went)
    assert again.distance == 0
    assert index.screen([queued(6, b"\x00" * 10, media_type="application/x-npy")]) == []  # not an image: not hashed
    assert index.screen([queued(7, b"\x89PNG\r\n\x1a\n-truncated-")]) == []  # undecodable: not hashed
    assert index.sizes() == {GROUP: 2, "other": 1}
    assert np.array_equal(index.entry(GROUP, content_hash(a))["hash"], image_hash(a))
    (shift,) = index.screen([queued(9, encode_png(shifted_right(fashion[1])))])  # a 1-px shift of b
    assert shift.first == content_hash(b)
    index.record([m, again])
    assert index.entry(GROUP, content_hash(a))["seen"] == 2
    # An item dead-lettered leaves the index: a near-copy of it is then uploaded.
    assert index.forget([queued(99, a)]) == 0  # another item's entry stays
    assert index.forget([queued(1, a)]) == 1
    assert index.screen([queued(8, copy, media_type="image/jpeg")]) == []
    index.close()


def test_the_index_is_bounded_by_entries_and_age_and_survives_reopening(tmp_path, fashion):
    path = tmp_path / "ix"
    index = NearDuplicateIndex(path, max_distance=3, max_entries=5, max_age_s=100)
    picks = [encode_png(fashion[i]) for i in range(8)]
    assert len({image_hash(p).tobytes() for p in picks}) == 8
    for i, p in enumerate(picks):
        assert index.screen([queued(i, p)], now=1000.0 + i) == []
    assert index.sizes() == {GROUP: 5}  # the 3 oldest evicted
    assert index.entry(GROUP, content_hash(picks[0])) is None
    assert index.entry(GROUP, content_hash(picks[7])) is not None
    index.close()
    index = NearDuplicateIndex(path, max_distance=3, max_entries=5, max_age_s=100)  # a restart
    assert [m.first for m in index.screen([queued(20, picks[7])], now=1010.0)] == [content_hash(picks[7])]
    assert index.screen([queued(21, picks[0])], now=1010.0) == []  # evicted: uploaded again, and added
    # 1000+3 went for the new entry (the bound); older than 100 s at 1108.5: 1000+4 .. 1000+7; the new one stays
    assert index.maintain(now=1108.5) == 4
    assert index.sizes() == {GROUP: 1}
    index.close()


def test_the_index_starts_empty_for_another_sink_and_replaces_a_corrupt_file(tmp_path, fashion):
    path = tmp_path / "ix"
    a = encode_png(fashion[0])
    with_sink = NearDuplicateIndex(path, max_distance=4, sink="local:/one")
    with_sink.screen([queued(1, a)])
    with_sink.close()
    assert len(NearDuplicateIndex(path, max_distance=4, sink="local:/one").screen([queued(2, a)])) == 1
    assert NearDuplicateIndex(path, max_distance=4, sink="local:/two").sizes() == {}
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not SQLite" * 100)
    fresh = NearDuplicateIndex(path, max_distance=4)
    assert fresh.sizes() == {}
    assert list(tmp_path.glob("ix.corrupt-*"))
    with pytest.raises(ValueError, match="1-255 bits"):
        NearDuplicateIndex(path, max_distance=0)
    with pytest.raises(ValueError, match="does not exist"):
        NearDuplicateIndex(tmp_path / "missing" / "ix", max_distance=4)


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    upload_group TEXT NOT NULL, content_hash TEXT NOT NULL, phash INTEGER NOT NULL, item_id INTEGER NOT NULL,
    added_at REAL NOT NULL, seen INTEGER NOT NULL DEFAULT 0, last_seen_at REAL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
"""


def test_an_index_of_the_first_version_is_moved_aside_and_never_compared_with_the_new_hashes(tmp_path, fashion):
    """The first version stored a 64-bit pHash per entry (an integer column `phash`): opened
    by this one, the file is moved aside whole (its evidence readable there) and a new index
    starts; a near-copy of an image it held is then uploaded, and the new file is kept."""
    path = tmp_path / "outbox.db.near-duplicates"
    a = encode_png(fashion[0])
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('sink', 'local:/one')")
        db.execute("INSERT INTO entries VALUES (?, ?, ?, 1, 1000.0, 3, 1001.0)", (GROUP, content_hash(a), -1234567890123))
    index = NearDuplicateIndex(path, max_distance=DEFAULT_MAX_DISTANCE, sink="local:/one")
    assert index.sizes() == {}
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(f"{path.name}.phash64-1-")]
    assert [(r["content_hash"], r["seen"]) for r in seen_entries(aside)] == [(content_hash(a), 3)]  # the evidence, kept
    assert index.screen([queued(2, jpeg(fashion[0], 75), media_type="image/jpeg")]) == []  # not compared with the old entry
    index.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'hash'").fetchone() == (HASH_NAME,)
        assert db.execute("SELECT count(*) FROM entries").fetchone() == (1,)
    reopened = NearDuplicateIndex(path, max_distance=DEFAULT_MAX_DISTANCE, sink="local:/one")  # the new file stays
    assert reopened.sizes() == {GROUP: 1}
    assert len(reopened.screen([queued(3, a)])) == 1
    reopened.close()
    assert len([p for p in tmp_path.iterdir() if ".phash64-1-" in p.name and not p.name.endswith(("-wal", "-shm"))]) == 1
    # A file naming another hash (a later version, say) is not read as this one either.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = 'dct1024/9' WHERE key = 'hash'")
    again = NearDuplicateIndex(path, max_distance=DEFAULT_MAX_DISTANCE)
    assert again.sizes() == {}
    assert any(p.name.startswith(f"{path.name}.dct1024-9-") for p in tmp_path.iterdir())
    again.close()


# The uploader ------------------------------------------------------------------------


distance_between = distance


def cluster(fashion: np.ndarray, distance: int) -> tuple[list[tuple[bytes, str]], list[bytes]]:
    """An image and three near-copies (all within `distance` of it), and three distinct images."""
    original = fashion[10]
    copies = [(jpeg(original, 75), "image/jpeg"), (jpeg(original, 50), "image/jpeg"), (noisy(original, 4, 1), "image/png")]
    base = image_hash(encode_png(original))
    assert all(distance_between(image_hash(c), base) <= distance for c, _ in copies), "the generated near-copies must be near"
    distinct = [encode_png(fashion[i]) for i in (11, 12, 13)]
    assert all(distance_between(image_hash(d), base) > 2 * distance for d in distinct)
    return [(encode_png(original), "image/png"), *copies], distinct


def append(outbox: Path, assets: list[tuple[bytes, str]]) -> None:
    with Outbox(outbox) as o:
        o.append_many([item(i, asset=a, media_type=t) for i, (a, t) in enumerate(assets)])


def run_once(uploaders, outbox: Path, store: Path, *extra: str) -> None:
    up = uploaders(outbox, store, "--once", "--log-format", "text", *extra)
    assert up.proc.wait(60) == 0, up.log()


def metric(port: int, name: str, labels: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.split()[-1])
    return None


def test_by_default_the_uploader_uploads_one_of_a_cluster_counts_the_rest_and_remembers_across_restarts(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, distinct = cluster(fashion, DEFAULT_MAX_DISTANCE)
    append(outbox, [*images, *((d, "image/png") for d in distinct)])
    up = uploaders(outbox, store, "--metrics-port", "0", "--log-format", "text")  # on by default
    port = up.ports()["metrics"]
    with Outbox(outbox) as o:
        wait_for(lambda: o.counters().get("queued_items", 0) == 0, 60, "the outbox to drain")
        counters = o.counters()
    label = f'group="{GROUP}"'
    assert wait_for(lambda: metric(port, "triton_al_uploader_near_duplicates_total", label), 10, "the metric") == 3
    assert up.stop() == 0
    stored = {r["content_hash"] for r in store_index(store, GROUP)}
    assert stored == {content_hash(images[0][0])} | {content_hash(d) for d in distinct}
    assert counters["uploaded"] == 4 and counters[f"near_duplicates/{GROUP}"] == 3
    index = NearDuplicateIndex(index_path(outbox), max_distance=4)
    assert index.entry(GROUP, content_hash(images[0][0]))["seen"] == 3  # the evidence, on the one uploaded
    index.close()
    listed = subprocess.run([sys.executable, "-m", "triton_al.cli", "outbox", "near-duplicates", "--outbox", str(outbox)],
                            capture_output=True, text=True, timeout=60, check=True)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["upload_group"], row["content_hash"], row["seen"]) == (GROUP, content_hash(images[0][0]), 3)
    # A restart: another near-copy (and the original again) arrive; neither is uploaded.
    with Outbox(outbox) as o:
        o.append_many([item(50, asset=noisy(fashion[10], 4, 2))])
    run_once(uploaders, outbox, store)
    assert {r["content_hash"] for r in store_index(store, GROUP)} == stored
    with Outbox(outbox) as o:
        assert o.counters()[f"near_duplicates/{GROUP}"] == 4 and o.counters().get("queued_items", 0) == 0


def test_with_the_setting_off_every_image_is_uploaded(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, distinct = cluster(fashion, DEFAULT_MAX_DISTANCE)
    append(outbox, [*images, *((d, "image/png") for d in distinct)])
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "off")
    assert len(store_index(store, GROUP)) == 7
    # The embedding check is off by default too: with both off, no index at all.
    assert not index_path(outbox).exists()
    with Outbox(outbox) as o:
        assert not any(k.startswith("near_duplicates/") for k in o.counters())


def test_corrupt_images_are_not_hashed_and_are_dead_lettered_as_before(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, _ = cluster(fashion, DEFAULT_MAX_DISTANCE)
    corrupt = encode_png(fashion[10])[:60]  # truncated: a PNG header, no image
    append(outbox, [images[0], (corrupt, "image/png"), images[1]])
    run_once(uploaders, outbox, store)
    assert [r["content_hash"] for r in store_index(store, GROUP)] == [content_hash(images[0][0])]
    with Outbox(outbox) as o:
        (dead,) = o.dead_letters()
        assert dead["content_hash"] == content_hash(corrupt) and "corrupt" in dead["error"]
        assert o.counters()[f"near_duplicates/{GROUP}"] == 1
    with sqlite3.connect(index_path(outbox)) as db:
        assert db.execute("SELECT content_hash FROM entries").fetchall() == [(content_hash(images[0][0]),)]


def test_bad_settings_are_refused_naming_the_flag(tmp_path):
    outbox = tmp_path / "outbox.db"
    Outbox(outbox).close()
    for value in ("256", "lots"):
        r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox), "--store", str(tmp_path / "s"),
                            "--once", "--near-duplicate-distance", value], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert "--near-duplicate-distance" in r.stderr and value in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox), "--store", str(tmp_path / "s"),
                        "--once", "--near-duplicate-max-age", "soon"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--near-duplicate-max-age" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "outbox", "near-duplicates", "--outbox", str(outbox)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr and "--near-duplicate-distance" in r.stderr, r.stderr


def test_an_image_the_sink_dead_letters_leaves_the_index_so_its_near_copy_is_uploaded(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, _ = cluster(fashion, DEFAULT_MAX_DISTANCE)
    broken = bytearray(images[0][0])  # decodes (and hashes) but fails the store's check: a bad IDAT checksum
    at = broken.find(b"IDAT")
    broken[at + 4 + int.from_bytes(broken[at - 4:at], "big")] ^= 0xFF
    broken = bytes(broken)
    assert np.array_equal(image_hash(broken), image_hash(images[0][0]))
    append(outbox, [(broken, "image/png")])
    run_once(uploaders, outbox, store)
    with Outbox(outbox) as o:
        assert [d["content_hash"] for d in o.dead_letters()] == [content_hash(broken)]
    with sqlite3.connect(index_path(outbox)) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    with Outbox(outbox) as o:
        o.append_many([item(1, asset=images[1][0], media_type=images[1][1])])  # its JPEG copy
    run_once(uploaders, outbox, store)
    assert [r["content_hash"] for r in store_index(store, GROUP)] == [content_hash(images[1][0])]
