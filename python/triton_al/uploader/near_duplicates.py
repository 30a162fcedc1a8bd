"""Near-duplicate suppression on arrival (issue 15): a perceptual hash per flagged image and,
per upload group, an index of the hashes of the items queued or delivered, so that an item
within `max_distance` bits (Hamming) of one already there is counted and not uploaded.

- The hash (`HASH_NAME`) is two 256-bit DCT hashes side by side. Both start from the image
  decoded with Pillow, in grey, resized to 64x64 (Lanczos); each is the 16x16 lowest
  frequencies of a 2-D DCT compared with their median (one bit each; the median makes it
  blind to brightness and contrast). The first is of the image as it is (it holds re-encodes
  and noise); the second of the image *aligned* first: centred on its centre of mass and
  scaled by its radius of gyration (mass: the difference from the border's level), so that a
  shifted or slightly cropped copy lands on nearly the same pixels. An item's distance to an
  entry is the smaller of the two hashes' distances. Near copies stay within a few dozen of
  the 256 bits; unrelated images differ in about half. Only `image/*` assets are hashed; an
  asset Pillow cannot decode is not hashed and goes on as before (uploaded, or dead-lettered
  by the sink as today). Measured on Fashion-MNIST: benchmarks/RESULTS.md, "Near-duplicates".
- The index lives beside the outbox in its own SQLite file (`<outbox>.near-duplicates`; the
  outbox's schema is shared by two writers and stays as it is), written only by the uploader
  (one per outbox, by its lock), and mirrored in memory as one numpy array of hashes per group:
  a lookup is a linear scan in Rust (`_core.nearest_hamming_within`: XOR and popcount of the
  first word of each of an entry's hashes, and of the whole entry only when those are within
  the distance: a word's distance is at most its hash's). The file records the hash it holds: a file written with another hash (the 64-bit
  pHash of the first version) is never compared with these; it is moved aside (its evidence
  kept there, readable by `seen_entries`) and a new index is started.
- The model's embedding (when the step stored one with the item: `QueuedItem.embedding`) is
  a second, independent check: an item is a near-duplicate when its hash is within
  `max_distance` bits OR its embedding is within `max_embedding_distance` (cosine distance,
  1 - cos) of an entry of its group; either check can be off, and either feature may be
  absent (an undecodable image with an embedding is checked by its embedding; so is an asset
  that is not an image). Embeddings are compared only with entries of the same model name
  and version and the same dimension (`embedding_model`, e.g. `fashion_cnn/3`): a redeploy
  starts a new space. In memory, per (group, model, dimension), a float32 matrix of unit rows;
  a lookup is a matrix-vector product, and past `_LEAD_MIN_ROWS` rows a bound prunes it first
  (`_Space`: the rows' leading principal coordinates give an upper bound of each cosine, and
  only rows whose bound reaches the distance are compared in full; exact, same answer).
- Entries are keyed by (group, content hash) with the outbox item's id: an item seen again
  (a retry, an item held back by a rate limit) matches itself, not a near-duplicate. An item
  that leaves the outbox without being delivered (dead-lettered, dropped) leaves the index
  too. The first item of a cluster keeps the evidence: `seen` counts its near-duplicates.
- Bounded: at most `max_entries` per group (the oldest evicted) and `max_age_s` (checked by
  the uploader's maintenance). The index remembers the sink it was built for and starts empty
  for another one (as the outbox's delivery records do with --forget-deliveries).
- In a fleet (`--budget-ledger`), the indexes of every replica share their entries through the
  ledger's Redis (`share`, `near_duplicates_share.py`): each publishes what it adds and forgets,
  and adds the others' entries (`origin` set, kept in the file too) before screening a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triton_al import _core

log = logging.getLogger("triton_al.uploader")

DEFAULT_MAX_DISTANCE = 20
"""On: at 20 bits (of 256) the index suppressed 0.1% of distinct Fashion-MNIST images with
31,000 entries and 0.5% with 61,000, and caught most re-encodes and one-pixel shifts
(benchmarks/RESULTS.md, "Near-duplicates"). 0 / 'off' turns it off."""
DEFAULT_MAX_EMBEDDING_DISTANCE = 0.0
"""Cosine distance (1 - cos) between the model's embeddings within which an item is a
near-duplicate (`--near-duplicate-embedding-distance`; 0 / 'off' turns the check off).
Off by default, by measurement (benchmarks/RESULTS.md, "Near-duplicates"): with the example
model's embedding (a classifier's ReLU layer) OR the hash at 20 bits, 0.001 raised recall
only 58.7 -> 59.2% while false suppression of distinct images went 0.1 -> 0.4% (31,000
entries) and 0.3 -> 0.8% (61,000); the provisional 0.02 suppressed ~80% of distinct images.
Turn it on for a model whose embedding is trained for similarity, after measuring it."""
EMBEDDING_MAX_DIM = _core.OUTBOX_MAX_EMBEDDING_DIMS
"""The longest embedding the index takes (the step's limit)."""
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_AGE_S = 30 * 86400.0
INDEX_SUFFIX = ".near-duplicates"
REMOTE_ITEM_ID = -1
"""The item id of an entry another replica published (it is not an item of this outbox)."""
COUNTER_PREFIX = "near_duplicates/"
"""Outbox counters of near-duplicates not uploaded, one per group (`near_duplicates/<group>`)."""
HASH_NAME = "dct256+aligned-dct256/2"
"""What the index file holds (its `meta` row `hash`); a file holding anything else is retired."""
HASH_BITS = 256
"""Bits of each of the two hashes (a distance is counted in these)."""
PARTS = 2  # the plain hash, then the aligned one
WORDS = PARTS * HASH_BITS // 64  # uint64 words per entry
_SIDE = 64  # the image is reduced to 64x64 before the DCT
_LOW = 16  # 16x16 lowest frequencies -> 256 bits
_SPAN = 1.9  # the aligned image spans this many radii of gyration either side of the centre


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: `D @ x` is the DCT of the column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


_DCT_LOW = np.ascontiguousarray(_dct_matrix(_SIDE)[:_LOW])  # only the rows the hash needs
_GRID = np.arange(_SIDE, dtype=np.float64)
_RING = np.zeros((_SIDE, _SIDE), bool)
_RING[[0, -1], :] = _RING[:, [0, -1]] = True


class UndecodableImage(ValueError):
    """The asset is not an image Pillow can read (it is not hashed)."""


def _dct_bits(x: np.ndarray) -> np.ndarray:
    """256 bits (as 4 uint64 words) of a 64x64 grey image: the 16x16 lowest DCT frequencies
    against their median."""
    low = (_DCT_LOW @ x @ _DCT_LOW.T).ravel()
    ordered = np.sort(low)
    half = len(low) // 2
    # Above the median (np.median costs more than this), by more than rounding: a flat image's
    # AC terms are all ~1e-13, and hash alike (only the DC bit set) whatever their grey level.
    bits = low > (ordered[half - 1] + ordered[half]) / 2 + 1e-6
    return np.packbits(bits).view(">u8").astype(np.uint64)


def _aligned(small, x: np.ndarray) -> np.ndarray:
    """The 64x64 grey image centred on its centre of mass and scaled to its radius of gyration
    (bilinear; outside the image: the border's level). Mass is the difference from the level of
    the border (the median of the outermost pixels): the object, whether lighter or darker than
    its background. `x`: the image's pixels as floats. A flat image is returned as it is."""
    from PIL import Image

    ring = x[_RING]
    level = float(np.partition(ring, len(ring) // 2)[len(ring) // 2])  # (about) the median: np.median costs more
    mass = np.abs(x - level)
    total = mass.sum()
    if total < _SIDE * _SIDE * 0.5:  # flat to within half a grey level on average: nothing to align on
        return x
    cx = float(mass.sum(0) @ _GRID) / total
    cy = float(mass.sum(1) @ _GRID) / total
    r2 = float(mass.sum(0) @ (_GRID - cx) ** 2 + mass.sum(1) @ (_GRID - cy) ** 2) / total
    scale = 2 * _SPAN * math.sqrt(r2) / _SIDE  # input pixels per output pixel
    if not scale > 0:
        return x
    half = _SIDE / 2
    data = (scale, 0.0, cx + 0.5 - half * scale, 0.0, scale, cy + 0.5 - half * scale)
    out = small.transform((_SIDE, _SIDE), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR,
                          fillcolor=int(round(level)))
    return np.asarray(out, dtype=np.float64)


def _hash_grey(grey) -> np.ndarray:
    from PIL import Image

    small = grey.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    x = np.asarray(small, dtype=np.float64)
    return np.concatenate([_dct_bits(x), _dct_bits(_aligned(small, x))])


def hash_pixels(pixels: np.ndarray) -> np.ndarray:
    """The hash (uint64 [8]: the plain 256 bits, then the aligned ones) of a 2-D grey uint8 image."""
    from PIL import Image

    a = np.asarray(pixels)
    if a.ndim != 2 or a.dtype != np.uint8 or min(a.shape) < 1:
        raise ValueError(f"pixels: expected a 2-D uint8 grey image, got {a.dtype} of shape {list(a.shape)}")
    return _hash_grey(Image.fromarray(a, mode="L"))


def image_hash(data: bytes) -> np.ndarray:
    """The hash (uint64 [8]: the plain 256 bits, then the aligned ones) of an encoded image;
    `UndecodableImage` if Pillow cannot decode it (truncated, not an image, a decompression bomb)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.draft("L", (2 * _SIDE, 2 * _SIDE))  # JPEG: decode at a reduced scale (no-op for others)
                grey = im.convert("L") if im.mode != "L" else im
                grey.load()
                return _hash_grey(grey)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad input
        raise UndecodableImage(f"{type(e).__name__}: {e}") from None


def distances(rows: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The distances from hash `h` to every row of `rows` ([n, 8] uint64): per row, the smaller
    of the two hashes' Hamming distances (numpy; the index's lookup does it in Rust)."""
    rows = np.asarray(rows, np.uint64).reshape(-1, WORDS)
    x = np.bitwise_xor(rows, np.asarray(h, np.uint64).reshape(1, WORDS))
    bits = np.unpackbits(x.view(np.uint8), axis=1).reshape(len(rows), PARTS, -1).sum(2)
    return bits.min(1)


def distance(a: np.ndarray, b: np.ndarray) -> int:
    """The distance between two hashes (the smaller of the two parts' Hamming distances)."""
    return int(distances(np.asarray(a).reshape(1, WORDS), b)[0])


def parse_distance(value: str | int | None) -> int:
    """`--near-duplicate-distance`: bits (1-255), or 0 / 'off' to disable; None: the default."""
    if value is None:
        return DEFAULT_MAX_DISTANCE
    text = str(value).strip().lower()
    if text in ("off", "0", "none", "false", "no"):
        return 0
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"near-duplicate distance: expected a number of bits (1-{HASH_BITS - 1}) or 'off', got {value!r}") from None
    if not 0 <= n < HASH_BITS:
        raise ValueError(f"near-duplicate distance: expected 1-{HASH_BITS - 1} bits (of a {HASH_BITS}-bit hash) or 0/'off', got {n}")
    return n


def parse_embedding_distance(value: str | float | None) -> float:
    """`--near-duplicate-embedding-distance`: a cosine distance (1 - cos) in (0, 1], or 0 /
    'off' to disable; None: the default."""
    if value is None:
        return DEFAULT_MAX_EMBEDDING_DISTANCE
    text = str(value).strip().lower()
    if text in ("off", "none", "false", "no"):
        return 0.0
    try:
        d = float(text)
    except ValueError:
        raise ValueError(f"--near-duplicate-embedding-distance: expected a cosine distance (1 - cos) in (0, 1] or 0/'off', "
                         f"got {value!r}") from None
    if d == 0:
        return 0.0
    if not 0 < d <= 1:  # NaN too
        raise ValueError(f"--near-duplicate-embedding-distance: expected a cosine distance (1 - cos) in (0, 1] or 0/'off', got {value!r}")
    return d


def model_key(item) -> str:
    """The space an item's embedding lives in: its model's name and version (`name/version`).
    Embeddings of two versions are never compared (a redeploy starts a new space)."""
    return f"{getattr(item, 'model_name', '')}/{getattr(item, 'model_version', '')}"


def checked_embedding(embedding) -> np.ndarray:
    """An embedding as a float32 vector; ValueError (saying why) when it is not 1 to
    `EMBEDDING_MAX_DIM` finite numbers in one dimension, not all zero. The one rule for what
    the uploader uses (near-duplicates here, `diverse` selection's feature rows)."""
    try:
        e = np.asarray(embedding, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"not numbers ({err})") from None
    if e.ndim != 1 or not 1 <= e.size <= EMBEDDING_MAX_DIM:
        raise ValueError(f"expected 1-{EMBEDDING_MAX_DIM} values in one dimension, got shape {list(e.shape)}")
    if not np.isfinite(e).all():
        raise ValueError("holds NaN or Inf")
    if not e.any():
        raise ValueError("all zero (no direction)")
    return e


def unit_embedding(embedding) -> np.ndarray:
    """`checked_embedding`, scaled to unit length (the norm taken in float64)."""
    e = checked_embedding(embedding).astype(np.float64)
    return (e / np.linalg.norm(e)).astype(np.float32)


def _item_embedding(item) -> np.ndarray | None:
    """The item's embedding as a unit vector, or None: none stored, or unusable (logged at debug)."""
    e = getattr(item, "embedding", None)
    if e is None:
        return None
    try:
        return unit_embedding(e)
    except ValueError as err:
        log.debug("item %s of %s: embedding not used: %s", getattr(item, "id", "?"), getattr(item, "upload_group", "?"), err)
        return None


@dataclass(frozen=True)
class Match:
    """A queued item found within the distance of an entry already in its group's index."""

    item_id: int
    upload_group: str
    content_hash: str
    first: str
    """The content hash of the entry it is a near-duplicate of (the one uploaded)."""
    distance: int | None
    """Hash matches: the bits between the two (0: the same content queued again); None for
    embedding matches."""
    kind: str = "hash"
    """Which check matched: "hash" (perceptual hash, `distance` bits) or "embedding"."""
    embedding_distance: float | None = None
    """Embedding matches: the cosine distance (1 - cos) to the entry."""
    origin: str | None = None
    """The replica that published the entry matched (its ledger owner id), or None: this one's."""


class _Rows:
    """Rows keyed by content hash, in parallel arrays (a width and type each) grown by doubling;
    a removal moves the last row into the gap (order does not matter to a lookup), so the
    arrays stay dense."""

    def __init__(self, *columns: tuple[int, type], capacity: int = 1024) -> None:
        self.arrays = [np.empty((capacity, w), dt) for w, dt in columns]
        self.keys: list[str] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, *rows) -> int:
        n = len(self.keys)
        if n == len(self.arrays[0]):
            for i, a in enumerate(self.arrays):
                grown = np.empty((2 * n, *a.shape[1:]), a.dtype)
                grown[:n] = a
                self.arrays[i] = grown
        for a, r in zip(self.arrays, rows):
            if r is not None:  # (None: filled in later)
                a[n] = r
        self.keys.append(key)
        self.pos[key] = n
        return n

    def remove(self, key: str) -> bool:
        at = self.pos.pop(key, None)
        if at is None:
            return False
        last = len(self.keys) - 1
        if at != last:
            moved = self.keys[last]
            for a in self.arrays:
                a[at] = a[last]
            self.keys[at] = moved
            self.pos[moved] = at
        self.keys.pop()
        return True

    def view(self, i: int) -> np.ndarray:
        return self.arrays[i][:len(self.keys)]


_LEAD_MIN_ROWS = 4096
"""Below this many rows a lookup is one matrix-vector product over all of them."""
_SLACK = 1e-4
"""Float32 rounding allowance of the bound (it must never prune the nearest row)."""
_TAIL_EPS = 4e-6


def _lead_width(dim: int) -> int:
    """Leading principal coordinates kept per row for the bound (0: none, the rows are short)."""
    return 0 if dim < 48 else 16 if dim <= 128 else 32


def _principal_axes(sample: np.ndarray, m: int, seed: int) -> np.ndarray:
    """[D, m] orthonormal columns spanning (about) the top-m right singular vectors of the
    sample's rows (uncentred: the directions holding the rows' energy); randomised range
    finder with two power iterations, so that D = 4096 stays cheap. Only how well the bound
    prunes depends on them, never the answer (any orthonormal columns give a true bound)."""
    d = sample.shape[1]
    k = min(m + 8, d, len(sample))
    y = sample @ np.random.default_rng(seed).standard_normal((d, k)).astype(np.float32)
    for _ in range(2):
        y, _ = np.linalg.qr(y)
        y = sample @ (sample.T @ y)
    q, _ = np.linalg.qr(y.astype(np.float64))
    _, _, vt = np.linalg.svd(q.T @ sample.astype(np.float64), full_matrices=False)
    return np.ascontiguousarray(vt[:m].T, dtype=np.float32)


def _tail(lead_sq):
    """The length of a unit vector's part outside the axes, from its lead's squared length,
    never under the true one: float32 rounding (of the unit rows, of the products) is below
    `_TAIL_EPS`, and a square root amplifies it near 0."""
    return np.sqrt(np.maximum(0.0, 1.0 - lead_sq) + _TAIL_EPS)


class _Space:
    """One group's embeddings of one model (name/version) and dimension: unit rows, float32
    [n, D]. A lookup is `rows @ v` (one matrix-vector product), the nearest row within the
    distance its answer. Past `_LEAD_MIN_ROWS` rows (and for D >= 48), each row also keeps its
    first m coordinates on principal axes P fitted to the rows (row @ P) and, as an (m+1)-th,
    the length of the rest (`_tail`): for unit rows x and v, cos(x, v) <= (xP).(vP) + tail(x)
    tail(v) (Cauchy-Schwarz on the part outside P), so only rows whose bound reaches
    1 - distance can be within it. The bound of every row is one [n, m+1] matrix-vector
    product (the query's lead and tail against the rows'); the few rows left are compared in
    full. The same answer as the full product; fitted again when the rows have grown 4x.
    Measured at 100,000 rows (2 loaded cores): D=64 0.5-0.9 ms against 1-1.7 ms for the full
    product; D=512 1.3-1.9 ms against ~10 ms."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.m = _lead_width(dim)
        self.rows = _Rows((dim, np.float32), (self.m + 1, np.float32), capacity=64)
        self.axes: np.ndarray | None = None
        self.fitted_at = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, key: str, v: np.ndarray) -> None:
        self.rows.add(key, v, None if self.axes is None else self._lead(v))

    def _lead(self, v: np.ndarray) -> np.ndarray:
        """v's coordinates on the axes, then the length of the rest."""
        assert self.axes is not None
        lead = np.empty(self.m + 1, np.float32)
        lead[:self.m] = v @ self.axes
        lead[self.m] = _tail(float(lead[:self.m] @ lead[:self.m]))
        return lead

    def remove(self, key: str) -> bool:
        return self.rows.remove(key)

    def _fit(self) -> None:
        x = self.rows.view(0)
        n = len(x)
        pick = np.random.default_rng(n).choice(n, min(n, 4096), replace=False) if n > 4096 else slice(None)
        self.axes = _principal_axes(x[pick], self.m, seed=n)
        lead = self.rows.arrays[1]
        lead[:n, :self.m] = x @ self.axes
        lead[:n, self.m] = _tail(np.einsum("ij,ij->i", lead[:n, :self.m], lead[:n, :self.m]))
        self.fitted_at = n

    def nearest(self, v: np.ndarray, max_distance: float) -> tuple[int, float] | None:
        """(row, cosine distance) of the nearest row within `max_distance` of unit vector v
        (the first of equals), or None."""
        n = len(self.rows)
        if n == 0:
            return None
        x = self.rows.view(0)
        if self.m and n >= _LEAD_MIN_ROWS:
            if self.axes is None or n >= 4 * self.fitted_at:
                self._fit()
            bound = self.rows.view(1) @ self._lead(v)
            cands = np.flatnonzero(bound >= 1.0 - max_distance - _SLACK)
            if len(cands) == 0:
                return None
            if len(cands) < n // 8:  # otherwise gathering them costs more than the full product
                sims = x[cands] @ v
                k = int(np.argmax(sims))
                return self._within(int(cands[k]), float(sims[k]), max_distance)
        sims = x @ v
        j = int(np.argmax(sims))
        return self._within(j, float(sims[j]), max_distance)

    @staticmethod
    def _within(j: int, cos: float, max_distance: float) -> tuple[int, float] | None:
        d = max(0.0, 1.0 - cos)
        return (j, d) if d <= max_distance else None


class _Group:
    """One upload group's entries in memory: the item id of each (by content hash); the hashes
    of those that have one, as a growing uint64 array (a row per entry) with the first word of
    each of a row's hashes beside it (the Rust lookup scans these, and reads a row only when
    they are within the distance); the embeddings of those that have one, a `_Space` per
    (model, dimension)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.hashes = _Rows((WORDS, np.uint64), (PARTS, np.uint64))
        self.spaces: dict[tuple[str, int], _Space] = {}
        self.space_of: dict[str, tuple[str, int]] = {}
        self.origins: dict[str, str] = {}
        """Entries another replica published: content hash -> its origin."""

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: str, item_id: int, h: np.ndarray | None, model: str | None, v: np.ndarray | None,
            origin: str | None = None) -> None:
        self.remove(key)
        self.ids[key] = item_id
        if origin is not None:
            self.origins[key] = origin
        if h is not None:
            self.hashes.add(key, h, h[::WORDS // PARTS])
        if v is not None and model is not None:
            space_key = (model, len(v))
            space = self.spaces.get(space_key)
            if space is None:
                space = self.spaces[space_key] = _Space(len(v))
            space.add(key, v)
            self.space_of[key] = space_key

    def remove(self, key: str) -> None:
        if self.ids.pop(key, None) is None:
            return
        self.origins.pop(key, None)
        self.hashes.remove(key)
        space_key = self.space_of.pop(key, None)
        if space_key is not None:
            space = self.spaces[space_key]
            space.remove(key)
            if not len(space):
                del self.spaces[space_key]

    def nearest_hash(self, h: np.ndarray, max_distance: int) -> tuple[str, int] | None:
        n = len(self.hashes)
        if n == 0:
            return None
        found = _core.nearest_hamming_within(self.hashes.view(0), self.hashes.view(1), h, PARTS, max_distance)
        return None if found is None else (self.hashes.keys[found[0]], found[1])

    def nearest_embedding(self, model: str, v: np.ndarray, max_distance: float) -> tuple[str, float] | None:
        space = self.spaces.get((model, len(v)))
        found = None if space is None else space.nearest(v, max_distance)
        return None if found is None else (space.rows.keys[found[0]], found[1])


def _blob(h: np.ndarray) -> bytes:
    return np.asarray(h, "<u8").tobytes()


def _unblob(b: bytes) -> np.ndarray | None:
    """A stored hash; None for an entry without one (stored empty: the image was not hashed)."""
    if not b:
        return None
    h = np.frombuffer(b, "<u8")
    if h.shape != (WORDS,):
        raise ValueError(f"a stored hash of {len(b)} bytes, expected {WORDS * 8}")
    return h.astype(np.uint64)


def _embedding_blob(v: np.ndarray) -> bytes:
    return np.asarray(v, "<f4").tobytes()


def _stored_embedding(b: bytes | None) -> np.ndarray | None:
    """A stored embedding (little-endian float32, unit length), or None (none, or not usable)."""
    if not b:
        return None
    if len(b) % 4:
        return None
    try:
        return unit_embedding(np.frombuffer(b, "<f4"))
    except ValueError:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,      -- the outbox's SHA-256 of the asset
    hash BLOB NOT NULL,              -- HASH_NAME: 8 little-endian uint64 words (plain, then aligned); empty: not hashed
    item_id INTEGER NOT NULL,        -- the outbox item it came from (an item seen again matches itself)
    added_at REAL NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0, -- near-duplicates of it not uploaded
    last_seen_at REAL,
    embedding BLOB,                  -- the model's embedding: little-endian float32, unit length; NULL: none
    embedding_model TEXT,            -- the model (name/version) that computed it: only the same one's are compared
    origin TEXT,                     -- NULL: this replica's; else the replica (ledger owner id) that published it (item_id -1)
    unsettled INTEGER NOT NULL DEFAULT 0, -- this replica's, shared, not yet answered: 1 its item waits, 2 it went on (see WRITTEN)
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (upload_group, added_at);
"""
_ADDED_COLUMNS = (("embedding", "BLOB"), ("embedding_model", "TEXT"), ("origin", "TEXT"),
                  ("unsettled", "INTEGER NOT NULL DEFAULT 0"))
"""Columns a file written by an earlier version lacks: added when it is opened (its entries keep working)."""


WRITTEN, LATE = 1, 2
"""An entry's `unsettled` state while the fleet has not answered its publication (0: settled,
or not shared). WRITTEN: in the file, its round trip under way: its item has not gone on, so a
replica killed meanwhile withdraws the entry at its next start and screens the item again.
LATE: its item went on without the fleet's answer (no claims, a ledger answering wrongly, a
failing screening): the entry stays and is published when the ledger answers, at the latest
at the next start."""


class UnsettledScreening(Exception):
    """The fleet's ledger did not answer the round trip publishing a screened batch's new
    entries (with claims on): whether another replica screened a near-copy at the same moment
    is unknown, so nothing of the batch is decided. Its new entries were withdrawn; hold the
    batch and screen it again once the ledger answers."""


def _stored_hash(path: Path) -> str | None:
    """The hash an existing index file holds: its `meta` row `hash`; the first version's
    (a 64-bit pHash in an integer column `phash`) had none. None: no entries table yet."""
    with contextlib.closing(sqlite3.connect(path, timeout=5.0)) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(entries)")]
        if not columns:
            return None
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        row = conn.execute("SELECT value FROM meta WHERE key = 'hash'").fetchone() if has_meta else None
        if row is not None:
            return row[0]
        return "phash64/1" if "phash" in columns else "unknown"


def index_path(outbox: str | os.PathLike[str]) -> Path:
    """The index file beside an outbox (its real path, as the uploader's lock)."""
    real = Path(os.path.realpath(outbox))
    return real.with_name(real.name + INDEX_SUFFIX)


class NearDuplicateIndex:
    """The per-group index of perceptual hashes and embeddings of items queued or delivered
    (see the module). Used by one uploader (its lock keeps it so); not shared between processes.

    `max_distance`: bits (0: the hash check off, images not hashed); `max_embedding_distance`:
    cosine distance (0, the default here: the embedding check off, embeddings not kept). At
    least one is on. `share`: a `near_duplicates_share.SharedEntries` (the fleet's entries, through
    the ledger), or None: this index alone."""

    def __init__(self, path: str | os.PathLike[str], *, max_distance: int, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, sink: str | None = None, max_embedding_distance: float = 0.0,
                 share=None) -> None:
        if not 0 <= max_embedding_distance <= 1:  # NaN too
            raise ValueError(f"max_embedding_distance: expected a cosine distance in (0, 1], or 0 (off), got {max_embedding_distance}")
        if not (1 <= max_distance < HASH_BITS or (max_distance == 0 and max_embedding_distance > 0)):
            raise ValueError(f"max_distance: expected 1-{HASH_BITS - 1} bits (0 only with an embedding distance), got {max_distance}")
        if max_entries <= 0:
            raise ValueError(f"max_entries: expected a positive number of entries per group, got {max_entries}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s: expected a positive age in seconds, got {max_age_s}")
        self.path = Path(path)
        self.max_distance = int(max_distance)
        self.max_embedding_distance = float(max_embedding_distance)
        self.max_entries = int(max_entries)
        self.max_age_s = float(max_age_s)
        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self.share = share
        self._cursors: dict[str, str] = {}  # group -> the last stream ID read (also in the file's meta)
        self._unpublished: set[tuple[str, str]] = set()  # (group, key): LATE entries waiting in share.pending
        self._overflowed = 0  # share.overflowed when _unpublished was last settled
        self._conn = self._open(sink)
        self._recover_unsettled()

    def _recover_unsettled(self) -> None:
        """Entries a stopped process left unsettled (`WRITTEN`, `LATE`). WRITTEN ones' items
        have not gone on (the process was killed between writing them and the round trip's
        answer): the entries go, and the items, still queued, are screened again as if new (a
        removal is published, in case the publication did reach Redis). LATE ones are published
        now. Without sharing they are plain entries."""
        rows = self._conn.execute("SELECT upload_group, content_hash, hash, embedding, embedding_model, added_at, unsettled "
                                  "FROM entries WHERE origin IS NULL AND unsettled != 0").fetchall()
        if not rows:
            return
        if self.share is None:
            self._settled([(group, key) for group, key, *_ in rows])
            return
        from triton_al.uploader.near_duplicates_share import Event

        owner = self.share.owner
        written = [(group, key) for group, key, *_, state in rows if state == WRITTEN]
        if written:
            self._withdraw(written)
            log.warning("near-duplicate index %s: %d entries screened before a stop were never settled with the fleet; "
                        "their items are screened again", self.path, len(written))
        late, unusable = [], []
        for group, key, h, e, model, added_at, state in rows:
            if state == WRITTEN:
                continue
            v = _stored_embedding(e) if model is not None else None
            h = _unblob(h)
            if h is None and v is None:
                unusable.append((group, key))
                continue
            late.append(Event("add", group, key, owner, added_at, h, model if v is not None else None, v))
        self._settled(unusable)
        if late:
            self.share.enqueue(late)
            self._unpublished.update((e.group, e.key) for e in late)
            log.info("near-duplicate index %s: %d entries were never published; publishing them", self.path, len(late))

    def _mark(self, keys: Iterable[tuple[str, str]], state: int = 0) -> None:
        """These entries' `unsettled` state in the file (0: their publication was answered, or
        they are not shared), within the caller's transaction."""
        self._conn.executemany(f"UPDATE entries SET unsettled = {int(state)} WHERE upload_group = ? AND content_hash = ? "
                               "AND origin IS NULL", list(keys))

    def _settled(self, keys: Iterable[tuple[str, str]], state: int = 0) -> None:
        """`_mark`, in a transaction of its own."""
        keys = list(keys)
        if keys:
            with self._conn:
                self._conn.execute("BEGIN")
                self._mark(keys, state)

    def _withdraw(self, keys: list[tuple[str, str]]) -> None:
        """This replica's entries that were never settled leave memory and the file, and a
        removal of each waits to be published (whether Redis added it is not known)."""
        from triton_al.uploader.near_duplicates_share import Event

        for group, key in keys:
            if group in self._groups:
                self._groups[group].remove(key)
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ? AND origin IS NULL", keys)
        self.share.enqueue(Event("del", group, key, self.share.owner) for group, key in keys)

    def _published_what_waited(self) -> None:
        """After a round trip: once nothing waits any more, the LATE entries that waited are
        settled (unless some waiting changes were dropped, over `max_len`: those entries stay
        LATE, published again at the next start)."""
        if not self._unpublished or self.share is None or not self.share.up or self.share.pending:
            return
        if self.share.overflowed == self._overflowed:
            self._settled(self._unpublished)
        self._overflowed = self.share.overflowed
        self._unpublished.clear()

    def _open(self, sink: str | None) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            raise ValueError(f"near-duplicate index {self.path}: directory {self.path.parent} does not exist")
        try:
            held = _stored_hash(self.path) if self.path.exists() else None
            if held is not None and held != HASH_NAME:  # other hashes: never compared with these
                aside = self._move_aside(f"{held.replace('/', '-')}-{int(time.time())}")
                log.warning("near-duplicate index %s holds %s hashes, not %s: moved to %s (its evidence stays there), "
                            "starting an empty one", self.path, held, HASH_NAME, aside)
            return self._connect(sink)
        except sqlite3.DatabaseError as e:  # corrupt, not SQLite: it only holds evidence; start a new one
            aside = self._move_aside(f"corrupt-{int(time.time())}")
            log.error("near-duplicate index %s is unusable (%s): moved to %s, starting an empty one", self.path, e, aside)
            return self._connect(sink)

    def _move_aside(self, tag: str) -> Path:
        """The index file (and its WAL and shared-memory files) renamed to `<index>.<tag>`."""
        aside = self.path.with_name(f"{self.path.name}.{tag}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                part.replace(Path(f"{aside}{suffix}"))
        return aside

    def _connect(self, sink: str | None) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            have = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
            missing = [(name, kind) for name, kind in _ADDED_COLUMNS if name not in have]
            for name, kind in missing:  # a file written before the embeddings: its entries stay
                conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
            if missing:
                log.info("near-duplicate index %s: added the columns %s", self.path, ", ".join(n for n, _ in missing))
            conn.execute("SELECT count(*) FROM entries").fetchone()
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('hash', ?)", (HASH_NAME,))
            if sink is not None:
                row = conn.execute("SELECT value FROM meta WHERE key = 'sink'").fetchone()
                if row is not None and row[0] != sink:
                    n = conn.execute("DELETE FROM entries").rowcount
                    conn.execute("DELETE FROM meta WHERE key LIKE 'cursor:%'")
                    log.warning("near-duplicate index %s was built for %s, not %s: %d entries forgotten", self.path, row[0], sink, n)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('sink', ?)", (sink,))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _group(self, name: str) -> _Group:
        """A group's entries, read from the file the first time (only the features of the
        checks that are on are held in memory)."""
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group()
            embeddings = "embedding, embedding_model" if self.max_embedding_distance else "NULL, NULL"
            for key, h, item_id, e, model, origin in self._conn.execute(
                    f"SELECT content_hash, hash, item_id, {embeddings}, origin FROM entries WHERE upload_group = ? "
                    "ORDER BY added_at", (name,)):
                v = _stored_embedding(e) if model is not None else None
                g.add(key, item_id, _unblob(h) if self.max_distance else None, model, v, origin)
        return g

    def screen(self, items: Iterable, *, now: float | None = None) -> list[Match]:
        """Look each item (a queued outbox item: `id`, `upload_group`, `content_hash`,
        `media_type`, `asset`, and `model_name`, `model_version`, `embedding` when it has one)
        up in its group: an item whose hash is within `max_distance` bits of an entry's, or
        whose embedding is within `max_embedding_distance` of an entry's of the same model and
        dimension, is returned (not added); the others are added (an item seen before matches
        itself and is left as it is). Items with neither feature (not an image, or one Pillow
        cannot decode, and no usable embedding) are neither indexed nor returned."""
        now = time.time() if now is None else now
        matches: list[Match] = []
        added: list[tuple] = []
        published: list = []
        taken: list[tuple] = []
        with self._lock:
            items = list(items)
            if self._holds and self.share.unreachable and not self.share.ready():
                raise UnsettledScreening(f"the budget ledger {self.share.where} does not answer ({self.share.error}): "
                                         "the batch is held and screened when it answers")
            if self.share is not None:
                self._sync({i.upload_group for i in items}, now)
            for item in items:
                image = self.max_distance > 0 and str(item.media_type).lower().startswith("image/")
                v = _item_embedding(item) if self.max_embedding_distance else None
                if not image and v is None:
                    continue
                g = self._group(item.upload_group)
                at = g.ids.get(item.content_hash)
                if at is not None:
                    if at == REMOTE_ITEM_ID and self.share is not None and self.share.defer_exact:
                        # Another replica's entry of this very content: the ledger's claims decide (delivered
                        # there: recorded without an upload; being uploaded: held). This replica's entry now.
                        g.ids[item.content_hash] = item.id
                        g.origins.pop(item.content_hash, None)
                        taken.append((item.id, item.upload_group, item.content_hash))
                    elif at != item.id:  # the same content queued again after its delivery record went
                        matches.append(Match(item.id, item.upload_group, item.content_hash, item.content_hash, 0,
                                             origin=g.origins.get(item.content_hash)))
                    continue
                h = None
                if image:
                    try:
                        h = image_hash(item.asset)
                    except UndecodableImage as e:
                        log.debug("item %d of %s not hashed: %s", item.id, item.upload_group, e)
                if h is None and v is None:
                    continue
                match = self._lookup(g, item, h, v)
                if match is not None:
                    matches.append(match)
                    continue
                model = model_key(item) if v is not None else None
                g.add(item.content_hash, item.id, h, model, v)
                added.append((item.upload_group, item.content_hash, b"" if h is None else _blob(h), item.id, now,
                              None if v is None else _embedding_blob(v), model, 0 if self.share is None else WRITTEN))
                if self.share is not None:
                    published.append((item.upload_group, item.content_hash, h, model, v, item.id))
            if added or taken:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany("INSERT OR REPLACE INTO entries (upload_group, content_hash, hash, item_id, added_at, "
                                           "embedding, embedding_model, unsettled) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", added)
                    self._conn.executemany("UPDATE entries SET item_id = ?, origin = NULL WHERE upload_group = ? AND content_hash = ?",
                                           taken)
                    if not self._holds:  # else once settled: a held batch's entries are withdrawn, evicted ones would not return
                        for group in {a[0] for a in added}:
                            self._evict_over_bound(group)
            if published:  # after the file has them (WRITTEN), before the batch is uploaded
                try:
                    matches = self._publish_and_settle(published, matches, now)
                except UnsettledScreening:
                    raise
                except Exception:  # the uploader goes on without the index: these are published at the next start
                    self._settled([(group, key) for group, key, *_ in published], LATE)
                    raise
        return matches

    @property
    def _holds(self) -> bool:
        """A batch waits for the fleet to see its new entries (sharing, with the claims on)."""
        return self.share is not None and self.share.defer_exact

    def _publish_and_settle(self, published: list[tuple], matches: list[Match], now: float) -> list[Match]:
        """Publish the entries this screening added and, in the same round trip, read what the
        others published since the screening read: an entry of this batch near one another
        replica published before it (in the stream's order) was screened at the same moment
        there, and the earlier one wins on every replica alike. This batch's losing entries
        become near-duplicates of the earlier ones (not uploaded; removed here and from the
        fleet), so two replicas screening near-copies together upload one of them. Without an
        answer from the ledger, `_unanswered`."""
        from triton_al.uploader.near_duplicates_share import Event, stream_order

        owner = self.share.owner
        events = [Event("add", group, key, owner, now, h, model, v) for group, key, h, model, v, _ in published]
        ids, got = self.share.publish_then_read(events, self._cursors_for({e.group for e in events}))
        if got is None:
            return self._unanswered(events, ids, matches)
        lost: dict[tuple[str, str], Match] = {}
        for event, stream_id, (*_, item_id) in zip(events, ids, published):
            if stream_id is None:
                continue
            mine = stream_order(stream_id)
            for other in got.get(event.group, ("", []))[1]:
                if other.op != "add" or not other.stream_id or stream_order(other.stream_id) >= mine:
                    continue
                if other.key == event.key and self.share.defer_exact:
                    continue  # an exact copy: the claims' business
                match = self._near(event, other, item_id)
                if match is not None:
                    lost[(event.group, event.key)] = match
                    break
        for group, key in lost:
            self._groups[group].remove(key)
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ?", list(lost))
            self._mark((e.group, e.key) for e in events if (e.group, e.key) not in lost)
            self._evict_held_back({e.group for e in events})
        if lost:
            self.share.settled += len(lost)
            self.share.publish([Event("del", group, key, owner) for group, key in lost])  # rare: a round trip of its own
            log.info("near-duplicate sharing: %d items screened at the same moment as a near-copy on another replica; "
                     "the other's came first, so these are its near-duplicates", len(lost))
            # Matches of this batch on a losing entry now point at the entry it lost to.
            matches = [m if (m.upload_group, m.first) not in lost else
                       dataclasses.replace(m, first=lost[(m.upload_group, m.first)].first,
                                           origin=lost[(m.upload_group, m.first)].origin)
                       for m in matches]
            matches.extend(lost.values())
        self._apply_shared(got, now)
        self._published_what_waited()
        return matches

    def _unanswered(self, events: list, ids: list[str | None], matches: list[Match]) -> list[Match]:
        """The round trip publishing this batch's new entries got no answer (or no read back).
        With claims on, the batch waits for the fleet anyway (the claims hold it while the
        ledger is down), so nothing of it is decided here: its new entries are withdrawn (from
        memory, the file, and what waits to be published; a removal is queued for each, since
        a lost reply does not say whether Redis added it) and `UnsettledScreening` tells the
        uploader to hold the batch and screen it again. Without claims nothing waits for the
        fleet, nor when the ledger answered with something unusable (a key of the wrong type
        would hold the group for ever): the entries stay, and those not published are LATE."""
        keys = [(e.group, e.key) for e in events]
        if not self._holds or not self.share.unreachable:
            waiting = [k for k, at in zip(keys, ids) if at is None]
            self._unpublished.update(waiting)
            with self._conn:
                self._conn.execute("BEGIN")
                self._mark(waiting, LATE)
                self._mark(k for k, at in zip(keys, ids) if at is not None)
                self._evict_held_back({group for group, _ in keys})
            return matches
        self.share.withdraw(events)
        self._withdraw(keys)
        self.share.unanswered += 1
        raise UnsettledScreening(f"the budget ledger {self.share.where} did not answer the publication of {len(keys)} new "
                                 f"near-duplicate entries ({self.share.error or 'no answer'}): the batch is held and screened "
                                 "again when it answers")

    def _evict_held_back(self, groups: set[str]) -> None:
        """The eviction a screening that may be held puts off until its entries are settled (in a transaction)."""
        if self._holds:
            for group in groups:
                self._evict_over_bound(group)

    def _near(self, mine, other, item_id: int) -> Match | None:
        """This replica's new entry (an add event) as a near-duplicate of another's, or None."""
        if self.max_distance and mine.hash is not None and other.hash is not None:
            bits = distance(mine.hash, other.hash)
            if bits <= self.max_distance:
                return Match(item_id, mine.group, mine.key, other.key, bits, origin=other.origin)
        if (self.max_embedding_distance and mine.embedding is not None and other.embedding is not None
                and mine.model == other.model and len(mine.embedding) == len(other.embedding)):
            apart = 1.0 - float(np.dot(mine.embedding.astype(np.float64), other.embedding.astype(np.float64)))
            if apart <= self.max_embedding_distance:
                return Match(item_id, mine.group, mine.key, other.key, None, "embedding", apart, origin=other.origin)
        return None

    def _lookup(self, g: _Group, item, h: np.ndarray | None, v: np.ndarray | None) -> Match | None:
        """The hash check, then (when it found nothing) the embedding check."""
        if h is not None:
            found = g.nearest_hash(h, self.max_distance)
            if found is not None:
                log.debug("item %d of %s: near-duplicate of %s by hash (%d bits)", item.id, item.upload_group, found[0], found[1])
                return Match(item.id, item.upload_group, item.content_hash, found[0], found[1], origin=g.origins.get(found[0]))
        if v is not None:
            near = g.nearest_embedding(model_key(item), v, self.max_embedding_distance)
            if near is not None:
                log.debug("item %d of %s: near-duplicate of %s by embedding (cosine distance %.4g)", item.id,
                          item.upload_group, near[0], near[1])
                return Match(item.id, item.upload_group, item.content_hash, near[0], None, "embedding", near[1],
                             origin=g.origins.get(near[0]))
        return None

    def _sync(self, groups: set[str], now: float) -> None:
        """The other replicas' changes to these groups since the last read (a group read for the
        first time: the stream's whole retained history), applied to memory and the file, with
        the position read up to. Nothing happens when the ledger does not answer."""
        got = self.share.read(self._cursors_for(groups))
        if got is not None:
            self._apply_shared(got, now)
            self._published_what_waited()

    def _cursors_for(self, groups: set[str]) -> dict[str, str]:
        """The position read up to in each group's stream (its entries loaded first)."""
        cursors = {}
        for name in sorted(groups):
            self._group(name)
            if name not in self._cursors:
                row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (self._cursor_key(name),)).fetchone()
                self._cursors[name] = row[0] if row is not None else "0-0"
            cursors[name] = self._cursors[name]
        return cursors

    def _apply_shared(self, got: dict, now: float) -> None:
        """What `SharedEntries.read` returned, applied to memory and the file, with the cursors."""
        # Per entry, the last change read wins in the file as in memory (an entry added and
        # withdrawn in one read is neither written nor left behind).
        upserts: dict[tuple[str, str], tuple] = {}
        deletes: list[tuple] = []
        for name, (last, events) in got.items():
            g = self._groups[name]
            for e in events:
                at = g.ids.get(e.key)
                if e.op == "del":
                    if at == REMOTE_ITEM_ID and g.origins.get(e.key) == e.origin:
                        g.remove(e.key)
                        upserts.pop((name, e.key), None)
                        deletes.append((name, e.key))  # (run before the upserts)
                    continue
                if (at is not None and at != REMOTE_ITEM_ID) or e.added_at < now - self.max_age_s:
                    continue  # this replica's own entry of it stays; an expired one is not taken
                v = e.embedding if self.max_embedding_distance and e.embedding is not None else None
                g.add(e.key, REMOTE_ITEM_ID, e.hash if self.max_distance else None, e.model if v is not None else None, v, e.origin)
                # (dated no later than now: a replica whose clock runs ahead must not make entries that never expire)
                upserts[(name, e.key)] = (name, e.key, b"" if e.hash is None else _blob(e.hash), REMOTE_ITEM_ID,
                                          min(e.added_at, now), None if e.embedding is None else _embedding_blob(e.embedding),
                                          e.model, e.origin)
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ? AND item_id = -1", deletes)
            self._conn.executemany(
                "INSERT INTO entries (upload_group, content_hash, hash, item_id, added_at, embedding, embedding_model, origin) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (upload_group, content_hash) DO UPDATE SET hash = excluded.hash, "
                "item_id = excluded.item_id, added_at = excluded.added_at, embedding = excluded.embedding, "
                "embedding_model = excluded.embedding_model, origin = excluded.origin", upserts.values())
            for name, (last, _) in got.items():
                if last != self._cursors.get(name):
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (self._cursor_key(name), last))
                self._cursors[name] = last
            for name in {group for group, _ in upserts}:
                self._evict_over_bound(name)
        if upserts or deletes:
            log.debug("near-duplicate index: %d entries from other replicas added, %d removed", len(upserts), len(deletes))

    def _cursor_key(self, group: str) -> str:
        return f"cursor:{self.share.stream_key(group)}"

    def _evict_over_bound(self, group: str) -> None:
        g = self._groups[group]
        over = len(g) - self.max_entries
        if over <= 0:
            return
        oldest = [r[0] for r in self._conn.execute(
            "SELECT content_hash FROM entries WHERE upload_group = ? ORDER BY added_at, content_hash LIMIT ?", (group, over))]
        self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ?", [(group, k) for k in oldest])
        for key in oldest:
            g.remove(key)

    def record(self, matches: Iterable[Match], *, now: float | None = None) -> None:
        """Count near-duplicates (not uploaded) on the entry each matched: the evidence."""
        now = time.time() if now is None else now
        counts: dict[tuple[str, str], int] = {}
        for m in matches:
            counts[(m.upload_group, m.first)] = counts.get((m.upload_group, m.first), 0) + 1
        if not counts:
            return
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("UPDATE entries SET seen = seen + ?, last_seen_at = ? WHERE upload_group = ? AND content_hash = ?",
                                   [(n, now, g, k) for (g, k), n in counts.items()])

    def forget(self, items: Iterable) -> int:
        """Items that left the outbox undelivered (dead-lettered, dropped) leave the index,
        so that a later near-copy is uploaded; an entry of another item is kept."""
        doomed = []
        with self._lock:
            for item in items:
                g = self._groups.get(item.upload_group)
                if g is not None and g.ids.get(item.content_hash) == item.id:
                    g.remove(item.content_hash)
                    doomed.append((item.upload_group, item.content_hash, item.id))
            if doomed:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ? AND item_id = ?", doomed)
                if self.share is not None:  # every replica's index lets it go (eviction is each one's own)
                    from triton_al.uploader.near_duplicates_share import Event

                    self.share.publish([Event("del", group, key, self.share.owner) for group, key, _ in doomed])
                    self._published_what_waited()
        return len(doomed)

    def maintain(self, *, now: float | None = None) -> int:
        """Forget entries older than `max_age_s` (and any beyond `max_entries`); returns how many went."""
        now = time.time() if now is None else now
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            old = self._conn.execute("SELECT upload_group, content_hash FROM entries WHERE added_at < ?", (now - self.max_age_s,)).fetchall()
            self._conn.execute("DELETE FROM entries WHERE added_at < ?", (now - self.max_age_s,))
            for group, key in old:
                if group in self._groups:
                    self._groups[group].remove(key)
            for group in list(self._groups):
                self._evict_over_bound(group)
        if old:
            log.info("near-duplicate index: forgot %d entries older than %.0f s", len(old), self.max_age_s)
        if self.share is not None and self.share.pending:  # an idle replica's waiting changes go out too
            with self._lock:
                self.share.publish([])
                self._published_what_waited()
        return len(old)

    def entry(self, group: str, content_hash: str) -> dict | None:
        """One entry (hash or None, item_id, added_at, seen, last_seen_at, embedding (unit,
        float32) or None, embedding_model, origin: None for this replica's), or None."""
        with self._lock:
            cur = self._conn.execute("SELECT hash, item_id, added_at, seen, last_seen_at, embedding, embedding_model, origin FROM entries "
                                     "WHERE upload_group = ? AND content_hash = ?", (group, content_hash))
            row = cur.fetchone()
            if row is None:
                return None
            out = dict(zip([d[0] for d in cur.description], row))
        out["hash"] = _unblob(out["hash"])
        out["embedding"] = None if out["embedding"] is None else np.frombuffer(out["embedding"], "<f4").astype(np.float32)
        return out

    def sizes(self) -> dict[str, int]:
        """Entries per group (what is stored)."""
        with self._lock:
            return dict(self._conn.execute("SELECT upload_group, count(*) FROM entries GROUP BY upload_group").fetchall())


def seen_entries(path: str | os.PathLike[str], *, group: str | None = None, limit: int = 100) -> list[dict]:
    """The entries that near-duplicates were counted on, most seen first (`triton-al outbox
    near-duplicates`): group, content hash (the image uploaded), seen, added_at, last_seen_at, and
    origin (null: uploaded by this replica; else the replica of the fleet that published it)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"near-duplicate index {path} does not exist (the uploader creates it unless started with "
                         "--near-duplicate-distance off and --near-duplicate-embedding-distance off)")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as conn:
            has_origin = any(r[1] == "origin" for r in conn.execute("PRAGMA table_info(entries)"))
            origin = "origin" if has_origin else "NULL AS origin"
            cur = conn.execute(f"SELECT upload_group, content_hash, seen, added_at, last_seen_at, {origin} FROM entries WHERE seen > 0 "
                               "AND (?1 IS NULL OR upload_group = ?1) ORDER BY seen DESC, added_at LIMIT ?2", (group, int(limit)))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"near-duplicate index {path}: cannot read it ({e})") from None
