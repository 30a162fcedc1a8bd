"""Near-copies of an image, as they reach a server in practice: re-encoded, noised."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from triton_al.example.data import encode_png


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def noisy(pixels: np.ndarray, sigma: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8))
