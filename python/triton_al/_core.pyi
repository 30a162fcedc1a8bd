"""Type stubs for the compiled extension `triton_al._core` (Rust, PyO3)."""

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Strategy = Literal["entropy", "least_confidence", "margin", "ratio", "random"]
Task = Literal["classification", "multilabel", "detection", "segmentation"]

PARALLEL_MIN_ELEMENTS: int

# The outbox (rust/outbox): its schema and how opening brings older files up to date.
OUTBOX_SCHEMA: str
OUTBOX_SCHEMA_VERSION: int
OUTBOX_PAGE_SIZE: int
OUTBOX_MAX_EMBEDDING_DIMS: int
"""The longest embedding an outbox item may carry (values)."""
OUTBOX_MIGRATIONS: dict[int, list[tuple[str, str]]]
"""{version: [(table, column definition) added to reach the next version]}."""
OUTBOX_UPGRADES: list[tuple[str, str, str]]
"""[(trigger whose absence says the upgrade is missing, statements creating it, statements run once after)]."""

def score(
    outputs: npt.ArrayLike,
    *,
    strategy: Strategy = "entropy",
    task: Task = "classification",
    from_logits: bool = False,
    **task_options: Any,
) -> npt.NDArray[np.float32]: ...
def flag(
    scores: npt.NDArray[np.float32],
    threshold: float,
    *,
    random_fraction: float = 0.0,
    seed: int = 0,
) -> npt.NDArray[np.uint8]: ...
def nearest_hamming(hashes: npt.NDArray[np.uint64], h: int) -> tuple[int, int] | None: ...
def nearest_hamming_rows(rows: npt.NDArray[np.uint64], h: npt.NDArray[np.uint64], parts: int = 1) -> tuple[int, int] | None: ...
def nearest_hamming_within(
    rows: npt.NDArray[np.uint64], lead: npt.NDArray[np.uint64], h: npt.NDArray[np.uint64], parts: int, max_distance: int
) -> tuple[int, int] | None: ...
def simd_level() -> Literal["avx512", "avx2", "portable"]: ...
def num_threads() -> int: ...
