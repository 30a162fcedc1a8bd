"""The uploader's gRPC admin API (service `triton_al.admin.v1.UploaderAdmin`).

Loopback by default. Bound anywhere else it refuses to start without a token (from the
environment, `TRITON_AL_ADMIN_TOKEN`), and then every call must carry
`authorization: Bearer <token>`; a token set on loopback is required there too.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from concurrent import futures

import grpc

from triton_al.admin.v1 import admin_pb2, admin_pb2_grpc
from triton_al.config import validate_group_name
from triton_al.uploader.worker import Uploader

TOKEN_ENV = "TRITON_AL_ADMIN_TOKEN"


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
    def __init__(self, uploader: Uploader) -> None:
        self.uploader = uploader
        self.outbox = uploader.outbox

    def _groups(self, names, context) -> list[str]:
        try:
            return [validate_group_name(n) for n in names]
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def GetStatus(self, request, context):
        now = time.time()
        groups = [
            admin_pb2.GroupStatus(
                upload_group=s.upload_group, queued=s.queued, dead_letters=s.dead_letters, delivered=s.delivered,
                oldest_item_age_seconds=now - s.oldest_created_at if s.oldest_created_at else 0.0, paused=s.paused,
            )
            for s in self.outbox.status()
        ]
        return admin_pb2.GetStatusResponse(
            groups=groups, sink=self.uploader.sink.describe(), counters=self.outbox.counters(),
            sink_backoff_seconds=self.uploader.sink_backoff_remaining(), last_error=self.uploader.last_error,
            outbox=str(self.outbox.path),
        )

    def Pause(self, request, context):
        groups = self._groups(request.upload_groups, context) or [s.upload_group for s in self.outbox.status()]
        self.outbox.set_paused(groups, True)
        return admin_pb2.PauseResponse(paused_groups=sorted(self.outbox.paused_groups()))

    def Resume(self, request, context):
        groups = self._groups(request.upload_groups, context) or sorted(self.outbox.paused_groups())
        self.outbox.set_paused(groups, False)
        self.uploader.wake()
        return admin_pb2.ResumeResponse(paused_groups=sorted(self.outbox.paused_groups()))

    def RetryDeadLetters(self, request, context):
        group = self._groups([request.upload_group], context)[0] if request.upload_group else None
        n = self.outbox.retry_dead_letters(group=group)
        self.uploader.wake()
        return admin_pb2.RetryDeadLettersResponse(requeued=n)

    def Flush(self, request, context):
        timeout = request.timeout_seconds or 30.0
        uploaded, queued, complete = self.uploader.flush(timeout)
        return admin_pb2.FlushResponse(uploaded=uploaded, still_queued=queued, complete=complete)


def serve_admin(uploader: Uploader, address: str = "127.0.0.1", port: int = 0, token: str | None = None) -> tuple[grpc.Server, int]:
    """Start the admin server on a background thread pool; returns (server, bound port)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    if not is_loopback(address) and not token:
        raise ValueError(
            f"admin API on {address}: binding beyond loopback needs a token; set {TOKEN_ENV} (callers send 'authorization: Bearer <token>')"
        )
    interceptors = [_TokenCheck(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin"), interceptors=interceptors)
    admin_pb2_grpc.add_UploaderAdminServicer_to_server(AdminService(uploader), server)
    host = f"[{address}]" if ":" in address else address
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"admin API: cannot bind {address}:{port}")
    server.start()
    return server, bound


class AdminClient:
    """A small client for the admin API (used by `triton-al admin` and the tests)."""

    def __init__(self, target: str, token: str | None = None, timeout_s: float = 10.0) -> None:
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

    def flush(self, timeout_s: float = 30.0):
        return self._call("Flush", admin_pb2.FlushRequest(timeout_seconds=timeout_s), timeout=timeout_s + 10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
