"""A fleet of uploaders sharing one budget ledger (issue 14): a real Redis (Debian's
redis-server), a real S3-compatible server (rclone), and in the last test three replicas of
`triton-al serve`, each its own tritonserver on the example repository and its own outbox.
Every process is started on 127.0.0.1 and stopped by PID, also when a test fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from outbox_helpers import item, wait_for
from process_helpers import stop_process
from s3_helpers import BUCKET, RcloneS3, s3, s3_env  # noqa: F401 - s3 is a fixture

from triton_al.outbox import Outbox
from triton_al.serving.server import free_port
from triton_al.uploader.ledger import FleetGate, Ledger, parse_ledger_uri
from triton_al.uploader.limits import parse_limits
from triton_al.uploader.worker import Backoff, Uploader

redis = pytest.importorskip("redis", reason="the fleet extra (redis) is not installed")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """Debian's redis-server on 127.0.0.1 with an append-only file (a restart keeps the
    counts, as the README asks of a production ledger); stopped by PID."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.fail("redis-server is not installed: run the tests with scripts/test.sh (bootstrap installs it)")
        self.root, self.port = root, port or free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.RedisError:
                pass
            assert self.proc.poll() is None, f"redis-server exited: {(self.root / 'redis.log').read_text()[-1000:]}"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def ledger_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()




def objects(s3: RcloneS3, prefix: str, group: str) -> dict[str, list[str]]:
    """Assets stored under <prefix>/<group>/, by content hash (each with its sidecar)."""
    folder = s3.root / BUCKET / prefix / group
    found: dict[str, list[str]] = {}
    for path in folder.glob("*") if folder.exists() else []:
        if path.is_file() and path.suffix != ".json":
            found.setdefault(path.stem, []).append(path.name)
            assert (folder / f"{path.stem}.json").exists(), f"{path.name} has no sidecar"
    return found


# The ledger itself ----------------------------------------------------------------------


@pytest.mark.parametrize("uri, reason", [
    ("http://127.0.0.1:6379", "unknown scheme 'http'"),
    ("127.0.0.1:6379", "unknown scheme"),
    ("redis://", "no host"),
    ("redis://user:secret@127.0.0.1:6379/0", "credentials do not go in the URI"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://127.0.0.1:6379/zero", "must be a database number, got 'zero'"),
    ("redis://127.0.0.1:6379/0?prefix=x", "no query or fragment"),
])
def test_a_malformed_ledger_uri_is_refused_naming_what_is_wrong(uri, reason):
    with pytest.raises(ValueError, match=re.escape(reason)) as e:
        parse_ledger_uri(uri)
    assert "secret" not in str(e.value)


def test_the_uploader_refuses_a_malformed_ledger_uri_before_starting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(tmp_path / "o.db"), "--store",
                        str(tmp_path / "store"), "--budget-ledger", "redis://u:hunter2@127.0.0.1/0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stderr).split())  # typer's error box, unwrapped
    assert "credentials do not go in the URI" in text and "TRITON_AL_LEDGER_PASSWORD" in text
    assert "hunter2" not in r.stderr


def test_reservations_from_many_clients_never_exceed_any_rule(ledger_server):
    rules = parse_limits(["g=100/day,60/hour"])["g"]
    now = time.time()
    granted: list[int] = []

    def client(seed: int) -> None:
        ledger = Ledger.open(ledger_server.url, "s3://bucket/race", f"owner-{seed}")
        try:
            for k in range(40):
                r = ledger.reserve("g", rules, 1 + (seed + k) % 7, now)
                if r.granted and k % 5 == 0:
                    ledger.release(r, 1)  # a failed upload gives one back
                    granted.append(r.granted)
                else:
                    granted.append(r.granted)
        finally:
            ledger.close()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(client, range(6)))
    assert sum(granted) == 60, "the tighter rule (60/hour) caps the fleet exactly"
    probe = Ledger.open(ledger_server.url, "s3://bucket/race", "probe")
    assert probe.used("g", rules, now) == [60, 60]
    assert probe.used("other", rules, now) == [0, 0]
    # Another sink is another namespace: its budget is its own.
    assert Ledger.open(ledger_server.url, "s3://bucket/other", "probe").reserve("g", rules, 5, now).granted == 5


def test_budget_windows_follow_the_ledgers_clock_and_start_afresh(ledger_server):
    ledger = Ledger.open(ledger_server.url, "sink", "a")
    rules = parse_limits(["g=10/day"])["g"]
    server_now = float(ledger.client.time()[0])
    skewed = Ledger.open(ledger_server.url, "sink", "b")
    assert ledger.reserve("g", rules, 7).granted == 7  # by the ledger's clock
    assert skewed.reserve("g", rules, 7).granted == 3  # the same window, whatever this host's clock says
    assert ledger.used("g", rules) == [10]
    tomorrow = server_now + 86400
    r = ledger.reserve("g", rules, 4, now=tomorrow)
    assert r.granted == 4 and ledger.used("g", rules, now=tomorrow) == [4] and ledger.used("g", rules) == [10]
    ledger.release(r, 4)
    assert ledger.used("g", rules, now=tomorrow) == [0]
    assert ledger.client.pttl(r.keys[0]) > 86400 * 1000, "a counter outlives its window (late releases find it)"


def test_claims_are_exclusive_then_done_and_a_restarted_owner_takes_its_own_back(ledger_server):
    a = Ledger.open(ledger_server.url, "sink", "replica-a")
    b = Ledger.open(ledger_server.url, "sink", "replica-b")
    keys = [a.claim_key("g", h) for h in ("h1", "h2", "h3")]
    assert a.claim(keys[:2]) == [0, 0]
    assert b.claim(keys) == [1, 1, 0]
    assert Ledger.open(ledger_server.url, "sink", "replica-a").claim(keys[:2]) == [0, 0]  # the same owner, restarted
    a.settle(done=[keys[0]], released=[keys[1]])
    b.settle(done=[], released=[keys[0]])  # not b's to give back: stays done
    assert b.claim(keys[:2]) == [2, 0]


def test_an_idle_replica_reports_the_ledger_down_and_back(ledger_server):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    gate = FleetGate(Ledger.open(ledger_server.url, "sink", "idle"), {}, registry=registry, backoff_base_s=0.05, backoff_cap_s=0.1)
    gate.health_interval_s = 0.1
    assert gate.held_groups(lambda: ["g"]) == [] and gate.up
    ledger_server.stop()
    time.sleep(0.15)
    assert gate.held_groups(lambda: ["g"]) == ["g"], "with claims on, every group waits for the ledger"
    assert not gate.up and registry.get_sample_value("triton_al_uploader_ledger_up") == 0
    ledger_server.start()
    wait_for(lambda: gate.held_groups(lambda: ["g"]) == [], 5, "the gate to find the ledger back")
    assert gate.up and registry.get_sample_value("triton_al_uploader_ledger_up") == 1


# Three uploaders in one process: claims and the budget, against the real S3 server -------


class CountingSink:
    """The real S3 sink, counting what each uploader really sent (the sink's storage is
    content-addressed, so counting objects alone would hide duplicate uploads)."""

    def __init__(self, inner, sent: Counter, lock: threading.Lock) -> None:
        self.inner, self.sent, self.lock = inner, sent, lock

    def upload(self, batch):
        results = self.inner.upload(batch)
        with self.lock:
            self.sent.update((u.group, u.content_hash) for u, r in zip(batch, results) if r is None)
        return results

    def describe(self):
        return self.inner.describe()

    def close(self):
        self.inner.close()


def fleet_uploader(tmp: Path, name: str, sink, ledger_url: str, limits: dict, **gate) -> Uploader:
    outbox = Outbox(tmp / f"{name}.db")
    ledger = Ledger.open(ledger_url, "s3-fleet", name)
    fleet = FleetGate(ledger, limits, backoff_base_s=0.05, backoff_cap_s=0.2, **gate)
    return Uploader(outbox, sink, batch_size=16, poll_interval_s=0.05, backoff=Backoff(0.05, 0.2, 0.01), fleet=fleet, seed=1)


def test_three_uploaders_upload_each_image_once_and_share_the_budget(tmp_path, s3, ledger_server, monkeypatch):
    from triton_al.sinks.s3 import S3Sink

    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    prefix = "in-process"
    sent: Counter = Counter()
    lock = threading.Lock()
    limits = parse_limits(["budget=50/day"])
    workers = []
    for n in range(3):
        w = fleet_uploader(tmp_path, f"r{n}", CountingSink(S3Sink(BUCKET, prefix), sent, lock), ledger_server.url, limits)
        # The same 30 images flagged on every replica; 40 images of their own for the budgeted group.
        w.outbox.append_many([item(i, groups=("dup",)) for i in range(30)])
        w.outbox.append_many([item(1000 * (n + 1) + i, groups=("budget",)) for i in range(40)])
        workers.append(w)
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    try:
        def settled():
            queued = {s.upload_group: 0 for s in []}
            for w in workers:
                for s in w.outbox.status():
                    queued[s.upload_group] = queued.get(s.upload_group, 0) + s.queued
            return queued.get("dup", 0) == 0 and sum(sent[k] for k in sent if k[0] == "budget") >= 50
        wait_for(settled, 60, "the dup group delivered and the budget spent")
        time.sleep(1.0)  # the budget is spent: nothing more may go out
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(30)
    dup_sent = {k: n for k, n in sent.items() if k[0] == "dup"}
    assert len(dup_sent) == 30 and set(dup_sent.values()) == {1}, f"uploads per image: {sorted(Counter(dup_sent.values()).items())}"
    assert len(objects(s3, prefix, "dup")) == 30
    budget_sent = {k: n for k, n in sent.items() if k[0] == "budget"}
    assert len(budget_sent) == 50 and set(budget_sent.values()) == {1}, "exactly the fleet's budget, each once"
    assert len(objects(s3, prefix, "budget")) == 50
    queued = sum(s.queued for w in workers for s in w.outbox.status() if s.upload_group == "budget")
    assert queued == 120 - 50, "the rest stays queued (--rate-overflow keep), none dropped"
    elsewhere = sum(w.outbox.counters().get("uploaded", 0) for w in workers) - 30 - 50
    assert elsewhere == 60, "each replica recorded every dup image as delivered (two of three without uploading)"
    for w in workers:
        w.fleet.ledger.close()
        w.outbox.close()


def test_over_the_fleet_budget_in_drop_mode_items_are_dropped_and_counted(tmp_path, ledger_server):
    from triton_al.sinks.local import LocalStore

    limits = parse_limits(["g=5/day"])
    workers = []
    for n in range(2):
        outbox = Outbox(tmp_path / f"d{n}.db")
        outbox.append_many([item(100 * n + i, groups=("g",)) for i in range(6)])
        fleet = FleetGate(Ledger.open(ledger_server.url, "drop", f"d{n}"), limits, rate_overflow="drop")
        workers.append(Uploader(outbox, LocalStore(tmp_path / "store"), batch_size=4, rate_overflow="drop", fleet=fleet))
    for _ in range(3):
        for w in workers:
            w.step()
    landed = (tmp_path / "store" / "g" / "index.jsonl").read_text().splitlines()
    assert len(landed) == 5
    assert sum(w.outbox.counters().get("dropped_rate_limit", 0) for w in workers) == 7
    assert sum(s.queued for w in workers for s in w.outbox.status()) == 0
    for w in workers:
        w.fleet.ledger.close()
        w.outbox.close()


def test_an_unreachable_ledger_holds_the_items_and_they_flow_when_it_is_back(tmp_path, s3, ledger_server, monkeypatch):
    from prometheus_client import CollectorRegistry

    from triton_al.sinks.s3 import S3Sink

    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    prefix = "ledger-down"
    limits = parse_limits(["budget=25/day"])
    registry = CollectorRegistry()
    w = fleet_uploader(tmp_path, "solo", S3Sink(BUCKET, prefix), ledger_server.url, limits, registry=registry)
    try:
        w.outbox.append_many([item(i, groups=("budget", "free")) for i in range(10)])
        assert w.flush(10).uploaded == 20
        ledger_server.stop()
        w.outbox.append_many([item(i, groups=("budget", "free")) for i in range(10, 40)])
        result = w.flush(1.5)
        assert result.uploaded == 0 and result.still_queued == 60 and result.timed_out
        assert "budget ledger redis://127.0.0.1" in result.last_error and "none dropped" in result.last_error
        assert "budget ledger" in w.last_error  # what the admin status shows as last_error
        assert registry.get_sample_value("triton_al_uploader_ledger_up") == 0
        assert registry.get_sample_value("triton_al_uploader_ledger_errors_total", {"kind": "connection"}) >= 1
        assert len(objects(s3, prefix, "free")) == 10, "with claims on, every group waits for the ledger"
        ledger_server.start()  # the same port and append-only file: the counts survived
        result = w.flush(15)
        assert registry.get_sample_value("triton_al_uploader_ledger_up") == 1
        assert len(objects(s3, prefix, "free")) == 40
        assert len(objects(s3, prefix, "budget")) == 25, "10 before the outage + 15: the budget held across it"
        assert result.still_queued == 15 and not result.timed_out
        assert Ledger.open(ledger_server.url, "s3-fleet", "probe").used("budget", limits["budget"], time.time()) == [25]
    finally:
        w.fleet.ledger.close()
        w.outbox.close()


# Three served replicas ----------------------------------------------------------------


GROUPS = ("fleet-a", "fleet-b")
BUDGET = 100


class Replica:
    """`triton-al serve` with its own copy of the example repository (threshold 1.0: every
    item flagged, for both groups) and its own data directory; stopped by PID."""

    def __init__(self, root: Path, name: str, env: dict[str, str], args: list[str], groups: tuple[str, ...] = GROUPS) -> None:
        from triton_helpers import copy_repository

        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "model_repository").exists():
            repo = copy_repository(self.root)
            step = repo / "active_learning" / "config.pbtxt"
            text = step.read_text()
            for key, value in (("threshold", "1.0"), ("upload_groups", ",".join(groups))):
                text, n = re.subn(rf'(key: "{key}"\s*value \{{\s*string_value: )"[^"]*"', rf'\1"{value}"', text)
                assert n == 1, f"no {key} parameter in {step}"
            step.write_text(text)
        self.data = self.root / "data"
        self.env, self.args = env, args
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> Replica:
        self.log = self.root / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "w") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "triton_al.cli", "serve", "--model-repository", str(self.root / "model_repository"),
                 "--data-dir", str(self.data), "--quiet", "--uploader-restart-delay", "0.2", *self.args],
                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        def ready():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            m = re.search(r"^serving: (.*)$", self.log.read_text(), re.M)
            return m and json.loads(m.group(1))

        self.info = wait_for(ready, timeout, "serve to start", interval=0.1)

    def pids(self) -> list[int]:
        return [p for p in (self.info.get("uploader_pid"), self.info.get("tritonserver_pid")) if p] + ([self.proc.pid] if self.proc else [])

    def kill(self) -> None:
        """SIGKILL the replica: its uploader, its tritonserver and serve itself, by PID."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait()
        for pid in self.pids():
            wait_for(lambda pid=pid: not _alive(pid), 10, f"process {pid} to die")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever is left (also the children of a serve that did not stop)

    def infer(self, pngs) -> int:
        from triton_helpers import grpcclient, infer_al

        with grpcclient.InferenceServerClient(self.info["grpc"]) as client:
            _, _, flagged = infer_al(client, pngs)
        return int(flagged.sum())

    def queued(self, group: str) -> int:
        with Outbox(self.data / "outbox.db") as box:
            return sum(s.queued for s in box.status() if s.upload_group == group)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.info["uploader_metrics"], timeout=5) as r:
            return r.read().decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _seconds_to_utc_midnight() -> float:
    return 86400 - time.time() % 86400


def test_three_served_replicas_share_one_budget_store_each_image_once_and_survive_kills_and_ledger_outages(tmp_path, s3):
    from triton_helpers import fashion_pngs

    if _seconds_to_utc_midnight() < 150:  # the day's budget window must not roll over mid-test
        time.sleep(_seconds_to_utc_midnight() + 1)
    ledger = RedisServer(tmp_path / "redis")
    prefix = "served"
    args = ["--sink", f"s3://{BUCKET}/{prefix}", "--rate-limit", f"fleet-b={BUDGET}/day", "--budget-ledger", ledger.url]
    replicas = [Replica(tmp_path, f"replica{n}", s3_env(s3), args) for n in range(3)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        # 1. The same 40 images sent to all three replicas at once: flagged three times, stored once per group.
        same, _, _ = fashion_pngs(40)
        with ThreadPoolExecutor(3) as pool:
            flagged = list(pool.map(lambda r: sum(r.infer(same[i:i + 8]) for i in range(0, 40, 8)), replicas))
        assert flagged == [40, 40, 40]
        wait_for(lambda: all(r.queued("fleet-a") == 0 and r.queued("fleet-b") == 0 for r in replicas), 60, "the fleet to drain")
        assert len(objects(s3, prefix, "fleet-a")) == 40 and len(objects(s3, prefix, "fleet-b")) == 40
        elsewhere = sum(_metric(r.metrics(), "triton_al_uploader_fleet_items_total", outcome="elsewhere") for r in replicas)
        uploaded = sum(_metric(r.metrics(), "triton_al_uploader_fleet_items_total", outcome="uploaded") for r in replicas)
        assert (uploaded, elsewhere) == (80, 160), "each image uploaded by one replica; the other two were told it was done"

        # 2. 150 more, different on each replica: the fleet budget (100/day, 40 spent) lets exactly 60 through.
        for n, r in enumerate(replicas):
            pngs, _, _ = fashion_pngs(50, start=100 + 50 * n)
            assert sum(r.infer(pngs[i:i + 10]) for i in range(0, 50, 10)) == 50
        wait_for(lambda: all(r.queued("fleet-a") == 0 for r in replicas), 60, "fleet-a to drain")
        wait_for(lambda: len(objects(s3, prefix, "fleet-b")) >= BUDGET, 30, "the budget to be spent")
        time.sleep(2.5)  # long enough for every replica to ask the ledger again (held groups: 1-2 s)
        assert len(objects(s3, prefix, "fleet-a")) == 190
        assert len(objects(s3, prefix, "fleet-b")) == BUDGET, "the fleet's budget holds exactly"
        assert sum(r.queued("fleet-b") for r in replicas) == 90, "over budget: kept queued, not dropped"

        # 3. SIGKILL a replica mid-delivery; restarted on its data directory, it loses nothing.
        victim = replicas[0]
        pngs, _, _ = fashion_pngs(60, start=400)
        killed = victim.infer(pngs)  # every item flagged but one the model is entirely sure of (score 1.0)
        assert killed >= 55
        victim.kill()
        remaining = victim.queued("fleet-a")
        victim.start().wait_ready()
        wait_for(lambda: victim.queued("fleet-a") == 0, 60, "the restarted replica to drain")
        assert len(objects(s3, prefix, "fleet-a")) == 190 + killed, f"{remaining} were still queued at the kill"
        assert len(objects(s3, prefix, "fleet-b")) == BUDGET

        # 4. The ledger down: items are held (and reported), nothing is dropped; back up, they flow.
        ledger.stop()
        pngs, _, _ = fashion_pngs(20, start=500)
        held = replicas[1].infer(pngs)
        assert held >= 18
        wait_for(lambda: _metric(replicas[1].metrics(), "triton_al_uploader_ledger_up") == 0, 20, "the replica to report the ledger down")
        time.sleep(1.0)
        assert replicas[1].queued("fleet-a") == held and len(objects(s3, prefix, "fleet-a")) == 190 + killed
        from triton_al.uploader.admin import AdminClient

        with AdminClient(replicas[1].info["uploader_admin"]) as admin:
            assert "budget ledger" in admin.status().last_error
        ledger.start()
        wait_for(lambda: replicas[1].queued("fleet-a") == 0, 60, "the held items to flow")
        assert len(objects(s3, prefix, "fleet-a")) == 190 + killed + held
        assert len(objects(s3, prefix, "fleet-b")) == BUDGET
        assert _metric(replicas[1].metrics(), "triton_al_uploader_ledger_up") == 1
    finally:
        for r in replicas:
            r.stop()
        ledger.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# Label Studio: lookup-then-import races between replicas ---------------------------------


@pytest.mark.slow
def test_three_uploaders_racing_into_label_studio_import_each_image_once(tmp_path, ledger_server, label_studio_template):
    """Label Studio has no content-addressed key: each replica asks it which hashes it has,
    then imports the rest, so two replicas racing on one image could both import it (and,
    for a new group, both create its project). Claims in the ledger leave one replica per
    image, and the group's first batch to one replica at a time."""
    from labelstudio_helpers import TOKEN, LabelStudioServer

    server = LabelStudioServer(tmp_path / "label-studio", free_port(), template=label_studio_template)
    server.start()
    procs: list[subprocess.Popen] = []
    try:
        boxes = []
        for n in range(3):
            with Outbox(tmp_path / f"ls{n}.db") as box:
                box.append_many([item(i, groups=("ls-fleet",)) for i in range(24)])
            boxes.append(tmp_path / f"ls{n}.db")
        ls_env = {"LABEL_STUDIO_API_KEY": TOKEN}
        for n, box in enumerate(boxes):
            with open(tmp_path / f"ls-uploader{n}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(box), "--sink", f"labelstudio+{server.url}",
                     "--budget-ledger", ledger_server.url, "--batch-size", "8"],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ls_env}))

        def queued() -> int:
            total = 0
            for box in boxes:
                with Outbox(box) as o:
                    total += sum(s.queued for s in o.status())
            return total

        wait_for(lambda: queued() == 0, 120, "the three uploaders to drain", interval=0.2)
    finally:
        for p in procs:
            stop_process(p, 20)
        try:
            projects, tasks = _label_studio_contents(server.url, TOKEN, "triton-al:group=ls-fleet")
        finally:
            server.stop()
    assert len(projects) == 1, f"one project for the group, not {projects}"
    per_hash = Counter(t["data"]["content_hash"] for t in tasks)
    assert len(per_hash) == 24 and set(per_hash.values()) == {1}, f"tasks per image: {sorted(Counter(per_hash.values()).items())}"


def _label_studio_contents(url: str, token: str, marker: str) -> tuple[list[int], list[dict]]:
    def get(path: str):
        request = urllib.request.Request(url + path, headers={"Authorization": f"Token {token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    listing = get("/api/projects?page_size=1000&include=id,title,description")
    found = [p["id"] for p in (listing.get("results", listing) if isinstance(listing, dict) else listing)
             if marker in str(p.get("description") or "").splitlines()]
    tasks: list[dict] = []
    for project in found:
        page = get(f"/api/tasks?project={project}&page_size=1000&fields=all")
        tasks += page["tasks"] if isinstance(page, dict) else page
    return found, tasks
