"""Label Studio: `labelstudio+http://host:port[/PROJECT_ID]` (or `labelstudio+https://…`).

One project per upload group, created on first use with an image-classification labelling
config (or every group into the one project the URI names). A project is ours by a marker
line in its description, `triton-al:group=<group>`, not by its title: renaming the project
keeps it ours, and a user's project that happens to bear our title is never written to.
The title (`triton-al: <group>`, cut to Label Studio's 50 characters) is only for people.
A project made by an older triton-al (our exact title and description, no marker) is
adopted: the marker is added to its description.

Each flagged asset becomes a task whose image is embedded as a data URL (self-contained:
no storage to configure; fine for the small images this targets, use S3 storage plus
`s3://` tasks for large ones) with the model's prediction attached as a pre-annotation
carrying our score, so annotators can sort tasks by it (lowest = least certain).

Idempotent by content hash: the hash is stored in the task data, and before every import
the sink asks Label Studio which of the batch's hashes the project already has (a Data
Manager filter on `data.content_hash`), so neither a retry after an import whose answer
was lost (timeout, reset connection, 5xx from a proxy while Label Studio completed it), nor
a restarted uploader, nor another replica imports a task twice. Nothing about the
project's contents is cached in the process.

Annotations come back with `annotations(group)`: the chosen class name mapped to its index.

The API token comes from `LABEL_STUDIO_API_KEY` or a file named by
`LABEL_STUDIO_API_KEY_FILE` - never from the URI or the command line. It is sent to the
configured origin only: a redirect to another host (or from https to http) is refused with
a `SinkRedirectError`, and any redirect of a write (an import, a project creation) fails,
so a POST is never replayed as a GET or elsewhere. Plain HTTP with the standard library:
no SDK pins in the serving environment.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
TOKEN_FILE_ENV = "LABEL_STUDIO_API_KEY_FILE"
MARKER_TEMPLATE = "triton-al:group={group}"
TITLE_MAX_LEN = 50  # Label Studio's PROJECT_TITLE_MAX_LEN (its minimum is 3)
HASHES_PER_QUERY = 20  # hashes per task query: keeps the URL well under 8 KiB (proxies' limit)
MAX_REDIRECTS = 5
DEFAULT_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def label_config(class_names: Sequence[str]) -> str:
    choices = "".join(f'<Choice value="{_xml(c)}"/>' for c in class_names)
    return (f'<View><Image name="image" value="$image"/><Text name="score" value="$score_text"/>'
            f'<Choices name="label" toName="image" choice="single" showInLine="true">{choices}</Choices></View>')


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


class SinkRedirectError(SinkError):
    """Label Studio (or something in front of it) redirected a request where the token must
    not go, or redirected a write. A configuration problem: every upload waits (the
    uploader backs off and reports it) until the sink URI names the real server."""


class _NotFound(PermanentSinkError):
    """A 404: for an import, the project was deleted under us."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects come back as HTTPError 3xx; `LabelStudioSink._call` decides on them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, PLR0913
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _where(url: str) -> str:
    """scheme://host:port of a URL, for messages (never a user, password or query)."""
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}" if host else "(no host)"


def _finite(value):
    """`value` with every non-finite float (NaN, ±Infinity) replaced by None: JSON has no
    such numbers, and Label Studio would refuse the task."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_token() -> str | None:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return Path(os.environ[TOKEN_FILE_ENV]).read_text().strip()
    return None


class LabelStudioSink(Sink):
    def __init__(self, base_url: str, project_id: int | None = None, *, token: str | None = None,
                 class_names: Sequence[str] = DEFAULT_CLASSES, timeout_s: float = 30.0,
                 title_template: str = "triton-al: {group}", marker_template: str = MARKER_TEMPLATE) -> None:
        self.base_url = base_url.rstrip("/")
        self.title_template = title_template
        self.marker_template = marker_template
        self.project_id = project_id
        self._token = token
        self.class_names = list(class_names)
        self.timeout_s = timeout_s
        self._projects: dict[str, int] = {}  # group -> project id (ids are stable; contents are not cached)

    @classmethod
    def from_uri(cls, uri: str) -> LabelStudioSink:
        parts = urlsplit(uri)
        scheme = parts.scheme.removeprefix("labelstudio+")
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"sink {uri!r}: expected labelstudio+http://host:port[/PROJECT_ID]")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"sink {uri!r}: the path must be a project id (a number), got {path!r}")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return cls(f"{scheme}://{netloc}", int(path) if path else None)

    def describe(self) -> str:
        return f"labelstudio+{self.base_url}" + (f"/{self.project_id}" if self.project_id else "")

    @property
    def token(self) -> str:
        token = self._token or read_token()
        if not token:
            raise SinkAuthError(f"{self.describe()}: no API token (set {TOKEN_ENV} or {TOKEN_FILE_ENV})")
        return token

    def _call(self, method: str, path: str, body=None, what: str = ""):
        """One API call. Redirects are followed only for reads, only within the configured
        origin (or from http to https on the same host), so the token never leaves it."""
        what = what or path
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        url = self.base_url + path
        for _ in range(MAX_REDIRECTS + 1):
            request = urllib.request.Request(url, data=data, method=method, headers={
                "Authorization": f"Token {self.token}", "Content-Type": "application/json", "Accept": "application/json"})
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as response:
                    text = response.read()
            except urllib.error.HTTPError as e:
                try:
                    if 300 <= e.code < 400:
                        url = self._redirect_target(method, url, e.code, e.headers.get("Location"), what)
                        continue
                    detail = e.read()[:300].decode(errors="replace")
                finally:
                    e.close()
                if e.code in (401, 403):
                    raise SinkAuthError(f"{self.describe()}: token rejected ({e.code}) on {what}") from None
                if e.code in (408, 429) or e.code >= 500:
                    raise TransientSinkError(f"{self.describe()}: {e.code} on {what}") from None
                kind = _NotFound if e.code == 404 else PermanentSinkError
                raise kind(f"{self.describe()}: {what} rejected ({e.code}: {detail})") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or type(e).__name__
                raise TransientSinkError(f"{self.describe()}: unreachable or no answer on {what} ({reason})") from None
            try:
                return json.loads(text) if text else None
            except ValueError:
                raise TransientSinkError(f"{self.describe()}: {what}: the answer is not JSON (a proxy's page?)") from None
        raise SinkRedirectError(f"{self.describe()}: more than {MAX_REDIRECTS} redirects on {what}")

    def _redirect_target(self, method: str, url: str, code: int, location: str | None, what: str) -> str:
        if method not in ("GET", "HEAD"):
            raise SinkRedirectError(
                f"{self.describe()}: {what} ({method}) was answered with a redirect ({code}); refusing to send it again "
                "elsewhere or as another method: point the sink URI at Label Studio itself")
        if not location:
            raise SinkRedirectError(f"{self.describe()}: {what}: redirect ({code}) without a Location")
        target = urljoin(url, location)
        (scheme, host, port), (base_scheme, base_host, base_port) = _origin(target), _origin(self.base_url)
        same = host == base_host and (scheme, port) == (base_scheme, base_port)
        upgrade = host == base_host and base_scheme == "http" and scheme == "https"
        downgrade = urlsplit(url).scheme == "https" and scheme != "https"
        if not (same or upgrade) or downgrade:
            raise SinkRedirectError(
                f"{self.describe()}: {what} redirects ({code}) to {_where(target)}, another host or an insecure scheme; "
                "refusing to send the API token there: point the sink URI at the server Label Studio really runs on")
        return target

    # Projects ------------------------------------------------------------------------

    def marker(self, group: str) -> str:
        return self.marker_template.format(group=group)

    def title(self, group: str) -> str:
        title = self.title_template.format(group=group)
        return title if len(title) <= TITLE_MAX_LEN else title[: TITLE_MAX_LEN - 1] + "…"

    def description(self, group: str) -> str:
        return (f"Items flagged by triton-al for upload group {group}; sort by prediction score, lowest first.\n\n"
                f"{self.marker(group)}\n(This line tells triton-al the project is its own: keep it when you edit the description.)")

    def _legacy_description(self, group: str) -> str:
        return f"Items flagged by triton-al for upload group {group}; sort by prediction score, lowest first."

    def _projects_listing(self) -> Iterator[dict]:
        page = 1
        while True:
            listing = self._call("GET", f"/api/projects?page={page}&page_size=100&include=id,title,description",
                                 what="list projects")
            results = listing.get("results", []) if isinstance(listing, dict) else listing
            yield from (p for p in results or [] if isinstance(p, dict))
            if not isinstance(listing, dict) or not listing.get("next"):
                return
            page += 1

    def project_for(self, group: str) -> int:
        """Our project for `group`: the one whose description has our marker line (the
        oldest if several), else a legacy one adopted, else a new one."""
        if self.project_id is not None:
            return self.project_id
        if group in self._projects:
            return self._projects[group]
        marker, legacy_title, legacy_description = self.marker(group), self.title_template.format(group=group), self._legacy_description(group)
        ours, legacy = [], []
        for p in self._projects_listing():
            lines = [line.strip() for line in str(p.get("description") or "").splitlines()]
            if marker in lines:
                ours.append(p["id"])
            elif p.get("title") == legacy_title and str(p.get("description") or "").strip() == legacy_description:
                legacy.append(p["id"])
        if ours:
            found = min(ours)
        elif legacy:
            found = min(legacy)
            self._call("PATCH", f"/api/projects/{found}", {"description": self.description(group)}, what="mark project")
        else:
            created = self._call("POST", "/api/projects", {
                "title": self.title(group), "label_config": label_config(self.class_names), "description": self.description(group),
            }, what="create project")
            found = created["id"]
        self._projects[group] = found
        return found

    def existing_hashes(self, project: int, digests: Sequence[str]) -> set[str]:
        """Which of `digests` the project has a task for, asked of Label Studio now."""
        found: set[str] = set()
        digests = sorted(set(digests))
        for start in range(0, len(digests), HASHES_PER_QUERY):
            chunk = digests[start:start + HASHES_PER_QUERY]
            query = {"filters": {"conjunction": "or", "items": [
                {"filter": "filter:tasks:data.content_hash", "operator": "equal", "type": "String", "value": d} for d in chunk]}}
            page = 1
            while True:
                listing = self._call("GET", f"/api/tasks?project={project}&page={page}&page_size=100&include=id,data"
                                            f"&query={quote(json.dumps(query))}", what="look up tasks by hash")
                tasks = listing.get("tasks", []) if isinstance(listing, dict) else listing
                tasks = tasks or []
                found.update(d for t in tasks if isinstance(t, dict)
                             for d in [(t.get("data") or {}).get("content_hash")] if d in chunk)
                total = listing.get("total") if isinstance(listing, dict) else None
                if len(tasks) < 100 or (isinstance(total, int) and page * 100 >= total):
                    break
                page += 1
        return found

    # Uploads -------------------------------------------------------------------------

    def task_for(self, up: Upload) -> dict:
        meta = dict(up.metadata)
        json.dumps(meta)  # metadata that is not JSON at all (objects, nesting beyond reason) is refused, per item
        prediction = meta.get("prediction") or {}
        label = prediction.get("label") if isinstance(prediction, dict) else None
        score = meta.get("score")
        if not (isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)):
            score = None  # invalid model output (NaN) or no score
        task = {
            "data": {
                "image": f"data:{up.media_type};base64,{base64.b64encode(up.asset).decode()}",
                "content_hash": up.content_hash, "group": up.group, "score": score,
                "score_text": f"triton-al score {score:.4f} ({meta.get('strategy')}; lower = less certain)" if score is not None else "invalid model output",
                "model_version": str(meta.get("model_version")), "reason": meta.get("reason"),
                "flagged_at": meta.get("flagged_at"), "probs": prediction.get("probs") if isinstance(prediction, dict) else None,
            },
        }
        if isinstance(label, int) and 0 <= label < len(self.class_names):
            task["predictions"] = [{
                "model_version": f"{meta.get('model_name')}:{meta.get('model_version')}",
                "score": score if score is not None else 0.0,
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [self.class_names[label]]}}],
            }]
        task = _finite(task)
        try:  # refuse, per item, what Label Studio could not store: objects, lone surrogates
            json.dumps(task, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"metadata holds text that is not valid Unicode ({e.reason})") from None
        except RecursionError:
            raise ValueError("metadata nested too deeply") from None
        return task

    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        results: list[SinkError | None] = [None] * len(batch)
        by_project: dict[int, list[tuple[int, dict, str]]] = {}
        for i, up in enumerate(batch):
            try:
                validate_group_name(up.group)
                check_asset(up)
                task = self.task_for(up)
            except PermanentSinkError as e:
                results[i] = e
                continue
            except (ValueError, TypeError, RecursionError) as e:
                results[i] = PermanentSinkError(f"{up.group}/{up.content_hash}: metadata refused: {e}")
                continue
            project = self.project_for(up.group)  # sink-wide errors propagate: the batch waits
            by_project.setdefault(project, []).append((i, task, up.content_hash))
        for project, items in by_project.items():
            existing = self.existing_hashes(project, [d for _, _, d in items])  # asked now: no stale cache
            fresh, seen = [], set(existing)
            for i, task, digest in items:
                if digest not in seen:
                    fresh.append((i, task, digest))
                    seen.add(digest)
            if not fresh:
                continue
            try:
                self._import(project, [t for _, t, _ in fresh], "import tasks")
            except PermanentSinkError:
                landed = self.existing_hashes(project, [d for _, _, d in fresh])  # in case part of it was kept
                for i, task, digest in fresh:  # find the culprit: import one by one
                    if digest in landed:
                        continue
                    try:
                        self._import(project, [task], f"import {digest}")
                    except PermanentSinkError as e:
                        results[i] = e
        return results

    def _import(self, project: int, tasks: list[dict], what: str) -> None:
        try:
            self._call("POST", f"/api/projects/{project}/import", tasks, what=what)
        except _NotFound:
            if self.project_id is not None:
                raise SinkError(f"{self.describe()}: project {project} does not exist (the sink URI names it)") from None
            # Deleted meanwhile: look it up (or create it) again on the next attempt.
            self._projects = {g: p for g, p in self._projects.items() if p != project}
            raise TransientSinkError(f"{self.describe()}: project {project} is gone; it will be looked up again") from None

    # Annotations back ----------------------------------------------------------------

    def annotations(self, group: str) -> Iterator[Annotation]:
        project = self.project_for(group)
        tasks = self._call("GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=false",
                           what="export annotations")
        index = {name: i for i, name in enumerate(self.class_names)}
        for task in tasks or []:
            digest = task.get("data", {}).get("content_hash")
            done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            if not digest or not done:
                continue
            latest = max(done, key=lambda a: a.get("updated_at") or a.get("created_at") or "")
            choices = [r["value"]["choices"][0] for r in latest.get("result", [])
                       if r.get("type") == "choices" and r.get("value", {}).get("choices")]
            if not choices or choices[0] not in index:
                continue
            who = latest.get("completed_by")
            yield Annotation(group, digest, index[choices[0]],
                             str(who.get("email") if isinstance(who, dict) else who) if who is not None else None,
                             latest.get("updated_at") or latest.get("created_at"))
