"""The loop with a real annotation tool: items flagged by a real tritonserver go through the
uploader into a real Label Studio (started by the tests, see labelstudio_helpers), labels are
made there through its REST API the way its web page makes them, `triton-al labels pull`
brings them back (fetching the items from Label Studio), `retrain --command` trains on them,
`deploy` loads the version and the cycle record counts them. A detection model's boxes reach
Label Studio as rectangle pre-annotations and rectangles come back as pixel boxes. Relabels
and classes the model does not have are reported, never guessed.

The label configs per task and the conversions are unit-tested at the bottom, without a server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from labelstudio_helpers import TOKEN
from labelstudio_helpers import label_studio as server  # noqa: F401 - the fixture, under the name these tests use
from PIL import Image

from triton_al.outbox import content_hash
from triton_al.sinks.base import PermanentSinkError, Upload
from triton_al.sinks.labelstudio import (
    LabelStudioSink,
    Schema,
    classes_of,
    label_config,
    learned_classes,
    pixel_box,
    rectangle,
    task_of,
)

ROOT = Path(__file__).resolve().parents[1]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# Against a real Label Studio ----------------------------------------------------------------


def api(server, path: str, body=None, method: str | None = None):
    request = urllib.request.Request(server.url + path, data=None if body is None else json.dumps(body).encode(),
                                     method=method, headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        text = r.read()
        return json.loads(text) if text else None


def project_of(server, group: str) -> dict:
    """Our project for the group, found the way the sink finds it (its marker line)."""
    listing = api(server, "/api/projects?page_size=1000")
    found = [p for p in listing.get("results", listing) if f"triton-al:group={group}" in (p.get("description") or "").splitlines()]
    assert len(found) == 1, f"expected one project for {group}, found {len(found)}"
    return api(server, f"/api/projects/{found[0]['id']}")


def tasks_of(server, project: int) -> list[dict]:
    listing = api(server, f"/api/tasks?project={project}&page_size=1000&fields=all")
    return listing["tasks"] if isinstance(listing, dict) else listing


def annotate(server, task: dict, result: list[dict]) -> dict:
    """An annotation submitted the way Label Studio's page submits one (POST, region ids, lead time)."""
    for i, r in enumerate(result):
        r.setdefault("id", f"r{task['id']}x{i}")
        r.setdefault("origin", "manual")
    return api(server, f"/api/tasks/{task['id']}/annotations?project={task['project']}",
               {"result": result, "was_cancelled": False, "ground_truth": False, "lead_time": 4.2, "task": task["id"]}, "POST")


def choice(name: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABEL_STUDIO_API_KEY": TOKEN}
    return subprocess.run([sys.executable, "-m", "triton_al.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
def test_classification_labels_made_in_label_studio_retrain_and_deploy_the_model(server, tmp_path, monkeypatch):
    pytest.importorskip("jax", reason="retraining needs the train extra (jax)")
    from triton_helpers import copy_repository, grpcclient, infer_al

    from triton_al.attach import set_step_parameter
    from triton_al.example.data import encode_png, load
    from triton_al.loop.cycles import read_cycles
    from triton_al.loop.deploy import served_versions
    from triton_al.serving.pipeline import Pipeline
    from triton_al.sinks.local import LocalStore

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)  # the uploader the Pipeline starts inherits it
    group = "fashion-review"
    repo = copy_repository(tmp_path)
    set_step_parameter(repo, "active_learning", "threshold", "0.9")
    set_step_parameter(repo, "active_learning", "upload_groups", group)
    sink = f"labelstudio+{server.url}?labels={repo / 'fashion_cnn' / 'labels.txt'}"
    images, truth = load("train")
    images, truth = images[30000:31000], truth[30000:31000]  # traffic the base set did not use
    pngs = [encode_png(x) for x in images]
    true_class = {content_hash(p): int(y) for p, y in zip(pngs, truth)}
    models = ["fashion_cnn_al", "fashion_cnn", "preprocess", "active_learning"]
    with Pipeline(repo, tmp_path / "data", sink=sink, model_control_mode="explicit", load_models=models) as pipeline:
        url = pipeline.server.grpc_url
        with grpcclient.InferenceServerClient(url) as c:
            for start in range(0, len(pngs), 50):
                infer_al(c, np.array([[p] for p in pngs[start:start + 50]], dtype=object))
        assert pipeline.flush(120).complete

        project = project_of(server, group)
        assert Schema.parse(project["label_config"]).names == tuple(FASHION)  # the model's classes, in index order
        tasks = tasks_of(server, project["id"])
        assert len(tasks) >= 20, "too few items flagged to mean anything"
        for t in tasks:  # every task: the model's prediction as a pre-annotation, named from the labels file
            (prediction,) = t["predictions"]
            (pre,) = prediction["result"]
            assert pre["value"]["choices"] == [FASHION[t["data"]["prediction"]["label"]]]
            assert prediction["score"] == pytest.approx(t["data"]["score"])
        labelled = tasks[:20]
        for t in labelled:
            annotate(server, t, choice(FASHION[true_class[t["data"]["content_hash"]]]))

        store = LocalStore(tmp_path / "store").root  # empty: the items come from Label Studio
        out = json.loads(ok(cli("labels", "pull", "--sink", sink, "--store", store, "--group", group)).splitlines()[-1])
        assert (out["new"], out["fetched"], out["problems"]) == (len(labelled), len(labelled), 0)
        for t in labelled:
            digest = t["data"]["content_hash"]
            label = json.loads((store / group / "labels" / f"{digest}.json").read_text())
            assert label["label"] == true_class[digest] and label["annotator"]
            assert (store / group / f"{digest}.png").read_bytes() == pngs[[content_hash(p) for p in pngs].index(digest)]

        command = ("{python} -m triton_al.example.train_on_snapshot --data {dataset} --out {version_dir} "
                   "--base-size 500 --epochs 2 --min-steps 60")
        out = json.loads(ok(cli("retrain", "--model-repository", repo, "--store", store, "--command", command)).splitlines()[-1])
        assert out["model_version"] == 2 and out["annotated"] == len(labelled) and out["labels_used"] == 500 + len(labelled)
        assert "serving fashion_cnn version 2" in ok(cli("deploy", "--model-repository", repo, "--url", url))
        assert served_versions(url, "fashion_cnn") == [2]
        with grpcclient.InferenceServerClient(url) as c:
            infer_al(c, np.array([[pngs[0]]], dtype=object))  # the ensemble serves the new version
    (cycle,) = [c for c in read_cycles(store) if c["model_version"] == 2]
    assert cycle["annotated"] == len(labelled) and cycle["labels_used"] == 500 + len(labelled)
    assert cycle["dataset"] == out["dataset"]
    manifest = json.loads((store / "datasets" / out["dataset"] / "manifest.json").read_text())
    assert sorted(i["label"] for i in manifest["items"]) == sorted(true_class[t["data"]["content_hash"]] for t in labelled)


DETECTOR_CONFIG = """name: "detector"
backend: "python"
max_batch_size: 4
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 3, 3 ] label_filename: "labels.txt" },
         { name: "BOXES" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]
"""

# A detector that finds three boxes in every image: the first two it is unsure of.
DETECTOR = """import numpy as np
import triton_python_backend_utils as pb_utils

SCORES = np.array([[0.5, 0.3, 0.2], [0.3, 0.45, 0.25], [0.96, 0.02, 0.02]], np.float32)
BOXES = np.array([[2, 4, 12, 16], [20, 0, 44, 10], [-5, 15, 70, 40]], np.float32)


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            n = len(pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy())
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SCORES", np.tile(SCORES, (n, 1, 1))),
                                                   pb_utils.Tensor("BOXES", np.tile(BOXES, (n, 1, 1)))]))
        return out
"""


def png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["native", "python"])
def test_detection_boxes_reach_label_studio_as_rectangles_and_come_back_as_pixel_boxes(server, tmp_path, monkeypatch, step):
    from triton_helpers import grpcclient

    from triton_al.attach import attach
    from triton_al.serving.pipeline import Pipeline
    from triton_al.sinks.local import LocalStore

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    group = f"boxes-{step}"
    repo = tmp_path / "repo"
    (repo / "detector" / "1").mkdir(parents=True)
    (repo / "detector" / "config.pbtxt").write_text(DETECTOR_CONFIG)
    (repo / "detector" / "labels.txt").write_text("cat\ndog\nbird\n")
    (repo / "detector" / "1" / "model.py").write_text(DETECTOR)
    from triton_al.config import ActiveLearningConfig

    attach(repo, "detector", output="SCORES", task="detection", kind="probs", boxes_output="BOXES", step=step,
           config=ActiveLearningConfig(threshold=0.5, upload_groups=[group], task="detection"))
    images = [png(64, 32, seed) for seed in range(3)]
    sink = f"labelstudio+{server.url}"  # no labels file: the classes are learned from the items' predictions
    models = ["detector", "detector_active_learning", "detector_al"]
    with Pipeline(repo, tmp_path / "data", sink=sink, model_control_mode="explicit", load_models=models) as pipeline:
        with grpcclient.InferenceServerClient(pipeline.server.grpc_url) as c:
            x = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
            x.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
            flagged = c.infer("detector_al", [x]).as_numpy("FLAGGED").reshape(-1)
        assert flagged.all()
        assert pipeline.flush(60).complete

    project = project_of(server, group)
    schema = Schema.parse(project["label_config"])
    assert (schema.task, schema.result_type, schema.names) == ("detection", "rectanglelabels", ("cat", "dog"))
    tasks = {t["data"]["content_hash"]: t for t in tasks_of(server, project["id"])}
    assert set(tasks) == {content_hash(i) for i in images}
    task = tasks[content_hash(images[0])]
    (prediction,) = task["predictions"]
    boxes = [(r["value"]["rectanglelabels"], [round(r["value"][k], 4) for k in ("x", "y", "width", "height")],
              (r["original_width"], r["original_height"])) for r in prediction["result"]]
    # pixels of the 64 x 32 image as percent; the third box is clipped to the image
    assert boxes == [(["cat"], [3.125, 12.5, 15.625, 37.5], (64, 32)), (["dog"], [31.25, 0.0, 37.5, 31.25], (64, 32)),
                     (["cat"], [0.0, 46.875, 100.0, 53.125], (64, 32))]
    assert prediction["result"][0]["score"] == pytest.approx(0.5)

    # An annotator moves the dog's box and draws a bird the model missed (a class the project
    # does not list yet: Label Studio's page could not offer it, the API can; it must be reported).
    rect = lambda label, x, y, w, h: {"from_name": "label", "to_name": "image", "type": "rectanglelabels",  # noqa: E731
                                      "original_width": 64, "original_height": 32, "image_rotation": 0,
                                      "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}
    annotate(server, task, [rect("dog", 25, 50, 50, 25), rect("cat", 0, 0, 12.5, 25)])
    other = tasks[content_hash(images[1])]
    annotate(server, other, [rect("bird", 10, 10, 10, 10)])
    store = LocalStore(tmp_path / "store").root
    r = cli("labels", "pull", "--sink", sink, "--store", store, "--group", group)
    out = json.loads(ok(r).splitlines()[-1])
    assert (out["new"], out["fetched"], out["problems"]) == (1, 1, 1)
    assert f"{content_hash(images[1])}: class 'bird'" in r.stderr
    label = json.loads((store / group / "labels" / f"{content_hash(images[0])}.json").read_text())["label"]
    assert label == {"boxes": [{"label": 1, "box": [16.0, 16.0, 48.0, 24.0]}, {"label": 0, "box": [0.0, 0.0, 8.0, 8.0]}]}
    sidecar = json.loads((store / group / f"{content_hash(images[0])}.json").read_text())
    assert sidecar["prediction"]["boxes"][1] == {"label": 1, "confidence": 0.45, "label_name": "dog", "box": [20.0, 0.0, 44.0, 10.0]}


@pytest.mark.slow
def test_a_relabel_keeps_the_old_label_and_a_class_a_person_added_is_reported_not_guessed(server, tmp_path, monkeypatch):
    """No labels file: the project's classes are learned from the predictions. A person adds a
    class in the project's settings and uses it: it is not one of the model's classes."""
    from triton_al.sinks import open_sink
    from triton_al.sinks.local import LocalStore

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    group = "relabels"
    sink_uri = f"labelstudio+{server.url}"
    items = []
    for seed in range(3):
        data = png(28, 28, 100 + seed)
        probs = [0.0] * 4
        probs[seed], probs[3] = 0.55, 0.45
        items.append(Upload(group, content_hash(data), data, "image/png", {
            "prediction": {"probs": probs, "label": seed, "label_name": ["ant", "bee", "cow", "dog"][seed]}, "score": 0.1,
            "strategy": "margin", "threshold": 0.2, "reason": "uncertain", "model_name": "m", "model_version": "1",
            "flagged_at": "2026-12-01T00:00:00Z"}))
    with open_sink(sink_uri) as sink:
        assert sink.upload(items) == [None] * 3
    project = project_of(server, group)
    # four classes (the length of probs), named where a prediction named them
    assert Schema.parse(project["label_config"]).names == ("ant", "bee", "cow", "3")
    tasks = {t["data"]["content_hash"]: t for t in tasks_of(server, project["id"])}
    first = annotate(server, tasks[items[0].content_hash], choice("bee"))
    annotate(server, tasks[items[1].content_hash], choice("3"))
    store = LocalStore(tmp_path / "store").root
    out = json.loads(ok(cli("labels", "pull", "--sink", sink_uri, "--store", store, "--group", group)).splitlines()[-1])
    assert (out["new"], out["relabelled"], out["problems"]) == (2, 0, 0)
    labels = store / group / "labels"
    assert json.loads((labels / f"{items[1].content_hash}.json").read_text())["label"] == 3

    api(server, f"/api/annotations/{first['id']}", {"result": choice("cow")}, "PATCH")  # the page's "update"
    config = project["label_config"].replace("</Choices>", '<Choice value="unicorn"/></Choices>')
    api(server, f"/api/projects/{project['id']}", {"label_config": config}, "PATCH")  # a person adds a class
    annotate(server, tasks[items[2].content_hash], choice("unicorn"))
    r = cli("labels", "pull", "--sink", sink_uri, "--store", store, "--group", group)
    out = json.loads(ok(r).splitlines()[-1])
    assert (out["new"], out["relabelled"], out["problems"]) == (0, 1, 1)
    assert f"{items[2].content_hash}: class 'unicorn'" in r.stderr
    assert not (labels / f"{items[2].content_hash}.json").exists()
    assert json.loads((labels / f"{items[0].content_hash}.json").read_text())["label"] == 2
    (old,) = (labels / "history").glob(f"{items[0].content_hash}.*.json")
    assert json.loads(old.read_text())["label"] == 1


# The label configs per task and the conversions, without a server ----------------------------


@pytest.mark.parametrize("task, tag, result_type", [
    ("classification", "Choices", "choices"), ("multilabel", "Choices", "choices"),
    ("detection", "RectangleLabels", "rectanglelabels"), ("segmentation", "PolygonLabels", "polygonlabels"),
])
def test_the_label_config_fits_the_task(task, tag, result_type):
    config = label_config(task, ["cat", 'dog "rex" & co', "<bird>"])
    schema = Schema.parse(config)
    assert (schema.task, schema.result_type, schema.control, schema.to_name) == (task, result_type, "label", "image")
    assert schema.names == ("cat", 'dog "rex" & co', "<bird>")
    assert f"<{tag} " in config and 'value="$image"' in config
    if task in ("classification", "multilabel"):
        assert ('choice="multiple"' in config) == (task == "multilabel")


def test_bad_class_names_and_tasks_are_refused_with_what_was_wrong(tmp_path):
    with pytest.raises(ValueError, match="'cat' appears twice"):
        label_config("classification", ["cat", "cat"])
    with pytest.raises(ValueError, match="class 1 has no usable name"):
        label_config("classification", ["cat", "a\x00b"])
    with pytest.raises(ValueError, match="task: expected one of"):
        label_config("captioning", ["cat"])
    with pytest.raises(ValueError, match="no class names"):
        label_config("detection", [])
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\n")
    sink = LabelStudioSink.from_uri(f"labelstudio+http://127.0.0.1:1/?labels={labels}&task=detection")
    assert (sink.class_names, sink.task, sink.describe()) == (["cat", "dog"], "detection", "labelstudio+http://127.0.0.1:1")
    with pytest.raises(ValueError, match="labels file .*nope.txt: cannot read"):
        LabelStudioSink.from_uri(f"labelstudio+http://127.0.0.1:1?labels={tmp_path / 'nope.txt'}")
    with pytest.raises(ValueError, match=r"unknown or repeated query parameter\(s\) \['colour'\]"):
        LabelStudioSink.from_uri("labelstudio+http://127.0.0.1:1?colour=red")
    with pytest.raises(ValueError, match="task: expected one of"):
        LabelStudioSink.from_uri("labelstudio+http://127.0.0.1:1?task=boxes")


def test_the_task_and_classes_come_from_the_prediction():
    assert task_of({"probs": [0.5, 0.5], "label": 0}) == "classification"
    assert task_of({"probs": [0.9, 0.2]}) == "multilabel"
    assert task_of({"boxes": []}) == "detection"
    assert task_of({"class_pixels": [3, 4]}) == "segmentation"
    assert task_of({"other": 1}) is None and task_of(None) is None
    assert classes_of({"probs": [0.1, 0.9], "label": 1, "label_name": "dog"}, "classification") == (2, {1: "dog"})
    assert classes_of({"boxes": [{"label": 4, "label_name": "cow"}, {"label": True}, {"label": -1}]}, "detection") == (5, {4: "cow"})
    assert classes_of({"class_pixels": [1, 2, 3]}, "segmentation") == (3, {})
    assert learned_classes({}, 3, {1: "dog"}) == {0: "0", 1: "dog", 2: "2"}
    # 'dog' is not taken twice; a class keeps a name it has
    assert learned_classes({0: "0", 1: "dog", 2: "2"}, 4, {0: "cat", 1: "wolf", 2: "dog", 3: "cow"}) == \
        {0: "cat", 1: "dog", 2: "2", 3: "cow"}
    assert learned_classes({}, 0, {}) == {0: "0"}


def test_the_models_classes_are_those_with_a_category():
    ours = Schema.parse(label_config("classification", ["cat", "dog"]))
    assert ours.categories == (0, 1) and ours.classes() == {"cat": 0, "dog": 1}
    edited = Schema.parse(ours.config.replace("</Choices>", '<Choice value="unicorn"/></Choices>'))  # added by a person
    assert edited.names == ("cat", "dog", "unicorn") and edited.classes() == {"cat": 0, "dog": 1}
    grown = Schema.parse(edited.with_classes({0: "cat", 1: "dog", 2: "2", 3: "cow"}))
    assert grown.classes() == {"cat": 0, "dog": 1, "2": 2, "cow": 3} and "unicorn" in grown.names
    legacy = Schema.parse('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
                          '<Choice value="a"/><Choice value="b"/></Choices></View>')  # no categories: by place
    assert legacy.classes() == {"a": 0, "b": 1}
    assert Schema.parse(legacy.with_classes({0: "a", 1: "b", 2: "c"})).classes() == {"a": 0, "b": 1, "c": 2}


def test_boxes_convert_between_pixels_and_label_studio_percent():
    assert rectangle([16, 8, 48, 24], 64, 32) == {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0}
    assert rectangle([48, 24, 16, 8], 64, 32) == rectangle([16, 8, 48, 24], 64, 32)  # corners in either order
    assert rectangle([-10, -10, 32, 16], 64, 32)["x"] == 0.0  # clipped to the image
    for empty in ([70, 0, 80, 10], [1, 2, None, 4], [1, 2, 3], [5, 5, 5, 9]):
        assert rectangle(empty, 64, 32) is None
    assert pixel_box({"x": 25, "y": 25, "width": 50, "height": 50}, 64, 32) == [16.0, 8.0, 48.0, 24.0]
    # rotated 90 degrees clockwise about its top-left corner: the box that holds it
    assert pixel_box({"x": 50, "y": 0, "width": 25, "height": 50, "rotation": 90}, 100, 100) == [0.0, 0.0, 50.0, 25.0]


def _sink(**kwargs) -> LabelStudioSink:
    return LabelStudioSink("http://127.0.0.1:1", token="t", **kwargs)


def _upload(prediction, data: bytes | None = None) -> Upload:
    data = data or png(40, 20, 1)
    return Upload("g", content_hash(data), data, "image/png", {"prediction": prediction, "score": 0.2, "model_name": "m",
                                                                "model_version": "1", "strategy": "entropy"})


def test_pre_annotations_per_task():
    detection = Schema.parse(label_config("detection", ["cat", "dog"]))
    task = _sink().task_for(_upload({"boxes": [
        {"label": 1, "confidence": 0.4, "box": [4, 2, 24, 12]},
        {"label": 0, "confidence": 0.9},  # no place (no boxes_input): not drawn
        {"label": 7, "confidence": 0.3, "box": [0, 0, 4, 4]},  # a class the project lacks: not drawn
    ]}), detection)
    (result,) = task["predictions"][0]["result"]
    assert result["value"] == {"x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["dog"]}
    assert (result["original_width"], result["original_height"], result["score"]) == (40, 20, 0.4)
    multi = Schema.parse(label_config("multilabel", ["a", "b", "c"]))
    task = _sink().task_for(_upload({"probs": [0.7, 0.2, 0.5]}), multi)
    assert task["predictions"][0]["result"][0]["value"] == {"choices": ["a", "c"]}
    segmentation = Schema.parse(label_config("segmentation", ["bg", "road"]))
    task = _sink().task_for(_upload({"class_pixels": [10, 6]}), segmentation)
    assert task["predictions"][0]["result"] == [] and task["data"]["prediction"] == {"class_pixels": [10, 6]}


def test_an_item_that_does_not_fit_the_project_is_refused_alone():
    classification = Schema.parse(label_config("classification", ["cat", "dog"]))
    with pytest.raises(PermanentSinkError, match="a detection prediction, but the group's project labels classification"):
        _sink().task_for(_upload({"boxes": []}), classification)
    with pytest.raises(PermanentSinkError, match="names class 1 'cow', the sink's labels say 'dog'"):
        _sink(class_names=["cat", "dog"]).task_for(_upload({"probs": [0.4, 0.6], "label": 1, "label_name": "cow"}), classification)
    with pytest.raises(PermanentSinkError, match="the prediction has 3 classes, the sink's labels 2"):
        _sink(class_names=["cat", "dog"]).task_for(_upload({"probs": [0.4, 0.5, 0.1], "label": 1}), classification)


def test_annotations_map_back_per_task_and_unknown_classes_keep_their_name():
    index = {"cat": 0, "dog": 1}
    label = LabelStudioSink._label
    single = Schema.parse(label_config("classification", ["cat", "dog"]))
    assert label([{"value": {"choices": ["dog"]}}], single, index, {}) == 1
    assert label([{"value": {"choices": ["wolf"]}}], single, index, {}) == "wolf"
    assert label([], single, index, {}) is None
    multi = Schema.parse(label_config("multilabel", ["cat", "dog"]))
    assert label([{"value": {"choices": ["dog", "cat", "wolf"]}}], multi, index, {}) == [0, 1, "wolf"]
    boxes = Schema.parse(label_config("detection", ["cat", "dog"]))
    image = "data:image/png;base64," + base64.b64encode(png(40, 20, 2)).decode()
    result = {"value": {"x": 50, "y": 50, "width": 25, "height": 50, "rectanglelabels": ["dog"]}}  # no original size: the task's image
    assert label([result], boxes, index, {"image": image}) == {"boxes": [{"label": 1, "box": [20.0, 10.0, 30.0, 20.0]}]}
    assert label([], boxes, index, {"image": image}) == {"boxes": []}  # nothing to find in this image
    polygons = Schema.parse(label_config("segmentation", ["cat", "dog"]))
    drawn = {"original_width": 40, "original_height": 20, "value": {"points": [[0, 0], [50, 0], [50, 100]], "polygonlabels": ["cat"]}}
    assert label([drawn], polygons, index, {}) == {"polygons": [{"label": 0, "points": [[0.0, 0.0], [20.0, 0.0], [20.0, 20.0]]}]}


def test_brush_masks_in_a_project_of_ones_own_are_reported_not_converted(monkeypatch):
    sink = LabelStudioSink("http://127.0.0.1:1", 5, token="t")  # the URI names a project with a brush config
    brush = Schema.parse('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                         '<Label value="road"/></BrushLabels></View>')
    exported = [{"data": {"content_hash": "a" * 64}, "annotations": [{
        "result": [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "value": {"rle": [1, 2], "brushlabels": ["road"]}}],
        "completed_by": 1, "updated_at": "2026-12-01T00:00:00Z"}]}]
    monkeypatch.setattr(sink, "schema", lambda project: brush)
    monkeypatch.setattr(sink, "_call", lambda *args, **kwargs: exported)
    (annotation,) = sink.annotations("g")
    assert annotation.label is None and "brush masks are not converted" in annotation.problem
