"""Run a version directory's `model.onnx` with onnxruntime inside Triton's Python backend.

The wheel's tritonserver ships only the Python backend; on a GPU server the same
`model.onnx` runs on Triton's `onnxruntime` backend instead (see the
`config.onnxruntime-gpu.pbtxt.example` beside the example model).

Config inputs and outputs map to the graph's by name (exact, else ignoring case: a config
may expose `PROBS` for a graph output called `probs`, and leave other outputs out), or by
position when the names differ and the counts match. All requests of a
dynamic batch run as one onnxruntime call. Parameters: `intra_op_threads` (default 1: one
model instance per core scales better on CPU than threads inside one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from triton_al.serving.backend_utils import error_response, parameters, pb_utils

TRITON_DTYPES = {
    "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
    "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
}


class RequestError(ValueError):
    pass


class OnnxRunner:
    """The Triton-free part: a session plus the config-name <-> graph-name mapping."""

    def __init__(self, path: Path, inputs: list[dict], outputs: list[dict], threads: int = 1) -> None:
        import onnxruntime as ort

        if not path.exists():
            raise FileNotFoundError(f"{path} not found (each version directory needs its model.onnx)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = self._map("input", [i["name"] for i in inputs], [i.name for i in self.session.get_inputs()])
        # MODEL_VERSION is not the graph's: the serving model answers it (see TritonPythonModel).
        graph_outputs = [o["name"] for o in outputs if o["name"] != VERSION_OUTPUT]
        self.outputs = self._map("output", graph_outputs, [o.name for o in self.session.get_outputs()])
        self.dtypes = {i["name"]: TRITON_DTYPES.get(i["data_type"]) for i in inputs}
        self.item_dims = {i["name"]: [int(d) for d in i["dims"]] for i in inputs}

    @staticmethod
    def _map(kind: str, config_names: list[str], graph_names: list[str]) -> dict[str, str]:
        if set(config_names) <= set(graph_names):
            return {n: n for n in config_names}
        # Case aside (`PROBS` for `probs`), so that a config may declare some of a graph's
        # outputs: the example model's graph also has `embedding`, which a config may leave out.
        folded = {g.lower(): g for g in graph_names}
        if len(folded) == len(graph_names) and all(n.lower() in folded for n in config_names):
            return {n: folded[n.lower()] for n in config_names}
        if len(config_names) != len(graph_names):
            raise ValueError(f"config {kind}s {config_names} do not match the ONNX graph's {graph_names} by name or by count")
        return dict(zip(config_names, graph_names))

    def check(self, name: str, array: np.ndarray) -> np.ndarray:
        want = self.dtypes[name]
        if want is not None and array.dtype != want:
            raise RequestError(f"input {name!r}: expected dtype {np.dtype(want).name}, got {array.dtype.name}")
        dims = self.item_dims[name]
        shape = list(array.shape[1:])
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
            raise RequestError(f"input {name!r}: expected item shape {dims}, got {shape}")
        return array

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(list(self.outputs.values()), {self.inputs[k]: v for k, v in feeds.items()})
        return dict(zip(self.outputs.keys(), results))


VERSION_OUTPUT = "MODEL_VERSION"


class TritonPythonModel:
    """An ONNX model served by the Python backend. If its config declares an output
    `MODEL_VERSION` (INT64 [1]), each item carries the version that computed it: the
    active_learning step records that with a flagged item (the version that served,
    whatever the repository holds by then)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.version = int(args["model_version"])
        self.answers_version = any(o["name"] == VERSION_OUTPUT for o in config["output"])
        params = parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        filename = config.get("default_model_filename") or "model.onnx"
        if filename.endswith(".py"):
            filename = "model.onnx"
        threads = int(params.get("intra_op_threads", "1") or 1)
        self.runner = OnnxRunner(version_dir / filename, config["input"], config["output"], threads)

    def execute(self, requests):
        feeds, sizes, errors = [], [], {}
        for i, request in enumerate(requests):
            try:
                feed = {}
                for name in self.runner.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise RequestError(f"missing input {name!r}")
                    feed[name] = self.runner.check(name, tensor.as_numpy())
                sizes.append(len(next(iter(feed.values()))))
                feeds.append(feed)
            except RequestError as e:
                errors[i] = str(e)
        outputs = {}
        if feeds:
            batch = {name: np.concatenate([f[name] for f in feeds]) for name in self.runner.inputs}
            try:
                outputs = self.runner.run(batch)
            except Exception as e:  # noqa: BLE001 - e.g. onnxruntime rejecting values
                return [error_response(f"onnx model: {e}") for _ in requests]
        responses, start, good = [], 0, iter(sizes)
        for i in range(len(requests)):
            if i in errors:
                responses.append(error_response(f"onnx model: {errors[i]}"))
                continue
            n = next(good)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + n])) for name, value in outputs.items()]
            if self.answers_version:
                tensors.append(pb_utils.Tensor(VERSION_OUTPUT, np.full((n, 1), self.version, np.int64)))
            start += n
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
