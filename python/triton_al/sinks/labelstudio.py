"""Label Studio: `labelstudio+http://host:port[/PROJECT_ID]` (or `labelstudio+https://…`).

One project per upload group, titled `triton-al: <group>` and created on first use with an
image-classification labelling config (or every group into the one project the URI names).
Each flagged asset becomes a task whose image is embedded as a data URL (self-contained:
no storage to configure; fine for the small images this targets, use S3 storage plus
`s3://` tasks for large ones) with the model's prediction attached as a pre-annotation
carrying our score, so annotators can sort tasks by it (lowest = least certain).

Idempotent by content hash: the hash is stored in the task data, and the hashes already in
a project are read once per process before the first import (so a crash between import
and the outbox forgetting the item never imports it twice).

Annotations come back with `annotations(group)`: the chosen class name mapped to its index.

The API token comes from `LABEL_STUDIO_API_KEY` or a file named by
`LABEL_STUDIO_API_KEY_FILE` - never from the URI or the command line. Plain HTTP with the
standard library: no SDK pins in the serving environment.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
TOKEN_FILE_ENV = "LABEL_STUDIO_API_KEY_FILE"
DEFAULT_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def label_config(class_names: Sequence[str]) -> str:
    choices = "".join(f'<Choice value="{_xml(c)}"/>' for c in class_names)
    return (f'<View><Image name="image" value="$image"/><Text name="score" value="$score_text"/>'
            f'<Choices name="label" toName="image" choice="single" showInLine="true">{choices}</Choices></View>')


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def read_token() -> str | None:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return Path(os.environ[TOKEN_FILE_ENV]).read_text().strip()
    return None


class LabelStudioSink(Sink):
    def __init__(self, base_url: str, project_id: int | None = None, *, token: str | None = None,
                 class_names: Sequence[str] = DEFAULT_CLASSES, timeout_s: float = 30.0,
                 title_template: str = "triton-al: {group}") -> None:
        self.base_url = base_url.rstrip("/")
        self.title_template = title_template
        self.project_id = project_id
        self._token = token
        self.class_names = list(class_names)
        self.timeout_s = timeout_s
        self._projects: dict[str, int] = {}
        self._known: dict[int, set[str]] = {}

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
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - the configured server
                text = response.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code in (401, 403):
                raise SinkAuthError(f"{self.describe()}: token rejected ({e.code}) on {what or path}") from None
            if e.code == 429 or e.code >= 500:
                raise TransientSinkError(f"{self.describe()}: {e.code} on {what or path}") from None
            raise PermanentSinkError(f"{self.describe()}: {what or path} rejected ({e.code}: {detail})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TransientSinkError(f"{self.describe()}: unreachable ({reason})") from None

    # Projects ------------------------------------------------------------------------

    def project_for(self, group: str) -> int:
        if self.project_id is not None:
            return self.project_id
        if group in self._projects:
            return self._projects[group]
        title = self.title_template.format(group=group)
        found = None
        page = 1
        while found is None:
            listing = self._call("GET", f"/api/projects?page={page}&page_size=100", what="list projects")
            results = listing.get("results", []) if isinstance(listing, dict) else listing
            found = next((p["id"] for p in results if p.get("title") == title), None)
            if not isinstance(listing, dict) or not listing.get("next"):
                break
            page += 1
        if found is None:
            created = self._call("POST", "/api/projects", {
                "title": title, "label_config": label_config(self.class_names),
                "description": f"Items flagged by triton-al for upload group {group}; sort by prediction score, lowest first.",
            }, what="create project")
            found = created["id"]
        self._projects[group] = found
        return found

    def known_hashes(self, project: int) -> set[str]:
        if project not in self._known:
            known: set[str] = set()
            page = 1
            while True:
                listing = self._call("GET", f"/api/tasks?project={project}&page={page}&page_size=500&fields=all",
                                     what="list tasks")
                tasks = listing.get("tasks", []) if isinstance(listing, dict) else listing
                known.update(t.get("data", {}).get("content_hash") for t in tasks)
                if not tasks or len(tasks) < 500:
                    break
                page += 1
            known.discard(None)
            self._known[project] = known
        return self._known[project]

    # Uploads -------------------------------------------------------------------------

    def task_for(self, up: Upload) -> dict:
        meta = dict(up.metadata)
        prediction = meta.get("prediction") or {}
        label = prediction.get("label") if isinstance(prediction, dict) else None
        score = meta.get("score")
        task = {
            "data": {
                "image": f"data:{up.media_type};base64,{base64.b64encode(up.asset).decode()}",
                "content_hash": up.content_hash, "group": up.group, "score": score,
                "score_text": f"triton-al score {score:.4f} ({meta.get('strategy')}; lower = less certain)" if isinstance(score, (int, float)) else "invalid model output",
                "model_version": str(meta.get("model_version")), "reason": meta.get("reason"),
                "flagged_at": meta.get("flagged_at"), "probs": prediction.get("probs") if isinstance(prediction, dict) else None,
            },
        }
        if isinstance(label, int) and 0 <= label < len(self.class_names):
            task["predictions"] = [{
                "model_version": f"{meta.get('model_name')}:{meta.get('model_version')}",
                "score": score if isinstance(score, (int, float)) else 0.0,
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [self.class_names[label]]}}],
            }]
        json.dumps(task, allow_nan=False)  # refuse NaN/objects here, per item
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
            except (ValueError, TypeError) as e:
                results[i] = PermanentSinkError(f"{up.group}/{up.content_hash}: {e}")
                continue
            project = self.project_for(up.group)  # sink-wide errors propagate: the batch waits
            by_project.setdefault(project, []).append((i, task, up.content_hash))
        for project, items in by_project.items():
            known = self.known_hashes(project)
            fresh, seen = [], set()
            for i, task, digest in items:
                if digest not in known and digest not in seen:
                    fresh.append((i, task, digest))
                    seen.add(digest)
            if not fresh:
                continue
            try:
                self._call("POST", f"/api/projects/{project}/import", [t for _, t, _ in fresh], what="import tasks")
                known.update(d for _, _, d in fresh)
            except PermanentSinkError:
                for i, task, digest in fresh:  # find the culprit: import one by one
                    try:
                        self._call("POST", f"/api/projects/{project}/import", [task], what=f"import {digest}")
                        known.add(digest)
                    except PermanentSinkError as e:
                        results[i] = e
        return results

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
