"""Does active learning pay? A pool-based SIMULATION on Fashion-MNIST with the example CNN.

Each seed draws a labelled start set and an unlabelled pool from the training split. Every
round trains the model on the labels so far, scores the pool with triton-al's own kernels
(`triton_al.score`, the same code the Triton step runs), and "annotates" (reveals the
ground truth of) the `per_round` items with the lowest scores - or a random sample for
the `random` strategy. Accuracy is measured on the held-out test split after each round.
The round-0 model is shared by all strategies of a seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import triton_al
from triton_al.example.data import load

STRATEGIES = ("entropy", "margin", "least_confidence", "random")
DIVERSE_SCORES = "entropy"  # `diverse`: the uploader's --selection diverse over entropy scores (issue 15)
DIVERSE = ("diverse", "diverse-embedding")  # the uploader's choose("diverse"): over thumbnails / over the model's embeddings
THUMBNAIL_STRATEGIES = ("diverse", "kcenter")
EMBEDDING_STRATEGIES = ("diverse-embedding",)


@dataclass(frozen=True)
class Plan:
    start: int = 1000
    per_round: int = 500
    rounds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    strategies: tuple[str, ...] = STRATEGIES
    pool_size: int = 10_000
    test_size: int = 5_000
    train_steps: int = 200


@dataclass
class Curves:
    plan: Plan
    labels: list[int]
    accuracy: dict[str, list[list[float]]] = field(default_factory=dict)
    """strategy -> per seed -> accuracy after each round (round 0 first)."""
    seconds: float = 0.0

    def mean(self, strategy: str) -> np.ndarray:
        return np.mean(self.accuracy[strategy], axis=0)

    def std(self, strategy: str) -> np.ndarray:
        return np.std(self.accuracy[strategy], axis=0)

    def labels_to_reach(self, strategy: str, target: float) -> float | None:
        """Labels at which the mean curve first reaches `target` (linear interpolation)."""
        curve = self.mean(strategy)
        for i in range(len(curve)):
            if curve[i] >= target:
                if i == 0:
                    return float(self.labels[0])
                x0, x1, y0, y1 = self.labels[i - 1], self.labels[i], curve[i - 1], curve[i]
                return float(x0 + (x1 - x0) * (target - y0) / (y1 - y0))
        return None

    def summary(self) -> dict:
        final_random = float(self.mean("random")[-1]) if "random" in self.accuracy else None
        random_reach = self.labels_to_reach("random", final_random) if final_random is not None else None
        out = {"labels": self.labels, "seconds": round(self.seconds, 1), "plan": self.plan.__dict__, "strategies": {}}
        for s in self.accuracy:
            entry = {"mean": [round(float(v), 4) for v in self.mean(s)], "std": [round(float(v), 4) for v in self.std(s)]}
            if final_random is not None:
                entry["gain_vs_random_final_points"] = round(100 * (float(self.mean(s)[-1]) - final_random), 2)
                reach = self.labels_to_reach(s, final_random)
                entry["labels_to_reach_random_final"] = None if reach is None else round(reach)
                if reach is not None:
                    # against the labels random used in all, and against where random's
                    # (noisy) mean curve first reached its own final accuracy
                    entry["label_saving_vs_random"] = round(1 - reach / self.labels[-1], 3)
                    entry["label_saving_vs_random_first_reach"] = round(1 - reach / random_reach, 3)
            out["strategies"][s] = entry
        return out


def select(strategy: str, probs: np.ndarray, k: int, rng: np.random.Generator, features: np.ndarray | None = None,
           labelled: np.ndarray | None = None) -> np.ndarray:
    """Indices (into `probs`) of the k items to annotate next. `diverse` (the uploader's
    --selection diverse: `choose`, among the DEFAULT_POOL most uncertain) and `kcenter`
    (what `diverse` was before: greedy uncertainty-weighted k-center) need `features`
    (thumbnails, one row per item of `probs`); `diverse-embedding` is `diverse` with the
    current model's embeddings of the items as `features` (what the uploader clusters when
    the served model has an embedding output). `labelled` is not used (kept for callers)."""
    if strategy == "random":
        return rng.choice(len(probs), size=k, replace=False)
    if strategy in (*DIVERSE, "kcenter"):
        from triton_al.uploader.selection import DEFAULT_POOL, choose, normalise, pick_kcenter, pick_uncertain

        scores = triton_al.score(probs, strategy=DIVERSE_SCORES)
        pool = pick_uncertain(scores, DEFAULT_POOL)  # the uploader's bounded candidate pool
        assert features is not None
        if strategy in DIVERSE:
            picked = choose("diverse", list(scores[pool]), None, k, features=list(features[pool]))
        else:
            picked = pick_kcenter(normalise(features[pool]), np.asarray(scores[pool], dtype=np.float64), k)
        return pool[np.asarray(picked, dtype=np.int64)]
    scores = triton_al.score(probs, strategy=strategy)
    return np.argsort(scores, kind="stable")[:k]  # lowest confidence first


def run(plan: Plan, progress=None) -> Curves:
    from triton_al.example.train import predict_embedding, predict_proba, train

    images, labels = load("train")
    test_x, test_y = load("test")
    test_x, test_y = test_x[: plan.test_size], test_y[: plan.test_size]
    curves = Curves(plan, [plan.start + r * plan.per_round for r in range(plan.rounds + 1)],
                    {s: [] for s in plan.strategies})
    started = time.perf_counter()
    thumbs = None
    if set(THUMBNAIL_STRATEGIES) & set(plan.strategies):
        from triton_al.uploader.selection import thumbnails_of_pixels

        thumbs = thumbnails_of_pixels(images)

    def fit_and_score(index: np.ndarray, seed: int):
        model = train(images[index], labels[index], epochs=1, seed=seed, min_steps=plan.train_steps)
        acc = float((predict_proba(model, test_x).argmax(1) == test_y).mean())
        return model, acc

    for seed in plan.seeds:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))
        start = order[: plan.start]
        pool = order[plan.start : plan.start + plan.pool_size]
        model0, acc0 = fit_and_score(start, seed)
        for strategy in plan.strategies:
            pick_rng = np.random.default_rng((seed, 1))
            labelled, unlabelled = start.copy(), pool.copy()
            model, accs = model0, [acc0]
            for r in range(plan.rounds):
                if strategy in EMBEDDING_STRATEGIES:  # this round's model's embeddings of the pool
                    features = predict_embedding(model, images[unlabelled])
                else:
                    features = None if thumbs is None else thumbs[unlabelled]
                chosen = select(strategy, predict_proba(model, images[unlabelled]), plan.per_round, pick_rng,
                                features, None if thumbs is None else thumbs[labelled])
                labelled = np.concatenate([labelled, unlabelled[chosen]])
                unlabelled = np.delete(unlabelled, chosen)
                model, acc = fit_and_score(labelled, seed)
                accs.append(acc)
                if progress:
                    progress(seed, strategy, r + 1, acc)
            curves.accuracy[strategy].append(accs)
    curves.seconds = time.perf_counter() - started
    return curves


def plot(curves: Curves, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in curves.accuracy:
        mean, std = curves.mean(s) * 100, curves.std(s) * 100
        ax.plot(curves.labels, mean, marker="o", label=s, linestyle="--" if s == "random" else "-")
        ax.fill_between(curves.labels, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
