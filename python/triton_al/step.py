"""The active-learning step, independent of Triton: score a dynamic batch made of several
requests in one vectorised call, flag, and append the flagged items to the outbox.

`triton_al.serving.active_learning` adapts this to Triton's Python backend; keeping the
logic here means it is tested like any other Python code.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triton_al import _core
from triton_al.scoring import REASONS, Evaluation, Evaluator
from triton_al.step_settings import StepSettings

log = logging.getLogger("triton_al.step")

EMBEDDING_MAX_DIMS = _core.OUTBOX_MAX_EMBEDDING_DIMS
"""The longest embedding the outbox stores (`embedding_input`: [batch, D], 1 <= D <= this)."""

OUTBOX_RETRY_INTERVAL_S = 1.0
"""How often a step whose outbox could not be opened tries again (the native step's too)."""


class RequestError(ValueError):
    """One request's inputs are unusable; only that request fails."""


@dataclass
class RequestInputs:
    """What one inference request brings to the step."""

    outputs: np.ndarray
    """The model's class scores for this request's items, batch first."""
    assets: Sequence[Any] | None = None
    """One asset per item: encoded bytes (object array) or a numeric tensor per item; any
    sequence will do, which lets the Triton step decode its BYTES tensor only when an
    item is flagged."""
    model_version: str | None = None
    boxes: np.ndarray | None = None
    """Detection: the boxes of this request's items, [batch, boxes, 4] FP32 (x0, y0, x1, y1)."""
    embedding: np.ndarray | None = None
    """The model's embedding of this request's items (`embedding_input`), [batch, D] FP32;
    only the flagged items' rows are read (and stored)."""


@dataclass
class StepCounts:
    scored: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    dropped: int = 0
    refused: int = 0
    """Rows not stored because the asset is over `outbox_max_asset_bytes`."""
    outbox_errors: int = 0
    invalid_embeddings: int = 0
    """Flagged items stored without their embedding because it held NaN or Inf."""


def sniff_media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def asset_bytes(asset: Any) -> tuple[bytes, str]:
    """The bytes stored for one item's asset, and their media type."""
    if isinstance(asset, (bytes, bytearray, memoryview)):
        data = bytes(asset)
        return data, sniff_media_type(data)
    if isinstance(asset, np.ndarray) and asset.dtype == np.object_ and asset.size == 1:
        return asset_bytes(asset.reshape(-1)[0])
    if isinstance(asset, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, asset, allow_pickle=False)  # a numeric tensor: keep it exactly
        return buffer.getvalue(), "application/x-npy"
    raise RequestError(f"asset: expected bytes or a numeric array per item, got {type(asset).__name__}")


def prediction_json(outputs: np.ndarray, task: str, layout: str = "nchw", class_names: list[str] | None = None,
                    boxes: np.ndarray | None = None) -> str:
    """The JSON summary of one item's prediction, for annotators and pre-labels: the Rust
    step's own (`triton_al._core.prediction_json`), so both steps store the same text.
    `boxes` (detection): the item's [boxes, 4] places, stored as each box's `box`."""
    places = None if boxes is None else np.asarray(boxes, np.float32)
    return _core.prediction_json(task, np.asarray(outputs, np.float32), layout=layout, class_names=class_names, boxes=places)


def prediction_of(outputs: np.ndarray, task: str, layout: str = "nchw", class_names: list[str] | None = None,
                  boxes: np.ndarray | None = None) -> dict[str, Any]:
    """`prediction_json`, parsed."""
    return json.loads(prediction_json(outputs, task, layout, class_names, boxes))


# Triton's names for numpy's types, so that both steps word a wrong type alike.
_TRITON_TYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
                 "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
                 "float32": "FP32", "float64": "FP64", "object": "BYTES", "bytes": "BYTES"}


def triton_type_name(array: np.ndarray) -> str:
    return _TRITON_TYPES.get(array.dtype.name, array.dtype.name.upper())


def read_class_names(label_file: str | None, repository: Path | None) -> list[str] | None:
    """The step's `label_file` (relative to the model repository), one class name per line."""
    if label_file is None:
        return None
    path = (repository or Path(".")) / label_file
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"active_learning step: label_file {label_file!r}: cannot read {path} ({e})") from None
    if not names:
        raise ValueError(f"active_learning step: label_file {label_file!r}: no class names in {path}")
    return names


class ActiveLearningStep:
    """Scores batches with an `ActiveLearningConfig` and stores flagged items in an outbox."""

    def __init__(self, settings: StepSettings, outbox: Any | None = None, repository: Path | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        # Where the step's warnings go (a bad batch, the outbox unusable or open again): this
        # module's log; the served step sends them to Triton's log instead (the Python
        # backend's stub does not forward `logging`).
        self.warn: Callable[[str], None] = warn or log.warning
        self.class_names = read_class_names(settings.label_file, repository)
        self.config = settings.active_learning
        self.evaluate = Evaluator(self.config)
        self.outbox = outbox
        self._closed = threading.Event()
        self._outbox_lock = threading.Lock()  # orders a late reopening against close()
        if self.outbox is None and settings.outbox is not None:
            try:
                self.outbox = self._open_outbox()
            except (OSError, ValueError, RuntimeError) as e:
                # Inference must go on without the outbox: flagged items are counted as outbox
                # errors while it cannot be opened, and a thread tries again every second
                # (the native step does the same).
                self.warn(f"active_learning: the outbox cannot be used, flagged items will not be stored until it can: {e}")
                threading.Thread(target=self._reopen_outbox, name="outbox-reopen", daemon=True).start()
        # Each batch gets its own seed (random strategy / random share), reproducible when
        # the config has one.
        base = self.config.seed if self.config.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._seeds = (hash((base, os.getpid(), i)) & (2**63 - 1) for i in itertools.count())
        self.counts = StepCounts()

    def _open_outbox(self) -> Any:
        from triton_al.outbox import Outbox

        o = self.settings.outbox
        assert o is not None
        o.path.parent.mkdir(parents=True, exist_ok=True)
        return Outbox(o.path, max_items=o.max_items, max_bytes=o.max_bytes, overflow_policy=o.overflow_policy,
                      durable=o.sync == "full", max_asset_bytes=o.max_asset_bytes, max_invalid_share=o.max_invalid_share)

    def _reopen_outbox(self) -> None:
        while not self._closed.wait(OUTBOX_RETRY_INTERVAL_S):
            try:
                outbox = self._open_outbox()
            except (OSError, ValueError, RuntimeError):
                continue
            with self._outbox_lock:
                if not self._closed.is_set():
                    self.outbox, outbox = outbox, None
            if outbox is not None:  # closed while it was opening: nobody else would close it
                outbox.close()
                return
            self.warn("active_learning: the outbox is open, flagged items are stored again")
            return

    def close(self) -> None:
        """Stop trying to reopen the outbox and close it."""
        with self._outbox_lock:
            self._closed.set()
            outbox, self.outbox = self.outbox, None
        if outbox is not None and hasattr(outbox, "close"):
            outbox.close()

    def _check(self, request: RequestInputs) -> None:
        x = request.outputs
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            raise RequestError(f"{self.settings.scores_input}: expected a batched array, got shape {getattr(x, 'shape', None)}")
        if request.assets is not None and len(request.assets) != len(x):
            raise RequestError(
                f"{self.settings.asset_input}: {len(request.assets)} assets for {len(x)} items of {self.settings.scores_input}"
            )
        if request.boxes is not None:
            self._check_boxes(x, request.boxes)
        if request.embedding is not None:
            self._check_embedding(x, request.embedding)
        elif self.settings.embedding_input is not None:
            raise RequestError(f"missing input {self.settings.embedding_input!r}")

    def _check_boxes(self, scores: np.ndarray, boxes: np.ndarray) -> None:
        """The Rust step's rules and messages (`Step::check_boxes`; the native step's type check)."""
        name = self.settings.boxes_input or "boxes"
        if not isinstance(boxes, np.ndarray) or boxes.dtype != np.float32:
            got = triton_type_name(boxes) if isinstance(boxes, np.ndarray) else type(boxes).__name__
            raise RequestError(f"{name}: expected FP32 boxes, got {got}")
        expected = [scores.shape[0], scores.shape[1] if scores.ndim > 1 else 0, 4]
        if list(boxes.shape) != expected:
            raise RequestError(f"{name}: expected shape {expected} (x0, y0, x1, y1 for each box of "
                               f"{self.settings.scores_input}), got {list(boxes.shape)}")

    def _check_embedding(self, scores: np.ndarray, embedding: np.ndarray) -> None:
        """The Rust step's rules and messages (`Step::check_embedding`; the native step's type check)."""
        name = self.settings.embedding_input or "embedding"
        if not isinstance(embedding, np.ndarray) or embedding.dtype != np.float32:
            got = triton_type_name(embedding) if isinstance(embedding, np.ndarray) else type(embedding).__name__
            raise RequestError(f"{name}: expected FP32 embeddings, got {got}")
        shape = list(embedding.shape)
        if len(shape) != 2 or shape[0] != scores.shape[0] or not 1 <= shape[1] <= EMBEDDING_MAX_DIMS:
            raise RequestError(f"{name}: expected shape [{scores.shape[0]}, D] (one embedding of D values, 1 <= D <= "
                               f"{EMBEDDING_MAX_DIMS}, per item of {self.settings.scores_input}), got {shape}")

    def _embedding_of(self, request: RequestInputs, r: int, j: int, invalid: list[str]) -> np.ndarray | None:
        """Item j's embedding to store: None without one, or (counted, and named in `invalid`
        as request r, item j) when it holds NaN or Inf: the item is stored without it."""
        if request.embedding is None:
            return None
        row = request.embedding[j]
        if np.isfinite(row).all():
            return row
        self.counts.invalid_embeddings += 1
        invalid.append(f"request {r}, item {j}")
        return None

    def process(self, requests: Sequence[RequestInputs]) -> list[Evaluation | Exception]:
        """Score every request (one kernel call for all requests of compatible shape) and
        store the flagged items. Returns, per request, its evaluation or the error for it."""
        results: list[Evaluation | Exception] = [RequestError("not processed")] * len(requests)
        good: list[int] = []
        for i, request in enumerate(requests):
            try:
                self._check(request)
                good.append(i)
            except RequestError as e:
                results[i] = e
        # Requests with the same item shape and dtype are scored together.
        by_shape: dict[tuple, list[int]] = {}
        for i in good:
            x = requests[i].outputs
            by_shape.setdefault((x.shape[1:], x.dtype.str), []).append(i)
        for members in by_shape.values():
            stacked = np.concatenate([requests[i].outputs for i in members]) if len(members) > 1 else requests[members[0]].outputs
            try:
                evaluation = self.evaluate(stacked, seed=next(self._seeds))
            except Exception as e:  # noqa: BLE001 - whatever it is, only the requests at fault may fail
                if len(members) > 1:  # find them: score each request alone
                    for i in members:
                        results[i] = self._evaluate_alone(requests[i])
                else:
                    results[members[0]] = self._request_error(e)
                continue
            start = 0
            for i in members:
                n = len(requests[i].outputs)
                results[i] = Evaluation(evaluation.scores[start : start + n], evaluation.reason_codes[start : start + n])
                start += n
        self._store(requests, results)
        return results

    def _evaluate_alone(self, request: RequestInputs) -> Evaluation | Exception:
        try:
            return self.evaluate(request.outputs, seed=next(self._seeds))
        except Exception as e:  # noqa: BLE001
            return self._request_error(e)

    def _request_error(self, e: Exception) -> RequestError:
        if isinstance(e, (TypeError, ValueError)):
            return RequestError(f"{self.settings.scores_input}: {e}")
        log.exception("active_learning: scoring failed for a request")
        return RequestError(f"{self.settings.scores_input}: could not be scored ({type(e).__name__}: {e})")

    def _store(self, requests: Sequence[RequestInputs], results: list[Evaluation | Exception]) -> None:
        items = []
        invalid_embeddings: list[str] = []  # "request r, item j" of each flagged item stored without it
        cfg = self.config
        layout = getattr(cfg.task_options, "layout", "nchw")
        for r, (request, result) in enumerate(zip(requests, results)):
            if not isinstance(result, Evaluation):
                continue
            self.counts.scored += len(result)
            if not result.reason_codes.any():  # most batches: nothing flagged
                continue
            for j in np.flatnonzero(result.reason_codes):
                reason = REASONS[int(result.reason_codes[j])]
                self.counts.flagged[reason] = self.counts.flagged.get(reason, 0) + 1
                if self.outbox is None and self.settings.outbox is not None:
                    self.counts.outbox_errors += 1  # configured, but unusable
                    continue
                if self.outbox is None or request.assets is None:
                    continue
                from triton_al.outbox import FlaggedItem

                try:
                    data, media_type = asset_bytes(request.assets[j])
                except RequestError:
                    self.counts.outbox_errors += 1
                    log.exception("active_learning: unusable asset for a flagged item; not stored")
                    continue
                items.append(
                    FlaggedItem(
                        asset=data,
                        media_type=media_type,
                        model_name=self.settings.model_name,
                        model_version=request.model_version or self.settings.model_version,
                        prediction=prediction_json(request.outputs[j], cfg.task, layout, self.class_names,
                                                   None if request.boxes is None else request.boxes[j]),
                        score=float(result.scores[j]),
                        strategy=cfg.strategy,
                        threshold=cfg.threshold,
                        reason=reason,
                        upload_groups=list(cfg.upload_groups),
                        embedding=self._embedding_of(request, r, int(j), invalid_embeddings),
                    )
                )
        if invalid_embeddings:  # the one log line for it (the served step only counts it in its metrics)
            shown = "; ".join(invalid_embeddings[:4]) + ("; ..." if len(invalid_embeddings) > 4 else "")
            self.warn(f"active_learning: {len(invalid_embeddings)} flagged items stored without their embedding: "
                      f"{self.settings.embedding_input or 'embedding'} held NaN or Inf ({shown})")
        if not items:
            return
        try:
            appended = self.outbox.append_many(items)
        except Exception:  # the outbox must never fail inference: count, log, go on
            self.counts.outbox_errors += len(items)
            log.exception("active_learning: could not append %d flagged items to the outbox", len(items))
            return
        self.counts.stored += getattr(appended, "accepted", len(items))
        self.counts.duplicates += getattr(appended, "duplicates", 0)
        self.counts.dropped += getattr(appended, "dropped", 0)
        self.counts.refused += getattr(appended, "refused", 0)
