"""Settings of the `active_learning` Triton step, read once from its `config.pbtxt` parameters.

A step's parameters are flat strings (that is what Triton gives a Python backend). They are
parsed here into one validated object; any bad or unknown key fails the model load with a
message naming it.

| parameter | meaning | default |
|---|---|---|
| `strategy`, `threshold`, `task`, `from_logits`, `random_fraction`, `seed`, `sum_tolerance` | see `ActiveLearningConfig` | its defaults |
| `upload_groups` | comma-separated group names | `active-learning` |
| `aggregate`, `k`, `confidence_floor`, `empty_score`, `layout`, `quantile` | task options | the task's defaults |
| `scores_input` | the step input holding the model's class scores | `PROBS` |
| `asset_input` | the step input holding the original asset (image bytes); empty: none | `IMAGE` |
| `boxes_input` | detection only: the step input holding each box's place, [batch, boxes, 4] FP32 (x0, y0, x1, y1 in pixels of the input image); stored predictions then carry `box` per box | – |
| `embedding_input` | the step input holding the model's embedding of each item, [batch, D] FP32 (1 <= D <= 4096); stored with each flagged item (for near-duplicate suppression and diverse selection); an item whose embedding holds NaN or Inf is stored without it | – |
| `model_name` | model whose predictions are scored (recorded with each item) | required |
| `model_version` | recorded with each item, unless a `MODEL_VERSION` input carries it | the version the server serves |
| `label_file` | class names, one per line, relative to the model repository (attach sets it from the scored output's `label_filename`) | – |
| `outbox_path` | SQLite outbox file; else `$TRITON_AL_OUTBOX`; empty string: score only | – |
| `outbox_max_items`, `outbox_max_bytes`, `outbox_overflow_policy` | outbox bounds | 100000, 2 GiB, `drop_least_uncertain` |
| `outbox_sync` | `full`: each append is fsynced before it returns (survives power loss); `normal`: written to the OS before it returns (survives any process kill, not a power loss or kernel crash), about 2.5x faster | `full` |
| `outbox_max_asset_bytes` | a flagged item whose asset is bigger is not stored (counted as refused) | 32 MiB |
| `outbox_max_invalid_share` | share of `outbox_max_items` that invalid-output items (NaN score) may hold | 0.1 |

Both steps (the native backend and the Python-backend model) read these parameters with the
same rules and messages: the rules are the pydantic models below, flattened into a table
(`parameter_table()`, committed as `rust/step/src/parameters.json`, regenerated with
``python -m triton_al.step_settings``) that the Rust step validates against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from triton_al.config import TASK_OPTIONS, ActiveLearningConfig

OUTBOX_ENV = "TRITON_AL_OUTBOX"

_STEP_KEYS = ("scores_input", "asset_input", "boxes_input", "embedding_input", "model_name", "model_version", "label_file")
_CONFIG_KEYS = {"strategy", "threshold", "task", "from_logits", "random_fraction", "seed", "sum_tolerance", "upload_groups"}


class OutboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    max_items: int = Field(100_000, gt=0)
    max_bytes: int = Field(2 * 1024**3, gt=0)
    overflow_policy: Literal["drop_newest", "drop_least_uncertain"] = "drop_least_uncertain"
    sync: Literal["full", "normal"] = "full"
    max_asset_bytes: int = Field(32 * 1024**2, gt=0)
    max_invalid_share: float = Field(0.1, gt=0.0, le=1.0)


class StepSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active_learning: ActiveLearningConfig
    outbox: OutboxSettings | None = Field(None, description="None: score and flag, store nothing.")
    scores_input: str = "PROBS"
    asset_input: str | None = "IMAGE"
    boxes_input: str | None = Field(None, description="Detection: the input holding the boxes, [batch, boxes, 4] FP32 "
                                    "(x0, y0, x1, y1 in pixels of the input image).")
    embedding_input: str | None = Field(None, description="The input holding the model's embedding of each item, "
                                        "[batch, D] FP32 (1 <= D <= 4096): stored with each flagged item.")
    model_name: str = Field(min_length=1)
    model_version: str = "unknown"
    label_file: str | None = Field(None, description="Class names, one per line (Triton's label_filename), relative to "
                                   "the model repository: stored predictions name their labels.")

    @classmethod
    def from_parameters(cls, params: dict[str, str], env: dict[str, str] | None = None) -> StepSettings:
        """Parse Triton's flat string parameters; raise ValueError naming every bad key.

        The rules and messages are the Rust step's (`triton_al._core.parse_step_parameters`,
        the native backend reads its parameters with the same code); the values it returns
        then build these pydantic models."""
        from triton_al import _core

        env = dict(os.environ) if env is None else env
        parsed = _core.parse_step_parameters({k: str(v) for k, v in params.items()}, env.get(OUTBOX_ENV))
        task = parsed["task"]
        config: dict[str, Any] = {key: parsed[key] for key in _CONFIG_KEYS}
        config["task_options"] = {key: parsed[key] for key in TASK_OPTIONS[task].model_fields}
        outbox = None
        if parsed["outbox_path"] is not None:
            outbox = {name: parsed[f"outbox_{name}"] for name in OutboxSettings.model_fields}
        step = {key: parsed[key] for key in _STEP_KEYS}
        try:
            return cls(active_learning=ActiveLearningConfig.model_validate(config),
                       outbox=OutboxSettings(**outbox) if outbox else None, **step)
        except ValidationError as e:  # the table and the models disagree: a defect, say where
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"active_learning step: bad parameter value(s): {problems}") from None


PARAMETERS_FILE = Path(__file__).resolve().parents[2] / "rust" / "step" / "src" / "parameters.json"


def _rule(schema: dict[str, Any]) -> dict[str, Any]:
    """One parameter's rule, flattened from its JSON schema: a type and its bounds."""
    if "anyOf" in schema:  # Optional[X]: the non-null branch, default null
        branch = next(b for b in schema["anyOf"] if b.get("type") != "null")
        return {**_rule(branch), "default": schema.get("default"), "nullable": True}
    rule: dict[str, Any] = {"type": "enum" if "enum" in schema else schema["type"]}
    if "enum" in schema:
        rule["values"] = schema["enum"]
    for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength"):
        if bound in schema:
            rule[bound] = schema[bound]
    if rule.get("exclusiveMaximum") == 2**64:  # an unsigned 64-bit integer
        rule["maximum"] = 2**64 - 1
        del rule["exclusiveMaximum"]
    if "default" in schema:
        rule["default"] = schema["default"]
    return rule


def parameter_table() -> dict[str, Any]:
    """Every step parameter with its rule, from the pydantic models (the one definition)."""
    config = ActiveLearningConfig.model_json_schema()
    parameters: dict[str, Any] = {}
    for key in sorted(_CONFIG_KEYS):
        prop = config["properties"][key]
        parameters[key] = {"type": "groups", "default": "active-learning"} if key == "upload_groups" else _rule(prop)
    outbox = OutboxSettings.model_json_schema()["properties"]
    for name, prop in outbox.items():
        parameters[f"outbox_{name}"] = {"type": "path"} if name == "path" else _rule(prop)
    step = StepSettings.model_json_schema()["properties"]
    for key in _STEP_KEYS:
        parameters[key] = _rule(step[key])
    parameters["model_name"]["required"] = True
    task_options = {
        task: {name: _rule(prop) for name, prop in model.model_json_schema()["properties"].items()}
        for task, model in TASK_OPTIONS.items()
    }
    return {"generated_by": "python -m triton_al.step_settings", "parameters": parameters, "task_options": task_options}


if __name__ == "__main__":  # python -m triton_al.step_settings: regenerate the committed table
    import json

    PARAMETERS_FILE.write_text(json.dumps(parameter_table(), indent=1) + "\n")
    print(f"wrote {PARAMETERS_FILE}")
