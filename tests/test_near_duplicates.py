"""Near-duplicate suppression on arrival (issue 15): the perceptual hash on real
Fashion-MNIST images, the per-group index (bounds, persistence, forgetting), and the real
uploader process draining a real outbox into a real local store with it on and off."""

from __future__ import annotations

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
    NearDuplicateIndex,
    UndecodableImage,
    distances,
    hamming,
    index_path,
    parse_distance,
    phash,
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


def test_the_hash_is_stable_and_near_copies_are_close_while_distinct_images_are_far(fashion):
    picks = fashion[:300]
    hashes = [phash(encode_png(p)) for p in picks]
    assert hashes == [phash(encode_png(p)) for p in picks]  # deterministic
    assert all(0 <= h < 1 << 64 for h in hashes)
    # The same pixels in another container, and in colour, hash the same.
    rgb = io.BytesIO()
    Image.fromarray(picks[0]).convert("RGB").save(rgb, format="BMP")
    assert hamming(phash(rgb.getvalue()), hashes[0]) <= 1
    # Re-encoded as JPEG (q75): within 4 bits for nearly all (measured: 98%).
    jpeg_d = np.array([hamming(phash(jpeg(p, 75)), h) for p, h in zip(picks, hashes)])
    assert (jpeg_d <= 4).mean() >= 0.9, np.bincount(jpeg_d)
    # Distinct images: half the bits apart in the median, rarely within 2 bits.
    arr = np.array(hashes, np.uint64)
    pairwise = np.concatenate([distances(arr[k + 1:], int(arr[k])) for k in range(len(arr) - 1)])
    assert np.median(pairwise) >= 24
    assert (pairwise <= 2).mean() < 0.001
    assert np.median(jpeg_d) < np.percentile(pairwise, 1)


def test_distances_count_the_differing_bits():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 500, dtype=np.uint64)
    hashes[:3] = [0, 2**64 - 1, 1 << 63]
    for h in [0, 2**64 - 1, int(hashes[7]), int(hashes[7]) ^ 0b1001, 12345]:
        naive = [bin(int(x) ^ h).count("1") for x in hashes]
        assert distances(hashes, h).tolist() == naive
        # The index's lookup (Rust): the first nearest entry.
        assert _core.nearest_hamming(hashes, h) == (naive.index(min(naive)), min(naive))
    assert _core.nearest_hamming(hashes[:0], 5) is None
    with pytest.raises(ValueError, match="hashes: expected a C-contiguous"):
        _core.nearest_hamming(hashes[::2], 5)


def test_undecodable_and_bad_input_is_refused_clearly():
    with pytest.raises(UndecodableImage):
        phash(b"\x89PNG\r\n\x1a\n-truncated-")
    with pytest.raises(UndecodableImage):
        phash(b"not an image at all")
    assert parse_distance("off") == 0 and parse_distance("0") == 0 and parse_distance(" 6 ") == 6
    for bad, words in (("64", "1-63 bits"), ("-1", "1-63 bits"), ("near", "number of bits")):
        with pytest.raises(ValueError, match=words):
            parse_distance(bad)


# The index -----------------------------------------------------------------------------


def test_the_index_suppresses_near_copies_per_group_matches_an_item_seen_again_and_forgets(tmp_path, fashion):
    index = NearDuplicateIndex(tmp_path / "ix", max_distance=4)
    a, b = encode_png(fashion[0]), encode_png(fashion[1])
    copy = jpeg(fashion[0], 75)
    assert hamming(phash(a), phash(copy)) <= 4
    assert index.screen([queued(1, a), queued(2, b)]) == []
    assert index.screen([queued(1, a)]) == []  # a retry of item 1 is item 1
    (m,) = index.screen([queued(3, copy, media_type="image/jpeg")])
    assert (m.item_id, m.first) == (3, content_hash(a)) and m.distance <= 4
    assert index.screen([queued(4, copy, group="other", media_type="image/jpeg")]) == []  # groups are apart
    (again,) = index.screen([queued(5, a)])  # the same image queued again (after its delivery record went)
    assert again.distance == 0
    assert index.screen([queued(6, b"\x00" * 10, media_type="application/x-npy")]) == []  # not an image: not hashed
    assert index.screen([queued(7, b"\x89PNG\r\n\x1a\n-truncated-")]) == []  # undecodable: not hashed
    assert index.sizes() == {GROUP: 2, "other": 1}
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
    assert len({phash(p) for p in picks}) == 8
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
    with pytest.raises(ValueError, match="1-63 bits"):
        NearDuplicateIndex(path, max_distance=0)
    with pytest.raises(ValueError, match="does not exist"):
        NearDuplicateIndex(tmp_path / "missing" / "ix", max_distance=4)


# The uploader ------------------------------------------------------------------------


def cluster(fashion: np.ndarray, distance: int) -> tuple[list[tuple[bytes, str]], list[bytes]]:
    """An image and three near-copies (all within `distance` of it), and three distinct images."""
    original = fashion[10]
    copies = [(jpeg(original, 75), "image/jpeg"), (jpeg(original, 50), "image/jpeg"), (noisy(original, 4, 1), "image/png")]
    base = phash(encode_png(original))
    assert all(hamming(phash(c), base) <= distance for c, _ in copies), "the generated near-copies must be near"
    distinct = [encode_png(fashion[i]) for i in (11, 12, 13)]
    assert all(hamming(phash(d), base) > 2 * distance for d in distinct)
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


def test_the_uploader_uploads_one_of_a_cluster_counts_the_rest_and_remembers_across_restarts(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, distinct = cluster(fashion, 4)
    append(outbox, [*images, *((d, "image/png") for d in distinct)])
    up = uploaders(outbox, store, "--near-duplicate-distance", "4", "--metrics-port", "0", "--log-format", "text")
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
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "4")
    assert {r["content_hash"] for r in store_index(store, GROUP)} == stored
    with Outbox(outbox) as o:
        assert o.counters()[f"near_duplicates/{GROUP}"] == 4 and o.counters().get("queued_items", 0) == 0


def test_with_the_setting_off_every_image_is_uploaded(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, distinct = cluster(fashion, 4)
    append(outbox, [*images, *((d, "image/png") for d in distinct)])
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "off")
    assert len(store_index(store, GROUP)) == 7
    assert not index_path(outbox).exists()
    with Outbox(outbox) as o:
        assert not any(k.startswith("near_duplicates/") for k in o.counters())


def test_corrupt_images_are_not_hashed_and_are_dead_lettered_as_before(tmp_path, uploaders, fashion):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    images, _ = cluster(fashion, 4)
    corrupt = encode_png(fashion[10])[:60]  # truncated: a PNG header, no image
    append(outbox, [images[0], (corrupt, "image/png"), images[1]])
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "4")
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
    for value in ("64", "lots"):
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
    images, _ = cluster(fashion, 4)
    broken = bytearray(images[0][0])  # decodes (and hashes) but fails the store's check: a bad IDAT checksum
    at = broken.find(b"IDAT")
    broken[at + 4 + int.from_bytes(broken[at - 4:at], "big")] ^= 0xFF
    broken = bytes(broken)
    assert phash(broken) == phash(images[0][0])
    append(outbox, [(broken, "image/png")])
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "4")
    with Outbox(outbox) as o:
        assert [d["content_hash"] for d in o.dead_letters()] == [content_hash(broken)]
    with sqlite3.connect(index_path(outbox)) as db:
        assert db.execute("SELECT count(*) FROM entries").fetchone() == (0,)
    with Outbox(outbox) as o:
        o.append_many([item(1, asset=images[1][0], media_type=images[1][1])])  # its JPEG copy
    run_once(uploaders, outbox, store, "--near-duplicate-distance", "4")
    assert [r["content_hash"] for r in store_index(store, GROUP)] == [content_hash(images[1][0])]
