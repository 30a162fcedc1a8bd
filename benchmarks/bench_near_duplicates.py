"""Near-duplicate suppression (issue 15): how well perceptual hashes and the per-group index
tell near-copies from distinct images on Fashion-MNIST, and what it costs per flagged item.

    scripts/bench.sh near-duplicates [--originals N] [--background N] [--json PATH]

- Originals: N test images (random, pixel-unique). Each gets 8 near-copies: shifted by 1 px
  (right) and by 2 px right + 1 px down (zeros shifted in), cropped by 1 and by 2 px on every
  side and scaled back to 28x28, re-encoded as JPEG at quality 75 and 40, Gaussian noise of
  sigma 8 and 16 (grey levels). Everything is PNG except the JPEGs.
- The index holds the originals plus a background of distinct images already delivered (from
  the training split: none, 2,000, 10,000, 30,000 and `--background`), as a group's index
  would after a while.
- Queries: every near-copy (recall: the share within the distance of its own original) and as
  many *other* distinct test images, in no index (false suppression: the share suppressed).
  Precision is given for an even mix (as many near-copies as new distinct images arriving):
  recall / (recall + false). Fashion-MNIST has many genuinely similar distinct images (plain
  T-shirts, bags): what is counted as false suppression here is a distinct image, however alike.
- Candidates (each image decoded once, then hashed by each): the 64-bit pHash of the first
  version (32x32, 8x8 DCT, median); the same with the signs of the AC terms (mean-centred);
  a 256-bit pHash (64x64, 16x16 DCT, median); the same of the image aligned on its centre of
  mass and radius of gyration; and both side by side, the closer of the two counting (the
  index's hash, `near_duplicates.image_hash`).
- Cost: the hash of a 28x28 PNG (decode, resize, align, DCTs), a lookup in a group of 100,000
  entries (linear XOR + popcount scan; Rust `_core.nearest_hamming_within` as the index does it,
  `_core.nearest_hamming_rows` reading every row in full, numpy, and the first version's 64-bit scan), and `NearDuplicateIndex.screen` per item at 100,000 entries (hash + lookup +
  the SQLite insert), median of repeated runs; and the uploader draining 2,000 distinct
  Fashion-MNIST PNGs into a local store with suppression off and on (an empty index, and a
  group already holding 100,000 entries).
- Embeddings (`--embeddings`, on when the model file and the `onnx` package are there): the
  example model's 64-value embedding (`h`, the ReLU of the dense layer before the classifier;
  read from the committed model.onnx, the output added in memory when the file has none) of
  the same decoded images, unit length; distance = 1 - cosine to the nearest entry (numpy, a
  matrix product per block of entries). The same recall per copy kind and false suppression
  as the hashes, at cosine distances 0.0005-0.05, alone and OR the adopted hash at 20 bits
  (an item is suppressed when either is within its distance, as the index does it).
"""

from __future__ import annotations

import argparse
import io
import json
import math
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
from triton_al.uploader import near_duplicates as nd
from triton_al.uploader.near_duplicates import DEFAULT_MAX_DISTANCE, PARTS, WORDS, NearDuplicateIndex, distances, image_hash

THRESHOLDS = {64: (2, 4, 6, 8), 256: (12, 16, 20, 24, 28, 32)}
ADOPTED = "pHash 256 + aligned pHash 256 (adopted)"
MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "fashion_cnn" / "1" / "model.onnx"
EMBEDDING_DISTANCES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
COMBINED_BITS = 20  # the hash's default distance, ORed with the embedding's


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


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


# Candidates: decoded grey uint8 pixels -> uint64 words -------------------------------------

_DCT32_LOW = nd._dct_matrix(32)[:8]


def _dct64(grey: Image.Image, signs: bool) -> np.ndarray:
    x = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.float64)
    low = (_DCT32_LOW @ x @ _DCT32_LOW.T).ravel()
    bits = low > 0 if signs else low > np.median(low)
    if signs:
        bits[0] = False  # the DC term: the mean, dropped (mean-centred)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def candidate_hashes(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate's hash of one decoded image (its words; two-part ones side by side)."""
    grey = Image.fromarray(pixels, mode="L")
    small = grey.resize((nd._SIDE, nd._SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    x = np.asarray(small, dtype=np.float64)
    plain = nd._dct_bits(x)
    aligned = nd._dct_bits(nd._aligned(small, x))
    return {"pHash 64 (first version)": _dct64(grey, False), "pHash 64, mean-centred (AC signs)": _dct64(grey, True),
            "pHash 256": plain, "aligned pHash 256": aligned, ADOPTED: np.concatenate([plain, aligned])}


PARTS_OF = {ADOPTED: PARTS}


def _nearest(index: np.ndarray, queries: np.ndarray, parts: int, sizes: list[int]) -> dict[int, np.ndarray]:
    """Per prefix size of `index`, the distance from each query to its nearest entry (Rust scan)."""
    best = np.full(len(queries), 10**6, np.int64)
    out, start = {}, 0
    for size in sizes:
        if size > start:
            seg = np.ascontiguousarray(index[start:size])
            for k, q in enumerate(queries):
                best[k] = min(best[k], _core.nearest_hamming_rows(seg, q, parts)[1])
            start = size
        out[size] = best.copy()
    return out


def _own(copies: np.ndarray, originals: np.ndarray, parts: int) -> np.ndarray:
    x = np.bitwise_xor(copies, originals)
    return np.unpackbits(x.view(np.uint8), axis=1).reshape(len(x), parts, -1).sum(2).min(1)


def embedder(path: Path = MODEL):
    """A function: decoded grey images [n, 28, 28] uint8 -> the model's embeddings, unit
    length, float32 [n, d]. The committed model's `embedding` output, or (a file without it)
    its layer `h` exposed as an output in memory."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from triton_al.example.data import to_model_input

    model = onnx.load(str(path))
    outputs = [o.name for o in model.graph.output]
    name = "embedding" if "embedding" in outputs else "h"
    if name not in outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 64]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def embed(pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        out = [session.run([name], {"image": to_model_input(pixels[i:i + 4096])})[0] for i in range(0, len(pixels), 4096)]
        x = np.concatenate(out).astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return embed


def _nearest_cosine(index: np.ndarray, queries: np.ndarray, sizes: list[int], block: int = 8192) -> dict[int, np.ndarray]:
    """Per prefix size of `index` (unit rows), each query's cosine distance (1 - cos) to its
    nearest entry: a matrix product per block of entries, the running maximum of the cosine."""
    best = np.full(len(queries), -np.inf, np.float32)
    out, start = {}, 0
    for size in sizes:
        for b in range(start, size, block):
            best = np.maximum(best, (queries @ index[b:min(b + block, size)].T).max(axis=1))
        start = max(start, size)
        out[size] = (1.0 - best).astype(np.float64)
    return out


def _rates(own: dict[str, np.ndarray], new: dict[int, np.ndarray], any_entry: dict[str, np.ndarray]) -> dict:
    """Recall per copy kind (`own`: True where a copy is within the distance of its own
    original), false suppression per index size (`new`: True where a distinct query is)."""
    per = {t: float(v.mean()) for t, v in own.items()}
    recall = float(np.mean(list(per.values())))
    false = {e: float(v.mean()) for e, v in new.items()}
    return {"recall": recall, "recall_any_entry_largest_index": float(np.mean([v.mean() for v in any_entry.values()])),
            "per_transform": per, "false": false,
            "precision_even_mix": {e: recall / (recall + f) if recall + f else math.nan for e, f in false.items()}}


def through_index(distance: float, index_hashes: np.ndarray, index_emb: np.ndarray, queries: dict[str, tuple[list, np.ndarray]]) -> dict:
    """The uploader's own `NearDuplicateIndex` (hash at COMBINED_BITS, embeddings at `distance`)
    holding the same entries (written into its file as `_preload` does), each query screened
    alone (and forgotten when it was added, so the index stays the same): which are suppressed,
    per query set. Skipped (with the reason) when the index takes no embeddings."""
    import inspect

    if "max_embedding_distance" not in inspect.signature(NearDuplicateIndex).parameters:
        return {"skipped": "NearDuplicateIndex has no max_embedding_distance"}
    model = "fashion_cnn/1"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db.near-duplicates"
        index = NearDuplicateIndex(path, max_distance=COMBINED_BITS, max_embedding_distance=distance, max_entries=len(index_hashes) + 10)
        now = time.time()
        with index._conn:
            index._conn.execute("BEGIN")
            index._conn.executemany(
                "INSERT INTO entries (upload_group, content_hash, hash, item_id, added_at, embedding, embedding_model) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [("g", f"e{i}", nd._blob(h), -i - 1, now - 3600 + i * 1e-3, np.asarray(v, "<f4").tobytes(), model)
                 for i, (h, v) in enumerate(zip(index_hashes, index_emb))])
        index.close()
        index = NearDuplicateIndex(path, max_distance=COMBINED_BITS, max_embedding_distance=distance, max_entries=len(index_hashes) + 10)
        out, n = {}, 0
        for name, (pixels, emb) in queries.items():
            suppressed, kinds = [], {}
            for px, v in zip(pixels, emb):
                n += 1
                item = SimpleNamespace(id=n, upload_group="g", content_hash=f"q{n}", media_type="image/png", asset=encode_png(px),
                                       model_name="fashion_cnn", model_version="1", embedding=v)
                match = index.screen([item])
                if match:
                    kinds[getattr(match[0], "kind", "hash")] = kinds.get(getattr(match[0], "kind", "hash"), 0) + 1
                else:
                    index.forget([item])
                suppressed.append(bool(match))
            out[name] = {"suppressed": np.asarray(suppressed), "by": kinds}
        out["entries"] = index.sizes().get("g", 0)
        index.close()
    return out


def embedding_quality(embed, orig_px: list, copy_px: dict, new_px: list, background_px: list, hashes: dict,
                      check_distance: float | None = None) -> dict:
    """The embedding's tables (alone, and OR the adopted hash at COMBINED_BITS) over the same
    images as the hash tables; `hashes`: the adopted hash's distances (own, to any entry, new),
    and its rows of the index (`rows`). `check_distance`: also screen every query through the
    uploader's NearDuplicateIndex at that embedding distance and compare its decisions."""
    orig, new = embed(np.stack(orig_px)), embed(np.stack(new_px))
    copies = {t: embed(np.stack(px)) for t, px in copy_px.items()}
    index = orig if not background_px else np.concatenate([orig, embed(np.stack(background_px))])
    entries = hashes["index_sizes"]
    d_new = _nearest_cosine(index, new, entries)
    d_any = {t: _nearest_cosine(index, c, [entries[-1]])[entries[-1]] for t, c in copies.items()}
    d_own = {t: 1.0 - (c * orig).sum(1).astype(np.float64) for t, c in copies.items()}
    alone, combined = {}, {}
    h_own = {t: d <= COMBINED_BITS for t, d in hashes["own"].items()}
    h_any = {t: d <= COMBINED_BITS for t, d in hashes["any"].items()}
    h_new = {e: d <= COMBINED_BITS for e, d in hashes["new"].items()}
    for th in EMBEDDING_DISTANCES:
        e_own = {t: d <= th for t, d in d_own.items()}
        e_any = {t: d <= th for t, d in d_any.items()}
        e_new = {e: d <= th for e, d in d_new.items()}
        alone[th] = _rates(e_own, e_new, e_any)
        combined[th] = _rates({t: e_own[t] | h_own[t] for t in e_own}, {e: e_new[e] | h_new[e] for e in e_new},
                              {t: e_any[t] | h_any[t] for t in e_any})
    q = [1, 5, 10, 25, 50]
    spread = {"own_copy_median": {t: float(np.median(d)) for t, d in d_own.items()},
              "own_copy_p90": {t: float(np.percentile(d, 90)) for t, d in d_own.items()},
              "distinct_nearest_percentiles": {e: {p: float(np.percentile(d, p)) for p in q} for e, d in d_new.items()}}
    out = {"dimensions": int(index.shape[1]), "index_sizes": entries, "by_distance": alone,
           "or_hash": {"bits": COMBINED_BITS, "hash_alone": _rates(h_own, h_new, h_any), "by_distance": combined},
           "distances": spread}
    if check_distance is not None:
        ours = {"distinct": h_new[entries[-1]] | (d_new[entries[-1]] <= check_distance),
                **{t: h_any[t] | (d_any[t] <= check_distance) for t in copies}}
        r = through_index(check_distance, hashes["rows"], index, {"distinct": (new_px, new), **{t: (copy_px[t], copies[t]) for t in copies}})
        if "skipped" in r:
            out["through_index"] = r
        else:
            differ = {t: int((ours[t] != r[t]["suppressed"]).sum()) for t in ours}
            out["through_index"] = {"embedding_distance": check_distance, "entries": r["entries"], "queries": sum(len(v) for v in ours.values()),
                                    "suppressed_numpy": {t: int(v.sum()) for t, v in ours.items()},
                                    "suppressed_index": {t: int(r[t]["suppressed"].sum()) for t in ours},
                                    "by_check": {t: r[t]["by"] for t in ours}, "differ": differ}
    return out


def quality(n_originals: int, n_background: int, seed: int = 0, embeddings: Path | None = None,
            check_distance: float | None = None) -> dict:
    rng = np.random.default_rng(seed)
    test, _ = load("test")
    order = unique(test, rng.permutation(len(test)))
    originals, distinct = order[:n_originals], order[n_originals:2 * n_originals]
    picks: list[int] = []
    if n_background:
        train, _ = load("train")
        test_keys = {pixel_key(test[i]) for i in originals + distinct}
        picks = [i for i in unique(train, rng.permutation(len(train))) if pixel_key(train[i]) not in test_keys][:n_background]

    def hashed(images: list[np.ndarray]) -> dict[str, np.ndarray]:
        rows = [candidate_hashes(p) for p in images]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]} if rows else {}

    orig_px, new_px = [test[i] for i in originals], [test[i] for i in distinct]
    copy_px = {name: [decoded(make(test[i])) for i in originals] for name, make in transforms(rng).items()}
    background_px = [load("train")[0][i] for i in picks]
    orig = hashed(orig_px)
    copies = {name: hashed(px) for name, px in copy_px.items()}
    new = hashed(new_px)
    background = hashed(background_px) if picks else None
    # The index's hash is the adopted candidate: the same bits from the encoded bytes.
    for k in range(5):
        assert np.array_equal(image_hash(encode_png(test[originals[k]])), orig[ADOPTED][k])
    sizes = sorted({0, *(n for n in (2_000, 10_000, 30_000) if n < len(picks)), len(picks)})
    results, adopted = {}, {}
    for name in orig:
        parts = PARTS_OF.get(name, 1)
        index = orig[name] if background is None else np.concatenate([orig[name], background[name]])
        entries = [n_originals + s for s in sizes]
        d_new = _nearest(index, new[name], parts, entries)
        d_copy_any = {t: _nearest(index, copies[t][name], parts, [entries[-1]])[entries[-1]] for t in copies}
        d_own = {t: _own(copies[t][name], orig[name], parts) for t in copies}
        bits = orig[name].shape[1] * 64 // parts
        if name == ADOPTED:
            adopted = {"index_sizes": entries, "own": d_own, "any": d_copy_any, "new": d_new, "rows": index}
        rows = {}
        for th in THRESHOLDS[bits]:
            per = {t: float((d <= th).mean()) for t, d in d_own.items()}
            recall = float(np.mean(list(per.values())))
            false = {e: float((d_new[e] <= th).mean()) for e in entries}
            rows[th] = {"recall": recall, "recall_any_entry_largest_index": float(np.mean([(d <= th).mean() for d in d_copy_any.values()])),
                        "per_transform": per, "false": false,
                        "precision_even_mix": {e: recall / (recall + f) if recall + f else math.nan for e, f in false.items()}}
        results[name] = {"bits": bits, "parts": parts, "index_sizes": entries, "by_distance": rows}
    out = {"originals": len(originals), "distinct_queries": len(distinct), "background": len(picks), "results": results}
    if embeddings is not None:
        out["embedding"] = embedding_quality(embedder(embeddings), orig_px, copy_px, new_px, background_px, adopted, check_distance)
        out["embedding"]["model"] = str(embeddings)
    return out


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
    hash_s = _timed(lambda r: [image_hash(p) for p in pngs], len(pngs), repeats)
    hash64_s = _timed(lambda r: [_dct64(Image.open(io.BytesIO(p)).convert("L"), False) for p in pngs], len(pngs), repeats)
    rng = np.random.default_rng(1)
    table = rng.integers(0, 2**64 - 1, (entries, WORDS), dtype=np.uint64, endpoint=True)
    queries = [rng.integers(0, 2**64 - 1, WORDS, dtype=np.uint64, endpoint=True) for _ in range(200)]
    lead = np.ascontiguousarray(table[:, ::WORDS // PARTS])
    limit = max(DEFAULT_MAX_DISTANCE, 1)
    lookup_s = _timed(lambda r: [_core.nearest_hamming_within(table, lead, q, PARTS, limit) for q in queries], len(queries), repeats)
    full_s = _timed(lambda r: [_core.nearest_hamming_rows(table, q, PARTS) for q in queries], len(queries), repeats)
    numpy_s = _timed(lambda r: [int(np.argmin(distances(table, q))) for q in queries[:20]], 20, repeats)
    narrow = np.ascontiguousarray(table[:, 0])
    narrow_s = _timed(lambda r: [_core.nearest_hamming(narrow, int(q[0])) for q in queries], len(queries), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db.near-duplicates"
        _preload(path, "g", entries, table)
        start = time.perf_counter()
        index = NearDuplicateIndex(path, max_distance=max(DEFAULT_MAX_DISTANCE, 1), max_entries=entries + 10_000)
        index._group("g")
        load_s = time.perf_counter() - start
        items = [SimpleNamespace(id=i, upload_group="g", content_hash=content_hash(p), media_type="image/png", asset=p)
                 for i, p in enumerate(pngs)]
        screen_s = _timed(lambda r: index.screen(items[r * 64:(r + 1) * 64]), 64, repeats)
        index.close()
    return {"entries": entries, "hash_us": hash_s[0] * 1e6, "lookup_us": lookup_s[0] * 1e6, "screen_us": screen_s[0] * 1e6,
            "hash_cpu_us": hash_s[1] * 1e6, "hash_64bit_cpu_us": hash64_s[1] * 1e6, "lookup_cpu_us": lookup_s[1] * 1e6, "lookup_numpy_us": numpy_s[0] * 1e6,
            "lookup_numpy_cpu_us": numpy_s[1] * 1e6, "lookup_64bit_cpu_us": narrow_s[1] * 1e6, "lookup_full_rows_cpu_us": full_s[1] * 1e6, "screen_cpu_us": screen_s[1] * 1e6,
            "load_ms": load_s * 1e3, "load_average": os.getloadavg()[0]}


def _preload(path: Path, group: str, entries: int, table: np.ndarray | None = None) -> None:
    """`entries` hashes (random unless given) in a group of a new index file (as if delivered
    in the last hour: the uploader's maintenance, which forgets entries past the maximum age,
    keeps them)."""
    if table is None:
        table = np.random.default_rng(2).integers(0, 2**64 - 1, (entries, WORDS), dtype=np.uint64, endpoint=True)
    index = NearDuplicateIndex(path, max_distance=1)
    now = time.time()
    with index._conn:
        index._conn.execute("BEGIN")
        index._conn.executemany("INSERT INTO entries (upload_group, content_hash, hash, item_id, added_at) VALUES (?, ?, ?, ?, ?)",
                                [(group, f"bg{i}", nd._blob(h), -i - 1, now - 3600 + i * 3600 / entries) for i, h in enumerate(table[:entries])])
    index.close()


def throughput(n: int = 2000, entries: int = 100_000, distance: int = max(DEFAULT_MAX_DISTANCE, 1)) -> dict:
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
                index = NearDuplicateIndex(root / "ix", max_distance=distance, max_entries=entries + n)
            uploader = Uploader(outbox, LocalStore(root / "store"), batch_size=64, near_duplicates=index)
            w, c = time.perf_counter(), time.process_time()
            while uploader.step() is not None:
                pass
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            counters = outbox.counters()
            out[case] = {"items_per_s": n / wall, "cpu_ms_per_item": cpu / n * 1e3, "uploaded": counters.get("uploaded", 0),
                         "near_duplicates": counters.get("near_duplicates/g", 0), "distance": distance}
            outbox.close()
            if index is not None:
                index.close()
    return out


def report(q: dict, c: dict | None = None, through: dict | None = None) -> str:
    lines = [f"{q['originals']} originals x 8 near-copies; {q['distinct_queries']} other distinct test images as queries; "
             f"default distance {DEFAULT_MAX_DISTANCE}", ""]
    for name, res in q["results"].items():
        sizes = res["index_sizes"]
        names = list(next(iter(res["by_distance"].values()))["per_transform"])
        lines.append(f"{name}: {res['bits']} bits" + (f" x {res['parts']} (the closer counts)" if res["parts"] > 1 else ""))
        lines.append("| distance | " + " | ".join(names) + " | recall, all kinds | false suppression at "
                     + " / ".join(f"{e:,}" for e in sizes) + f" entries | precision, even mix, at {sizes[-1]:,} |")
        lines.append("|---|" + "---|" * (len(names) + 3))
        for t, row in res["by_distance"].items():
            lines.append(f"| {t} | " + " | ".join(f"{row['per_transform'][n]:.0%}" for n in names) + f" | {row['recall']:.1%} | "
                         + " / ".join(f"{row['false'][e]:.1%}" for e in sizes) + f" | {row['precision_even_mix'][sizes[-1]]:.1%} |")
        lines.append("")
    if q.get("embedding"):
        lines += embedding_report(q["embedding"])
    if c:
        lines.append(f"cost per item, CPU (wall) time, load average {c['load_average']:.1f}: hash of a 28x28 PNG {c['hash_cpu_us']:.0f} µs "
                     f"({c['hash_us']:.0f}), the first version's 64-bit pHash {c['hash_64bit_cpu_us']:.0f} µs; lookup at {c['entries']:,} entries {c['lookup_cpu_us']:.0f} µs ({c['lookup_us']:.0f}), "
                     f"reading every row in full {c['lookup_full_rows_cpu_us']:.0f} µs, the same in numpy {c['lookup_numpy_cpu_us']:.0f} µs ({c['lookup_numpy_us']:.0f}), a scan of 64-bit hashes "
                     f"{c['lookup_64bit_cpu_us']:.0f} µs; screen (hash + lookup + insert) at {c['entries']:,} entries "
                     f"{c['screen_cpu_us']:.0f} µs ({c['screen_us']:.0f}); loading a group of {c['entries']:,} entries {c['load_ms']:.0f} ms wall")
    for case, r in (through or {}).items():
        lines.append(f"uploader into a local store, distance {r['distance']}, suppression {case}: {r['items_per_s']:,.0f} items/s, "
                     f"{r['cpu_ms_per_item']:.2f} ms CPU per item; uploaded {r['uploaded']:,}, near-duplicates {r['near_duplicates']:,}")
    return "\n".join(lines)


def embedding_report(e: dict) -> list[str]:
    sizes = e["index_sizes"]
    names = list(next(iter(e["by_distance"].values()))["per_transform"])
    head = ("| " + " | ".join(names) + " | recall, all kinds | false suppression at " + " / ".join(f"{n:,}" for n in sizes)
            + f" entries | precision, even mix, at {sizes[-1]:,} |")

    def row(label, r):
        return (f"| {label} | " + " | ".join(f"{r['per_transform'][n]:.0%}" for n in names) + f" | {r['recall']:.1%} | "
                + " / ".join(f"{r['false'][n]:.1%}" for n in sizes) + f" | {r['precision_even_mix'][sizes[-1]]:.1%} |")

    lines = [f"model embedding ({e['dimensions']} values, unit length, {e.get('model', '')}): cosine distance (1 - cos) to the nearest entry",
             "| distance " + head, "|---|" + "---|" * (len(names) + 3)]
    lines += [row(f"{th:g}", r) for th, r in e["by_distance"].items()]
    b = e["or_hash"]["bits"]
    lines += ["", f"hash (adopted, {b} bits) OR embedding within the distance",
              "| embedding distance " + head, "|---|" + "---|" * (len(names) + 3), row(f"off (hash {b} bits alone)", e["or_hash"]["hash_alone"])]
    lines += [row(f"{th:g}", r) for th, r in e["or_hash"]["by_distance"].items()]
    d = e["distances"]
    lines += ["", "embedding distance of a near-copy to its own original, median (90th percentile): "
              + ", ".join(f"{t} {d['own_copy_median'][t]:.4f} ({d['own_copy_p90'][t]:.4f})" for t in names),
              "distance of a distinct query to its nearest entry, percentiles 1/5/10/25/50: "
              + "; ".join(f"{n:,} entries " + " / ".join(f"{v:.4f}" for v in d["distinct_nearest_percentiles"][n].values()) for n in sizes), ""]
    t = e.get("through_index")
    if t and "skipped" in t:
        lines += [f"through NearDuplicateIndex: skipped ({t['skipped']})", ""]
    elif t:
        lines += [f"through NearDuplicateIndex (hash {b} bits OR embedding {t['embedding_distance']:g}), {t['entries']:,} entries, "
                  f"{t['queries']:,} queries screened one by one: decisions differing from numpy's: "
                  + ", ".join(f"{k} {v}" for k, v in t["differ"].items()) + "; suppressed (numpy / index, by check): "
                  + ", ".join(f"{k} {t['suppressed_numpy'][k]}/{t['suppressed_index'][k]} {t['by_check'][k]}" for k in t["differ"]), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--background", type=int, default=60_000,
                        help="distinct training images in the index (also 2,000, 10,000 and 30,000 of them; at most the ~59,000 unique)")
    parser.add_argument("--entries", type=int, default=100_000, help="group size for the cost measurement")
    parser.add_argument("--quality-only", action="store_true", help="the tables only, no cost or throughput")
    parser.add_argument("--cost-only", action="store_true", help="cost and throughput only, no tables")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/near_duplicates.json"))
    parser.add_argument("--embeddings", type=Path, nargs="?", const=MODEL, default=None,
                        help="also the model's embeddings (an ONNX file; the example model's by default): alone and OR the hash")
    parser.add_argument("--no-embeddings", action="store_true", help="skip the embedding tables (on by default when onnx imports)")
    parser.add_argument("--check-index", type=float, default=None, metavar="DISTANCE",
                        help="also screen every query through the uploader's NearDuplicateIndex (hash 20 bits, embeddings at DISTANCE) "
                             "and compare its decisions with the tables' (at the largest index)")
    args = parser.parse_args(argv)
    if args.originals < 1 or args.background < 0 or args.entries < 1:
        parser.error("--originals and --entries must be positive, --background not negative")
    started = time.time()
    load_before = os.getloadavg()[0]
    emb = None if args.no_embeddings else args.embeddings
    if emb is None and not args.no_embeddings:
        try:
            import onnx  # noqa: F401  (the bench extra has it)
            emb = MODEL if MODEL.exists() else None
        except ImportError:
            print("embeddings skipped: the onnx package is not installed", file=sys.stderr)
    q = None if args.cost_only else quality(args.originals, args.background, embeddings=emb, check_distance=args.check_index)
    c = t = None
    if not args.quality_only:
        c = cost(args.entries)
        t = throughput(entries=args.entries)
    print(report(q, c, t) if q is not None else report({"originals": 0, "distinct_queries": 0, "results": {}}, c, t))
    print(f"started {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {time.time() - started:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quality": q, "cost": c, "throughput": t},
                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
