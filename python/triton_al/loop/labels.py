"""`triton-al labels pull`: the annotations made in a sink, brought into the project store's
label files, where `retrain` and `dataset export` read them.

- Idempotent: a label already in the store, unchanged, is left alone.
- A relabel replaces the label and keeps the older one in `labels/history/`.
- Incremental: the newest annotation time seen per (sink, group) is kept in
  `<store>/labels-pull.json`; annotations not newer than it and already in the store are
  skipped without being compared (sinks that list everything still list it, but nothing is
  rewritten).
- An annotation that cannot be mapped (its item is not in the store, its label is not a
  class of the model, its form is wrong) is reported, never guessed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from triton_al.sinks.base import Annotation, Sink
from triton_al.sinks.local import LABELS, LocalStore, write_atomic

STATE = "labels-pull.json"


@dataclass
class PullResult:
    new: int = 0
    relabelled: int = 0
    unchanged: int = 0
    problems: list[str] = field(default_factory=list)


def _problem(annotation: Annotation, known: set[str], class_count: int | None) -> str | None:
    if annotation.content_hash not in known:
        return "not in the store (a deleted task, or an item never delivered here)"
    label = annotation.label
    if label is None:
        return "no label in the annotation"
    if isinstance(label, bool) or (not isinstance(label, (int, list, dict))):
        return f"label {label!r} is neither a class index, a list of them, nor boxes"
    indexes = [label] if isinstance(label, int) else label if isinstance(label, list) else \
        [b.get("label") for b in label.get("boxes", [])] if isinstance(label.get("boxes"), list) else None
    if indexes is None:
        return f"label {label!r}: expected {{'boxes': [...]}}"
    for k in indexes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (class_count is not None and k >= class_count):
            return f"class {k!r} is not a class of the model" + (f" ({class_count} classes)" if class_count else "")
    return None


def pull_labels(sink: Sink, store: LocalStore, groups: list[str], *, class_names: list[str] | None = None) -> PullResult:
    result = PullResult()
    state_path = store.root / STATE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    source = sink.describe()
    marks = state.setdefault(source, {})
    for group in groups:
        known = {r["content_hash"] for r in store.index(group)}
        labels_dir = store.group_dir(group) / LABELS
        watermark = marks.get(group) or ""
        newest = watermark
        for annotation in sink.annotations(group):
            problem = _problem(annotation, known, len(class_names) if class_names else None)
            if problem:
                result.problems.append(f"{group}/{annotation.content_hash}: {problem}")
                continue
            when = annotation.labelled_at or ""
            newest = max(newest, when)
            path = labels_dir / f"{annotation.content_hash}.json"
            if path.exists() and when and when <= watermark:
                result.unchanged += 1
                continue
            current = json.loads(path.read_bytes()) if path.exists() else None
            if current is not None and current.get("label") == annotation.label:
                result.unchanged += 1
                continue
            if current is not None:  # a relabel: keep the older one
                history = labels_dir / "history" / f"{annotation.content_hash}.{current.get('labelled_at') or 'unknown'}.json"
                history.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(history, json.dumps(current, sort_keys=True).encode(), durable=store.durable)
                result.relabelled += 1
            else:
                result.new += 1
            body = {"label": annotation.label, "annotator": annotation.annotator, "labelled_at": annotation.labelled_at,
                    "source": source}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(body, sort_keys=True).encode(), durable=store.durable)
        marks[group] = newest
    tmp = state_path.with_name(f".{STATE}.{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, state_path)
    return result

