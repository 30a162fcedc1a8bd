"""Does it pay? Uncertainty sampling against random sampling on Fashion-MNIST (a simulation:
labels come from the dataset's ground truth), with the example CNN.

    scripts/bench.sh loop

Warm start: 1,000 random labels, then 5 rounds of 500 labels chosen by entropy, margin,
least_confidence and random; 5 seeds; mean and spread per round. Cold start: 100 labels,
5 rounds of 100, 3 seeds. Writes benchmarks/results/loop-*.json and the learning curves
benchmarks/learning-curve-{warm,cold}.png. Targets (issue 6): after 5 warm rounds entropy
and margin beat random by >= 1 point at equal labels (mean over seeds), and need >= 30%
fewer labels to reach random's final accuracy; all within 15 minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triton_al.loop.simulation import Plan, plot, run

HERE = Path(__file__).parent
PLANS = {
    "warm": Plan(start=1000, per_round=500, rounds=5, seeds=(0, 1, 2, 3, 4)),
    "cold": Plan(start=100, per_round=100, rounds=5, seeds=(0, 1, 2), strategies=("entropy", "margin", "random"),
                 train_steps=150),
    # Issue 15: the uploader's --selection diverse (uncertainty-weighted k-means over thumbnails,
    # each cluster's representative, among the 2,000 most uncertain candidates) against
    # entropy-only and random, and `kcenter` (what diverse was first: uncertainty-weighted
    # greedy k-center). Run alone with `scripts/bench.sh loop -k selection`.
    "selection-cold": Plan(start=100, per_round=100, rounds=5, seeds=tuple(range(10)),
                           strategies=("diverse", "kcenter", "entropy", "random"), train_steps=150),
    "selection-warm": Plan(start=1000, per_round=500, rounds=5, seeds=(0, 1, 2, 3, 4),
                           strategies=("diverse", "kcenter", "entropy", "random")),
    # `diverse` clustering the current model's embeddings of the pool (the 64-unit layer before
    # the classifier) instead of thumbnails: what the uploader does when the served model has an
    # embedding output. `scripts/bench.sh loop -k selection-embedding` (`-k selection` runs these too).
    "selection-embedding-cold": Plan(start=100, per_round=100, rounds=5, seeds=tuple(range(10)),
                                     strategies=("diverse-embedding", "diverse", "entropy", "random"), train_steps=150),
    "selection-embedding-warm": Plan(start=1000, per_round=500, rounds=5, seeds=(0, 1, 2, 3, 4),
                                     strategies=("diverse-embedding", "diverse", "entropy", "random")),
}


@pytest.mark.timeout(0)  # a plan trains for minutes to hours: pyproject's 600 s test timeout stopped them midway
@pytest.mark.parametrize("name", list(PLANS))
def test_active_learning_against_random(benchmark, name):
    pytest.importorskip("jax", reason="the loop benchmark trains models: needs the train extra")

    def progress(seed, strategy, rnd, acc):
        print(f"  [{name}] seed {seed} {strategy:16s} round {rnd}: {acc:.4f}", flush=True)

    curves = benchmark.pedantic(run, args=(PLANS[name],), kwargs={"progress": progress}, rounds=1, iterations=1)
    summary = curves.summary()
    benchmark.extra_info.update(workload=f"active-learning-{name}", summary=summary)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"loop-{name}.json").write_text(json.dumps(summary, indent=1))
    plot(curves, HERE / f"learning-curve-{name}.png",
         f"{'Warm' if name.endswith('warm') else 'Cold'} start: {curves.labels[0]} labels + {PLANS[name].rounds} rounds "
         f"of {PLANS[name].per_round} ({len(PLANS[name].seeds)} seeds)")
    print(json.dumps(summary["strategies"], indent=1))
