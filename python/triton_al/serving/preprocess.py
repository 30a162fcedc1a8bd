"""`preprocess`: decode encoded images (PNG, JPEG, …) into the model's input tensor.

Input: `IMAGE`, TYPE_STRING, dims [1], batched: one encoded image per item. Output: the
config's single output, FP32 with dims [C, H, W] (NCHW, C = 1 grayscale or 3 RGB) or
[H, W, C] when the parameter `layout` is `NHWC`; pixels scaled to [0, 1].

An image that does not decode, or has the wrong size (unless the parameter `resize` is
true), fails its own request with a message naming the item; the other requests of the
batch are answered.
"""

from __future__ import annotations

import io
import json

import numpy as np

from triton_al.serving.backend_utils import error_response, flag, parameters, pb_utils

# Refuse decompression bombs long before they cost memory: no input is near this size.
MAX_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    pass


class Decoder:
    """Encoded bytes -> float32 pixels of a fixed size and channel count (Triton-free)."""

    def __init__(self, height: int, width: int, channels: int, layout: str = "NCHW", resize: bool = False) -> None:
        if channels not in (1, 3):
            raise ValueError(f"preprocess: the output must have 1 or 3 channels, got {channels}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"preprocess: parameter 'layout' must be NCHW or NHWC, got {layout!r}")
        self.height, self.width, self.channels, self.layout, self.resize = height, width, channels, layout, resize

    def decode(self, data: bytes, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ImageError(f"item {index}: expected encoded image bytes, got {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__}")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"item {index}: image of {image.width}x{image.height} pixels is too large")
                if (image.width, image.height) != (self.width, self.height):
                    if not self.resize:
                        raise ImageError(
                            f"item {index}: expected a {self.width}x{self.height} image, got {image.width}x{image.height} "
                            "(set the preprocess parameter 'resize' to true to resize)"
                        )
                    image = image.resize((self.width, self.height), Image.BILINEAR)
                pixels = np.asarray(image.convert("L" if self.channels == 1 else "RGB"), dtype=np.float32)
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"item {index}: not a decodable image ({e})") from None
        pixels = pixels / 255.0
        if self.channels == 1:
            pixels = pixels[None, :, :] if self.layout == "NCHW" else pixels[:, :, None]
        elif self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return pixels

    def decode_batch(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(-1)
        return np.stack([self.decode(item, i) for i, item in enumerate(flat)]) if len(flat) else np.zeros(
            (0, *self.item_shape), np.float32)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = parameters(config)
        (output,) = config["output"]
        self.input_name = config["input"][0]["name"]
        self.output_name = output["name"]
        dims = [int(d) for d in output["dims"]]
        layout = params.get("layout", "NCHW") or "NCHW"
        if len(dims) != 3:
            raise ValueError(f"preprocess: output {self.output_name!r} must have dims [C, H, W] or [H, W, C], got {dims}")
        c, h, w = dims if layout == "NCHW" else (dims[2], dims[0], dims[1])
        self.decoder = Decoder(h, w, c, layout, flag(params.get("resize"), "resize"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
                if tensor is None:
                    raise ImageError(f"missing input {self.input_name!r}")
                pixels = self.decoder.decode_batch(tensor.as_numpy())
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, pixels)]))
            except ImageError as e:
                responses.append(error_response(f"preprocess: {e}"))
        return responses
