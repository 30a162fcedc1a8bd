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
- Entries are keyed by (group, content hash) with the outbox item's id: an item seen again
  (a retry, an item held back by a rate limit) matches itself, not a near-duplicate. An item
  that leaves the outbox without being delivered (dead-lettered, dropped) leaves the index
  too. The first item of a cluster keeps the evidence: `seen` counts its near-duplicates.
- Bounded: at most `max_entries` per group (the oldest evicted) and `max_age_s` (checked by
  the uploader's maintenance). The index remembers the sink it was built for and starts empty
  for another one (as the outbox's delivery records do with --forget-deliveries).
"""

from __future__ import annotations

import contextlib
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
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_AGE_S = 30 * 86400.0
INDEX_SUFFIX = ".near-duplicates"
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


@dataclass(frozen=True)
class Match:
    """A queued item found within the distance of an entry already in its group's index."""

    item_id: int
    upload_group: str
    content_hash: str
    first: str
    """The content hash of the entry it is a near-duplicate of (the one uploaded)."""
    distance: int


class _Group:
    """One upload group's hashes in memory: a growing uint64 array (a row per entry), the first
    word of each of a row's hashes beside it (the lookup scans these, and reads a row only when
    they are within the distance), its keys and item ids."""

    def __init__(self) -> None:
        self.hashes = np.empty((1024, WORDS), np.uint64)
        self.lead = np.empty((1024, PARTS), np.uint64)
        self.keys: list[str] = []
        self.ids: list[int] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, h: np.ndarray, item_id: int) -> None:
        n = len(self.keys)
        if n == len(self.hashes):
            grown = np.empty((2 * n, WORDS), np.uint64)
            grown[:n] = self.hashes
            self.hashes = grown
            lead = np.empty((2 * n, PARTS), np.uint64)
            lead[:n] = self.lead
            self.lead = lead
        self.hashes[n] = h
        self.lead[n] = h[::WORDS // PARTS]
        self.keys.append(key)
        self.ids.append(item_id)
        self.pos[key] = n

    def remove(self, key: str) -> None:
        """Swap with the last entry (order does not matter to a lookup)."""
        at = self.pos.pop(key, None)
        if at is None:
            return
        last = len(self.keys) - 1
        if at != last:
            moved = self.keys[last]
            self.hashes[at] = self.hashes[last]
            self.lead[at] = self.lead[last]
            self.keys[at], self.ids[at] = moved, self.ids[last]
            self.pos[moved] = at
        self.keys.pop()
        self.ids.pop()


def _blob(h: np.ndarray) -> bytes:
    return np.asarray(h, "<u8").tobytes()


def _unblob(b: bytes) -> np.ndarray:
    h = np.frombuffer(b, "<u8")
    if h.shape != (WORDS,):
        raise ValueError(f"a stored hash of {len(b)} bytes, expected {WORDS * 8}")
    return h.astype(np.uint64)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,      -- the outbox's SHA-256 of the asset
    hash BLOB NOT NULL,              -- HASH_NAME: 8 little-endian uint64 words (plain, then aligned)
    item_id INTEGER NOT NULL,        -- the outbox item it came from (an item seen again matches itself)
    added_at REAL NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0, -- near-duplicates of it not uploaded
    last_seen_at REAL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (upload_group, added_at);
"""


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
    """The per-group index of perceptual hashes of items queued or delivered (see the module).
    Used by one uploader (its lock keeps it so); not shared between processes."""

    def __init__(self, path: str | os.PathLike[str], *, max_distance: int, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, sink: str | None = None) -> None:
        if not 1 <= max_distance < HASH_BITS:
            raise ValueError(f"max_distance: expected 1-{HASH_BITS - 1} bits, got {max_distance}")
        if max_entries <= 0:
            raise ValueError(f"max_entries: expected a positive number of entries per group, got {max_entries}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s: expected a positive age in seconds, got {max_age_s}")
        self.path = Path(path)
        self.max_distance = int(max_distance)
        self.max_entries = int(max_entries)
        self.max_age_s = float(max_age_s)
        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self._conn = self._open(sink)

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
            conn.execute("SELECT count(*) FROM entries").fetchone()
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('hash', ?)", (HASH_NAME,))
            if sink is not None:
                row = conn.execute("SELECT value FROM meta WHERE key = 'sink'").fetchone()
                if row is not None and row[0] != sink:
                    n = conn.execute("DELETE FROM entries").rowcount
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
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group()
            for key, h, item_id in self._conn.execute(
                    "SELECT content_hash, hash, item_id FROM entries WHERE upload_group = ? ORDER BY added_at", (name,)):
                g.add(key, _unblob(h), item_id)
        return g

    def screen(self, items: Iterable, *, now: float | None = None) -> list[Match]:
        """Hash the items (queued outbox items: `id`, `upload_group`, `content_hash`,
        `media_type`, `asset`) and look each up in its group: those within the distance of an
        entry are returned (not added); the others are added (an item seen before matches
        itself and is left as it is). Items that are not images, or that Pillow cannot
        decode, are neither hashed nor returned."""
        now = time.time() if now is None else now
        matches: list[Match] = []
        added: list[tuple] = []
        with self._lock:
            for item in items:
                if not str(item.media_type).lower().startswith("image/"):
                    continue
                g = self._group(item.upload_group)
                at = g.pos.get(item.content_hash)
                if at is not None:
                    if g.ids[at] != item.id:  # the same image queued again after its delivery record went
                        matches.append(Match(item.id, item.upload_group, item.content_hash, item.content_hash, 0))
                    continue
                try:
                    h = image_hash(item.asset)
                except UndecodableImage as e:
                    log.debug("item %d of %s not hashed: %s", item.id, item.upload_group, e)
                    continue
                nearest = _core.nearest_hamming_within(g.hashes[:len(g)], g.lead[:len(g)], h, PARTS, self.max_distance)
                if nearest is not None:
                    matches.append(Match(item.id, item.upload_group, item.content_hash, g.keys[nearest[0]], nearest[1]))
                    continue
                g.add(item.content_hash, h, item.id)
                added.append((item.upload_group, item.content_hash, _blob(h), item.id, now))
            if added:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany("INSERT OR REPLACE INTO entries (upload_group, content_hash, hash, item_id, added_at) "
                                           "VALUES (?, ?, ?, ?, ?)", added)
                    for group in {a[0] for a in added}:
                        self._evict_over_bound(group)
        return matches

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
                at = None if g is None else g.pos.get(item.content_hash)
                if at is not None and g.ids[at] == item.id:
                    g.remove(item.content_hash)
                    doomed.append((item.upload_group, item.content_hash, item.id))
            if doomed:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany("DELETE FROM entries WHERE upload_group = ? AND content_hash = ? AND item_id = ?", doomed)
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
        return len(old)

    def entry(self, group: str, content_hash: str) -> dict | None:
        """One entry (hash, item_id, added_at, seen, last_seen_at), or None."""
        with self._lock:
            cur = self._conn.execute("SELECT hash, item_id, added_at, seen, last_seen_at FROM entries "
                                     "WHERE upload_group = ? AND content_hash = ?", (group, content_hash))
            row = cur.fetchone()
            if row is None:
                return None
            out = dict(zip([d[0] for d in cur.description], row))
        out["hash"] = _unblob(out["hash"])
        return out

    def sizes(self) -> dict[str, int]:
        """Entries per group (what is stored)."""
        with self._lock:
            return dict(self._conn.execute("SELECT upload_group, count(*) FROM entries GROUP BY upload_group").fetchall())


def seen_entries(path: str | os.PathLike[str], *, group: str | None = None, limit: int = 100) -> list[dict]:
    """The entries that near-duplicates were counted on, most seen first (`triton-al outbox
    near-duplicates`): group, content hash (the image uploaded), seen, added_at, last_seen_at."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"near-duplicate index {path} does not exist (the uploader creates it unless started with --near-duplicate-distance off)")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as conn:
            cur = conn.execute("SELECT upload_group, content_hash, seen, added_at, last_seen_at FROM entries WHERE seen > 0 "
                               "AND (?1 IS NULL OR upload_group = ?1) ORDER BY seen DESC, added_at LIMIT ?2", (group, int(limit)))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"near-duplicate index {path}: cannot read it ({e})") from None
