"""Turn a pytest-benchmark JSON file into the ratio tables of benchmarks/RESULTS.md.

    python benchmarks/report.py benchmarks/results/scoring.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    runs = json.load(open(path))
    median: dict[str, dict[str, float]] = defaultdict(dict)
    size: dict[str, int] = {}
    for b in runs["benchmarks"]:
        info = b["extra_info"]
        median[info["workload"]][info["impl"]] = b["stats"]["median"]
        size[info["workload"]] = info["input_bytes"]
    bandwidth = None
    if "bandwidth" in median:
        bandwidth = size["bandwidth"] / median.pop("bandwidth")["numpy-copy"]
    machine = runs.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} CPUs; "
          f"run {runs.get('datetime', '?')}")
    if bandwidth:
        print(f"Streaming bandwidth (numpy copy, read+write): {bandwidth / 1e9:.1f} GB/s\n")
    print("| workload | triton_al | numpy | scipy | torch | × numpy | × scipy | × torch | GB/s | of bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload, by_impl in median.items():
        ours = by_impl.get("triton_al")
        if ours is None:
            continue

        def t(impl):
            v = by_impl.get(impl)
            return f"{v * 1e6:.1f} µs" if v else "–"

        def ratio(impl):
            v = by_impl.get(impl)
            return f"{v / ours:.1f}×" if v else "–"

        gbs = size[workload] / ours / 1e9
        frac = f"{size[workload] / ours / bandwidth:.0%}" if bandwidth else "–"
        print(f"| {workload} | {t('triton_al')} | {t('numpy')} | {t('scipy')} | {t('torch')} | "
              f"{ratio('numpy')} | {ratio('scipy')} | {ratio('torch')} | {gbs:.1f} | {frac} |")


if __name__ == "__main__":
    main(sys.argv[1])
