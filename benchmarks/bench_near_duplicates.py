"""Near-duplicate suppression (issue 15): how well the 64-bit pHash and the per-group index
tell near-copies from distinct images on Fashion-MNIST, and what it costs per flagged item.

    scripts/bench.sh near-duplicates [--originals N] [--background N] [--json PATH]

- Originals: N test images (random, pixel-unique). Each gets 8 near-copies: shifted by 1 px
  (right) and by 2 px right + 1 px down (zeros shifted in), cropped by 1 and by 2 px on every
  side and scaled back to 28x28, re-encoded as JPEG at quality 75 and 40, Gaussian noise of
  sigma 8 and 16 (grey levels). Everything is PNG except the JPEGs.
- The index holds the originals plus a background of distinct images already delivered (from
  the training split: none, 2,000, 10,000 and `--background`), as a group's index would after
  a while.
- Queries: every near-copy (recall: the share suppressed) and as many *other* distinct test
  images, in no index (false suppression: the share suppressed). Precision is given for an
  even mix (as many near-copies as new distinct images arriving): recall / (recall + false).
  Fashion-MNIST has many genuinely similar distinct images (plain T-shirts, bags): what is
  counted as false suppression here is a distinct image, however alike.
- Cost: the hash of a 28x28 PNG (decode, resize, DCT), a lookup in a group of 100,000
  entries (linear XOR + popcount scan; Rust `_core.nearest_hamming`, and numpy for
  comparison), and `NearDuplicateIndex.screen` per item at 100,000
  entries (hash + lookup + the SQLite insert), median of repeated runs; and the uploader
  draining 2,000 distinct Fashion-MNIST PNGs into a local store with suppression off and on
  (an empty index, and a group already holding 100,000 entries).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from triton_al import _core
from triton_al.example.data import encode_png, load, pixel_key
from triton_al.outbox import content_hash
from triton_al.uploader.near_duplicates import DEFAULT_MAX_DISTANCE, NearDuplicateIndex, _Popcount, phash

DISTANCES = (2, 4, 6, 8, 10, 12)


def shifted(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    out[dy:, dx:] = a[:h - dy, :w - dx]
    return out


def cropped(a: np.ndarray, m: int) -> np.ndarray:
    h, w = a.shape
    return np.asarray(Image.fromarray(a).crop((m, m, w - m, h - m)).resize((w, h), Image.Resampling.BILINEAR))


def jpeg(a: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def noisy(a: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


def transforms(rng: np.random.Generator) -> dict:
    return {
        "shift 1 px": lambda a: encode_png(shifted(a, 1, 0)),
        "shift 2+1 px": lambda a: encode_png(shifted(a, 2, 1)),
        "crop 1 px": lambda a: encode_png(cropped(a, 1)),
        "crop 2 px": lambda a: encode_png(cropped(a, 2)),
        "JPEG q75": lambda a: jpeg(a, 75),
        "JPEG q40": lambda a: jpeg(a, 40),
        "noise σ8": lambda a: encode_png(noisy(a, 8, rng)),
        "noise σ16": lambda a: encode_png(noisy(a, 16, rng)),
    }


def unique(images: np.ndarray, order: np.ndarray) -> list[int]:
    seen, keep = set(), []
    for i in order:
        key = pixel_key(images[i])
        if key not in seen:
            seen.add(key)
            keep.append(int(i))
    return keep


def nearest(index: np.ndarray, h: int, popcount: _Popcount) -> int:
    return int(popcount(index, h).min())


def quality(n_originals: int, n_background: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    test, _ = load("test")
    order = unique(test, rng.permutation(len(test)))
    originals, distinct = order[:n_originals], order[n_originals:2 * n_originals]
    orig_hashes = np.array([phash(encode_png(test[i])) for i in originals], np.uint64)
    background = np.empty(0, np.uint64)
    if n_background:
        train, _ = load("train")
        test_keys = {pixel_key(test[i]) for i in originals + distinct}
        picks = [i for i in unique(train, rng.permutation(len(train))) if pixel_key(train[i]) not in test_keys][:n_background]
        background = np.array([phash(encode_png(train[i])) for i in picks], np.uint64)
    popcount = _Popcount()
    copies = {}
    for name, make in transforms(rng).items():
        copies[name] = np.array([phash(make(test[i])) for i in originals], np.uint64)
    new = np.array([phash(encode_png(test[i])) for i in distinct], np.uint64)
    results = {}
    sizes = sorted({0, *(n for n in (2_000, 10_000) if n < len(background)), len(background)})
    for size in sizes:
        label = "originals only" if size == 0 else f"+ {size:,} background"
        index = np.concatenate([orig_hashes, background[:size]])
        d_copy = {name: np.array([nearest(index, int(h), popcount) for h in hs]) for name, hs in copies.items()}
        d_own = {name: np.array([int(popcount(orig_hashes[k:k + 1], int(h))[0]) for k, h in enumerate(hs)]) for name, hs in copies.items()}
        d_new = np.array([nearest(index, int(h), popcount) for h in new])
        rows = {}
        for t in DISTANCES:
            recall = {name: float((d <= t).mean()) for name, d in d_copy.items()}
            own = {name: float((d <= t).mean()) for name, d in d_own.items()}
            r = float(np.mean(list(recall.values())))
            f = float((d_new <= t).mean())
            rows[t] = {"recall": r, "recall_own": float(np.mean(list(own.values()))), "false": f,
                       "precision_even_mix": r / (r + f) if r + f else float("nan"), "per_transform": recall}
        results[label] = {"index_size": len(index), "by_distance": rows}
    return {"originals": len(originals), "distinct_queries": len(distinct), "background": len(background), "results": results}


def _timed(fn, n: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per unit of `fn()` doing `n` units, over `repeats` runs."""
    walls, cpus = [], []
    for r in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn(r)
        walls.append((time.perf_counter() - w) / n)
        cpus.append((time.process_time() - c) / n)
    return statistics.median(walls), statistics.median(cpus)


def cost(entries: int = 100_000, repeats: int = 5) -> dict:
    test, _ = load("test")
    pngs = [encode_png(test[i]) for i in range(1000)]
    hash_s = _timed(lambda r: [phash(p) for p in pngs], len(pngs), repeats)
    rng = np.random.default_rng(1)
    table = rng.integers(0, 2**63, entries, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, entries, dtype=np.uint64)
    popcount = _Popcount()
    queries = [int(x) for x in rng.integers(0, 2**63, 200, dtype=np.uint64)]
    lookup_s = _timed(lambda r: [_core.nearest_hamming(table, q) for q in queries], len(queries), repeats)
    numpy_s = _timed(lambda r: [int(np.argmin(popcount(table, q))) for q in queries], len(queries), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db.near-duplicates"
        index = NearDuplicateIndex(path, max_distance=max(DEFAULT_MAX_DISTANCE, 1), max_entries=entries + 10_000)
        signed = [int(h) - (1 << 64) if int(h) >= 1 << 63 else int(h) for h in table]
        with index._conn:
            index._conn.execute("BEGIN")
            index._conn.executemany("INSERT INTO entries (upload_group, content_hash, phash, item_id, added_at) VALUES ('g', ?, ?, ?, ?)",
                                    [(f"bg{i}", h, -i - 1, float(i)) for i, h in enumerate(signed)])
        index.close()
        start = time.perf_counter()
        index = NearDuplicateIndex(path, max_distance=max(DEFAULT_MAX_DISTANCE, 1), max_entries=entries + 10_000)
        index._group("g")
        load_s = time.perf_counter() - start
        items = [SimpleNamespace(id=i, upload_group="g", content_hash=content_hash(p), media_type="image/png", asset=p)
                 for i, p in enumerate(pngs)]
        screen_s = _timed(lambda r: index.screen(items[r * 64:(r + 1) * 64]), 64, repeats)
        index.close()
    return {"entries": entries, "hash_us": hash_s[0] * 1e6, "lookup_us": lookup_s[0] * 1e6, "screen_us": screen_s[0] * 1e6,
            "hash_cpu_us": hash_s[1] * 1e6, "lookup_cpu_us": lookup_s[1] * 1e6, "lookup_numpy_us": numpy_s[0] * 1e6, "lookup_numpy_cpu_us": numpy_s[1] * 1e6, "screen_cpu_us": screen_s[1] * 1e6,
            "load_ms": load_s * 1e3, "load_average": os.getloadavg()[0]}


def _preload(path: Path, group: str, entries: int) -> None:
    """`entries` random hashes in a group of a new index file (as if delivered long ago)."""
    rng = np.random.default_rng(2)
    index = NearDuplicateIndex(path, max_distance=1)
    table = rng.integers(-(2**63), 2**63 - 1, entries, dtype=np.int64)
    with index._conn:
        index._conn.execute("BEGIN")
        index._conn.executemany("INSERT INTO entries (upload_group, content_hash, phash, item_id, added_at) VALUES (?, ?, ?, ?, 0)",
                                [(group, f"bg{i}", int(h), -i - 1) for i, h in enumerate(table)])
    index.close()


def throughput(n: int = 2000, entries: int = 100_000) -> dict:
    """The uploader (in this process) draining n distinct Fashion-MNIST PNGs into a local
    store: suppression off, on with an empty index, on with `entries` already in the group."""
    from triton_al.outbox import FlaggedItem, Outbox
    from triton_al.sinks.local import LocalStore
    from triton_al.uploader.worker import Uploader

    test, _ = load("test")
    assets = [encode_png(test[i]) for i in unique(test, np.arange(len(test)))[:n]]
    out = {}
    for case in ("off", "on, empty index", f"on, {entries:,} entries"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            outbox = Outbox(root / "outbox.db", max_items=10**7)
            outbox.append_many([FlaggedItem(a, "image/png", "fashion_cnn", "1", {"label": 0}, 0.2, "entropy", 0.5, "uncertain",
                                            ["g"]) for a in assets])
            index = None
            if case != "off":
                if case.endswith("entries"):
                    _preload(root / "ix", "g", entries)
                index = NearDuplicateIndex(root / "ix", max_distance=2, max_entries=entries + n)
            uploader = Uploader(outbox, LocalStore(root / "store"), batch_size=64, near_duplicates=index)
            w, c = time.perf_counter(), time.process_time()
            while uploader.step() is not None:
                pass
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            counters = outbox.counters()
            out[case] = {"items_per_s": n / wall, "cpu_ms_per_item": cpu / n * 1e3, "uploaded": counters.get("uploaded", 0),
                         "near_duplicates": counters.get("near_duplicates/g", 0)}
            outbox.close()
            if index is not None:
                index.close()
    return out


def report(q: dict, c: dict, through: dict | None = None) -> str:
    lines = [f"{q['originals']} originals x 8 near-copies; {q['distinct_queries']} other distinct test images as queries; "
             f"default distance {DEFAULT_MAX_DISTANCE}", ""]
    for label, res in q["results"].items():
        lines.append(f"index: {label} ({res['index_size']:,} entries)")
        lines.append("| distance | recall (any entry) | recall (own original) | false suppression of distinct | precision, even mix |")
        lines.append("|---|---|---|---|---|")
        for t, row in res["by_distance"].items():
            lines.append(f"| {t} | {row['recall']:.1%} | {row['recall_own']:.1%} | {row['false']:.1%} | {row['precision_even_mix']:.1%} |")
        lines.append("")
    first = next(iter(q["results"].values()))["by_distance"]
    names = list(next(iter(first.values()))["per_transform"])
    lines.append("recall per transform (index: originals only)")
    lines.append("| distance | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for t, row in first.items():
        lines.append(f"| {t} | " + " | ".join(f"{row['per_transform'][n]:.0%}" for n in names) + " |")
    lines.append("")
    lines.append(f"cost per item, CPU (wall) time, load average {c['load_average']:.1f}: hash of a 28x28 PNG {c['hash_cpu_us']:.0f} µs "
                 f"({c['hash_us']:.0f}); lookup at {c['entries']:,} entries {c['lookup_cpu_us']:.0f} µs ({c['lookup_us']:.0f}), "
                 f"the same scan in numpy {c['lookup_numpy_cpu_us']:.0f} µs ({c['lookup_numpy_us']:.0f}); "
                 f"screen (hash + lookup + insert) at {c['entries']:,} entries {c['screen_cpu_us']:.0f} µs ({c['screen_us']:.0f}); "
                 f"loading a group of {c['entries']:,} entries {c['load_ms']:.0f} ms wall")
    for case, r in (through or {}).items():
        lines.append(f"uploader into a local store, distance 2, suppression {case}: {r['items_per_s']:,.0f} items/s, "
                     f"{r['cpu_ms_per_item']:.2f} ms CPU per item; uploaded {r['uploaded']:,}, near-duplicates {r['near_duplicates']:,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--background", type=int, default=30_000, help="distinct training images in the index (also 2,000 and 10,000 of them)")
    parser.add_argument("--entries", type=int, default=100_000, help="group size for the cost measurement")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/near_duplicates.json"))
    args = parser.parse_args(argv)
    if args.originals < 1 or args.background < 0 or args.entries < 1:
        parser.error("--originals and --entries must be positive, --background not negative")
    started = time.time()
    q = quality(args.originals, args.background)
    c = cost(args.entries)
    t = throughput(entries=args.entries)
    print(report(q, c, t))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quality": q, "cost": c, "throughput": t},
                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
