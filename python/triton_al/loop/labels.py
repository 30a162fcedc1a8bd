"""`triton-al labels pull` (and the uploader's `--pull-labels-every`): the annotations made
in a sink, brought into the project store's label files, where `retrain` and `dataset
export` read them.

- Idempotent: a label already in the store, unchanged, is left alone.
- A relabel replaces the label and keeps the older one in `labels/history/`.
- Incremental, two ways. A sink that can list what changed since a time (S3 by the
  objects' LastModified, Nexus) gets back the newest change time it gave last time
  (`since`) and yields only what changed since then (minus a margin of its own); the
  watermark, kept per (sink, group) in `<store>/labels-pull.json`, never moves past an
  annotation whose item could not be found yet, so it is taken once the item is there.
  Other sinks list everything; an annotation not newer (by its `labelled_at`) than the
  newest one taken before and already in the store is then skipped without being compared.
- An item that is not in the store is fetched from the sink when the sink can give assets
  back (S3, Nexus, another local store): its bytes (checked against the hash) and its sidecar are written into
  the store, so a store the uploader never delivered to fills with exactly the labelled
  items.
- An annotation that cannot be mapped (its item is neither in the store nor in the sink,
  its label is not a class of the model, its form is wrong) is reported, never guessed.
- One pull at a time per store (`<store>/.labels-pull.lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from triton_al.sinks.base import PermanentSinkError, Sink, SinkError, Upload
from triton_al.sinks.local import LABELS, LocalStore, write_atomic

STATE = "labels-pull.json"
LOCK = ".labels-pull.lock"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_SIDECAR_KEYS = ("content_hash", "group", "file", "media_type", "stored_at")
FETCH_CHUNK = 32
"""Items asked for at once from a sink (`fetch_many`), and held in memory at most."""


class LabelsPullError(Exception):
    """The pull could not run at all (another pull holds the store, a broken state file)."""


@dataclass
class PullResult:
    new: int = 0
    relabelled: int = 0
    unchanged: int = 0
    fetched: int = 0
    """Items brought from the sink into the store because they were labelled there."""
    problems: list[str] = field(default_factory=list)
    stopped: bool = False
    """`should_stop` ended the pull early: what was taken is kept, no watermark moved."""

    @property
    def taken(self) -> int:
        return self.new + self.relabelled


def takes_since(sink: Sink) -> bool:
    """Whether this sink's `annotations` accepts `since` (an incremental listing)."""
    try:
        return "since" in inspect.signature(sink.annotations).parameters
    except (TypeError, ValueError):
        return False


def gives_annotations(sink: Sink) -> bool:
    """Whether this sink implements `annotations` at all."""
    return type(sink).annotations is not Sink.annotations


def _class_index(value: Any, class_names: list[str] | None) -> tuple[int | None, str | None]:
    """A class given by index or by name, as its index; or why it is not a class."""
    count = len(class_names) if class_names else None
    if isinstance(value, str) and not isinstance(value, bool):
        if class_names is None:
            return None, f"class {value!r} is a name, but no class names were given (--labels FILE)"
        if value in class_names:
            return class_names.index(value), None
        return None, f"class {value!r} is not a class of the model ({count} classes)"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (count is not None and value >= count):
        return None, f"class {value!r} is not a class of the model" + (f" ({count} classes)" if count else "")
    return value, None


def resolve_label(label: Any, class_names: list[str] | None) -> tuple[Any, str | None]:
    """The label as the store keeps it (class indexes), or why it cannot be taken. Accepted:
    a class (index, or name with class names), a list of classes (multi-label), or
    `{"boxes": [{"label": class, ...}, ...]}` (detection) or `{"polygons": [{"label": class,
    "points": [[x, y], ...]}, ...]}` (segmentation)."""
    if label is None:
        return None, "no label in the annotation"
    if isinstance(label, (int, str)) and not isinstance(label, bool):
        return _class_index(label, class_names)
    if isinstance(label, list):
        out = []
        for k in label:
            if isinstance(k, (list, dict)) or k is None:
                return None, f"label {label!r}: a list must hold classes"
            index, problem = _class_index(k, class_names)
            if problem:
                return None, problem
            out.append(index)
        return out, None
    if isinstance(label, dict):
        # Detection boxes or segmentation polygons: shapes, each with its class.
        kinds = [k for k in ("boxes", "polygons") if k in label]
        shapes = label.get(kinds[0]) if len(kinds) == 1 else None
        if not isinstance(shapes, list) or not all(isinstance(b, dict) for b in shapes):
            return None, (f"label {label!r}: expected {{'boxes': [{{'label': class, ...}}, ...]}} "
                          "or {'polygons': [{'label': class, 'points': [[x, y], ...]}, ...]}")
        resolved = []
        for shape in shapes:
            index, problem = _class_index(shape.get("label"), class_names)
            if problem:
                return None, problem
            resolved.append({**shape, "label": index})
        return {**label, kinds[0]: resolved}, None
    return None, f"label {label!r} is neither a class, a list of them, boxes nor polygons"


@contextlib.contextmanager
def _store_lock(store: LocalStore, timeout_s: float) -> Iterator[None]:
    fd = os.open(store.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LabelsPullError(f"another labels pull has held {store.root / LOCK} for over {timeout_s:g} s; "
                                          "try again when it has finished") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_state(path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_bytes())
    except ValueError as e:
        raise LabelsPullError(f"{path} is not JSON ({e}): delete it, and the next pull reads every annotation again") from None
    if not isinstance(state, dict):
        raise LabelsPullError(f"{path}: expected a JSON object; delete it, and the next pull reads every annotation again")
    return state


def _history_name(labels_dir, content_hash: str, when: Any):
    stamp = re.sub(r"\.{2,}", ".", re.sub(r"[^0-9A-Za-z:.+-]", "", str(when or ""))).strip(".")[:40] or "unknown"
    path = labels_dir / "history" / f"{content_hash}.{stamp}.json"
    n = 1
    while path.exists():  # two relabels with one time: keep both
        path = labels_dir / "history" / f"{content_hash}.{stamp}-{n}.json"
        n += 1
    return path


def _local_copy(sink: LocalStore, group: str, content_hash: str, cache: dict[str, Any]) -> Upload | None:
    """An item of another local project store (the local sink has no `fetch` of its own)."""
    if "index" not in cache:
        cache["index"] = {r.get("content_hash"): r for r in sink.index(group)}
    record = cache["index"].get(content_hash)
    if record is None:
        return None
    name = record.get("file")
    if not isinstance(name, str) or not re.fullmatch(re.escape(content_hash) + r"\.[A-Za-z0-9]{1,10}", name):
        raise PermanentSinkError(f"{sink.describe()}: its index names the file {str(name)[:100]!r}")
    try:
        sidecar = json.loads((sink.group_dir(group) / f"{content_hash}.json").read_bytes())
        asset = sink.asset_path(group, record).read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PermanentSinkError(f"{sink.describe()}: {group}/{name}: {e}") from None
    media_type = record.get("media_type") or (sidecar.get("media_type") if isinstance(sidecar, dict) else None)
    return Upload(group, content_hash, asset, str(media_type or "application/octet-stream"), sidecar if isinstance(sidecar, dict) else {})


def _prefetch(sink: Sink, group: str, content_hashes: list[str], cache: dict[str, Any]) -> None:
    """Ask the sink for the items the next annotations need, at once (`fetch_many`)."""
    cache.pop("fetched", None)
    wanted = [h for h in dict.fromkeys(content_hashes) if _HASH.match(h)]
    if not wanted or isinstance(sink, LocalStore):
        return
    try:
        cache["fetched"] = sink.fetch_many(group, wanted)
    except NotImplementedError:
        cache["fetched"] = None  # `_fetch` says so per item
    except SinkError as e:  # the whole request failed: each item says why
        cache["fetched"] = {h: e for h in wanted}


def _fetch(sink: Sink, store: LocalStore, group: str, content_hash: str, cache: dict[str, Any]) -> tuple[str | None, bool]:
    """Bring the item from the sink into the store. Returns (problem, may_resolve_later)."""
    if not _HASH.match(content_hash):
        return f"{content_hash!r} is not a content hash (64 lowercase hex digits)", False
    try:
        if isinstance(sink, LocalStore):
            upload = _local_copy(sink, group, content_hash, cache)
        elif cache.get("fetched") is None and "fetched" in cache:
            raise NotImplementedError
        elif content_hash in cache.get("fetched", {}):
            upload = cache["fetched"][content_hash]
            if isinstance(upload, SinkError):
                raise upload
        else:
            upload = sink.fetch(group, content_hash)
    except NotImplementedError:
        return "not in the store (a deleted task, or an item never delivered here)", True
    except PermanentSinkError as e:
        return f"not in the store, and the sink's copy is unusable: {e}", False
    except SinkError as e:
        return f"not in the store, and fetching it from the sink failed: {e}", True
    if upload is None:
        return "not in the store, nor in the sink (a deleted item, or one never delivered there)", True
    if upload.group != group or upload.content_hash != content_hash:
        return "the sink answered with another item", False
    metadata = {k: v for k, v in dict(upload.metadata).items() if k not in _SIDECAR_KEYS}
    (error,) = store.upload([Upload(group, content_hash, upload.asset, upload.media_type, metadata)])
    if error is not None:
        return f"not in the store, and the sink's copy could not be stored: {error}", not isinstance(error, PermanentSinkError)
    return None, False


def pull_labels(sink: Sink, store: LocalStore, groups: list[str], *, class_names: list[str] | None = None,
                fetch: bool = True, should_stop: Callable[[], bool] | None = None, lock_timeout_s: float = 60.0) -> PullResult:
    """Bring the sink's annotations for `groups` into `store` (see the module docstring).
    Raises `SinkError` when the sink cannot be read (the groups done before stay done) and
    `LabelsPullError` when the pull cannot run at all."""
    result = PullResult()
    source = sink.describe()
    incremental = takes_since(sink)
    with _store_lock(store, lock_timeout_s):
        state_path = store.root / STATE
        state = _read_state(state_path)
        if not isinstance(state.get(source), dict):
            state[source] = {}  # none yet (or not ours): everything is read again
        marks = state[source]
        try:
            for group in groups:
                if should_stop is not None and should_stop():
                    result.stopped = True
                    break
                mark = _pull_group(sink, store, group, marks.get(group), incremental, class_names, fetch, should_stop, result)
                if mark is None:
                    result.stopped = True
                    break
                marks[group] = mark
        finally:
            write_atomic(state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode(), durable=store.durable)
    return result


def _pull_group(sink: Sink, store: LocalStore, group: str, mark: Any, incremental: bool, class_names: list[str] | None,
                fetch: bool, should_stop: Callable[[], bool] | None, result: PullResult) -> Any:
    """One group; returns its new watermark, or None when stopped early."""
    known = {r["content_hash"] for r in store.index(group)}
    cache: dict[str, Any] = {}
    labels_dir = store.group_dir(group) / LABELS
    if incremental:
        since = mark.get("since") if isinstance(mark, dict) else None
        annotations = sink.annotations(group, since=since)
        newest, pinned = since or "", None
    else:
        watermark = mark if isinstance(mark, str) else ""
        annotations = sink.annotations(group)
        newest = watermark
    listed = []
    for annotation in annotations:  # the whole listing first: the items to fetch are asked for at once
        if should_stop is not None and should_stop():
            return None
        listed.append(annotation)
    for i, annotation in enumerate(listed):
        if should_stop is not None and should_stop():
            return None
        if fetch and i % FETCH_CHUNK == 0:  # the items the next annotations need, asked for at once (memory bounded)
            _prefetch(sink, group, [a.content_hash for a in listed[i:i + FETCH_CHUNK] if a.problem is None and a.content_hash
                                    not in known and resolve_label(a.label, class_names)[1] is None], cache)
        changed = annotation.changed_at or ""
        problem, may_resolve = annotation.problem, False
        label = None
        if problem is None:
            label, problem = resolve_label(annotation.label, class_names)
        if problem is None and annotation.content_hash not in known:
            if fetch:
                problem, may_resolve = _fetch(sink, store, group, annotation.content_hash, cache)
            else:
                problem, may_resolve = "not in the store (a deleted task, or an item never delivered here)", True
            if problem is None:
                known.add(annotation.content_hash)
                result.fetched += 1
        if problem:
            result.problems.append(f"{group}/{annotation.content_hash}: {problem}")
            if incremental and may_resolve and changed:
                pinned = changed if pinned is None else min(pinned, changed)
            continue
        when = annotation.labelled_at or annotation.changed_at or ""
        path = labels_dir / f"{annotation.content_hash}.json"
        if incremental:
            newest = max(newest, changed)
        else:
            newest = max(newest, when)
            if path.exists() and when and when <= watermark:
                result.unchanged += 1
                continue
        raw = path.read_bytes() if path.exists() else None
        try:
            current = json.loads(raw) if raw is not None else None
        except ValueError:
            current = None  # a label file someone broke: replaced, its bytes kept in the history
        if isinstance(current, dict) and current.get("label") == label:
            result.unchanged += 1
            continue
        if raw is not None:  # a relabel: keep the older one
            history = _history_name(labels_dir, annotation.content_hash, current.get("labelled_at") if isinstance(current, dict) else None)
            history.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(history, raw, durable=store.durable)
            result.relabelled += 1
        else:
            result.new += 1
        body = {"label": label, "annotator": annotation.annotator, "labelled_at": when or None, "source": sink.describe()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(body, sort_keys=True).encode(), durable=store.durable)
    if not incremental:
        return newest
    if pinned is not None:  # an annotation waiting for its item: read it again next time
        newest = min(newest, pinned) if newest else pinned
    return {"since": newest} if newest else {}
