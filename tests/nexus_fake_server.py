"""A local stand-in for the parts of the Datature Nexus API that the official `datature`
SDK (1.12.2) uses to upload assets into groups. It is NOT the real service (which cannot be
reached from here); it follows the requests and responses the SDK sends and decodes:

    GET  /projects/{id}                                   project (the SDK checks its type)
    GET  /projects/{id}/assets/{filename}                 one asset, 404 when absent
    POST /projects/{id}/assetuploadsessions               {"groups", "assets": [{filename, mime, size, crc32c}]}
                                                          -> {"id", "opId", "assets": [{"metadata", "upload": signed URL}]}
    PUT  /upload/{token}                                  the signed URL: the asset bytes
    GET  /projects/{id}/operations/{op}                   the session's operation (Finished once all bytes arrived)
    PATCH /projects/{id}/assets/{filename}                {"status"?, "groups"?}: the SDK's `assets.update`;
                                                          `groups` REPLACES the asset's groups (as the SDK documents)
    PUT  /projects/{id}/assets/{filename}/customMetadatas {"parent"?, "customMetadata": {str: str|int|float|bool}}:
                                                          the SDK's `assets.add_custom_metadata`; keys are merged
    GET  /projects/{id}/assets?limit&page&group[]=G       `assets.list`: {"nextPage", "prevPage", "data": [asset]},
                                                          each asset with "statistic" {"tagsCount", "totalAnnotations"}
    POST /projects/{id}/annotations                       `annotations.create`: {"assetId", "tag", "boundType", "bound", ...}
    GET  /projects/{id}/annotations?limit&page&assetId[]=A  `annotations.list`: a page of annotations of those assets
    DELETE /projects/{id}/annotations/{annotation}        `annotations.delete`
    GET  /download/{asset id}                             the asset's `url` (a signed URL: no secret key)

Request bodies are checked the way a typed API checks them: a field the real API does not
take (say `custom_metadata` where the SDK sends `customMetadata`, as its
`AssetCustomMetadata.to_json` does) is a 400 `{"message": ...}`, which the SDK raises as
`BadRequestError`, so a wrong field name fails a test instead of passing unnoticed.

Every API call needs the header `Secret-Key`. State lives in a folder (assets as files plus
a JSON state file), so the server can be stopped and started again on the same port.
Assets whose MIME type is not an image are refused with 400, like the service does.

    FAKE_NEXUS_SECRET=KEY python tests/nexus_fake_server.py --port N --data DIR --project proj_x
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class State:
    def __init__(self, data: Path, project: str) -> None:
        self.data, self.project = data, project
        self.file = data / "state.json"
        self.lock = threading.Lock()
        (data / "assets").mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.file.read_text()) if self.file.exists() else {"assets": {}, "pending": {}, "ops": {}, "sessions": []}
        self.state.setdefault("annotations", {})

    def save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.file)


def _check_fields(body: dict, *, required: set[str], optional: set[str]) -> str | None:
    """What a typed API says about a body with unknown or missing fields (None when fine)."""
    unknown = sorted(set(body) - required - optional)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(required | optional))}"
    missing = sorted(required - set(body))
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    return None


def make_handler(state: State, secret: str, base_url: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> bool:
            if self.headers.get("Secret-Key") != secret:
                self._json(403, {"message": "Forbidden: invalid secret key"})
                return False
            return True

        def _asset(self, name: str) -> dict:
            a = state.state["assets"][name]
            annotations = [x for x in state.state["annotations"].values() if x["assetId"] == a["id"]]
            tags: dict[str, int] = {}
            for x in annotations:
                tags[x["tag"]] = tags.get(x["tag"], 0) + 1
            return {"id": a["id"], "projectId": state.project, "filename": name, "status": "Annotated" if annotations else "None",
                    "createDate": a["created"], "url": f"{base_url}/download/{a['id']}", "metadata": {
                        "fileSize": a["size"], "mimeType": a["mime"], "height": 28, "width": 28, "groups": a["groups"],
                        "customMetadata": a.get("custom", {})},
                    "statistic": {"tagsCount": [{"name": k, "count": v} for k, v in sorted(tags.items())],
                                  "totalAnnotations": len(annotations)}}

        def _page(self, items: list, query: dict) -> None:
            """One page of a list, as the API pages: an opaque cursor in `nextPage`."""
            try:
                limit = int(query.get("limit", ["100"])[0])
                start = int(query.get("page", ["0"])[0] or 0)
            except ValueError:
                return self._json(400, {"message": "limit and page must be numbers"})
            if not 1 <= limit <= 500:
                return self._json(400, {"message": "limit: expected 1-500"})
            chunk = items[start:start + limit]
            more = start + limit < len(items)
            return self._json(200, {"nextPage": str(start + limit) if more else None, "prevPage": str(max(0, start - limit)) if start else None,
                                    "data": chunk})

        def do_GET(self) -> None:  # noqa: N802
            m = re.fullmatch(r"/download/(asset_[0-9a-f-]+)", self.path)
            if m:  # a signed URL: no secret key
                with state.lock:
                    name = next((n for n, a in state.state["assets"].items() if a["id"] == m.group(1)), None)
                    data = (state.data / "assets" / name).read_bytes() if name else None
                if data is None:
                    return self._json(404, {"message": "no such asset"})
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if not self._authorised():
                return
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            m = re.fullmatch(r"/projects/([^/]+)/assets", parts.path)
            if m:
                groups = query.get("group[]")
                with state.lock:
                    names = sorted(state.state["assets"], key=lambda n: (state.state["assets"][n]["created"], n))
                    items = [self._asset(n) for n in names if not groups or set(groups) & set(state.state["assets"][n]["groups"])]
                return self._page(items, query)
            m = re.fullmatch(r"/projects/([^/]+)/annotations", parts.path)
            if m:
                wanted = set(query.get("assetId[]", []))
                with state.lock:
                    items = sorted((a for a in state.state["annotations"].values() if not wanted or a["assetId"] in wanted),
                                   key=lambda a: (a["createDate"], a["id"]))
                return self._page(items, query)
            m = re.fullmatch(r"/projects/([^/]+)", self.path)
            if m:
                if m.group(1) != state.project:
                    return self._json(404, {"message": "project not found"})
                return self._json(200, {"id": state.project, "name": "fake", "workspaceId": "ws_fake", "type": "ObjectDetection",
                                        "createDate": 0, "localization": "MULTI", "tags": [], "groups": ["main"]})
            m = re.fullmatch(r"/projects/([^/]+)/assets/([^/?]+)", self.path)
            if m:
                with state.lock:
                    if m.group(2) in state.state["assets"]:
                        return self._json(200, self._asset(m.group(2)))
                return self._json(404, {"message": "asset not found"})
            m = re.fullmatch(r"/projects/([^/]+)/operations/([^/?]+)", self.path)
            if m:
                with state.lock:
                    op = state.state["ops"].get(m.group(2))
                    if op is None:
                        return self._json(404, {"message": "operation not found"})
                    done = all(token not in state.state["pending"] for token in op["tokens"])
                n = len(op["tokens"])
                return self._json(200, {"id": m.group(2), "kind": "nexus.assets.upload", "createDate": 0, "updateDate": 0,
                                        "status": {"overview": "Finished" if done else "Running", "message": "",
                                                   "progress": {"unit": "asset", "withStatus": {
                                                       "Queued": 0, "Running": 0 if done else n, "Finished": n if done else 0,
                                                       "Cancelled": 0, "Errored": 0}}}})
            self._json(404, {"message": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            if re.fullmatch(r"/projects/([^/]+)/annotations", self.path):
                return self._create_annotation()
            m = re.fullmatch(r"/projects/([^/]+)/assetuploadsessions", self.path)
            if not m:
                return self._json(404, {"message": f"no route {self.path}"})
            body = self._json_body()
            if body is None:
                return None
            problem = _check_fields(body, required={"assets"}, optional={"groups"})
            if problem is not None:
                return self._json(400, {"message": problem})
            body.setdefault("groups", ["main"])
            for asset in body["assets"]:
                if not asset["mime"].startswith("image/"):
                    return self._json(400, {"message": f"unsupported file type {asset['mime']} for {asset['filename']}"})
            session, op = f"upses_{uuid.uuid4().hex}", f"op_{uuid.uuid4().hex}"
            items, tokens = [], []
            with state.lock:
                for asset in body["assets"]:
                    token = uuid.uuid4().hex
                    state.state["pending"][token] = {**asset, "groups": body["groups"]}
                    tokens.append(token)
                    items.append({"metadata": asset, "upload": {"method": "PUT", "url": f"{base_url}/upload/{token}",
                                                                "headers": {"Content-Type": asset["mime"]}}})
                state.state["ops"][op] = {"tokens": tokens}
                state.state["sessions"].append({"id": session, "groups": body["groups"], "files": [a["filename"] for a in body["assets"]]})
                state.save()
            self._json(200, {"id": session, "opId": op, "assets": items})

        def do_PUT(self) -> None:  # noqa: N802
            m = re.fullmatch(r"/upload/([0-9a-f]+)", self.path)
            if m:  # a signed URL: no secret key, the token is the authorisation
                data = self._body()
                with state.lock:
                    pending = state.state["pending"].get(m.group(1))
                    if pending is None:
                        return self._json(403, {"message": "signed URL unknown or expired"})
                    if len(data) != pending["size"]:
                        return self._json(400, {"message": "size mismatch"})
                    (state.data / "assets" / pending["filename"]).write_bytes(data)
                    previous = state.state["assets"].get(pending["filename"])
                    state.state["assets"][pending["filename"]] = {
                        "id": previous["id"] if previous else f"asset_{uuid.uuid4()}", "size": len(data), "mime": pending["mime"],
                        "groups": sorted(set(pending["groups"]) | set(previous["groups"] if previous else [])),
                        "created": int(time.time() * 1000), "custom": previous.get("custom", {}) if previous else {}}
                    del state.state["pending"][m.group(1)]
                    state.save()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not self._authorised():
                return
            m = re.fullmatch(r"/projects/([^/]+)/assets/([^/]+)/customMetadatas", self.path)
            if not m:
                return self._json(404, {"message": f"no route {self.path}"})
            body = self._json_body()
            if body is None:
                return None
            problem = _check_fields(body, required={"customMetadata"}, optional={"parent"})
            custom = body.get("customMetadata")
            if problem is None and (not isinstance(custom, dict) or not all(
                    isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in custom.items())):
                problem = "customMetadata: expected an object of string keys to string, number or boolean values"
            if problem is None and "parent" in body and (not isinstance(body["parent"], dict) or body["parent"].get("kind") not in (
                    "customMetadata#assetParent", "customMetadata#assetFrameParent")):
                problem = "parent: expected {kind: customMetadata#assetParent | customMetadata#assetFrameParent, ...}"
            if problem is not None:
                return self._json(400, {"message": problem})
            with state.lock:
                asset = state.state["assets"].get(m.group(2))
                if asset is None:
                    return self._json(404, {"message": "asset not found"})
                asset["custom"] = {**asset.get("custom", {}), **custom}
                state.save()
            self._json(200, {"parent": {"filename": m.group(2)}, "customMetadata": asset["custom"]})

        def _create_annotation(self) -> None:
            body = self._json_body()
            if body is None:
                return None
            problem = _check_fields(body, required={"assetId", "tag", "boundType", "bound"},
                                    optional={"frame", "aggregation", "attributes"})
            if problem is None and body["boundType"] not in ("Polygon", "Rectangle", "Classification", "Keypoints", "Bitmask3d"):
                problem = f"boundType {body['boundType']!r} is not a bound type"
            if problem is None and (not isinstance(body["tag"], str) or not isinstance(body["bound"], list)):
                problem = "tag: expected a string; bound: expected a list of points"
            if problem is not None:
                return self._json(400, {"message": problem})
            with state.lock:
                if not any(a["id"] == body["assetId"] for a in state.state["assets"].values()):
                    return self._json(404, {"message": "asset not found"})
                annotation = {"id": f"annot_{uuid.uuid4()}", "projectId": state.project, "assetId": body["assetId"],
                              "tag": body["tag"], "boundType": body["boundType"], "bound": body["bound"],
                              "createDate": int(time.time() * 1000)}
                state.state["annotations"][annotation["id"]] = annotation
                state.save()
            return self._json(200, annotation)

        def do_DELETE(self) -> None:  # noqa: N802
            if not self._authorised():
                return None
            m = re.fullmatch(r"/projects/([^/]+)/annotations/([^/?]+)", self.path)
            if not m:
                return self._json(404, {"message": f"no route {self.path}"})
            with state.lock:
                if state.state["annotations"].pop(m.group(2), None) is None:
                    return self._json(404, {"message": "annotation not found"})
                state.save()
            return self._json(200, {"deleted": True, "id": m.group(2)})

        def do_PATCH(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            m = re.fullmatch(r"/projects/([^/]+)/assets/([^/?]+)", self.path)
            if not m:
                return self._json(404, {"message": f"no route {self.path}"})
            body = self._json_body()
            if body is None:
                return None
            problem = _check_fields(body, required=set(), optional={"status", "groups"})
            groups = body.get("groups")
            if problem is None and groups is not None and (not isinstance(groups, list) or not groups or not all(
                    isinstance(g, str) and g.strip() for g in groups)):
                problem = "groups: expected a non-empty list of non-empty strings"
            if problem is not None:
                return self._json(400, {"message": problem})
            with state.lock:
                asset = state.state["assets"].get(m.group(2))
                if asset is None:
                    return self._json(404, {"message": "asset not found"})
                if groups is not None:
                    asset["groups"] = list(dict.fromkeys(groups))  # replaces, as the SDK documents
                state.state.setdefault("updates", []).append({"filename": m.group(2), **body})
                state.save()
                answer = self._asset(m.group(2))
            self._json(200, answer)

        def _json_body(self):
            try:
                body = json.loads(self._body())
            except ValueError:
                self._json(400, {"message": "the body is not JSON"})
                return None
            if not isinstance(body, dict):
                self._json(400, {"message": "expected a JSON object"})
                return None
            return body

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--secret-env", default="FAKE_NEXUS_SECRET", help="Environment variable holding the secret key.")
    parser.add_argument("--project", default="proj_fake")
    args = parser.parse_args()
    base_url = f"http://127.0.0.1:{args.port}"
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(State(args.data, args.project), os.environ[args.secret_env], base_url))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
