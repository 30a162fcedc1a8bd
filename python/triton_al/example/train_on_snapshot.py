"""The example's retraining as a command, the way `triton-al retrain --command` runs any
team's own training code:

    python -m triton_al.example.train_on_snapshot --data {dataset} --out {version_dir}

It reads a dataset snapshot written by `triton-al dataset export --format jsonl` (the
labelled items), adds the base set the loop started from, trains the example CNN, and
writes into the version folder: `model.onnx`, `model.onnx.json` (provenance) and
`metrics.json` (accuracy and per-class metrics on the held-out test split), which `retrain`
records in the cycle.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np


def snapshot_images(data: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(images uint8 [N, 28, 28], labels, skipped) of a jsonl snapshot, train and val."""
    from PIL import Image

    images, labels, skipped = [], [], 0
    for split in ("train", "val"):
        path = data / f"{split}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            with Image.open(io.BytesIO((data / row["image"]).read_bytes())) as image:
                pixels = np.asarray(image.convert("L"), np.uint8)
            if pixels.shape != (28, 28) or not isinstance(row["label"], int):
                skipped += 1
                continue
            images.append(pixels)
            labels.append(row["label"])
    if not images:
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), skipped
    return np.stack(images), np.array(labels, np.int64), skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="A jsonl dataset snapshot (triton-al dataset export).")
    parser.add_argument("--out", required=True, type=Path, help="The new version folder to write the model into.")
    parser.add_argument("--base-size", type=int, default=1000, help="Labelled training images the loop started from.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from triton_al.example.data import CLASS_NAMES, load
    from triton_al.example.train import export_onnx, predict_proba, train
    from triton_al.loop.evaluation import classification_report
    from triton_al.loop.retrain import base_set

    base_x, base_y = base_set(args.base_size, args.seed)
    extra_x, extra_y, skipped = snapshot_images(args.data)
    x, y = np.concatenate([base_x, extra_x]), np.concatenate([base_y, extra_y])
    started = time.perf_counter()
    model = train(x, y, epochs=args.epochs, seed=args.seed, min_steps=args.min_steps)
    seconds = time.perf_counter() - started
    test_x, test_y = load("test")
    report = classification_report(test_y, predict_proba(model, test_x).argmax(1), CLASS_NAMES)
    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, args.out / "model.onnx")
    provenance = {"trained_on": {"base": int(len(base_y)), "annotated": int(len(extra_y)), "dataset": str(args.data),
                                 "skipped": skipped},
                  "seed": args.seed, "epochs": args.epochs, "test_accuracy": round(report["accuracy"], 4),
                  "train_seconds": round(seconds, 1)}
    (args.out / "model.onnx.json").write_text(json.dumps(provenance, indent=1) + "\n")
    (args.out / "metrics.json").write_text(json.dumps({**report, "labels_used": int(len(y)),
                                                       "annotated": int(len(extra_y)), "train_seconds": round(seconds, 1)}) + "\n")
    print(json.dumps({"accuracy": report["accuracy"], "labels_used": int(len(y))}))


if __name__ == "__main__":
    main()
