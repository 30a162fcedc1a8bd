"""SIMULATED annotation: labels flagged assets from Fashion-MNIST's ground truth.

This stands in for people labelling in an annotation tool, for the demo, the tests and the
benchmarks only. It decodes each stored asset, finds the dataset image with the same
pixels, and writes that image's true label as the asset's label file in the project store
(the format real annotations use; see the README). Every label it writes says
`annotator: "simulated (ground truth)"`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from triton_al.example.data import load, pixel_key
from triton_al.sinks.local import LocalStore

ANNOTATOR = "simulated (ground truth)"


@dataclass
class AnnotationRun:
    labelled: int = 0
    already_labelled: int = 0
    unknown: int = 0
    """Assets whose pixels are not in the dataset (nothing to simulate from)."""


class SimulatedAnnotator:
    def __init__(self, splits: tuple[str, ...] = ("train", "test")) -> None:
        self.truth: dict[str, int] = {}
        for split in splits:
            images, labels = load(split)
            for image, label in zip(images, labels):
                self.truth.setdefault(pixel_key(image), int(label))

    def label_of(self, asset: bytes) -> int | None:
        from PIL import Image

        with Image.open(io.BytesIO(asset)) as image:
            pixels = np.asarray(image.convert("L"), np.uint8)
        return self.truth.get(pixel_key(pixels))

    def annotate(self, store: LocalStore, group: str, limit: int | None = None) -> AnnotationRun:
        """Label the group's assets that have no label yet (at most `limit`, oldest first)."""
        run = AnnotationRun()
        done = {a.content_hash for a in store.annotations(group)}
        for record in store.index(group):
            if limit is not None and run.labelled >= limit:
                break
            if record["content_hash"] in done:
                run.already_labelled += 1
                continue
            label = self.label_of(store.asset_path(group, record).read_bytes())
            if label is None:
                run.unknown += 1
                continue
            store.write_label(group, record["content_hash"], label, annotator=ANNOTATOR)
            done.add(record["content_hash"])
            run.labelled += 1
        return run
