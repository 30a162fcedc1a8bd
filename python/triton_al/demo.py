"""The main job: the whole pipeline on embedded defaults.

Starts a real tritonserver on the example model repository together with the uploader
sidecar, sends the Fashion-MNIST test images as PNG over gRPC (several concurrent clients,
batches of 32) to the ensemble `fashion_cnn_al`, prints how many were flagged and where
they landed in the local project store, and stops everything.

    python -m triton_al.demo [--images N] [--threshold T] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
MODEL_FILE = REPOSITORY / "fashion_cnn" / "1" / "model.onnx"


def ensure_model() -> None:
    """The committed ONNX file is the model; rebuild it only if it is missing."""
    if MODEL_FILE.exists():
        return
    print(f"{MODEL_FILE} is missing: training it (needs the `train` extra, ~30 s)")
    from triton_al.example.train import main as train

    train(["--out", str(MODEL_FILE)])


def prepare_repository(work: Path, threshold: float | None) -> Path:
    """A copy of the example repository, so that settings changed for the demo never touch
    the committed one."""
    target = work / "model_repository"
    shutil.copytree(REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__"))
    if threshold is not None:
        config = target / "active_learning" / "config.pbtxt"
        text = config.read_text()
        key = 'key: "threshold"\n  value {\n    string_value: "'
        start = text.index(key) + len(key)
        end = text.index('"', start)
        config.write_text(text[:start] + str(threshold) + text[end:])
    return target


def send_all(url: str, images: np.ndarray, batch: int, clients: int, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    import tritonclient.grpc as grpcclient

    from triton_al.example.data import encode_png

    n = len(images)
    probs = np.zeros((n, 10), np.float32)
    scores = np.zeros(n, np.float32)
    flagged = np.zeros(n, bool)
    errors: list[str] = []
    batches = iter(range(0, n, batch))
    lock = threading.Lock()

    def worker() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                with lock:
                    start = next(batches, None)
                if start is None:
                    return
                chunk = images[start : start + batch]
                data = np.array([[encode_png(x)] for x in chunk], dtype=object)
                inp = grpcclient.InferInput("IMAGE", [len(chunk), 1], "BYTES")
                inp.set_data_from_numpy(data)
                try:
                    result = client.infer("fashion_cnn_al", [inp])
                except Exception as e:  # noqa: BLE001 - reported at the end
                    with lock:
                        errors.append(str(e))
                    continue
                end = start + len(chunk)
                probs[start:end] = result.as_numpy("PROBS")
                scores[start:end] = result.as_numpy("SCORE").reshape(-1)
                flagged[start:end] = result.as_numpy("FLAGGED").reshape(-1)
                progress(len(chunk))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return probs, scores, flagged, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the example model with active learning and send it the Fashion-MNIST test set.")
    parser.add_argument("--images", type=int, default=10_000, help="How many test images to send (max 10000).")
    parser.add_argument("--threshold", type=float, default=None, help="Flag items with score below this (default: the step's 0.5).")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output", help="Where the outbox, store and logs go (emptied first).")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress

    from triton_al.example.data import CLASS_NAMES, load
    from triton_al.outbox import Outbox
    from triton_al.serving.pipeline import Pipeline
    from triton_al.sinks.local import LocalStore
    from triton_al.uploader.near_duplicates import COUNTER_PREFIX as NEAR_DUPLICATES

    console = Console(soft_wrap=True)  # long paths stay on one line, copy-pasteable
    ensure_model()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    repository = prepare_repository(Path(tempfile.mkdtemp(prefix="triton-al-demo-")), args.threshold)
    images, labels = load("test")
    images, labels = images[: args.images], labels[: args.images]

    console.print(f"[bold]Starting tritonserver[/] (model repository {REPOSITORY.relative_to(ROOT)}) and the uploader ...")
    started = time.perf_counter()
    with Pipeline(repository, args.out, startup_timeout_s=120) as pipeline:
        console.print(f"  ready in {time.perf_counter() - started:.1f} s: gRPC {pipeline.server.grpc_url}, "
                      f"Triton metrics {pipeline.server.metrics_url}, uploader admin {pipeline.uploader.admin_address}")
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"sending {len(images)} PNGs over gRPC", total=len(images))
            probs, scores, flagged, errors = send_all(pipeline.server.grpc_url, images, args.batch, args.clients,
                                                      lambda k: progress.advance(task, k))
        seconds = time.perf_counter() - t0
        flush = pipeline.flush(60)
        store = LocalStore(pipeline.store, create=False) if pipeline.store.exists() else None
        stored = store.index("active-learning") if store else []
        with Outbox(pipeline.outbox) as box:  # near-copies of images already sent are counted, not uploaded
            near_copies = box.counters().get(f"{NEAR_DUPLICATES}active-learning", 0)

    if errors:
        console.print(f"[red]{len(errors)} requests failed[/], first: {errors[0]}")
    accuracy = float((probs.argmax(1) == labels).mean())
    n_flagged = int(flagged.sum())
    console.print(f"\n[bold]Sent[/] {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.0f} images/s, "
                  f"{args.clients} clients, batches of {args.batch}); model accuracy on them {accuracy:.1%}")
    console.print(f"[bold]Flagged[/] {n_flagged} ({n_flagged / len(images):.1%}) with score < threshold; "
                  f"accuracy on flagged items {float((probs.argmax(1) == labels)[flagged].mean()) if n_flagged else 0:.1%} "
                  f"vs {float((probs.argmax(1) == labels)[~flagged].mean()):.1%} on the rest")
    by_class = Counter(int(labels[i]) for i in np.flatnonzero(flagged))
    console.print("  most flagged true classes: " + ", ".join(f"{CLASS_NAMES[c]} {k}" for c, k in by_class.most_common(4)))
    console.print(f"[bold]Landed[/] {len(stored)} unique images in the project store "
                  f"{pipeline.store}/active-learning/ (uploader flush complete: {flush.complete}); "
                  f"index: {pipeline.store}/active-learning/index.jsonl")
    if near_copies:
        console.print(f"  {near_copies} flagged images were near-duplicates of ones already sent: counted, not uploaded "
                      "(`triton-al outbox near-duplicates`; `--near-duplicate-distance off` sends them all)")
    for record in sorted(stored, key=lambda r: r["score"] if r["score"] is not None else -1)[:3]:
        console.print(f"    {record['file']}  score {record['score']:.3f}  model v{record['model_version']}")
    console.print(f"Logs: {pipeline.logs}. Everything stopped.")
    shutil.rmtree(repository.parent, ignore_errors=True)
    ok = not errors and flush.complete and (len(stored) > 0 or n_flagged == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
