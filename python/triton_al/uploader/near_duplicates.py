"""Near-duplicate suppression on arrival (issue 15): a perceptual hash per flagged image and,
per upload group, an index of the hashes of the items queued or delivered, so that an item
within `max_distance` bits (Hamming) of one already there is counted and not uploaded.

- The hash is a 64-bit DCT pHash: the image decoded with Pillow, in grey, resized to 32x32,
  its 2-D DCT, the 8x8 lowest frequencies compared with their median (one bit each). Near
  copies (a shift of a pixel or two, a crop, a JPEG re-encode, noise) stay within a few bits;
  unrelated images differ in about half of them. Only `image/*` assets are hashed; an asset
  Pillow cannot decode is not hashed and goes on as before (uploaded, or dead-lettered by the
  sink as today).
- The index lives beside the outbox in its own SQLite file (`<outbox>.near-duplicates`; the
  outbox's schema is shared by two writers and stays as it is), written only by the uploader
  (one per outbox, by its lock), and mirrored in memory as one numpy array of hashes per group:
  a lookup is a linear scan (XOR and popcount of every entry: `_core.nearest_hamming`, Rust,
  about 7 times less CPU than the same scan in numpy at 100,000 entries; benchmarks/RESULTS.md).
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

DEFAULT_MAX_DISTANCE = 0
"""Off unless asked for: on Fashion-MNIST the 64-bit pHash suppresses a share of *distinct*
images that grows with the index (5% at 11,000 entries already at 2 bits; benchmarks/RESULTS.md,
"Near-duplicates"), too many to drop silently by default. 2-4 bits catch re-encodes and noise."""
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_AGE_S = 30 * 86400.0
INDEX_SUFFIX = ".near-duplicates"
COUNTER_PREFIX = "near_duplicates/"
"""Outbox counters of near-duplicates not uploaded, one per group (`near_duplicates/<group>`)."""
HASH_BITS = 64
_SIDE = 32  # the image is reduced to 32x32 before the DCT
_LOW = 8  # 8x8 lowest frequencies -> 64 bits


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: `D @ x` is the DCT of the column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


_DCT_LOW = np.ascontiguousarray(_dct_matrix(_SIDE)[:_LOW])  # only the rows the hash needs
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64))


class UndecodableImage(ValueError):
    """The asset is not an image Pillow can read (it is not hashed)."""


def phash_pixels(pixels: np.ndarray) -> int:
    """The pHash of a 2-D grey image already reduced to 32x32 (float or uint8)."""
    x = np.asarray(pixels, dtype=np.float64)
    if x.shape != (_SIDE, _SIDE):
        raise ValueError(f"pixels: expected shape [{_SIDE}, {_SIDE}], got {list(x.shape)}")
    low = (_DCT_LOW @ x @ _DCT_LOW.T).ravel()
    ordered = np.sort(low)
    bits = low > (ordered[31] + ordered[32]) / 2  # the median of the 64 (np.median costs more than the rest)
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def phash(data: bytes) -> int:
    """The 64-bit pHash (an unsigned int) of an encoded image; `UndecodableImage` if Pillow
    cannot decode it (truncated, not an image, a decompression bomb)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.draft("L", (2 * _SIDE, 2 * _SIDE))  # JPEG: decode at a reduced scale (no-op for others)
                grey = im.convert("L") if im.mode != "L" else im
                small = grey.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
                pixels = np.asarray(small, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad input
        raise UndecodableImage(f"{type(e).__name__}: {e}") from None
    return phash_pixels(pixels)


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).count("1")


def distances(hashes: np.ndarray, h: int) -> np.ndarray:
    """Hamming distances from `h` to every uint64 in `hashes` (a new array)."""
    return _Popcount()(np.asarray(hashes, np.uint64), h).copy()


def parse_distance(value: str | int | None) -> int:
    """`--near-duplicate-distance`: bits (1-63), or 0 / 'off' to disable."""
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


class _Popcount:
    """Hamming distances from one hash to many in numpy, with scratch buffers reused (SWAR
    popcount: a dozen vector operations over the uint64s). For `distances`, and the baseline
    the Rust lookup is measured against."""

    M1, M2, M4, H01 = (np.uint64(v) for v in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101))
    S1, S2, S4, S56 = (np.uint64(v) for v in (1, 2, 4, 56))

    def __init__(self) -> None:
        self._a = np.empty(0, np.uint64)
        self._b = np.empty(0, np.uint64)

    def __call__(self, hashes: np.ndarray, h: int) -> np.ndarray:
        n = len(hashes)
        if len(self._a) < n:
            self._a = np.empty(max(n, 2 * len(self._a)), np.uint64)
            self._b = np.empty_like(self._a)
        x, t = self._a[:n], self._b[:n]
        np.bitwise_xor(hashes, np.uint64(h), out=x)
        np.right_shift(x, self.S1, out=t)
        np.bitwise_and(t, self.M1, out=t)
        np.subtract(x, t, out=x)
        np.right_shift(x, self.S2, out=t)
        np.bitwise_and(t, self.M2, out=t)
        np.bitwise_and(x, self.M2, out=x)
        np.add(x, t, out=x)
        np.right_shift(x, self.S4, out=t)
        np.add(x, t, out=x)
        np.bitwise_and(x, self.M4, out=x)
        np.multiply(x, self.H01, out=x)
        np.right_shift(x, self.S56, out=x)
        return x


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
    """One upload group's hashes in memory: a growing uint64 array, its keys and item ids."""

    def __init__(self) -> None:
        self.hashes = np.empty(1024, np.uint64)
        self.keys: list[str] = []
        self.ids: list[int] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, h: int, item_id: int) -> None:
        n = len(self.keys)
        if n == len(self.hashes):
            grown = np.empty(2 * n, np.uint64)
            grown[:n] = self.hashes
            self.hashes = grown
        self.hashes[n] = np.uint64(h)
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
            self.keys[at], self.ids[at] = moved, self.ids[last]
            self.pos[moved] = at
        self.keys.pop()
        self.ids.pop()


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def _unsigned(h: int) -> int:
    return h + (1 << 64) if h < 0 else h


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,      -- the outbox's SHA-256 of the asset
    phash INTEGER NOT NULL,          -- the 64-bit pHash, as a signed integer
    item_id INTEGER NOT NULL,        -- the outbox item it came from (an item seen again matches itself)
    added_at REAL NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0, -- near-duplicates of it not uploaded
    last_seen_at REAL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (upload_group, added_at);
"""


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
            return self._connect(sink)
        except sqlite3.DatabaseError as e:  # corrupt, not SQLite: it only holds evidence; start a new one
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("near-duplicate index %s is unusable (%s): moved to %s, starting an empty one", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.replace(Path(f"{aside}{suffix}"))
            return self._connect(sink)

    def _connect(self, sink: str | None) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute("SELECT count(*) FROM entries").fetchone()
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
                    "SELECT content_hash, phash, item_id FROM entries WHERE upload_group = ? ORDER BY added_at", (name,)):
                g.add(key, _unsigned(h), item_id)
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
                    h = phash(item.asset)
                except UndecodableImage as e:
                    log.debug("item %d of %s not hashed: %s", item.id, item.upload_group, e)
                    continue
                nearest = _core.nearest_hamming(g.hashes[:len(g)], h)
                if nearest is not None and nearest[1] <= self.max_distance:
                    matches.append(Match(item.id, item.upload_group, item.content_hash, g.keys[nearest[0]], nearest[1]))
                    continue
                g.add(item.content_hash, h, item.id)
                added.append((item.upload_group, item.content_hash, _signed(h), item.id, now))
            if added:
                with self._conn:
                    self._conn.execute("BEGIN")
                    self._conn.executemany("INSERT OR REPLACE INTO entries (upload_group, content_hash, phash, item_id, added_at) "
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
        """One entry (phash, item_id, added_at, seen, last_seen_at), or None."""
        with self._lock:
            cur = self._conn.execute("SELECT phash, item_id, added_at, seen, last_seen_at FROM entries "
                                     "WHERE upload_group = ? AND content_hash = ?", (group, content_hash))
            row = cur.fetchone()
            if row is None:
                return None
            out = dict(zip([d[0] for d in cur.description], row))
        out["phash"] = _unsigned(out["phash"])
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
        raise ValueError(f"near-duplicate index {path} does not exist (the uploader creates it when started with --near-duplicate-distance)")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as conn:
            cur = conn.execute("SELECT upload_group, content_hash, seen, added_at, last_seen_at FROM entries WHERE seen > 0 "
                               "AND (?1 IS NULL OR upload_group = ?1) ORDER BY seen DESC, added_at LIMIT ?2", (group, int(limit)))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"near-duplicate index {path}: cannot read it ({e})") from None
