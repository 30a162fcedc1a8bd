"""`triton-al retrain --command`: a team's own training command, run on a dataset snapshot;
the version it writes is placed in the repository only after it loaded in a real
tritonserver and answered with the outputs its config promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from triton_al.cli import app
from triton_al.loop.cycles import read_cycles
from triton_al.outbox import content_hash
from triton_al.sinks.base import Upload
from triton_al.sinks.local import LocalStore

CONFIG = """name: "tiny"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
"""

MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", np.zeros((len(x), WIDTH), np.float32))]))
        return out
"""

# A "training command" that writes a model.py whose output has WIDTH columns.
TRAIN = f"{sys.executable} -c \"import sys, pathlib; pathlib.Path(sys.argv[1], 'model.py').write_text(pathlib.Path(sys.argv[2]).read_text().replace('WIDTH', sys.argv[3]))\""


@pytest.fixture
def setup(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    (repo / "tiny" / "config.pbtxt").write_text(CONFIG)
    (repo / "tiny" / "labels.txt").write_text("a\nb\nc\n")  # a file the config names beside it
    (repo / "tiny" / "1" / "model.py").write_text(MODEL.replace("WIDTH", "3"))
    template = tmp_path / "model_template.py"
    template.write_text(MODEL)
    store = LocalStore(tmp_path / "store")
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert store.upload([Upload("review", content_hash(data), data, "image/png", {"score": 0.1})]) == [None]
    store.write_label("review", content_hash(data), 1, annotator="alice")
    return repo, store, template


def retrain(repo, store, command) -> object:
    return CliRunner().invoke(app, ["retrain", "--model-repository", str(repo), "--store", str(store.root),
                                    "--model", "tiny", "--command", command])


def test_a_good_version_is_checked_served_placed_and_recorded(setup):
    repo, store, template = setup
    r = retrain(repo, store, f"{TRAIN} {{version_dir}} {template} 3")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["model_version"] == 2 and (repo / "tiny" / "2" / "model.py").is_file()
    cycle = read_cycles(store.root)[-1]
    assert cycle["smoke_outputs"] == {"y": [1, 3]} and cycle["dataset"] == out["dataset"]
    snapshot = store.root / "datasets" / out["dataset"]
    assert json.loads((snapshot / "manifest.json").read_text())["items"][0]["label"] == 1
    assert not list((repo / "tiny").glob(".*"))  # no scratch folder left


def test_a_version_answering_with_the_wrong_shape_is_not_placed(setup):
    repo, store, template = setup
    r = retrain(repo, store, f"{TRAIN} {{version_dir}} {template} 5")
    assert r.exit_code == 2
    assert "output 'y' has shape [1, 5], its config says [1, 3]" in r.output
    assert not (repo / "tiny" / "2").exists() and (repo / "tiny" / "failed-2" / "model.py").is_file()
    assert read_cycles(store.root) == []


def test_a_failing_command_is_reported_with_its_output(setup):
    repo, store, _ = setup
    r = retrain(repo, store, f"{sys.executable} -c \"print('out of labels'); raise SystemExit(3)\"")
    assert r.exit_code == 2 and "exited with code 3" in r.output and "out of labels" in r.output
    assert not (repo / "tiny" / "2").exists()
    bad = retrain(repo, store, "echo {nonsense}")
    assert bad.exit_code == 2 and "unknown placeholder {nonsense}" in bad.output
