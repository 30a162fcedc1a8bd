from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupStatus(_message.Message):
    __slots__ = ("upload_group", "queued", "dead_letters", "delivered", "oldest_item_age_seconds", "paused")
    UPLOAD_GROUP_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_ITEM_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    upload_group: str
    queued: int
    dead_letters: int
    delivered: int
    oldest_item_age_seconds: float
    paused: bool
    def __init__(self, upload_group: _Optional[str] = ..., queued: _Optional[int] = ..., dead_letters: _Optional[int] = ..., delivered: _Optional[int] = ..., oldest_item_age_seconds: _Optional[float] = ..., paused: bool = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("groups", "sink", "counters", "sink_backoff_seconds", "last_error", "outbox", "outbox_error", "label_pull")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SINK_BACKOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_ERROR_FIELD_NUMBER: _ClassVar[int]
    LABEL_PULL_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    sink: str
    counters: _containers.ScalarMap[str, int]
    sink_backoff_seconds: float
    last_error: str
    outbox: str
    outbox_error: str
    label_pull: LabelPullStatus
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., sink: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ..., sink_backoff_seconds: _Optional[float] = ..., last_error: _Optional[str] = ..., outbox: _Optional[str] = ..., outbox_error: _Optional[str] = ..., label_pull: _Optional[_Union[LabelPullStatus, _Mapping]] = ...) -> None: ...

class LabelPullStatus(_message.Message):
    __slots__ = ("labels_store", "interval_seconds", "pulls", "next_pull_in_seconds", "has_last", "last_started_at", "last_seconds", "last_outcome", "last_new_labels", "last_relabelled", "last_unchanged", "last_items_fetched", "last_not_taken", "last_error", "upload_groups")
    LABELS_STORE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PULL_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HAS_LAST_FIELD_NUMBER: _ClassVar[int]
    LAST_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LAST_NEW_LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_RELABELLED_FIELD_NUMBER: _ClassVar[int]
    LAST_UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    LAST_ITEMS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    LAST_NOT_TAKEN_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_GROUPS_FIELD_NUMBER: _ClassVar[int]
    labels_store: str
    interval_seconds: float
    pulls: int
    next_pull_in_seconds: float
    has_last: bool
    last_started_at: float
    last_seconds: float
    last_outcome: str
    last_new_labels: int
    last_relabelled: int
    last_unchanged: int
    last_items_fetched: int
    last_not_taken: int
    last_error: str
    upload_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, labels_store: _Optional[str] = ..., interval_seconds: _Optional[float] = ..., pulls: _Optional[int] = ..., next_pull_in_seconds: _Optional[float] = ..., has_last: bool = ..., last_started_at: _Optional[float] = ..., last_seconds: _Optional[float] = ..., last_outcome: _Optional[str] = ..., last_new_labels: _Optional[int] = ..., last_relabelled: _Optional[int] = ..., last_unchanged: _Optional[int] = ..., last_items_fetched: _Optional[int] = ..., last_not_taken: _Optional[int] = ..., last_error: _Optional[str] = ..., upload_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("upload_groups",)
    UPLOAD_GROUPS_FIELD_NUMBER: _ClassVar[int]
    upload_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upload_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("paused_groups",)
    PAUSED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    paused_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paused_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("upload_groups",)
    UPLOAD_GROUPS_FIELD_NUMBER: _ClassVar[int]
    upload_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upload_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("paused_groups",)
    PAUSED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    paused_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paused_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class RetryDeadLettersRequest(_message.Message):
    __slots__ = ("upload_group",)
    UPLOAD_GROUP_FIELD_NUMBER: _ClassVar[int]
    upload_group: str
    def __init__(self, upload_group: _Optional[str] = ...) -> None: ...

class RetryDeadLettersResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: int
    def __init__(self, requeued: _Optional[int] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("uploaded", "still_queued", "complete", "timed_out", "last_error")
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    STILL_QUEUED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    uploaded: int
    still_queued: int
    complete: bool
    timed_out: bool
    last_error: str
    def __init__(self, uploaded: _Optional[int] = ..., still_queued: _Optional[int] = ..., complete: bool = ..., timed_out: bool = ..., last_error: _Optional[str] = ...) -> None: ...
