"""triton-al: active learning for models served by NVIDIA Triton Inference Server.

The public API is small: :func:`score`, :func:`evaluate` (and :class:`Evaluator`, the same
with one config kept across batches) and :class:`ActiveLearningConfig`.
They are imported lazily so that processes which only need the outbox or the uploader
(which never score) do not load the compiled extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["score", "evaluate", "Evaluator", "ActiveLearningConfig", "Evaluation", "__version__"]
__version__ = "0.1.0"

_LAZY = {
    "score": "triton_al.scoring",
    "evaluate": "triton_al.scoring",
    "Evaluator": "triton_al.scoring",
    "Evaluation": "triton_al.scoring",
    "ActiveLearningConfig": "triton_al.config",
}

if TYPE_CHECKING:  # pragma: no cover
    from triton_al.config import ActiveLearningConfig
    from triton_al.scoring import Evaluation, Evaluator, evaluate, score


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'triton_al' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
