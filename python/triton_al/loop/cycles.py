"""One record per active-learning cycle, appended to `<store>/cycles.jsonl`.

Fields: cycle, time, model_name, model_version, labels_used (base + annotated),
annotated, group, accuracy, per_class, macro, flag_rate, threshold, strategy, scored and
flagged (cumulative counts from the step's metrics, when given), score_buckets (cumulative
histogram from the step's metrics, when given), train_seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FILE = "cycles.jsonl"


def cycles_path(store_root: str | os.PathLike[str]) -> Path:
    return Path(store_root) / FILE


def read_cycles(store_root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = cycles_path(store_root)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


def append_cycle(store_root: str | os.PathLike[str], record: dict[str, Any]) -> dict[str, Any]:
    previous = read_cycles(store_root)
    record = {"cycle": len(previous), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    if previous and record.get("scored") is not None and previous[-1].get("scored") is not None:
        scored = record["scored"] - previous[-1]["scored"]
        flagged = record["flagged"] - previous[-1]["flagged"]
        record.setdefault("flag_rate", flagged / scored if scored > 0 else None)
    elif record.get("scored"):
        record.setdefault("flag_rate", record["flagged"] / record["scored"])
    path = cycles_path(store_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return record
