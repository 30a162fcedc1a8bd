"""Every SIMD variant (AVX-512, AVX2, portable) computes the same scores. The level is
chosen once per process, so each runs in a subprocess with TRITON_AL_SIMD set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import triton_al
from triton_al import _core

PROGRAM = r"""
import json, sys
import numpy as np, triton_al
from triton_al import _core
rng = np.random.default_rng(0)
cases = {
    "probs10": rng.dirichlet(np.ones(10), size=300).astype(np.float32),
    "probs1000": rng.dirichlet(np.ones(1000), size=20).astype(np.float32),
    "logits80": (rng.normal(size=(40, 80)) * 6).astype(np.float32),
}
out = {"level": _core.simd_level()}
for name, x in cases.items():
    for strategy in ("entropy", "least_confidence", "margin", "ratio"):
        out[f"{name}/{strategy}"] = triton_al.score(x, strategy=strategy, from_logits=name.startswith("logits")).tolist()
out["multilabel"] = triton_al.score(rng.normal(size=(50, 7)).astype(np.float32), task="multilabel", from_logits=True).tolist()
out["segmentation"] = triton_al.score(rng.normal(size=(2, 5, 30, 30)).astype(np.float32), task="segmentation", from_logits=True).tolist()
json.dump(out, sys.stdout)
"""


def run_at(level: str) -> dict:
    env = {**os.environ, "TRITON_AL_SIMD": level}
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_all_levels_agree():
    best = run_at("best")
    assert best["level"] == _core.simd_level()
    for level in ("avx2", "portable"):
        other = run_at(level)
        if other["level"] == best["level"]:
            continue  # the CPU has nothing better than this level
        for key, values in best.items():
            if key == "level":
                continue
            np.testing.assert_allclose(other[key], values, rtol=0, atol=2e-6, err_msg=f"{level}: {key}")


def test_the_forced_level_is_used():
    assert run_at("portable")["level"] == "portable"


@pytest.mark.skipif(_core.simd_level() == "portable", reason="no SIMD on this CPU")
def test_the_best_level_is_detected():
    assert _core.simd_level() in ("avx2", "avx512")
