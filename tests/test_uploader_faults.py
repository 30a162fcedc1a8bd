"""Hardening of the uploader: poison items isolated, flush and --once bounded by backoff and
a deadline, an unusable outbox survived, one sink per outbox, one uploader per real file,
batches bounded by bytes, clock steps, and the admin API with TLS, tokens and bounds.

In-process tests drive `Uploader` against a real outbox and a real project store wrapped in
small fault-injecting sinks; process tests run `triton-al uploader` as users do."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
from outbox_helpers import item, png, store_index, uploaders, wait_for  # noqa: F401
from test_uploader import GROUP, assert_exactly_once, fill, metric, metrics_text, plain

from triton_al.outbox import Outbox, content_hash
from triton_al.sinks.base import Sink, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import LocalStore
from triton_al.uploader.admin import AdminClient
from triton_al.uploader.limits import RateLimit
from triton_al.uploader.worker import Backoff, Uploader

CLI = [sys.executable, "-m", "triton_al.cli"]


def bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels: more than twice Pillow's limit, so
    opening it raises DecompressionBombError (the pixel data is never needed)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


class Faulty(Sink):
    """A real project store behind a switchable fault: `down` fails every call as a whole
    (like a refused connection); `breaks_batch` names hashes whose presence makes the whole
    call raise (a sink bug on one item); `fails_item` names hashes failed one by one."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root)
        self.down = False
        self.breaks_batch: set[str] = set()
        self.fails_item: set[str] = set()
        self.calls: list[int] = []
        self.batches: list[list[str]] = []

    def upload(self, batch):
        self.calls.append(len(batch))
        if self.down:
            raise TransientSinkError("connection refused")
        if any(u.content_hash in self.breaks_batch for u in batch):
            raise RuntimeError("the sink's encoder blew up")
        self.batches.append([u.content_hash for u in batch])
        results = self.store.upload([u for u in batch if u.content_hash not in self.fails_item])
        it = iter(results)
        return [TransientSinkError("503 for this item") if u.content_hash in self.fails_item else next(it) for u in batch]

    def describe(self) -> str:
        return "faulty:" + self.store.describe()


def drain(uploader: Uploader, steps: int = 200) -> None:
    for _ in range(steps):
        if uploader.step() is None:
            return
    raise AssertionError("the queue never drained")


# 1. Poison items ----------------------------------------------------------------------


def test_an_oversized_image_is_dead_lettered_and_the_rest_delivered(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    good = fill(outbox, range(10))
    with Outbox(outbox) as o:
        o.append_many([item(0, asset=bomb_png())])
    good += fill(outbox, range(10, 20))
    up = uploaders(outbox, store, "--once", "--deadline", "20")
    assert up.proc.wait(40) == 0, up.log()
    assert_exactly_once(store, good)
    with Outbox(outbox) as o:
        (dead,) = o.dead_letters()
        assert "too large to decode" in dead["error"] and o.counters()["queued_items"] == 0


def test_a_batch_failing_as_a_whole_is_split_and_only_the_items_that_break_it_are_dead_lettered(tmp_path):
    path = tmp_path / "outbox.db"
    hashes = fill(path, range(40))
    poison = hashes[17:19]  # two neighbours: the bisection must not take them for a sink outage
    sink = Faulty(tmp_path / "store")
    sink.breaks_batch = set(poison)
    with Outbox(path) as o:
        uploader = Uploader(o, sink, batch_size=64, seed=1)
        drain(uploader)
        dead = o.dead_letters()
        assert sorted(d["content_hash"] for d in dead) == sorted(poison)
        assert all("failed alone while the sink accepted other items (RuntimeError: the sink's encoder blew up)" in d["error"]
                   for d in dead)
        assert o.counters()["queued_items"] == 0
    assert_exactly_once(tmp_path / "store", set(hashes) - set(poison))
    assert len(sink.calls) < 30, f"{len(sink.calls)} uploads to isolate 2 items of 40"


def test_a_sink_that_is_down_backs_off_the_loop_without_spending_attempts(tmp_path):
    path = tmp_path / "outbox.db"
    hashes = fill(path, range(64))
    sink = Faulty(tmp_path / "store")
    with Outbox(path) as o:
        uploader = Uploader(o, sink, batch_size=32, backoff=Backoff(base_s=0.01, cap_s=0.02), seed=2)
        assert uploader.step().uploaded == 32  # the sink worked once: it has a canary now
        sink.down = True
        for _ in range(3):
            sink.calls.clear()
            outcome = uploader.step()
            assert outcome.sink_failed and outcome.dead_lettered == 0
            assert len(sink.calls) == 2, sink.calls  # the batch, then the canary: down, no bisection
            assert uploader.sink_backoff_remaining() > 0
            time.sleep(0.03)
        queued = o.due(100)
        assert [i.attempts for i in queued] == [0] * 32 and all("connection refused" in i.last_error for i in queued)
        assert o.dead_letters() == []
        # A fresh uploader (no canary) bisects down to two items failing alone, then backs off.
        fresh = Uploader(o, sink, batch_size=32, seed=3)
        sink.calls.clear()
        assert fresh.step().sink_failed and len(sink.calls) <= 1 + 5 + 1
        sink.down = False
        drain(uploader)
        assert o.dead_letters() == [] and [i.attempts for i in o.due(100, ignore_backoff=True)] == []
    assert_exactly_once(tmp_path / "store", hashes)


# 2. Flush and --once ---------------------------------------------------------------------


def test_flush_respects_item_backoff_and_never_burns_attempts(tmp_path):
    path = tmp_path / "outbox.db"
    hashes = fill(path, range(5))
    sink = Faulty(tmp_path / "store")
    sink.fails_item = {hashes[2]}
    with Outbox(path) as o:
        uploader = Uploader(o, sink, backoff=Backoff(base_s=0.5, cap_s=60.0), max_attempts=20, seed=4)
        started = time.monotonic()
        result = uploader.flush(timeout_s=2.0)
        assert 1.9 < time.monotonic() - started < 5
        (stuck,) = o.due(10, ignore_backoff=True)
        assert stuck.content_hash == hashes[2] and 1 <= stuck.attempts <= 5, stuck.attempts
        assert o.dead_letters() == []
        assert result.timed_out and not result.complete and result.still_queued == 1 and result.uploaded == 4
        assert "503 for this item" in result.last_error


def test_once_with_the_sink_down_exits_non_zero_at_the_deadline(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    fill(outbox, range(5))
    (store / ".lock").mkdir(parents=True)  # the store's lock cannot be opened: the whole store fails
    up = uploaders(outbox, store, "--once", "--deadline", "2", "--backoff-base", "0.1", "--backoff-cap", "0.5")
    started = time.monotonic()
    assert up.proc.wait(30) == 1, up.log()
    assert time.monotonic() - started < 15
    assert "the deadline (2 s, --deadline) passed with 5 items still queued" in up.log()
    with Outbox(outbox) as o:
        assert [i.attempts for i in o.due(10, ignore_backoff=True)] == [0] * 5 and o.dead_letters() == []
    (store / ".lock").rmdir()
    up = uploaders(outbox, store, "--once", "--deadline", "20")
    assert up.proc.wait(40) == 0, up.log()
    assert len(store_index(store, GROUP)) == 5


# 3. An unusable outbox ----------------------------------------------------------------------


def test_a_corrupt_outbox_is_reported_and_opened_again_until_it_is_usable(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    outbox.write_bytes(os.urandom(16384))
    up = uploaders(outbox, store, "--metrics-port", "0", "--admin-port", "0", "--backoff-base", "0.05", "--backoff-cap", "0.3")
    ports = up.ports()  # it listens instead of dying
    wait_for(lambda: metric(metrics_text(ports["metrics"]), "triton_al_uploader_outbox_errors_total", "", 0) >= 3, 30,
             "repeated attempts to open the outbox")
    assert metric(metrics_text(ports["metrics"]), "triton_al_uploader_outbox_usable") == 0
    with AdminClient(f"127.0.0.1:{ports['admin']}") as admin:
        status = admin.status()
        assert "cannot open it as an SQLite outbox" in status.outbox_error and not status.groups
        with pytest.raises(grpc.RpcError) as e:
            admin.pause([GROUP])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the outbox is unusable" in up.log()
        # Someone puts a good outbox in place: the uploader picks it up and delivers.
        for leftover in tmp_path.glob("outbox.db*"):
            if not leftover.name.endswith(".uploader.lock"):
                leftover.unlink()
        hashes = fill(outbox, range(8))
        wait_for(lambda: len(store_index(store, GROUP)) == 8, 30, "delivery once the outbox is usable")
        assert admin.status().outbox_error == ""
    assert metric(metrics_text(ports["metrics"]), "triton_al_uploader_outbox_usable") == 1
    assert up.proc.poll() is None
    assert_exactly_once(store, hashes)


# 4. One sink per outbox ----------------------------------------------------------------------


def test_another_sink_on_the_same_outbox_is_refused_until_deliveries_are_forgotten(tmp_path, uploaders):
    outbox, first, second = tmp_path / "outbox.db", tmp_path / "first", tmp_path / "second"
    hashes = fill(outbox, range(2))
    assert uploaders(outbox, first, "--once").proc.wait(40) == 0
    fill(outbox, range(2))  # flagged again: duplicates of what the outbox delivered
    refused = uploaders(outbox, second, "--once")
    assert refused.proc.wait(40) == 2
    text = plain(refused.log())
    assert f"delivered 2 items to local:{first}, not to local:{second}" in text and "--forget-deliveries" in text
    switched = uploaders(outbox, second, "--once", "--forget-deliveries")
    assert switched.proc.wait(40) == 0, switched.log()
    fill(outbox, range(2))  # flagged again: now queued for the new sink
    assert uploaders(outbox, second, "--once").proc.wait(40) == 0
    assert_exactly_once(second, hashes)
    with Outbox(outbox) as o:
        assert o.delivery_target() == f"local:{second}"


# 6. One uploader per outbox file, whatever the path --------------------------------------


def test_one_uploader_per_outbox_also_through_a_symlink(tmp_path, uploaders):
    outbox, store = tmp_path / "data" / "outbox.db", tmp_path / "store"
    outbox.parent.mkdir()
    Outbox(outbox).close()
    (tmp_path / "link.db").symlink_to(outbox)
    (tmp_path / "linked-dir").symlink_to(outbox.parent)
    first = uploaders(outbox, store)
    first.ports()
    for alias in (tmp_path / "link.db", tmp_path / "linked-dir" / "outbox.db"):
        second = uploaders(alias, store)
        try:
            assert second.proc.wait(20) == 2
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a second uploader runs on {alias}") from None
        assert "another uploader is already draining" in plain(second.log())


# 8. Batches bounded by bytes ------------------------------------------------------------------


def test_batches_are_capped_by_bytes_and_a_big_item_goes_alone(tmp_path):
    path = tmp_path / "outbox.db"
    big = png(99, size=200)
    with Outbox(path) as o:
        o.append_many([item(i) for i in range(10)] + [item(99, asset=big)])
        size = len(png(0))
        sink = Faulty(tmp_path / "store")
        uploader = Uploader(o, sink, batch_size=64, batch_max_bytes=int(3.5 * size))
        drain(uploader)
        assert [len(b) for b in sink.batches] == [3, 3, 3, 1, 1]
        assert sink.batches[-1] == [content_hash(big)] and len(big) > 3.5 * size
        assert o.counters()["uploaded"] == 11


# 9. Clock steps ---------------------------------------------------------------------------


class SteppedClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_an_item_backing_off_when_the_clock_steps_back_is_retried_within_the_longest_backoff(tmp_path):
    path = tmp_path / "outbox.db"
    (target,) = fill(path, [1])
    sink = Faulty(tmp_path / "store")
    sink.fails_item = {target}
    clock = SteppedClock()
    with Outbox(path) as o:
        uploader = Uploader(o, sink, backoff=Backoff(base_s=0.2, cap_s=0.5), clock=clock, seed=5)
        assert uploader.step().failed == 1
        sink.fails_item = set()
        clock.offset = -3600.0  # NTP steps the clock back an hour
        wait_for(lambda: uploader.step() is not None and o.counters().get("uploaded") == 1, 5, "the retry after the step")


def test_a_sink_backoff_survives_the_clock_stepping_back(tmp_path):
    path = tmp_path / "outbox.db"
    fill(path, range(3))
    sink = Faulty(tmp_path / "store")
    sink.down = True
    clock = SteppedClock()
    with Outbox(path) as o:
        uploader = Uploader(o, sink, backoff=Backoff(base_s=0.1, cap_s=0.2), clock=clock, poll_interval_s=0.02, seed=6)
        assert uploader.step().sink_failed
        clock.offset = -3600.0
        sink.down = False
        runner = threading.Thread(target=uploader.run)
        runner.start()
        try:
            wait_for(lambda: o.counters().get("uploaded") == 3, 5, "delivery after the sink came back")
        finally:
            uploader.stop()
            runner.join(10)


def test_rate_windows_survive_the_clock_stepping_back(tmp_path):
    path = tmp_path / "outbox.db"
    fill(path, range(6))
    clock = SteppedClock()
    with Outbox(path) as o:
        uploader = Uploader(o, Faulty(tmp_path / "store"), limits={GROUP: [RateLimit(3, 1.0)]}, clock=clock, seed=7)
        assert uploader.step().uploaded == 3
        assert uploader.step() is None  # the window is full
        clock.offset = -3600.0  # the three deliveries are now an hour in the future
        wait_for(lambda: uploader.step() is not None and o.counters().get("uploaded") == 6, 5, "the next window")


# 10. Admin API: TLS, tokens, bounds -----------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "admin.crt", tmp_path / "admin.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_admin_api_over_tls(tmp_path, uploaders, certificate):
    cert, key = certificate
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    fill(outbox, range(3))
    up = uploaders(outbox, store, "--admin-port", "0", "--admin-tls-cert", str(cert), "--admin-tls-key", str(key))
    address = f"127.0.0.1:{up.ports()['admin']}"
    with AdminClient(address, tls_ca=cert) as admin:
        assert admin.status().outbox == str(outbox)
    with AdminClient(address, timeout_s=3) as plaintext, pytest.raises(grpc.RpcError) as e:
        plaintext.status()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    r = subprocess.run([*CLI, "admin", "status", "--address", address, "--tls-ca", str(cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outbox"] == str(outbox)
    r = subprocess.run([*CLI, "uploader", "--outbox", str(outbox), "--store", str(store), "--admin-port", "0",
                        "--admin-tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs both --admin-tls-cert and --admin-tls-key" in plain(r.stderr)


def test_admin_token_can_be_required_on_loopback(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_AL_ADMIN_TOKEN"}
    r = subprocess.run([*CLI, "uploader", "--outbox", str(outbox), "--store", str(store), "--admin-port", "0",
                        "--admin-require-token"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--admin-require-token, but no token is set" in plain(r.stderr)
    token = "loopback-token-for-tests"
    up = uploaders(outbox, store, "--admin-port", "0", "--admin-require-token", env={"TRITON_AL_ADMIN_TOKEN": token})
    address = f"127.0.0.1:{up.ports()['admin']}"
    with AdminClient(address, token="") as anonymous, pytest.raises(grpc.RpcError) as e:
        anonymous.pause([])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(address, token=token) as admin:
        assert admin.status().outbox == str(outbox)


def test_admin_flush_is_bounded_and_runs_one_at_a_time(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    fill(outbox, range(3))
    (store / ".lock").mkdir(parents=True)  # the store fails as a whole: a flush waits for it
    up = uploaders(outbox, store, "--admin-port", "0", "--admin-max-flush-seconds", "5", "--backoff-base", "0.1", "--backoff-cap", "0.3")
    address = f"127.0.0.1:{up.ports()['admin']}"
    with AdminClient(address) as admin:
        with pytest.raises(grpc.RpcError) as e:
            admin.flush(3600)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cap of 5 s" in e.value.details()
        results: list = []
        first = threading.Thread(target=lambda: results.append(admin.flush(2)))
        first.start()
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            admin.flush(1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.join(20)
        (flushed,) = results
        assert flushed.timed_out and not flushed.complete and flushed.still_queued == 3
        assert "project store" in flushed.last_error
        assert admin.status().groups[0].queued == 3  # the API still answers


# 7. Bounds, applied by the uploader ---------------------------------------------------------


def test_the_uploader_bounds_dead_letters_and_delivery_records(tmp_path, uploaders):
    outbox, store = tmp_path / "outbox.db", tmp_path / "store"
    good = fill(outbox, range(6))
    with Outbox(outbox) as o:
        o.append_many([item(i, asset=b"\x89PNG\r\n\x1a\n-truncated-" + bytes([i])) for i in range(5)])
    up = uploaders(outbox, store, "--once", "--batch-max-bytes", "2KiB", "--dead-letter-max-count", "2",
                   "--delivered-max-rows", "4", "--delivered-max-age", "30d")
    assert up.proc.wait(60) == 0, up.log()
    assert_exactly_once(store, good)
    with Outbox(outbox) as o:
        assert len(o.dead_letters()) == 2
        c = o.counters()
        assert c["dead_letters_purged"] == 3 and c["delivered_forgotten"] == 2
        assert o._connect().execute("SELECT count(*) FROM delivered").fetchone()[0] == 4
        assert c["dead_letter_bytes"] == sum(len(b"\x89PNG\r\n\x1a\n-truncated-") + 1 for _ in range(2))
        (group,) = o.status()
        assert group.delivered == 6 and group.dead_letters == 2
