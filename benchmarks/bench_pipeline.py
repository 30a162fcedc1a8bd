"""What the active_learning step costs in the served pipeline, measured side by side.

    scripts/bench.sh pipeline

One tritonserver (CPU; preprocess and the example CNN are Python-backend models, the CNN run
by onnxruntime) serves one ensemble per variant, all sharing the same preprocess and model
instances:

- `plain`: preprocess -> fashion_cnn, no step;
- `noop`: an empty Python-backend step (the floor any Python-backend step pays: the hop
  into a stub process and back);
- `python`: the Python active_learning step as `attach --step python --embedding-output
  EMBEDDING` writes it (the example repository's settings, Python backend);
- `native`: the native step (`backend: "active_learning"`, in-process), as the example
  repository ships it (threshold 0.5; since 2026-12-02 it carries the model's 64-value
  EMBEDDING through the step and stores flagged items' embeddings in the outbox);
- `native_all`: the native step with threshold 1.0, so (nearly) every item is flagged and
  appended durably (`outbox_sync=full`: the WAL is flushed before the response is sent);
- `native_all_normal`: the same with `outbox_sync=normal` (no flush; isolates the disk).

What carrying the embedding costs (`test_embedding`, EMBEDDING_CLOSED): each step beside
the same step attached without `--embedding-output` to the model as it was before it
exposed EMBEDDING (the ensemble does not map EMBEDDING at all: `*_noemb`), so the pair
differs only in carrying and storing the embedding:
- `python_noemb` / `python`, `native_noemb` / `native` (threshold 0.5);
- `native_all_noemb` / `native_all` and `python_all_noemb` / `python_all`: threshold 1.0,
  durable, so every item's embedding is copied into the outbox;
- `native_all_unstored`: threshold 1.0, attached without `--embedding-output` to the model
  as it is now, so EMBEDDING passes through the step (and reaches the client) but is not
  stored: splits the cost into passing it through and storing it.
The shared fashion_cnn declares EMBEDDING and computes it for every variant (its ONNX
runner runs every declared output); the `*_noemb` ensembles just do not ask for it. So
the model's own price of producing the output is not in these ratios (onnxruntime
computes the layer anyway; what differs is one more [n, 64] tensor out of its stub). Our
client asks for every output of the ensemble (as before), so the `with` variants also
send 256 bytes per item more to the client. `plain` (no step) returns the model's outputs,
EMBEDDING among them.

Every step writes its own outbox file. Clients send distinct PNGs (Fashion-MNIST test
images made unique by a PNG text chunk carrying a counter), so the outbox's dedup never
skips an append; the rows are counted afterwards. Nothing drains the outboxes (no
uploader: it would compete for the two cores); to keep the WAL from growing as the
uploader's checkpoints keep it in production, the benchmark runs a PASSIVE checkpoint on
every outbox every 100 ms from its own sqlite3 connection.

Measurements:
1. Our gRPC client (tritonclient), closed loops (each client sends its next request when the
   previous answer arrives), batch 1 and 32, 1 and 4 clients (threads of one process); the
   pipelines take turns in 1 s windows, ROUNDS each, so drift falls on all alike; latencies
   of a pipeline's windows are pooled. Beside them: Triton's per-model statistics (mean
   queue and compute times), and the CPU the server and its stubs used per request.
2. Triton's perf_analyzer (C++ client, gRPC, concurrency 1 and 4, batch 1 and 32) for
   plain / noop / python / native, in rounds taking turns (see benchmarks/perf_analyzer.py).
3. Open loop, 1,000 flagged items/s from 4 instances of the native step (`instance_group
   { count: 4 }`), flagging nothing / everything durably / everything with
   `outbox_sync=normal`: the step model called directly at 1,000 requests/s of batch 1, and
   the same steps behind the pipeline at 250 requests/s of batch 4 (the pipeline cannot take
   1,000 requests/s of batch 1 on two cores). Both our paced client and perf_analyzer
   (`--request-rate-range`, constant spacing). What an append costs the caller in serving is
   the time the step waits for it to be stored: the step's compute-infer time in Triton's
   latency summaries (`--metrics-config=summary_latencies=true`; scoring itself takes
   microseconds), and the added latency against the same step flagging nothing. The appends
   of concurrent instances are group-committed by one writer thread, so one append's own
   time is not observable from outside.
4. Floors: the Rust writer's own example (4 threads, 1,000 appends/s, 700-byte assets), and
   the disk's fdatasync of a rewritten 4 KiB block from a tiny Python loop.
Each test also records how much CPU other processes used meanwhile (the machine may be
shared), interrupts and hypervisor steal. Targets (issue 12): native step < 0.1 ms added at
p50 for batch 1 and >= 0.95 throughput ratio at batch 1 and 32, 1 and 4 clients; every
request flagged (durable) < 0.5 ms added at p50 for batch 1; 4 instances flagging 1,000
items/s: append p99 < 2 ms (durable). Results: benchmarks/results/pipeline-table.md and
pipeline-results.json (benchmarks/RESULTS.md has the runs and verdicts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import perf_analyzer as pa

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
# TRITON_AL_BENCH_QUICK=1: a smoke run of every part in a fraction of the time (numbers meaningless).
QUICK = bool(os.environ.get("TRITON_AL_BENCH_QUICK"))
ROUNDS = 1 if QUICK else 6  # windows per pipeline, taking turns
WINDOW_S = 1.0
PACED_RATE = 1000.0  # items/s, open loop
PACED_S = 2.0 if QUICK else 8.0
PA_WINDOW_MS = 1000
PA_WINDOWS = 3  # per perf_analyzer run (closed loop; it needs at least 3)
PA_ROUNDS = 1 if QUICK else 3
PACED_BATCH = 4  # through the pipeline: 250 requests/s of 4
POOL = 122_880  # distinct PNGs (a multiple of 32, so batches never straddle the end)

# The floor for any Python-backend step: one that copies its pass-through inputs to the
# outputs of the same name (as the real step does), returns constant SCORE and FLAGGED, and
# does nothing else.
NOOP_MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.passthrough = [o["name"] for o in config["output"] if o["name"] not in ("SCORE", "FLAGGED")]

    def execute(self, requests):
        out = []
        for r in requests:
            tensors = [pb_utils.Tensor(name, pb_utils.get_input_tensor_by_name(r, name).as_numpy()) for name in self.passthrough]
            n = tensors[0].as_numpy().shape[0]
            out.append(pb_utils.InferenceResponse(tensors + [pb_utils.Tensor("SCORE", np.ones((n, 1), np.float32)),
                                                             pb_utils.Tensor("FLAGGED", np.zeros((n, 1), bool))]))
        return out
"""

# label -> (ensemble, step model or None, step kind, parameters over the example's, instances)
VARIANTS: dict[str, tuple[str, str | None, str, dict[str, str], int]] = {
    "plain": ("fashion_cnn_plain", None, "none", {}, 1),
    "noop": ("fashion_cnn_noop", "noop_step", "noop", {}, 1),
    "python": ("fashion_cnn_al_py", "active_learning_py", "python", {}, 1),
    "native": ("fashion_cnn_al", "active_learning", "native", {}, 1),
    # Carrying the embedding (built by attach, see ATTACHED): without / with.
    "python_noemb": ("fashion_cnn_al_py_noemb", "al_py_noemb", "python", {}, 1),
    "native_noemb": ("fashion_cnn_al_noemb", "al_noemb", "native", {}, 1),
    "native_all_noemb": ("fashion_cnn_al_all_noemb", "al_all_noemb", "native", {"threshold": "1.0", "outbox_sync": "full"}, 1),
    "native_all_unstored": ("fashion_cnn_al_all_unstored", "al_all_unstored", "native", {"threshold": "1.0", "outbox_sync": "full"}, 1),
    "python_all": ("fashion_cnn_al_py_all", "al_py_all", "python", {"threshold": "1.0", "outbox_sync": "full"}, 1),
    "python_all_noemb": ("fashion_cnn_al_py_all_noemb", "al_py_all_noemb", "python", {"threshold": "1.0", "outbox_sync": "full"}, 1),
    "native_all": ("fashion_cnn_al_all", "al_all", "native", {"threshold": "1.0", "outbox_sync": "full"}, 1),
    "native_all_normal": ("fashion_cnn_al_all_normal", "al_all_normal", "native", {"threshold": "1.0", "outbox_sync": "normal"}, 1),
    "native4_none": ("fashion_cnn_al4_none", "al4_none", "native", {"threshold": "0.0"}, 4),
    "native4_all": ("fashion_cnn_al4_all", "al4_all", "native", {"threshold": "1.0", "outbox_sync": "full"}, 4),
    "native4_all_normal": ("fashion_cnn_al4_all_normal", "al4_all_normal", "native", {"threshold": "1.0", "outbox_sync": "normal"}, 4),
    # The same three behind the pipeline, as models of their own (Triton's latency summaries are per model).
    "pnative4_none": ("fashion_cnn_pal4_none", "pal4_none", "native", {"threshold": "0.0"}, 4),
    "pnative4_all": ("fashion_cnn_pal4_all", "pal4_all", "native", {"threshold": "1.0", "outbox_sync": "full"}, 4),
    "pnative4_all_normal": ("fashion_cnn_pal4_all_normal", "pal4_all_normal", "native", {"threshold": "1.0", "outbox_sync": "normal"}, 4),
}
# Variants written by `attach` (on a scratch copy of the example repository) rather than
# copied from its native step: how each treats the model's EMBEDDING. `stored`: attached
# with --embedding-output EMBEDDING (as the example ships); `carried`: attached without it
# to the model as it is (EMBEDDING passes through the step, not stored); `none`: attached
# to the model without its EMBEDDING output (the pipeline as it was before).
ATTACHED = {"python": "stored", "python_noemb": "none", "python_all": "stored", "python_all_noemb": "none",
            "native_noemb": "none", "native_all_noemb": "none", "native_all_unstored": "carried"}
CLOSED = ("plain", "noop", "python", "native", "native_all", "native_all_normal")
# (without, with) pairs of test_embedding; plain beside them.
EMBEDDING_PAIRS = (("python_noemb", "python"), ("native_noemb", "native"), ("native_all_noemb", "native_all"),
                   ("native_all_unstored", "native_all"), ("python_all_noemb", "python_all"))
EMBEDDING_CLOSED = ("plain", "python_noemb", "python", "native_noemb", "native", "native_all_noemb",
                    "native_all_unstored", "native_all", "python_all_noemb", "python_all")
PA_CLOSED = ("plain", "noop", "python", "native")
PACED_STEP = ("native4_none", "native4_all", "native4_all_normal")
PACED_PIPELINE = ("plain", "pnative4_none", "pnative4_all", "pnative4_all_normal")
PACED_ROUNDS = 1 if QUICK else 2  # interleaved; a model's rounds stay inside Triton's ~60 s summary window

RESULTS: dict = {"closed": {}, "embedding": {}, "perf_analyzer": {}, "paced": {}, "floors": {}, "outbox_rows": {}, "log": {},
                 "triton_statistics": {}, "summaries": {}}


# Model repository -------------------------------------------------------------------------------

def _config(path: Path):
    from triton_al.attach import read_config

    return read_config(path)


def _write_config(path: Path, config) -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))


def build_repository(tmp: Path, data: Path) -> Path:
    """The example repository plus one ensemble per variant (see VARIANTS)."""
    from triton_al.attach import attach

    repo = tmp / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    native_step = _config(repo / "active_learning" / "config.pbtxt")
    assert native_step.backend == "active_learning", "the example repository should ship the native step"
    native_ensemble = _config(repo / "fashion_cnn_al" / "config.pbtxt")

    # plain: the same ensemble without the step, answering the model's own outputs.
    plain = type(native_ensemble)()
    plain.CopyFrom(native_ensemble)
    plain.name = "fashion_cnn_plain"
    steps = [s for s in plain.ensemble_scheduling.step if s.model_name != "active_learning"]
    del plain.ensemble_scheduling.step[:]
    for s in steps:
        for key in list(s.output_map):
            s.output_map[key] = key if s.model_name == "fashion_cnn" else s.output_map[key]
        plain.ensemble_scheduling.step.add().CopyFrom(s)
    outputs = [o for o in plain.output if o.name not in ("SCORE", "FLAGGED")]
    del plain.output[:]
    for o in outputs:
        plain.output.add().CopyFrom(o)
    _write_config(repo / "fashion_cnn_plain" / "config.pbtxt", plain)
    (repo / "fashion_cnn_plain" / "1").mkdir(parents=True)

    # The attached variants (ATTACHED), exactly as `attach --step python|native` writes them
    # (attach always names the ensemble <model>_al, so it runs on scratch copies and the
    # step folders and ensembles are taken over). `none`: on a copy whose fashion_cnn does
    # not declare EMBEDDING (the model as it was before exposing it).
    scratch: dict[str, Path] = {}
    for mode in ("stored", "none"):
        scratch[mode] = tmp / f"scratch_repository_{mode}"
        shutil.copytree(ROOT / "model_repository", scratch[mode], ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(scratch[mode] / "active_learning")
        shutil.rmtree(scratch[mode] / "fashion_cnn_al")
    scratch["carried"] = scratch["stored"]
    model = _config(scratch["none"] / "fashion_cnn" / "config.pbtxt")
    kept = [o for o in model.output if o.name != "EMBEDDING"]
    assert len(kept) == len(model.output) - 1, "the example model should declare EMBEDDING"
    del model.output[:]
    for o in kept:
        model.output.add().CopyFrom(o)
    _write_config(scratch["none"] / "fashion_cnn" / "config.pbtxt", model)
    same = {k: v.string_value for k, v in native_step.parameters.items()}
    assert same.get("embedding_input") == "EMBEDDING", "the example's step should store the model's EMBEDDING"
    for label, mode in ATTACHED.items():
        ens_name, step_name, kind, params, _ = VARIANTS[label]
        attach(scratch[mode], "fashion_cnn", preprocess="preprocess", step_name=step_name, kind="probs", step=kind,
               outbox_path=str(data / f"{step_name}.db"), embedding_output="EMBEDDING" if mode == "stored" else None)
        step = _config(scratch[mode] / step_name / "config.pbtxt")
        other = {k: v.string_value for k, v in step.parameters.items() if k != "outbox_path"}
        expected = {k: v for k, v in same.items() if mode == "stored" or k != "embedding_input"}
        assert other == expected, f"{label}: the step's settings differ from the example's: {other} vs {expected}"
        carries = any(i.name == "EMBEDDING" for i in step.input) and any(o.name == "EMBEDDING" for o in step.output)
        assert carries == (mode != "none"), f"{label}: EMBEDDING {'not ' if carries else ''}carried through the step"
        if params:  # the benchmark's own variants: room for every item they flag
            step.parameters["outbox_max_items"].string_value = "10000000"
        for key, value in params.items():
            step.parameters[key].string_value = value
        shutil.copytree(scratch[mode] / step_name, repo / step_name)
        _write_config(repo / step_name / "config.pbtxt", step)
        ensemble = _config(scratch[mode] / "fashion_cnn_al" / "config.pbtxt")
        ensemble.name = ens_name
        assert any(o.name == "EMBEDDING" for o in ensemble.output) == (mode != "none")
        _write_config(repo / ens_name / "config.pbtxt", ensemble)
        (repo / ens_name / "1").mkdir(parents=True, exist_ok=True)

    for label, (ens_name, step_name, kind, params, instances) in VARIANTS.items():
        if kind == "none" or label in ATTACHED:
            continue
        step = type(native_step)()
        step.CopyFrom(native_step)
        step.name = step_name
        del step.instance_group[:]
        group = step.instance_group.add()
        group.kind = group.KIND_CPU
        group.count = instances
        if kind == "noop":
            step.backend = "python"
            step.ClearField("parameters")
            (repo / step_name / "1").mkdir(parents=True, exist_ok=True)
            (repo / step_name / "1" / "model.py").write_text(NOOP_MODEL)
        else:
            step.parameters["outbox_path"].string_value = str(data / f"{step_name}.db")
            if params:  # the benchmark's own variants: room for every item they flag
                step.parameters["outbox_max_items"].string_value = "10000000"
            for key, value in params.items():
                step.parameters[key].string_value = value
            (repo / step_name / "1").mkdir(parents=True, exist_ok=True)
        _write_config(repo / step_name / "config.pbtxt", step)
        if ens_name != "fashion_cnn_al":
            ens = type(native_ensemble)()
            ens.CopyFrom(native_ensemble)
            ens.name = ens_name
            for s in ens.ensemble_scheduling.step:
                if s.model_name == "active_learning":
                    s.model_name = step_name
            _write_config(repo / ens_name / "config.pbtxt", ens)
            (repo / ens_name / "1").mkdir(parents=True, exist_ok=True)
    return repo


def outbox_files(data: Path) -> dict[str, Path]:
    out = {}
    for label, (_, step_name, kind, _, _) in VARIANTS.items():
        if kind in ("python", "native"):
            out[label] = data / f"{step_name}.db"
    return out


def count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        conn.close()


class Checkpointer:
    """A PASSIVE checkpoint of every outbox every 100 ms, as the uploader does after each
    batch in production (without it the WAL of a flag-everything step grows all run)."""

    def __init__(self, paths: list[Path], every_s: float = 0.1) -> None:
        self.paths, self.every_s = sorted(set(paths)), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns: dict[Path, sqlite3.Connection] = {}
        while not self._stop.wait(self.every_s):
            for path in self.paths:
                if path not in conns and path.exists():
                    conns[path] = sqlite3.connect(str(path), timeout=0.05, check_same_thread=False)
                if path in conns:
                    try:
                        conns[path].execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.OperationalError:
                        pass  # busy: the next tick tries again
        for conn in conns.values():
            conn.close()

    def __enter__(self) -> Checkpointer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# Inputs ------------------------------------------------------------------------------------------

def unique_png(png: bytes, n: int) -> bytes:
    """The same image with a tEXt chunk carrying n before IEND: distinct bytes, same pixels."""
    body = b"tEXt" + b"n\x00" + str(n).encode()
    chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:-12] + chunk + png[-12:]


class Images:
    """POOL distinct PNGs; each pipeline walks through them with its own cursor, so no image
    reaches the same step twice in a run (unless a cursor runs past the end: `wrapped`)."""

    def __init__(self, base: list[bytes]) -> None:
        self.base = base
        self.pool = np.empty((POOL, 1), dtype=object)
        for i in range(POOL):
            self.pool[i, 0] = unique_png(base[i % len(base)], i)
        self.next: dict[str, int] = {}  # per label: the first image not sent yet
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, label: str, batch: int) -> np.ndarray:
        with self._lock:
            position = self.next.get(label, 0)
            start = -(-position // batch) * batch  # aligned, so a batch never straddles the end of the pool
            self.next[label] = start + batch
            self.sent[label] = self.sent.get(label, 0) + batch
        start %= POOL
        return self.pool[start:start + batch]

    def wrapped(self, label: str) -> bool:
        return self.next.get(label, 0) > POOL


@pytest.fixture(scope="module")
def images() -> Images:
    from triton_al.example.data import encode_png, load

    return Images([encode_png(x) for x in load("test")[0]])


@pytest.fixture(scope="module")
def served(tmp_path_factory, images):
    from triton_al.serving.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("bench")
    data = tmp / "data"
    data.mkdir()
    repo = build_repository(tmp, data)
    pipeline = Pipeline(repo, data, uploader=False)
    # Per-model latency quantiles (queue, compute input/infer/output) over a sliding window of
    # about a minute: the native step's compute_infer spans scoring and waiting for its append.
    pipeline.server.extra_args.append("--metrics-config=summary_latencies=true")
    with pipeline as p, Checkpointer(list(outbox_files(data).values())):
        yield {"server": p.server, "data": data, "tmp": tmp, "log": p.server.log_path, "repo": repo}


def scan_log(log: str) -> None:
    """Errors and warnings of the steps in the server's log (kept for the report)."""
    flagged = [line for line in log.splitlines() if re.match(r"^[EW]\d{4}", line)]
    cuda = [line for line in flagged if "CUDA" in line or "cuda" in line]
    other = [line for line in flagged if line not in cuda]
    RESULTS["log"] = {"errors_and_warnings": len(flagged), "cuda_lines_harmless_on_cpu": len(cuda),
                      "mentioning_active_learning": sum("active_learning" in line for line in other),
                      "other": other[:20]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pipeline-server.log").write_text(log)


def machine_state() -> dict:
    state = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    for kind in ("cpu", "io"):
        try:
            state[f"psi_{kind}_some_avg10"] = Path(f"/proc/pressure/{kind}").read_text().split()[1].split("=")[1]
        except (OSError, IndexError):
            pass
    return state


def cpu_times_s() -> dict[str, float]:
    """CPU seconds of the whole machine (all CPUs, /proc/stat): in processes (user, nice,
    system), in interrupts (irq, softirq: loopback networking lands here), and stolen by
    the hypervisor for other guests."""
    f = [int(v) / os.sysconf("SC_CLK_TCK") for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return {"processes": f[0] + f[1] + f[2], "interrupts": f[5] + f[6], "steal": f[7]}


def own_cpu_s(server) -> float:
    """CPU seconds of this benchmark: tritonserver and its stubs, this process, and its
    finished children (perf_analyzer, cargo)."""
    t = os.times()
    return server_cpu_s(server) + t.user + t.system + t.children_user + t.children_system


@pytest.fixture(autouse=True)
def record_machine(request, served):
    """Load on the machine during each test, and how much of it was not this benchmark's
    (other work sharing the machine), in cores."""
    before = machine_state()
    cpu0, own0, t0 = cpu_times_s(), own_cpu_s(served["server"]), time.perf_counter()
    yield
    wall = max(time.perf_counter() - t0, 1e-3)
    cpu1, own1 = cpu_times_s(), own_cpu_s(served["server"])
    RESULTS.setdefault("machine", {})[request.node.name] = {
        "before": before, "after": machine_state(), "wall_s": round(wall, 1),
        "other_processes_cores": round(((cpu1["processes"] - cpu0["processes"]) - (own1 - own0)) / wall, 2),
        "interrupts_cores": round((cpu1["interrupts"] - cpu0["interrupts"]) / wall, 2),
        "steal_cores": round((cpu1["steal"] - cpu0["steal"]) / wall, 2)}


def build_info(log: str) -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    digest = re.search(r"native-([0-9a-f]{16})", log)
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_rust_or_python": bool(git("status", "--porcelain", "--", "rust", "python")),
            "native_backend_sha256_16": digest.group(1) if digest else None}


# Our own client --------------------------------------------------------------------------------

def server_cpu_s(server) -> float:
    """CPU seconds used so far by tritonserver (all its threads) and its Python-backend stubs."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [server.pid, *server.stub_pids()]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def closed_loop(url: str, label: str, images: Images, batch: int, clients: int, duration_s: float, server=None) -> dict:
    import tritonclient.grpc as grpcclient

    model = VARIANTS[label][0]
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def client() -> None:
        mine = []
        with grpcclient.InferenceServerClient(url) as c:
            while True:
                inp = grpcclient.InferInput("IMAGE", [batch, 1], "BYTES")
                inp.set_data_from_numpy(images.take(label, batch))
                t0 = time.perf_counter()
                c.infer(model, [inp])
                t1 = time.perf_counter()
                if t1 > stop_at:
                    break
                mine.append(t1 - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu0, own0 = (server_cpu_s(server) if server else 0.0), time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = (server_cpu_s(server) if server else 0.0) - cpu0
    return {"latencies_ms": np.array(latencies) * 1e3, "items": len(latencies) * batch, "wall_s": wall,
            "server_cpu_s": cpu, "client_cpu_s": time.process_time() - own0}


def summary(lat_ms: np.ndarray, items: int, wall_s: float) -> dict:
    return {"p50_ms": float(np.percentile(lat_ms, 50)), "p90_ms": float(np.percentile(lat_ms, 90)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "items_per_s": items / wall_s, "requests": int(len(lat_ms))}


def warm_up(url: str, images: Images, labels, batch: int, n: int = 20) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        for label in labels:
            for _ in range(n):
                inp = grpcclient.InferInput("IMAGE", [batch, 1], "BYTES")
                inp.set_data_from_numpy(images.take(label, batch))
                c.infer(VARIANTS[label][0], [inp])


def closed_cell(benchmark, served, images, batch: int, clients: int, labels: tuple[str, ...], section: str) -> None:
    """The pipelines `labels` take turns, ROUNDS windows each, so that whatever else the
    machine does in the meantime falls on all of them alike; latencies are pooled. Results
    in RESULTS[section] and RESULTS["triton_statistics"][f"{section}/{batch}/{clients}"]."""
    url = served["server"].grpc_url
    warm_up(url, images, labels, batch)
    rows_before = {label: count_rows(path) for label, path in outbox_files(served["data"]).items() if label in labels}
    sent_before = dict(images.sent)

    def interleaved() -> dict[str, list[dict]]:
        windows: dict[str, list[dict]] = {m: [] for m in labels}
        for r in range(ROUNDS):
            order = labels if r % 2 == 0 else labels[::-1]  # no pipeline always goes first
            for label in order:
                windows[label].append(closed_loop(url, label, images, batch, clients, WINDOW_S, served["server"]))
        return windows

    stats_models = [m for label in labels for m in VARIANTS[label][:2] if m] + ["preprocess", "fashion_cnn"]
    stats_before = model_statistics(url, stats_models)
    windows = benchmark.pedantic(interleaved, rounds=1, iterations=1)
    time.sleep(0.3)  # the last responses' appends are committed before they are answered; margin for the checkpointer
    RESULTS["triton_statistics"][f"{section}/{batch}/{clients}"] = statistics_delta(stats_before, model_statistics(url, stats_models))
    for label, ws in windows.items():
        result = summary(np.concatenate([w["latencies_ms"] for w in ws]), sum(w["items"] for w in ws),
                         sum(w["wall_s"] for w in ws))
        requests = max(result["requests"], 1)
        result["server_cpu_ms_per_request"] = 1e3 * sum(w["server_cpu_s"] for w in ws) / requests
        result["server_cpu_share"] = sum(w["server_cpu_s"] for w in ws) / sum(w["wall_s"] for w in ws)
        result["client_cpu_share"] = sum(w["client_cpu_s"] for w in ws) / sum(w["wall_s"] for w in ws)
        benchmark.extra_info[label] = result
        RESULTS[section][f"{label}/{batch}/{clients}"] = result
    for label, before in rows_before.items():
        path = outbox_files(served["data"])[label]
        RESULTS["outbox_rows"][f"{section}:{label}/{batch}/{clients}"] = {
            "appended": count_rows(path) - before, "items_sent": images.sent.get(label, 0) - sent_before.get(label, 0),
            "pool_wrapped": images.wrapped(label)}
    for label in labels:
        if VARIANTS[label][3].get("threshold") == "1.0":  # flag everything: every item sent is appended
            rows = RESULTS["outbox_rows"][f"{section}:{label}/{batch}/{clients}"]
            assert not rows["pool_wrapped"], f"{label}: more items sent than distinct images; dedup would skip appends"
            assert rows["appended"] >= 0.9 * rows["items_sent"], f"{label}: only {rows} appended"


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("batch", [1, 32])
def test_pipeline(benchmark, served, images, batch, clients):
    """plain / noop / python / native / native_all / native_all_normal, interleaved."""
    closed_cell(benchmark, served, images, batch, clients, CLOSED, "closed")


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("batch", [1, 32])
def test_embedding(benchmark, served, images, batch, clients):
    """What carrying the model's embedding costs: each step with and without it
    (EMBEDDING_PAIRS), plain beside, interleaved."""
    closed_cell(benchmark, served, images, batch, clients, EMBEDDING_CLOSED, "embedding")


# perf_analyzer -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pa_env(served, images):
    env, why = pa.environment(served["tmp"])
    if env is None:
        pytest.skip(why)
    # 4,096 distinct images per closed-loop run (none of those steps flags everything);
    # the paced runs get distinct images of their own (see test_paced).
    data = pa.write_input_data(served["tmp"] / "pa_images.json", [unique_png(p, 10_000_000 + i) for i, p in enumerate(images.base[:4096])])
    return {"env": env, "data": data}


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("batch", [1, 32])
def test_perf_analyzer(served, pa_env, batch, clients):
    """perf_analyzer against plain / noop / python / native: PA_ROUNDS rounds, the
    pipelines taking turns (alternating order), each run PA_WINDOWS windows; reported per
    pipeline: the median over rounds of p50 and p99, and the mean throughput."""
    url = served["server"].grpc_url
    runs: dict[str, list[dict]] = {label: [] for label in PA_CLOSED}
    for r in range(PA_ROUNDS):
        for label in (PA_CLOSED if r % 2 == 0 else PA_CLOSED[::-1]):
            runs[label].append(pa.run(pa_env["env"], url, VARIANTS[label][0], pa_env["data"], batch=batch,
                                      concurrency=clients, window_ms=PA_WINDOW_MS, windows=PA_WINDOWS))
    for label, rs in runs.items():
        RESULTS["perf_analyzer"][f"{label}/{batch}/{clients}"] = {
            "p50_ms": float(np.median([x["p50_ms"] for x in rs])), "p99_ms": float(np.median([x["p99_ms"] for x in rs])),
            "items_per_s": float(np.mean([x["items_per_s"] for x in rs])),
            "rounds": [{k: round(v, 3) for k, v in x.items() if k in ("p50_ms", "p99_ms", "items_per_s")} for x in rs],
            "command": rs[0]["command"]}


# Open loop: 4 step instances flagging 1,000 items/s ---------------------------------------------

def open_loop(url: str, model: str, make_inputs, rate: float, duration_s: float, warmup_s: float = 1.0) -> dict:
    """Requests sent on a fixed schedule (every 1/rate s) whatever the answers do; latency
    from the moment each was sent to its answer; the first `warmup_s` are not counted."""
    import tritonclient.grpc as grpcclient

    n = int(rate * duration_s)
    sent = np.zeros(n)
    done = np.full(n, np.nan)
    late = 0
    errors: list[str] = []
    finished = threading.Semaphore(0)
    with grpcclient.InferenceServerClient(url) as c:
        def callback(i: int):
            def on_answer(result, error):
                done[i] = time.perf_counter()
                if error is not None:
                    errors.append(str(error))
                finished.release()
            return on_answer

        start = time.perf_counter() + 0.05
        for i in range(n):
            inputs = make_inputs(i)
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.001:
                late += 1
            sent[i] = time.perf_counter()
            c.async_infer(model, inputs, callback(i))
        end_sent = time.perf_counter()
        for _ in range(n):
            finished.acquire(timeout=30)
    skip = int(rate * warmup_s)
    lat = ((done - sent) * 1e3)[skip:]
    answered = lat[~np.isnan(lat)]
    span = np.nanmax(done[skip:]) - sent[skip]
    batch = inputs[0].shape()[0]
    result = summary(answered, len(answered) * batch, span)
    result.update({"late_sends_over_1ms": late, "send_rate": n / (end_sent - start), "errors": len(errors),
                   "unanswered": int(np.isnan(lat).sum())})
    return result


def step_inputs(served: dict, label: str) -> list[str]:
    """The input names of a variant's step model, from its config."""
    return [i.name for i in _config(served["repo"] / VARIANTS[label][1] / "config.pbtxt").input]


# Inputs of the step model besides PROBS and IMAGE: one constant value each.
STEP_CONSTANTS = {"MODEL_VERSION": ("INT64", np.array([[1]], dtype=np.int64)),
                  "EMBEDDING": ("FP32", np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :])}


def direct_inputs(images: Images, label: str, probs: np.ndarray, names: list[str]):
    """Inputs for calling the step model itself: class probabilities, a distinct PNG, and
    a constant for any other input it declares (the model version)."""
    import tritonclient.grpc as grpcclient

    unknown = [n for n in names if n not in ("PROBS", "IMAGE", *STEP_CONSTANTS)]
    assert not unknown, f"the step has inputs the benchmark does not know how to fill: {unknown}"

    def make(i: int):
        inputs = []
        for name in names:
            if name == "PROBS":
                t = grpcclient.InferInput("PROBS", [1, 10], "FP32")
                t.set_data_from_numpy(probs[i % len(probs)][None, :])
            elif name == "IMAGE":
                t = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
                t.set_data_from_numpy(images.take(label, 1))
            else:
                dtype, value = STEP_CONSTANTS[name]
                t = grpcclient.InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
            inputs.append(t)
        return inputs
    return make


def ensemble_inputs(images: Images, label: str, batch: int):
    import tritonclient.grpc as grpcclient

    def make(i: int):
        im = grpcclient.InferInput("IMAGE", [batch, 1], "BYTES")
        im.set_data_from_numpy(images.take(label, batch))
        return [im]
    return make


@pytest.fixture(scope="module")
def step_probs() -> np.ndarray:
    """Class probabilities as a 10-class model produces them, none certain (so the
    flag-everything steps flag every item)."""
    return np.random.default_rng(0).dirichlet(np.full(10, 0.3), size=4096).astype(np.float32)


def _paced_rows(files: dict, label: str, before: int, sent: int | None) -> dict:
    time.sleep(0.2)
    return {"appended": count_rows(files[label]) - before, "items_sent": sent}


def test_paced_step(served, images, pa_env, step_probs):
    """The step model called directly at 1,000 requests/s of batch 1 (1,000 items/s), open
    loop, 4 instances: flagging nothing, everything durably, everything with
    outbox_sync=normal. The pipeline in front of the step cannot take 1,000 requests/s of
    batch 1 on two cores (measured: plain ~690-990/s with queues growing), so this is where
    the rate of the target can be offered; the added latency is the step's own."""
    url = served["server"].grpc_url
    files = outbox_files(served["data"])
    for label in PACED_STEP:
        model = VARIANTS[label][1]
        open_loop(url, model, direct_inputs(images, label, step_probs, step_inputs(served, label)), 200, 1.0, warmup_s=0)  # warm up
    stats_models = [VARIANTS[label][1] for label in PACED_STEP]
    stats_before = model_statistics(url, stats_models)
    for r in range(PACED_ROUNDS):
        for label in (PACED_STEP if r % 2 == 0 else PACED_STEP[::-1]):
            before, sent = count_rows(files[label]), images.sent.get(label, 0)
            result = open_loop(url, VARIANTS[label][1], direct_inputs(images, label, step_probs, step_inputs(served, label)),
                               PACED_RATE, PACED_S)
            RESULTS["paced"][f"step/ours/{label}/{r}"] = result
            RESULTS["outbox_rows"][f"paced-step-ours/{label}/{r}"] = _paced_rows(files, label, before, images.sent[label] - sent)
    RESULTS["summaries"]["paced_step"] = latency_summaries(served["server"].metrics_url, stats_models)
    for j, label in enumerate(PACED_STEP):
        data = pa.write_input_data(served["tmp"] / f"pa_step_{label}.json",
                                   [unique_png(images.base[i % len(images.base)], 30_000_000 + 1_000_000 * j + i) for i in range(20_000)],
                                   probs=[step_probs[i % len(step_probs)] for i in range(20_000)],
                                   constant={n: STEP_CONSTANTS[n][1].ravel().tolist() for n in step_inputs(served, label) if n in STEP_CONSTANTS})
        before = count_rows(files[label])
        result = pa.run(pa_env["env"], url, VARIANTS[label][1], data, batch=1, rate=PACED_RATE, window_ms=3000)
        RESULTS["paced"][f"step/perf_analyzer/{label}"] = result
        RESULTS["outbox_rows"][f"paced-step-perf_analyzer/{label}"] = _paced_rows(files, label, before, None)
    RESULTS["triton_statistics"]["paced_step"] = statistics_delta(stats_before, model_statistics(url, stats_models))


def test_paced_pipeline(served, images, pa_env):
    """The same steps behind the pipeline, 1,000 items/s as 250 requests/s of batch 4
    (what the pipeline sustains here), open loop; plain beside."""
    url = served["server"].grpc_url
    files = outbox_files(served["data"])
    rate, batch = PACED_RATE / PACED_BATCH, PACED_BATCH
    for label in PACED_PIPELINE:
        open_loop(url, VARIANTS[label][0], ensemble_inputs(images, label, batch), rate, 1.0, warmup_s=0)
    stats_models = [m for label in PACED_PIPELINE for m in VARIANTS[label][:2] if m] + ["preprocess", "fashion_cnn"]
    stats_before = model_statistics(url, stats_models)
    for r in range(PACED_ROUNDS):
        for label in (PACED_PIPELINE if r % 2 == 0 else PACED_PIPELINE[::-1]):
            before, sent = (count_rows(files[label]) if label in files else 0), images.sent.get(label, 0)
            result = open_loop(url, VARIANTS[label][0], ensemble_inputs(images, label, batch), rate, PACED_S)
            RESULTS["paced"][f"pipeline/ours/{label}/{r}"] = result
            if label in files:
                RESULTS["outbox_rows"][f"paced-pipeline-ours/{label}/{r}"] = _paced_rows(files, label, before, images.sent[label] - sent)
    RESULTS["summaries"]["paced_pipeline"] = latency_summaries(served["server"].metrics_url,
                                                              [m for label in PACED_PIPELINE for m in VARIANTS[label][:2] if m])
    for j, label in enumerate(PACED_PIPELINE):
        data = pa.write_input_data(served["tmp"] / f"pa_pipeline_{label}.json",
                                   [unique_png(images.base[i % len(images.base)], 40_000_000 + 1_000_000 * j + i) for i in range(40_000)])
        before = count_rows(files[label]) if label in files else 0
        result = pa.run(pa_env["env"], url, VARIANTS[label][0], data, batch=batch, rate=rate, window_ms=3000)
        RESULTS["paced"][f"pipeline/perf_analyzer/{label}"] = result
        if label in files:
            RESULTS["outbox_rows"][f"paced-pipeline-perf_analyzer/{label}"] = _paced_rows(files, label, before, None)
    RESULTS["triton_statistics"]["paced_pipeline"] = statistics_delta(stats_before, model_statistics(url, stats_models))


STAT_KINDS = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(url: str, models: list[str]) -> dict:
    """Triton's cumulative counters per model: successful requests, executions, and the
    nanoseconds spent queued and in compute input / infer / output."""
    import tritonclient.grpc as grpcclient

    out = {}
    with grpcclient.InferenceServerClient(url) as c:
        for model in dict.fromkeys(models):
            st = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
            inf = st["inference_stats"]
            out[model] = {"requests": int(inf["success"].get("count", 0)), "executions": int(st.get("execution_count", 0)),
                          **{k: int(inf[k].get("ns", 0)) for k in STAT_KINDS}}
    return out


def latency_summaries(metrics_url: str, models: list[str]) -> dict:
    """Triton's latency summaries (`--metrics-config=summary_latencies=true`): per model,
    p50/p90/p99 in ms of request, queue and compute infer time, over its sliding window."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict = {m: {} for m in models}
    pattern = re.compile(r'^nv_inference_(request|queue|compute_infer|compute_output)_summary_us\{model="([^"]+)",version="\d+",quantile="([0-9.]+)"\} (\S+)$')
    for line in text.splitlines():
        found = pattern.match(line)
        if found and found.group(2) in out and found.group(3) in ("0.5", "0.9", "0.99"):
            kind, model, q, value = found.groups()
            key = {"0.5": "p50", "0.9": "p90", "0.99": "p99"}[q]
            out[model][f"{kind}_{key}_ms"] = float(value) / 1000.0 if value.lower() != "nan" else None
    return out


def statistics_delta(before: dict, after: dict) -> dict:
    """Per model between two snapshots: requests, executions, mean ms per request of each part."""
    out = {}
    for model, a in after.items():
        b = before.get(model, {})
        n = a["requests"] - b.get("requests", 0)
        out[model] = {"requests": n, "executions": a["executions"] - b.get("executions", 0),
                      **{f"{k}_ms": (a[k] - b.get(k, 0)) / max(n, 1) / 1e6 for k in STAT_KINDS}}
    return out


# Floors ------------------------------------------------------------------------------------------

def test_rust_writer(served):
    """The outbox writer alone (rust/outbox/examples/append_latency.rs): 4 threads, 1,000
    single-item appends/s in total, 700-byte assets, on the same disk as the served outboxes;
    durable as specified, durable with a PASSIVE checkpoint every 100 ms (as in the served
    runs here), and outbox_sync=normal."""
    if shutil.which("cargo") is None:
        pytest.skip("cargo not found")
    results = {}
    for name, extra in (("full", ["--sync", "full"]), ("full+checkpoint100ms", ["--sync", "full", "--checkpoint-ms", "100"]),
                        ("normal", ["--sync", "normal"])):
        done = subprocess.run(
            ["cargo", "run", "-q", "-p", "triton-al-outbox", "--release", "--example", "append_latency", "--",
             "--dir", str(served["tmp"]), "--asset-bytes", "700", "--seconds", "2" if QUICK else "6", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=500)
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = done.stdout.strip()
    RESULTS["floors"]["rust_append_latency"] = results


def test_disk_flush(served):
    """The disk's own price: rewrite 4 KiB in place and fdatasync, 500 times."""
    path = served["tmp"] / "flush-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        block = os.urandom(4096)
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        lat = []
        for _ in range(500):
            t0 = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    lat_ms = np.array(lat) * 1e3
    RESULTS["floors"]["fdatasync_4k"] = {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))}


# Report ------------------------------------------------------------------------------------------

def test_report(served):
    """Writes benchmarks/results/pipeline-results.json and pipeline-table.md (tables for RESULTS.md)."""
    log = served["log"].read_text(errors="replace")
    scan_log(log)
    RESULTS["build"] = build_info(log)
    # Each outbox at the end: rows and bytes on disk (database + WAL), e.g. what a stored embedding adds per row.
    RESULTS["outbox_size"] = {label: {"rows": count_rows(path), "bytes": sum(f.stat().st_size for f in (path, Path(f"{path}-wal")) if f.exists())}
                              for label, path in outbox_files(served["data"]).items() if path.exists()}
    RESULTS["when_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    OUT.mkdir(parents=True, exist_ok=True)
    # (pipeline.json is pytest-benchmark's own file, written at the end of the session)
    (OUT / "pipeline-results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    md = report_markdown(RESULTS)
    (OUT / "pipeline-table.md").write_text(md)
    print("\n" + md)


def report_markdown(res: dict) -> str:
    def cell(table: dict, label: str, b: int, c: int):
        return table.get(f"{label}/{b}/{c}")

    added = ("native", "python", "native_all", "native_all_normal")
    lines = [f"Run of {res.get('when_utc')}; {json.dumps(res.get('build', {}))}", "",
             "### Our gRPC client (closed loops, interleaved 1 s windows, pooled)", "",
             "| batch | clients | p50 plain | noop | python | native | native_all | native_all_normal | "
             "added p50: native | python | native_all | native_all_normal | items/s plain | ratio: noop | python | native | native_all | native_all_normal |",
             "|" + "---|" * 18]
    for b in (1, 32):
        for c in (1, 4):
            got = {label: cell(res["closed"], label, b, c) for label in CLOSED}
            if not all(got.values()):
                continue
            plain = got["plain"]
            lines.append("| " + " | ".join(
                [str(b), str(c)] + [f"{got[label]['p50_ms']:.3f}" for label in CLOSED]
                + [f"{got[label]['p50_ms'] - plain['p50_ms']:+.3f}" for label in added]
                + [f"{plain['items_per_s']:.0f}"]
                + [f"{got[label]['items_per_s'] / plain['items_per_s']:.3f}" for label in CLOSED[1:]]) + " |")
    lines += ["", "p99 (ms):", "", "| batch | clients | " + " | ".join(CLOSED) + " |", "|" + "---|" * (2 + len(CLOSED))]
    for b in (1, 32):
        for c in (1, 4):
            got = {label: cell(res["closed"], label, b, c) for label in CLOSED}
            if all(got.values()):
                lines.append(f"| {b} | {c} | " + " | ".join(f"{got[label]['p99_ms']:.2f}" for label in CLOSED) + " |")
    emb = res.get("embedding", {})
    if emb:
        lines += ["", "### Carrying the model's embedding (our client, closed loops, interleaved 1 s windows, pooled)", "",
                  "Ratios with / without (throughput: >1 is faster with; latency: >1 is slower with).", "",
                  "| batch | clients | without | with | items/s without | with | ratio | p50 without | with | ratio | "
                  "p99 without | with | ratio | server CPU ms/request without | with |", "|" + "---|" * 15]
        for b in (1, 32):
            for c in (1, 4):
                for without, with_ in EMBEDDING_PAIRS:
                    x, y = cell(emb, without, b, c), cell(emb, with_, b, c)
                    if not (x and y):
                        continue
                    lines.append(f"| {b} | {c} | {without} | {with_} | {x['items_per_s']:.0f} | {y['items_per_s']:.0f} | "
                                 f"{y['items_per_s'] / x['items_per_s']:.3f} | {x['p50_ms']:.3f} | {y['p50_ms']:.3f} | "
                                 f"{y['p50_ms'] / x['p50_ms']:.3f} | {x['p99_ms']:.2f} | {y['p99_ms']:.2f} | "
                                 f"{y['p99_ms'] / x['p99_ms']:.3f} | {x['server_cpu_ms_per_request']:.2f} | "
                                 f"{y['server_cpu_ms_per_request']:.2f} |")
                p = cell(emb, "plain", b, c)
                if p:
                    lines.append(f"| {b} | {c} | plain | - | {p['items_per_s']:.0f} | - | - | {p['p50_ms']:.3f} | - | - | "
                                 f"{p['p99_ms']:.2f} | - | - | {p['server_cpu_ms_per_request']:.2f} | - |")
        lines += ["", "Steps' Triton statistics (mean ms per request: queue / compute input / compute infer / compute output):", "",
                  "| batch | clients | " + " | ".join(EMBEDDING_CLOSED[1:]) + " |", "|" + "---|" * (1 + len(EMBEDDING_CLOSED))]
        for b in (1, 32):
            for c in (1, 4):
                st = res["triton_statistics"].get(f"embedding/{b}/{c}", {})
                if st:
                    lines.append(f"| {b} | {c} | " + " | ".join(
                        "{queue_ms:.3f} / {compute_input_ms:.3f} / {compute_infer_ms:.3f} / {compute_output_ms:.3f}".format(**st[VARIANTS[label][1]])
                        for label in EMBEDDING_CLOSED[1:]) + " |")
    if res["perf_analyzer"]:
        lines += ["", f"### perf_analyzer (gRPC, concurrency = clients; {PA_ROUNDS} rounds taking turns, each {PA_WINDOWS} windows "
                  f"of {PA_WINDOW_MS / 1000:g} s; median p50 over rounds, mean throughput)", "",
                  "| batch | concurrency | p50 plain | noop | python | native | added p50: noop | python | native | "
                  "items/s plain | ratio: noop | python | native |", "|" + "---|" * 13]
        for b in (1, 32):
            for c in (1, 4):
                got = {label: cell(res["perf_analyzer"], label, b, c) for label in PA_CLOSED}
                if not all(got.values()):
                    continue
                plain = got["plain"]
                lines.append("| " + " | ".join(
                    [str(b), str(c)] + [f"{got[label]['p50_ms']:.3f}" for label in PA_CLOSED]
                    + [f"{got[label]['p50_ms'] - plain['p50_ms']:+.3f}" for label in PA_CLOSED[1:]]
                    + [f"{plain['items_per_s']:.0f}"]
                    + [f"{got[label]['items_per_s'] / plain['items_per_s']:.3f}" for label in PA_CLOSED[1:]]) + " |")
    stats = res["triton_statistics"].get("closed/1/1", {})
    if stats:
        lines += ["", "Triton's statistics, batch 1 / 1 client (mean ms per request, all windows of the cell; "
                  "preprocess and fashion_cnn are shared by every pipeline):", "",
                  "| model | requests | executions | queue | compute input | compute infer | compute output |", "|" + "---|" * 7]
        for m, st in stats.items():
            lines.append(f"| {m} | {st['requests']} | {st['executions']} | {st['queue_ms']:.3f} | {st['compute_input_ms']:.3f} | "
                         f"{st['compute_infer_ms']:.3f} | {st['compute_output_ms']:.3f} |")
    lines += ["", "Server CPU (tritonserver + stubs) per request, ms, and client CPU share:", "",
              "| batch | clients | " + " | ".join(CLOSED) + " |", "|" + "---|" * (2 + len(CLOSED))]
    for b in (1, 32):
        for c in (1, 4):
            got = {label: cell(res["closed"], label, b, c) for label in CLOSED}
            if all(got.values()) and "server_cpu_ms_per_request" in got["plain"]:
                lines.append(f"| {b} | {c} | " + " | ".join(
                    f"{got[label]['server_cpu_ms_per_request']:.2f} ({got[label]['server_cpu_share']:.2f}+{got[label]['client_cpu_share']:.2f} cores)"
                    for label in CLOSED) + " |")
    paced = res["paced"]
    if paced:
        lines += ["", f"### Open loop, {PACED_RATE:.0f} items/s, step with 4 instances", "",
                  "`step`: the step model called directly, 1,000 requests/s of batch 1; `pipeline`: through the "
                  f"ensemble, {PACED_RATE / PACED_BATCH:.0f} requests/s of batch {PACED_BATCH}. Added = minus native4_none "
                  "(the same step flagging nothing), same client and round.", "",
                  "| where | client | round | variant | p50 | p90 | p99 | items/s | sent late (ours: >1 ms; perf_analyzer: share delayed) | added p50 | added p99 |",
                  "|" + "---|" * 11]
        for key, r in paced.items():
            parts = key.split("/")
            where, client, label = parts[0], parts[1], parts[2]
            rnd = parts[3] if len(parts) > 3 else "-"
            none = "native4_none" if where == "step" else "pnative4_none"
            base = res["paced"].get("/".join([where, client, none] + parts[3:]))
            extra = (f"{r['p50_ms'] - base['p50_ms']:+.3f} | {r['p99_ms'] - base['p99_ms']:+.3f}"
                     if base and label != none else "- | -")
            late = f"{r['late_sends_over_1ms']}" if "late_sends_over_1ms" in r else f"{r.get('delayed')}%"
            lines.append(f"| {where} | {client} | {rnd} | {label} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {r['items_per_s']:.0f} | {late} | {extra} |")
        for where in ("paced_step", "paced_pipeline"):
            summ = res["summaries"].get(where, {})
            if not summ:
                continue
            lines += ["", f"Triton's latency summaries after our client's rounds ({where}; ms; compute infer of a native "
                      "step = scoring + waiting for its append to be stored):", "",
                      "| model | request p50 | p99 | queue p50 | p99 | compute infer p50 | p90 | p99 | compute output p50 | p99 |",
                      "|" + "---|" * 10]
            for m, q in summ.items():
                def f(key):
                    return f"{q[key]:.3f}" if q.get(key) is not None else "-"
                lines.append(f"| {m} | {f('request_p50_ms')} | {f('request_p99_ms')} | {f('queue_p50_ms')} | {f('queue_p99_ms')} | "
                             f"{f('compute_infer_p50_ms')} | {f('compute_infer_p90_ms')} | {f('compute_infer_p99_ms')} | "
                             f"{f('compute_output_p50_ms')} | {f('compute_output_p99_ms')} |")
    lines += ["", "Outbox rows appended vs items sent: " + json.dumps(res["outbox_rows"]),
              "", "Outboxes at the end (rows, bytes): " + json.dumps(res.get("outbox_size", {})),
              "", "Floors: " + json.dumps(res["floors"]), "", "Server log: " + json.dumps(res["log"]),
              "", "During each test, in cores (of 2): other processes' CPU / interrupts (incl. loopback networking) / stolen by the hypervisor: "
              + json.dumps({k: (v.get("other_processes_cores"), v.get("interrupts_cores"), v.get("steal_cores"))
                            for k, v in res.get("machine", {}).items()}),
              "", "Machine (load average, pressure) per test: " + json.dumps(res.get("machine", {}))]
    return "\n".join(lines) + "\n"
