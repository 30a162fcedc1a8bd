"""`ActiveLearningConfig`: the one validated description of what to score and what to flag.

Validated once (pydantic), then passed around whole. Its JSON schema is
``ActiveLearningConfig.model_json_schema()`` (also written to ``docs/config.schema.json``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Strategy = Literal["entropy", "least_confidence", "margin", "ratio", "random"]
Task = Literal["classification", "multilabel", "detection", "segmentation"]

# Group names become folder names and URL path parts in sinks: keep them boring.
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: no trailing newline


def validate_group_name(name: str) -> str:
    """An upload-group name: 1–128 of ``A-Z a-z 0-9 . _ -``, not starting with ``.``/``-``/``_``,
    no ``..`` (so it is safe as a folder name and a URL path segment)."""
    if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"upload group name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..' (no paths, no hidden names)"
        )
    return name


GroupName = Annotated[str, AfterValidator(validate_group_name)]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassificationOptions(_Options):
    pass


class MultiLabelOptions(_Options):
    aggregate: Literal["min", "mean"] = Field(
        "min", description="How per-label scores become one per item."
    )


class DetectionOptions(_Options):
    aggregate: Literal["min", "mean", "least_confident_mean"] = Field(
        "min", description="How per-box scores become one per image."
    )
    k: int = Field(3, ge=1, description="Boxes averaged by least_confident_mean.")
    confidence_floor: float = Field(
        0.0, ge=0.0, le=1.0, description="Boxes with detection confidence below this are ignored."
    )
    empty_score: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Score of an image with no boxes (1: certain, not flagged; 0: always flagged).",
    )


class SegmentationOptions(_Options):
    layout: Literal["nchw", "nhwc"] = "nchw"
    aggregate: Literal["mean", "min", "quantile"] = Field(
        "mean", description="How per-pixel scores become one per image."
    )
    quantile: float = Field(0.1, ge=0.0, le=1.0, description="The low quantile used by 'quantile'.")


TASK_OPTIONS: dict[str, type[_Options]] = {
    "classification": ClassificationOptions,
    "multilabel": MultiLabelOptions,
    "detection": DetectionOptions,
    "segmentation": SegmentationOptions,
}

TaskOptions = ClassificationOptions | MultiLabelOptions | DetectionOptions | SegmentationOptions


class ActiveLearningConfig(BaseModel):
    """What to score, how, and where flagged items go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = Field("entropy", description="Uncertainty strategy (see README).")
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Items with score < threshold are flagged; higher flags more.",
    )
    upload_groups: list[GroupName] = Field(
        default_factory=lambda: ["active-learning"],
        min_length=1,
        description="Upload groups of the annotation project that receive flagged items.",
    )
    task: Task = "classification"
    from_logits: bool = Field(False, description="Outputs are logits rather than probabilities.")
    task_options: TaskOptions = Field(
        default_factory=ClassificationOptions, description="Options of the chosen task."
    )
    sum_tolerance: float = Field(
        0.01, ge=0.0, description="Probability rows further than this from summing to 1 are invalid."
    )
    random_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of not-uncertain items flagged at random (unbiased sampling; "
        "helps from a cold start).",
    )
    seed: int | None = Field(None, ge=0, lt=2**64, description="Seed for random sampling.")

    @field_validator("upload_groups")
    @classmethod
    def _unique_groups(cls, groups: list[str]) -> list[str]:
        if len(set(groups)) != len(groups):
            raise ValueError(f"upload_groups has duplicates: {groups}")
        return groups

    @model_validator(mode="before")
    @classmethod
    def _options_for_task(cls, data: Any) -> Any:
        # Parse task_options with the model of the chosen task, so an option that belongs to
        # another task is an error naming it rather than silently ignored.
        if isinstance(data, dict):
            task = data.get("task", "classification")
            options = data.get("task_options")
            model = TASK_OPTIONS.get(task) if isinstance(task, str) else None
            if model is not None and (options is None or isinstance(options, dict)):
                try:
                    parsed = model.model_validate(options or {})
                except ValidationError as e:
                    problems = "; ".join(
                        f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()
                    )
                    raise ValueError(f"task_options for task {task!r}: {problems}") from None
                data = {**data, "task_options": parsed}
        return data

    @model_validator(mode="after")
    def _options_match_task(self) -> ActiveLearningConfig:
        expected = TASK_OPTIONS[self.task]
        if not isinstance(self.task_options, expected):
            raise ValueError(
                f"task_options: task {self.task!r} takes {expected.__name__}, "
                f"got {type(self.task_options).__name__}"
            )
        return self

    def kernel_options(self) -> dict[str, Any]:
        """Keyword options for :func:`triton_al.score` (without strategy/task/from_logits)."""
        options: dict[str, Any] = {"sum_tolerance": self.sum_tolerance}
        options.update(self.task_options.model_dump())
        return options


if __name__ == "__main__":  # python -m triton_al.config > docs/config.schema.json
    import json

    print(json.dumps(ActiveLearningConfig.model_json_schema(), indent=2))
