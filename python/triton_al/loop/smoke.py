"""Before a new model version goes into the repository: does it load in a real tritonserver,
and does it answer a request with the outputs its configuration promises?

The version is served alone from a scratch repository (the model's own config.pbtxt and the
files beside it, the new version folder linked in), sent one request of zeros shaped from the config (or the
inputs given), and every declared output is checked for its data type and shape.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

_NUMPY = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class SmokeTestError(RuntimeError):
    """The version did not load or did not answer as its configuration says."""


def smoke_test(model_dir: Path, version_dir: Path, version: int, *, inputs: dict[str, np.ndarray] | None = None,
               timeout_s: float = 120.0) -> dict[str, list[int]]:
    """Serve `version_dir` as `version` of the model in `model_dir` and query it once;
    returns {output: shape}. Raises SmokeTestError with Triton's reason."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    from triton_al.attach import read_config
    from triton_al.serving.server import ServerError, TritonServer

    config = read_config(model_dir / "config.pbtxt")
    name = model_dir.name
    from tritonclient.grpc import model_config_pb2 as pb

    scratch = Path(tempfile.mkdtemp(prefix="triton-al-smoke-"))
    try:
        (scratch / name).mkdir()
        shutil.copy2(model_dir / "config.pbtxt", scratch / name / "config.pbtxt")
        # Files the config names beside it (label_filename, a tokenizer...) come along; other
        # versions and earlier failed attempts do not.
        for entry in model_dir.iterdir():
            if entry.name != "config.pbtxt" and not entry.name.isdigit() and not entry.name.startswith("failed-"):
                (scratch / name / entry.name).symlink_to(entry.resolve())
        (scratch / name / str(version)).symlink_to(Path(version_dir).resolve())
        server = TritonServer(scratch, model_control_mode="explicit", log_path=scratch / "tritonserver.log",
                              startup_timeout_s=timeout_s)
        with server:
            try:
                server.load_model(name, timeout_s=timeout_s)
            except ServerError as e:
                raise SmokeTestError(f"version {version} of {name!r} does not load: {e}\n{server.log_tail(15)}") from None
            batched = config.max_batch_size > 0
            request = []
            for spec in config.input:
                dtype = pb.DataType.Name(spec.data_type)
                shape = ([1] if batched else []) + [d if d > 0 else 1 for d in spec.dims]
                value = (inputs or {}).get(spec.name)
                if value is None:
                    value = (np.array([b""] * int(np.prod(shape)), dtype=object).reshape(shape) if dtype == "TYPE_STRING"
                             else np.zeros(shape, _NUMPY.get(dtype, np.float32)))
                tensor = grpcclient.InferInput(spec.name, list(value.shape), np_to_triton_dtype(value.dtype))
                tensor.set_data_from_numpy(value)
                request.append(tensor)
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                try:
                    result = client.infer(name, request, model_version=str(version), client_timeout=timeout_s)
                except InferenceServerException as e:
                    raise SmokeTestError(f"version {version} of {name!r} loaded but failed a request: {e.message()}") from None
            shapes = {}
            for spec in config.output:
                got = result.as_numpy(spec.name)
                if got is None:
                    raise SmokeTestError(f"version {version} of {name!r} did not return its output {spec.name!r}")
                want = ([1] if batched else []) + list(spec.dims)
                if len(got.shape) != len(want) or any(w > 0 and g != w for g, w in zip(got.shape, want)):
                    raise SmokeTestError(f"version {version} of {name!r}: output {spec.name!r} has shape {list(got.shape)}, "
                                         f"its config says {want}")
                expected_dtype = _NUMPY.get(pb.DataType.Name(spec.data_type))
                if expected_dtype is not None and expected_dtype is not np.object_ and got.dtype != expected_dtype:
                    raise SmokeTestError(f"version {version} of {name!r}: output {spec.name!r} is {got.dtype}, "
                                         f"its config says {pb.DataType.Name(spec.data_type)}")
                shapes[spec.name] = list(got.shape)
            return shapes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
