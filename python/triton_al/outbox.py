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
a cap on items and on bytes (the assets, and each queued row's embedding), with an overflow
policy; items are deduplicated per upload group by the SHA-256 of the asset, including
against items already delivered. The schema is the writer's (`triton_al._core.OUTBOX_SCHEMA`,
from `rust/outbox/src/schema.sql` and `embedding_bytes.sql`).

Tables:
- `assets`: the asset bytes, once per content hash, however many groups want them;
- `items`: one row per (upload group, content hash) still to deliver, with the
  prediction, score, retry state and, when the step was given one (`embedding_input`), the
  model's embedding of the item (`embedding`: little-endian float32 bytes, NULL when none);
- `dead_letters`: items a sink rejected for good (retryable by command; purged by age,
  count and bytes; their assets and embeddings count in `dead_letter_bytes`, not in the
  `max_bytes` cap);
- `delivered`: (group, hash, time) of what was delivered, for dedup and rate limits
  (trimmed by age and count, never inside the longest rate window);
- `meta`: the schema version (2; a version-1 file gains the `embedding` columns when it is
  opened, see `migrate_schema`), and the sink the outbox delivers to (dedup is per outbox);
- `counters`: totals kept by triggers and by each transaction (appended, duplicates,
  dropped, uploaded, retries…), so every process sees the same numbers;
- `paused_groups`: groups the uploader must not touch (survives restarts).
"""

from __future__ import annotations

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

import numpy as np

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
    "threshold, reason, created_at, embedding"
)
# What builds a QueuedItem (`_queued_item`), from `items i JOIN assets a`.
_QUEUED_COLUMNS = (
    "i.id, i.upload_group, i.content_hash, a.media_type, a.data, i.model_name, i.model_version, "
    "i.prediction, i.score, i.strategy, i.threshold, i.reason, i.created_at, i.attempts, i.last_error, i.embedding"
)
# Older schema versions opening migrates, each to the next: {version: [(table, column
# definition) added]}, the writer's own list (`MIGRATIONS` in rust/outbox/src/lib.rs; 1 -> 2:
# the `embedding` columns of items and dead letters).
_MIGRATIONS: dict[int, list[tuple[str, str]]] = _core.OUTBOX_MIGRATIONS
# What opening a file of `SCHEMA_VERSION` adds when it lacks it (the writer's `UPGRADES`):
# [(trigger whose absence says so, idempotent statements creating it, statements run once
# right after)]; today the triggers counting embedding bytes, added to version 2 after its
# first files, and the count of the embeddings those files already hold.
_UPGRADES: list[tuple[str, str, str]] = _core.OUTBOX_UPGRADES
# Indexes for the uploader's queries, created at its start (IF NOT EXISTS: no schema version
# change, and nothing on the inference path: the writer never inserts into these tables).
_UPLOADER_INDEXES = (
    "CREATE INDEX IF NOT EXISTS delivered_by_age ON delivered (delivered_at)",
    "CREATE INDEX IF NOT EXISTS dead_by_age ON dead_letters (failed_at)",
)
_META_SINK = "sink"
_META_DEAD_BYTES = "dead_letter_bytes_counted"
_META_DELIVERED_COUNTS = "delivered_counts"
# Per-group delivery totals live in `counters` under this prefix ('0' follows '/').
_DELIVERED_PREFIX, _DELIVERED_END = "delivered/", "delivered0"


class OutboxError(RuntimeError):
    """The outbox could not do what was asked; the message says why."""


class OutboxBusy(OutboxError):
    """Another process held the database for longer than the caller may wait."""


class OutboxFull(OutboxError):
    """The file system holding the outbox is full; nothing of the call was stored."""


class SinkChanged(OutboxError):
    """The outbox delivered to another sink than the one it is now asked to deliver to."""

    def __init__(self, path: Path, recorded: str, wanted: str, delivered: int) -> None:
        self.recorded, self.wanted, self.delivered = recorded, wanted, delivered
        super().__init__(
            f"outbox {path} delivered {delivered} items to {recorded}, not to {wanted}: it remembers those to deduplicate, "
            f"so images already delivered to {recorded} would never reach {wanted}. Pass --forget-deliveries to clear "
            f"those records (images flagged from now on all go to {wanted}), or use a new outbox file."
        )


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
    embedding: Any = None
    """The model's embedding of the item (any 1-D sequence of 1 to 4096 finite numbers,
    stored as float32), or None."""


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
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The model's embedding of the item (float32, 1-D), or None when the step stored none
    (no `embedding_input`, or the model's embedding held NaN or Inf)."""

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


def _embedding_out(blob: bytes | None) -> np.ndarray | None:
    """An `embedding` column (little-endian float32 bytes) as a float32 array; None for NULL.
    A blob that cannot be float32 values (a hand-edited file) counts as no embedding."""
    if blob is None:
        return None
    if not isinstance(blob, bytes) or not blob or len(blob) % 4:
        log.warning("outbox: an embedding stored as %s of length %d is not float32 values; ignored", type(blob).__name__, len(blob))
        return None
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _missing_upgrades(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """The upgrades (`_UPGRADES`) the file lacks."""
    return [u for u in _UPGRADES
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (u[0],)).fetchone() is None]


def migrate_schema(conn: sqlite3.Connection) -> int | None:
    """Bring an older outbox file (a version in `_MIGRATIONS`) to `SCHEMA_VERSION`, and a file
    of that version to its upgrades (`_UPGRADES`), in one IMMEDIATE transaction: the version
    and the upgrades are read again under the write lock, so of several processes opening the
    same old file at once the first migrates and the others find it done. A column already
    there is not added again, an upgrade present is not run again (its once-only statements
    neither). Returns the version the file has after (one this module does not know is left
    as it is, for the caller to refuse)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = before = Outbox._schema_version(conn)
        if version in _MIGRATIONS:
            while version in _MIGRATIONS:
                for table, column in _MIGRATIONS[version]:
                    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                    if column.split()[0] not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                version += 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        upgraded = []
        if version == SCHEMA_VERSION:
            for name, create, once in _missing_upgrades(conn):
                # Statement by statement: executescript would commit the transaction.
                for statement in _statements(create + once):
                    conn.execute(statement)
                upgraded.append(name)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if version != before:
        log.info("outbox: schema version %s migrated to %s", before, version)
    if upgraded:
        log.info("outbox: schema version %s upgraded (%s added)", version, ", ".join(upgraded))
    return version


def _statements(script: str) -> list[str]:
    """A script's statements, each whole (a trigger's body included), for `execute`."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current)
            current = ""
    if current.strip():
        statements.append(current)
    return statements


def _queued_item(r: Sequence[Any]) -> QueuedItem:
    """A row of `_QUEUED_COLUMNS` as a QueuedItem."""
    return QueuedItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], json.loads(r[7]), _score_out(r[8]),
                      r[9], r[10], r[11], r[12], r[13], r[14], _embedding_out(r[15]))


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
        max_invalid_share: float = 0.1,
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
        self.max_invalid_share = float(max_invalid_share)
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
        # Retried while busy, for up to busy_timeout_s: switching a new file to WAL upgrades a
        # read lock, which SQLite fails at once (no busy handler) while another connection
        # reads the file, so two processes opening one new outbox together failed one of them
        # now and then (tests/test_outbox.py). Every step of opening is idempotent.
        deadline = time.monotonic() + self.busy_timeout_s
        attempt = 0
        while True:
            try:
                conn = self._open_connection()
                break
            except OutboxBusy:
                if time.monotonic() >= deadline:
                    raise
                attempt += 1
                time.sleep(min(0.001 * attempt, 0.02))
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open_connection(self) -> sqlite3.Connection:
        """A new connection with the outbox's settings, its schema created or migrated."""
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise OutboxError(f"outbox {self.path}: cannot open it as an SQLite outbox ({e})") from e
        try:
            version = self._set_up(conn)
        except BaseException:
            conn.close()
            raise
        if version != SCHEMA_VERSION:
            conn.close()
            raise OutboxError(f"outbox {self.path}: schema version {version}, this triton-al expects {SCHEMA_VERSION}")
        return conn

    def _set_up(self, conn: sqlite3.Connection) -> int | None:
        """Settings, then the schema: created on a new file, migrated on an older one."""
        try:
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
            elif version in _MIGRATIONS or (version == SCHEMA_VERSION and _missing_upgrades(conn)):
                version = migrate_schema(conn)
        except sqlite3.OperationalError as e:
            raise self._error(e, "cannot open it as an SQLite outbox") from e
        except sqlite3.DatabaseError as e:
            raise OutboxError(f"outbox {self.path}: cannot open it as an SQLite outbox ({e})") from e
        return version

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
            except sqlite3.DatabaseError as e:
                raise OutboxError(f"outbox {self.path}: unusable ({e})") from e
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:  # SQLite may already have rolled back (disk full)
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError):
                    raise self._error(e) from e
                if isinstance(e, sqlite3.DatabaseError):  # e.g. "database disk image is malformed"
                    raise OutboxError(f"outbox {self.path}: unusable ({e})") from e
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
                max_invalid_share=self.max_invalid_share,
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
        file), ValueError for a bad item (an embedding that is not 1 to 4096 finite numbers
        too); in every case nothing of this call was stored."""
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
            # The embedding (any 1-D numbers) is converted and checked by the writer.
            rows.append((bytes(item.asset), item.media_type, item.model_name, str(item.model_version), prediction, score,
                         item.strategy, float(item.threshold), item.reason, list(item.upload_groups), item.embedding))
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
    #
    # Clocks: `next_attempt_at`, `delivered_at` and `failed_at` are wall-clock times (they
    # outlive the process), so every reader survives a clock step: a retry time further
    # ahead than `max_delay_s` (the longest backoff) is due now, and a delivery or failure
    # dated in the future counts as now (`clamp_future`).
    #
    # Bytes: `stored_bytes` (what the writer's `max_bytes` cap counts) holds the assets of
    # queued items only, and the embedding of every queued row; an asset referenced by a
    # dead letter, and every dead letter's embedding, is counted in `dead_letter_bytes`
    # instead, bounded by `purge_dead_letters`, so rejected items can never starve new ones.
    # Asset bytes move between the two in the transactions below; embedding bytes are moved
    # by the schema's triggers (a move is an INSERT into one table and a DELETE from the other).

    def prepare_for_uploader(self) -> None:
        """What the uploader needs beyond the writer's schema, once at its start: indexes for
        the queries it runs (created if missing; no schema change) and the byte accounting of
        dead letters (files written before it counted them in `stored_bytes`)."""
        with self._transaction() as conn:
            for statement in _UPLOADER_INDEXES:
                conn.execute(statement)
            self._account_dead_letters(conn)
            self._count_deliveries(conn)

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def _account_dead_letters(self, conn: sqlite3.Connection) -> None:
        """Once per file: move the bytes of dead letters' assets from `stored_bytes` to
        `dead_letter_bytes` (every later change keeps both exact, incrementally), each with
        its rows' embeddings."""
        if self._meta(conn, _META_DEAD_BYTES) is not None:
            return
        queued, dead = conn.execute(
            "SELECT coalesce(sum(CASE WHEN d IS NULL THEN size END), 0) + (SELECT coalesce(sum(length(embedding)), 0) FROM items), "
            "coalesce(sum(CASE WHEN d IS NOT NULL THEN size END), 0) + (SELECT coalesce(sum(length(embedding)), 0) FROM dead_letters) "
            "FROM (SELECT a.size, (SELECT 1 FROM dead_letters WHERE content_hash = a.content_hash LIMIT 1) AS d FROM assets a)"
        ).fetchone()
        for name, value in (("stored_bytes", queued), ("dead_letter_bytes", dead)):
            conn.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))
        self._set_meta(conn, _META_DEAD_BYTES, "1")

    def _count_deliveries(self, conn: sqlite3.Connection) -> None:
        """Once per file: per-group delivery totals from the `delivered` rows (later kept by
        `mark_delivered`, so that `status` never counts the rows)."""
        if self._meta(conn, _META_DELIVERED_COUNTS) is not None:
            return
        for group, n in conn.execute("SELECT upload_group, count(*) FROM delivered GROUP BY upload_group").fetchall():
            conn.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (_DELIVERED_PREFIX + group, n))
        self._set_meta(conn, _META_DELIVERED_COUNTS, "1")

    def _due_where(self, now: float, exclude_groups: Iterable[str], ignore_backoff: bool, max_delay_s: float | None) -> tuple[str, list[Any]]:
        excluded = list(exclude_groups)
        where = "i.upload_group NOT IN (SELECT upload_group FROM paused_groups)"
        params: list[Any] = []
        if excluded:
            where += f" AND i.upload_group NOT IN ({','.join('?' * len(excluded))})"
            params += excluded
        if not ignore_backoff:
            if max_delay_s is None:
                where += " AND i.next_attempt_at <= ?"
                params.append(now)
            else:  # a retry time beyond the longest backoff comes from a clock that stepped back
                where += " AND (i.next_attempt_at <= ? OR i.next_attempt_at > ?)"
                params += [now, now + max_delay_s]
        return where, params

    def due(self, limit: int, *, now: float | None = None, exclude_groups: Iterable[str] = (), ignore_backoff: bool = False,
            max_bytes: int | None = None, max_delay_s: float | None = None) -> list[QueuedItem]:
        """The oldest items ready for (another) delivery attempt, skipping paused groups: at
        most `limit` items and, when given, `max_bytes` of assets (at least one item, however
        big). `max_delay_s`: the longest retry delay; a retry time further ahead than that
        (the wall clock stepped back) is due now."""
        now = time.time() if now is None else now
        where, params = self._due_where(now, exclude_groups, ignore_backoff, max_delay_s)
        with self._transaction(write=False) as conn:
            sized = conn.execute(
                f"SELECT i.id, a.size FROM items i JOIN assets a USING (content_hash) WHERE {where} ORDER BY i.id LIMIT ?",
                [*params, int(limit)],
            ).fetchall()
            chosen, total = [], 0
            for item_id, size in sized:
                if chosen and max_bytes is not None and total + size > max_bytes:
                    break
                chosen.append(item_id)
                total += size
            if not chosen:
                return []
            rows = conn.execute(
                f"SELECT {_QUEUED_COLUMNS} "
                f"FROM items i JOIN assets a USING (content_hash) WHERE i.id IN ({','.join('?' * len(chosen))}) ORDER BY i.id",
                chosen,
            ).fetchall()
        return [_queued_item(r) for r in rows]

    def selection_candidates(self, group: str, limit: int, *, now: float | None = None, ignore_backoff: bool = False,
                             max_delay_s: float | None = None, with_assets: bool = True,
                             with_embeddings: bool = False) -> list[tuple]:
        """The due items of one group (not paused) as (id, score, content hash, asset or None),
        the `limit` lowest scores first (no score last, then the oldest): the candidates
        `--selection` chooses among when the group's budget binds. With `with_embeddings`,
        each tuple has two more: the item's embedding (float32 1-D) or None, and the model
        that computed it as "name/version" (embeddings of different models do not compare)."""
        now = time.time() if now is None else now
        where, params = self._due_where(now, (), ignore_backoff, max_delay_s)
        data = "a.data" if with_assets else "NULL"
        embedding = "i.embedding, i.model_name || '/' || i.model_version" if with_embeddings else "NULL, NULL"
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT i.id, i.score, i.content_hash, {data}, {embedding} FROM items i JOIN assets a USING (content_hash) "
                f"WHERE i.upload_group = ? AND {where} ORDER BY i.score IS NULL, i.score, i.id LIMIT ?",
                [group, *params, int(limit)],
            ).fetchall()
        if with_embeddings:
            return [(r[0], _score_out(r[1]), r[2], None if r[3] is None else bytes(r[3]), _embedding_out(r[4]), r[5])
                    for r in rows]
        return [(r[0], _score_out(r[1]), r[2], None if r[3] is None else bytes(r[3])) for r in rows]

    def queued_items(self, ids: Sequence[int]) -> list[QueuedItem]:
        """The queued items with these ids, in the order given (ids no longer queued are left out)."""
        if not ids:
            return []
        found: dict[int, QueuedItem] = {}
        with self._transaction(write=False) as conn:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                for r in conn.execute(
                    f"SELECT {_QUEUED_COLUMNS} "
                    f"FROM items i JOIN assets a USING (content_hash) WHERE i.id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    found[r[0]] = _queued_item(r)
        return [found[i] for i in ids if i in found]

    def next_attempt_at(self, *, now: float | None = None, exclude_groups: Iterable[str] = (), max_delay_s: float | None = None) -> float | None:
        """When the next queued item (of a group neither paused nor excluded) is due: `now`
        if one is due already, None when there is none at all."""
        now = time.time() if now is None else now
        where, params = self._due_where(now, exclude_groups, True, None)
        with self._transaction(write=False) as conn:
            (first,) = conn.execute(f"SELECT min(i.next_attempt_at) FROM items i WHERE {where}", params).fetchone()
        if first is None:
            return None
        if first <= now or (max_delay_s is not None and first > now + max_delay_s):
            return now
        return float(first)

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
            per_group = conn.execute(f"SELECT upload_group, count(*) FROM items WHERE id IN ({marks}) GROUP BY upload_group", ids).fetchall()
            done = conn.execute(f"DELETE FROM items WHERE id IN ({marks})", ids).rowcount
            self._bump(conn, "uploaded", done)
            for group, n in per_group:
                self._bump(conn, _DELIVERED_PREFIX + group, n)
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

    @_checkpoint_when_full(use_reserve=False)
    def note_sink_failure(self, ids: Sequence[int], error: str) -> None:
        """The whole sink failed while these items were in flight: record the error (and
        count the retry) without spending an attempt of theirs and without delaying them:
        the uploader backs off the sink as a whole."""
        if not ids:
            return
        with self._transaction() as conn:
            conn.execute(f"UPDATE items SET last_error = ? WHERE id IN ({','.join('?' * len(ids))})", [error[:2000], *ids])
            self._bump(conn, "retries", len(ids))

    @_checkpoint_when_full(use_reserve=False)
    def retry_now(self, *, now: float | None = None) -> int:
        """Make every item waiting for a retry due now (one extra attempt, e.g. on a flush)."""
        now = time.time() if now is None else now
        with self._transaction() as conn:
            return conn.execute("UPDATE items SET next_attempt_at = 0 WHERE next_attempt_at > ?", (now,)).rowcount

    @_checkpoint_when_full(use_reserve=True)
    def dead_letter(self, failures: Sequence[tuple[int, str]], *, now: float | None = None) -> None:
        """Move items a sink rejected for good to the dead letters, with the reason. Their
        assets stay (for a retry) but leave `stored_bytes` for `dead_letter_bytes`."""
        if not failures:
            return
        now = time.time() if now is None else now
        with self._transaction() as conn:
            self._account_dead_letters(conn)
            moved = 0
            for item_id, error in failures:
                row = conn.execute(
                    "SELECT i.content_hash, a.size FROM items i JOIN assets a USING (content_hash) WHERE i.id = ?", (item_id,)
                ).fetchone()
                if row is None:
                    continue
                first = conn.execute("SELECT 1 FROM dead_letters WHERE content_hash = ? LIMIT 1", (row[0],)).fetchone() is None
                conn.execute(
                    f"INSERT OR REPLACE INTO dead_letters (id, {_ITEM_COLUMNS}, attempts, failed_at, error) "
                    f"SELECT id, {_ITEM_COLUMNS}, attempts + 1, ?, ? FROM items WHERE id = ?",
                    (now, error[:2000], item_id),
                )
                conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
                if first:
                    self._bump(conn, "stored_bytes", -row[1])
                    self._bump(conn, "dead_letter_bytes", row[1])
                moved += 1
            self._bump(conn, "dead_lettered", moved)

    def _remove_dead_letters(self, conn: sqlite3.Connection, ids: Sequence[int], *, requeue: bool) -> int:
        """Delete (or queue again) these dead letters, keeping the byte counters exact: an
        asset no dead letter refers to any more counts in `stored_bytes` again (or, deleted
        by the trigger, had its bytes taken from it: given back here)."""
        if not ids:
            return 0
        self._account_dead_letters(conn)
        marks = ",".join("?" * len(ids))
        sizes = conn.execute(
            f"SELECT DISTINCT d.content_hash, a.size FROM dead_letters d JOIN assets a USING (content_hash) WHERE d.id IN ({marks})", ids
        ).fetchall()
        n = len(ids)
        if requeue:
            n = conn.execute(
                f"INSERT OR IGNORE INTO items (id, {_ITEM_COLUMNS}) SELECT id, {_ITEM_COLUMNS} FROM dead_letters WHERE id IN ({marks})", ids
            ).rowcount
        conn.execute(f"DELETE FROM dead_letters WHERE id IN ({marks})", ids)
        for content, size in sizes:
            if conn.execute("SELECT 1 FROM dead_letters WHERE content_hash = ? LIMIT 1", (content,)).fetchone() is None:
                self._bump(conn, "stored_bytes", size)
                self._bump(conn, "dead_letter_bytes", -size)
        return n

    @_checkpoint_when_full(use_reserve=True)
    def drop(self, ids: Sequence[int], counter: str) -> None:
        """Remove items without delivering them (e.g. over a group's budget), counted."""
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
            self._bump(conn, counter, len(ids))

    def delivered_since(self, group: str, since: float) -> int:
        """Deliveries to `group` at or after `since` (one dated in the future counts too)."""
        with self._transaction(write=False) as conn:
            return conn.execute(
                "SELECT count(*) FROM delivered WHERE upload_group = ? AND delivered_at >= ?", (group, since)
            ).fetchone()[0]

    def queued_groups(self) -> list[str]:
        """Groups with queued items (a skip scan of the (group, hash) index: one probe per group)."""
        with self._transaction(write=False) as conn:
            return [r[0] for r in conn.execute(
                "WITH RECURSIVE g(name) AS (SELECT min(upload_group) FROM items UNION ALL "
                "SELECT (SELECT min(upload_group) FROM items WHERE upload_group > g.name) FROM g WHERE g.name IS NOT NULL) "
                "SELECT name FROM g WHERE name IS NOT NULL"
            )]

    # Bounds ---------------------------------------------------------------------------

    def clamp_future(self, *, now: float | None = None, tolerance_s: float = 1.0) -> int:
        """Deliveries and failures dated in the future (the wall clock stepped back) are
        dated now, so that rate windows and age bounds measure from now, not from a time
        that may be days away; returns how many rows moved."""
        now = time.time() if now is None else now
        with self._transaction(write=False) as conn:
            future = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM delivered WHERE delivered_at > ?1) OR EXISTS (SELECT 1 FROM dead_letters WHERE failed_at > ?1)",
                (now + tolerance_s,),
            ).fetchone()[0]
        if not future:
            return 0
        with self._transaction() as conn:
            n = conn.execute("UPDATE delivered SET delivered_at = ?1 WHERE delivered_at > ?2", (now, now + tolerance_s)).rowcount
            n += conn.execute("UPDATE dead_letters SET failed_at = ?1 WHERE failed_at > ?2", (now, now + tolerance_s)).rowcount
        log.warning("outbox %s: %d deliveries or dead letters were dated in the future (the clock stepped back); dated now", self.path, n)
        return n

    def trim_delivered(self, *, max_age_s: float, max_rows: int, keep_since: float | None = None, now: float | None = None,
                       chunk: int = 5000) -> int:
        """Forget old delivery records, the dedup memory: those older than `max_age_s`, and
        the oldest beyond `max_rows`, but never one at or after `keep_since` (the start of
        the longest rate window, which must count them). An image flagged again after its
        record went is delivered again (sinks store it idempotently). Deletes in chunks, each
        a short transaction; returns how many went."""
        now = time.time() if now is None else now
        keep_since = now if keep_since is None else min(keep_since, now)
        cutoff = min(now - max_age_s, keep_since)
        removed = self._delete_delivered_before(cutoff, chunk)
        with self._transaction(write=False) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
        if rows > max_rows:
            with self._transaction(write=False) as conn:
                row = conn.execute("SELECT delivered_at FROM delivered ORDER BY delivered_at LIMIT 1 OFFSET ?", (rows - max_rows - 1,)).fetchone()
            if row is not None:
                inclusive = row[0] < keep_since  # never a record inside the longest rate window
                removed += self._delete_delivered_before(row[0] if inclusive else keep_since, chunk, inclusive=inclusive)
        if removed:
            with self._transaction() as conn:
                self._bump(conn, "delivered_forgotten", removed)
        return removed

    def _delete_delivered_before(self, cutoff: float, chunk: int, *, inclusive: bool = False) -> int:
        op = "<=" if inclusive else "<"
        removed = 0
        while True:
            with self._transaction() as conn:
                row = conn.execute(
                    f"SELECT delivered_at FROM delivered WHERE delivered_at {op} ? ORDER BY delivered_at LIMIT 1 OFFSET ?", (cutoff, chunk - 1)
                ).fetchone()
                upto, last = (cutoff, True) if row is None else (row[0], False)
                removed += conn.execute(f"DELETE FROM delivered WHERE delivered_at {op if last else '<='} ?", (upto,)).rowcount
            if last:
                return removed

    def purge_dead_letters(self, *, older_than_s: float | None = None, keep: int | None = None, max_bytes: int | None = None,
                           group: str | None = None, now: float | None = None, chunk: int = 500) -> int:
        """Delete dead letters (their assets with them, unless queued): those that failed
        more than `older_than_s` ago, all but the newest `keep`, and the oldest beyond
        `max_bytes` (their assets, each once, and embeddings: what `dead_letter_bytes`
        counts); optionally of one group only. Returns how many went."""
        if older_than_s is None and keep is None and max_bytes is None:
            raise ValueError("purge_dead_letters: give older_than_s, keep or max_bytes")
        now = time.time() if now is None else now
        doomed: set[int] = set()
        with self._transaction(write=False) as conn:
            newest_first = conn.execute(
                "SELECT d.id, d.failed_at, d.content_hash, coalesce(a.size, 0), coalesce(length(d.embedding), 0) "
                "FROM dead_letters d LEFT JOIN assets a USING (content_hash) "
                "WHERE ?1 IS NULL OR d.upload_group = ?1 ORDER BY d.failed_at DESC, d.id DESC",
                (group,),
            ).fetchall()
        seen: set[str] = set()
        total = 0
        for position, (dead_id, failed_at, content, size, embedding_size) in enumerate(newest_first):
            if content not in seen:
                seen.add(content)
                total += size
            total += embedding_size
            if ((older_than_s is not None and failed_at < now - older_than_s) or (keep is not None and position >= keep)
                    or (max_bytes is not None and total > max_bytes)):
                doomed.add(dead_id)
        ordered = sorted(doomed)
        removed = 0
        for start in range(0, len(ordered), chunk):
            with self._transaction() as conn:
                n = self._remove_dead_letters(conn, ordered[start:start + chunk], requeue=False)
                self._bump(conn, "dead_letters_purged", n)
                removed += n
        if removed:
            self._keep_reserve()
        return removed

    def dead_letter_bytes(self) -> int:
        return self.counters().get("dead_letter_bytes", 0)

    # The sink this outbox delivers to ---------------------------------------------

    def delivery_target(self) -> str | None:
        """The sink (URI without credentials) this outbox delivers to, or None if unknown."""
        with self._transaction(write=False) as conn:
            return self._meta(conn, _META_SINK)

    def sink_conflict(self, sink: str) -> SinkChanged | None:
        """The refusal `claim_sink(sink)` would raise, or None (reads only)."""
        with self._transaction(write=False) as conn:
            current = self._meta(conn, _META_SINK)
            if current is None or current == sink:
                return None
            (delivered,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
        return SinkChanged(self.path, current, sink, delivered) if delivered else None

    @_checkpoint_when_full(use_reserve=False)
    def claim_sink(self, sink: str, *, forget_deliveries: bool = False) -> int:
        """Record that this outbox delivers to `sink`. Dedup remembers what was delivered,
        not where: when the outbox delivered to another sink, the items it delivered there
        would never reach this one, so this raises `SinkChanged` unless `forget_deliveries`
        (then the delivery records are cleared; returns how many). A file that never
        recorded its sink adopts this one."""
        with self._transaction() as conn:
            current = self._meta(conn, _META_SINK)
            if current == sink:
                return 0
            (delivered,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
            forgotten = 0
            if current is not None and delivered:
                if not forget_deliveries:
                    raise SinkChanged(self.path, current, sink, delivered)
                forgotten = conn.execute("DELETE FROM delivered").rowcount
                conn.execute("DELETE FROM counters WHERE name >= ? AND name < ?", (_DELIVERED_PREFIX, _DELIVERED_END))
                self._bump(conn, "delivered_forgotten", forgotten)
            self._set_meta(conn, _META_SINK, sink)
        if current is not None:
            log.warning("outbox %s now delivers to %s (was %s); %d delivery records forgotten", self.path, sink, current, forgotten)
        return forgotten

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
            chosen = [r[0] for r in conn.execute(f"SELECT id FROM dead_letters WHERE {where}", params)]
            n = 0
            for start in range(0, len(chosen), 500):
                n += self._remove_dead_letters(conn, chosen[start:start + 500], requeue=True)
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
        """Per group: queued items (and the oldest one's time), dead letters, deliveries
        (a total kept by `mark_delivered`: no scan of the delivery records), paused."""
        with self._transaction(write=False) as conn:
            queued = {g: (n, oldest) for g, n, oldest in conn.execute(
                "SELECT upload_group, count(*), min(created_at) FROM items GROUP BY upload_group")}
            dead = dict(conn.execute("SELECT upload_group, count(*) FROM dead_letters GROUP BY upload_group").fetchall())
            delivered = {name[len(_DELIVERED_PREFIX):]: n for name, n in conn.execute(
                "SELECT name, value FROM counters WHERE name >= ? AND name < ?", (_DELIVERED_PREFIX, _DELIVERED_END))}
            if self._meta(conn, _META_DELIVERED_COUNTS) is None:  # an old file not yet prepared by an uploader
                delivered = dict(conn.execute("SELECT upload_group, count(*) FROM delivered GROUP BY upload_group").fetchall())
            paused = {r[0] for r in conn.execute("SELECT upload_group FROM paused_groups")}
        groups = sorted(set(queued) | set(dead) | {g for g, n in delivered.items() if n} | paused)
        return [
            GroupStatus(g, queued.get(g, (0, None))[0], dead.get(g, 0), delivered.get(g, 0), queued.get(g, (0, None))[1], g in paused)
            for g in groups
        ]

    def counters(self) -> dict[str, int]:
        """Totals (appended, uploaded, duplicates, retries, stored_bytes, dead_letter_bytes…)."""
        with self._transaction(write=False) as conn:
            return {name: int(value) for name, value in conn.execute("SELECT name, value FROM counters")
                    if not name.startswith(_DELIVERED_PREFIX)}

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
