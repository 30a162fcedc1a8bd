"""Label Studio: `labelstudio+http://host:port[/PROJECT_ID][?labels=FILE&task=TASK]` (or `labelstudio+https://…`).

One project per upload group, created on first use with a labelling config that fits the
task (or every group into the one project the URI names):

| task (from the item's prediction) | control | pre-annotation (the model's prediction) |
|---|---|---|
| classification `{"probs", "label"}` | `Choices` (one choice) | the predicted class |
| multi-label `{"probs"}` | `Choices choice="multiple"` | every label with p >= 0.5 |
| detection `{"boxes"}` | `RectangleLabels` | each box with a place (`box`, pixels, from the step's `boxes_input`), in Label Studio's percent of the image (its size read with Pillow) |
| segmentation `{"class_pixels"}` | `PolygonLabels` | none |

The task is the form of the item's prediction (the step stores one form per task), unless the
URI's `task=` (or the constructor's `task`) says. A project's classes are listed in the model's
index order, so a class's index is its place in the list. They are the names in `labels=FILE`
(one per line: the model's labels.txt, Triton's `label_filename`) or the constructor's
`class_names`; without them, they are learned from the items: each prediction names its
classes (`label_name`, when the step has the model's `label_file`) and says how many there
are; a class whose name no item has given yet is shown as its index, and the project's config
grows and takes the names as items bring them (in our own projects only; a project the URI
names is never changed). Give `labels=` for the full list from the start: annotators can pick
any class, and an item whose prediction names a class differently is refused.

A project is ours by a marker line in its description, `triton-al:group=<group>`, not by its
title: renaming the project keeps it ours, and a user's project that happens to bear our title
is never written to. The title (`triton-al: <group>`, cut to Label Studio's 50 characters) is
only for people. A project made by an older triton-al (our exact title and description, no
marker) is adopted: the marker is added to its description.

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

Annotations come back with `annotations(group)`, by the project's control: a choice as its
class index, several choices as a list of indexes, rectangles as
`{"boxes": [{"label": k, "box": [x0, y0, x1, y1]}]}` in pixels of the image, polygons as
`{"polygons": [{"label": k, "points": [[x, y], ...]}]}` (brush masks, in a project of
one's own, are reported, not converted). A class that is not one of the model's comes back as
its name, not an index, for `labels pull` to report: never guessed. Each class of a project
triton-al made carries its index as `category` (Label Studio's converter orders YOLO and COCO
exports by it); a class a person adds in the project's settings has none, and is not taken
for one of the model's.

`fetch`/`fetch_many` give an item back from its task (the embedded image, checked against the
hash, and the metadata kept in the task's data): `labels pull` fills a store the uploader
never delivered to.

The API token comes from `LABEL_STUDIO_API_KEY` or a file named by
`LABEL_STUDIO_API_KEY_FILE` - never from the URI or the command line. It is sent to the
configured origin only: a redirect to another host (or from https to http) is refused with
a `SinkRedirectError`, and any redirect of a write (an import, a project creation) fails,
so a POST is never replayed as a GET or elsewhere. Plain HTTP with the standard library:
no SDK pins in the serving environment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit
from xml.etree import ElementTree

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
TOKEN_FILE_ENV = "LABEL_STUDIO_API_KEY_FILE"
MARKER_TEMPLATE = "triton-al:group={group}"
TITLE_MAX_LEN = 50  # Label Studio's PROJECT_TITLE_MAX_LEN (its minimum is 3)
HASHES_PER_QUERY = 20  # hashes per task query: keeps the URL well under 8 KiB (proxies' limit)
MAX_REDIRECTS = 5
TASKS = ("classification", "multilabel", "detection", "segmentation")
MAX_CLASSES = 100_000  # a class index above this in a prediction is not learned (a broken prediction)
log = logging.getLogger("triton_al.sinks.labelstudio")

# task -> (control tag, its child tag, Label Studio's result type)
_CONTROLS = {
    "classification": ("Choices", "Choice", "choices"),
    "multilabel": ("Choices", "Choice", "choices"),
    "detection": ("RectangleLabels", "Label", "rectanglelabels"),
    "segmentation": ("PolygonLabels", "Label", "polygonlabels"),
}
_RESULT_TYPES = {"Choices": "choices", "RectangleLabels": "rectanglelabels", "PolygonLabels": "polygonlabels",
                 "BrushLabels": "brushlabels"}


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def check_class_names(names: Sequence[str], where: str = "class names") -> list[str]:
    """Class names usable as Label Studio choices: non-empty text without control characters
    (XML cannot hold them), no name twice (a choice maps back to one index)."""
    names = list(names)
    if not names:
        raise ValueError(f"{where}: no class names")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or any(ord(c) < 32 for c in name):
            raise ValueError(f"{where}: class {i} has no usable name ({name!r})")
        if name in seen:
            raise ValueError(f"{where}: class name {name!r} appears twice (a choice must map back to one class)")
        seen.add(name)
    return names


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """Class names, one per line (Triton's label_filename format); blank lines skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"labels file {path}: cannot read it ({e})") from None
    return check_class_names([line.strip() for line in text.splitlines() if line.strip()], f"labels file {path}")


def label_config(task: str, class_names: Sequence[str]) -> str:
    """The labelling config of a project for `task` with these classes (in index order). Each
    class carries its index as `category` (Label Studio's converter orders YOLO and COCO
    exports by it): classes a person adds in the project's settings have none, and are not
    taken for the model's."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    control, child, _ = _CONTROLS[task]
    items = "".join(f'<{child} value="{_xml(c)}" category="{k}"/>' for k, c in enumerate(check_class_names(class_names)))
    choice = {"classification": ' choice="single" showInLine="true"', "multilabel": ' choice="multiple" showInLine="true"'}
    return (f'<View><Image name="image" value="$image" zoom="true"/><Text name="score" value="$score_text"/>'
            f'<{control} name="label" toName="image"{choice.get(task, "")}>{items}</{control}></View>')


@dataclass(frozen=True)
class Schema:
    """What a project's labelling config asks for: the task its control serves, the control's
    name and target (a result's from_name and to_name), and its classes in index order."""

    task: str
    control: str
    to_name: str
    names: tuple[str, ...]
    result_type: str
    config: str
    categories: tuple[int | None, ...] = ()
    """Each class's `category` (its index), None where it has none."""

    def classes(self) -> dict[str, int]:
        """Class name -> the model's class index: by `category` where the config has them
        (a class without one is not the model's), else by place (a config triton-al did not
        write, or wrote before categories)."""
        if any(c is not None for c in self.categories):
            return {name: c for name, c in zip(self.names, self.categories) if c is not None}
        return {name: i for i, name in enumerate(self.names)}

    @classmethod
    def parse(cls, config: str) -> Schema:
        try:
            root = ElementTree.fromstring(config)
        except ElementTree.ParseError as e:
            raise PermanentSinkError(f"the project's labelling config is not XML ({e})") from None
        for element in root.iter():
            if element.tag not in _RESULT_TYPES:
                continue
            if element.tag == "Choices":
                task = "multilabel" if element.get("choice") == "multiple" else "classification"
            else:
                task = "detection" if element.tag == "RectangleLabels" else "segmentation"
            children = [c for c in element.iter() if c.tag in ("Choice", "Label") and c.get("value") is not None]
            categories = tuple(int(c.get("category")) if (c.get("category") or "").isdigit() else None for c in children)
            return cls(task, element.get("name") or "label", element.get("toName") or "image",
                       tuple(c.get("value") for c in children), _RESULT_TYPES[element.tag], config, categories)
        raise PermanentSinkError("the project's labelling config has no Choices, RectangleLabels, PolygonLabels or "
                                 "BrushLabels control: triton-al cannot tell what to label")

    def with_classes(self, classes: dict[int, str]) -> str:
        """This config with its control's classes renamed and extended to `classes` (index ->
        name; a class found by its `category`, or by its place in a config without any), every
        other part of it (a person's edits too) kept as it is."""
        root = ElementTree.fromstring(self.config)
        control = next(e for e in root.iter() if e.tag in _RESULT_TYPES)
        children = [c for c in control.iter() if c.tag in ("Choice", "Label") and c.get("value") is not None]
        if not any((c.get("category") or "").isdigit() for c in children):  # written before categories: place = index
            for i, c in enumerate(children):
                c.set("category", str(i))
        by_index = {int(c.get("category")): c for c in children if (c.get("category") or "").isdigit()}
        tag = "Choice" if control.tag == "Choices" else "Label"
        for k, name in sorted(classes.items()):
            if k in by_index:
                by_index[k].set("value", name)
            else:
                ElementTree.SubElement(control, tag, {"value": name, "category": str(k)})
        return ElementTree.tostring(root, encoding="unicode")


def task_of(prediction: Any) -> str | None:
    """The task a stored prediction is from, by its form (the step writes one form per task);
    None when it has none of them."""
    if not isinstance(prediction, dict):
        return None
    if isinstance(prediction.get("boxes"), list):
        return "detection"
    if isinstance(prediction.get("class_pixels"), list):
        return "segmentation"
    if "label" in prediction:
        return "classification"
    if isinstance(prediction.get("probs"), list):
        return "multilabel"
    return None


def _index(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CLASSES else None


def classes_of(prediction: Any, task: str | None) -> tuple[int, dict[int, str]]:
    """(how many classes the prediction shows the model has, at least; the names it gives
    them by index)."""
    count, names = 0, {}
    if not isinstance(prediction, dict) or task is None:
        return count, names
    listed = prediction.get("class_pixels" if task == "segmentation" else "probs")
    if isinstance(listed, list) and task != "detection":
        count = min(len(listed), MAX_CLASSES)
    labelled = [prediction] if task == "classification" else prediction.get("boxes") if task == "detection" else []
    for entry in labelled if isinstance(labelled, list) else []:
        k = _index(entry.get("label")) if isinstance(entry, dict) else None
        if k is None:
            continue
        count = max(count, k + 1)
        name = entry.get("label_name")
        if isinstance(name, str) and name.strip() and not any(ord(c) < 32 for c in name):
            names[k] = name
    return count, names


def learned_classes(current: dict[int, str], count: int, names: dict[int, str]) -> dict[int, str]:
    """The classes (index -> name) grown to `count` (a class without a name yet shown as its
    index), with the names learned for classes still shown as their index (a name already
    used for another class is not taken twice)."""
    out = dict(current)
    for k in range(count):
        out.setdefault(k, str(k))
    used = set(out.values())
    for k, name in sorted(names.items()):
        if out.get(k) == str(k) and name not in used:
            used.discard(out[k])
            out[k] = name
            used.add(name)
    return out or {0: "0"}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of encoded image bytes, from their header; None if not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def rectangle(box: Any, width: int, height: int) -> dict[str, float] | None:
    """Pixel [x0, y0, x1, y1] as Label Studio's rectangle value (percent of the image),
    clipped to the image; None for a box with no area in it or a missing coordinate."""
    if not isinstance(box, list) or len(box) != 4:
        return None
    coords = [_number(v) for v in box]
    if any(v is None for v in coords) or width <= 0 or height <= 0:
        return None
    x0, y0, x1, y1 = coords
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height, "rotation": 0}


def pixel_box(value: dict, width: float, height: float) -> list[float] | None:
    """A Label Studio rectangle (percent of the image, rotated clockwise about its top-left
    corner by `rotation` degrees) as the pixel [x0, y0, x1, y1] box that holds it."""
    x, y, w, h = (_number(value.get(k)) for k in ("x", "y", "width", "height"))
    if None in (x, y, w, h) or not width or not height:
        return None
    angle = math.radians(_number(value.get("rotation")) or 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(x + cx * cos - cy * sin, y + cx * sin + cy * cos) for cx, cy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs = [c[0] * width / 100 for c in corners]
    ys = [c[1] * height / 100 for c in corners]
    return [round(min(xs), 3), round(min(ys), 3), round(max(xs), 3), round(max(ys), 3)]


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
                 class_names: Sequence[str] | None = None, task: str | None = None, timeout_s: float = 30.0,
                 title_template: str = "triton-al: {group}", marker_template: str = MARKER_TEMPLATE) -> None:
        """`class_names`: the model's classes in index order (else learned from the items);
        `task`: the task of every item (else each item's prediction says)."""
        if task is not None and task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        self.base_url = base_url.rstrip("/")
        self.title_template = title_template
        self.marker_template = marker_template
        self.project_id = project_id
        self._token = token
        self.class_names = check_class_names(class_names) if class_names is not None else None
        self.task = task
        self.timeout_s = timeout_s
        self._projects: dict[str, int] = {}  # group -> project id (ids are stable; contents are not cached)

    @classmethod
    def from_uri(cls, uri: str) -> LabelStudioSink:
        parts = urlsplit(uri)
        scheme = parts.scheme.removeprefix("labelstudio+")
        usage = "expected labelstudio+http://host:port[/PROJECT_ID][?labels=FILE&task=TASK]"
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"sink {uri!r}: {usage}")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"sink {uri!r}: the path must be a project id (a number), got {path!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"labels", "task"})
        if unknown or any(len(v) > 1 for v in query.values()):
            raise ValueError(f"sink {uri!r}: unknown or repeated query parameter(s) {unknown or sorted(query)}; {usage}")
        labels = query.get("labels", [None])[0]
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return cls(f"{scheme}://{netloc}", int(path) if path else None,
                   class_names=read_labels_file(labels) if labels else None, task=query.get("task", [None])[0])

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

    def project_for(self, group: str, task: str | None = None, count: int = 0, names: dict[int, str] | None = None) -> int:
        """Our project for `group`: the one whose description has our marker line (the
        oldest if several), else a legacy one adopted, else a new one labelling `task` (the
        sink's, else the one given, else classification) with the sink's class names, else
        `count` classes named from `names` where known."""
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
            learned = learned_classes({}, count, names or {})
            classes = self.class_names or [learned[k] for k in sorted(learned)]
            created = self._call("POST", "/api/projects", {
                "title": self.title(group), "label_config": label_config(self.task or task or "classification", classes),
                "description": self.description(group),
            }, what="create project")
            found = created["id"]
        self._projects[group] = found
        return found

    def schema(self, project: int) -> Schema:
        """The project's labelling config as it is now (a person may have edited it)."""
        found = self._call("GET", f"/api/projects/{project}", what=f"read project {project}")
        config = found.get("label_config") if isinstance(found, dict) else None
        if not isinstance(config, str):
            raise TransientSinkError(f"{self.describe()}: project {project} came back without its labelling config")
        try:
            return Schema.parse(config)
        except PermanentSinkError as e:  # every item of the project would fail: a configuration problem
            raise SinkError(f"{self.describe()}: project {project}: {e}") from None

    def _grown(self, project: int, schema: Schema, count: int, names: dict[int, str]) -> Schema:
        """In our own project without given class names: the classes the items showed, added
        to its config (and names learned for classes shown as their index)."""
        if self.class_names is not None or self.project_id is not None:
            return schema
        current = {i: name for name, i in schema.classes().items()}
        wanted = learned_classes(current, count, names)
        if wanted == current:
            return schema
        grown = {**wanted, **current}  # the same, without renaming any class
        for classes in (wanted, grown) if grown != wanted else (wanted,):
            if classes == current:
                break
            try:
                self._call("PATCH", f"/api/projects/{project}", {"label_config": schema.with_classes(classes)},
                           what=f"add classes to project {project}")
                break
            except PermanentSinkError as e:  # e.g. a placeholder some annotation already uses: it stays
                log.warning("%s: project %s refused its classes %s: %s", self.describe(), project, classes, e)
        return self.schema(project)

    def _tasks_by_hash(self, project: int, digests: Sequence[str], include: str = "id,data") -> Iterator[dict]:
        """The project's tasks whose `data.content_hash` is one of `digests`, asked of Label Studio now."""
        digests = sorted(set(digests))
        for start in range(0, len(digests), HASHES_PER_QUERY):
            chunk = digests[start:start + HASHES_PER_QUERY]
            query = {"filters": {"conjunction": "or", "items": [
                {"filter": "filter:tasks:data.content_hash", "operator": "equal", "type": "String", "value": d} for d in chunk]}}
            page = 1
            while True:
                listing = self._call("GET", f"/api/tasks?project={project}&page={page}&page_size=100&include={include}"
                                            f"&query={quote(json.dumps(query))}", what="look up tasks by hash")
                tasks = (listing.get("tasks", []) if isinstance(listing, dict) else listing) or []
                yield from (t for t in tasks if isinstance(t, dict) and (t.get("data") or {}).get("content_hash") in chunk)
                total = listing.get("total") if isinstance(listing, dict) else None
                if len(tasks) < 100 or (isinstance(total, int) and page * 100 >= total):
                    break
                page += 1

    def fetch(self, group: str, content_hash: str) -> Upload | None:
        """The item Label Studio holds for (group, hash): the task's embedded image, checked
        against the hash, and the metadata stored beside it; None when there is no such task."""
        found = self.fetch_many(group, [content_hash])[content_hash]
        if isinstance(found, SinkError):
            raise found
        return found

    def fetch_many(self, group: str, content_hashes: Sequence[str]) -> dict[str, Upload | SinkError | None]:
        """`fetch` for several items, asked of Label Studio 20 hashes a query."""
        out: dict[str, Upload | SinkError | None] = dict.fromkeys(content_hashes)
        project = self.project_for(group)
        for task in self._tasks_by_hash(project, list(out)):
            data = task.get("data") or {}
            content_hash = data["content_hash"]
            try:
                out[content_hash] = self._item_of(group, content_hash, task.get("id"), data)
            except PermanentSinkError as e:
                out[content_hash] = e
        return out

    @staticmethod
    def _item_of(group: str, content_hash: str, task_id: Any, data: dict) -> Upload:
        image = data.get("image")
        where = f"{group}/{content_hash}: task {task_id}"
        if not isinstance(image, str) or not image.startswith("data:") or ";base64," not in image:
            raise PermanentSinkError(f"{where}: its image is not an embedded data URL (not a task triton-al made)")
        media_type, encoded = image[5:].split(";base64,", 1)
        try:
            asset = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise PermanentSinkError(f"{where}: its image is not valid base64 ({e})") from None
        if hashlib.sha256(asset).hexdigest() != content_hash:
            raise PermanentSinkError(f"{where}: its image does not match the hash (changed in Label Studio?)")
        metadata = {k: data.get(k) for k in ("prediction", "score", "strategy", "threshold", "reason", "model_name",
                                             "model_version", "flagged_at")}
        return Upload(group, content_hash, asset, media_type, metadata)

    def existing_hashes(self, project: int, digests: Sequence[str]) -> set[str]:
        """Which of `digests` the project has a task for, asked of Label Studio now."""
        return {t["data"]["content_hash"] for t in self._tasks_by_hash(project, digests)}

    # Uploads -------------------------------------------------------------------------

    def item_task(self, up: Upload) -> str | None:
        """The task of an upload: the sink's, else its prediction's form."""
        return self.task or task_of(up.metadata.get("prediction"))

    def _value(self, schema: Schema, k: Any) -> str | None:
        """The project's choice for class index `k`, or None when it has none."""
        k = _index(k)
        if self.class_names is not None:
            name = self.class_names[k] if k is not None and k < len(self.class_names) else None
            return name if name in schema.names else None
        return next((name for name, i in schema.classes().items() if i == k), None)

    def _results(self, up: Upload, prediction: Any, schema: Schema) -> list[dict]:
        """The model's prediction as Label Studio results of the project's control."""
        if not isinstance(prediction, dict):
            return []
        where = {"from_name": schema.control, "to_name": schema.to_name, "type": schema.result_type}
        if schema.task == "classification":
            value = self._value(schema, prediction.get("label"))
            return [{**where, "value": {"choices": [value]}}] if value is not None else []
        if schema.task == "multilabel":
            probs = prediction.get("probs") if isinstance(prediction.get("probs"), list) else []
            chosen = [self._value(schema, i) for i, p in enumerate(probs) if _number(p) is not None and p >= 0.5]
            return [{**where, "value": {"choices": [c for c in chosen if c is not None]}}] if any(chosen) else []
        if schema.task == "detection" and schema.result_type == "rectanglelabels":
            size = image_size(up.asset) if up.media_type.startswith("image/") else None
            boxes = prediction.get("boxes") if isinstance(prediction.get("boxes"), list) else []
            results = []
            for i, box in enumerate(b for b in boxes if isinstance(b, dict)):
                value, place = self._value(schema, box.get("label")), rectangle(box.get("box"), *size) if size else None
                if value is None or place is None:
                    continue  # no place (the step had no boxes_input) or a class the project lacks
                result = {**where, "id": f"p{i}", "original_width": size[0], "original_height": size[1], "image_rotation": 0,
                          "value": {**place, "rectanglelabels": [value]}}
                if _number(box.get("confidence")) is not None:
                    result["score"] = box["confidence"]
                results.append(result)
            return results
        return []  # segmentation: annotators draw from scratch

    def task_for(self, up: Upload, schema: Schema) -> dict:
        """The Label Studio task for an upload into a project with this labelling config."""
        meta = dict(up.metadata)
        json.dumps(meta)  # metadata that is not JSON at all (objects, nesting beyond reason) is refused, per item
        prediction = meta.get("prediction")
        kind = self.item_task(up)
        if kind is not None and kind != schema.task:
            raise PermanentSinkError(
                f"{up.group}/{up.content_hash}: a {kind} prediction, but the group's project labels {schema.task}: "
                "send each task's items to an upload group of its own")
        if self.class_names is not None and kind is not None:
            count, named = classes_of(prediction, kind)
            if count > len(self.class_names):
                raise PermanentSinkError(
                    f"{up.group}/{up.content_hash}: the prediction has {count} classes, the sink's labels "
                    f"{len(self.class_names)}: the labels file is not the model's")
            for k, name in sorted(named.items()):
                if k >= len(self.class_names) or self.class_names[k] != name:
                    given = repr(self.class_names[k]) if k < len(self.class_names) else "no such class"
                    raise PermanentSinkError(
                        f"{up.group}/{up.content_hash}: the prediction names class {k} {name!r}, the sink's labels say "
                        f"{given}: the labels file is not the model's")
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
                # the rest of the item's metadata, so that `fetch` gives the item back whole
                "prediction": prediction, "strategy": meta.get("strategy"), "threshold": meta.get("threshold"),
                "model_name": meta.get("model_name"),
            },
        }
        if kind is not None:  # with an empty result too: the score still sorts the task
            task["predictions"] = [{
                "model_version": f"{meta.get('model_name')}:{meta.get('model_version')}",
                "score": score if score is not None else 0.0,
                "result": self._results(up, prediction, schema),
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

        def refuse(i: int, up: Upload, e: Exception) -> None:
            results[i] = e if isinstance(e, PermanentSinkError) else PermanentSinkError(
                f"{up.group}/{up.content_hash}: metadata refused: {e}")

        by_group: dict[str, list[tuple[int, Upload]]] = {}
        for i, up in enumerate(batch):
            try:
                validate_group_name(up.group)
                check_asset(up)
                json.dumps(dict(up.metadata))  # not JSON at all: refused before any project is touched
            except (PermanentSinkError, ValueError, TypeError, RecursionError) as e:
                refuse(i, up, e)
                continue
            by_group.setdefault(up.group, []).append((i, up))
        by_project: dict[int, list[tuple[int, dict, str]]] = {}
        for group, items in by_group.items():
            kinds = [k for k in (self.item_task(up) for _, up in items) if k is not None]
            seen = [classes_of(up.metadata.get("prediction"), self.item_task(up)) for _, up in items]
            count = max((c for c, _ in seen), default=0)
            names = {k: n for _, named in seen for k, n in named.items()}
            # sink-wide errors propagate: the batch waits
            project = self.project_for(group, kinds[0] if kinds else None, count, names)
            schema = self._grown(project, self.schema(project), count, names)
            for i, up in items:
                try:
                    task = self.task_for(up, schema)
                except (PermanentSinkError, ValueError, TypeError, RecursionError) as e:
                    refuse(i, up, e)
                    continue
                by_project.setdefault(project, []).append((i, task, up.content_hash))
        for project, items in by_project.items():
            existing = self.existing_hashes(project, [d for _, _, d in items])  # asked now: no stale cache
            fresh, seen_hashes = [], set(existing)
            for i, task, digest in items:
                if digest not in seen_hashes:
                    fresh.append((i, task, digest))
                    seen_hashes.add(digest)
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
        """The latest annotation of each annotated task, mapped back to class indexes by the
        sink's `class_names`, else by the project's classes (`Schema.classes`: one a person
        added is not the model's); a class outside them comes back as its name, for `labels
        pull` to report."""
        project = self.project_for(group)
        schema = self.schema(project)
        tasks = self._call("GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=false",
                           what="export annotations")
        index = {name: i for i, name in enumerate(self.class_names)} if self.class_names is not None else schema.classes()
        for task in tasks or []:
            data = task.get("data") or {}
            digest = data.get("content_hash")
            done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            if not digest or not done:
                continue
            latest = max(done, key=lambda a: a.get("updated_at") or a.get("created_at") or "")
            ours = [r for r in latest.get("result") or [] if isinstance(r, dict) and r.get("from_name") == schema.control]
            who = latest.get("completed_by")
            problem = None
            if schema.result_type == "brushlabels":  # a person's project: masks are not converted
                problem = "brush masks are not converted back; label segmentation with PolygonLabels"
            yield Annotation(group, digest, None if problem else self._label(ours, schema, index, data),
                             str(who.get("email") if isinstance(who, dict) else who) if who is not None else None,
                             latest.get("updated_at") or latest.get("created_at"), problem=problem)

    @staticmethod
    def _label(results: list[dict], schema: Schema, index: dict[str, int], data: dict) -> Any:
        """One annotation's results as a label (see the module's description)."""
        def class_of(values: Any) -> Any:
            name = values[0] if isinstance(values, list) and values else None
            return index.get(name, name) if isinstance(name, str) else None

        values = [r.get("value") or {} for r in results]
        if schema.task in ("classification", "multilabel"):
            chosen = [c for v in values for c in v.get("choices") or [] if isinstance(c, str)]
            if schema.task == "classification":
                return class_of(chosen)
            known = sorted({index[c] for c in chosen if c in index})
            return known + [c for c in chosen if c not in index]
        size = None

        def image_wh(result: dict) -> tuple[float, float] | None:
            nonlocal size
            w, h = _number(result.get("original_width")), _number(result.get("original_height"))
            if w and h:
                return w, h
            if size is None:  # a result made without the page (the API): the task's own image
                image = str(data.get("image") or "")
                try:
                    size = image_size(base64.b64decode(image.split(",", 1)[1], validate=True)) if image.startswith("data:") else None
                except (IndexError, binascii.Error, ValueError):
                    size = None
                size = size or (0, 0)
            return size if all(size) else None

        if schema.result_type == "rectanglelabels":
            boxes = []
            for r, v in zip(results, values):
                wh = image_wh(r)
                boxes.append({"label": class_of(v.get("rectanglelabels")), "box": pixel_box(v, *wh) if wh else None})
            return {"boxes": boxes}
        if schema.result_type == "polygonlabels":
            polygons = []
            for r, v in zip(results, values):
                wh = image_wh(r)
                points = [[round(p[0] * wh[0] / 100, 3), round(p[1] * wh[1] / 100, 3)] for p in v.get("points") or []
                          if wh and isinstance(p, list) and len(p) == 2 and None not in map(_number, p)]
                polygons.append({"label": class_of(v.get("polygonlabels")), "points": points})
            return {"polygons": polygons}
        return None
