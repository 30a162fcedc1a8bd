"""The example model: the committed ONNX file, the dataset loader, and (slow, with the
`train` extra) that the training script reproduces it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from triton_al.example.data import DatasetMissing, encode_png, load, pixel_key, to_model_input

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model_repository" / "fashion_cnn" / "1" / "model.onnx"
PROVENANCE = json.loads(MODEL.with_name("model.onnx.json").read_text())


def onnx_probs(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"image": to_model_input(images)})[0]


def test_the_committed_model_has_the_served_interface_and_its_recorded_accuracy():
    import onnxruntime as ort

    assert MODEL.stat().st_size < 1_000_000
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (inp,), (out, *more) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], inp.type) == ("image", [1, 28, 28], "tensor(float)")
    assert (out.name, out.shape[1:]) == ("probs", [10])
    # `embedding` [N, 64] after `probs`, as `export_onnx` writes it (config.pbtxt declares it)
    assert [(o.name, o.shape[1:], o.type) for o in more] == [("embedding", [64], "tensor(float)")]
    images, labels = load("test")
    probs = onnx_probs(MODEL, images)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    accuracy = float((probs.argmax(1) == labels).mean())
    assert accuracy >= PROVENANCE["test_accuracy"] - 0.005
    assert accuracy > 0.85


def test_the_dataset_loader():
    images, labels = load("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    x = to_model_input(images[:2])
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert encode_png(images[0]).startswith(b"\x89PNG") and pixel_key(images[0]) != pixel_key(images[1])
    with pytest.raises(ValueError, match="split"):
        load("validation")
    with pytest.raises(ValueError, match=r"expected shape \[N, 28, 28\]"):
        to_model_input(images[0])


def test_a_missing_dataset_says_how_to_install_it(tmp_path):
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        load("test", tmp_path)


@pytest.mark.slow
def test_the_training_script_reproduces_the_committed_model(tmp_path):
    pytest.importorskip("jax", reason="the train extra (jax) is not installed")
    command = shlex.split(PROVENANCE["command"])
    out = tmp_path / "model.onnx"
    args = command[command.index("--out") + 2 :]
    subprocess.run([sys.executable, "-m", "triton_al.example.train", "--out", str(out), *args], check=True,
                   capture_output=True, cwd=ROOT, timeout=600)
    images, labels = load("test")
    accuracy = float((onnx_probs(out, images).argmax(1) == labels).mean())
    assert abs(accuracy - PROVENANCE["test_accuracy"]) <= 0.01


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed_and_the_export_matches_jax():
    pytest.importorskip("jax", reason="the train extra (jax) is not installed")
    from triton_al.example.train import export_onnx, predict_proba, train

    images, labels = load("train")
    a = train(images[:2000], labels[:2000], epochs=1, seed=3)
    b = train(images[:2000], labels[:2000], epochs=1, seed=3)
    test = load("test")[0][:500]
    np.testing.assert_array_equal(predict_proba(a, test), predict_proba(b, test))
    path = export_onnx(a, Path(__import__("tempfile").mkdtemp()) / "m.onnx")
    np.testing.assert_allclose(onnx_probs(path, test), predict_proba(a, test), atol=2e-5)


def test_the_export_has_an_embedding_output_equal_to_predict_embedding(tmp_path):
    """`embedding` (an Identity of `h`, the ReLU of the 64-unit dense layer) after `probs`;
    onnxruntime gives what jax gives. A few training steps on a few images: fast."""
    pytest.importorskip("jax", reason="the train extra (jax) is not installed")
    import onnx
    import onnxruntime as ort

    from triton_al.example.train import export_onnx, predict_embedding, predict_proba, predict_proba_and_embedding, train

    images, labels = load("train")
    model = train(images[:256], labels[:256], epochs=1, seed=1)  # 2 steps of 128
    path = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["probs", "embedding"]
    (identity,) = [n for n in graph.node if n.output == ["embedding"]]
    assert (identity.op_type, list(identity.input)) == ("Identity", ["h"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("probs", ["N", 10]), ("embedding", ["N", 64])]
    test = load("test")[0][:1100]  # more than one batch of predict's 1,000
    probs, embedding = session.run(["probs", "embedding"], {"image": to_model_input(test)})
    ours = predict_embedding(model, test)
    assert ours.shape == (1100, 64) and ours.dtype == np.float32 and ours.min() >= 0 and (ours > 0).mean() > 0.1
    np.testing.assert_allclose(embedding, ours, rtol=1e-4, atol=1e-5)
    both = predict_proba_and_embedding(model, test)
    np.testing.assert_array_equal(both[1], ours)
    np.testing.assert_allclose(both[0], predict_proba(model, test), atol=1e-6)
    np.testing.assert_allclose(probs, both[0], atol=2e-5)
