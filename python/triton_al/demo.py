"""The main job's demo (`bash scripts/demo.sh`).

Scores a batch of simulated classifier outputs with every strategy and shows what each
would flag. (Becomes the end-to-end Triton demo once the pipeline lands.)
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

import triton_al
from triton_al import _core


def simulated_outputs(n: int, classes: int, seed: int = 0) -> np.ndarray:
    """Softmax outputs ranging from confident to confused, plus a few invalid rows."""
    rng = np.random.default_rng(seed)
    sharpness = rng.uniform(0.0, 6.0, size=(n, 1))
    logits = rng.normal(size=(n, classes)) * sharpness
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    probs[:3] = np.nan  # a model glitch: never crashes, flagged as invalid_output
    return probs.astype(np.float32)


def main() -> None:
    console = Console()
    outputs = simulated_outputs(10_000, 10)
    console.print(f"[bold]triton-al[/] scoring demo: {len(outputs):,} simulated predictions over 10 classes "
                  f"(kernels: {_core.simd_level()}, {_core.num_threads()} threads)")
    table = Table("strategy", "threshold", "flagged", "uncertain", "invalid_output", "mean score", "time")
    for strategy, threshold in [("entropy", 0.5), ("margin", 0.2), ("least_confidence", 0.5), ("ratio", 0.3), ("random", 0.05)]:
        config = triton_al.ActiveLearningConfig(strategy=strategy, threshold=threshold, seed=1)
        start = time.perf_counter()
        result = triton_al.evaluate(outputs, config)
        elapsed = time.perf_counter() - start
        reasons = result.reasons
        table.add_row(strategy, f"{threshold}", f"{result.flagged.sum():,}", f"{reasons.count('uncertain'):,}",
                      f"{reasons.count('invalid_output'):,}", f"{np.nanmean(result.scores):.3f}", f"{elapsed * 1e6:.0f} µs")
    console.print(table)


if __name__ == "__main__":
    main()
