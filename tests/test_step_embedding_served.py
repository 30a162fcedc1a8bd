"""A model's embedding carried through both steps into the outbox, served by a real
tritonserver: a tiny model with an EMBEDDING output, attached with `embedding_output`
(the step's `embedding_input`), behind the native step and the Python step. Every flagged
item's stored embedding is exactly what the model returned for it; an embedding with NaN
leaves the item stored without one; nothing of an unflagged item is stored."""

from __future__ import annotations

import time

import numpy as np
import pytest
from triton_helpers import direct_step_config, grpcclient, metric_sum, triton_metrics, write_direct_steps

from triton_al.attach import attach
from triton_al.config import ActiveLearningConfig
from triton_al.outbox import Outbox, content_hash
from triton_al.serving.server import ServerError, TritonServer
from triton_al.step import asset_bytes

DIMS = 6

EMBEDDER_CONFIG = f"""name: "embedder"
backend: "python"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 10 ] }} ]
output [ {{ name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] }},
         {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {DIMS} ] }} ]
"""

# Class probabilities (softmax of x) and an embedding of each item; an item whose last value
# is below -100 gets an embedding of NaN (a model that breaks on some inputs).
EMBEDDER = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            e = np.exp(x - x.max(axis=1, keepdims=True))
            probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
            embedding = np.concatenate([np.tanh(x[:, :3]), x[:, 3:6] ** 2 + 0.5], axis=1).astype(np.float32)
            embedding[x[:, 9] < -100] = np.nan
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", probs), pb_utils.Tensor("EMBEDDING", embedding)]))
        return responses
"""


@pytest.fixture(scope="module", params=["native", "python"])
def served(request, tmp_path_factory):
    """The tiny model, attached with its embedding, behind one kind of step."""
    step = request.param
    tmp = tmp_path_factory.mktemp(f"embedding-{step}")
    repo, outbox = tmp / "repo", tmp / "outbox.db"
    (repo / "embedder" / "1").mkdir(parents=True)
    (repo / "embedder" / "config.pbtxt").write_text(EMBEDDER_CONFIG)
    (repo / "embedder" / "1" / "model.py").write_text(EMBEDDER)
    attach(repo, "embedder", output="PROBS", task="classification", kind="probs", step=step, outbox_path=str(outbox),
           config=ActiveLearningConfig(threshold=0.5, upload_groups=["embedded"]), embedding_output="EMBEDDING")
    assert 'string_value: "EMBEDDING"' in (repo / "embedder_active_learning" / "config.pbtxt").read_text()
    models = ["embedder", "embedder_active_learning", "embedder_al"]
    server = TritonServer(repo, model_control_mode="explicit", load_models=models, log_path=tmp / "triton.log")
    with server:
        server.step, server.repo, server.outbox_path = step, repo, outbox
        yield server


def infer(server, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        r = c.infer("embedder_al", [inp])
    return {name: r.as_numpy(name) for name in ("PROBS", "EMBEDDING", "SCORE", "FLAGGED")}


def stored(server) -> dict[str, object]:
    with Outbox(server.outbox_path) as o:
        return {i.content_hash: i for i in o.due(10_000)}


def test_flagged_items_are_stored_with_the_embedding_the_model_returned(served):
    rng = np.random.default_rng(7)
    x = rng.normal(0, 0.1, (8, 10)).astype(np.float32)  # near-uniform probabilities: flagged
    x[[1, 5], 3] = 40.0  # certain: not flagged
    answer = infer(served, x)
    flagged = answer["FLAGGED"].reshape(-1)
    assert list(flagged) == [True, False, True, True, True, False, True, True]
    assert np.isfinite(answer["EMBEDDING"]).all() and answer["EMBEDDING"].shape == (8, DIMS)
    rows = stored(served)
    for j in range(len(x)):
        key = content_hash(asset_bytes(x[j])[0])  # the asset is the model's input, stored as .npy
        if not flagged[j]:
            assert key not in rows
            continue
        embedding = rows[key].embedding
        assert embedding is not None and embedding.dtype == np.float32
        np.testing.assert_array_equal(embedding, answer["EMBEDDING"][j])  # exactly, bit for bit


def test_an_embedding_with_nan_leaves_the_item_stored_without_it(served):
    x = np.random.default_rng(8).normal(0, 0.1, (3, 10)).astype(np.float32)
    x[1, 9] = -1000.0  # the model's embedding of item 1 is NaN; its probabilities are fine (and uncertain)
    answer = infer(served, x)
    assert answer["FLAGGED"].all()
    assert np.isnan(answer["EMBEDDING"][1]).all() and np.isfinite(answer["EMBEDDING"][[0, 2]]).all()
    rows = stored(served)
    keys = [content_hash(asset_bytes(x[j])[0]) for j in range(3)]
    assert rows[keys[1]].embedding is None and rows[keys[1]].reason == "uncertain"
    for j in (0, 2):
        np.testing.assert_array_equal(rows[keys[j]].embedding, answer["EMBEDDING"][j])
    # The problem is reported once in the server's log, naming the request and the item (whichever step) ...
    if served.step == "native":
        reported = "request 0, flagged item 1: EMBEDDING holds NaN or Inf; stored without its embedding"
    else:
        reported = "1 flagged items stored without their embedding: EMBEDDING held NaN or Inf (request 0, item 1)"
    deadline = time.monotonic() + 10
    while reported not in served.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.log_tail(400).count("NaN or Inf") == 1, served.log_tail(400)
    assert reported in served.log_tail(400)
    # ... and counted in Triton's /metrics (flushed once a second).
    deadline = time.monotonic() + 10
    while invalid_embeddings(served) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert invalid_embeddings(served) == 1


def invalid_embeddings(server) -> float:
    return metric_sum(triton_metrics(server), "triton_al_invalid_embeddings_total", model="embedder_active_learning")


def test_an_embedding_input_that_is_not_an_input_fails_the_load_naming_it(served):
    config = served.repo / "embedder_active_learning" / "config.pbtxt"
    good = config.read_text()
    config.write_text(good.replace('string_value: "EMBEDDING"', 'string_value: "EMBEDDINGS"'))
    try:
        with pytest.raises(ServerError, match="embedding_input 'EMBEDDINGS' is not an input of this model"):
            served.load_model("embedder_active_learning")
    finally:
        config.write_text(good)
    served.load_model("embedder_active_learning")
    assert infer(served, np.zeros((1, 10), np.float32))["FLAGGED"].all()  # and it serves on


def direct_config(name: str, step: str, outbox, embedding_type: str) -> str:
    """A step model called directly (no ensemble), so a client can send any embedding."""
    params = {"model_name": "m", "model_version": "1", "threshold": "0.5", "upload_groups": name, "outbox_path": str(outbox),
              "scores_input": "PROBS", "asset_input": "IMAGE", "embedding_input": "EMB"}
    return direct_step_config(name, step, params, "2", f'{{ name: "EMB" data_type: TYPE_{embedding_type} dims: [ -1 ] optional: true }}')


@pytest.mark.parametrize("step", ["native", "python"])
def test_bad_embeddings_fail_their_request_naming_the_input_alike_in_both_steps(tmp_path, step):
    from tritonclient.utils import InferenceServerException

    repo, outbox = tmp_path / "repo", tmp_path / "outbox.db"
    write_direct_steps(repo, step, {name: direct_config(name, step, outbox, kind) for name, kind in (("emb", "FP32"), ("emb_fp64", "FP64"))})
    probs = np.array([[0.5, 0.5]], np.float32)  # uncertain: flagged
    image = np.array([[b"\x89PNG\r\n\x1a\n direct"]], dtype=object)

    def send(model: str, embedding: np.ndarray | None):
        inputs = [grpcclient.InferInput("PROBS", [1, 2], "FP32"), grpcclient.InferInput("IMAGE", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(probs)
        inputs[1].set_data_from_numpy(image)
        if embedding is not None:
            e = grpcclient.InferInput("EMB", list(embedding.shape), "FP32" if embedding.dtype == np.float32 else "FP64")
            e.set_data_from_numpy(embedding)
            inputs.append(e)
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            return c.infer(model, inputs).as_numpy("FLAGGED").reshape(-1)

    server = TritonServer(repo, model_control_mode="explicit", load_models=["emb", "emb_fp64"], log_path=tmp_path / "t.log")
    with server:
        failures = {}
        for case, model, values in (("long", "emb", np.zeros((1, 4097), np.float32)),
                                    ("empty", "emb", np.zeros((1, 0), np.float32)),
                                    ("dtype", "emb_fp64", np.zeros((1, 3), np.float64)),
                                    ("missing", "emb", None)):
            with pytest.raises(InferenceServerException) as e:
                send(model, values)
            failures[case] = e.value.message()
        good = np.array([[0.25, -2.0, 8.5]], np.float32)
        assert list(send("emb", good)) == [True]  # and it serves on
    shape = "EMB: expected shape [1, D] (one embedding of D values, 1 <= D <= 4096, per item of PROBS), got {}"
    assert shape.format([1, 4097]) in failures["long"]
    assert shape.format([1, 0]) in failures["empty"]
    assert "EMB: expected FP32 embeddings, got FP64" in failures["dtype"]
    assert "missing input 'EMB'" in failures["missing"]
    with Outbox(outbox) as o:
        (row,) = o.due(10)
    assert row.content_hash == content_hash(image[0, 0])
    np.testing.assert_array_equal(row.embedding, good[0])
