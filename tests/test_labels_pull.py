"""`triton-al labels pull`: annotations from a sink into the project store's label files:
idempotent, relabels keep their history, unmappable annotations reported, not guessed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from triton_al.cli import app
from triton_al.loop.labels import pull_labels
from triton_al.outbox import content_hash
from triton_al.sinks.base import Annotation, Sink, Upload
from triton_al.sinks.local import LocalStore


def png(k: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), k, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class Annotations(Sink):
    """A sink whose annotators' work is given by the test (what every sink's `annotations` yields)."""

    def __init__(self, items: list[Annotation]) -> None:
        self.items = items

    def upload(self, batch):  # pragma: no cover - not used here
        raise NotImplementedError

    def annotations(self, group):
        return iter([a for a in self.items if a.group == group])

    def describe(self) -> str:
        return "test-sink"


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "store")
    assert s.upload([Upload("review", content_hash(png(k)), png(k), "image/png", {"score": 0.1}) for k in range(3)]) == [None] * 3
    return s


def label_of(store, k):
    return json.loads((store.group_dir("review") / "labels" / f"{content_hash(png(k))}.json").read_text())


def test_new_labels_relabels_with_history_and_unmappable_ones_reported(store):
    h = [content_hash(png(k)) for k in range(3)]
    sink = Annotations([
        Annotation("review", h[0], 2, "alice", "2026-12-01T10:00:00Z"),
        Annotation("review", h[1], 9, "alice", "2026-12-01T10:00:01Z"),          # not a class of 3
        Annotation("review", "f" * 64, 1, "bob", "2026-12-01T10:00:02Z"),         # not in the store
        Annotation("review", h[2], "cat", "bob", "2026-12-01T10:00:03Z"),         # not an index
    ])
    first = pull_labels(sink, store, ["review"], class_names=["a", "b", "c"])
    assert (first.new, first.relabelled, first.unchanged) == (1, 0, 0)
    assert sorted(p.split(": ", 1)[1] for p in first.problems) == [
        "class 9 is not a class of the model (3 classes)",
        "label 'cat' is neither a class index, a list of them, nor boxes",
        "not in the store (a deleted task, or an item never delivered here)"]
    assert label_of(store, 0)["label"] == 2 and label_of(store, 0)["source"] == "test-sink"
    again = pull_labels(sink, store, ["review"], class_names=["a", "b", "c"])
    assert (again.new, again.relabelled, again.unchanged) == (0, 0, 1)  # idempotent
    sink.items[0] = Annotation("review", h[0], 1, "carol", "2026-12-02T09:00:00Z")  # a relabel
    third = pull_labels(sink, store, ["review"], class_names=["a", "b", "c"])
    assert (third.new, third.relabelled) == (0, 1)
    assert label_of(store, 0)["label"] == 1 and label_of(store, 0)["annotator"] == "carol"
    history = list((store.group_dir("review") / "labels" / "history").glob(f"{h[0]}.*.json"))
    assert len(history) == 1 and json.loads(history[0].read_text())["label"] == 2
    retrained_from = {a.content_hash: a.label for a in store.annotations("review")}
    assert retrained_from == {h[0]: 1}  # what retrain and dataset export read


def test_cli_pulls_from_a_local_store_where_a_team_labels(tmp_path, store):
    team = LocalStore(tmp_path / "team")
    team.upload([Upload("review", content_hash(png(1)), png(1), "image/png", {"score": 0.1})])
    team.write_label("review", content_hash(png(1)), 0, annotator="dana")
    r = CliRunner().invoke(app, ["labels", "pull", "--store", str(store.root), "--sink", f"local:{team.root}"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1]) == {"new": 1, "relabelled": 0, "unchanged": 0, "problems": 0}
    assert label_of(store, 1)["annotator"] == "dana"
