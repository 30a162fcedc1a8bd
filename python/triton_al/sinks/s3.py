"""S3-compatible object storage: `s3://bucket/prefix`.

Layout, one prefix per upload group (the local store's, in objects):

    <prefix>/<group>/<sha256>.<ext>           the asset
    <prefix>/<group>/<sha256>.json            sidecar (prediction, score, strategy, model version, …)
    <prefix>/<group>/labels/<sha256>.json     annotations coming back (same format as the local store)

Keys are content hashes, so a retry writes the same bytes to the same key; the asset is
checked with HEAD first and not sent again when present. Idempotency does not rely on
conditional writes (some S3-compatible servers ignore them). The sidecar is written after
the asset: a sidecar means the asset is complete.

Credentials and endpoint come from the environment (never the URI or the command line):
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (default
us-east-1), `AWS_ENDPOINT_URL` or `TRITON_AL_S3_ENDPOINT_URL` (for MinIO, rclone, Ceph…), or
a shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_PROFILE`), as boto3 reads them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from triton_al.config import validate_group_name
from triton_al.sinks.base import Annotation, PermanentSinkError, Sink, SinkAuthError, SinkError, TransientSinkError, Upload
from triton_al.sinks.local import check_asset

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
              "AuthorizationHeaderMalformed", "InvalidClientTokenId", "403"}
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                   "Throttling", "ThrottlingException", "500", "502", "503", "504"}


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
    return bucket, prefix


class S3Sink(Sink):
    def __init__(self, bucket: str, prefix: str = "", *, client=None, endpoint_url: str | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("TRITON_AL_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = client

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
            config = Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30,
                            retries={"max_attempts": 2, "mode": "standard"}, signature_version="s3v4")
            # A session of our own: boto3's default one caches credentials process-wide.
            session = boto3.session.Session()
            self._client = session.client("s3", endpoint_url=self.endpoint_url,
                                          region_name=os.environ.get("AWS_REGION", "us-east-1"), config=config)
        return self._client

    def key(self, group: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, validate_group_name(group), name) if p)

    def _error(self, e: Exception, what: str) -> SinkError:
        """Classify a boto error; the message names the object, never a credential."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

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

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        results: list[SinkError | None] = []
        for up in batch:
            try:
                validate_group_name(up.group)
                check_asset(up)
                sidecar = json.dumps({**dict(up.metadata), "content_hash": up.content_hash, "group": up.group,
                                      "file": up.filename, "media_type": up.media_type,
                                      "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                     sort_keys=True).encode()
            except (ValueError, TypeError, RecursionError) as e:  # not JSON, or nested beyond reason: this item only
                results.append(PermanentSinkError(f"{up.group}/{up.content_hash}: metadata refused: {e}"))
                continue
            except PermanentSinkError as e:
                results.append(e)
                continue
            try:
                asset_key = self.key(up.group, up.filename)
                if not self._exists(asset_key):
                    self.client.put_object(Bucket=self.bucket, Key=asset_key, Body=bytes(up.asset), ContentType=up.media_type)
                self.client.put_object(Bucket=self.bucket, Key=self.key(up.group, f"{up.content_hash}.json"),
                                       Body=sidecar, ContentType="application/json")
                results.append(None)
            except Exception as e:  # noqa: BLE001 - classified below
                error = self._error(e, f"{up.group}/{up.filename}")
                if isinstance(error, (SinkAuthError, TransientSinkError)) and not results:
                    raise error from None  # the first item says the whole sink is unusable now
                if isinstance(error, SinkAuthError):
                    raise error from None
                results.append(error)
        return results

    def annotations(self, group: str) -> Iterator[Annotation]:
        prefix = self.key(group, "labels/")
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if not name.endswith(".json"):
                        continue
                    body = json.loads(self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read())
                    yield Annotation(group, name[:-5], body.get("label"), body.get("annotator"), body.get("labelled_at"))
        except SinkError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, f"{group}/labels") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
