"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx files, gzip)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

DATASET_DIR = Path(os.environ.get("TRITON_AL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = {"train": "train", "test": "t10k"}


class DatasetMissing(FileNotFoundError):
    pass


def _read(path: Path, offset: int) -> np.ndarray:
    if not path.exists():
        raise DatasetMissing(
            f"Fashion-MNIST file {path} not found: install the Debian package "
            f"(apt-get install dataset-fashion-mnist) or set TRITON_AL_FASHION_MNIST to its folder"
        )
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@lru_cache(maxsize=4)
def load(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the `train` or `test` split."""
    if split not in SPLITS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(directory) if directory is not None else DATASET_DIR
    prefix = SPLITS[split]
    images = _read(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1] (the model's `image` input)."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images: expected shape [N, 28, 28], got {list(images.shape)}")
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


def encode_png(image: np.ndarray) -> bytes:
    """One 28x28 uint8 image as PNG bytes (what clients send to the pipeline)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_key(image: np.ndarray) -> str:
    """Identity of an image by its pixels (independent of how it was encoded)."""
    return hashlib.sha1(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()
