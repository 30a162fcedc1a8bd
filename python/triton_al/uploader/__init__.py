"""The sidecar uploader: drains the outbox into a sink (`triton-al uploader`)."""

from triton_al.uploader.worker import Backoff, Uploader

__all__ = ["Backoff", "Uploader"]
