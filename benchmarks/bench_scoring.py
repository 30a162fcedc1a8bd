"""Scoring speed: triton_al against the obvious numpy code, scipy.stats.entropy and torch
(CPU), side by side in one run, plus a memory-bandwidth probe measured in the same run.

    scripts/bench.sh scoring        # runs this file and writes the ratio table

Every implementation computes the same thing: the normalised entropy score 1 − H(p)/ln C per
item (aggregated per image for detection and segmentation). Not part of the test suite.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import triton_al

try:
    import scipy.stats
except ImportError:  # pragma: no cover - optional baseline
    scipy = None
try:
    import torch
except ImportError:  # pragma: no cover - optional baseline
    torch = None

# name: (task, shape, from_logits)
WORKLOADS = {
    "cls-1x10-probs": ("classification", (1, 10), False),
    "cls-1x10-logits": ("classification", (1, 10), True),
    "cls-64x10-probs": ("classification", (64, 10), False),
    "cls-64x10-logits": ("classification", (64, 10), True),
    "cls-256x1000-probs": ("classification", (256, 1000), False),
    "cls-256x1000-logits": ("classification", (256, 1000), True),
    "cls-4096x1000-probs": ("classification", (4096, 1000), False),
    "cls-4096x1000-logits": ("classification", (4096, 1000), True),
    # 131 MB: larger than any cache here, so this one measures streaming from memory.
    "cls-32768x1000-probs": ("classification", (32768, 1000), False),
    "det-16x1000x80-probs": ("detection", (16, 1000, 80), False),
    "seg-4x21x512x512-logits": ("segmentation", (4, 21, 512, 512), True),
}
CLASS_AXIS = {"classification": -1, "detection": -1, "segmentation": 1}


@functools.cache
def data(name: str) -> np.ndarray:
    task, shape, from_logits = WORKLOADS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32) * 3
    if from_logits:
        return x
    axis = CLASS_AXIS[task]
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def reduce_items(task: str, per: np.ndarray) -> np.ndarray:
    if task == "detection":
        return per.min(axis=1)
    if task == "segmentation":
        return per.mean(axis=(1, 2))
    return per


# ---- implementations -----------------------------------------------------------------------


def run_triton_al(name):
    task, _, from_logits = WORKLOADS[name]
    x = data(name)
    return lambda: triton_al.score(x, task=task, from_logits=from_logits)


def run_numpy(name):
    task, shape, from_logits = WORKLOADS[name]
    x, axis = data(name), CLASS_AXIS[task]
    inv_ln_c = 1.0 / np.log(shape[axis])

    def go():
        if from_logits:
            m = x.max(axis=axis, keepdims=True)
            y = x - m
            e = np.exp(y)
            z = e.sum(axis=axis, keepdims=True)
            logp = y - np.log(z)
            h = -(e / z * logp).sum(axis=axis)
        else:
            h = -(x * np.log(np.clip(x, 1e-30, None))).sum(axis=axis)
        return reduce_items(task, 1.0 - h * inv_ln_c)

    return go


def run_scipy(name):
    task, shape, from_logits = WORKLOADS[name]
    if scipy is None or from_logits:
        pytest.skip("scipy.stats.entropy takes probabilities" if scipy else "scipy not installed")
    x, axis = data(name), CLASS_AXIS[task]
    inv_ln_c = 1.0 / np.log(shape[axis])
    return lambda: reduce_items(task, 1.0 - scipy.stats.entropy(x, axis=axis) * inv_ln_c)


def run_torch(name):
    if torch is None:
        pytest.skip("torch not installed")
    task, shape, from_logits = WORKLOADS[name]
    x, axis = data(name), CLASS_AXIS[task]
    inv_ln_c = 1.0 / float(np.log(shape[axis]))

    def go():
        t = torch.from_numpy(x)  # no copy
        if from_logits:
            logp = torch.log_softmax(t, dim=axis)
            h = -(logp.exp() * logp).sum(dim=axis)
        else:
            h = -(t * t.clamp_min(1e-30).log()).sum(dim=axis)
        s = 1.0 - h * inv_ln_c
        if task == "detection":
            s = s.amin(dim=1)
        elif task == "segmentation":
            s = s.mean(dim=(1, 2))
        return s.numpy()

    return go


IMPLEMENTATIONS = {"triton_al": run_triton_al, "numpy": run_numpy, "scipy": run_scipy, "torch": run_torch}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_scoring(benchmark, workload, impl):
    fn = IMPLEMENTATIONS[impl](workload)
    benchmark.group = workload
    benchmark.extra_info.update(workload=workload, impl=impl, input_bytes=int(data(workload).nbytes))
    result = np.asarray(benchmark(fn), dtype=np.float64)
    # Same numbers from every implementation (or the comparison would be meaningless).
    want = triton_al.score(data(workload), task=WORKLOADS[workload][0], from_logits=WORKLOADS[workload][2])
    np.testing.assert_allclose(result, want, atol=2e-4)


def test_memory_bandwidth(benchmark):
    """Streaming bandwidth probe: a 256 MiB numpy copy (STREAM-copy convention: bytes read
    plus bytes written, per second)."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    benchmark.group = "bandwidth"
    benchmark.extra_info.update(workload="bandwidth", impl="numpy-copy", input_bytes=int(2 * src.nbytes))
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=10, warmup_rounds=2)
