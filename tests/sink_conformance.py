"""One conformance suite for every sink. A sink's test module subclasses `SinkConformance`
and provides these fixtures:

- `sink`: a fresh Sink writing to a real backing service;
- `stored`: a callable group -> {content_hash: sidecar metadata} read from the backing
  service directly, not through the sink;
- `outage`: a context manager during which the backing service is down (the real server
  stopped by PID and restarted on the same port afterwards);
- `bad_credentials_sink`: the same sink with wrong credentials (or None if the service has none);
- `secret`: the credential that must never appear in messages or logs (or None).

It may override `metadata_view` (a fixture: sent metadata -> what `stored` must show for it;
by default every key as sent, NaN-aware, which is what the local store and S3 keep) and
`fuzz_examples` (how many Hypothesis examples the metadata fuzzing runs against it).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from triton_al.config import validate_group_name
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


# Metadata fuzzing ---------------------------------------------------------------------

HOSTILE_GROUPS = ["../escape", "/abs", ".hidden", "a/b", "", "a" * 129, "-dash", "_under", "a..b", "ünïcode", "a b",
                  "a\nb", "a\x00b", "%2e%2e", "C:\\x"]
ODD_TEXT = ["", "\x00", "a\x00b", "\ud800", "\udfff lone", "ü漢字🙂", "\u202eevil", "<script>alert(1)</script>", "' OR 1=1 --",
            "\\", "\"", "line\nbreak", "NaN", "null", "{}", "\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
_assets = itertools.count(1_000_000 + (os.getpid() % 1000) * 10_000)  # a fresh asset per example


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


def text():
    return st.one_of(st.text(max_size=40), st.sampled_from(ODD_TEXT),
                     st.builds(lambda c, n: c * n, st.characters(), st.integers(1_000, 100_000)))  # very long


def numbers():
    return st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**70), 2**70))  # floats: NaN, ±inf included


def json_values():
    return st.recursive(st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**64), 2**64), st.text(max_size=12)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=25)


def predictions():
    return st.one_of(
        st.none(), json_values(),
        st.fixed_dictionaries({"label": st.one_of(st.integers(-3, 12), st.none(), st.text(max_size=4), st.floats())},
                              optional={"probs": st.lists(numbers(), max_size=12)}),
        st.integers(1, 200).map(nested),  # deep, within what JSON libraries parse
    )


def metadata():
    return st.fixed_dictionaries({
        "score": numbers(), "prediction": predictions(), "strategy": text(), "threshold": numbers(),
        "reason": st.one_of(text(), json_values()), "model_name": text(), "model_version": st.one_of(text(), st.integers()),
        "flagged_at": st.one_of(text(), numbers()),
    })


def groups():
    valid = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True).filter(lambda g: ".." not in g)
    return st.one_of(st.sampled_from(["fuzz", "Fuzz-2.x_b"]), valid, st.sampled_from(HOSTILE_GROUPS))


def same(a, b) -> bool:
    """Equal as JSON keeps them: NaN equals NaN, tuples are lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                              and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


class SinkConformance:
    fuzz_examples = 25

    @pytest.fixture
    def metadata_view(self):
        """What `stored(group)[hash]` shows for the metadata sent: here, every key as sent."""
        return lambda meta: dict(meta)

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

    def test_unusual_metadata_round_trips_or_is_refused_alone(self, sink, stored, metadata_view):
        """Unicode, very long text, NaN/None/huge numbers, deep or odd predictions, hostile
        group names: each item is stored as sent (as the sink's view of it) or refused, alone,
        with a clear PermanentSinkError; nothing raises out of `upload`, nothing half-stored."""
        accepted: dict[str, set[str]] = {}

        @settings(max_examples=self.fuzz_examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(group=groups(), meta=metadata())
        def check(group, meta):
            good, odd = upload(next(_assets), group="fuzz"), upload(next(_assets), group=group, metadata=meta)
            results = sink.upload([odd, good])  # raising here is the failure this test looks for
            assert len(results) == 2 and results[1] is None, results
            accepted.setdefault("fuzz", set()).add(good.content_hash)
            try:
                validate_group_name(group)
                valid = True
            except ValueError:
                valid = False
            if results[0] is None:
                assert valid, f"a hostile group name was accepted: {group!r}"
                accepted.setdefault(group, set()).add(odd.content_hash)
                found = stored(group)
                assert odd.content_hash in found
                want, got = metadata_view(meta), found[odd.content_hash]
                for key, value in want.items():
                    assert key in got and same(got[key], value), (key, value, got.get(key))
            else:
                assert isinstance(results[0], PermanentSinkError), repr(results[0])
                message = str(results[0])
                assert message and len(message) < 2_000, "an error message must be short and say what was wrong"
                assert ("not allowed" in message) if not valid else (odd.content_hash in message or "metadata" in message)
                if valid:
                    assert odd.content_hash not in stored(group), "refused, yet stored"
            for g, hashes in accepted.items():  # nothing earlier was damaged or lost
                if g == group or g == "fuzz":
                    assert hashes <= set(stored(g))

        check()
        assert len(accepted) > 1, "no unusual metadata was ever accepted: the test proved nothing"

    def test_a_prediction_nested_beyond_the_recursion_limit_is_refused_alone(self, sink, stored):
        deep, good = upload(60, metadata={"score": 0.1, "prediction": nested(5_000)}), upload(61)
        results = sink.upload([deep, good])
        assert isinstance(results[0], PermanentSinkError) and results[1] is None
        assert good.content_hash in stored(GROUP) and deep.content_hash not in stored(GROUP)
