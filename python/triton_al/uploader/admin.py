"""The uploader's gRPC admin API (service `triton_al.admin.v1.UploaderAdmin`).

Loopback by default. Bound anywhere else, or with `require_token` (`--admin-require-token`),
it refuses to start without a token (from the environment, `TRITON_AL_ADMIN_TOKEN`), and
then every call must carry `authorization: Bearer <token>`; a token set on loopback is
required there too. TLS with a server certificate and key (`--admin-tls-cert`,
`--admin-tls-key`); the client trusts a CA file (`triton-al admin … --tls-ca`). Calls are
bounded: a Flush longer than `max_flush_s` is refused, one Flush runs at a time, and at
most `max_concurrent_rpcs` calls are in flight (beyond: RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from triton_al.admin.v1 import admin_pb2, admin_pb2_grpc
from triton_al.config import validate_group_name
from triton_al.outbox import Outbox
from triton_al.uploader.worker import Uploader

TOKEN_ENV = "TRITON_AL_ADMIN_TOKEN"
DEFAULT_FLUSH_S = 30.0
MAX_FLUSH_S = 300.0
log = logging.getLogger("triton_al.uploader")


def is_loopback(address: str) -> bool:
    host = address.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (metadata 'authorization: Bearer <token>')")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


class AdminService(admin_pb2_grpc.UploaderAdminServicer):
    def __init__(self, uploader: Uploader, max_flush_s: float = MAX_FLUSH_S, label_puller=None) -> None:
        self.uploader = uploader
        self.max_flush_s = max_flush_s
        self.label_puller = label_puller
        self._flushing = threading.Lock()

    def _label_pull(self) -> dict:
        puller = self.label_puller
        if puller is None:
            return {}
        status = admin_pb2.LabelPullStatus(labels_store=str(puller.store), interval_seconds=puller.interval_s, pulls=puller.pulls,
                                           next_pull_in_seconds=puller.next_in())
        last = puller.last
        if last is not None:
            status.has_last = True
            status.last_started_at, status.last_seconds, status.last_outcome = last.started_at, last.seconds, last.outcome
            status.last_new_labels, status.last_relabelled, status.last_unchanged = last.new, last.relabelled, last.unchanged
            status.last_items_fetched, status.last_not_taken, status.last_error = last.fetched, last.problems, last.error
            status.upload_groups.extend(last.groups)
        return {"label_pull": status}

    def _outbox(self, context) -> Outbox:
        outbox = self.uploader.outbox
        if outbox is None or self.uploader.outbox_error:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the outbox is unusable: {self.uploader.outbox_error or 'not open yet'}")
        return outbox

    def _groups(self, names, context) -> list[str]:
        try:
            return [validate_group_name(n) for n in names]
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def GetStatus(self, request, context):
        base = dict(sink=self.uploader.sink.describe(), sink_backoff_seconds=self.uploader.sink_backoff_remaining(),
                    last_error=self.uploader.last_error, **self._label_pull())
        outbox = self.uploader.outbox
        if outbox is None or self.uploader.outbox_error:
            return admin_pb2.GetStatusResponse(outbox=str(outbox.path) if outbox is not None else "",
                                               outbox_error=self.uploader.outbox_error or "not open yet", **base)
        now = time.time()
        groups = [
            admin_pb2.GroupStatus(
                upload_group=s.upload_group, queued=s.queued, dead_letters=s.dead_letters, delivered=s.delivered,
                oldest_item_age_seconds=max(0.0, now - s.oldest_created_at) if s.oldest_created_at else 0.0, paused=s.paused,
            )
            for s in outbox.status()
        ]
        return admin_pb2.GetStatusResponse(groups=groups, counters=outbox.counters(), outbox=str(outbox.path), **base)

    def Pause(self, request, context):
        outbox = self._outbox(context)
        groups = self._groups(request.upload_groups, context) or [s.upload_group for s in outbox.status()]
        outbox.set_paused(groups, True)
        return admin_pb2.PauseResponse(paused_groups=sorted(outbox.paused_groups()))

    def Resume(self, request, context):
        outbox = self._outbox(context)
        groups = self._groups(request.upload_groups, context) or sorted(outbox.paused_groups())
        outbox.set_paused(groups, False)
        self.uploader.wake()
        return admin_pb2.ResumeResponse(paused_groups=sorted(outbox.paused_groups()))

    def RetryDeadLetters(self, request, context):
        outbox = self._outbox(context)
        group = self._groups([request.upload_group], context)[0] if request.upload_group else None
        n = outbox.retry_dead_letters(group=group)
        self.uploader.wake()
        return admin_pb2.RetryDeadLettersResponse(requeued=n)

    def Flush(self, request, context):
        timeout = request.timeout_seconds or DEFAULT_FLUSH_S
        if not math.isfinite(timeout) or timeout < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_seconds must be a positive number of seconds, got {timeout}")
        if timeout > self.max_flush_s:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"timeout_seconds {timeout:g} is over this uploader's cap of {self.max_flush_s:g} s (--admin-max-flush-seconds)")
        remaining = context.time_remaining()
        if remaining is not None:  # never outlive the caller's own deadline
            timeout = max(0.0, min(timeout, remaining - 0.5))
        if not self._flushing.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "a flush is already running; try again when it has finished")
        try:
            result = self.uploader.flush(timeout)
        finally:
            self._flushing.release()
        return admin_pb2.FlushResponse(uploaded=result.uploaded, still_queued=result.still_queued, complete=result.complete,
                                       timed_out=result.timed_out, last_error=result.last_error)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None


def serve_admin(uploader: Uploader, address: str = "127.0.0.1", port: int = 0, token: str | None = None, *,
                tls_cert: str | os.PathLike[str] | None = None, tls_key: str | os.PathLike[str] | None = None,
                require_token: bool = False, max_flush_s: float = MAX_FLUSH_S, max_workers: int = 4,
                max_concurrent_rpcs: int = 16, label_puller=None) -> tuple[grpc.Server, int]:
    """Start the admin server on a background thread pool; returns (server, bound port)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if require_token and not token:
        raise ValueError(f"admin API: --admin-require-token, but no token is set; set {TOKEN_ENV} (callers send 'authorization: Bearer <token>')")
    if not is_loopback(address) and not token:
        raise ValueError(
            f"admin API on {address}: binding beyond loopback needs a token; set {TOKEN_ENV} (callers send 'authorization: Bearer <token>')"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("admin API: TLS needs both --admin-tls-cert and --admin-tls-key")
    if max_flush_s <= 0:
        raise ValueError(f"admin API: the flush cap must be positive, got {max_flush_s}")
    credentials = None
    if tls_cert is not None and tls_key is not None:
        credentials = grpc.ssl_server_credentials([(_read(tls_key, "--admin-tls-key"), _read(tls_cert, "--admin-tls-cert"))])
    elif not is_loopback(address):
        log.warning("admin API on %s without TLS: the token travels in clear text; give --admin-tls-cert and --admin-tls-key", address)
    interceptors = [_TokenCheck(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="admin"), interceptors=interceptors,
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    admin_pb2_grpc.add_UploaderAdminServicer_to_server(AdminService(uploader, max_flush_s, label_puller), server)
    host = f"[{address}]" if ":" in address else address
    try:
        bound = server.add_secure_port(f"{host}:{port}", credentials) if credentials else server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"admin API: cannot bind {address}:{port} ({e})") from None
    if bound == 0:
        raise OSError(f"admin API: cannot bind {address}:{port}")
    server.start()
    return server, bound


class AdminClient:
    """A small client for the admin API (used by `triton-al admin` and the tests)."""

    def __init__(self, target: str, token: str | None = None, timeout_s: float = 10.0, *,
                 tls_ca: str | os.PathLike[str] | None = None, tls_server_name: str | None = None) -> None:
        if tls_ca is not None:
            options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "--tls-ca"))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = admin_pb2_grpc.UploaderAdminStub(self.channel)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def _call(self, name: str, request, timeout: float | None = None):
        return getattr(self.stub, name)(request, metadata=self.metadata, timeout=timeout or self.timeout_s)

    def status(self):
        return self._call("GetStatus", admin_pb2.GetStatusRequest())

    def pause(self, groups=()):
        return self._call("Pause", admin_pb2.PauseRequest(upload_groups=list(groups)))

    def resume(self, groups=()):
        return self._call("Resume", admin_pb2.ResumeRequest(upload_groups=list(groups)))

    def retry_dead_letters(self, group: str = ""):
        return self._call("RetryDeadLetters", admin_pb2.RetryDeadLettersRequest(upload_group=group))

    def flush(self, timeout_s: float = DEFAULT_FLUSH_S):
        return self._call("Flush", admin_pb2.FlushRequest(timeout_seconds=timeout_s), timeout=timeout_s + 10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
