"""`triton-al report`: plots (PNG, matplotlib) and a small HTML page for the loop.

- metrics across cycles: accuracy and macro F1 against the labels used;
- score distribution per model version: from the step's histogram snapshots saved with
  each cycle when available, else from the scores of the items stored in the project store;
- flag rate over time: items flagged per minute (from the store's index) and each cycle's
  flag rate.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np

from triton_al.loop.cycles import read_cycles
from triton_al.sinks.local import LocalStore


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ") if text else None
    except ValueError:
        return None


def _bucket_counts(snapshot: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(upper bounds, cumulative counts) of a saved histogram snapshot, finite bounds only."""
    pairs = sorted((float(k), v) for k, v in snapshot.items() if float(k) != float("inf"))
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], float)


def version_histograms(cycles: list[dict], store: LocalStore, group: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model version: (bin upper bounds, share of scores in each bin).

    From the step's histogram snapshots saved with consecutive cycles when there are any
    (what version N saw while it served), else from the scores of the stored items."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    snapshots = [c for c in cycles if c.get("score_buckets")]
    for before, after in zip(snapshots, snapshots[1:]):
        bounds, cumulative_after = _bucket_counts(after["score_buckets"])
        _, cumulative_before = _bucket_counts(before["score_buckets"])
        if len(cumulative_before) != len(cumulative_after):
            continue
        counts = np.diff(np.concatenate([[0.0], cumulative_after - cumulative_before]))
        if counts.sum() > 0:
            out[f"v{before['model_version']}"] = (bounds, counts / counts.sum())
    if out:
        return out
    by_version = defaultdict(list)
    for record in store.index(group):
        if record.get("score") is not None:
            by_version[f"v{record.get('model_version')}"].append(record["score"])
    edges = np.linspace(0, 1, 51)
    for version, scores in by_version.items():
        counts, _ = np.histogram(scores, bins=edges)
        out[version + " (stored items)"] = (edges[1:], counts / max(counts.sum(), 1))
    return out


def write_report(store_root: Path, out: Path, group: str = "active-learning") -> Path:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    store = LocalStore(store_root, create=False)
    cycles = read_cycles(store_root)
    figures = []

    fig, ax = plt.subplots(figsize=(6, 4))
    if cycles:
        labels = [c.get("labels_used", i) for i, c in enumerate(cycles)]
        ax.plot(labels, [c["accuracy"] for c in cycles], "o-", label="accuracy")
        ax.plot(labels, [c["macro"]["f1"] for c in cycles], "s--", label="macro F1")
        for c, x in zip(cycles, labels):
            ax.annotate(f"v{c['model_version']}", (x, c["accuracy"]), textcoords="offset points", xytext=(0, 6), fontsize=8)
    ax.set_xlabel("labels used")
    ax.set_ylabel("test set")
    ax.set_title("Model quality per cycle")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    figures.append(("metrics.png", "Accuracy and macro F1 on the held-out set, per cycle."))

    fig, ax = plt.subplots(figsize=(6, 4))
    histograms = version_histograms(cycles, store, group)
    for version, (bounds, shares) in histograms.items():
        ax.step(bounds, shares, where="pre", label=version)
    ax.set_ylabel("share of items")
    ax.set_xlabel("score (confidence)")
    ax.set_title("Score distribution per model version")
    if histograms:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    figures.append(("scores.png", "Scores per model version (a better model shifts mass towards 1)."))

    fig, ax = plt.subplots(figsize=(6, 4))
    times = sorted(t for t in (_time(r.get("flagged_at")) for r in store.index(group)) if t)
    if times:
        minutes = np.array([(t - times[0]).total_seconds() / 60 for t in times])
        counts, edges = np.histogram(minutes, bins=max(1, int(minutes.max()) + 1))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", alpha=0.6, label="flagged per minute")
        ax.set_xlabel("minutes since the first flagged item")
    rates = [(c.get("cycle"), c.get("flag_rate")) for c in cycles if c.get("flag_rate") is not None]
    if rates:
        ax2 = ax.twinx()
        ax2.plot([r[0] for r in rates], [r[1] for r in rates], "r.-", label="flag rate per cycle")
        ax2.set_ylabel("flag rate")
    ax.set_title("Flagged items over time")
    fig.tight_layout()
    fig.savefig(out / "flag_rate.png", dpi=110)
    plt.close(fig)
    figures.append(("flag_rate.png", "Flagged items per minute, and the flag rate of each cycle."))

    def row(c: dict) -> str:
        rate = "" if c.get("flag_rate") is None else f"{c['flag_rate']:.3f}"
        return (f"<tr><td>{c['cycle']}</td><td>v{html.escape(str(c['model_version']))}</td><td>{c.get('labels_used', '')}</td>"
                f"<td>{c['accuracy']:.4f}</td><td>{c['macro']['f1']:.4f}</td><td>{rate}</td><td>{c.get('threshold', '')}</td></tr>")

    rows = "".join(row(c) for c in cycles)
    images = "".join(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                     for name, caption in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>triton-al report</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}figure{{display:inline-block;margin:8px}}</style>
</head><body><h1>Active learning report</h1><p>Store: {html.escape(str(store_root))}, group {html.escape(group)}; {len(cycles)} cycles.</p>
<table><tr><th>cycle</th><th>version</th><th>labels</th><th>accuracy</th><th>macro F1</th><th>flag rate</th><th>threshold</th></tr>{rows}</table>
{images}<h2>Raw records</h2><pre>{html.escape(json.dumps([{k: v for k, v in c.items() if k not in ('per_class', 'confusion', 'score_buckets')} for c in cycles], indent=1))}</pre>
</body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"
