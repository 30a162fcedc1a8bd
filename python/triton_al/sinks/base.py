"""The one interface every sink implements, and the errors the uploader acts on.

A sink receives `Upload`s (one flagged asset for one upload group) in batches and must
write them idempotently, keyed by (group, content hash): the uploader delivers at least
once, and a repeated upload must leave the sink as if it had happened once. That is what
makes a SIGKILL between "the sink confirmed" and "the outbox forgot" harmless.
"""

from __future__ import annotations

import abc
import mimetypes
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Media types whose extension `mimetypes` gets wrong or does not know.
_EXTENSIONS = {"image/jpeg": ".jpg", "application/x-npy": ".npy", "application/octet-stream": ".bin"}


def extension_for(media_type: str) -> str:
    """The file extension an asset of this media type is stored under (original format)."""
    return _EXTENSIONS.get(media_type) or mimetypes.guess_extension(media_type) or ".bin"


@dataclass(frozen=True)
class Upload:
    """One flagged asset destined for one upload group."""

    group: str
    content_hash: str
    """SHA-256 of `asset`, lowercase hex: the idempotency key inside the group."""
    asset: bytes = field(repr=False)
    media_type: str
    metadata: Mapping[str, Any]
    """JSON-serialisable: prediction, score, strategy, threshold, reason, model_name,
    model_version, flagged_at (ISO 8601, UTC)."""

    @property
    def filename(self) -> str:
        return self.content_hash + extension_for(self.media_type)


@dataclass(frozen=True)
class Annotation:
    """A label that came back from annotators for one asset of a group."""

    group: str
    content_hash: str
    label: Any
    """Task-specific; for classification an int class index (see the README's label format)."""
    annotator: str | None = None
    labelled_at: str | None = None
    changed_at: str | None = None
    """When the sink last changed this annotation, on the sink's own clock, as ISO 8601 UTC
    with a fixed width (so that strings compare like times): what an incremental pull keeps
    as its watermark and gives back as `since`. None when the sink cannot tell."""
    problem: str | None = None
    """Set when the sink holds something for this item that is not a usable annotation (a
    label object that is not JSON, say): reported by `labels pull`, never guessed."""


class SinkError(Exception):
    """Base class. Messages must never contain credentials."""


class TransientSinkError(SinkError):
    """Try again later: the sink is down, timed out, throttled us, or answered 5xx."""


class PermanentSinkError(SinkError):
    """This upload will never be accepted as it is (rejected asset, invalid metadata):
    the uploader moves it to the dead letters with this message."""


class SinkAuthError(SinkError):
    """The sink rejected our credentials. Affects every upload: the uploader keeps the
    work, backs off and reports it loudly; it does not dead-letter anything."""


class Sink(abc.ABC):
    """Where flagged assets go. Implementations live in `triton_al.sinks.<scheme>`."""

    @abc.abstractmethod
    def upload(self, batch: Sequence[Upload]) -> list[SinkError | None]:
        """Write every upload of the batch idempotently.

        Returns one entry per upload, in order: None when it is stored (or already was),
        else the error for that upload alone (partial failure). Raise a `SinkError` when
        the whole batch failed (sink down, auth refused)."""

    def annotations(self, group: str, since: str | None = None) -> Iterator[Annotation]:
        """Labels that came back for assets of this group (for the retrain step).

        `since` is the newest `changed_at` an earlier pull saw (None: everything). A sink
        that can ask its service for what changed since then yields at least every
        annotation changed at or after it (more is harmless: the pull compares); one that
        cannot ignores it. Sinks written before `since` existed take only `group`."""
        raise NotImplementedError(f"{type(self).__name__} does not return annotations")

    def fetch(self, group: str, content_hash: str) -> Upload | None:
        """The asset (and its metadata) this sink holds for (group, content hash), None when
        it holds none: how `labels pull` brings a labelled item into a local store the
        uploader never delivered to. Sinks that cannot give assets back raise
        NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} does not give assets back")

    def fetch_many(self, group: str, content_hashes: Sequence[str]) -> dict[str, Upload | SinkError | None]:
        """`fetch` for several items (sinks where a call per item is costly override it):
        per hash, the upload, None, or the `SinkError` of that item alone. Raises
        NotImplementedError as `fetch` does."""
        out: dict[str, Upload | SinkError | None] = {}
        for content_hash in content_hashes:
            try:
                out[content_hash] = self.fetch(group, content_hash)
            except SinkError as e:
                out[content_hash] = e
        return out

    def describe(self) -> str:
        """Where this sink writes, for logs and status: never includes credentials."""
        return type(self).__name__

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
