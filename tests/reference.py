"""A plain numpy float64 reference for every strategy and task, written for clarity, not
speed. The Rust kernels must agree with it to within 1e-5."""

from __future__ import annotations

import numpy as np

STRATEGIES = ("entropy", "least_confidence", "margin", "ratio")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def distribution_valid(x: np.ndarray, from_logits: bool, tol: float) -> np.ndarray:
    """Per distribution (last axis): finite, and for probabilities non-negative with sum ≈ 1."""
    finite = np.isfinite(x).all(axis=-1)
    if from_logits:
        return finite
    with np.errstate(invalid="ignore"):
        return finite & (x >= 0).all(axis=-1) & (np.abs(x.sum(axis=-1) - 1.0) <= tol)


def class_scores(x: np.ndarray, strategy: str, from_logits: bool = False, tol: float = 1e-2) -> np.ndarray:
    """Scores of distributions along the last axis; NaN where invalid."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[-1]
    valid = distribution_valid(x, from_logits, tol)
    safe = np.where(valid[..., None], x, 1.0 / c)
    p = softmax(safe) if from_logits else safe / safe.sum(axis=-1, keepdims=True)
    top = np.sort(p, axis=-1)[..., ::-1]
    top1 = top[..., 0]
    top2 = top[..., 1] if c > 1 else np.zeros_like(top1)
    if strategy == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
        s = 1.0 - h / np.log(c) if c > 1 else np.ones_like(top1)
    elif strategy == "least_confidence":
        s = (top1 - 1.0 / c) / (1.0 - 1.0 / c) if c > 1 else np.ones_like(top1)
    elif strategy == "margin":
        s = top1 - top2
    elif strategy == "ratio":
        s = 1.0 - top2 / top1
    else:
        raise ValueError(strategy)
    return np.where(valid, np.clip(s, 0.0, 1.0), np.nan), np.where(valid, top1, np.nan)


def label_scores(x: np.ndarray, strategy: str, from_logits: bool) -> np.ndarray:
    """Per-label binary scores; NaN where invalid."""
    x = np.asarray(x, dtype=np.float64)
    if from_logits:
        valid = np.isfinite(x)
        q = 1.0 / (1.0 + np.exp(-np.where(valid, x, 0.0)))
    else:
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(x) & (x >= 0) & (x <= 1)
        q = np.where(valid, x, 0.5)
    r = 1.0 - q
    if strategy == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(q > 0, q * np.log(q), 0.0) + np.where(r > 0, r * np.log(r), 0.0))
        s = 1.0 - h / np.log(2.0)
    elif strategy in ("least_confidence", "margin"):
        s = np.abs(q - r)
    elif strategy == "ratio":
        s = 1.0 - np.minimum(q, r) / np.maximum(q, r)
    else:
        raise ValueError(strategy)
    return np.where(valid, np.clip(s, 0.0, 1.0), np.nan)


def aggregate(parts: np.ndarray, how: str, k: int = 3, quantile: float = 0.1) -> float:
    if np.isnan(parts).any():
        return np.nan
    if how == "min":
        return float(parts.min())
    if how == "mean":
        return float(parts.mean())
    if how == "least_confident_mean":
        return float(np.sort(parts)[:k].mean())
    if how == "quantile":
        return float(np.quantile(parts, quantile))
    raise ValueError(how)


def score(x, strategy="entropy", task="classification", from_logits=False, **o) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    tol = o.get("sum_tolerance", 1e-2)
    if task == "classification":
        return class_scores(x, strategy, from_logits, tol)[0]
    if task == "multilabel":
        per = label_scores(x, strategy, from_logits)
        return np.array([aggregate(row, o.get("aggregate", "min")) for row in per])
    if task == "detection":
        s, top1 = class_scores(x, strategy, from_logits, tol)
        b, n = x.shape[:2]
        counts = o.get("valid_counts")
        conf_all = o.get("box_confidence")
        floor = o.get("confidence_floor", 0.0)
        out = np.empty(b)
        for i in range(b):
            v = n if counts is None else int(counts[i])
            boxes, conf = s[i, :v], (top1[i, :v] if conf_all is None else np.asarray(conf_all, np.float64)[i, :v])
            if np.isnan(boxes).any() or np.isnan(conf).any():
                out[i] = np.nan
                continue
            kept = boxes[conf >= floor]
            out[i] = (
                o.get("empty_score", 1.0)
                if kept.size == 0
                else aggregate(kept, o.get("aggregate", "min"), o.get("k", 3))
            )
        return out
    if task == "segmentation":
        if o.get("layout", "nchw") == "nchw":
            x = np.moveaxis(x, 1, -1)
        s, _ = class_scores(x, strategy, from_logits, tol)
        how = o.get("aggregate", "mean")
        return np.array([aggregate(img.ravel(), how, quantile=o.get("quantile", 0.1)) for img in s])
    raise ValueError(task)
