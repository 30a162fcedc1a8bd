"""The durable outbox: flagged items wait here until a sink confirms them.

One SQLite file in WAL mode. Every append goes through the one outbox writer of its process,
`triton_al._core.OutboxWriter` (Rust, `rust/outbox`; the native Triton backend appends with
the same code): a writer thread commits every append waiting at that moment in one
transaction and, when durable, flushes the WAL once for them after releasing the write lock.
An append is durable when it returns; with `durable=False` it is committed (in the operating
system: it survives any process kill, not a power loss). The rest of this module is the
uploader's side: due items, deliveries, retries, dead letters, status. Its own writes commit
at `synchronous=NORMAL` and flush the WAL after the commit the same way.

Several processes may write the file at once (the Python step runs one process per model
instance, the uploader is another): SQLite's write lock orders them. The file is bounded by
a cap on items and on asset bytes, with an overflow policy; items are deduplicated per
upload group by the SHA-256 of the asset, including against items already delivered. The
schema is the writer's (`triton_al._core.OUTBOX_SCHEMA`, from `rust/outbox/src/schema.sql`).

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

from triton_al import _core
from triton_al.config import validate_group_name

log = logging.getLogger("triton_al.outbox")

OverflowPolicy = Literal["drop_newest", "drop_least_uncertain"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop_newest", "drop_least_uncertain")
SCHEMA_VERSION = _core.OUTBOX_SCHEMA_VERSION
OVERFLOW_LOG_INTERVAL_S = 60.0
RELEASE_CHUNK = 16

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
    (delivering, dead-lettering, dropping) may first spend the reserve file, so the uploader
    can always drain a full disk. Appends never touch the reserve."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except OutboxFull:
                self._make_room(use_reserve)
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
    refused: int = 0
    """Rows not queued because the asset is bigger than `max_asset_bytes`."""


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


_INHERITED_WRITERS: list[Any] = []


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
        max_asset_bytes: int = 32 * 1024**2,
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
        self.max_asset_bytes = int(max_asset_bytes)
        self._lock = threading.Lock()
        self._writer: Any = None  # the Rust writer, made at the first append (per process)
        self._writer_pid = -1
        self._wal: tuple[int, tuple[int, int]] | None = None  # (fd, (dev, ino)) of the -wal file
        self._unflushed = False  # a commit made with wait_durable=False, not flushed yet
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

    def _make_room(self, use_reserve: bool) -> None:
        """On a full disk: give back the reserve (if allowed), then fold the WAL into the
        database. In that order: the WAL's last frames may extend the database, so the
        checkpoint itself needs a little room."""
        if use_reserve:
            self._release_reserve()
        self.checkpoint()

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
            conn.execute(f"PRAGMA page_size={_core.OUTBOX_PAGE_SIZE}")  # a new file only (see rust/outbox)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL even when durable: `_transaction` flushes the WAL itself, after the
            # commit, when the write lock is free again.
            conn.execute("PRAGMA synchronous=NORMAL")
            # Debian's SQLite zeroes every freed page (SECURE_DELETE): delivering an item then
            # wrote 10.4 KB to the WAL instead of 4.9 KB (measured, 4 KB assets; FAST gave the
            # same 10.4), and draining a full disk needs that much room. Delivered bytes stay in
            # free pages until reused: the file is private to its owner.
            conn.execute("PRAGMA secure_delete=OFF")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint_pages}")
            version = self._schema_version(conn)
            if version is None:  # a new file: create the schema (the only write at open)
                conn.executescript(_core.OUTBOX_SCHEMA + f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');")
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
    def _transaction(self, *, write: bool = True, wait_durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction; a durable write one is on disk when this returns, unless
        `wait_durable=False` (then call `_flush()` later). Writers of other processes are
        waited for by SQLite's busy handler, up to `busy_timeout_s`."""
        with self._lock:
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
            if write and self.durable:  # the write lock is free: others commit meanwhile
                self._unflushed = True
                if wait_durable:
                    self._flush()

    def _flush(self) -> None:
        """fdatasync the WAL (under `self._lock`): every commit made before is then on disk."""
        if not self._unflushed:
            return
        wal = f"{self.path}-wal"
        try:
            st = os.stat(wal)
            identity = (st.st_dev, st.st_ino)
            if self._wal is None or self._wal[1] != identity:
                if self._wal is not None:
                    os.close(self._wal[0])
                self._wal = (os.open(wal, os.O_RDONLY), identity)
            os.fdatasync(self._wal[0])
        except OSError as e:
            raise OutboxError(f"outbox {self.path}: committed, but could not flush the WAL to disk ({e}); "
                              "the change may not survive a power loss") from e
        self._unflushed = False

    def _append_writer(self):
        """This process's Rust writer (a forked child makes its own)."""
        if self._writer is not None and self._writer_pid != os.getpid():
            # Inherited through fork: its thread does not exist here, and dropping it would
            # wait for that thread. Keep it, unused, for the life of the process.
            _INHERITED_WRITERS.append(self._writer)
            self._writer = None
        if self._writer is None:
            self._writer = _core.OutboxWriter(
                str(self.path), max_items=self.max_items, max_bytes=self.max_bytes, overflow_policy=self.overflow_policy,
                durable=self.durable, busy_timeout_s=self.busy_timeout_s, max_asset_bytes=self.max_asset_bytes,
            )
            self._writer_pid = os.getpid()
        return self._writer

    def writer_stats(self) -> dict[str, int]:
        """This process's appends so far: transactions, WAL flushes and appends stored."""
        transactions, flushes, appends = self._append_writer().stats()
        return {"transactions": transactions, "flushes": flushes, "appends": appends}

    def close(self) -> None:
        with self._lock:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            if self._wal is not None:
                os.close(self._wal[0])
            self._conn = self._writer = self._wal = None

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

    # Writers (the active-learning step) --------------------------------------------

    def append(self, item: FlaggedItem) -> AppendResult:
        return self.append_many([item])

    def append_many(self, items: Iterable[FlaggedItem]) -> AppendResult:
        """Queue flagged items, one row per upload group; durable when this returns.

        Raises `OutboxBusy` when the database stays locked longer than `busy_timeout_s`,
        `OutboxFull` when the disk is full, `OutboxError` for anything else (a corrupt
        file), ValueError for a bad item; in every case nothing of this call was stored."""
        rows = []
        for item in items:
            if not isinstance(item.asset, (bytes, bytearray)) or not item.asset:
                raise ValueError("asset: expected non-empty bytes")
            prediction = item.prediction
            if not isinstance(prediction, str):
                try:
                    prediction = json.dumps(prediction, separators=(",", ":"), allow_nan=False)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"prediction: not JSON-serialisable ({e})") from e
            score = math.nan if item.score is None else float(item.score)
            rows.append((bytes(item.asset), item.media_type, item.model_name, str(item.model_version), prediction, score,
                         item.strategy, float(item.threshold), item.reason, list(item.upload_groups)))
        if not rows:
            return AppendResult()
        # The Rust writer checkpoints and retries once on a full disk, like the uploader.
        accepted, duplicates, dropped, refused = self._append_writer().append(rows, self.busy_timeout_s + 5.0)
        result = AppendResult(accepted, duplicates, dropped, refused)
        if result.dropped:
            self._log_overflow(result.dropped)
        return result

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
        stuck = draining = False
        while remaining:
            chunk = remaining[:RELEASE_CHUNK]
            try:
                done += self._mark_delivered(chunk, now)
            except OutboxFull:
                # A full disk: spend the reserve and fold the WAL into the database, then go
                # on chunk by chunk, folding after each one while there is still room for
                # the checkpoint itself (it may extend the database by a few pages); give up
                # when that frees nothing for the same chunk twice.
                if stuck:
                    raise
                self._make_room(use_reserve=True)
                stuck = draining = True
                continue
            stuck = False
            remaining = remaining[len(chunk):]
            if draining:
                self.checkpoint()
        if done:
            with self._lock:
                self._flush()
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
