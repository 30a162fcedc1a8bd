"""The `active_learning` model for Triton's Python backend.

A model repository's `active_learning/1/model.py` is one line:
``from triton_al.serving.active_learning import TritonPythonModel``.

Inputs: the model's class scores (`scores_input`, default `PROBS`), optionally the original
asset (`asset_input`, default `IMAGE`, BYTES), the detection boxes (`boxes_input`, FP32
[batch, boxes, 4]), the model's embedding of each item (`embedding_input`, FP32 [batch, D],
stored with flagged items) and `MODEL_VERSION` (BYTES or INT). Outputs, per
item: `SCORE` (FP32 [1]) and `FLAGGED` (BOOL [1]); any other output is a pass-through: a copy
of the input of the same name (`attach` routes every model output through the step, so that
Triton never prunes the step, whichever outputs a client asks for). Every request gets
exactly one response, in order; a request whose inputs are unusable gets an error response
and the others are served. Flagged items go to the outbox; a failing outbox never fails
inference.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from triton_al.scoring import REASONS
from triton_al.step import ActiveLearningStep, RequestError, RequestInputs
from triton_al.serving.backend_utils import parameters, pb_utils
from triton_al.step_settings import StepSettings

STEP_OUTPUTS = ("SCORE", "FLAGGED")

# 0.01 wide: `triton-al calibrate` reads thresholds off this histogram.
SCORE_BUCKETS = [round(0.01 * i, 2) for i in range(1, 101)]


def _merged(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, reason codes) of several batches as one."""
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


class _Metrics:
    """Custom metrics in Triton's own /metrics, updated off the request path.

    Every metric call from a Python-backend model is a round trip to the server process;
    one per score would cost more than the scoring. Requests only hand over their score and
    reason arrays (a list append); a background thread computes the histogram and hands
    the deltas to Triton every `FLUSH_S` seconds: at most ~100 calls per second whatever
    the traffic. The score distribution is exposed
    in Prometheus histogram form (`triton_al_score_bucket{le=…}` cumulative counts,
    `_count`, `_sum`), as counters, because a Triton histogram takes one value per call.
    """

    FLUSH_S = 1.0
    MAX_PENDING = 4096  # batches kept between flushes before they are folded in place

    def __init__(self, model: str) -> None:
        self.enabled = hasattr(pb_utils, "MetricFamily")
        self.bounds = np.array(SCORE_BUCKETS)
        self._lock = threading.Lock()
        self._batches: list[tuple[np.ndarray, np.ndarray]] = []
        self._errors = 0
        self._invalid_embeddings = 0
        if not self.enabled:
            return
        family = pb_utils.MetricFamily
        labels = {"model": model}

        def counter(name: str, description: str):
            return family(name=name, description=description, kind=family.COUNTER)

        self._families = [
            counter("triton_al_items_scored_total", "Items scored by the active_learning step"),
            counter("triton_al_items_flagged_total", "Items flagged, by reason"),
            counter("triton_al_outbox_errors_total", "Flagged items the outbox could not take"),
            counter("triton_al_invalid_embeddings_total", "Flagged items stored without their embedding because it held NaN or Inf"),
            counter("triton_al_score_bucket", "Scores (confidence in [0, 1]) at or below le, cumulative"),
            counter("triton_al_score_count", "Scores observed"),
            counter("triton_al_score_sum", "Sum of the scores observed"),
        ]
        scored, flagged, errors, invalid_embeddings, bucket, count, total = self._families
        self.scored = scored.Metric(labels=labels)
        self.flagged = {r: flagged.Metric(labels={**labels, "reason": r}) for r in REASONS if r}
        self.errors = errors.Metric(labels=labels)
        self.invalid_embeddings = invalid_embeddings.Metric(labels=labels)
        self.buckets = [bucket.Metric(labels={**labels, "le": f"{b:g}"}) for b in SCORE_BUCKETS] + [
            bucket.Metric(labels={**labels, "le": "+Inf"})]
        self.count = count.Metric(labels=labels)
        self.sum = total.Metric(labels=labels)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-al-metrics", daemon=True)
        self._thread.start()

    def observe(self, scores: np.ndarray, codes: np.ndarray) -> None:
        """Keep the batch's arrays (a list append: the histogram is computed by the flush
        thread, off the request path)."""
        if not self.enabled or len(scores) == 0:
            return
        with self._lock:
            self._batches.append((scores, codes))
            if len(self._batches) < self.MAX_PENDING:
                return
            # The flush thread is far behind: fold what is pending into one batch.
            self._batches = [_merged(self._batches)]

    def error(self, n: int) -> None:
        with self._lock:
            self._errors += n

    def invalid_embedding(self, n: int) -> None:
        with self._lock:
            self._invalid_embeddings += n

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            batches, self._batches = self._batches, []
            errors, self._errors = self._errors, 0
            invalid_embeddings, self._invalid_embeddings = self._invalid_embeddings, 0
        if batches:
            scores, codes = _merged(batches)
            finite = scores[np.isfinite(scores)]
            # bucket i holds scores in (bounds[i-1], bounds[i]]; the last one is above 1 (+Inf)
            hist = np.bincount(np.searchsorted(self.bounds, finite, side="left"), minlength=len(self.bounds) + 1)
            self.scored.increment(float(len(scores)))
            self.count.increment(float(len(finite)))
            self.sum.increment(float(finite.sum()))
            for metric, delta in zip(self.buckets, np.cumsum(hist[: len(self.bounds) + 1]).tolist()):
                if delta:
                    metric.increment(float(delta))
            for code, n in enumerate(np.bincount(codes, minlength=len(REASONS)).tolist()):
                if code and n:
                    self.flagged[REASONS[code]].increment(float(n))
        if errors:
            self.errors.increment(float(errors))
        if invalid_embeddings:
            self.invalid_embeddings.increment(float(invalid_embeddings))

    def close(self) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join(2)
            self.flush()


def passthrough_outputs(model_config: dict) -> list[str]:
    """The step's outputs other than SCORE and FLAGGED: each must have an input of the same
    name, type and shape, which it copies. Raises ValueError (failing the load) otherwise."""
    inputs = {i["name"]: i for i in model_config.get("input", [])}
    names = []
    for output in model_config.get("output", []):
        name = output["name"]
        if name in STEP_OUTPUTS:
            continue
        source = inputs.get(name)
        if source is None:
            raise ValueError(f"active_learning step: output {name!r} is neither SCORE, FLAGGED nor a pass-through "
                             f"(a pass-through output needs an input of the same name)")
        same = (source.get("data_type"), [int(d) for d in source.get("dims", [])]) == (
            output.get("data_type"), [int(d) for d in output.get("dims", [])])
        if not same:
            raise ValueError(f"active_learning step: pass-through output {name!r} must have the type and dims of "
                             f"input {name!r}")
        names.append(name)
    return names


class ServedVersion:
    """The version of the scored model the server has ready (the newest, as Triton's default
    policy serves), asked of the server (`pb_utils.is_model_ready`) for the version folders
    present, newest first; re-read at most once a second. Used when the model does not say
    which version computed an item (a `MODEL_VERSION` output does)."""

    def __init__(self, model_dir: Path, model_name: str, is_ready=None) -> None:
        self.model_dir = model_dir
        self.model_name = model_name
        self.is_ready = is_ready or getattr(pb_utils, "is_model_ready", None)
        self._value, self._read_at = "unknown", -1.0

    def __call__(self) -> str:
        now = time.monotonic()
        if now - self._read_at >= 1.0:
            self._read_at = now
            try:
                versions = sorted((int(p.name) for p in self.model_dir.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
            except OSError:
                versions = []
            self._value = "unknown"
            for v in versions:
                try:
                    ready = self.is_ready is None or self.is_ready(self.model_name, str(v))
                except Exception:  # noqa: BLE001 - the server could not say: keep looking
                    ready = False
                if ready:
                    self._value = str(v)
                    break
        return self._value


class LazyAssets(Sequence):
    """A request's asset tensor, decoded only when an item is flagged: decoding a BYTES
    tensor (`as_numpy`) is a Python loop over its items, and most batches flag nothing."""

    def __init__(self, tensor) -> None:
        self._tensor = tensor
        self._len = int(tensor.shape()[0])
        self._items = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if self._items is None:
            self._items = self._tensor.as_numpy()
        return self._items[index]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        params = parameters(model_config)
        params.setdefault("model_name", args.get("model_name", "model"))
        # Without a `model_version` parameter (and no MODEL_VERSION input), record the version
        # of the scored model the server has ready.
        self.served_version = None
        if "model_version" not in params:
            self.served_version = ServedVersion(Path(args["model_repository"]).parent / params["model_name"], params["model_name"])
        # A bad setting fails the load, with the message naming it (Triton logs it).
        self.settings = StepSettings.from_parameters(params)
        self.log = pb_utils.Logger
        # The step's warnings in Triton's log (from its outbox-reopening thread too: the stub
        # queues log messages under a lock).
        self.step = ActiveLearningStep(self.settings, repository=Path(args["model_repository"]).parent,
                                       warn=self.log.log_warn)
        self.inputs = {i["name"] for i in model_config.get("input", [])}
        embedding = self.settings.embedding_input
        if embedding is not None and embedding not in self.inputs:  # the native step's rule and message
            listed = ", ".join(f'"{i["name"]}"' for i in model_config.get("input", []))
            raise ValueError(f"active_learning step: embedding_input '{embedding}' is not an input of this model "
                             f"(its inputs: [{listed}])")
        self.passthrough = passthrough_outputs(model_config)
        self.metrics = _Metrics(args.get("model_name", "active_learning"))
        self._last_errors = 0
        self._last_invalid_embeddings = 0
        s = self.settings.active_learning
        self.log.log_info(
            f"active_learning ready: strategy={s.strategy} threshold={s.threshold} groups={s.upload_groups} "
            f"task={s.task} outbox={self.settings.outbox.path if self.settings.outbox else None}"
        )

    def _passthrough_of(self, request) -> list:
        tensors = []
        for name in self.passthrough:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"missing input {name!r} (passed through to the output of that name)")
            tensors.append(pb_utils.Tensor(name, tensor.as_numpy()))
        return tensors

    def _inputs_of(self, request) -> RequestInputs:
        scores = pb_utils.get_input_tensor_by_name(request, self.settings.scores_input)
        if scores is None:
            raise RequestError(f"missing input {self.settings.scores_input!r}")
        assets = None
        if self.settings.asset_input:
            tensor = pb_utils.get_input_tensor_by_name(request, self.settings.asset_input)
            if tensor is not None:
                assets = LazyAssets(tensor)
        boxes = None
        if self.settings.boxes_input:
            tensor = pb_utils.get_input_tensor_by_name(request, self.settings.boxes_input)
            if tensor is None:
                raise RequestError(f"missing input {self.settings.boxes_input!r}")
            boxes = tensor.as_numpy()
        embedding = None
        if self.settings.embedding_input:  # checked (present, type, shape) by the step, as in the native step
            tensor = pb_utils.get_input_tensor_by_name(request, self.settings.embedding_input)
            embedding = None if tensor is None else tensor.as_numpy()
        version = None
        if "MODEL_VERSION" in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, "MODEL_VERSION")
            if tensor is not None and tensor.as_numpy().size:
                v = tensor.as_numpy().reshape(-1)[0]
                version = v.decode() if isinstance(v, bytes) else str(v)
        if version is None and self.served_version is not None:
            version = self.served_version()
        return RequestInputs(outputs=scores.as_numpy(), assets=assets, model_version=version, boxes=boxes,
                             embedding=embedding)

    def execute(self, requests):
        parsed: list[RequestInputs | Exception] = []
        copies: list[list] = []
        for request in requests:
            try:
                parsed.append(self._inputs_of(request))
                copies.append(self._passthrough_of(request))
            except Exception as e:  # noqa: BLE001 - becomes this request's error response
                parsed.append(e)
                copies.append([])
        ok = [p for p in parsed if isinstance(p, RequestInputs)]
        try:
            results = iter(self.step.process(ok))
        except Exception as e:  # noqa: BLE001 - never escape execute: every request gets its response
            self.log.log_error(f"active_learning: internal error scoring a batch: {e!r}")
            results = iter([e] * len(ok))
        responses = []
        for p, passthrough in zip(parsed, copies):
            result = next(results) if isinstance(p, RequestInputs) else p
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"active_learning: {result}")))
                continue
            self.metrics.observe(result.scores, result.reason_codes)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        *passthrough,
                        pb_utils.Tensor("SCORE", result.scores.reshape(-1, 1)),
                        pb_utils.Tensor("FLAGGED", result.flagged.reshape(-1, 1)),
                    ]
                )
            )
        errors = self.step.counts.outbox_errors
        if errors != self._last_errors:
            self.metrics.error(errors - self._last_errors)
            self.log.log_error(f"active_learning: {errors - self._last_errors} flagged items could not be stored")
            self._last_errors = errors
        invalid = self.step.counts.invalid_embeddings  # logged by the step (`self.step.warn`)
        if invalid != self._last_invalid_embeddings:
            self.metrics.invalid_embedding(invalid - self._last_invalid_embeddings)
            self._last_invalid_embeddings = invalid
        return responses

    def finalize(self) -> None:
        self.metrics.close()
        self.step.close()


logging.getLogger("triton_al").addHandler(logging.NullHandler())
