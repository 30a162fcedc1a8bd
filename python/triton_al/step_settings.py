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
| `model_name` | model whose predictions are scored (recorded with each item) | required |
| `model_version` | recorded with each item, unless a `MODEL_VERSION` input carries it | `unknown` |
| `outbox_path` | SQLite outbox file; else `$TRITON_AL_OUTBOX`; empty string: score only | – |
| `outbox_max_items`, `outbox_max_bytes`, `outbox_overflow_policy` | outbox bounds | 100000, 2 GiB, `drop_least_uncertain` |
| `outbox_sync` | `full`: each append is fsynced before it returns (survives power loss); `normal`: written to the OS before it returns (survives any process kill, not a power loss or kernel crash), about 2.5x faster | `full` |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from triton_al.config import TASK_OPTIONS, ActiveLearningConfig

OUTBOX_ENV = "TRITON_AL_OUTBOX"

_CONFIG_KEYS = {"strategy", "threshold", "task", "from_logits", "random_fraction", "seed", "sum_tolerance", "upload_groups"}
_TASK_OPTION_KEYS = {key for model in TASK_OPTIONS.values() for key in model.model_fields}


class OutboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    max_items: int = Field(100_000, gt=0)
    max_bytes: int = Field(2 * 1024**3, gt=0)
    overflow_policy: Literal["drop_newest", "drop_least_uncertain"] = "drop_least_uncertain"
    sync: Literal["full", "normal"] = "full"


class StepSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active_learning: ActiveLearningConfig
    outbox: OutboxSettings | None = Field(None, description="None: score and flag, store nothing.")
    scores_input: str = "PROBS"
    asset_input: str | None = "IMAGE"
    model_name: str = Field(min_length=1)
    model_version: str = "unknown"

    @classmethod
    def from_parameters(cls, params: dict[str, str], env: dict[str, str] | None = None) -> StepSettings:
        """Parse Triton's flat string parameters; raise ValueError naming every bad key."""
        env = dict(os.environ) if env is None else env
        config: dict[str, Any] = {}
        options: dict[str, Any] = {}
        outbox: dict[str, Any] = {}
        step: dict[str, Any] = {}
        unknown = []
        for key, raw in params.items():
            value = raw.strip()
            if key in _CONFIG_KEYS:
                if key == "upload_groups":
                    config[key] = [g.strip() for g in value.split(",") if g.strip()]
                elif value:
                    config[key] = value
            elif key in _TASK_OPTION_KEYS:
                if value:
                    options[key] = value
            elif key.startswith("outbox_"):
                name = key.removeprefix("outbox_")
                if name not in OutboxSettings.model_fields:
                    unknown.append(key)
                else:
                    outbox[name] = value
            elif key in ("scores_input", "asset_input", "model_name", "model_version"):
                step[key] = value or (None if key == "asset_input" else value)
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"active_learning step: unknown parameter(s) {sorted(unknown)} in config.pbtxt")
        if options:
            config["task_options"] = options
        path = outbox.pop("path", None)
        if path is None:
            path = env.get(OUTBOX_ENV)
        if path is None:
            raise ValueError(
                f"active_learning step: no outbox configured: set the parameter 'outbox_path' in "
                f"config.pbtxt or the environment variable {OUTBOX_ENV} (an empty outbox_path scores "
                "without storing flagged items)"
            )
        try:
            return cls(
                active_learning=ActiveLearningConfig.model_validate(config),
                outbox=OutboxSettings(path=path, **outbox) if path else None,
                **step,
            )
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"active_learning step: bad parameter value(s): {problems}") from None
