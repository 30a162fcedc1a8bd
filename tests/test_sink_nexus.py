"""The Datature Nexus sink, through the official `datature` SDK, against a LOCAL FAKE of the
Nexus API (tests/nexus_fake_server.py): the real service cannot be reached from here.

The SDK needs protobuf 5 and tritonclient protobuf < 5, so the SDK runs in its own
environment, `.venv/nexus/`, made by scripts/test.sh before pytest starts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from process_helpers import wait_listening
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.serving.server import free_port
from triton_al.sinks import open_sink
from triton_al.sinks.base import PermanentSinkError, Upload
from triton_al.sinks.nexus import NexusSink

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "nexus"
SECRET = "nexus-secret-key-that-must-not-leak"
PROJECT = "proj_triton_al_test"


def ensure_sdk() -> str:
    """The datature SDK's own environment, made by scripts/test.sh before pytest starts
    (the tests install nothing)."""
    python = VENV / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import datature.nexus"], capture_output=True) if python.exists() else None
    if check is None or check.returncode != 0:
        pytest.fail(f"the datature SDK is not installed in {VENV}: run the tests with `bash scripts/test.sh`, "
                    "which installs it first")
    return str(python)


class FakeNexus:
    def __init__(self, data: Path) -> None:
        self.data, self.port, self.proc = data, free_port(), None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nexus_fake_server.py"), "--port", str(self.port),
                                      "--data", str(self.data), "--project", PROJECT],
                                     env={**os.environ, "FAKE_NEXUS_SECRET": SECRET}, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.port, "the fake Nexus server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)

    def state(self) -> dict:
        path = self.data / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"assets": {}, "sessions": []}


@pytest.fixture(scope="module")
def python():
    return ensure_sdk()


@pytest.fixture
def server(tmp_path):
    s = FakeNexus(tmp_path / "nexus")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def env(server, monkeypatch, python):
    monkeypatch.setenv("DATATURE_SECRET_KEY", SECRET)
    monkeypatch.setenv("DATATURE_API_ENDPOINT", server.url)
    monkeypatch.setenv("TRITON_AL_NEXUS_PYTHON", python)


@pytest.fixture
def sink(env):
    return open_sink(f"nexus://{PROJECT}")


@pytest.fixture
def stored(server):
    def read(group):
        out = {}
        for name, asset in server.state()["assets"].items():
            if group not in asset["groups"]:
                continue
            assert (server.data / "assets" / name).exists()
            custom = asset.get("custom", {})
            out[name.split(".")[0]] = {"score": custom.get("triton_al_score"),
                                      "model_version": str(custom.get("triton_al_model", ":")).split(":")[1],
                                      "prediction": {"label": custom.get("triton_al_label")}, "custom": custom}
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
def bad_credentials_sink(env, monkeypatch):
    monkeypatch.setenv("DATATURE_SECRET_KEY", "wrong-" + SECRET)
    return open_sink(f"nexus://{PROJECT}")


@pytest.fixture
def secret():
    return SECRET


class TestNexusSink(SinkConformance):
    fuzz_examples = 10  # each batch is a subprocess running the SDK: about a second

    @pytest.fixture
    def metadata_view(self):
        """Nexus custom metadata holds strings, booleans, 64-bit integers and finite numbers:
        those of our fields arrive as sent, the others (NaN, None, objects) are left out."""
        def fits(v):
            if isinstance(v, (str, bool)):
                return True
            if isinstance(v, int):
                return -(2**63) <= v < 2**63
            return isinstance(v, float) and math.isfinite(v)

        def view(meta):
            prediction = meta.get("prediction") if isinstance(meta.get("prediction"), dict) else {}
            fields = {"triton_al_score": meta.get("score"), "triton_al_strategy": meta.get("strategy"),
                      "triton_al_reason": meta.get("reason"), "triton_al_label": prediction.get("label"),
                      "triton_al_model": f"{meta.get('model_name')}:{meta.get('model_version')}",
                      "triton_al_flagged_at": meta.get("flagged_at")}
            return {"custom": {k: v for k, v in fields.items() if fits(v)}}

        return view


def test_groups_reach_the_upload_session_and_files_are_named_by_hash(sink, server):
    batch = [upload(1, group="hard-cases"), upload(2, group="review")]
    assert sink.upload(batch) == [None, None]
    sessions = server.state()["sessions"]
    assert sorted((s["groups"], s["files"]) for s in sessions) == sorted(
        [(["hard-cases"], [batch[0].filename]), (["review"], [batch[1].filename])])
    assert (server.data / "assets" / batch[0].filename).read_bytes() == batch[0].asset


def test_an_asset_nexus_refuses_is_a_permanent_error_for_that_item_only(sink, server):
    """A non-image asset: refused by the SDK's own file-type check (or by the service)."""
    npy = b"\x93NUMPY-not-an-image"
    refused = Upload(GROUP, __import__("hashlib").sha256(npy).hexdigest(), npy, "application/x-npy", {"score": 0.1})
    results = sink.upload([upload(3), refused, upload(4)])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentSinkError)
    assert "refused by the SDK" in str(results[1]) or "unsupported file type" in str(results[1])
    assert sorted(server.state()["assets"]) == sorted([upload(3).filename, upload(4).filename])


@pytest.mark.parametrize("uri", ["nexus://", "nexus://a/b", "nexus://proj-x!"])
def test_bad_uris_are_refused(uri, env):
    with pytest.raises(ValueError, match="expected nexus://PROJECT_ID"):
        open_sink(uri)


def test_without_the_sdk_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    import triton_al.sinks.nexus as nexus

    monkeypatch.delenv("TRITON_AL_NEXUS_PYTHON", raising=False)
    monkeypatch.setattr(nexus, "PACKAGE_ROOT", tmp_path / "python")
    monkeypatch.setattr(nexus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install datature"):
        NexusSink("proj_x")


def test_an_image_flagged_for_two_groups_ends_in_both(sink, server, stored):
    """Across batches (the asset is already there for A when B comes) and inside one batch:
    an existing asset joins the group through the asset update (`PATCH .../assets/{name}`,
    which replaces the groups: the sink sends the old ones plus the new), and its bytes are
    uploaded once."""
    a, b, c = upload(5, group="group-a"), upload(5, group="group-b"), upload(5, group="group-c")
    assert sink.upload([a]) == [None]
    assert sink.upload([b]) == [None]
    assert sink.upload([upload(6, group="group-a"), upload(6, group="group-b"), c]) == [None, None, None]
    assets = server.state()["assets"]
    assert assets[a.filename]["groups"] == ["group-a", "group-b", "group-c"]
    assert sorted(assets[upload(6).filename]["groups"]) == ["group-a", "group-b"]
    for group in ("group-a", "group-b"):
        assert set(stored(group)) == {a.content_hash, upload(6).content_hash}
    uploaded = [f for s in server.state()["sessions"] for f in s["files"]]
    assert sorted(uploaded) == sorted([a.filename, upload(6).filename])  # bytes sent once per asset
    assert sink.upload([b, c]) == [None, None]  # a retry changes nothing
    assert server.state()["assets"][a.filename]["groups"] == ["group-a", "group-b", "group-c"]


def test_the_fake_takes_only_the_field_names_the_real_api_takes(server):
    """The SDK sends `customMetadata` (`AssetCustomMetadata.to_json`) and `{"groups"}` for an
    asset update; a typed API refuses other names with 400, and so does the fake."""
    import urllib.error
    import urllib.request

    sdk_up = upload(7)

    def call(method, path, body):
        request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method=method,
                                         headers={"Secret-Key": SECRET, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    path = f"/projects/{PROJECT}/assets/{sdk_up.filename}"
    state = server.state()
    state["assets"][sdk_up.filename] = {"id": "asset_x", "size": 1, "mime": "image/png", "groups": ["main"], "created": 0}
    server.stop()
    (server.data / "state.json").write_text(json.dumps(state))
    server.start()
    parent = {"kind": "customMetadata#assetParent"}
    assert call("PUT", path + "/customMetadatas", {"parent": parent, "custom_metadata": {"k": 1}})[0] == 400
    assert call("PUT", path + "/customMetadatas", {"parent": parent, "customMetadata": {"k": [1]}})[0] == 400
    assert call("PUT", path + "/customMetadatas", {"parent": parent, "customMetadata": {"k": 1}}) == (
        200, {"parent": {"filename": sdk_up.filename}, "customMetadata": {"k": 1}})
    assert call("PATCH", path, {"group": ["x"]})[0] == 400
    assert call("PATCH", path, {"groups": []})[0] == 400
    code, body = call("PATCH", path, {"groups": ["main", "x"]})
    assert code == 200 and body["metadata"]["groups"] == ["main", "x"]


def test_a_wrong_custom_metadata_field_name_fails(sink, server, monkeypatch, tmp_path):
    """Were the worker to send `custom_metadata` (the SDK's Python name, not the wire name),
    the fake refuses it, so the metadata round trip cannot pass by accident."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "from datature.nexus.api import types\n"
        "types.AssetCustomMetadata.to_json = lambda self: {'parent': self.parent.to_json(), 'custom_metadata': self.custom_metadata}\n")
    monkeypatch.setenv("PYTHONPATH", str(shim))
    (result,) = sink.upload([upload(8)])
    assert isinstance(result, PermanentSinkError) and "custom_metadata" in str(result)


ANNOTATE = """
import json, sys
from datature.nexus import Client
request = json.load(sys.stdin)
project = Client(request["secret"], endpoint=request["endpoint"]).get_project(request["project"])
made = {}
for op in request["ops"]:
    if op["do"] == "create":
        asset = project.assets.get(op["filename"])
        made[op["filename"]] = project.annotations.create({"asset_id": asset.id, "tag": op["tag"],
                                                           "bound_type": op["bound_type"], "bound": op["bound"]}).id
    else:
        assert project.annotations.delete(op["id"]).deleted
print(json.dumps(made))
"""


def annotate(python: str, server: FakeNexus, ops: list[dict]) -> dict:
    """What an annotator does in Nexus, done through the SDK (annotations.create/delete)."""
    done = subprocess.run([python, "-c", ANNOTATE], input=json.dumps({"secret": SECRET, "endpoint": server.url, "project": PROJECT,
                                                                       "ops": ops}), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pull(store: Path, *extra: str) -> tuple[dict, list[str]]:
    r = subprocess.run([sys.executable, "-m", "triton_al.cli", "labels", "pull", "--sink", f"nexus://{PROJECT}", "--store", str(store),
                        "--group", "review", *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), [line for line in r.stderr.splitlines() if line.startswith("not taken: ")]


def test_annotations_made_in_nexus_come_back_through_labels_pull(sink, server, python, tmp_path):
    """Against the LOCAL FAKE of the Nexus API, driven by the real SDK on both sides: tags an
    annotator puts on delivered assets come back as labels (classification by class name, a
    rectangle as a box), the labelled assets are fetched into an empty store with their
    metadata, a relabel keeps the older label, and shapes or classes that do not map are
    reported."""
    from triton_al.sinks.local import LocalStore

    ups = [upload(k, group="review") for k in range(5)]
    assert sink.upload(ups) == [None] * 5
    made = annotate(python, server, [
        {"do": "create", "filename": ups[0].filename, "tag": "coat", "bound_type": "Classification", "bound": []},
        {"do": "create", "filename": ups[1].filename, "tag": "dress", "bound_type": "Rectangle",
         "bound": [[0.1, 0.2], [0.1, 0.6], [0.5, 0.6], [0.5, 0.2]]},
        {"do": "create", "filename": ups[2].filename, "tag": "zebra", "bound_type": "Classification", "bound": []},
        {"do": "create", "filename": ups[3].filename, "tag": "coat", "bound_type": "Polygon", "bound": [[0.1, 0.1], [0.2, 0.2], [0.1, 0.3]]},
    ])  # ups[4] is not annotated
    store = tmp_path / "store"
    LocalStore(store).close()
    (tmp_path / "classes.txt").write_text("t-shirt\ntrouser\npullover\ndress\ncoat\n")
    names = ["--labels", str(tmp_path / "classes.txt")]
    first, problems = pull(store, *names)
    assert (first["new"], first["fetched"], first["problems"]) == (2, 2, 2)
    assert sorted(p.split(": ", 2)[2] for p in problems) == [
        "annotations of kind(s) Polygon: only classification tags or rectangles (alone) become labels",
        "class 'zebra' is not a class of the model (5 classes)"]
    local = LocalStore(store)
    got = {a.content_hash: a.label for a in local.annotations("review")}
    assert got == {ups[0].content_hash: 4, ups[1].content_hash: {"boxes": [{"label": 3, "box": [0.1, 0.2, 0.5, 0.6]}]}}
    for up in ups[:2]:
        record = next(r for r in local.index("review") if r["content_hash"] == up.content_hash)
        assert local.asset_path("review", record).read_bytes() == up.asset
        assert (record["model_version"], record["score"]) == ("3", up.metadata["score"])
    again, _ = pull(store, *names)
    assert (again["new"], again["relabelled"], again["unchanged"], again["fetched"]) == (0, 0, 2, 0)
    annotate(python, server, [{"do": "delete", "id": made[ups[0].filename]},
                              {"do": "create", "filename": ups[0].filename, "tag": "pullover", "bound_type": "Classification",
                               "bound": []}])
    third, _ = pull(store, *names)
    assert (third["new"], third["relabelled"]) == (0, 1)
    assert {a.content_hash: a.label for a in local.annotations("review")}[ups[0].content_hash] == 2
    (history,) = (store / "review" / "labels" / "history").iterdir()
    assert json.loads(history.read_text())["label"] == 4
    # Items are fetched several per run of the SDK (a run costs about a second).
    runs = []
    original = sink._run
    sink._run = lambda request: runs.append(request.get("op", "upload")) or original(request)
    assert {a.content_hash for a in sink.annotations("review")} == {up.content_hash for up in ups[:4]}
    fetched = sink.fetch_many("review", [up.content_hash for up in ups])
    assert runs == ["annotations", "fetch"]
    assert [fetched[up.content_hash].asset if fetched[up.content_hash] else None for up in ups] == [
        up.asset for up in ups[:4]] + [None]  # ups[4] has no annotation: not asked for
