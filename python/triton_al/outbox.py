"""The durable outbox: flagged items wait here until a sink confirms them.

One SQLite file in WAL mode, shared by every writer process (Triton runs one Python-backend
process per model instance) and the uploader. An append is durable when it returns: the WAL
is flushed to disk after the commit, by a group commit shared between processes (see
`group_commit`). With `durable=False` it is not flushed: the commit is in the operating
system when it returns, which survives any process kill but not a power loss. The file is
bounded by a cap on items
and on asset bytes, with an overflow policy; items are deduplicated per upload group by
the SHA-256 of the asset, including against items already delivered.

Tables:
- `assets`: the asset bytes, once per content hash, however many groups want them;
- `items`: one row per (upload group, content hash) still to deliver, with the
  prediction, score and retry state;
- `dead_letters`: items a sink rejected for good (retryable by command);
- `delivered`: (group, hash, time) of everything delivered, for dedup and rate limits;
- `counters`: totals kept by triggers and by each transaction (appended, duplicates,
  dropped, uploaded, retries…), so every process sees the same numbers;
- `paused_groups`: groups the uploader must not touch (survives restarts).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from triton_al.config import validate_group_name
from triton_al.file_lock import flock_within
from triton_al.group_commit import GroupCommit

log = logging.getLogger("triton_al.outbox")

OverflowPolicy = Literal["drop_newest", "drop_least_uncertain"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop_newest", "drop_least_uncertain")
SCHEMA_VERSION = 1
OVERFLOW_LOG_INTERVAL_S = 60.0
RELEASE_CHUNK = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assets (
    content_hash TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL REFERENCES assets (content_hash),
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction TEXT NOT NULL,
    score REAL,                -- NULL stands for NaN (invalid model output)
    strategy TEXT NOT NULL,
    threshold REAL NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    UNIQUE (upload_group, content_hash)
);
CREATE INDEX IF NOT EXISTS items_by_hash ON items (content_hash);
CREATE INDEX IF NOT EXISTS items_by_score ON items (score);
CREATE INDEX IF NOT EXISTS items_due ON items (next_attempt_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prediction TEXT NOT NULL,
    score REAL,
    strategy TEXT NOT NULL,
    threshold REAL NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    error TEXT NOT NULL,
    UNIQUE (upload_group, content_hash)
);
CREATE INDEX IF NOT EXISTS dead_by_hash ON dead_letters (content_hash);
CREATE TABLE IF NOT EXISTS delivered (
    upload_group TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (upload_group, content_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_by_time ON delivered (upload_group, delivered_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paused_groups (upload_group TEXT PRIMARY KEY) WITHOUT ROWID;

-- Running totals for the caps, kept by the database itself so no code path can forget.
CREATE TRIGGER IF NOT EXISTS items_added AFTER INSERT ON items BEGIN
    INSERT INTO counters VALUES ('queued_items', 1) ON CONFLICT (name) DO UPDATE SET value = value + 1;
END;
CREATE TRIGGER IF NOT EXISTS items_removed AFTER DELETE ON items BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'queued_items';
    -- An asset goes when nothing refers to it any more.
    DELETE FROM assets WHERE content_hash = OLD.content_hash
        AND NOT EXISTS (SELECT 1 FROM items WHERE content_hash = OLD.content_hash)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE content_hash = OLD.content_hash);
END;
CREATE TRIGGER IF NOT EXISTS dead_removed AFTER DELETE ON dead_letters BEGIN
    DELETE FROM assets WHERE content_hash = OLD.content_hash
        AND NOT EXISTS (SELECT 1 FROM items WHERE content_hash = OLD.content_hash)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE content_hash = OLD.content_hash);
END;
CREATE TRIGGER IF NOT EXISTS assets_added AFTER INSERT ON assets BEGIN
    INSERT INTO counters VALUES ('stored_bytes', NEW.size) ON CONFLICT (name) DO UPDATE SET value = value + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS assets_removed AFTER DELETE ON assets BEGIN
    UPDATE counters SET value = value - OLD.size WHERE name = 'stored_bytes';
END;
"""

_ITEM_COLUMNS = (
    "upload_group, content_hash, model_name, model_version, prediction, score, strategy, "
    "threshold, reason, created_at"
)


class OutboxError(RuntimeError):
    """The outbox could not do what was asked; the message says why."""


class OutboxBusy(OutboxError):
    """Another process held the database for longer than the caller may wait."""


class OutboxFull(OutboxError):
    """The file system holding the outbox is full; nothing of the call was stored."""


def _checkpoint_when_full(use_reserve: bool):
    """In WAL mode even a delete needs room in the WAL. When the disk is full, fold the WAL
    into the database and truncate it, then try once more; operations that free space
    (delivering, dead-lettering, dropping) may also spend the reserve file, so the uploader
    can always drain a full disk. Appends never touch the reserve."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except OutboxFull:
                self.checkpoint()
                if use_reserve:
                    self._release_reserve()
            return method(self, *args, **kwargs)

        return wrapper

    return decorate


@dataclass(frozen=True)
class FlaggedItem:
    """What the active-learning step hands to the outbox for one flagged item."""

    asset: bytes
    media_type: str
    model_name: str
    model_version: str
    prediction: Any
    score: float
    strategy: str
    threshold: float
    reason: str
    upload_groups: Sequence[str]


@dataclass
class AppendResult:
    accepted: int = 0
    """Rows queued (one per item and upload group)."""
    duplicates: int = 0
    """(group, hash) pairs already queued, delivered or dead-lettered."""
    dropped: int = 0
    """Rows not queued, or evicted, because the outbox was full."""


@dataclass(frozen=True)
class QueuedItem:
    """One row waiting for delivery, as the uploader sees it."""

    id: int
    upload_group: str
    content_hash: str
    media_type: str
    asset: bytes = field(repr=False)
    model_name: str = ""
    model_version: str = ""
    prediction: Any = None
    score: float = math.nan
    strategy: str = ""
    threshold: float = math.nan
    reason: str = ""
    created_at: float = 0.0
    attempts: int = 0
    last_error: str | None = None

    def metadata(self) -> dict[str, Any]:
        """What sinks store beside the asset."""
        return {
            "prediction": self.prediction,
            "score": None if math.isnan(self.score) else self.score,
            "strategy": self.strategy,
            "threshold": self.threshold,
            "reason": self.reason,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "flagged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
        }


@dataclass(frozen=True)
class GroupStatus:
    upload_group: str
    queued: int
    dead_letters: int
    delivered: int
    oldest_created_at: float | None
    paused: bool


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _score_in(score: float) -> float | None:
    return None if score is None or math.isnan(score) else float(score)


def _score_out(score: float | None) -> float:
    return math.nan if score is None else score


class Outbox:
    """A connection to one outbox file; safe to use from threads and across `fork`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_items: int = 100_000,
        max_bytes: int = 2 * 1024**3,
        overflow_policy: OverflowPolicy = "drop_least_uncertain",
        busy_timeout_s: float = 2.0,
        durable: bool = True,
        reserve_bytes: int = 4 * 1024**2,
        autocheckpoint_pages: int = 16384,
    ) -> None:
        if overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow_policy: expected one of {OVERFLOW_POLICIES}, got {overflow_policy!r}")
        if max_items <= 0 or max_bytes <= 0:
            raise ValueError(f"max_items and max_bytes must be positive, got {max_items} and {max_bytes}")
        self.path = Path(path)
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self.overflow_policy = overflow_policy
        self.busy_timeout_s = busy_timeout_s
        self.durable = durable
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._group_commit: GroupCommit | None = None
        self._unflushed = 0  # the last commit made with wait_durable=False
        self._lock_pid = -1
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._overflow_since_log = 0
        self._overflow_logged_at = 0.0
        # A checkpoint costs milliseconds and SQLite runs it inside whichever commit crosses
        # the threshold: on a writer, that lands in inference latency. The uploader runs a
        # PASSIVE checkpoint after every batch, so writers only ever checkpoint when no
        # uploader is draining and the WAL has grown past this many pages (64 MiB).
        self.autocheckpoint_pages = int(autocheckpoint_pages)
        self.reserve_bytes = int(reserve_bytes)
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._connect()  # fail now, with the path in the message, not at the first append
        self._keep_reserve()

    def _keep_reserve(self) -> None:
        """Hold `reserve_bytes` of disk in a side file, given back when the disk fills up."""
        if self.reserve_bytes <= 0 or self.reserve_path.exists():
            return
        tmp = self.reserve_path.with_name(f"{self.reserve_path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError:
            tmp.unlink(missing_ok=True)  # no room now; try again after the next delivery

    def _release_reserve(self) -> None:
        if self.reserve_path.exists():
            log.warning("outbox %s: the disk is full; releasing the %d-byte reserve to keep draining", self.path, self.reserve_bytes)
            self.reserve_path.unlink(missing_ok=True)

    # Connection management ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # After a fork the parent's connection must not be used (SQLite forbids it): the
        # child opens its own and abandons the inherited one without closing it.
        if not self.path.parent.is_dir():
            raise OutboxError(f"outbox {self.path}: directory {self.path.parent} does not exist")
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL even when durable: `_transaction` flushes the WAL itself, after the
            # commit and outside the writers' lock (group commit).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint_pages}")
            version = self._schema_version(conn)
            if version is None:  # a new file: create the schema (the only write at open)
                conn.executescript(_SCHEMA + f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');")
                version = self._schema_version(conn)
        except sqlite3.OperationalError as e:
            raise self._error(e, "cannot open it as an SQLite outbox") from e
        except sqlite3.DatabaseError as e:
            raise OutboxError(f"outbox {self.path}: cannot open it as an SQLite outbox ({e})") from e
        if version != SCHEMA_VERSION:
            raise OutboxError(f"outbox {self.path}: schema version {version}, this triton-al expects {SCHEMA_VERSION}")
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _error(self, e: sqlite3.OperationalError, doing: str = "") -> OutboxError:
        """The outbox error for an SQLite error: busy, full, or anything else."""
        text = str(e)
        if "locked" in text or "busy" in text:
            return OutboxBusy(f"outbox {self.path}: busy for more than {self.busy_timeout_s} s ({text})")
        if "full" in text:
            return OutboxFull(f"outbox {self.path}: the disk is full ({text})")
        return OutboxError(f"outbox {self.path}: {doing + ' ' if doing else ''}({text})")

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return None
            raise
        return int(row[0]) if row else None

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Serialise writers of all processes on a lock file before SQLite's own lock.

        SQLite's busy handler sleeps 1, 2, 5, 10 … ms when another process holds the write
        lock, and a waiter can starve while others re-acquire; those sleeps land straight in
        inference latency. A blocking `flock` is handed over by the kernel the moment it is
        free. It dies with its holder, so a killed process never leaves it taken."""
        if self._lock_fd is None or self._lock_pid != os.getpid():
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            self._group_commit = GroupCommit(self.path, self._lock_fd)
            self._lock_pid = os.getpid()
        if not flock_within(self._lock_fd, self.busy_timeout_s):
            raise OutboxBusy(f"outbox {self.path}: busy for more than {self.busy_timeout_s} s (writer lock)")
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _transaction(self, *, write: bool = True, wait_durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction; a durable write one is on disk when this returns, unless
        `wait_durable=False` (then call `_wait_durable(self._unflushed)` later)."""
        with self._lock:
            with self._writer_lock() if write else contextlib.nullcontext():
                conn = self._connect()
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                except sqlite3.OperationalError as e:
                    raise self._error(e) from e
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException as e:
                    if conn.in_transaction:  # SQLite may already have rolled back (disk full)
                        conn.execute("ROLLBACK")
                    if isinstance(e, sqlite3.OperationalError):
                        raise self._error(e) from e
                    raise
                seq = self._group_commit.committed() if write and self.durable else 0
            if write and self.durable:  # the writers' lock is free: others commit meanwhile
                if wait_durable:
                    self._wait_durable(seq)
                else:
                    self._unflushed = seq

    def _wait_durable(self, seq: int) -> None:
        try:
            self._group_commit.wait_durable(seq, self.busy_timeout_s)
        except TimeoutError as e:
            raise OutboxBusy(f"outbox {self.path}: committed, but not confirmed on disk: {e}; "
                             "the change is stored, but may not survive a power loss") from e
        except OSError as e:
            raise OutboxError(f"outbox {self.path}: committed, but could not flush the WAL to disk ({e}); "
                              "the change may not survive a power loss") from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                self._group_commit.close()
                os.close(self._lock_fd)
            self._conn = self._lock_fd = self._group_commit = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
        if by:
            conn.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # Writers (the active-learning step) --------------------------------------------

    def append(self, item: FlaggedItem) -> AppendResult:
        return self.append_many([item])

    @_checkpoint_when_full(use_reserve=False)
    def append_many(self, items: Iterable[FlaggedItem]) -> AppendResult:
        """Queue flagged items, one row per upload group; durable when this returns.

        Raises `OutboxBusy` when the database stays locked longer than `busy_timeout_s`,
        `OutboxError` for anything else (disk full, corrupt file); either way nothing of
        this call was stored, and the file is unchanged."""
        prepared = []
        for item in items:
            if not isinstance(item.asset, (bytes, bytearray)) or not item.asset:
                raise ValueError("asset: expected non-empty bytes")
            groups = [validate_group_name(g) for g in item.upload_groups]
            if not groups:
                raise ValueError("upload_groups: expected at least one group")
            try:
                prediction = json.dumps(item.prediction, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"prediction: not JSON-serialisable ({e})") from e
            prepared.append((item, content_hash(bytes(item.asset)), groups, prediction))
        result = AppendResult()
        if not prepared:
            return result
        now = time.time()
        try:
            with self._transaction() as conn:
                for item, digest, groups, prediction in prepared:
                    for group in dict.fromkeys(groups):
                        self._append_one(conn, item, digest, group, prediction, now, result)
                self._bump(conn, "appended", result.accepted)
                self._bump(conn, "duplicates", result.duplicates)
                self._bump(conn, "dropped_overflow", result.dropped)
        except OutboxError:
            raise
        except sqlite3.DatabaseError as e:  # I/O error, corrupt file
            raise OutboxError(f"outbox {self.path}: could not append ({e})") from e
        if result.dropped:
            self._log_overflow(result.dropped)
        return result

    def _append_one(self, conn, item: FlaggedItem, digest: str, group: str, prediction: str, now: float, result: AppendResult) -> None:
        seen = conn.execute(
            "SELECT 1 FROM items WHERE upload_group = ?1 AND content_hash = ?2 "
            "UNION ALL SELECT 1 FROM delivered WHERE upload_group = ?1 AND content_hash = ?2 "
            "UNION ALL SELECT 1 FROM dead_letters WHERE upload_group = ?1 AND content_hash = ?2 LIMIT 1",
            (group, digest),
        ).fetchone()
        if seen:
            result.duplicates += 1
            return
        have_asset = conn.execute("SELECT 1 FROM assets WHERE content_hash = ?", (digest,)).fetchone() is not None
        new_bytes = 0 if have_asset else len(item.asset)
        score = _score_in(item.score)
        if not self._make_room(conn, new_bytes, score, digest):
            result.dropped += 1
            return
        if not have_asset:
            conn.execute(
                "INSERT INTO assets VALUES (?, ?, ?, ?)", (digest, item.media_type, len(item.asset), bytes(item.asset))
            )
        conn.execute(
            f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (group, digest, item.model_name, str(item.model_version), prediction, score, item.strategy,
             float(item.threshold), item.reason, now),
        )
        result.accepted += 1

    def _make_room(self, conn, new_bytes: int, score: float | None, digest: str) -> bool:
        """True when one more row (and `new_bytes`) fits, after evicting per the policy."""
        if new_bytes > self.max_bytes:
            return False
        while True:
            items = self._counter(conn, "queued_items")
            stored = self._counter(conn, "stored_bytes")
            if items + 1 <= self.max_items and stored + new_bytes <= self.max_bytes:
                return True
            if self.overflow_policy == "drop_newest":
                return False
            # drop_least_uncertain: evict the most confident queued item if the newcomer is
            # less confident (NaN = invalid output counts as least confident of all).
            victim = conn.execute(
                "SELECT id, score FROM items WHERE score IS NOT NULL AND content_hash != ? "
                "ORDER BY score DESC, id DESC LIMIT 1",
                (digest,),
            ).fetchone()
            if victim is None or (score is not None and victim[1] <= score):
                return False
            conn.execute("DELETE FROM items WHERE id = ?", (victim[0],))
            self._bump(conn, "evicted_overflow")

    def _log_overflow(self, dropped: int) -> None:
        self._overflow_since_log += dropped
        now = time.monotonic()
        if now - self._overflow_logged_at >= OVERFLOW_LOG_INTERVAL_S:
            log.warning(
                "outbox %s is full (cap %d items / %d bytes, policy %s): %d items dropped since the last report",
                self.path, self.max_items, self.max_bytes, self.overflow_policy, self._overflow_since_log,
            )
            self._overflow_since_log = 0
            self._overflow_logged_at = now

    # The uploader -------------------------------------------------------------------

    def due(self, limit: int, *, now: float | None = None, exclude_groups: Iterable[str] = (), ignore_backoff: bool = False) -> list[QueuedItem]:
        """The oldest items ready for (another) delivery attempt, skipping paused groups."""
        now = time.time() if now is None else now
        excluded = list(exclude_groups)
        marks = ",".join("?" * len(excluded))
        where = "i.upload_group NOT IN (SELECT upload_group FROM paused_groups)"
        if excluded:
            where += f" AND i.upload_group NOT IN ({marks})"
        if not ignore_backoff:
            where += " AND i.next_attempt_at <= ?"
        params: list[Any] = [*excluded] + ([] if ignore_backoff else [now]) + [int(limit)]
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT i.id, i.upload_group, i.content_hash, a.media_type, a.data, i.model_name, i.model_version, "
                f"i.prediction, i.score, i.strategy, i.threshold, i.reason, i.created_at, i.attempts, i.last_error "
                f"FROM items i JOIN assets a USING (content_hash) WHERE {where} ORDER BY i.id LIMIT ?",
                params,
            ).fetchall()
        return [
            QueuedItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], json.loads(r[7]), _score_out(r[8]),
                       r[9], r[10], r[11], r[12], r[13], r[14])
            for r in rows
        ]

    def mark_delivered(self, ids: Sequence[int], *, now: float | None = None) -> int:
        """Forget delivered items (remembering their hash for dedup); returns how many.

        Done in chunks of `RELEASE_CHUNK` rows, each its own short transaction, so that
        writers on the inference path never wait behind a whole batch, and flushed to disk
        once at the end rather than once per chunk."""
        now = time.time() if now is None else now
        done = 0
        remaining = list(ids)
        while remaining:
            chunk = remaining[:RELEASE_CHUNK]
            try:
                done += self._mark_delivered(chunk, now)
            except OutboxFull:
                # A full disk: spend the reserve on everything left in one transaction.
                self.checkpoint()
                self._release_reserve()
                done += self._mark_delivered(remaining, now)
                break
            remaining = remaining[len(chunk):]
        if done:
            if self.durable:
                with self._lock:
                    self._wait_durable(self._unflushed)
            self._keep_reserve()
        return done

    def _mark_delivered(self, ids: list[int], now: float) -> int:
        marks = ",".join("?" * len(ids))
        with self._transaction(wait_durable=False) as conn:
            conn.execute(
                f"INSERT OR IGNORE INTO delivered SELECT upload_group, content_hash, ? FROM items WHERE id IN ({marks})",
                [now, *ids],
            )
            done = conn.execute(f"DELETE FROM items WHERE id IN ({marks})", ids).rowcount
            self._bump(conn, "uploaded", done)
        return done

    @_checkpoint_when_full(use_reserve=False)
    def mark_failed(self, failures: Sequence[tuple[int, str, float]]) -> None:
        """Record a failed attempt per (id, error, next_attempt_at)."""
        if not failures:
            return
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE items SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
                [(error[:2000], next_at, item_id) for item_id, error, next_at in failures],
            )
            self._bump(conn, "retries", len(failures))

    @_checkpoint_when_full(use_reserve=True)
    def dead_letter(self, failures: Sequence[tuple[int, str]], *, now: float | None = None) -> None:
        """Move items a sink rejected for good to the dead letters, with the reason."""
        if not failures:
            return
        now = time.time() if now is None else now
        with self._transaction() as conn:
            for item_id, error in failures:
                conn.execute(
                    f"INSERT OR REPLACE INTO dead_letters (id, {_ITEM_COLUMNS}, attempts, failed_at, error) "
                    f"SELECT id, {_ITEM_COLUMNS}, attempts + 1, ?, ? FROM items WHERE id = ?",
                    (now, error[:2000], item_id),
                )
                conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
            self._bump(conn, "dead_lettered", len(failures))

    @_checkpoint_when_full(use_reserve=True)
    def drop(self, ids: Sequence[int], counter: str) -> None:
        """Remove items without delivering them (e.g. over a group's budget), counted."""
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
            self._bump(conn, counter, len(ids))

    def delivered_since(self, group: str, since: float) -> int:
        with self._transaction(write=False) as conn:
            return conn.execute(
                "SELECT count(*) FROM delivered WHERE upload_group = ? AND delivered_at >= ?", (group, since)
            ).fetchone()[0]

    # Administration -----------------------------------------------------------------

    @_checkpoint_when_full(use_reserve=False)
    def retry_dead_letters(self, *, group: str | None = None, ids: Sequence[int] | None = None) -> int:
        """Queue dead letters again (all, one group's, or the given ids); returns how many."""
        where, params = "1", []
        if group is not None:
            where, params = "upload_group = ?", [group]
        if ids is not None:
            where += f" AND id IN ({','.join('?' * len(ids))})"
            params += list(ids)
        with self._transaction() as conn:
            n = conn.execute(
                f"INSERT OR IGNORE INTO items (id, {_ITEM_COLUMNS}) SELECT id, {_ITEM_COLUMNS} FROM dead_letters WHERE {where}",
                params,
            ).rowcount
            conn.execute(f"DELETE FROM dead_letters WHERE {where}", params)
            self._bump(conn, "dead_letters_retried", n)
        return n

    def dead_letters(self, *, group: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        with self._transaction(write=False) as conn:
            cur = conn.execute(
                "SELECT id, upload_group, content_hash, model_version, score, reason, attempts, failed_at, error "
                "FROM dead_letters WHERE ?1 IS NULL OR upload_group = ?1 ORDER BY id LIMIT ?2",
                (group, limit),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    @_checkpoint_when_full(use_reserve=False)
    def set_paused(self, groups: Iterable[str], paused: bool) -> None:
        with self._transaction() as conn:
            for group in groups:
                if paused:
                    conn.execute("INSERT OR IGNORE INTO paused_groups VALUES (?)", (validate_group_name(group),))
                else:
                    conn.execute("DELETE FROM paused_groups WHERE upload_group = ?", (group,))

    def paused_groups(self) -> set[str]:
        with self._transaction(write=False) as conn:
            return {r[0] for r in conn.execute("SELECT upload_group FROM paused_groups")}

    def status(self) -> list[GroupStatus]:
        with self._transaction(write=False) as conn:
            queued = {g: (n, oldest) for g, n, oldest in conn.execute(
                "SELECT upload_group, count(*), min(created_at) FROM items GROUP BY upload_group")}
            dead = dict(conn.execute("SELECT upload_group, count(*) FROM dead_letters GROUP BY upload_group").fetchall())
            delivered = dict(conn.execute("SELECT upload_group, count(*) FROM delivered GROUP BY upload_group").fetchall())
            paused = {r[0] for r in conn.execute("SELECT upload_group FROM paused_groups")}
        groups = sorted(set(queued) | set(dead) | set(delivered) | paused)
        return [
            GroupStatus(g, queued.get(g, (0, None))[0], dead.get(g, 0), delivered.get(g, 0), queued.get(g, (0, None))[1], g in paused)
            for g in groups
        ]

    def counters(self) -> dict[str, int]:
        with self._transaction(write=False) as conn:
            return {name: int(value) for name, value in conn.execute("SELECT name, value FROM counters")}

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the WAL into the database file (TRUNCATE: and empty it); best effort.
        The uploader runs a PASSIVE one after each batch so that writers, on the
        inference path, rarely pay for an automatic checkpoint."""
        if mode not in ("PASSIVE", "TRUNCATE"):
            raise ValueError(f"checkpoint mode: expected PASSIVE or TRUNCATE, got {mode!r}")
        with self._lock:
            try:
                self._connect().execute(f"PRAGMA wal_checkpoint({mode})")
            except sqlite3.DatabaseError as e:
                log.warning("outbox %s: checkpoint failed (%s)", self.path, e)

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` verdict ('ok' when the file is sound)."""
        with self._lock:
            rows = self._connect().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(r[0] for r in rows)
