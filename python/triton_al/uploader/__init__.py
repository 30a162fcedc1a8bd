"""The sidecar uploader: drains the outbox into a sink (`triton-al uploader`)."""

from triton_al.uploader.worker import Backoff, Bounds, FlushResult, Uploader

__all__ = ["Backoff", "Bounds", "FlushResult", "Uploader"]
