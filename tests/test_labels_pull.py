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
        "class 'cat' is not a class of the model (3 classes)",
        "class 9 is not a class of the model (3 classes)",
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
    assert json.loads(r.output.strip().splitlines()[-1]) == {"new": 1, "relabelled": 0, "unchanged": 0, "fetched": 0, "problems": 0}
    assert label_of(store, 1)["annotator"] == "dana"


class Remote(Sink):
    """A sink with an incremental listing and assets to give back, driven by the test: it
    yields what changed at or after `since` (no margin), and records every `since` it got."""

    def __init__(self, assets: dict[str, bytes]) -> None:
        self.assets, self.items, self.asked = assets, [], []

    def upload(self, batch):  # pragma: no cover - not used here
        raise NotImplementedError

    def annotations(self, group, since=None):
        self.asked.append(since)
        return iter([a for a in self.items if a.group == group and (since is None or a.changed_at >= since)])

    def fetch(self, group, content_hash):
        data = self.assets.get(content_hash)
        if data is None:
            return None
        return Upload(group, content_hash, data, "image/png",
                      {"score": 0.2, "model_name": "m", "model_version": "3", "content_hash": "ignored", "stored_at": "old"})

    def describe(self) -> str:
        return "remote-sink"


def test_labelled_items_missing_from_the_store_are_fetched_with_their_metadata(tmp_path):
    store = LocalStore(tmp_path / "empty-store")
    h = [content_hash(png(k)) for k in range(3)]
    sink = Remote({h[0]: png(0), h[1]: png(9)})  # the sink's copy of item 1 does not match its hash
    sink.items = [Annotation("review", h[0], "b", "ann", "2026-12-01T10:00:00Z", changed_at="2026-12-01T10:00:00.000000Z"),
                  Annotation("review", h[1], 0, "ann", None, changed_at="2026-12-01T10:00:01.000000Z"),
                  Annotation("review", h[2], 0, "ann", None, changed_at="2026-12-01T10:00:02.000000Z")]
    result = pull_labels(sink, store, ["review"], class_names=["a", "b"])
    assert (result.new, result.fetched) == (1, 1)
    assert sorted(p.split(": ", 1)[1].split(":")[0] for p in result.problems) == [
        "not in the store, and the sink's copy could not be stored", "not in the store, nor in the sink (a deleted item, or one never delivered there)"]
    (record,) = store.index("review")
    assert record["content_hash"] == h[0] and record["model_version"] == "3" and record["score"] == 0.2
    assert store.asset_path("review", record).read_bytes() == png(0)
    sidecar = json.loads((store.group_dir("review") / f"{h[0]}.json").read_text())
    assert sidecar["content_hash"] == h[0] and sidecar["stored_at"] != "old"
    assert label_of(store, 0)["label"] == 1  # "b", by the class names
    assert label_of(store, 0)["labelled_at"] == "2026-12-01T10:00:00Z"


def test_the_watermark_moves_with_the_sink_and_waits_for_items_not_found_yet(tmp_path):
    store = LocalStore(tmp_path / "store")
    h = [content_hash(png(k)) for k in range(3)]
    sink = Remote({h[0]: png(0), h[2]: png(2)})
    sink.items = [Annotation("review", h[0], 1, "a", None, changed_at="2026-12-01T10:00:00.000000Z"),
                  Annotation("review", h[1], 1, "a", None, changed_at="2026-12-01T10:00:05.000000Z"),  # its item is nowhere yet
                  Annotation("review", h[2], 1, "a", None, changed_at="2026-12-01T10:00:09.000000Z")]
    first = pull_labels(sink, store, ["review"])
    assert (first.new, len(first.problems)) == (2, 1)
    second = pull_labels(sink, store, ["review"])
    assert sink.asked == [None, "2026-12-01T10:00:05.000000Z"]  # not past the annotation still waiting
    assert (second.new, second.unchanged, len(second.problems)) == (0, 1, 1)
    sink.assets[h[1]] = png(1)  # delivered at last
    third = pull_labels(sink, store, ["review"])
    assert (third.new, third.fetched, third.problems) == (1, 1, [])
    pull_labels(sink, store, ["review"])
    assert sink.asked[-1] == "2026-12-01T10:00:09.000000Z"
    # A relabel made later comes back as one; the older label goes to the history.
    sink.items[0] = Annotation("review", h[0], 0, "b", None, changed_at="2026-12-01T11:00:00.000000Z")
    fifth = pull_labels(sink, store, ["review"])
    assert (fifth.new, fifth.relabelled, fifth.unchanged) == (0, 1, 1)
    assert label_of(store, 0)["label"] == 0
    state = json.loads((store.root / "labels-pull.json").read_text())
    assert state == {"remote-sink": {"review": {"since": "2026-12-01T11:00:00.000000Z"}}}


def test_a_label_by_name_needs_the_class_names(store):
    h = content_hash(png(0))
    sink = Annotations([Annotation("review", h, "b", "ann", "2026-12-01T10:00:00Z")])
    result = pull_labels(sink, store, ["review"])
    assert result.new == 0 and result.problems == [f"review/{h}: class 'b' is a name, but no class names were given (--labels FILE)"]
    assert pull_labels(sink, store, ["review"], class_names=["a", "b"]).new == 1
    assert label_of(store, 0)["label"] == 1


def test_a_broken_local_label_file_is_replaced_and_kept_in_the_history(store):
    h = content_hash(png(0))
    labels = store.group_dir("review") / "labels"
    (labels / f"{h}.json").write_text("{not json")
    result = pull_labels(Annotations([Annotation("review", h, 2, "ann", "2026-12-01T10:00:00Z")]), store, ["review"])
    assert result.relabelled == 1 and label_of(store, 0)["label"] == 2
    (kept,) = (labels / "history").iterdir()
    assert kept.read_text() == "{not json"


def test_hostile_times_do_not_name_files_outside_the_history(store):
    h = content_hash(png(0))
    store.write_label("review", h, 1)
    body = json.loads((store.group_dir("review") / "labels" / f"{h}.json").read_text())
    body["labelled_at"] = "../../../escape"
    (store.group_dir("review") / "labels" / f"{h}.json").write_text(json.dumps(body))
    pull_labels(Annotations([Annotation("review", h, 2, "ann", "2026-12-01T10:00:00Z")]), store, ["review"])
    (kept,) = (store.group_dir("review") / "labels" / "history").iterdir()
    assert kept.name == f"{h}.escape.json"
    assert sorted(p.name for p in store.root.iterdir()) == [".labels-pull.lock", ".lock", "labels-pull.json", "review"]


def test_one_pull_at_a_time_and_a_broken_state_file_is_a_clear_error(store):
    import fcntl
    import os

    from triton_al.loop.labels import LabelsPullError

    sink = Annotations([])
    fd = os.open(store.root / ".labels-pull.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LabelsPullError, match="another labels pull has held"):
            pull_labels(sink, store, ["review"], lock_timeout_s=0.2)
    finally:
        os.close(fd)
    (store.root / "labels-pull.json").write_text("{")
    with pytest.raises(LabelsPullError, match="labels-pull.json is not JSON .*delete it"):
        pull_labels(sink, store, ["review"])


def test_cli_errors_name_what_is_wrong(tmp_path, store):
    runner = CliRunner()
    r = runner.invoke(app, ["labels", "pull", "--store", str(tmp_path / "nowhere"), "--sink", f"local:{store.root}"])
    assert r.exit_code == 2 and "does not exist" in r.output
    LocalStore(tmp_path / "empty")
    r = runner.invoke(app, ["labels", "pull", "--store", str(tmp_path / "empty"), "--sink", f"local:{store.root}"])
    assert r.exit_code == 2 and "no upload group yet; name the group(s) to pull with --group" in r.output


def test_cli_copies_labelled_items_from_another_local_store(tmp_path, store):
    team = LocalStore(tmp_path / "team")
    team.upload([Upload("review", content_hash(png(7)), png(7), "image/png", {"score": 0.3, "model_version": "2"})])
    team.write_label("review", content_hash(png(7)), 1, annotator="erin")
    r = CliRunner().invoke(app, ["labels", "pull", "--store", str(store.root), "--sink", f"local:{team.root}"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1]) == {"new": 1, "relabelled": 0, "unchanged": 0, "fetched": 1, "problems": 0}
    assert label_of(store, 7)["annotator"] == "erin"
    record = next(r for r in store.index("review") if r["content_hash"] == content_hash(png(7)))
    assert record["model_version"] == "2" and store.asset_path("review", record).read_bytes() == png(7)


def test_every_label_form_resolves_to_class_indexes_or_says_what_is_wrong():
    from triton_al.loop.labels import resolve_label

    names = ["cat", "dog"]
    assert resolve_label("dog", names) == (1, None)
    assert resolve_label([0, "dog"], names) == ([0, 1], None)
    assert resolve_label({"boxes": [{"label": "cat", "box": [1, 2, 3, 4]}]}, names) == ({"boxes": [{"label": 0, "box": [1, 2, 3, 4]}]}, None)
    polygon = {"polygons": [{"label": "dog", "points": [[0, 0], [5, 0], [5, 5]]}]}
    assert resolve_label(polygon, names) == ({"polygons": [{"label": 1, "points": [[0, 0], [5, 0], [5, 5]]}]}, None)
    for bad, why in [({"polygons": [{"label": "fox", "points": []}]}, "fox"),
                     ({"boxes": [], "polygons": []}, "expected"),
                     ({"shapes": []}, "expected"),
                     ({"polygons": "x"}, "expected"),
                     (2.5, "neither")]:
        value, problem = resolve_label(bad, names)
        assert value is None and why in problem, (bad, problem)
