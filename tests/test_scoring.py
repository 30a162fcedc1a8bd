"""The Rust kernels against the float64 numpy reference (tests/reference.py), for every
strategy, task and input kind, plus the edge cases the score convention promises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
import triton_al
from triton_al import _core

TOL = 1e-5
STRATEGIES = ref.STRATEGIES
DTYPES = (np.float32, np.float64, np.float16)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_scores(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN (invalid) items differ")
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=tol)


# ---- input generators --------------------------------------------------------------------


@st.composite
def probabilities(draw, shape, dtype=np.float32, zeros=True):
    """Rows on the simplex (possibly with exact zeros), cast to `dtype`."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    concentration = draw(st.sampled_from([0.05, 0.5, 1.0, 10.0]))
    p = rng.gamma(concentration, size=shape) + 1e-12
    if zeros and draw(st.booleans()):
        p[rng.random(shape) < 0.3] = 0.0
        p[..., 0] += 1e-3  # keep every row non-empty
    p /= p.sum(axis=-1, keepdims=True)
    return p.astype(dtype)


@st.composite
def logits(draw, shape, dtype=np.float32):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    shift = draw(st.sampled_from([0.0, -500.0, 1e4]))
    return (rng.normal(size=shape) * scale + shift).astype(dtype)


def quantised(x: np.ndarray) -> np.ndarray:
    """The values the kernels actually see (float16 inputs are exact in float64)."""
    return x.astype(np.float64)


# ---- classification ------------------------------------------------------------------------


@FAST
@given(data=st.data(), b=st.integers(0, 40), c=st.integers(1, 70), strategy=st.sampled_from(STRATEGIES), dtype=st.sampled_from(DTYPES))
def test_classification_probabilities_match_reference(data, b, c, strategy, dtype):
    p = data.draw(probabilities((b, c), dtype))
    assert_scores(triton_al.score(p, strategy=strategy), ref.score(quantised(p), strategy))


@FAST
@given(data=st.data(), b=st.integers(0, 40), c=st.integers(1, 70), strategy=st.sampled_from(STRATEGIES), dtype=st.sampled_from(DTYPES))
def test_classification_logits_match_reference(data, b, c, strategy, dtype):
    x = data.draw(logits((b, c), dtype))
    if dtype == np.float16 and not np.isfinite(x).all():
        x = np.nan_to_num(x, posinf=60000, neginf=-60000)
    got = triton_al.score(x, strategy=strategy, from_logits=True)
    assert_scores(got, ref.score(quantised(x), strategy, from_logits=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_hot_rows_are_certain_and_uniform_rows_are_not(strategy):
    for c in (2, 3, 10, 1000):
        one_hot = np.eye(c, dtype=np.float32)
        np.testing.assert_allclose(triton_al.score(one_hot, strategy=strategy), 1.0, atol=1e-6)
        uniform = np.full((3, c), 1.0 / c, dtype=np.float32)
        np.testing.assert_allclose(triton_al.score(uniform, strategy=strategy), 0.0, atol=1e-5)


def test_two_classes():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], dtype=np.float32)
    for strategy in STRATEGIES:
        assert_scores(triton_al.score(p, strategy=strategy), ref.score(p, strategy))
    # For C = 2, least confidence and margin are the same number: |p1 - p2|.
    np.testing.assert_allclose(triton_al.score(p, strategy="least_confidence"), [0.0, 0.8, 1.0], atol=1e-6)
    np.testing.assert_allclose(triton_al.score(p, strategy="margin"), [0.0, 0.8, 1.0], atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_twenty_thousand_classes(strategy, from_logits):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20_000)) * 3
    if not from_logits:
        x = ref.softmax(x)
        x[0] = rng.dirichlet(np.full(20_000, 0.01))
    x = x.astype(np.float32)
    assert_scores(triton_al.score(x, strategy=strategy, from_logits=from_logits), ref.score(x, strategy, from_logits=from_logits))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extreme_logits_are_stable(strategy):
    x = np.array(
        [[1e4, -1e4, 0.0], [1e4, 1e4 - 1.0, 1e4 - 2.0], [-1e4, -1e4, -1e4], [3e38, 3e38, -3e38], [0.0, 0.0, 0.0]],
        dtype=np.float32,
    )
    got = triton_al.score(x, strategy=strategy, from_logits=True)
    assert np.isfinite(got).all()
    assert_scores(got, ref.score(x, strategy, from_logits=True))


def test_float64_logits_keep_small_differences_between_large_values():
    x = np.array([[1e4 + 0.0001, 1e4, 1e4 - 0.0007], [5e5 + 0.25, 5e5, 5e5 - 2.5]])
    for strategy in STRATEGIES:
        assert_scores(triton_al.score(x, strategy=strategy, from_logits=True), ref.score(x, strategy, from_logits=True))


def test_empty_batch():
    for task, shape in [("classification", (0, 10)), ("multilabel", (0, 4)), ("detection", (0, 5, 3)), ("segmentation", (0, 3, 4, 4))]:
        out = triton_al.score(np.zeros(shape, np.float32), task=task)
        assert out.shape == (0,) and out.dtype == np.float32


def test_invalid_rows_are_nan_and_the_rest_is_scored():
    p = np.array(
        [
            [0.2, 0.8],
            [np.nan, 1.0],
            [np.inf, 0.0],
            [-0.1, 1.1],
            [0.3, 0.3],  # sums to 0.6
            [0.6, 0.4],
        ],
        dtype=np.float32,
    )
    for strategy in (*STRATEGIES, "random"):
        got = triton_al.score(p, strategy=strategy)
        assert np.isnan(got[1:5]).all(), strategy
        assert np.isfinite(got[[0, 5]]).all(), strategy
    x = np.array([[1.0, 2.0], [np.nan, 0.0], [-np.inf, 0.0], [0.0, np.inf]], np.float32)
    got = triton_al.score(x, from_logits=True)
    assert np.isfinite(got[0]) and np.isnan(got[1:]).all()


def test_sum_tolerance_is_a_knob_and_rows_inside_it_are_renormalised():
    p = np.array([[0.45, 0.5]], dtype=np.float32)  # sums to 0.95
    assert np.isnan(triton_al.score(p)[0])
    got = triton_al.score(p, sum_tolerance=0.1)
    np.testing.assert_allclose(got, ref.score(p, sum_tolerance=0.1), atol=TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(strategy):
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(12), size=30).astype(np.float32)
    want = ref.score(p, strategy)
    assert_scores(triton_al.score(np.asfortranarray(p), strategy=strategy), want)
    wide = np.zeros((60, 24), np.float32)
    wide[::2, ::2] = p
    assert_scores(triton_al.score(wide[::2, ::2], strategy=strategy), want)
    assert_scores(triton_al.score(p[::-1], strategy=strategy), want[::-1])


def test_lists_and_other_float_dtypes_are_accepted():
    p = [[0.1, 0.9], [0.5, 0.5]]
    np.testing.assert_allclose(triton_al.score(p), ref.score(np.array(p)), atol=TOL)
    np.testing.assert_allclose(triton_al.score(np.array(p, np.float16)), ref.score(np.array(p, np.float16)), atol=TOL)


def test_big_batches_take_the_parallel_path_and_agree():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(10), size=60_000).astype(np.float32)  # > PARALLEL_MIN_ELEMENTS
    assert p.size >= _core.PARALLEL_MIN_ELEMENTS
    assert_scores(triton_al.score(p), ref.score(p))
    x = rng.normal(size=(300, 1000)).astype(np.float32) * 5
    assert_scores(triton_al.score(x, from_logits=True, strategy="margin"), ref.score(x, "margin", from_logits=True))


# ---- random --------------------------------------------------------------------------------


def test_random_strategy_is_seeded_uniform_and_keeps_invalid_rows():
    p = np.tile(np.array([[0.3, 0.7]], np.float32), (20_000, 1))
    p[7] = np.nan
    a = triton_al.score(p, strategy="random", seed=11)
    b = triton_al.score(p, strategy="random", seed=11)
    c = triton_al.score(p, strategy="random", seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.nan_to_num(a), np.nan_to_num(c))
    assert np.isnan(a[7]) and np.isnan(a).sum() == 1
    valid = a[~np.isnan(a)]
    assert valid.min() >= 0 and valid.max() < 1
    assert abs((valid < 0.25).mean() - 0.25) < 0.02


# ---- multi-label ---------------------------------------------------------------------------


@FAST
@given(data=st.data(), b=st.integers(0, 30), labels=st.integers(1, 40), strategy=st.sampled_from(STRATEGIES), from_logits=st.booleans(), how=st.sampled_from(["min", "mean"]), dtype=st.sampled_from(DTYPES))
def test_multilabel_matches_reference(data, b, labels, strategy, from_logits, how, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if from_logits:
        x = (rng.normal(size=(b, labels)) * data.draw(st.sampled_from([0.5, 5.0, 100.0]))).astype(dtype)
    else:
        x = rng.random((b, labels))
        x[rng.random((b, labels)) < 0.1] = data.draw(st.sampled_from([0.0, 1.0]))
        x = x.astype(dtype)
    got = triton_al.score(x, strategy=strategy, task="multilabel", from_logits=from_logits, aggregate=how)
    assert_scores(got, ref.score(quantised(x), strategy, "multilabel", from_logits, aggregate=how))


def test_multilabel_invalid_labels():
    q = np.array([[0.2, 0.9], [1.2, 0.5], [-0.01, 0.5], [np.nan, 0.5]], np.float32)
    got = triton_al.score(q, task="multilabel")
    assert np.isfinite(got[0]) and np.isnan(got[1:]).all()


# ---- detection -----------------------------------------------------------------------------


@FAST
@given(data=st.data(), b=st.integers(0, 8), n=st.integers(1, 30), c=st.integers(1, 90), strategy=st.sampled_from(STRATEGIES), from_logits=st.booleans(), how=st.sampled_from(["min", "mean", "least_confident_mean"]))
def test_detection_matches_reference(data, b, n, c, strategy, from_logits, how):
    x = data.draw(logits((b, n, c)) if from_logits else probabilities((b, n, c)))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    opts = {"aggregate": how, "k": data.draw(st.integers(1, 5))}
    if data.draw(st.booleans()):
        opts["valid_counts"] = rng.integers(0, n + 1, size=b)
        # Padding is never read: fill it with garbage.
        for i, v in enumerate(opts["valid_counts"]):
            x[i, v:] = np.nan
    if data.draw(st.booleans()):
        opts["box_confidence"] = rng.random((b, n)).astype(np.float32)
    if data.draw(st.booleans()):
        opts["confidence_floor"] = float(data.draw(st.sampled_from([0.2, 0.5, 0.9])))
    if data.draw(st.booleans()):
        opts["empty_score"] = 0.0
    got = triton_al.score(x, strategy=strategy, task="detection", from_logits=from_logits, **opts)
    assert_scores(got, ref.score(x, strategy, "detection", from_logits, **opts))


def test_detection_empty_images_get_the_documented_score():
    x = np.zeros((2, 4, 3), np.float32)
    x[...] = [0.4, 0.3, 0.3]
    got = triton_al.score(x, task="detection", valid_counts=[0, 4])
    assert got[0] == 1.0 and got[1] < 0.1
    assert triton_al.score(x, task="detection", valid_counts=[0, 0], empty_score=0.0).tolist() == [0.0, 0.0]
    # All boxes below the floor count as no boxes.
    assert triton_al.score(x, task="detection", confidence_floor=0.5).tolist() == [1.0, 1.0]


def test_detection_invalid_box_invalidates_its_image_only():
    x = np.full((3, 2, 2), 0.5, np.float32)
    x[1, 1, 0] = np.nan
    got = triton_al.score(x, task="detection")
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all()


# ---- segmentation --------------------------------------------------------------------------


@FAST
@given(data=st.data(), b=st.integers(0, 3), c=st.integers(1, 40), h=st.integers(1, 20), w=st.integers(1, 20), strategy=st.sampled_from(STRATEGIES), from_logits=st.booleans(), layout=st.sampled_from(["nchw", "nhwc"]), how=st.sampled_from(["mean", "min", "quantile"]))
def test_segmentation_matches_reference(data, b, c, h, w, strategy, from_logits, layout, how):
    shape = (b, h, w, c)
    x = data.draw(logits(shape) if from_logits else probabilities(shape))
    if layout == "nchw":
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    q = data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]))
    got = triton_al.score(x, strategy=strategy, task="segmentation", from_logits=from_logits, layout=layout, aggregate=how, quantile=q)
    assert_scores(got, ref.score(x, strategy, "segmentation", from_logits, layout=layout, aggregate=how, quantile=q))


def test_segmentation_large_image_parallel_path():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 21, 160, 200)).astype(np.float32)
    for layout in ("nchw", "nhwc"):
        y = x if layout == "nchw" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
        got = triton_al.score(y, task="segmentation", from_logits=True, layout=layout, aggregate="quantile", quantile=0.05)
        assert_scores(got, ref.score(y, "entropy", "segmentation", True, layout=layout, aggregate="quantile", quantile=0.05))


# ---- errors name what was wrong -------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: triton_al.score(np.zeros(10, np.float32)), ValueError, ["outputs", "2 dimensions", "[10]"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32)), ValueError, ["classification", "[B, C]"]),
        (lambda: triton_al.score(np.zeros((2, 0), np.float32)), ValueError, ["class axis is empty"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.int64)), TypeError, ["dtype", "int64"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.complex64)), TypeError, ["dtype"]),
        (lambda: triton_al.score("nope"), TypeError, ["outputs"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), strategy="bald"), ValueError, ["strategy", "bald", "entropy"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), task="caption"), ValueError, ["task", "caption"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), layout="nchw"), ValueError, ["layout", "classification"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), bogus=1), ValueError, ["bogus"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), task="multilabel", aggregate="median"), ValueError, ["aggregate", "median"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), task="multilabel", aggregate="quantile"), ValueError, ["aggregate", "multilabel"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", valid_counts=[1]), ValueError, ["valid_counts", "2"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", valid_counts=[1, 4]), ValueError, ["valid_counts", "4"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", valid_counts=[1, -1]), ValueError, ["valid_counts", "negative"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", box_confidence=np.zeros((2, 2))), ValueError, ["box_confidence", "[2, 3]"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", aggregate="least_confident_mean", k=0), ValueError, ["k"]),
        (lambda: triton_al.score(np.zeros((2, 3, 4), np.float32), task="detection", empty_score=2.0), ValueError, ["empty_score"]),
        (lambda: triton_al.score(np.zeros((1, 3, 4, 4), np.float32), task="segmentation", layout="chw"), ValueError, ["layout", "chw"]),
        (lambda: triton_al.score(np.zeros((1, 3, 4, 4), np.float32), task="segmentation", aggregate="quantile", quantile=1.5), ValueError, ["quantile"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), sum_tolerance="x"), TypeError, ["sum_tolerance"]),
        (lambda: triton_al.score(np.zeros((2, 3), np.float32), sum_tolerance=-1), ValueError, ["sum_tolerance"]),
    ],
)
def test_bad_calls_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"
