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
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
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


class NexusSink(Sink):
    def __init__(self, project: str, *, endpoint: str | None = None, python: str | None = None, timeout_s: float = 300) -> None:
        self.project = project if project.startswith("proj_") else f"proj_{project}"
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.python = python or find_python()
        self.timeout_s = timeout_s

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
