"""Sinks: where the uploader delivers flagged assets.

`open_sink(uri)` picks the implementation from the URI scheme:

| URI | sink |
|---|---|
| `local:DIR` (or a plain path) | `triton_al.sinks.local.LocalStore`, the embedded project store |
| `s3://bucket/prefix` | `triton_al.sinks.s3.S3Sink` (endpoint and keys from the environment) |
| `labelstudio+http://host:port[/PROJECT_ID][?labels=FILE&task=TASK]`, `labelstudio+https://…` | `triton_al.sinks.labelstudio.LabelStudioSink` |
| `nexus://PROJECT_ID` | `triton_al.sinks.nexus.NexusSink` (Datature Nexus) |

Credentials never appear in a URI: each sink reads them from the environment or a file.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from triton_al.sinks.base import (
    Annotation,
    PermanentSinkError,
    Sink,
    SinkAuthError,
    SinkError,
    TransientSinkError,
    Upload,
)

__all__ = [
    "Annotation",
    "PermanentSinkError",
    "Sink",
    "SinkAuthError",
    "SinkError",
    "TransientSinkError",
    "Upload",
    "open_sink",
    "SCHEMES",
]

# scheme -> "module:factory"; each factory takes the URI and returns a Sink. Imported lazily
# so that an optional sink's dependencies are needed only by those who use it.
SCHEMES = {
    "local": "triton_al.sinks.local:LocalStore.from_uri",
    "s3": "triton_al.sinks.s3:S3Sink.from_uri",
    "labelstudio+http": "triton_al.sinks.labelstudio:LabelStudioSink.from_uri",
    "labelstudio+https": "triton_al.sinks.labelstudio:LabelStudioSink.from_uri",
    "nexus": "triton_al.sinks.nexus:NexusSink.from_uri",
}


def sink_scheme(uri: str) -> str:
    """The scheme of a sink URI, validated; raises ValueError naming what is accepted."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("sink: expected a URI such as local:DIR, s3://bucket/prefix, labelstudio+http://host:port or nexus://project")
    if "@" in urlsplit(uri).netloc:
        raise ValueError("sink: credentials do not belong in the URI (they would show in logs); use the environment")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else "local"
    if scheme not in SCHEMES:
        raise ValueError(f"sink {uri!r}: unknown scheme {scheme!r}; expected one of {', '.join(s + ':' for s in SCHEMES)}")
    return scheme


def open_sink(uri: str) -> Sink:
    """The sink a URI names. A bare path means the local project store."""
    scheme = sink_scheme(uri)
    if ":" not in uri:
        uri = "local:" + uri
    module_name, factory = SCHEMES[scheme].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"sink {scheme}: its dependencies are not installed ({e}); see the README's sink section") from e
    obj = module
    for part in factory.split("."):
        obj = getattr(obj, part)
    return obj(uri)
