"""The local project store: the embedded default sink, and where annotations come back.

Layout (documented in the README; tools may read it directly)::

    STORE/
      <group>/
        <sha256>.<ext>        the asset, original bytes and format
        <sha256>.json         sidecar: prediction, score, strategy, threshold, reason,
                              model name and version, flagged_at, stored_at
        index.jsonl           one JSON object per stored asset, appended atomically
        labels/<sha256>.json  annotation coming back: {"label": ..., "annotator": ..., "labelled_at": ...}

Writes are idempotent per (group, hash), also across processes: uploads hold the store's
lock (`.lock`), and under it a writer reads the index lines other processes appended since
its last look before appending, so a repeated upload rewrites identical files and adds no
second index line. Files are written to a temporary name (`.<name>.<pid>.tmp`), flushed to
disk and renamed; the index line is appended last with one `write` on an O_APPEND
descriptor, so a reader never sees half an asset, and a crash leaves at most a torn last
index line, which the next writer repairs, and temporary files, which the next writer
deletes (those of dead processes, and any older than `STALE_TMP_S`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkError, TransientSinkError, Upload

INDEX = "index.jsonl"
LABELS = "labels"
STALE_TMP_S = 3600.0
"""A temporary file this old is deleted even if its writer's PID is alive (a reused PID)."""
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")
# Errors that concern the whole store (full, read-only, unmounted), not one asset: the
# uploader then backs off the store as a whole and keeps the order of the work.
STORE_WIDE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def check_asset(up: Upload) -> None:
    """Reject what no annotator could use: bytes that do not match their hash (corrupted on
    the way) or an image that does not decode far enough to identify."""
    if not isinstance(up.asset, (bytes, bytearray)) or not up.asset:
        raise PermanentSinkError(f"{up.group}/{up.content_hash}: empty or non-bytes asset")
    if hashlib.sha256(up.asset).hexdigest() != up.content_hash:
        raise PermanentSinkError(f"{up.group}/{up.content_hash}: asset bytes do not match their SHA-256 (corrupted)")
    if up.media_type.startswith("image/"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(up.asset)) as image:
                image.verify()
        except Image.DecompressionBombError as e:  # more pixels than Pillow will ever decode
            raise PermanentSinkError(f"{up.group}/{up.content_hash}: {up.media_type} asset too large to decode ({e})") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise PermanentSinkError(f"{up.group}/{up.content_hash}: corrupt {up.media_type} asset ({e})") from e
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a decoder bug on crafted bytes is this asset's problem, not the store's
            raise PermanentSinkError(f"{up.group}/{up.content_hash}: {up.media_type} asset does not decode ({type(e).__name__}: {e})") from e


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load_syncfs():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def sync_filesystem(path: Path) -> None:
    """Flush every file written under `path` to disk in one call (Linux `syncfs`): one
    journal commit per batch instead of one `fsync` per file."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(folder: Path, *, now: float | None = None, max_age_s: float = STALE_TMP_S) -> int:
    """Delete the `.<name>.<pid>.tmp` files a killed writer left in `folder`: those whose
    process is gone, and any older than `max_age_s` (its PID may have been reused). Never one
    of this process. Returns how many went. (PIDs are of this host: a store shared across
    hosts relies on the age rule for the others' leftovers.)"""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TMP_NAME.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if _pid_alive(pid) and age < max_age_s:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


class _Group:
    """One group's folder, its index, and the hashes already indexed. Created under the
    store's lock, which every index append holds, so `refresh` sees every complete line."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LABELS).mkdir(exist_ok=True)
        self.index_path = root / INDEX
        self.indexed: set[str] = set()
        self._read_upto = 0
        self._identity: tuple[int, int] | None = None
        remove_stale_temporaries(self.root)
        remove_stale_temporaries(self.root / LABELS)
        self.refresh()

    def refresh(self) -> None:
        """Take in the index lines appended since the last look (by any process), repairing
        a torn last line (a crash mid-append); start over if the file was replaced."""
        try:
            f = open(self.index_path, "rb+")
        except FileNotFoundError:
            self.indexed.clear()
            self._read_upto, self._identity = 0, None
            return
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self._identity or st.st_size < self._read_upto:
                self.indexed.clear()
                self._read_upto, self._identity = 0, (st.st_dev, st.st_ino)
            if st.st_size == self._read_upto:
                return
            f.seek(self._read_upto)
            data = f.read()
            good_end = data.rfind(b"\n") + 1
            if good_end != len(data):  # a torn last line from a crash mid-append: drop it
                f.truncate(self._read_upto + good_end)
        for line in data[:good_end].splitlines():
            try:
                self.indexed.add(json.loads(line)["content_hash"])
            except (ValueError, KeyError, TypeError):
                continue  # a line someone edited by hand; not ours to judge
        self._read_upto += good_end

    def append_index(self, records: list[dict[str, Any]], *, durable: bool) -> None:
        payload = b"".join(json.dumps(r, separators=(",", ":"), sort_keys=True).encode() + b"\n" for r in records)
        fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                if os.write(fd, payload) != len(payload):
                    raise OSError(errno.ENOSPC, f"short write to {self.index_path}")
                if durable:
                    os.fdatasync(fd)
            except OSError:
                os.ftruncate(fd, start)  # no torn line for the next append to run into
                raise
        finally:
            os.close(fd)
        self.indexed.update(r["content_hash"] for r in records)
        self.refresh()  # moves past our own lines


class LocalStore(Sink):
    """A folder per upload group (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.durable = durable
        if not self.root.exists():
            if not create:
                raise FileNotFoundError(f"project store {self.root} does not exist")
            try:
                self.root.mkdir(parents=True)
            except OSError as e:
                raise SinkError(f"project store {self.root}: cannot create it ({e.strerror})") from e
        if not self.root.is_dir():
            raise NotADirectoryError(f"project store {self.root} is not a directory")
        self._groups: dict[str, _Group] = {}
        self._fresh: set[str] = set()  # groups whose index was re-read under the current lock
        self._lock_fd: int | None = None

    @classmethod
    def from_uri(cls, uri: str) -> LocalStore:
        path = uri.split(":", 1)[1] if uri.startswith("local:") else uri
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("sink local: expected local:DIR, a directory for the project store")
        return cls(path)

    def describe(self) -> str:
        return f"local:{self.root}"

    def group_dir(self, group: str) -> Path:
        return self.root / validate_group_name(group)

    def _group(self, group: str) -> _Group:
        """The group's folder and index, up to date with other processes' appends (call
        under the store's lock)."""
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(self.group_dir(group))
        elif group not in self._fresh:
            g.refresh()
        self._fresh.add(group)
        return g

    def _lock(self) -> None:
        # One writer per store at a time (two uploaders on one store would race the index).
        if self._lock_fd is None:
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        self._fresh.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        if not self.root.is_dir():  # e.g. a volume that is not mounted: do not recreate it
            raise TransientSinkError(f"project store {self.root} is missing (not mounted?)")
        try:
            self._lock()
        except OSError as e:
            raise TransientSinkError(f"project store {self.root}: {e.strerror}") from e
        try:
            return self._upload_locked(batch)
        except OSError as e:
            if e.errno in STORE_WIDE_ERRNOS:
                raise TransientSinkError(f"project store {self.root}: {e.strerror or e}") from e
            raise
        finally:
            self._unlock()

    def _upload_locked(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        results: list[SinkError | None] = [None] * len(batch)
        pending: dict[str, list[dict[str, Any]]] = {}
        for i, up in enumerate(batch):
            try:
                record = self._write_files(up)
            except PermanentSinkError as e:
                results[i] = e
                continue
            except OSError as e:
                if e.errno in STORE_WIDE_ERRNOS:
                    raise
                results[i] = TransientSinkError(f"project store {self.root}: {up.group}/{up.filename}: {e.strerror or e}")
                continue
            if record is not None:
                pending.setdefault(up.group, []).append(record)
        if pending and self.durable:
            # Assets and sidecars must be on disk before the index names them.
            sync_filesystem(self.root)
        for group, records in pending.items():
            g = self._group(group)
            try:
                # Drop repeats inside one batch, then append every line in one write.
                unique = list({r["content_hash"]: r for r in records if r["content_hash"] not in g.indexed}.values())
                if unique:
                    g.append_index(unique, durable=self.durable)
            except OSError as e:
                if e.errno in STORE_WIDE_ERRNOS:
                    raise
                err = TransientSinkError(f"project store {self.root}: {group}/{INDEX}: {e.strerror or e}")
                for i, up in enumerate(batch):
                    if up.group == group and results[i] is None:
                        results[i] = err
        return results

    def _write_files(self, up: Upload) -> dict[str, Any] | None:
        """Write asset and sidecar; return the index record, or None if already indexed."""
        try:
            g = self._group(up.group)
        except ValueError as e:
            raise PermanentSinkError(str(e)) from e
        check_asset(up)
        asset_path = g.root / up.filename
        sidecar_path = g.root / f"{up.content_hash}.json"
        if up.content_hash in g.indexed and asset_path.exists() and sidecar_path.exists():
            return None
        try:
            sidecar = json.dumps(
                {
                    **dict(up.metadata),
                    "content_hash": up.content_hash,
                    "group": up.group,
                    "file": up.filename,
                    "media_type": up.media_type,
                    "stored_at": _utc_now(),
                },
                sort_keys=True,
                allow_nan=True,
            ).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise PermanentSinkError(f"{up.group}/{up.content_hash}: metadata is not JSON-serialisable: {type(e).__name__}: {e}") from e
        # Not fsynced one by one: `upload` syncs the whole batch at once before indexing.
        write_atomic(asset_path, bytes(up.asset), durable=False)
        write_atomic(sidecar_path, sidecar, durable=False)
        meta = up.metadata
        return {
            "content_hash": up.content_hash,
            "file": up.filename,
            "media_type": up.media_type,
            "score": meta.get("score"),
            "strategy": meta.get("strategy"),
            "reason": meta.get("reason"),
            "model_name": meta.get("model_name"),
            "model_version": meta.get("model_version"),
            "flagged_at": meta.get("flagged_at"),
            "stored_at": _utc_now(),
        }

    # Reading the store back: used by tools, tests, the annotator and the retrain step.

    def groups(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / INDEX).exists())

    def index(self, group: str) -> list[dict[str, Any]]:
        path = self.group_dir(group) / INDEX
        if not path.exists():
            return []
        out = []
        for line in path.read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line is repaired by the next writer
        return out

    def asset_path(self, group: str, record: dict[str, Any]) -> Path:
        return self.group_dir(group) / record["file"]

    def write_label(self, group: str, content_hash: str, label: Any, *, annotator: str | None = None) -> Path:
        """Record an annotation (what annotators, or the simulated annotator, produce)."""
        if not all(c in "0123456789abcdef" for c in content_hash) or len(content_hash) != 64:
            raise ValueError(f"content_hash: expected 64 lowercase hex digits, got {content_hash!r}")
        path = self.group_dir(group) / LABELS / f"{content_hash}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"label": label, "annotator": annotator, "labelled_at": _utc_now()}
        write_atomic(path, json.dumps(body, sort_keys=True).encode(), durable=self.durable)
        return path

    def annotations(self, group: str) -> Iterator[Annotation]:
        labels = self.group_dir(group) / LABELS
        if not labels.is_dir():
            return
        for path in sorted(labels.glob("*.json")):
            try:
                body = json.loads(path.read_bytes())
            except ValueError:
                continue  # being written by a tool that does not rename atomically
            yield Annotation(group, path.stem, body.get("label"), body.get("annotator"), body.get("labelled_at"))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
