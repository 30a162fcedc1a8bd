"""Retrain the example model on the base set plus every annotation in the project store,
evaluate it on the held-out test split, and write it as the next version of the model in
the repository (a clear example: replace `triton_al.example.train` with your own).

The new version directory is assembled under a temporary name and renamed into place, so
a server polling the repository never sees half a version. Files of the current version
other than the model (the `model.py` shim) are carried over.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triton_al.example.data import CLASS_NAMES, load
from triton_al.loop.evaluation import classification_report
from triton_al.sinks.local import LocalStore

MODEL_FILES = ("model.onnx", "model.onnx.json")


class RetrainError(RuntimeError):
    pass


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def annotated_images(store: LocalStore, group: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(images uint8 [N, 28, 28], labels, skipped) for every labelled asset of the group."""
    from PIL import Image

    files = {r["content_hash"]: r for r in store.index(group)}
    images, labels, skipped = [], [], 0
    for annotation in store.annotations(group):
        record = files.get(annotation.content_hash)
        if record is None or not isinstance(annotation.label, int) or not 0 <= annotation.label < len(CLASS_NAMES):
            skipped += 1
            continue
        with Image.open(io.BytesIO(store.asset_path(group, record).read_bytes())) as image:
            pixels = np.asarray(image.convert("L"), np.uint8)
        if pixels.shape != (28, 28):
            skipped += 1
            continue
        images.append(pixels)
        labels.append(annotation.label)
    if not images:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), skipped
    return np.stack(images), np.array(labels, np.int64), skipped


def base_set(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled data the loop starts from: `size` training images chosen with `seed`."""
    images, labels = load("train")
    index = np.random.default_rng(seed).permutation(len(labels))[:size]
    return images[index], labels[index]


@dataclass
class RetrainResult:
    version: int
    path: Path
    labels_used: int
    annotated: int
    report: dict
    train_seconds: float


def retrain(repository: Path, store: LocalStore, *, model: str = "fashion_cnn", group: str = "active-learning",
            base_size: int = 1000, epochs: int = 10, min_steps: int = 300, seed: int = 0) -> RetrainResult:
    from triton_al.example.train import export_onnx, predict_proba, train

    model_dir = Path(repository) / model
    existing = versions(model_dir) if model_dir.is_dir() else []
    if not existing:
        raise RetrainError(f"{model_dir}: no version directory to start from")
    base_x, base_y = base_set(base_size, seed)
    extra_x, extra_y, skipped = annotated_images(store, group)
    x, y = np.concatenate([base_x, extra_x]), np.concatenate([base_y, extra_y])
    started = time.perf_counter()
    trained = train(x, y, epochs=epochs, seed=seed, min_steps=min_steps)
    seconds = time.perf_counter() - started
    test_x, test_y = load("test")
    report = classification_report(test_y, predict_proba(trained, test_x).argmax(1), CLASS_NAMES)

    version = existing[-1] + 1
    target = model_dir / str(version)
    tmp = model_dir / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in (model_dir / str(existing[-1])).iterdir():
        if f.is_file() and f.name not in MODEL_FILES:
            shutil.copy2(f, tmp / f.name)
    export_onnx(trained, tmp / "model.onnx")
    (tmp / "model.onnx.json").write_text(json.dumps({
        "trained_on": {"base": int(len(base_y)), "annotated": int(len(extra_y)), "group": group, "skipped": skipped},
        "seed": seed, "epochs": epochs, "test_accuracy": round(report["accuracy"], 4), "train_seconds": round(seconds, 1),
    }, indent=1) + "\n")
    tmp.rename(target)
    return RetrainResult(version, target, int(len(y)), int(len(extra_y)), report, seconds)


def evaluate_version(repository: Path, model: str = "fashion_cnn", version: int | None = None) -> tuple[int, dict]:
    """Accuracy and per-class metrics of a version's model.onnx on the test split
    (onnxruntime only: no training framework needed)."""
    import onnxruntime as ort

    from triton_al.example.data import to_model_input

    model_dir = Path(repository) / model
    version = version if version is not None else versions(model_dir)[-1]
    session = ort.InferenceSession(str(model_dir / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    test_x, test_y = load("test")
    probs = session.run(None, {session.get_inputs()[0].name: to_model_input(test_x)})[0]
    return version, classification_report(test_y, probs.argmax(1), CLASS_NAMES)


# The example's own training, run as any team's command is (see retrain_with_command).
EXAMPLE_COMMAND = ("{python} -m triton_al.example.train_on_snapshot --data {dataset} --out {version_dir} "
                   "--base-size {base_size} --epochs {epochs} --min-steps {min_steps} --seed {seed}")


@dataclass
class CommandRetrain:
    version: int
    path: Path
    snapshot: str
    dataset: Path
    labels_used: int | None
    metrics: dict
    seconds: float
    outputs: dict[str, list[int]]


def retrain_with_command(repository: Path, store: LocalStore, command: str, *, model: str, groups: list[str] | None = None,
                         datasets: Path | None = None, class_names: list[str] | None = None, fmt: str = "jsonl",
                         timeout_s: float = 3600.0, smoke: bool = True, **placeholders) -> CommandRetrain:
    """Export the store's labels as a snapshot, run `command` (placeholders: {dataset},
    {version_dir}, {model_dir}, {version}, {python} and any given) to write the next version
    into a scratch folder, check that it loads in a real tritonserver and answers with the
    outputs its config promises, and only then move it into the repository."""
    import shlex
    import subprocess
    import sys

    from triton_al.loop.dataset import DatasetError, export_dataset
    from triton_al.loop.smoke import SmokeTestError, smoke_test

    model_dir = Path(repository) / model
    existing = versions(model_dir) if model_dir.is_dir() else []
    if not existing or not (model_dir / "config.pbtxt").is_file():
        raise RetrainError(f"{model_dir}: needs a config.pbtxt and a version folder to start from")
    try:
        export = export_dataset(store, Path(datasets) if datasets else store.root / "datasets", fmt,
                                groups=groups, class_names=class_names)
    except DatasetError as e:
        raise RetrainError(str(e)) from None
    version = existing[-1] + 1
    scratch = model_dir / f".{version}.building"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for f in (model_dir / str(existing[-1])).iterdir():  # carry over what is not the model (a model.py shim)
        if f.is_file() and f.name not in MODEL_FILES and f.name != "metrics.json":
            shutil.copy2(f, scratch / f.name)
    values = {"dataset": str(export.path), "version_dir": str(scratch), "model_dir": str(model_dir),
              "version": str(version), "python": sys.executable, **{k: str(v) for k, v in placeholders.items()}}
    try:
        argv = [part.format(**values) for part in shlex.split(command)]
    except KeyError as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RetrainError(f"--command: unknown placeholder {{{e.args[0]}}} (known: {', '.join(sorted(values))})") from None
    log_path = export.path.parent / f"retrain-{model}-{version}.log"
    started = time.perf_counter()
    try:
        with open(log_path, "wb") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RetrainError(f"the training command could not finish ({e}); log: {log_path}") from None
    seconds = time.perf_counter() - started
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RetrainError(f"the training command exited with code {done.returncode}; last lines of {log_path}:\n{tail}")
    outputs: dict[str, list[int]] = {}
    if smoke:
        try:
            outputs = smoke_test(model_dir, scratch, version)
        except SmokeTestError as e:
            failed = model_dir / f"failed-{version}"
            shutil.rmtree(failed, ignore_errors=True)
            scratch.rename(failed)  # kept for a look, under a name Triton does not read as a version
            raise RetrainError(f"{e}; the version was not placed in the repository (kept in {failed})") from None
    metrics_file = scratch / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    target = model_dir / str(version)
    scratch.rename(target)
    return CommandRetrain(version, target, export.snapshot, export.path, metrics.get("labels_used"), metrics, seconds, outputs)
