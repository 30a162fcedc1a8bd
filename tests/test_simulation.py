"""The active-learning simulation in quick mode (the full run is benchmarks/bench_loop.py)."""

from __future__ import annotations

import numpy as np
import pytest

import triton_al
from triton_al.loop.simulation import Curves, Plan, plot, run, select


def test_uncertainty_selection_takes_the_lowest_scores_and_random_is_seeded():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=200).astype(np.float32)
    for strategy in ("entropy", "margin", "least_confidence"):
        chosen = select(strategy, probs, 10, rng)
        scores = triton_al.score(probs, strategy=strategy)
        assert scores[chosen].max() <= np.sort(scores)[9] + 1e-7
    a = select("random", probs, 10, np.random.default_rng(5))
    b = select("random", probs, 10, np.random.default_rng(5))
    assert list(a) == list(b) and len(set(a)) == 10


def test_labels_to_reach_interpolates_the_mean_curve():
    c = Curves(Plan(), [100, 200, 300], {"random": [[0.5, 0.6, 0.7]], "entropy": [[0.5, 0.7, 0.8]]})
    assert c.labels_to_reach("random", 0.7) == 300
    assert c.labels_to_reach("entropy", 0.7) == pytest.approx(200)
    s = c.summary()["strategies"]["entropy"]
    assert s["gain_vs_random_final_points"] == 10.0 and s["label_saving_vs_random"] == pytest.approx(1 / 3, abs=1e-3)


def test_diverse_embedding_is_the_uploaders_diverse_choice_over_the_given_embeddings():
    from triton_al.uploader.selection import DEFAULT_POOL, choose, pick_uncertain

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=2500).astype(np.float32)
    centres = rng.normal(size=(8, 64)).astype(np.float32)
    groups = rng.integers(0, 8, 2500)
    emb = np.maximum(centres[groups] + 0.05 * rng.normal(size=(2500, 64)).astype(np.float32), 0)  # ReLU-like, 8 clusters
    chosen = select("diverse-embedding", probs, 8, rng, emb)
    pool = pick_uncertain(triton_al.score(probs, strategy="entropy"), DEFAULT_POOL)
    assert set(chosen.tolist()) <= set(pool.tolist())
    expected = choose("diverse", list(triton_al.score(probs, strategy="entropy")[pool]), None, 8, features=list(emb[pool]))
    assert chosen.tolist() == pool[expected].tolist()
    assert len(set(groups[chosen].tolist())) == 8  # one per embedding cluster
    assert chosen.tolist() == select("diverse-embedding", probs, 8, np.random.default_rng(9), emb).tolist()
    with pytest.raises(AssertionError):
        select("diverse-embedding", probs, 8, rng)  # needs the embeddings


@pytest.mark.slow
def test_quick_simulation_runs_end_to_end(tmp_path):
    pytest.importorskip("jax", reason="needs the train extra")
    plan = Plan(start=200, per_round=100, rounds=2, seeds=(0,), strategies=("entropy", "random", "diverse-embedding"),
                pool_size=1000, test_size=1000, train_steps=40)
    curves = run(plan)
    assert curves.labels == [200, 300, 400]
    for strategy in plan.strategies:
        (accs,) = curves.accuracy[strategy]
        assert len(accs) == 3 and all(0.3 < a < 1 for a in accs)
    assert curves.accuracy["entropy"][0][0] == curves.accuracy["random"][0][0]  # shared round-0 model
    plot(curves, tmp_path / "curve.png", "quick")
    assert (tmp_path / "curve.png").stat().st_size > 1000
