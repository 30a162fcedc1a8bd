"""`triton-al dataset export`: every labelled item of the project store as a versioned,
content-addressed snapshot that any training code can read.

    OUT/<snapshot>/            snapshot = the first 16 hex digits of the manifest's hash
        manifest.json          items (hash, group, file, label, split, annotator, ...), the
                               class map, counts, and the SHA-256 of every file written
        imagefolder:  train/<class>/<sha>.<ext>, val/<class>/<sha>.<ext>
        jsonl:        images/<sha>.<ext>, train.jsonl, val.jsonl (one {"image", "label", ...} per line)
        coco:         images/<sha>.<ext>, train.json, val.json (COCO; a classification label is
                      an image-level annotation without a box, boxes come as bboxes)
    OUT/latest -> <snapshot>

The same labels give the same snapshot (its name is the hash of what it holds), so an
export is idempotent and a training run can name exactly the data it saw. Splits are
decided by each item's content hash: an item stays in its split from one export to the
next, however many labels are added around it. A label that cannot be used (unknown class,
wrong type for the format) is reported, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from triton_al.sinks.local import LocalStore

Format = Literal["imagefolder", "jsonl", "coco"]
FORMATS: tuple[str, ...] = ("imagefolder", "jsonl", "coco")


class DatasetError(ValueError):
    """The export cannot be made; the message says why."""


@dataclass
class Export:
    path: Path
    snapshot: str
    items: int
    counts: dict[str, dict[str, int]]
    skipped: list[str] = field(default_factory=list)
    """Labels not exported, each with the reason."""
    reused: bool = False
    """The snapshot already existed (the same labels were exported before)."""


def split_of(content_hash: str, val_fraction: float) -> str:
    """`val` for a stable `val_fraction` of items, decided by the hash alone."""
    return "val" if int(content_hash[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


def read_class_names(path: Path | None) -> list[str] | None:
    """One class name per line (index = line number), as Triton's `label_filename`."""
    if path is None:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"--labels {path}: no class names in it")
    return names


def _class_of(label: Any, names: list[str] | None) -> tuple[str | None, str | None]:
    """(class name, problem) of a classification label."""
    if isinstance(label, bool) or not isinstance(label, int):
        return None, f"label {label!r} is not a class index"
    if label < 0 or (names is not None and label >= len(names)):
        return None, f"label {label} is not a class of the model ({len(names) if names else 0} classes)"
    return (names[label] if names else str(label)), None


def _safe_folder(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._- " else "_" for c in name).strip(". ")
    return cleaned or "class"


def export_dataset(store: LocalStore, out: Path, fmt: str, *, groups: list[str] | None = None,
                   class_names: list[str] | None = None, val_fraction: float = 0.1) -> Export:
    if fmt not in FORMATS:
        raise DatasetError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction: expected a value in [0, 1), got {val_fraction}")
    groups = groups or store.groups()
    missing = [g for g in groups if g not in store.groups()]
    if missing:
        raise DatasetError(f"no such upload group(s) in {store.root}: {missing}")
    items: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for group in groups:
        records = {r["content_hash"]: r for r in store.index(group)}
        for annotation in store.annotations(group):
            record = records.get(annotation.content_hash)
            if record is None:
                skipped.append(f"{group}/{annotation.content_hash}: labelled, but not in the store's index")
                continue
            problem = None
            name = None
            if fmt != "coco" or not isinstance(annotation.label, dict):
                name, problem = _class_of(annotation.label, class_names)
            elif not isinstance(annotation.label.get("boxes"), list):
                problem = f"label {annotation.label!r} has no 'boxes' list"
            if problem:
                skipped.append(f"{group}/{annotation.content_hash}: {problem}")
                continue
            if annotation.content_hash in seen:  # the same image labelled in two groups: once
                if seen[annotation.content_hash] != json.dumps(annotation.label, sort_keys=True):
                    skipped.append(f"{group}/{annotation.content_hash}: labelled differently in another group")
                continue
            seen[annotation.content_hash] = json.dumps(annotation.label, sort_keys=True)
            source = store.asset_path(group, record)
            items.append({
                "content_hash": annotation.content_hash, "group": group, "label": annotation.label, "class": name,
                "split": split_of(annotation.content_hash, val_fraction), "annotator": annotation.annotator,
                "labelled_at": annotation.labelled_at, "model_version": record.get("model_version"),
                "score": record.get("score"), "extension": source.suffix, "_source": str(source),
            })
    if not items:
        raise DatasetError(f"nothing to export: no usable labels in {store.root} (groups {groups})"
                           + (f"; skipped: {skipped[:3]}" if skipped else ""))
    items.sort(key=lambda i: i["content_hash"])
    # The snapshot's name is the hash of what defines it, so the same labels give the same name.
    identity = json.dumps({"format": fmt, "val_fraction": val_fraction, "class_names": class_names,
                           "items": [{k: i[k] for k in ("content_hash", "label", "split")} for i in items]},
                          sort_keys=True).encode()
    snapshot = hashlib.sha256(identity).hexdigest()[:16]
    target = Path(out) / snapshot
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for i in items:
        key = i["class"] if i["class"] is not None else "boxes"
        counts[i["split"]][key] = counts[i["split"]].get(key, 0) + 1
    if (target / "manifest.json").is_file():
        _point_latest(Path(out), snapshot)
        return Export(target, snapshot, len(items), counts, skipped, reused=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{snapshot}.", dir=out))
    try:
        files = _write_format(work, fmt, items, class_names)
        manifest = {
            "snapshot": snapshot, "format": fmt, "store": str(store.root), "groups": groups,
            "val_fraction": val_fraction,
            "class_map": {str(k): v for k, v in enumerate(class_names)} if class_names else None,
            "counts": counts, "skipped": skipped,
            "items": [{k: v for k, v in i.items() if not k.startswith("_")} for i in items],
            "files": files,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(work, target)  # whole or not at all
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _point_latest(Path(out), snapshot)
    return Export(target, snapshot, len(items), counts, skipped)


def _point_latest(out: Path, snapshot: str) -> None:
    link = out / "latest"
    tmp = out / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(snapshot)
    os.replace(tmp, link)


def _copy(source: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = Path(source).read_bytes()
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_format(root: Path, fmt: str, items: list[dict[str, Any]], class_names: list[str] | None) -> dict[str, str]:
    """Write the files; returns {relative path: SHA-256} of every one."""
    files: dict[str, str] = {}
    if fmt == "imagefolder":
        for i in items:
            rel = f"{i['split']}/{_safe_folder(i['class'])}/{i['content_hash']}{i['extension']}"
            files[rel] = _copy(i["_source"], root / rel)
            i["file"] = rel
        return files
    for i in items:
        rel = f"images/{i['content_hash']}{i['extension']}"
        files[rel] = _copy(i["_source"], root / rel)
        i["file"] = rel
    for split in ("train", "val"):
        chosen = [i for i in items if i["split"] == split]
        if fmt == "jsonl":
            text = "".join(json.dumps({"image": i["file"], "label": i["label"], "class": i["class"],
                                       "content_hash": i["content_hash"]}, sort_keys=True) + "\n" for i in chosen)
            name = f"{split}.jsonl"
        else:
            text = json.dumps(_coco(chosen, class_names), indent=1, sort_keys=True) + "\n"
            name = f"{split}.json"
        (root / name).write_text(text)
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    return files


def _coco(items: list[dict[str, Any]], class_names: list[str] | None) -> dict[str, Any]:
    ids = sorted({i["label"] for i in items if isinstance(i["label"], int)}
                 | {b["label"] for i in items if isinstance(i["label"], dict) for b in i["label"]["boxes"]})
    categories = [{"id": k, "name": class_names[k] if class_names and k < len(class_names) else str(k)} for k in ids]
    images, annotations = [], []
    for n, i in enumerate(items, start=1):
        images.append({"id": n, "file_name": i["file"], "content_hash": i["content_hash"]})
        if isinstance(i["label"], dict):
            for b in i["label"]["boxes"]:
                annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": b["label"],
                                    "bbox": b.get("bbox"), "area": (b["bbox"][2] * b["bbox"][3]) if b.get("bbox") else None,
                                    "iscrowd": 0})
        else:
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": i["label"]})
    return {"images": images, "annotations": annotations, "categories": categories}
