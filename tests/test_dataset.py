"""`triton-al dataset export`: labelled items of a real project store as versioned,
content-addressed snapshots in three formats, read back the way training code would."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from typer.testing import CliRunner

from triton_al.cli import app
from triton_al.loop.dataset import DatasetError, export_dataset, split_of
from triton_al.outbox import content_hash
from triton_al.sinks.base import Upload
from triton_al.sinks.local import LocalStore


def png(k: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), k, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "store")
    uploads = [Upload(group=g, content_hash=content_hash(png(k)), media_type="image/png", asset=png(k),
                      metadata={"score": 0.1, "model_version": "3"}) for g, k in [("a", k) for k in range(12)] + [("b", 40)]]
    assert all(e is None for e in s.upload(uploads))
    for k in range(10):  # two of group a stay unlabelled
        s.write_label("a", content_hash(png(k)), k % 3, annotator="alice")
    s.write_label("b", content_hash(png(40)), 7, annotator="bob")  # no such class with 3 names
    return s


NAMES = ["shirt", "shoe", "bag"]


@pytest.mark.parametrize("fmt", ["imagefolder", "jsonl", "coco"])
def test_every_format_holds_every_usable_label_with_hashes_and_a_stable_split(tmp_path, store, fmt):
    out = tmp_path / "datasets"
    result = export_dataset(store, out, fmt, class_names=NAMES, val_fraction=0.3)
    assert result.items == 10 and not result.reused
    assert [s.split(":")[1].strip() for s in result.skipped] == ["label 7 is not a class of the model (3 classes)"]
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["class_map"] == {"0": "shirt", "1": "shoe", "2": "bag"}
    for rel, digest in manifest["files"].items():  # every file is what the manifest says
        assert hashlib.sha256((result.path / rel).read_bytes()).hexdigest() == digest
    source = {content_hash(png(k)): png(k) for k in range(12)}
    for item in manifest["items"]:
        assert item["split"] == split_of(item["content_hash"], 0.3)
        assert (result.path / item["file"]).read_bytes() == source[item["content_hash"]]
    assert {s for i in manifest["items"] for s in [i["split"]]} == {"train", "val"}
    assert (out / "latest").resolve() == result.path.resolve()
    if fmt == "imagefolder":
        found = {(p.parent.parent.name, p.parent.name) for p in result.path.rglob("*.png")}
        assert {c for _, c in found} == set(NAMES)
    elif fmt == "jsonl":
        lines = [json.loads(line) for split in ("train", "val") for line in (result.path / f"{split}.jsonl").read_text().splitlines()]
        assert len(lines) == 10 and all((result.path / line["image"]).is_file() for line in lines)
        assert {(line["label"], line["class"]) for line in lines} == {(0, "shirt"), (1, "shoe"), (2, "bag")}
    else:
        coco = [json.loads((result.path / f"{split}.json").read_text()) for split in ("train", "val")]
        assert sum(len(c["images"]) for c in coco) == 10 and {c["name"] for c in coco[0]["categories"]} <= set(NAMES)


def test_the_same_labels_give_the_same_snapshot_and_a_new_label_a_new_one(tmp_path, store):
    out = tmp_path / "datasets"
    first = export_dataset(store, out, "jsonl", class_names=NAMES)
    again = export_dataset(store, out, "jsonl", class_names=NAMES)
    assert again.reused and again.snapshot == first.snapshot
    splits = {i["content_hash"]: i["split"] for i in json.loads((first.path / "manifest.json").read_text())["items"]}
    store.write_label("a", content_hash(png(10)), 1, annotator="carol")
    second = export_dataset(store, out, "jsonl", class_names=NAMES)
    assert second.snapshot != first.snapshot and second.items == 11 and first.path.is_dir()  # the old one stays
    later = {i["content_hash"]: i["split"] for i in json.loads((second.path / "manifest.json").read_text())["items"]}
    assert all(later[h] == s for h, s in splits.items()), "an item changed split"
    assert os.readlink(out / "latest") == second.snapshot


def test_nothing_usable_is_a_clear_error(tmp_path):
    empty = LocalStore(tmp_path / "empty")
    with pytest.raises(DatasetError, match="nothing to export"):
        export_dataset(empty, tmp_path / "out", "jsonl")
    with pytest.raises(DatasetError, match="--format"):
        export_dataset(empty, tmp_path / "out", "parquet")


def test_cli(tmp_path, store):
    names = tmp_path / "labels.txt"
    names.write_text("\n".join(NAMES) + "\n")
    r = CliRunner().invoke(app, ["dataset", "export", "--store", str(store.root), "--out", str(tmp_path / "d"),
                                 "--format", "imagefolder", "--labels", str(names), "--group", "a"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["items"] == 10 and summary["skipped"] == 0
    bad = CliRunner().invoke(app, ["dataset", "export", "--store", str(store.root), "--out", str(tmp_path / "d"), "--group", "zz"])
    assert bad.exit_code == 2 and "no such upload group" in bad.output
