"""The Label Studio sink against a real Label Studio server (see labelstudio_helpers)."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import pytest
from labelstudio_helpers import TOKEN, LabelStudioServer
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.serving.server import free_port
from triton_al.sinks import open_sink
from triton_al.sinks.labelstudio import LabelStudioSink

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LabelStudioServer(tmp_path_factory.mktemp("label-studio"), free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop()


def api(server, path):
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def title(request):
    """Each test gets its own projects (the server lives for the whole module)."""
    return f"t{abs(hash(request.node.nodeid)) % 10**8} {{group}}"


@pytest.fixture
def sink(server, monkeypatch, title):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    s = open_sink(f"labelstudio+{server.url}")
    s.title_template = title
    return s


@pytest.fixture
def stored(server, title):
    def read(group):
        projects = api(server, "/api/projects?page_size=1000")
        projects = projects.get("results", projects) if isinstance(projects, dict) else projects
        ids = [p["id"] for p in projects if p["title"] == title.format(group=group)]
        if not ids:
            return {}
        (project,) = ids  # exactly one project per group
        listing = api(server, f"/api/tasks?project={project}&page_size=1000&fields=all")
        tasks = listing["tasks"] if isinstance(listing, dict) else listing
        out = {}
        for t in tasks:
            digest = t["data"]["content_hash"]
            assert digest not in out, "a task imported twice"
            out[digest] = {**t["data"], "prediction": {"label": None}, "predictions_score": t.get("predictions_score")}
            if t.get("predictions"):
                choice = t["predictions"][0]["result"][0]["value"]["choices"][0]
                out[digest]["prediction"] = {"label": LabelStudioSink(server.url).class_names.index(choice)}
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
def bad_credentials_sink(server, title):
    return LabelStudioSink(server.url, token="f" * 40, title_template=title)


@pytest.fixture
def secret():
    return TOKEN


class TestLabelStudioSink(SinkConformance):
    pass


def test_predictions_carry_our_score_for_sorting_and_annotations_come_back(server, sink, stored):
    batch = [upload(i, group="ls-specific") for i in range(3)]
    assert sink.upload(batch) == [None] * 3
    found = stored("ls-specific")
    for up in batch:
        assert found[up.content_hash]["predictions_score"] == pytest.approx(up.metadata["score"])
    project = sink.project_for("ls-specific")
    task = next(t for t in api(server, f"/api/tasks?project={project}&page_size=100")["tasks"]
                if t["data"]["content_hash"] == batch[1].content_hash)
    body = {"result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["Coat"]}}]}
    request = urllib.request.Request(f"{server.url}/api/tasks/{task['id']}/annotations", data=json.dumps(body).encode(),
                                     method="POST", headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    (annotation,) = sink.annotations("ls-specific")
    assert (annotation.content_hash, annotation.label) == (batch[1].content_hash, 4)


def test_a_new_process_does_not_import_again(server, sink, stored, monkeypatch):
    batch = [upload(70, group="restart"), upload(71, group="restart")]
    assert sink.upload(batch) == [None, None]
    fresh = open_sink(f"labelstudio+{server.url}")  # no cache: what a restarted uploader sees
    fresh.title_template = sink.title_template
    assert fresh.upload(batch) == [None, None]
    assert len(stored("restart")) == 2


@pytest.mark.parametrize("uri, message", [
    ("labelstudio+ftp://host", "unknown scheme"),
    ("labelstudio+http://host:8080/abc", "must be a project id"),
    ("labelstudio+http://user:pw@host:8080", "credentials do not belong in the URI"),
])
def test_bad_uris_are_refused(uri, message):
    with pytest.raises(ValueError, match=message):
        open_sink(uri)
