"""A model's embedding output: the example model's `embedding` (exposed by
`triton_al.example.expose_output`), how the ONNX runner maps config outputs to graph outputs
when a config declares only some of them, and the exposing tool's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triton_al.example.data import load, to_model_input
from triton_al.example.expose_output import expose_output, main
from triton_al.serving.onnx_model import OnnxRunner

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model_repository" / "fashion_cnn" / "1" / "model.onnx"
IMAGE_INPUT = [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]


def test_the_example_embedding_is_the_layer_the_classifier_reads():
    """softmax(embedding @ dense2_w + dense2_b) is the model's probs: the embedding is the
    last hidden layer, not some other tensor."""
    import onnx
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(MODEL)).graph.initializer}
    images, _ = load("test")
    runner = OnnxRunner(MODEL, IMAGE_INPUT, [{"name": "PROBS"}, {"name": "EMBEDDING"}])
    out = runner.run({"image": to_model_input(images[:256])})
    embedding, probs = out["EMBEDDING"], out["PROBS"]
    assert embedding.shape == (256, 64) and embedding.dtype == np.float32
    assert (embedding >= 0).all() and (embedding > 0).any(axis=1).all()  # relu, and never all zero here
    logits = embedding @ weights["dense2_w"] + weights["dense2_b"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("outputs, mapped", [
    (["PROBS"], {"PROBS": "probs"}),  # a config that leaves the embedding out still loads
    (["PROBS", "EMBEDDING"], {"PROBS": "probs", "EMBEDDING": "embedding"}),
    (["EMBEDDING", "PROBS"], {"EMBEDDING": "embedding", "PROBS": "probs"}),  # by name, not position
    (["probs", "embedding"], {"probs": "probs", "embedding": "embedding"}),
    (["SCORES", "FEATURES"], {"SCORES": "probs", "FEATURES": "embedding"}),  # other names: by position
])
def test_config_outputs_map_to_graph_outputs(outputs, mapped):
    runner = OnnxRunner(MODEL, IMAGE_INPUT, [{"name": n} for n in outputs])
    assert runner.outputs == mapped
    x = to_model_input(load("test")[0][:3])
    assert {k: v.shape for k, v in runner.run({"image": x}).items()} == {
        n: ((3, 10) if g == "probs" else (3, 64)) for n, g in mapped.items()}


def test_config_outputs_that_match_neither_by_name_nor_count_are_refused():
    with pytest.raises(ValueError, match=r"config outputs \['PROBS', 'LOGITS', 'X'\] do not match"):
        OnnxRunner(MODEL, IMAGE_INPUT, [{"name": n} for n in ("PROBS", "LOGITS", "X")])


def small_model(path: Path) -> Path:
    """x [N, 3] -> h = relu(x @ w1) [N, 4] -> y = h @ w2 [N, 2], plus an int64 tensor `n`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"]), helper.make_node("Shape", ["x"], ["n"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_expose_output_adds_the_tensor_and_changes_nothing_else(tmp_path):
    import onnxruntime as ort

    path = small_model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    (before,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    assert expose_output(path, "h", "embedding") == ["N", 4]
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["y", "embedding"]
    y, h = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, before)
    w1 = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(h, np.maximum(x @ w1, 0), rtol=1e-5)


@pytest.mark.parametrize("tensor, name, message", [
    ("nope", "embedding", "no tensor 'nope' in the graph"),
    ("h", "y", "already has a tensor named 'y'"),
    ("h", "w1", "already has a tensor named 'w1'"),
    ("n", "count", "tensor 'n' is not float32"),
])
def test_expose_output_refuses_what_it_cannot_expose_and_leaves_the_file(tmp_path, tensor, name, message):
    path = small_model(tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        expose_output(path, tensor, name)
    assert path.read_bytes() == before


def test_the_expose_output_command(tmp_path, capsys):
    path = small_model(tmp_path / "m.onnx")
    main([str(path), "--tensor", "h", "--out", str(tmp_path / "out.onnx")])
    assert "output 'embedding' = 'h', shape ['N', 4]" in capsys.readouterr().out
    assert (tmp_path / "out.onnx").exists() and path.read_bytes() != (tmp_path / "out.onnx").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([str(path), "--tensor", "missing"])
    assert e.value.code == 2 and "no tensor 'missing'" in capsys.readouterr().err
