"""Helpers for tests against a real tritonserver: a copy of the example repository in a
temporary folder, the Pipeline (server + uploader, stopped by PID even when a test fails),
PNG-encoded Fashion-MNIST images and small gRPC utilities."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"

tritonclient = pytest.importorskip("tritonclient.grpc", reason="the triton extra is not installed")
grpcclient = tritonclient


def copy_repository(tmp: Path) -> Path:
    target = tmp / "model_repository"
    shutil.copytree(REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def set_parameter(config: Path, key: str, value: str) -> None:
    """Change one parameter of a step's config.pbtxt (the product's own editor)."""
    from triton_al.attach import set_step_parameter

    set_step_parameter(config.parent.parent, config.parent.name, key, value)


def fashion_pngs(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PNG bytes as an object array [n, 1], uint8 pixels, labels) from the test split."""
    from triton_al.example.data import encode_png, load

    images, labels = load("test")
    images, labels = images[start : start + n], labels[start : start + n]
    return np.array([[encode_png(x)] for x in images], dtype=object), images, labels


def infer_al(client, pngs: np.ndarray, model: str = "fashion_cnn_al"):
    inp = grpcclient.InferInput("IMAGE", list(pngs.shape), "BYTES")
    inp.set_data_from_numpy(pngs)
    result = client.infer(model, [inp])
    return result.as_numpy("PROBS"), result.as_numpy("SCORE").reshape(-1), result.as_numpy("FLAGGED").reshape(-1)


def triton_metrics(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def direct_step_config(name: str, step: str, params: dict[str, str], scores_dims: str, extra_input: str) -> str:
    """The config of a step model called directly (no ensemble), native or Python: inputs PROBS
    (`scores_dims`), `extra_input` (a tensor declaration, e.g. flexible and optional, so a client
    can send a bad one) and an optional IMAGE; outputs SCORE and FLAGGED; `params` as parameters."""
    return (
        f'name: "{name}"\nbackend: "{"active_learning" if step == "native" else "python"}"\nmax_batch_size: 4\n'
        f'input [ {{ name: "PROBS" data_type: TYPE_FP32 dims: [ {scores_dims} ] }},\n'
        f'        {extra_input},\n'
        '        { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] optional: true } ]\n'
        'output [ { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "FLAGGED" data_type: TYPE_BOOL dims: [ 1 ] } ]\n'
        + "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in params.items())
    )


def write_direct_steps(repo: Path, step: str, configs: dict[str, str]) -> None:
    """Step models (name -> config text) in `repo`, each with its version folder, and for the
    Python step the one-line shim attach writes."""
    from triton_al.attach import SHIM

    for name, config in configs.items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        if step == "python":
            (repo / name / "1" / "model.py").write_text(SHIM)
        (repo / name / "config.pbtxt").write_text(config)
