"""What the active_learning step costs in the served pipeline, measured side by side.

    scripts/bench.sh pipeline

One tritonserver serves `fashion_cnn_al` (preprocess -> fashion_cnn -> active_learning),
`fashion_cnn_plain` (the same ensemble without the step) and `fashion_cnn_noop` (with an
empty Python-backend step in its place: the floor any Python-backend step pays for the
extra process hop). Clients send PNGs over gRPC
in closed loops (each sends its next request when the previous answer arrives), batch 1
and batch 32, 1 and 4 concurrent clients; the three pipelines take turns in windows of
1 s, 6 each, in one run (so drift on a shared machine falls on all alike). Reported:
p50/p99 latency per request and items per second; the step's cost is the difference at
p50 and the throughput ratio. Target (issue 5): under 0.3 ms added at p50
for batch 1, under 10% throughput lost.

The outbox is real (flagged items are appended; the uploader is off so that it does not
compete for the two cores - its cost is measured in bench_outbox.py).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 6  # windows per pipeline, taking turns
WINDOW_S = 1.0

PLAIN = """name: "fashion_cnn_plain"
platform: "ensemble"
max_batch_size: 64
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    { model_name: "preprocess" model_version: -1 input_map { key: "IMAGE" value: "IMAGE" } output_map { key: "image" value: "image" } },
    { model_name: "fashion_cnn" model_version: -1 input_map { key: "image" value: "image" } output_map { key: "PROBS" value: "PROBS" } }
  ]
}
"""

# The floor for any Python-backend step: one that returns constant outputs and does nothing.
NOOP_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            n = pb_utils.get_input_tensor_by_name(r, "PROBS").as_numpy().shape[0]
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SCORE", np.ones((n, 1), np.float32)),
                                                   pb_utils.Tensor("FLAGGED", np.zeros((n, 1), bool))]))
        return out
"""

RESULTS: dict[tuple[str, int, int], dict] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from triton_al.serving.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("bench")
    repo = tmp / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "fashion_cnn_plain" / "1").mkdir(parents=True)
    (repo / "fashion_cnn_plain" / "config.pbtxt").write_text(PLAIN)
    # fashion_cnn_noop: the same ensemble as fashion_cnn_al with an empty Python step.
    (repo / "noop_step" / "1").mkdir(parents=True)
    (repo / "noop_step" / "1" / "model.py").write_text(NOOP_MODEL)
    step_config = (repo / "active_learning" / "config.pbtxt").read_text()
    (repo / "noop_step" / "config.pbtxt").write_text(step_config.split("parameters {")[0].replace('name: "active_learning"', 'name: "noop_step"') + 'backend: "python"\n')
    (repo / "fashion_cnn_noop" / "1").mkdir(parents=True)
    (repo / "fashion_cnn_noop" / "config.pbtxt").write_text((repo / "fashion_cnn_al" / "config.pbtxt").read_text()
        .replace('name: "fashion_cnn_al"', 'name: "fashion_cnn_noop"').replace('model_name: "active_learning"', 'model_name: "noop_step"'))
    with Pipeline(repo, tmp / "data", uploader=False) as p:
        yield p.server


@pytest.fixture(scope="module")
def pngs():
    from triton_al.example.data import encode_png, load

    images = load("test")[0][:2048]
    return np.array([[encode_png(x)] for x in images], dtype=object)


def closed_loop(url: str, model: str, pngs: np.ndarray, batch: int, clients: int, duration_s: float) -> dict:
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def client(k: int) -> None:
        mine = []
        with grpcclient.InferenceServerClient(url) as c:
            i = k * 97
            while True:
                start = (i * batch) % (len(pngs) - batch)
                inp = grpcclient.InferInput("IMAGE", [batch, 1], "BYTES")
                inp.set_data_from_numpy(pngs[start : start + batch])
                t0 = time.perf_counter()
                c.infer(model, [inp])
                t1 = time.perf_counter()
                if t1 > stop_at:
                    break
                mine.append(t1 - t0)
                i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies_ms": np.array(latencies) * 1e3, "items": len(latencies) * batch, "wall_s": wall}


MODELS = ("fashion_cnn_plain", "fashion_cnn_noop", "fashion_cnn_al")


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("batch", [1, 32])
def test_pipeline(benchmark, server, pngs, batch, clients):
    """The three pipelines take turns, ROUNDS windows each, so that whatever else the
    machine does in the meantime falls on all of them alike; latencies are pooled."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as c:  # warm up this shape
        inp = grpcclient.InferInput("IMAGE", [batch, 1], "BYTES")
        inp.set_data_from_numpy(pngs[:batch])
        for model in MODELS:
            for _ in range(20):
                c.infer(model, [inp])

    def interleaved() -> dict[str, list[dict]]:
        windows: dict[str, list[dict]] = {m: [] for m in MODELS}
        for r in range(ROUNDS):
            order = MODELS if r % 2 == 0 else MODELS[::-1]  # no pipeline always goes first
            for model in order:
                windows[model].append(closed_loop(server.grpc_url, model, pngs, batch, clients, WINDOW_S))
        return windows

    windows = benchmark.pedantic(interleaved, rounds=1, iterations=1)
    for model, ws in windows.items():
        lat = np.concatenate([w["latencies_ms"] for w in ws])
        result = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                  "items_per_s": sum(w["items"] for w in ws) / sum(w["wall_s"] for w in ws), "requests": len(lat)}
        benchmark.extra_info[model] = result
        RESULTS[(model, batch, clients)] = result


def test_report():
    """Print the side-by-side table (each pipeline's windows pooled)."""
    rows = []
    for batch in (1, 32):
        for clients in (1, 4):
            plain, al = RESULTS.get(("fashion_cnn_plain", batch, clients)), RESULTS.get(("fashion_cnn_al", batch, clients))
            noop = RESULTS.get(("fashion_cnn_noop", batch, clients))
            if not plain or not al or not noop:
                continue
            rows.append({
                "batch": batch, "clients": clients,
                "p50_plain_ms": round(plain["p50_ms"], 3), "p50_noop_ms": round(noop["p50_ms"], 3),
                "p50_al_ms": round(al["p50_ms"], 3),
                "added_p50_ms": round(al["p50_ms"] - plain["p50_ms"], 3),
                "al_over_noop_p50_ms": round(al["p50_ms"] - noop["p50_ms"], 3),
                "p99_plain_ms": round(plain["p99_ms"], 2), "p99_al_ms": round(al["p99_ms"], 2),
                "items_s_plain": round(plain["items_per_s"]), "items_s_noop": round(noop["items_per_s"]),
                "items_s_al": round(al["items_per_s"]),
                "throughput_ratio": round(al["items_per_s"] / plain["items_per_s"], 3),
            })
    print("\n" + json.dumps(rows, indent=1))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline-table.json").write_text(json.dumps(rows, indent=1))
