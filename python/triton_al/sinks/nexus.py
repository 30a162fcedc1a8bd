"""Datature Nexus: `nexus://PROJECT_ID`, through the official `datature` SDK's upload
session, the upload group becoming the Nexus asset group (what the seed's platform does).

Each asset is named `<sha256>.<ext>`; before uploading, the sink asks Nexus for an asset of
that name and skips it when present, so a retry adds nothing. The score, strategy, model
version, reason and predicted label are attached as the asset's custom metadata
(`triton_al_score`, …), so they can be filtered on in Nexus.

The SDK pins protobuf 5, which tritonclient (protobuf < 5) cannot share an environment
with. So the uploads run in a subprocess (`triton_al.sinks.nexus_worker`) with a Python
that has `datature`: `$TRITON_AL_NEXUS_PYTHON`, else this interpreter if it can import
`datature`, else `<repo>/.venv/nexus/bin/python`. Create that environment with
`python3.11 -m venv .venv/nexus && .venv/nexus/bin/pip install datature==1.12.2`.

Annotations come back (`labels pull`, the uploader's `--pull-labels-every`) through the SDK:
the group's assets a page at a time (`assets.list` filtered by the group), then the
annotations of those the listing counts any for (`annotations.list` by asset ids, 100 at
a time). Nexus lists neither assets nor annotations by change time, and an annotation can be
modified in place (its creation time stays), so every pull reads every annotated asset of
the group and `labels pull` compares each with the store (no watermark: it could miss a
modified tag). Per asset: classification tags give the class (by its name: map names to
indexes with the model's class names, `--labels FILE`), several tags a list of classes;
rectangles give `{"boxes": [{"label": tag, "box": [x0, y0, x1, y1]}]}` (normalised); other
shapes are reported. `labelled_at` is the newest annotation's creation time. An item not in
the local store is fetched from the asset's URL (`fetch_many`: several per run of the SDK),
with our metadata rebuilt from its custom metadata.

Credentials: `DATATURE_SECRET_KEY` or a file named by `DATATURE_SECRET_KEY_FILE`; the API
endpoint can be changed with `DATATURE_API_ENDPOINT` (the tests point it at a local fake of
the API: the real service cannot be reached from the test machines).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

PYTHON_ENV = "TRITON_AL_NEXUS_PYTHON"
ENDPOINT_ENV = "DATATURE_API_ENDPOINT"
DEFAULT_ENDPOINT = "https://api.datature.io"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds triton_al/
WORKER = Path(__file__).with_name("nexus_worker.py")


def find_python() -> str:
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    if importlib.util.find_spec("datature") is not None:
        return sys.executable
    local = PACKAGE_ROOT.parent / ".venv" / "nexus" / "bin" / "python"
    if local.exists():
        return str(local)
    raise ValueError(
        "sink nexus: the datature SDK is not installed; it needs an environment of its own "
        f"(python3.11 -m venv .venv/nexus && .venv/nexus/bin/pip install datature==1.12.2) or set {PYTHON_ENV}"
    )


INT64 = 2**63


def _scalar(value) -> bool:
    """What Nexus custom metadata holds: a string, a boolean, a 64-bit integer or a finite number."""
    if isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return -INT64 <= value < INT64
    return isinstance(value, float) and math.isfinite(value)


def custom_metadata(metadata) -> dict:
    """The asset's custom metadata in Nexus. Metadata that is not JSON at all is refused
    (ValueError/TypeError/RecursionError); a value Nexus cannot hold (NaN, an object) is
    left out, so an item flagged for invalid model output (score NaN) still arrives."""
    meta = dict(metadata)
    json.dumps(meta)  # objects, non-string keys of mixed types, nesting beyond reason: refused, per item
    prediction = meta.get("prediction") if isinstance(meta.get("prediction"), dict) else {}
    custom = {k: v for k, v in {
        "triton_al_score": meta.get("score"), "triton_al_strategy": meta.get("strategy"),
        "triton_al_reason": meta.get("reason"), "triton_al_model": f"{meta.get('model_name')}:{meta.get('model_version')}",
        "triton_al_label": prediction.get("label"), "triton_al_flagged_at": meta.get("flagged_at"),
    }.items() if _scalar(v)}
    try:
        json.dumps(custom, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"metadata holds text that is not valid Unicode ({e.reason})") from None
    return custom


def metadata_from_custom(custom: dict) -> dict:
    """Our metadata, rebuilt from the asset's custom metadata (`custom_metadata`'s inverse,
    for the fields Nexus could hold)."""
    model = str(custom.get("triton_al_model", ""))
    name, _, version = model.partition(":")
    meta = {"score": custom.get("triton_al_score"), "strategy": custom.get("triton_al_strategy"),
            "reason": custom.get("triton_al_reason"), "flagged_at": custom.get("triton_al_flagged_at"),
            "model_name": name or None, "model_version": version or None}
    if "triton_al_label" in custom:
        meta["prediction"] = {"label": custom["triton_al_label"]}
    return {k: v for k, v in meta.items() if v is not None}


def annotation_label(annotations: list[dict]) -> tuple[object, str | None]:
    """One asset's Nexus annotations as a label (tags by name), or the problem with them."""
    kinds = {a.get("bound_type") for a in annotations}
    ordered = sorted(annotations, key=lambda a: (a.get("create_date") or 0, a.get("id") or ""))
    if kinds == {"Classification"}:
        tags = list(dict.fromkeys(a.get("tag") for a in ordered))
        if not all(isinstance(t, str) and t for t in tags):
            return None, "a classification annotation without a tag"
        return (tags[0] if len(tags) == 1 else tags), None
    if kinds == {"Rectangle"}:
        boxes = []
        for a in ordered:
            points = a.get("bound")
            try:
                xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
            except (TypeError, ValueError, IndexError):
                return None, f"a rectangle with bounds {points!r}"
            if not xs or not isinstance(a.get("tag"), str):
                return None, "a rectangle without bounds or tag"
            boxes.append({"label": a["tag"], "box": [min(xs), min(ys), max(xs), max(ys)]})
        return {"boxes": boxes}, None
    return None, (f"annotations of kind(s) {', '.join(sorted(str(k) for k in kinds))}: only classification tags "
                  "or rectangles (alone) become labels")


class NexusSink(Sink):
    def __init__(self, project: str, *, endpoint: str | None = None, python: str | None = None, timeout_s: float = 300) -> None:
        self.project = project if project.startswith("proj_") else f"proj_{project}"
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.python = python or find_python()
        self.timeout_s = timeout_s
        self._filenames: dict[tuple[str, str], str] = {}  # (group, content hash) -> asset name, from the last listing

    @classmethod
    def from_uri(cls, uri: str) -> NexusSink:
        parts = urlsplit(uri)
        project = parts.netloc
        if (parts.scheme != "nexus" or not project or parts.path.strip("/") or parts.query
                or not project.replace("_", "").isalnum()):
            raise ValueError(f"sink {uri!r}: expected nexus://PROJECT_ID (letters, digits and '_')")
        return cls(project)

    def describe(self) -> str:
        return f"nexus://{self.project} at {self.endpoint}"

    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        results: list[SinkError | None] = [None] * len(batch)
        request, positions = [], []
        first: dict[tuple[str, str], int] = {}  # (group, file) -> batch index that carries it
        repeats: dict[int, int] = {}
        for i, up in enumerate(batch):
            if (up.group, up.filename) in first:  # the SDK refuses one name twice in a session
                repeats[i] = first[(up.group, up.filename)]
                continue
            try:
                validate_group_name(up.group)
                check_asset(up)
                custom = custom_metadata(up.metadata)
            except PermanentSinkError as e:
                results[i] = e
                continue
            except (ValueError, TypeError, RecursionError) as e:
                results[i] = PermanentSinkError(f"{up.group}/{up.content_hash}: metadata refused: {e}")
                continue
            request.append({"group": up.group, "filename": up.filename, "asset_b64": base64.b64encode(up.asset).decode(),
                            "custom_metadata": custom})
            positions.append(i)
            first[(up.group, up.filename)] = i
        if not request:
            for i, j in repeats.items():
                results[i] = results[j]
            return results
        answer = self._run({"project": self.project, "endpoint": self.endpoint, "uploads": request})
        error = answer.get("batch_error")
        if error:
            # A whole-batch "permanent" error (unknown project) is an operator's fix away: retry.
            if error["kind"] == "auth":
                raise SinkAuthError(f"{self.describe()}: credentials rejected ({error['message']})")
            raise TransientSinkError(f"{self.describe()}: {error['message']}")
        for i, item in zip(positions, answer["results"]):
            if item is not None:
                kind = PermanentSinkError if item["kind"] == "permanent" else TransientSinkError
                results[i] = kind(f"{self.describe()}: {batch[i].group}/{batch[i].filename}: {item['message']}")
        for i, j in repeats.items():
            results[i] = results[j]
        return results

    def _raise(self, error: dict) -> None:
        if error["kind"] == "auth":
            raise SinkAuthError(f"{self.describe()}: credentials rejected ({error['message']})")
        if error["kind"] == "permanent":
            raise PermanentSinkError(f"{self.describe()}: {error['message']}")
        raise TransientSinkError(f"{self.describe()}: {error['message']}")

    def annotations(self, group: str, since: str | None = None) -> Iterator[Annotation]:
        """Every annotated asset of the group (see the module docstring); `since` is taken
        but cannot narrow the listing: Nexus lists nothing by change time."""
        validate_group_name(group)
        answer = self._run({"op": "annotations", "project": self.project, "endpoint": self.endpoint, "group": group})
        if answer.get("batch_error"):
            error = dict(answer["batch_error"])
            if error["kind"] == "permanent":  # an unknown project, say: an operator's fix away
                error["kind"] = "transient"
            self._raise(error)
        self._filenames.update({(group, a["content_hash"]): a["filename"] for a in answer["assets"]})
        for asset in answer["assets"]:
            label, problem = annotation_label(asset["annotations"])
            times = [a["create_date"] for a in asset["annotations"] if isinstance(a.get("create_date"), (int, float))]
            when = datetime.fromtimestamp(max(times) / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if times else None
            yield Annotation(group, asset["content_hash"], label, None, when, problem=problem)

    def fetch(self, group: str, content_hash: str) -> Upload | None:
        """The asset from its download URL, with our metadata rebuilt from its custom metadata."""
        answer = self.fetch_many(group, [content_hash])[content_hash]
        if isinstance(answer, SinkError):
            raise answer
        return answer

    def fetch_many(self, group: str, content_hashes: Sequence[str]) -> dict[str, Upload | SinkError | None]:
        """Several assets in one run of the SDK (a run costs about a second)."""
        out: dict[str, Upload | SinkError | None] = {h: None for h in content_hashes}  # None: not annotated in the last listing
        names = {self._filenames[(group, h)]: h for h in content_hashes if (group, h) in self._filenames}
        if not names:
            return out
        answer = self._run({"op": "fetch", "project": self.project, "endpoint": self.endpoint, "group": group,
                            "filenames": sorted(names)})
        if answer.get("batch_error"):
            self._raise(answer["batch_error"])
        for name, asset in answer["assets"].items():
            content_hash = names.get(name)
            if content_hash is None or asset is None:
                continue
            if "error" in asset:
                kind = PermanentSinkError if asset["error"]["kind"] == "permanent" else TransientSinkError
                out[content_hash] = kind(f"{self.describe()}: {asset['error']['message']}")
                continue
            try:
                data = base64.b64decode(asset["asset_b64"], validate=True)
            except ValueError as e:
                out[content_hash] = TransientSinkError(f"{self.describe()}: {name}: the download was garbled ({e})")
                continue
            out[content_hash] = Upload(group, content_hash, data, asset["mime_type"], metadata_from_custom(asset["custom_metadata"]))
        return out

    def _run(self, request: dict) -> dict:
        # The worker is one self-contained file run by path: putting the folder that holds
        # triton_al on its path would, after a pip install, put all of site-packages there
        # (our protobuf 4 ahead of the SDK's protobuf 5).
        try:
            done = subprocess.run([self.python, str(WORKER)], input=json.dumps(request),
                                  capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TransientSinkError(f"{self.describe()}: no answer within {self.timeout_s} s") from None
        if done.returncode != 0 or not done.stdout.strip():
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise TransientSinkError(f"{self.describe()}: the upload worker failed ({tail[0][:300]})")
        return json.loads(done.stdout)
