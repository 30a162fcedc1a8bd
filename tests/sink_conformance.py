"""One conformance suite for every sink. A sink's test module subclasses `SinkConformance`
and provides these fixtures:

- `sink`: a fresh Sink writing to a real backing service;
- `stored`: a callable group -> {content_hash: sidecar metadata} read from the backing
  service directly, not through the sink;
- `outage`: a context manager during which the backing service is down (the real server
  stopped by PID and restarted on the same port afterwards);
- `bad_credentials_sink`: the same sink with wrong credentials (or None if the service has none);
- `secret`: the credential that must never appear in messages or logs (or None).
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pytest
from PIL import Image

from triton_al.sinks.base import PermanentSinkError, SinkAuthError, SinkError, TransientSinkError, Upload

GROUP = "conformance"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(seed: int, group: str = GROUP, asset: bytes | None = None, metadata: dict | None = None) -> Upload:
    data = png(seed) if asset is None else asset
    meta = {"score": 0.1 + seed / 1000, "prediction": {"label": seed % 10}, "strategy": "entropy", "threshold": 0.5,
            "reason": "uncertain", "model_name": "fashion_cnn", "model_version": "3", "flagged_at": "2026-11-24T00:00:00Z"}
    return Upload(group, hashlib.sha256(data).hexdigest(), data, "image/png", metadata if metadata is not None else meta)


class SinkConformance:
    def test_uploads_arrive_with_their_metadata(self, sink, stored):
        batch = [upload(i) for i in range(5)]
        assert sink.upload(batch) == [None] * 5
        found = stored(GROUP)
        assert set(found) == {u.content_hash for u in batch}
        meta = found[batch[2].content_hash]
        assert meta["score"] == pytest.approx(0.102) and meta["model_version"] == "3" and meta["prediction"] == {"label": 2}

    def test_reupload_is_idempotent(self, sink, stored):
        batch = [upload(10), upload(11), upload(10)]  # a repeat inside the batch too
        assert sink.upload(batch) == [None] * 3
        first = stored(GROUP)
        assert sink.upload(batch) == [None] * 3  # the uploader retried after a crash
        again = stored(GROUP)
        assert set(again) == set(first) == {batch[0].content_hash, batch[1].content_hash}

    def test_a_bad_item_fails_alone(self, sink, stored):
        batch = [upload(20), upload(21, asset=b"\x89PNG\r\n\x1a\ntruncated"), upload(22),
                 upload(23, metadata={"score": object()})]
        results = sink.upload(batch)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], PermanentSinkError) and isinstance(results[3], PermanentSinkError)
        assert set(stored(GROUP)) == {batch[0].content_hash, batch[2].content_hash}

    @pytest.mark.parametrize("group", ["../escape", "/abs", ".hidden", "a/b"])
    def test_hostile_group_names_are_refused(self, sink, stored, group):
        (result,) = sink.upload([upload(30, group=group)])
        assert isinstance(result, PermanentSinkError) and "not allowed" in str(result)

    def test_wrong_credentials_are_a_clear_error_without_the_secret(self, bad_credentials_sink, secret, caplog):
        if bad_credentials_sink is None:
            pytest.skip("this sink has no credentials")
        caplog.set_level(logging.DEBUG)
        with pytest.raises(SinkAuthError) as e:
            bad_credentials_sink.upload([upload(40)])
        assert "rejected" in str(e.value) or "credentials" in str(e.value)
        if secret:
            assert secret not in str(e.value) and secret not in caplog.text
            assert secret not in bad_credentials_sink.describe()

    def test_down_then_up(self, sink, stored, outage):
        with outage():
            with pytest.raises(TransientSinkError):
                sink.upload([upload(50)])
        assert sink.upload([upload(50)]) == [None]
        assert upload(50).content_hash in stored(GROUP)

    def test_errors_are_sink_errors(self, sink):
        assert issubclass(PermanentSinkError, SinkError) and issubclass(TransientSinkError, SinkError)
