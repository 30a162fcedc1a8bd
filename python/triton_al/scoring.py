"""Scoring and flagging: the Python face of the Rust kernels.

`score` is the compiled function itself (no Python wrapper: a 1x10 call costs about a
microsecond). `evaluate` adds the threshold, the optional random share and the reasons.

Score convention, for every strategy: a confidence in [0, 1] — 1 certain, 0 maximally
uncertain — and an item is flagged when ``score < threshold``. NaN marks invalid model
output (NaN, Inf, negative probabilities, rows not summing to 1 within ``sum_tolerance``);
such an item is always flagged, with reason ``invalid_output``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from triton_al import _core

if TYPE_CHECKING:
    from triton_al.config import ActiveLearningConfig

score = _core.score
# The docstring lives in Rust (rust/python/src/lib.rs) with the function itself.

REASONS: tuple[str | None, ...] = (None, "uncertain", "invalid_output", "random")


@dataclass(frozen=True)
class Evaluation:
    """Per-item result of :func:`evaluate`."""

    scores: npt.NDArray[np.float32]
    """Confidence in [0, 1]; NaN for invalid output."""
    reason_codes: npt.NDArray[np.uint8]
    """0 none, 1 uncertain, 2 invalid_output, 3 random (index into ``REASONS``)."""

    @property
    def flagged(self) -> npt.NDArray[np.bool_]:
        return self.reason_codes != 0

    @property
    def reasons(self) -> list[str | None]:
        return [REASONS[c] for c in self.reason_codes.tolist()]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def evaluate(
    outputs: npt.ArrayLike,
    config: ActiveLearningConfig,
    *,
    seed: int | None = None,
    **per_call: Any,
) -> Evaluation:
    """Score `outputs` with `config` and flag the items to annotate.

    ``seed`` drives the ``random`` strategy and the random share; callers that evaluate a
    stream of batches should pass a different seed per batch (the Triton step does).
    Without one, ``config.seed`` is used, or a fresh seed when that is unset.
    ``per_call`` takes per-batch arrays: ``valid_counts`` and ``box_confidence`` (detection).
    Callers that evaluate many batches with one config should keep an :class:`Evaluator`.
    """
    return Evaluator(config)(outputs, seed=seed, **per_call)


class Evaluator:
    """`evaluate` with one config, its kernel arguments worked out once: per call, only
    the two kernel calls remain (the Triton step calls it once per batch, where resolving
    the config's options again cost as much as scoring a small batch)."""

    def __init__(self, config: ActiveLearningConfig) -> None:
        self.config = config
        self._score_args = {
            "strategy": config.strategy,
            "task": config.task,
            "from_logits": config.from_logits,
            **config.kernel_options(),
        }

    def __call__(self, outputs: npt.ArrayLike, *, seed: int | None = None, **per_call: Any) -> Evaluation:
        config = self.config
        if seed is None:
            seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little")
        args = self._score_args
        if per_call:
            args = {**args, **{k: v for k, v in per_call.items() if v is not None}}
        scores = _core.score(outputs, seed=seed, **args)
        codes = _core.flag(scores, config.threshold, random_fraction=config.random_fraction, seed=seed)
        return Evaluation(scores=scores, reason_codes=codes)
