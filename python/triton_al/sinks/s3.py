"""S3-compatible object storage: `s3://bucket/prefix`.

Layout, one prefix per upload group (the local store's, in objects):

    <prefix>/<group>/<sha256>.<ext>           the asset
    <prefix>/<group>/<sha256>.json            sidecar (prediction, score, strategy, model version, …)
    <prefix>/<group>/labels/<sha256>.json     annotations coming back (same format as the local store)

A label object is what an annotation tool or a script writes, one per labelled item, named
by the item's content hash (the asset's name without its extension), holding a JSON object:

    {"label": 3, "annotator": "alice", "labelled_at": "2026-11-24T12:00:00Z"}

`label` is required: a class index, or a class name (mapped with the model's class names),
a list of them (multi-label), or {"boxes": [{"label": ..., ...}]}; `annotator` and
`labelled_at` are optional (without `labelled_at`, the object's LastModified is used). A
relabel is the same key written again. Keys below `labels/` that are not `<sha256>.json`
directly there (a `history/` folder, say) are not read. `labels pull` lists the label
objects (one request per 1000) and reads only those whose LastModified is at most
`LISTING_MARGIN_S` older than the newest it saw last time (an object being written while
the pull lists may carry an earlier LastModified than one listed); an object that is not
JSON, or holds no label, is reported. An item labelled here that is not in the local store
is fetched back (`fetch`: its sidecar, then its asset, checked against its hash).

Keys are content hashes, so a retry writes the same bytes to the same key: an asset smaller
than `HEAD_FIRST_BYTES` (1 MiB) is simply written again, a larger one is checked with HEAD
first and not sent again when present (a HEAD costs a request like a small PUT, and retries
are rare). Idempotency does not rely on conditional writes (some S3-compatible servers
ignore them). The sidecar is written after its asset: a sidecar means the asset is complete.

A batch's items are delivered concurrently, `concurrency` at a time (default 16; one shared
client, connections kept open), each item's asset then its sidecar; the results come back in
the batch's order. Set it with `TRITON_AL_S3_CONCURRENCY` (1 to 64) in the uploader's
environment, not in the URI: an outbox records the URI it delivers to, and a URI that
changed would stop it (`SinkChanged`) though the items go to the same place. Uploads
go through obstore (Rust's object_store, in the `s3` extra) when it is installed, boto3
otherwise: the same requests, at about a fifth of boto3's CPU per request; listing and
reading labels back use boto3. With `AWS_CA_BUNDLE` set (a private CA), uploads use boto3
too: obstore does not read that variable.

Credentials and endpoint come from the environment (never the URI or the command line):
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (default
us-east-1), `AWS_ENDPOINT_URL` or `TRITON_AL_S3_ENDPOINT_URL` (for MinIO, rclone, Ceph…), or
a shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_PROFILE`), as boto3 reads them
(obstore is handed boto3's credentials, refreshed when they are temporary).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
              "AuthorizationHeaderMalformed", "InvalidClientTokenId", "403"}
MAX_LABEL_BYTES = 1024**2
"""A label object larger than this is reported, not read."""
MAX_ASSET_BYTES = 256 * 1024**2
"""An asset larger than this is not fetched back."""
HEAD_FIRST_BYTES = 1024**2
"""An asset of at least this size is checked with HEAD before it is sent (and not sent again
when present); a smaller one is written again, same bytes to the same key."""
DEFAULT_CONCURRENCY = 16
MAX_CONCURRENCY = 64
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                   "Throttling", "ThrottlingException", "500", "502", "503", "504"}


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")


def _obstore_installed() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def parse_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"sink {uri!r}: expected s3://bucket[/prefix]")
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"sink {uri!r}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    prefix = parts.path.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise ValueError(f"sink {uri!r}: the prefix must not contain empty, '.' or '..' segments")
    if parts.query or parts.fragment:
        raise ValueError(f"sink {uri!r}: an s3:// URI takes no options (the concurrency is TRITON_AL_S3_CONCURRENCY)")
    return bucket, prefix


def concurrency_from_env() -> int:
    """`TRITON_AL_S3_CONCURRENCY`, or the default; a value out of 1..64 is refused."""
    raw = os.environ.get("TRITON_AL_S3_CONCURRENCY", "").strip()
    if not raw:
        return DEFAULT_CONCURRENCY
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"TRITON_AL_S3_CONCURRENCY={raw[:20]!r}: expected an integer from 1 to {MAX_CONCURRENCY}")
    return value


def _iso(when) -> str:
    """A time as fixed-width ISO 8601 UTC with microseconds: strings that sort like times."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _earlier(since: str, seconds: float) -> str | None:
    try:
        when = datetime.strptime(since, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None  # not a watermark of ours: read everything
    return _iso(when - timedelta(seconds=seconds))


def _annotation(group: str, content_hash: str, key: str, data: bytes, changed: str) -> Annotation:
    """A label object's body as an annotation (or the problem with it)."""
    try:
        body = json.loads(data)
    except ValueError as e:
        return Annotation(group, content_hash, None, changed_at=changed, problem=f"label object {key} is not JSON ({e})")
    if not isinstance(body, dict) or "label" not in body:
        return Annotation(group, content_hash, None, changed_at=changed,
                          problem=f"label object {key}: expected a JSON object with a \"label\"")
    annotator, labelled_at = body.get("annotator"), body.get("labelled_at")
    return Annotation(group, content_hash, body["label"], None if annotator is None else str(annotator)[:200],
                      labelled_at if isinstance(labelled_at, str) and labelled_at else changed, changed_at=changed)


class S3Sink(Sink):
    LISTING_MARGIN_S = 300.0
    """Label objects changed up to this long before the newest one seen last time are read
    again: a PUT in flight while the previous pull listed may carry an earlier LastModified."""

    def __init__(self, bucket: str, prefix: str = "", *, client=None, endpoint_url: str | None = None,
                 concurrency: int | None = None, transport: str | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("TRITON_AL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if concurrency is None:
            concurrency = concurrency_from_env()
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
        self.concurrency = concurrency
        if transport is None:
            # obstore does not read AWS_CA_BUNDLE (a private CA, as self-hosted S3 servers often
            # have); boto3 does, so it delivers then.
            private_ca = bool(os.environ.get("AWS_CA_BUNDLE"))
            transport = "obstore" if client is None and _obstore_installed() and not private_ca else "boto3"
        if transport not in ("obstore", "boto3"):
            raise ValueError(f"transport must be 'obstore' or 'boto3', got {transport!r}")
        self.transport = transport
        self._client = client
        self._store = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str) -> S3Sink:
        bucket, prefix = parse_uri(uri)
        return cls(bucket, prefix)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Few, short retries: the uploader does the real retrying, with backoff and order.
            # One connection per concurrent item (urllib3 keeps them open between batches).
            config = Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30,
                            retries={"max_attempts": 2, "mode": "standard"}, signature_version="s3v4",
                            max_pool_connections=max(10, self.concurrency), request_checksum_calculation="when_required")
            # A session of our own: boto3's default one caches credentials process-wide.
            session = boto3.session.Session()
            self._client = session.client("s3", endpoint_url=self.endpoint_url,
                                          region_name=os.environ.get("AWS_REGION", "us-east-1"), config=config)
        return self._client

    @property
    def store(self):
        """The obstore S3Store that uploads go through (transport "obstore"): the same
        endpoint, region and credentials as `client` (boto3 resolves them, this store asks
        for them again every few minutes), path-style addressing, few and short retries."""
        with self._lock:
            if self._store is None:
                from datetime import timedelta

                import boto3
                from obstore.store import S3Store

                credentials = boto3.session.Session().get_credentials()
                if credentials is None:
                    raise SinkAuthError(f"{self.describe()}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a credentials file)")

                def provide() -> dict:
                    frozen = credentials.get_frozen_credentials()  # refreshed by botocore when temporary
                    return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                            "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5)}

                endpoint = {"endpoint": self.endpoint_url} if self.endpoint_url else {}
                self._store = S3Store(
                    self.bucket, region=os.environ.get("AWS_REGION", "us-east-1"), credential_provider=provide,
                    virtual_hosted_style_request=False, **endpoint,
                    client_options={"allow_http": (self.endpoint_url or "").startswith("http://"),
                                    "connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=30)},
                    retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=10),
                                  "backoff": {"init_backoff": timedelta(seconds=0.1), "max_backoff": timedelta(seconds=1), "base": 2.0}})
            return self._store

    def key(self, group: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, validate_group_name(group), name) if p)

    def _error(self, e: Exception, what: str) -> SinkError:
        """Classify a boto or obstore error; the message names the object, never a credential."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(e, SinkError):
            return e
        if isinstance(e, NoCredentialsError):
            return SinkAuthError(f"{self.describe()}: no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a credentials file)")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in AUTH_CODES or status == "403":
                return SinkAuthError(f"{self.describe()}: credentials rejected ({code or status}) on {what}")
            if code == "NoSuchBucket":
                # Transient: a missing bucket is an operator's fix away; dead-lettering
                # everything meanwhile would lose the queue's order for nothing.
                return TransientSinkError(f"{self.describe()}: bucket {self.bucket!r} does not exist")
            if code in TRANSIENT_CODES or status.startswith("5"):
                return TransientSinkError(f"{self.describe()}: {code or status} on {what}")
            return PermanentSinkError(f"{self.describe()}: {what} rejected ({code or status})")
        if isinstance(e, (EndpointConnectionError, BotoCoreError, OSError)):
            return TransientSinkError(f"{self.describe()}: unreachable ({type(e).__name__}) on {what}")
        return TransientSinkError(f"{self.describe()}: {type(e).__name__} on {what}")

    def _obstore_error(self, e: Exception, what: str) -> SinkError:
        """Classify an error from the obstore transport. Its exceptions are by kind (a
        FileNotFoundError for 404, PermissionDeniedError, GenericError…) and carry the HTTP
        status and the server's error document in their text."""
        from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

        if isinstance(e, SinkError):
            return e
        if not isinstance(e, (BaseError, OSError)):
            return TransientSinkError(f"{self.describe()}: {type(e).__name__} on {what}")
        text = str(e)
        status_match, code_match = _STATUS.search(text), _CODE.search(text)
        status = status_match.group(1) if status_match else ""
        code = code_match.group(1) if code_match else ""
        if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or code in AUTH_CODES or status in ("401", "403"):
            return SinkAuthError(f"{self.describe()}: credentials rejected ({code or status or type(e).__name__}) on {what}")
        if code == "NoSuchBucket":
            return TransientSinkError(f"{self.describe()}: bucket {self.bucket!r} does not exist")
        if code in TRANSIENT_CODES or status.startswith("5"):
            return TransientSinkError(f"{self.describe()}: {code or status} on {what}")
        if not status:  # no answer: refused, reset, timed out
            return TransientSinkError(f"{self.describe()}: unreachable ({type(e).__name__}) on {what}")
        return PermanentSinkError(f"{self.describe()}: {what} rejected ({code or status})")

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        if self.transport == "obstore":
            import obstore

            obstore.put(self.store, key, body, attributes={"Content-Type": content_type})
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        if self.transport == "obstore":
            import obstore
            from obstore.exceptions import NotFoundError

            try:
                obstore.head(self.store, key)
                return True
            except (NotFoundError, FileNotFoundError) as e:
                if _CODE.search(str(e)):  # a 404 with an error document: NoSuchBucket, say
                    raise
                return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _sidecar(self, up: Upload) -> bytes | SinkError:
        """The item's sidecar, or why it is refused (this item only)."""
        try:
            validate_group_name(up.group)
            check_asset(up)
            return json.dumps({**dict(up.metadata), "content_hash": up.content_hash, "group": up.group,
                               "file": up.filename, "media_type": up.media_type,
                               "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True).encode()
        except (ValueError, TypeError, RecursionError) as e:  # not JSON, or nested beyond reason: this item only
            return PermanentSinkError(f"{up.group}/{up.content_hash}: metadata refused: {e}")
        except PermanentSinkError as e:
            return e

    def _deliver(self, up: Upload, sidecar: bytes) -> SinkError | None:
        """One item: its asset (HEAD first when large), then its sidecar. The error, classified."""
        try:
            asset_key = self.key(up.group, up.filename)
            if len(up.asset) < HEAD_FIRST_BYTES or not self._exists(asset_key):
                self._put(asset_key, bytes(up.asset), up.media_type)
            self._put(self.key(up.group, f"{up.content_hash}.json"), sidecar, "application/json")
            return None
        except Exception as e:  # noqa: BLE001 - classified here
            what = f"{up.group}/{up.filename}"
            return self._obstore_error(e, what) if self.transport == "obstore" else self._error(e, what)

    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        """Every item of the batch, `concurrency` at a time (items of the same group and hash
        one after the other, in the batch's order). An auth error, or a transient one on the
        batch's first item, fails the whole batch (raised): the sink is unusable now. An item
        reported None was completely delivered; any other item is reported with its error."""
        results: list[SinkError | None] = [None] * len(batch)
        todo: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        for i, up in enumerate(batch):
            sidecar = self._sidecar(up)
            if isinstance(sidecar, SinkError):
                results[i] = sidecar
            else:
                todo.setdefault((up.group, up.content_hash), []).append((i, sidecar))
        if not todo:
            return results
        try:
            _ = self.store if self.transport == "obstore" else self.client  # made once, here, before any thread uses it
        except SinkError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, "connecting") from None
        refused = threading.Event()  # credentials rejected: the rest of the batch is not sent

        def run(items: list[tuple[int, bytes]]) -> None:
            for i, sidecar in items:
                if refused.is_set():
                    results[i] = SinkAuthError(f"{self.describe()}: not sent (credentials rejected on another item)")
                    continue
                results[i] = error = self._deliver(batch[i], sidecar)
                if isinstance(error, SinkAuthError):
                    refused.set()

        tasks = list(todo.values())
        if self.concurrency == 1 or len(tasks) == 1:
            for items in tasks:
                run(items)
        else:
            for future in [self.pool.submit(run, items) for items in tasks]:
                future.result()
        first = results[0]
        if isinstance(first, (SinkAuthError, TransientSinkError)):
            raise first  # the first item says the whole sink is unusable now
        for error in results:
            if isinstance(error, SinkAuthError):
                raise error
        return results

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-sink")
            return self._pool

    def annotations(self, group: str, since: str | None = None) -> Iterator[Annotation]:
        """The label objects under `<prefix>/<group>/labels/` (see the module docstring);
        with `since`, only those changed at most `LISTING_MARGIN_S` before it or later."""
        from botocore.exceptions import ClientError

        prefix = self.key(group, "labels/")
        floor = _earlier(since, self.LISTING_MARGIN_S) if since else None
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if "/" in name or not name.endswith(".json") or name.startswith("."):
                        continue
                    changed = _iso(obj["LastModified"])
                    if floor is not None and changed < floor:
                        continue
                    content_hash = name[:-5]
                    if obj.get("Size", 0) > MAX_LABEL_BYTES:
                        yield Annotation(group, content_hash, None, changed_at=changed,
                                         problem=f"label object {obj['Key']} is {obj['Size']} bytes (at most {MAX_LABEL_BYTES})")
                        continue
                    try:
                        data = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    except ClientError as e:
                        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                            continue  # deleted between the listing and now
                        raise
                    yield _annotation(group, content_hash, obj["Key"], data, changed)
        except SinkError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, f"{group}/labels") from None

    def fetch(self, group: str, content_hash: str) -> Upload | None:
        """The asset and its sidecar, as uploaded; None when the sidecar is absent (no
        sidecar: the asset was never completely delivered)."""
        from botocore.exceptions import ClientError

        sidecar_key = self.key(group, f"{content_hash}.json")
        try:
            try:
                sidecar = self.client.get_object(Bucket=self.bucket, Key=sidecar_key)["Body"].read(MAX_LABEL_BYTES * 64 + 1)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            try:
                meta = json.loads(sidecar)
            except ValueError:
                meta = None
            if not isinstance(meta, dict) or not isinstance(meta.get("file"), str) or not isinstance(meta.get("media_type"), str):
                raise PermanentSinkError(f"{self.describe()}: sidecar {sidecar_key} is not one the uploader wrote")
            if not re.fullmatch(re.escape(content_hash) + r"\.[A-Za-z0-9]{1,10}", meta["file"]):
                raise PermanentSinkError(f"{self.describe()}: sidecar {sidecar_key} names the file {meta['file'][:100]!r}")
            asset_key = self.key(group, meta["file"])
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=asset_key)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            if answer.get("ContentLength", 0) > MAX_ASSET_BYTES:
                raise PermanentSinkError(f"{self.describe()}: {asset_key} is {answer['ContentLength']} bytes (at most {MAX_ASSET_BYTES})")
            asset = answer["Body"].read()
        except SinkError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, f"{group}/{content_hash}") from None
        return Upload(group, content_hash, asset, meta["media_type"], meta)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._store = None  # obstore closes its connections when the store is dropped
        if self._client is not None:
            self._client.close()
            self._client = None
