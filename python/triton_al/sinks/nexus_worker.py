"""Runs one batch of Nexus uploads with the official `datature` SDK and reports per item.

Started by `triton_al.sinks.nexus.NexusSink` as a subprocess, usually in an environment of
its own (the SDK pins protobuf 5 and tritonclient needs protobuf < 5). Reads one JSON
request on stdin, writes one JSON answer on stdout. Needs only the standard library and
`datature`; the secret key comes from the environment (DATATURE_SECRET_KEY[_FILE]).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
from pathlib import Path


def _secret() -> str | None:
    if os.environ.get("DATATURE_SECRET_KEY"):
        return os.environ["DATATURE_SECRET_KEY"].strip()
    if os.environ.get("DATATURE_SECRET_KEY_FILE"):
        return Path(os.environ["DATATURE_SECRET_KEY_FILE"]).read_text().strip()
    return None


def _configure_sdk() -> None:
    # The uploader does the retrying (with backoff that keeps the queue's order): the SDK
    # must fail fast. Its retry decorator binds these at import, so set them first.
    from datature.nexus import config

    config.REQUEST_MAX_RETRIES = 0
    config.ASSET_UPLOAD_MAX_RETRIES = 1
    config.OPERATION_LOOPING_DELAY_SECONDS = 0.2
    config.OPERATION_LOOPING_TIMEOUT_SECONDS = 120
    config.REQUEST_TIME_OUT_SECONDS = (10, 120)


def _kind(e: Exception) -> str:
    from datature.nexus import error

    if isinstance(e, (error.ForbiddenError,)):
        return "auth"
    if isinstance(e, (error.BadRequestError, error.NotFoundError)):
        return "permanent"
    return "transient"


def run(request: dict) -> dict:
    _configure_sdk()
    from datature.nexus import Client, error

    secret = _secret()
    if not secret:
        return {"batch_error": {"kind": "auth", "message": "no secret key (set DATATURE_SECRET_KEY or DATATURE_SECRET_KEY_FILE)"}}
    uploads = request["uploads"]
    results: list[dict | None] = [None] * len(uploads)
    try:
        project = Client(secret, endpoint=request["endpoint"]).get_project(request["project"])
        by_group: dict[str, list[int]] = {}
        for i, up in enumerate(uploads):
            try:  # idempotency: an asset named by its content hash is there or not
                project.assets.get(up["filename"])
                continue
            except error.NotFoundError:
                by_group.setdefault(up["group"], []).append(i)
        for group, indices in by_group.items():
            _upload_group(project, group, [uploads[i] for i in indices], indices, results)
        for i, up in enumerate(uploads):
            if results[i] is None:
                project.assets.add_custom_metadata(up["filename"], up["custom_metadata"])
    except Exception as e:  # noqa: BLE001 - reported to the sink, classified
        kind = _kind(e)
        if kind == "permanent" and len(uploads) == 1:
            return {"results": [{"kind": "permanent", "message": _message(e)}]}
        return {"batch_error": {"kind": kind, "message": _message(e)}}
    return {"results": results}


def _upload_group(project, group: str, items: list[dict], indices: list[int], results: list) -> None:
    from datature.nexus import error

    session = project.assets.create_upload_session(groups=[group], background=False, show_progress=False)
    added = []
    for up, i in zip(items, indices):
        try:  # the SDK checks each file's type itself (and crashes on some): per item
            session.add_bytes(base64.b64decode(up["asset_b64"]), up["filename"])
            added.append((up, i))
        except Exception as e:  # noqa: BLE001
            results[i] = {"kind": "permanent", "message": f"refused by the SDK: {_message(e)}"}
    if not added:
        return
    try:
        with session:
            pass  # leaving the session uploads what was added
        session.wait_until_done()
    except error.BadRequestError as e:
        if len(added) == 1:
            results[added[0][1]] = {"kind": "permanent", "message": _message(e)}
            return
        for up, i in added:  # find the item the service refused
            _upload_group(project, group, [up], [i], results)


def _message(e: Exception) -> str:
    text = str(e) or type(e).__name__
    secret = _secret()
    return text.replace(secret, "***") if secret else text


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    request = json.load(sys.stdin)
    json.dump(run(request), sys.stdout)


if __name__ == "__main__":
    main()
