"""CLI commands for serving: `triton-al attach` (and `serve`, registered beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from triton_al.config import ActiveLearningConfig


def attach_command(
    model_repository: Annotated[Path, typer.Option("--model-repository", help="The Triton model repository.")],
    model: Annotated[str, typer.Option("--model", help="Name of the model to put active learning behind.")],
    output: Annotated[Optional[str], typer.Option(help="Output holding the class scores (default: worked out).")] = None,
    task: Annotated[Optional[str], typer.Option(help="classification | multilabel | detection | segmentation.")] = None,
    kind: Annotated[Optional[str], typer.Option(help="Whether the output holds 'probs' or 'logits'.")] = None,
    preprocess: Annotated[Optional[str], typer.Option(help="A model in front of MODEL whose outputs feed it (e.g. image decoding).")] = None,
    step_name: Annotated[Optional[str], typer.Option(help="Name of the step model (default: MODEL_active_learning).")] = None,
    strategy: Annotated[str, typer.Option(help="entropy | least_confidence | margin | ratio | random.")] = "entropy",
    threshold: Annotated[float, typer.Option(help="Flag items with score < threshold.")] = 0.5,
    upload_group: Annotated[Optional[list[str]], typer.Option("--upload-group", help="Upload group (repeatable).")] = None,
    outbox: Annotated[Optional[str], typer.Option(help="Outbox path written into the step (default: $TRITON_AL_OUTBOX at run time).")] = None,
) -> None:
    """Write the active_learning step and an ensemble MODEL_al beside MODEL (MODEL is left untouched)."""
    from triton_al.attach import AttachError, attach

    if kind not in (None, "probs", "logits"):
        raise typer.BadParameter(f"--kind must be 'probs' or 'logits', got {kind!r}")
    try:
        config = ActiveLearningConfig(
            strategy=strategy, threshold=threshold, upload_groups=upload_group or ["active-learning"], task=task or "classification"
        )
        written = attach(model_repository, model, output=output, task=task, kind=kind, preprocess=preprocess,
                         step_name=step_name, config=config, outbox_path=outbox)
    except (AttachError, ValueError) as e:
        typer.echo(f"triton-al attach: {e}", err=True)
        raise typer.Exit(2) from None
    if not written:
        typer.echo(f"{model}_al is already up to date in {model_repository}")
    for path in written:
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("attach")(attach_command)
