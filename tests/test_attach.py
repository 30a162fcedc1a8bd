"""`triton-al attach` on models of different shapes and names (the files it writes, and its
refusals). Loading the result in a real tritonserver is tested in test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from typer.testing import CliRunner

from triton_al.attach import AttachError, attach, read_config
from triton_al.cli import app
from triton_al.step_settings import StepSettings


def model(repo: Path, name: str, body: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{body}')


RESNET = """
platform: "onnxruntime_onnx"
max_batch_size: 32
input [{ name: "input__0" data_type: TYPE_FP32 dims: [3, 224, 224] }]
output [{ name: "logits" data_type: TYPE_FP32 dims: [1000] }]
"""


def step_params(repo: Path, step: str) -> dict[str, str]:
    c = read_config(repo / step / "config.pbtxt")
    return {k: v.string_value for k, v in c.parameters.items()}


def test_classification_logits_model(tmp_path):
    model(tmp_path, "resnet", RESNET)
    written = attach(tmp_path, "resnet")
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "resnet_active_learning/config.pbtxt",
        "resnet_active_learning/1/model.py",
        "resnet_al/config.pbtxt",
        "resnet_al/1/.gitkeep",
    }
    step = read_config(tmp_path / "resnet_active_learning" / "config.pbtxt")
    assert step.backend == "python" and step.max_batch_size == 32
    assert [(t.name, list(t.dims)) for t in step.input] == [("logits", [1000]), ("IMAGE", [3, 224, 224])]
    # every model output passes through the step, so Triton never prunes it (any subset of outputs works)
    assert [(t.name, list(t.dims)) for t in step.output] == [("logits", [1000]), ("SCORE", [1]), ("FLAGGED", [1])]
    params = step_params(tmp_path, "resnet_active_learning")
    assert params["from_logits"] == "true" and params["task"] == "classification" and params["model_name"] == "resnet"
    assert (params["scores_input"], params["asset_input"]) == ("logits", "IMAGE")
    settings = StepSettings.from_parameters(params, env={"TRITON_AL_OUTBOX": "/tmp/o.db"})
    assert settings.active_learning.from_logits
    ensemble = read_config(tmp_path / "resnet_al" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert [o.name for o in ensemble.output] == ["logits", "SCORE", "FLAGGED"]
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["resnet", "resnet_active_learning"]
    model_step, step_step = ensemble.ensemble_scheduling.step
    assert dict(model_step.output_map) == {"logits": "resnet.logits"}
    assert dict(step_step.input_map) == {"logits": "resnet.logits", "IMAGE": "input__0"}
    # every output of the ensemble comes from the step
    assert dict(step_step.output_map) == {"logits": "logits", "SCORE": "SCORE", "FLAGGED": "FLAGGED"}
    # The original is untouched.
    assert (tmp_path / "resnet" / "config.pbtxt").read_text().endswith(RESNET)


def test_idempotent_and_never_overwrites_foreign_files(tmp_path):
    model(tmp_path, "resnet", RESNET)
    assert attach(tmp_path, "resnet")
    assert attach(tmp_path, "resnet") == []
    model(tmp_path, "mine", 'backend: "python"\nmax_batch_size: 1\n')
    with pytest.raises(AttachError, match="not written by triton-al attach"):
        attach(tmp_path, "resnet", step_name="mine")


def test_detection_head_with_preprocess_and_options(tmp_path):
    model(tmp_path, "decode", """
backend: "python"
max_batch_size: 8
input [{ name: "IMAGE" data_type: TYPE_STRING dims: [1] }]
output [{ name: "images" data_type: TYPE_FP32 dims: [3, 640, 640] }]
""")
    model(tmp_path, "yolo", """
platform: "onnxruntime_onnx"
max_batch_size: 8
input [{ name: "images" data_type: TYPE_FP32 dims: [3, 640, 640] }]
output [{ name: "boxes" data_type: TYPE_FP32 dims: [100, 4] }, { name: "class_scores" data_type: TYPE_FP32 dims: [100, 80] }]
""")
    with pytest.raises(AttachError, match="--output"):
        attach(tmp_path, "yolo", preprocess="decode", task="detection")
    attach(tmp_path, "yolo", preprocess="decode", output="class_scores", task="detection")
    params = step_params(tmp_path, "yolo_active_learning")
    assert params["task"] == "detection" and params["from_logits"] == "false" and params["aggregate"] == "min"
    ensemble = read_config(tmp_path / "yolo_al" / "config.pbtxt")
    assert [t.name for t in ensemble.input] == ["IMAGE"]
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["decode", "yolo", "yolo_active_learning"]
    step = read_config(tmp_path / "yolo_active_learning" / "config.pbtxt")
    assert [(t.name, list(t.dims)) for t in step.input] == [("boxes", [100, 4]), ("class_scores", [100, 80]), ("IMAGE", [1])]
    assert [t.name for t in step.output] == ["boxes", "class_scores", "SCORE", "FLAGGED"]
    assert params["scores_input"] == "class_scores"


def test_names_that_would_clash_in_the_step(tmp_path):
    model(tmp_path, "m", 'max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\n'
          'output [{name: "probs" data_type: TYPE_FP32 dims: [10]}, {name: "IMAGE" data_type: TYPE_FP32 dims: [4]}]')
    attach(tmp_path, "m", output="probs")
    assert step_params(tmp_path, "m_active_learning")["asset_input"] == "ASSET"  # IMAGE is a model output
    model(tmp_path, "n", 'max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\n'
          'output [{name: "probs" data_type: TYPE_FP32 dims: [10]}, {name: "SCORE" data_type: TYPE_FP32 dims: [1]}]')
    with pytest.raises(AttachError, match=r"output\(s\) \['SCORE'\]"):
        attach(tmp_path, "n", output="probs")


def test_unbatched_model(tmp_path):
    model(tmp_path, "tiny", """
backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]
output [{ name: "probabilities" data_type: TYPE_FP16 dims: [-1, 3] }]
""")
    attach(tmp_path, "tiny")
    step = read_config(tmp_path / "tiny_active_learning" / "config.pbtxt")
    assert step.max_batch_size == 0
    assert [list(t.dims) for t in step.output] == [[-1, 3], [-1, 1], [-1, 1]]


@pytest.mark.parametrize(
    "body, kwargs, message",
    [
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "a" data_type: TYPE_FP32 dims: [10]}, {name: "b" data_type: TYPE_FP32 dims: [10]}]', {}, "cannot tell which output"),
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "label" data_type: TYPE_INT64 dims: [1]}]', {"output": "label"}, "must be FP16, FP32 or FP64"),
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "out" data_type: TYPE_FP32 dims: [10]}]', {}, "--kind probs|logits"),
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "masks" data_type: TYPE_FP32 dims: [21, 64, 64]}]', {"output": "masks", "kind": "logits"}, "pass --task"),
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "probs" data_type: TYPE_FP32 dims: [10]}]', {"output": "nope"}, "has no output 'nope'"),
        ('max_batch_size: 4\ninput [{name: "x" data_type: TYPE_FP32 dims: [4]}]\noutput [{name: "probs" data_type: TYPE_FP32 dims: [10]}]', {"task": "detection", "output": "probs"}, "needs 2 per-item"),
        ("this is { not pbtxt", {}, "not a valid Triton model configuration"),
    ],
)
def test_refusals_say_why(tmp_path, body, kwargs, message):
    model(tmp_path, "m", body)
    with pytest.raises(AttachError, match=message.replace("|", r"\|").replace("(", r"\(")):
        attach(tmp_path, "m", **kwargs)
    assert not (tmp_path / "m_al").exists()


def test_segmentation_with_task(tmp_path):
    model(tmp_path, "seg", 'max_batch_size: 2\ninput [{name: "x" data_type: TYPE_FP32 dims: [3, 64, 64]}]\noutput [{name: "logits" data_type: TYPE_FP32 dims: [21, 64, 64]}]')
    attach(tmp_path, "seg", task="segmentation")
    assert step_params(tmp_path, "seg_active_learning")["layout"] == "nchw"


def test_cli(tmp_path):
    model(tmp_path, "resnet", RESNET)
    runner = CliRunner()
    args = ["attach", "--model-repository", str(tmp_path), "--model", "resnet", "--strategy", "margin", "--threshold", "0.2", "--upload-group", "review"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    params = step_params(tmp_path, "resnet_active_learning")
    assert (params["strategy"], params["threshold"], params["upload_groups"]) == ("margin", "0.2", "review")
    assert "already up to date" in runner.invoke(app, args).output
    bad = runner.invoke(app, ["attach", "--model-repository", str(tmp_path), "--model", "ghost"])
    assert bad.exit_code == 2 and "no such file" in bad.output
