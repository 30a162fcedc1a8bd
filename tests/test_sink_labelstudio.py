"""The Label Studio sink against a real Label Studio server (see labelstudio_helpers)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from labelstudio_helpers import TOKEN
from labelstudio_helpers import label_studio as server  # noqa: F401 - the fixture, under the name these tests use
from sink_conformance import GROUP, SinkConformance, upload

from triton_al.sinks import open_sink
from triton_al.sinks.base import PermanentSinkError, TransientSinkError
from triton_al.sinks.labelstudio import MAX_CLASSES, LabelStudioSink, Schema, SinkRedirectError, _finite, label_config

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

pytestmark = pytest.mark.slow


def api(server, path, body=None, method=None):
    request = urllib.request.Request(server.url + path, data=None if body is None else json.dumps(body).encode(),
                                     method=method, headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else None


def projects(server) -> list[dict]:
    listing = api(server, "/api/projects?page_size=1000&include=id,title,description")
    return listing.get("results", listing) if isinstance(listing, dict) else listing


def tasks_of(server, project: int) -> list[dict]:
    listing = api(server, f"/api/tasks?project={project}&page_size=1000&fields=all")
    return listing["tasks"] if isinstance(listing, dict) else listing


@pytest.fixture
def title(request):
    """Each test gets its own projects (the server lives for the whole module)."""
    return f"t{abs(hash(request.node.nodeid)) % 10**8} {{group}}"


@pytest.fixture
def marker(title):
    return "triton-al:group=" + title.replace(" ", "-")


@pytest.fixture
def sink(server, monkeypatch, title, marker):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    s = open_sink(f"labelstudio+{server.url}")
    s.title_template, s.marker_template = title, marker
    return s


def our_projects(server, marker, group):
    """The projects that carry our marker line for `group` (how the sink finds its own)."""
    line = marker.format(group=group)
    return [p["id"] for p in projects(server) if line in (p.get("description") or "").splitlines()]


@pytest.fixture
def stored(server, marker):
    def read(group):
        ids = our_projects(server, marker, group)
        if not ids:
            return {}
        (project,) = ids  # exactly one project per group
        names = Schema.parse(api(server, f"/api/projects/{project}")["label_config"]).names
        out = {}
        for t in tasks_of(server, project):
            digest = t["data"]["content_hash"]
            assert digest not in out, "a task imported twice"
            out[digest] = {**t["data"], "prediction": {"label": None}, "predictions_score": t.get("predictions_score")}
            if t.get("predictions") and t["predictions"][0]["result"]:  # the pre-annotation, as its class index
                choice = t["predictions"][0]["result"][0]["value"]["choices"][0]
                out[digest]["prediction"] = {"label": names.index(choice)}
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
def bad_credentials_sink(server, title, marker):
    return LabelStudioSink(server.url, token="f" * 40, title_template=title, marker_template=marker)


@pytest.fixture
def secret():
    return TOKEN


class TestLabelStudioSink(SinkConformance):
    @pytest.fixture
    def metadata_view(self):
        """The task data Label Studio keeps: non-finite numbers become null (as the outbox
        and the step write them), the model version a string, the label a pre-annotation."""
        def view(meta):
            finite = lambda v: _finite(v)  # noqa: E731
            score = meta.get("score")
            score = score if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) else None
            prediction = meta.get("prediction")
            label = prediction.get("label") if isinstance(prediction, dict) else None
            return {"score": score, "model_version": str(meta.get("model_version")), "reason": finite(meta.get("reason")),
                    "flagged_at": finite(meta.get("flagged_at")),
                    "probs": finite(prediction.get("probs")) if isinstance(prediction, dict) else None,
                    "prediction": {"label": label if isinstance(label, int) and not isinstance(label, bool)
                                   and 0 <= label < MAX_CLASSES else None}}

        return view


def test_predictions_carry_our_score_for_sorting_and_annotations_come_back(server, sink, stored):
    sink.class_names = FASHION  # as from ?labels=FILE
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
    assert Schema.parse(api(server, f"/api/projects/{project}")["label_config"]).names == tuple(FASHION)


def test_a_new_process_does_not_import_again(server, sink, stored, monkeypatch):
    batch = [upload(70, group="restart"), upload(71, group="restart")]
    assert sink.upload(batch) == [None, None]
    fresh = open_sink(f"labelstudio+{server.url}")  # no cache: what a restarted uploader sees
    fresh.title_template, fresh.marker_template = sink.title_template, sink.marker_template
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


# Dedup after a lost answer ----------------------------------------------------------------


class LossyProxy:
    """Forwards every request to Label Studio, but loses the answer to the first import
    after Label Studio has completed it: `timeout` (held past the client's timeout),
    `reset` (the connection closed without an answer) or `502` (a gateway's error)."""

    def __init__(self, port: int, loss: str, hold_s: float = 10.0) -> None:
        self.lost = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if self.command == "POST" and self.path.endswith("/import") and not proxy.lost:
                    proxy.lost += 1  # Label Studio has imported the tasks by now
                    if loss == "timeout":
                        time.sleep(hold_s)
                    elif loss == "reset":
                        self.close_connection = True
                        return
                    elif loss == "502":
                        self.send_response(502)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                try:
                    self.send_response(answer.status)
                    for k, v in answer.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

            do_GET = do_POST = do_PATCH = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("loss", ["timeout", "reset", "502"])
def test_an_import_whose_answer_was_lost_is_not_imported_again(server, sink, stored, loss):
    """The import reached Label Studio and was completed, but its answer never came back:
    the uploader retries the batch (same process), and the retry must find the tasks there."""
    group = "lost-answer"
    sink.project_for(group)  # made beforehand: only the import meets the loss
    with LossyProxy(server.port, loss) as proxy:
        lossy = LabelStudioSink(proxy.url, token=TOKEN, title_template=sink.title_template, timeout_s=3)
        lossy.marker_template = sink.marker_template
        batch = [upload(80 + i, group=group) for i in range(3)]
        with pytest.raises(TransientSinkError):
            lossy.upload(batch)
        deadline = time.monotonic() + 60
        while not proxy.lost and time.monotonic() < deadline:  # Label Studio may still be at it on a slow machine
            time.sleep(0.1)
        assert proxy.lost == 1 and len(stored(group)) == 3  # Label Studio did import them
        assert lossy.upload(batch) == [None] * 3  # the uploader's retry
        assert lossy.upload([*batch, upload(83, group=group)]) == [None] * 4
    assert len(stored(group)) == 4  # `stored` fails on a task imported twice


# Which project is ours ---------------------------------------------------------------------


def test_projects_are_ours_by_their_marker_not_their_title(server, sink, stored, marker):
    group = "by-marker"
    users = api(server, "/api/projects", {"title": sink.title_template.format(group=group), "description": "a person's project",
                                          "label_config": label_config("classification", FASHION)}, "POST")
    assert sink.upload([upload(90, group=group)]) == [None]
    assert tasks_of(server, users["id"]) == []  # the same title, but not ours: untouched
    (ours,) = our_projects(server, marker, group)
    assert ours != users["id"]
    api(server, f"/api/projects/{ours}", {"title": "renamed by a person"}, "PATCH")
    restarted = LabelStudioSink(server.url, token=TOKEN, title_template=sink.title_template)
    restarted.marker_template = sink.marker_template
    assert restarted.upload([upload(91, group=group)]) == [None]
    assert our_projects(server, marker, group) == [ours] and len(stored(group)) == 2
    assert tasks_of(server, users["id"]) == []


def test_a_project_made_before_markers_is_adopted(server, sink, stored, marker):
    group = "legacy"
    old = api(server, "/api/projects", {
        "title": sink.title_template.format(group=group), "label_config": label_config("classification", FASHION),
        "description": f"Items flagged by triton-al for upload group {group}; sort by prediction score, lowest first."}, "POST")
    assert sink.upload([upload(92, group=group)]) == [None]
    assert our_projects(server, marker, group) == [old["id"]] and len(stored(group)) == 1


def test_a_group_name_longer_than_a_project_title_gets_its_project(sink, stored):
    group = "g" * 128  # Label Studio titles are at most 50 characters
    assert sink.upload([upload(93, group=group)]) == [None]
    assert upload(93).content_hash in stored(group)


# Redirects: the token stays with the configured server ----------------------------------------


class Recorder:
    """A local HTTP server that records each request (method, path, Authorization) and
    answers with `respond(handler)`."""

    def __init__(self, respond, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append((self.command, self.path, self.headers.get("Authorization")))
                respond(self)

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def redirect(self, code, location):
                self.send_response(code)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PATCH = do_PUT = _handle  # noqa: N815

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def empty_listing(h):
    h.reply(200, {"results": [], "next": None, "tasks": [], "total": 0, "id": 1, "label_config": label_config("classification", FASHION)})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])  # another port; another host
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_the_token_never_follows_a_redirect_to_another_host(code, host):
    with Recorder(empty_listing, host=host) as elsewhere, Recorder(lambda h: h.redirect(code, elsewhere.url + h.path)) as front:
        with pytest.raises(SinkRedirectError, match="another host") as e:
            LabelStudioSink(front.url, token=TOKEN).upload([upload(1)])
        assert elsewhere.requests == []  # not even a request, let alone the token
        assert front.requests and all(auth == f"Token {TOKEN}" for _, _, auth in front.requests)
        assert TOKEN not in str(e.value) and elsewhere.url.split("//")[1] in str(e.value)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_an_import_answered_with_a_redirect_fails_and_is_not_resent(code):
    def respond(h):
        if h.command == "GET":
            return empty_listing(h)
        return h.redirect(code, h.path + "-elsewhere")  # same server: still no

    with Recorder(respond) as front:
        with pytest.raises(SinkRedirectError, match="redirect"):
            LabelStudioSink(front.url, 1, token=TOKEN).upload([upload(1), upload(2)])
        # the project's config, the hashes it has, the import: no GET of the target, no second POST
        assert [m for m, _, _ in front.requests] == ["GET", "GET", "POST"]


def test_a_redirect_within_the_server_is_followed_for_reads():
    def respond(h):
        if h.command == "GET" and "followed" not in h.path:
            return h.redirect(302, h.path + "&followed=1")
        return empty_listing(h) if h.command == "GET" else h.reply(201, {"task_count": 1})

    with Recorder(respond) as front:
        assert LabelStudioSink(front.url, 1, token=TOKEN).upload([upload(1)]) == [None]
        assert [m for m, _, _ in front.requests] == ["GET", "GET", "GET", "GET", "POST"]  # each read redirected once
        assert all(auth == f"Token {TOKEN}" for _, _, auth in front.requests)


def test_https_is_never_redirected_to_http():
    sink = LabelStudioSink("https://ls.example:8443", token=TOKEN)
    for target in ("http://ls.example:8443/api/projects", "http://ls.example/api/projects", "https://other.example:8443/x"):
        with pytest.raises(SinkRedirectError):
            sink._redirect_target("GET", "https://ls.example:8443/api/projects", 302, target, "list projects")
    assert sink._redirect_target("GET", "https://ls.example:8443/a", 302, "/b", "x") == "https://ls.example:8443/b"


def test_items_are_given_back_whole_and_a_changed_image_is_refused(server, sink):
    """What `labels pull` fetches into a store the uploader never delivered to."""
    group = "fetch-back"
    batch = [upload(120 + i, group=group) for i in range(3)]
    assert sink.upload(batch) == [None] * 3
    missing = "0" * 64
    found = sink.fetch_many(group, [batch[0].content_hash, batch[2].content_hash, missing])
    assert found[missing] is None
    for up in (batch[0], batch[2]):
        got = found[up.content_hash]
        assert (got.group, got.content_hash, got.asset, got.media_type) == (group, up.content_hash, up.asset, "image/png")
        assert {k: got.metadata[k] for k in ("prediction", "score", "strategy", "model_name", "flagged_at")} == \
            {k: up.metadata[k] for k in ("prediction", "score", "strategy", "model_name", "flagged_at")}
    project = sink.project_for(group)
    task = next(t for t in tasks_of(server, project) if t["data"]["content_hash"] == batch[1].content_hash)
    other = upload(999).asset
    api(server, f"/api/tasks/{task['id']}", {"data": {**task["data"], "image": "data:image/png;base64," +
                                                      base64.b64encode(other).decode()}}, "PATCH")
    with pytest.raises(PermanentSinkError, match="does not match the hash"):
        sink.fetch(group, batch[1].content_hash)
    assert sink.fetch(group, batch[0].content_hash).asset == batch[0].asset
