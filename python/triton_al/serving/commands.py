"""CLI commands for serving: `triton-al attach` (and `serve`, registered beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from triton_al.config import ActiveLearningConfig



def _checked(flag: str, parse, value):
    """`parse(value)`, its ValueError reported as a bad value of `flag`."""
    try:
        return parse(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None

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
    step: Annotated[Optional[str], typer.Option(help="native (the Rust Triton backend, no process hop; default when built) | python (a Python-backend model).")] = None,
    boxes_output: Annotated[Optional[str], typer.Option(help="Detection: the output holding the boxes, [boxes, 4] FP32 (x0, y0, x1, y1 in pixels); stored with each flagged box.")] = None,
    embedding_output: Annotated[Optional[str], typer.Option(help="An output holding an embedding per item, [D] FP32 (e.g. the layer before the classifier); stored with each flagged item for near-duplicates and diverse selection.")] = None,
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
                         step_name=step_name, config=config, outbox_path=outbox, step=step,
                         boxes_output=boxes_output, embedding_output=embedding_output)
    except (AttachError, ValueError) as e:
        typer.echo(f"triton-al attach: {e}", err=True)
        raise typer.Exit(2) from None
    if not written:
        typer.echo(f"{model}_al is already up to date in {model_repository}")
    for path in written:
        typer.echo(f"wrote {path}")


def serve_command(
    model_repository: Annotated[Path, typer.Option("--model-repository", help="The Triton model repository.")] = Path("model_repository"),
    data_dir: Annotated[Path, typer.Option(help="Outbox, project store and logs live here.")] = Path("triton-al-data"),
    store: Annotated[Optional[Path], typer.Option(help="Local project store (default: DATA_DIR/store).")] = None,
    sink: Annotated[Optional[str], typer.Option(help="Upload elsewhere: s3://…, labelstudio+http://…, nexus://… (see README).")] = None,
    outbox: Annotated[Optional[Path], typer.Option(help="Outbox file (default: DATA_DIR/outbox.db).")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port on 127.0.0.1 (default: a free one).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="HTTP port on 127.0.0.1 (default: a free one).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Triton /metrics port (default: a free one).")] = None,
    model_control_mode: Annotated[str, typer.Option(help="none | poll | explicit (explicit: `triton-al deploy` loads new versions).")] = "explicit",
    uploader: Annotated[bool, typer.Option(help="Start the uploader sidecar.")] = True,
    tritonserver: Annotated[Optional[str], typer.Option(help="Path of the tritonserver binary (default: the nvidia-pytriton wheel's, or PATH).")] = None,
    quiet: Annotated[bool, typer.Option(help="Do not stream Triton's log to the console.")] = False,
    forget_deliveries: Annotated[bool, typer.Option(help="The outbox delivered to another sink: clear its delivery records so that this sink gets every image flagged from now on (see `triton-al uploader --forget-deliveries`).")] = False,
    uploader_restart_delay: Annotated[float, typer.Option(min=0.01, help="First delay before restarting a dead uploader (seconds); doubles per quick death.")] = 1.0,
    uploader_restart_max_delay: Annotated[float, typer.Option(min=0.01, help="Longest delay before restarting a dead uploader (seconds).")] = 60.0,
    pull_labels_every: Annotated[Optional[float], typer.Option(help="The uploader brings the sink's annotations back every SECONDS (see `triton-al uploader --pull-labels-every`); with --sink, into --labels-store (default: DATA_DIR/store).")] = None,
    labels_store: Annotated[Optional[Path], typer.Option(help="With --pull-labels-every: the local project store labels are brought into.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="With --pull-labels-every: class names, one per line.")] = None,
    rate_limit: Annotated[Optional[list[str]], typer.Option("--rate-limit", help="Passed to the uploader: GROUP=N/minute (or /hour, /day). Repeatable.")] = None,
    budget_ledger: Annotated[Optional[str], typer.Option(help="Passed to the uploader: redis://HOST:PORT/DB shared by a fleet, so that --rate-limit budgets hold across it (see `triton-al uploader --budget-ledger`).")] = None,
    near_duplicate_distance: Annotated[Optional[str], typer.Option(help="Passed to the uploader: images within this many bits of one queued or delivered for the group are counted as near-duplicates and not uploaded; 0 or 'off' disables (see `triton-al uploader --near-duplicate-distance`).")] = None,
    near_duplicate_embedding_distance: Annotated[Optional[str], typer.Option(help="Passed to the uploader: items whose embedding (stored by the step with --embedding-output) is within this cosine distance of one queued or delivered for the group, by the same model version, are counted as near-duplicates and not uploaded; 0 or 'off' disables (see `triton-al uploader --near-duplicate-embedding-distance`).")] = None,
    selection: Annotated[Optional[str], typer.Option(help="Passed to the uploader: which items go when a group's --rate-limit binds: fifo, uncertainty or diverse (see `triton-al uploader --selection`).")] = None,
    near_duplicate_share: Annotated[bool, typer.Option("--near-duplicate-share/--no-near-duplicate-share", help="Passed to the uploader: with --budget-ledger, share near-duplicate entries with the fleet through the ledger (see `triton-al uploader --near-duplicate-share`).")] = True,
) -> None:
    """Serve a model repository with Triton and the uploader sidecar until Ctrl-C / SIGTERM."""
    from triton_al.private import keep_files_private

    keep_files_private()  # the outbox, store and logs it creates hold flagged images
    import json
    import signal
    import time

    from triton_al.serving.pipeline import Pipeline
    from triton_al.serving.server import ServerError

    if store is not None and sink is not None:
        raise typer.BadParameter("give --store or --sink, not both", param_hint="--store/--sink")
    if model_control_mode not in ("none", "poll", "explicit"):
        raise typer.BadParameter(f"expected none, poll or explicit, got {model_control_mode!r}", param_hint="--model-control-mode")
    models = sorted(p.parent.name for p in model_repository.glob("*/config.pbtxt")) if model_control_mode == "explicit" else []
    uploader_args = ["--forget-deliveries"] if forget_deliveries else []
    if pull_labels_every is not None or labels_store is not None or labels is not None:
        from triton_al.uploader.commands import check_label_pull_options

        if pull_labels_every is not None and sink is not None and labels_store is None:
            labels_store = data_dir / "store"
        try:
            problem = check_label_pull_options(sink or f"local:{(store or data_dir / 'store').absolute()}", pull_labels_every,
                                               labels_store, labels)
        except ValueError as e:
            problem = str(e)
        if problem:
            typer.echo(f"triton-al serve: {problem}", err=True)
            raise typer.Exit(2)
        uploader_args += ["--pull-labels-every", f"{pull_labels_every:g}"]
        uploader_args += ["--labels-store", str(labels_store.absolute())] if labels_store is not None else []
        uploader_args += ["--labels", str(labels.absolute())] if labels is not None else []
    # Uploader flags are checked here, with the uploader's own parsers, before Triton starts.
    if rate_limit:
        from triton_al.uploader.limits import parse_limits

        _checked("--rate-limit", parse_limits, rate_limit)
        for spec in rate_limit:
            uploader_args += ["--rate-limit", spec]
    if budget_ledger is not None:
        from triton_al.uploader.ledger import parse_ledger_uri

        _checked("--budget-ledger", parse_ledger_uri, budget_ledger)
        uploader_args += ["--budget-ledger", budget_ledger]
        if not near_duplicate_share:
            uploader_args += ["--no-near-duplicate-share"]
    if near_duplicate_distance is not None:
        from triton_al.uploader.near_duplicates import parse_distance

        _checked("--near-duplicate-distance", parse_distance, near_duplicate_distance)
        uploader_args += ["--near-duplicate-distance", near_duplicate_distance]
    if near_duplicate_embedding_distance is not None:
        from triton_al.uploader.near_duplicates import parse_embedding_distance

        _checked("--near-duplicate-embedding-distance", parse_embedding_distance, near_duplicate_embedding_distance)
        uploader_args += ["--near-duplicate-embedding-distance", near_duplicate_embedding_distance]
    if selection is not None:
        from triton_al.uploader.selection import parse_selection

        uploader_args += ["--selection", _checked("--selection", parse_selection, selection)]
    pipeline = Pipeline(
        model_repository, data_dir, sink=sink or (f"local:{store.absolute()}" if store else None), outbox=outbox,
        uploader=uploader, model_control_mode=model_control_mode, load_models=models, grpc_port=grpc_port,
        http_port=http_port, metrics_port=metrics_port, tritonserver=tritonserver, console=not quiet,
        uploader_args=uploader_args, uploader_required=False,
        uploader_restart_delay_s=uploader_restart_delay, uploader_restart_max_delay_s=max(uploader_restart_max_delay, uploader_restart_delay),
    )
    if uploader:
        # Mistakes the uploader would die of on every restart are refused here, before Triton
        # starts: an unknown sink, or an outbox that delivered to another sink.
        problem = _check_uploader_target(pipeline.outbox, pipeline.sink, forget_deliveries)
        if problem:
            typer.echo(f"triton-al serve: {problem}", err=True)
            raise typer.Exit(2)
    # A flag, not an Event: a signal handler must not take a lock the interrupted main
    # thread may hold (Event.set inside Event.wait can deadlock).
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    try:
        pipeline.start()
    except ServerError as e:
        typer.echo(f"triton-al serve: {e}", err=True)
        raise typer.Exit(1) from None
    info = {
        "grpc": pipeline.server.grpc_url, "http": pipeline.server.http_url, "metrics": pipeline.server.metrics_url,
        "outbox": str(pipeline.outbox), "sink": pipeline.sink, "tritonserver_pid": pipeline.server.pid,
    }
    if pipeline.uploader is not None and pipeline.uploader.ports:
        info.update(uploader_admin=pipeline.uploader.admin_address, uploader_metrics=pipeline.uploader.metrics_url,
                    uploader_pid=pipeline.uploader.pid)
    for line in pipeline.supervise():
        typer.echo(line, err=True)
    typer.echo("serving: " + json.dumps(info))
    try:
        while not stop:
            time.sleep(0.25)
            if pipeline.server.process.poll() is not None:
                typer.echo(f"tritonserver exited with code {pipeline.server.process.returncode}", err=True)
                raise typer.Exit(1)
            # Whatever happens to the uploader, Triton keeps serving: a dead uploader is
            # restarted with exponential backoff, and a failed restart is only reported.
            try:
                lines = pipeline.supervise()
            except Exception as e:  # noqa: BLE001 - never let the sidecar take the server down
                lines = [f"supervising the uploader failed: {type(e).__name__}: {e}"]
            for line in lines:
                typer.echo(line, err=True)
    finally:
        pipeline.stop()


def _check_uploader_target(outbox: Path, sink: str, forget_deliveries: bool) -> str | None:
    """Why the uploader would refuse this sink for this outbox, or None."""
    from triton_al.outbox import Outbox, OutboxError
    from triton_al.uploader.commands import sink_identity

    try:
        target = sink_identity(sink)
    except ValueError as e:
        return str(e)
    if not outbox.exists():
        return None
    if forget_deliveries or not outbox.exists():
        return None
    try:
        with Outbox(outbox) as box:
            conflict = box.sink_conflict(target)
    except OutboxError:
        return None  # an unusable outbox: the uploader reports it and keeps trying; Triton serves
    return None if conflict is None else str(conflict)


def register(app: typer.Typer) -> None:
    app.command("attach")(attach_command)
    app.command("serve")(serve_command)
