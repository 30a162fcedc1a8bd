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
import re
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


_OURS = re.compile(r"^([0-9a-f]{64})\.[A-Za-z0-9]{1,10}$")  # how the sink names assets: <sha256>.<ext>
PAGE = 100
MAX_ASSET_BYTES = 256 * 1024**2


def run(request: dict) -> dict:
    _configure_sdk()
    secret = _secret()
    if not secret:
        return {"batch_error": {"kind": "auth", "message": "no secret key (set DATATURE_SECRET_KEY or DATATURE_SECRET_KEY_FILE)"}}
    op = request.get("op", "upload")
    if op == "annotations":
        return _guarded(_annotations, request)
    if op == "fetch":
        return _guarded(_fetch, request)
    return _upload(request)


def _guarded(operation, request: dict) -> dict:
    try:
        return operation(request)
    except Exception as e:  # noqa: BLE001 - reported to the sink, classified
        return {"batch_error": {"kind": _kind(e), "message": _message(e)}}


def _project(request: dict):
    from datature.nexus import Client

    return Client(_secret(), endpoint=request["endpoint"]).get_project(request["project"])


def _annotations(request: dict) -> dict:
    """The annotations of the group's assets the sink named (`<sha256>.<ext>`): the assets
    of the group, a page at a time (`assets.list` filtered by group), then the annotations
    of those the listing counts any for (`annotations.list` filtered by asset ids)."""
    project = _project(request)
    group = request["group"]
    assets: dict[str, dict] = {}  # asset id -> what the answer says of it
    page = None
    while True:
        listing = project.assets.list(pagination={"limit": PAGE, **({"page": page} if page else {})}, filters={"groups": [group]})
        for asset in listing.data or []:
            m = _OURS.match(asset.filename or "")
            if not m or group not in (asset.metadata.groups or []):
                continue
            counted = asset.statistic.total_annotations if asset.statistic is not None else None
            if counted == 0:
                continue  # nothing annotated on it: no need to ask
            assets[asset.id] = {"content_hash": m.group(1), "filename": asset.filename, "status": asset.status, "annotations": []}
        page = listing.next_page
        if not page or not listing.data:
            break
    ids = list(assets)
    for start in range(0, len(ids), PAGE):
        page = None
        while True:
            answer = project.annotations.list(pagination={"limit": PAGE, **({"page": page} if page else {})},
                                              filters={"asset_ids": ids[start:start + PAGE]})
            for a in answer.data or []:
                if a.asset_id in assets:
                    assets[a.asset_id]["annotations"].append(
                        {"id": a.id, "tag": a.tag, "bound_type": a.bound_type, "bound": a.bound, "create_date": a.create_date})
            page = answer.next_page
            if not page or not answer.data:
                break
    return {"assets": [a for a in assets.values() if a["annotations"]]}


def _fetch(request: dict) -> dict:
    """Assets' bytes (from their URLs, as the SDK's downloader fetches them) and metadata,
    per file name: the asset, None when it is not in the group, or this item's error."""
    from datature.nexus import error

    project = _project(request)
    out: dict[str, dict | None] = {}
    for name in request["filenames"]:
        try:
            asset = project.assets.get(name)
        except error.NotFoundError:
            out[name] = None
            continue
        if request["group"] not in (asset.metadata.groups or []):
            out[name] = None
            continue
        try:
            out[name] = _download(asset)
        except Exception as e:  # noqa: BLE001 - this item's failure, classified
            out[name] = {"error": {"kind": "transient", "message": f"{name}: download failed ({_message(e)})"}}
    return {"assets": out}


def _download(asset) -> dict:
    import requests

    if not asset.url:
        return {"error": {"kind": "transient", "message": f"{asset.filename}: Nexus gave no download URL"}}
    with requests.get(asset.url, timeout=(10, 120), stream=True) as r:
        if r.status_code != 200:
            kind = "transient" if r.status_code >= 500 or r.status_code in (403, 408, 429) else "permanent"
            return {"error": {"kind": kind, "message": f"{asset.filename}: download answered {r.status_code}"}}
        data = bytearray()
        for chunk in r.iter_content(1 << 20):
            data += chunk
            if len(data) > MAX_ASSET_BYTES:
                return {"error": {"kind": "permanent", "message": f"{asset.filename}: over {MAX_ASSET_BYTES} bytes"}}
    return {"filename": asset.filename, "mime_type": asset.metadata.mime_type,
            "custom_metadata": dict(asset.metadata.custom_metadata or {}), "asset_b64": base64.b64encode(bytes(data)).decode()}


def _upload(request: dict) -> dict:
    from datature.nexus import Client, error

    secret = _secret()
    uploads = request["uploads"]
    results: list[dict | None] = [None] * len(uploads)
    try:
        project = Client(secret, endpoint=request["endpoint"]).get_project(request["project"])
        # Idempotency: an asset named by its content hash is in the project or not. One
        # name is uploaded at most once (in the session of the first group that asks for
        # it); every other group it was flagged for is joined through the asset's groups.
        present: dict[str, list[str]] = {}  # filename -> its groups, for assets already there
        carrier: dict[str, int] = {}  # filename -> the upload that sends the bytes of a new asset
        new_by_group: dict[str, list[int]] = {}
        for i, up in enumerate(uploads):
            name = up["filename"]
            if name in present or name in carrier:
                continue
            try:
                present[name] = list(project.assets.get(name).metadata.groups or [])
            except error.NotFoundError:
                carrier[name] = i
                new_by_group.setdefault(up["group"], []).append(i)
        for group, indices in new_by_group.items():
            _upload_group(project, group, [uploads[i] for i in indices], indices, results)
        for i, up in enumerate(uploads):  # the same bytes for another group share the carrier's fate
            j = carrier.get(up["filename"], i)
            if j != i and results[j] is not None:
                results[i] = results[j]
        _join_groups(project, uploads, results, present)
        for i, up in enumerate(uploads):
            if results[i] is None and up["custom_metadata"]:
                try:
                    project.assets.add_custom_metadata(up["filename"], up["custom_metadata"])
                except (error.BadRequestError, ValueError) as e:  # this item's metadata, not the batch
                    results[i] = {"kind": "permanent", "message": f"custom metadata refused: {_message(e)}"}
    except Exception as e:  # noqa: BLE001 - reported to the sink, classified
        kind = _kind(e)
        if kind == "permanent" and len(uploads) == 1:
            return {"results": [{"kind": "permanent", "message": _message(e)}]}
        return {"batch_error": {"kind": kind, "message": _message(e)}}
    return {"results": results}


def _join_groups(project, uploads: list[dict], results: list, present: dict[str, list[str]]) -> None:
    """Make every stored asset a member of each group it was flagged for. Nexus's asset
    update (`PATCH /projects/{id}/assets/{asset}`, the SDK's `assets.update`) replaces the
    asset's groups, so send what it has plus what is missing, read just before."""
    from datature.nexus import error

    wanted: dict[str, set[str]] = {}
    for i, up in enumerate(uploads):
        if results[i] is None:
            wanted.setdefault(up["filename"], set()).add(up["group"])
    for name, groups in wanted.items():
        have = present.get(name)
        if have is None or not groups <= set(have):  # uploaded just now, or missing a group: read it again
            try:
                have = list(project.assets.get(name).metadata.groups or [])
            except error.NotFoundError:
                have = None
        if have is None:  # the session said done but the asset is not there: try again later
            for i, up in enumerate(uploads):
                if up["filename"] == name and results[i] is None:
                    results[i] = {"kind": "transient", "message": "uploaded, but not yet visible in the project"}
            continue
        missing = groups - set(have)
        if missing:
            try:
                project.assets.update(name, {"groups": have + sorted(missing)})
            except (error.BadRequestError, ValueError) as e:  # e.g. a group name Nexus refuses: these items only
                for i, up in enumerate(uploads):
                    if up["filename"] == name and results[i] is None and up["group"] in missing:
                        results[i] = {"kind": "permanent", "message": f"joining group(s) refused: {_message(e)}"}


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
