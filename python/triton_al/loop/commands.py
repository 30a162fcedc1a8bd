"""CLI for the loop: `annotate --simulate`, `retrain`, `deploy`, `rollback`, `report`, `calibrate`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

Store = Annotated[Path, typer.Option(help="The local project store (where flagged items and labels live).")]
Repository = Annotated[Path, typer.Option("--model-repository", help="The Triton model repository.")]
Url = Annotated[str, typer.Option(help="Triton's gRPC address.")]


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(2)


def annotate_command(
    store: Store,
    simulate: Annotated[bool, typer.Option(help="Required: label from Fashion-MNIST's ground truth (a SIMULATION of annotators).")] = False,
    group: Annotated[str, typer.Option(help="Upload group to label.")] = "active-learning",
    limit: Annotated[Optional[int], typer.Option(help="Label at most this many assets.")] = None,
) -> None:
    """Label flagged assets. Only the simulated annotator exists: real labels come from your annotation tool."""
    if not simulate:
        _fail("triton-al annotate: pass --simulate to label from the dataset's ground truth (a simulation); "
              "real annotations are label files written by your annotation tool (see the README)")
    from triton_al.loop.annotator import SimulatedAnnotator
    from triton_al.sinks.local import LocalStore

    run = SimulatedAnnotator().annotate(LocalStore(store, create=False), group, limit)
    typer.echo(json.dumps({"simulated": True, **run.__dict__}))


def _step_settings(repository: Path, step: str) -> dict[str, str]:
    text = (repository / step / "config.pbtxt").read_text()
    return dict(re.findall(r'key: "([^"]+)"\s*value \{\s*string_value: "([^"]*)"', text))


def retrain_command(
    model_repository: Repository,
    store: Store,
    model: Annotated[str, typer.Option(help="The model to retrain.")] = "fashion_cnn",
    command: Annotated[Optional[str], typer.Option(help="Your training command, run on a dataset snapshot: placeholders "
                                                   "{dataset} {version_dir} {model_dir} {version} {python}; it writes the "
                                                   "model (and optionally metrics.json) into {version_dir}. Default: the "
                                                   "example CNN's (python -m triton_al.example.train_on_snapshot).")] = None,
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Upload group(s) whose labels to use (default: all).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line, for the snapshot's class map.")] = None,
    datasets: Annotated[Optional[Path], typer.Option(help="Where snapshots are written (default: STORE/datasets).")] = None,
    smoke: Annotated[bool, typer.Option(help="Check the new version loads in a real tritonserver and answers before placing it.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds the command may take.")] = 3600.0,
    base_size: Annotated[int, typer.Option(help="Example command: labelled training images the loop started from.")] = 1000,
    epochs: Annotated[int, typer.Option(min=1, help="Example command: epochs.")] = 10,
    min_steps: Annotated[int, typer.Option(min=1, help="Example command: train at least this many batches.")] = 300,
    seed: Annotated[int, typer.Option(help="Example command: seed.")] = 0,
    step: Annotated[str, typer.Option(help="The active_learning step (for the threshold in the record).")] = "active_learning",
    metrics_url: Annotated[Optional[str], typer.Option(help="Triton /metrics URL: records flag counts and the score histogram.")] = None,
) -> None:
    """Export the labels as a snapshot, run the training command on it, check the new version
    in a real tritonserver, place it as the next version, and record the cycle."""
    from triton_al.loop.cycles import append_cycle
    from triton_al.loop.dataset import DatasetError, read_class_names
    from triton_al.loop.retrain import EXAMPLE_COMMAND, RetrainError, retrain_with_command
    from triton_al.sinks.local import LocalStore

    try:
        result = retrain_with_command(
            model_repository, LocalStore(store, create=False), command or EXAMPLE_COMMAND, model=model, groups=group,
            datasets=datasets, class_names=read_class_names(labels), timeout_s=timeout, smoke=smoke,
            base_size=base_size, epochs=epochs, min_steps=min_steps, seed=seed)
    except (RetrainError, DatasetError, FileNotFoundError, ImportError) as e:
        _fail(f"triton-al retrain: {e}")
    settings = _step_settings(model_repository, step) if (model_repository / step / "config.pbtxt").exists() else {}
    m = result.metrics
    record = {
        "model_name": model, "model_version": result.version, "dataset": result.snapshot,
        "labels_used": m.get("labels_used"), "annotated": m.get("annotated"), "group": group,
        "accuracy": m.get("accuracy"), "per_class": m.get("per_class"), "macro": m.get("macro"),
        "threshold": float(settings["threshold"]) if "threshold" in settings else None,
        "strategy": settings.get("strategy"), "train_seconds": round(result.seconds, 1),
        "command": command or "example", "smoke_outputs": result.outputs,
    }
    if metrics_url:
        from triton_al.calibrate import scrape

        snapshot = scrape(metrics_url, model=step)
        record.update(scored=snapshot.scored, flagged=snapshot.flagged,
                      score_buckets={str(k): v for k, v in snapshot.buckets.items()})
    record = append_cycle(store, record)
    typer.echo(json.dumps({k: record[k] for k in ("cycle", "model_version", "dataset", "labels_used", "annotated", "accuracy")}))


def evaluate_command(
    model_repository: Repository,
    store: Store,
    model: Annotated[str, typer.Option()] = "fashion_cnn",
    base_size: Annotated[int, typer.Option(help="Labels the served version was trained on (for the record).")] = 1000,
    step: Annotated[str, typer.Option(help="The active_learning step (for the threshold in the record).")] = "active_learning",
) -> None:
    """Record the newest version's test metrics as a cycle (e.g. cycle 0, before any annotation)."""
    from triton_al.loop.cycles import append_cycle
    from triton_al.loop.retrain import evaluate_version

    version, report = evaluate_version(model_repository, model)
    settings = _step_settings(model_repository, step) if (model_repository / step / "config.pbtxt").exists() else {}
    record = append_cycle(store, {
        "model_name": model, "model_version": version, "labels_used": base_size, "annotated": 0,
        "accuracy": report["accuracy"], "per_class": report["per_class"], "macro": report["macro"],
        "threshold": float(settings["threshold"]) if "threshold" in settings else None, "strategy": settings.get("strategy"),
    })
    typer.echo(json.dumps({k: record[k] for k in ("cycle", "model_version", "accuracy")}))


def deploy_command(
    model_repository: Repository,
    url: Annotated[Optional[list[str]], typer.Option("--url", help="Triton's gRPC address; repeat it for every replica of a fleet reading this repository: the version is rolled out one replica at a time.")] = None,
    model: Annotated[str, typer.Option()] = "fashion_cnn",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the new version (per replica).")] = 120.0,
    smoke_test: Annotated[bool, typer.Option("--smoke-test/--no-smoke-test", help="Serve the version alone in a scratch tritonserver and query it once before any live server loads it.")] = True,
) -> None:
    """Load the newest version of MODEL into the running server(s) (explicit model control); the old one serves until the new one is ready."""
    from triton_al.loop.deploy import DeployError, deploy, deploy_fleet

    urls = url or ["127.0.0.1:8001"]
    try:
        if len(urls) == 1:
            version = deploy(urls[0], model_repository, model, timeout, smoke=smoke_test)
        else:
            version = deploy_fleet(urls, model_repository, model, timeout, smoke=smoke_test,
                                   on_replica=lambda u, v: typer.echo(f"{u}: serving {model} version {v}", err=True))
    except DeployError as e:
        _fail(f"triton-al deploy: {e}")
    typer.echo(f"serving {model} version {version}" + (f" on {len(urls)} replicas" if len(urls) > 1 else ""))


def rollback_command(
    model_repository: Repository,
    url: Url = "127.0.0.1:8001",
    model: Annotated[str, typer.Option()] = "fashion_cnn",
) -> None:
    """Go back to the previous version of MODEL (the newest is set aside as rolled-back-<N>)."""
    from triton_al.loop.deploy import DeployError, rollback

    try:
        version = rollback(url, model_repository, model)
    except DeployError as e:
        _fail(f"triton-al rollback: {e}")
    typer.echo(f"serving {model} version {version}")


def report_command(
    store: Annotated[Optional[Path], typer.Option(help="The local project store (cycles, flagged items and labels).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and index.html.")] = Path("triton-al-report"),
    group: Annotated[str, typer.Option()] = "active-learning",
    metrics_url: Annotated[Optional[list[str]], typer.Option("--metrics-url", help="A replica's Triton /metrics URL; repeat it for every replica: the fleet section adds up their step metrics.")] = None,
    prometheus_url: Annotated[Optional[str], typer.Option(help="Or one Prometheus scraping every replica (its base URL): the fleet's sums come from its query API.")] = None,
    prometheus_selector: Annotated[Optional[str], typer.Option(help='Extra label matchers for the Prometheus queries, e.g. namespace="prod".')] = None,
    window: Annotated[float, typer.Option(help="With --prometheus-url: seconds to look back (the increase over that range); 0: the cumulative counters.")] = 0.0,
    step: Annotated[str, typer.Option(help="The step model's name.")] = "active_learning",
) -> None:
    """Plots and an HTML page: metrics across cycles, score histograms per version, flag rate over time; with
    --metrics-url (repeatable) or --prometheus-url, the step's metrics across the fleet."""
    from triton_al.calibrate import CalibrationError, fleet_sum, prometheus_snapshot, scrape_fleet, write_fleet_report

    if metrics_url and prometheus_url:
        _fail("triton-al report: give --metrics-url (one per replica) or --prometheus-url, not both")
    if store is None and not metrics_url and not prometheus_url:
        _fail("triton-al report: give --store, and/or the fleet's --metrics-url (repeatable) or --prometheus-url")
    if window < 0:
        _fail(f"triton-al report: --window {window}: expected seconds >= 0")
    if window and not prometheus_url:
        _fail("triton-al report: --window is the range Prometheus looks back: it needs --prometheus-url")
    if store is not None and not store.is_dir():
        _fail(f"triton-al report: no project store at {store}")
    fleet = None
    try:
        if metrics_url:
            replicas = scrape_fleet(metrics_url, model=step)
            fleet = (replicas, fleet_sum(replicas, source=f"fleet ({len(replicas)} replicas)"))
        elif prometheus_url:
            fleet = ([], prometheus_snapshot(prometheus_url, step, window, prometheus_selector))
    except CalibrationError as e:
        _fail(f"triton-al report: {e}")
    page = out / "index.html"
    if store is not None:
        from triton_al.loop.report import write_report

        page = write_report(store, out, group)
    if fleet is not None:
        section = write_fleet_report(out, *fleet)
        if store is not None:
            text = page.read_text()
            page.write_text(text.replace("</body>", section + "</body>", 1))
        else:
            page.write_text('<!doctype html><html><head><meta charset="utf-8"><title>triton-al fleet report</title>'
                            "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
                            "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
                            f"<h1>Active learning across the fleet</h1>{section}</body></html>")
    typer.echo(f"wrote {page}")


def calibrate_command(
    metrics_url: Annotated[Optional[list[str]], typer.Option("--metrics-url", help="Triton's /metrics URL (the step's score histogram); repeat it for every replica of a fleet: their histograms are added up.")] = None,
    capacity: Annotated[Optional[str], typer.Option(help="Annotation capacity, e.g. 500/day.")] = None,
    flag_rate: Annotated[Optional[float], typer.Option(help="Target share of traffic to flag, in [0, 1].")] = None,
    window: Annotated[float, typer.Option(help="Seconds between two scrapes (traffic rate; needed for --capacity); with --prometheus-url, the range it looks back (no waiting).")] = 60.0,
    step: Annotated[str, typer.Option(help="The step model's name.")] = "active_learning",
    prometheus_url: Annotated[Optional[str], typer.Option(help="Instead of --metrics-url: one Prometheus scraping every replica (its base URL); the fleet's histogram is summed by its query API.")] = None,
    prometheus_selector: Annotated[Optional[str], typer.Option(help='Extra label matchers for the Prometheus queries, e.g. namespace="prod".')] = None,
    apply: Annotated[bool, typer.Option(help="Write the threshold into the step's config.pbtxt and reload it (no restart); one server only.")] = False,
    model_repository: Annotated[Optional[Path], typer.Option("--model-repository", help="Needed with --apply.")] = None,
    url: Url = "127.0.0.1:8001",
    drift_reference: Annotated[Optional[Path], typer.Option(help="Also record the window's scores as the served version's reference for `triton-al drift` in this file, with the flag-rate band half to twice the proposed rate (the version is asked of --url).")] = None,
) -> None:
    """Propose the threshold that flags about CAPACITY items a day (or a flag rate), from the recent scores of one
    server or of a fleet."""
    import time

    from triton_al.calibrate import (CalibrationError, parse_capacity, prometheus_snapshot, propose_fleet,
                                     propose_from_prometheus, scrape_fleet)

    if bool(metrics_url) == bool(prometheus_url):
        _fail("triton-al calibrate: give --metrics-url (repeat it for each replica) or --prometheus-url, exactly one of them")
    if window < 0:
        _fail(f"triton-al calibrate: --window {window}: expected seconds >= 0")
    if apply and (prometheus_url or len(metrics_url or []) > 1):
        _fail("triton-al calibrate: --apply reloads the step of one server; for a fleet, put the proposed threshold "
              "into the step's config.pbtxt of the image every replica runs (deploy/kubernetes/README.md)")
    try:
        per_day = parse_capacity(capacity) if capacity else None
        if prometheus_url:
            snapshot = prometheus_snapshot(prometheus_url, step, window, prometheus_selector)
            proposal = propose_from_prometheus(snapshot, window, capacity_per_day=per_day, flag_rate=flag_rate)
        else:
            before = scrape_fleet(metrics_url, model=step) if window > 0 else None
            if before is not None:
                time.sleep(window)
            after = scrape_fleet(metrics_url, model=step)
            proposal = propose_fleet(before, after, capacity_per_day=per_day, flag_rate=flag_rate)
    except (CalibrationError, OSError) as e:
        _fail(f"triton-al calibrate: {e}")
    body = dict(proposal.__dict__)
    if drift_reference is not None:
        from triton_al.drift import DriftError, default_band, make_reference, save_reference, served_version, window_of

        try:
            scores = window_of(None, [snapshot]) if prometheus_url else window_of(before, after)
            scored_model, version = served_version(url, step)
            ref = make_reference(scores, step, scored_model, version, band=default_band(proposal.flag_rate),
                                 how=f"calibrate, flag rate {proposal.flag_rate:g} proposed")
            save_reference(drift_reference, ref)
        except (DriftError, CalibrationError, OSError) as e:
            _fail(f"triton-al calibrate: the drift reference was not recorded (proposal: {json.dumps(body)}): {e}")
        body["drift_reference"] = ref.key
    if apply:
        if model_repository is None:
            _fail("triton-al calibrate: --apply needs --model-repository")
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from triton_al.attach import set_step_parameter

        try:
            set_step_parameter(model_repository, step, "threshold", f"{proposal.threshold:g}")
            with grpcclient.InferenceServerClient(url) as client:
                client.load_model(step)  # the old settings serve until the new ones are loaded
        except (ValueError, OSError, InferenceServerException) as e:
            _fail(f"triton-al calibrate: could not apply the threshold: {e}")
        body["applied"] = True
    typer.echo(json.dumps(body))


dataset_app = typer.Typer(help="Labelled data for your own training code.", no_args_is_help=True)


@dataset_app.command("export")
def dataset_export_command(
    store: Store,
    out: Annotated[Path, typer.Option(help="Folder of snapshots: OUT/<snapshot>/ and OUT/latest.")],
    format: Annotated[str, typer.Option("--format", help="imagefolder | jsonl | coco.")] = "imagefolder",
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Upload group to export (repeatable; default: all).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line (Triton's label_filename).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of items in the validation split (decided by content hash).")] = 0.1,
) -> None:
    """Write every labelled item as a versioned, content-addressed snapshot (manifest with hashes, class map, split)."""
    from triton_al.loop.dataset import DatasetError, export_dataset, read_class_names
    from triton_al.sinks.local import LocalStore

    try:
        result = export_dataset(LocalStore(store, create=False), out, format, groups=group,
                                class_names=read_class_names(labels), val_fraction=val_fraction)
    except (DatasetError, OSError) as e:
        _fail(f"triton-al dataset export: {e}")
    for problem in result.skipped:
        typer.echo(f"not exported: {problem}", err=True)
    typer.echo(json.dumps({"snapshot": result.snapshot, "path": str(result.path), "items": result.items,
                           "counts": result.counts, "skipped": len(result.skipped), "reused": result.reused}))


labels_app = typer.Typer(help="Annotations made in the sink, brought back into the project store.", no_args_is_help=True)


@labels_app.command("pull")
def labels_pull_command(
    store: Store,
    sink: Annotated[str, typer.Option(help="Where annotators label: s3://…, labelstudio+http://…, nexus://… (see README).")],
    group: Annotated[Optional[list[str]], typer.Option("--group", help="Upload group (repeatable; default: every group of the store).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line: labels given by name are mapped, a label outside them is reported.")] = None,
    fetch: Annotated[bool, typer.Option(help="Bring a labelled item that is not in the store from the sink (S3, Nexus, another local store), checked against its hash.")] = True,
) -> None:
    """Bring the sink's annotations into the store's label files (incremental, idempotent; relabels keep history)."""
    from triton_al.loop.dataset import DatasetError, read_class_names
    from triton_al.loop.labels import LabelsPullError, pull_labels
    from triton_al.sinks import open_sink
    from triton_al.sinks.base import SinkError
    from triton_al.sinks.local import LocalStore

    try:
        local = LocalStore(store, create=False)
    except (FileNotFoundError, NotADirectoryError) as e:
        _fail(f"triton-al labels pull: --store: {e}")
    groups = group or local.groups()
    if not groups:
        _fail(f"triton-al labels pull: the store {local.root} has no upload group yet; name the group(s) to pull with --group")
    try:
        class_names = read_class_names(labels)
        with open_sink(sink) as source:
            result = pull_labels(source, local, groups, class_names=class_names, fetch=fetch)
    except (SinkError, DatasetError, LabelsPullError, ValueError, OSError) as e:
        _fail(f"triton-al labels pull: {e}")
    finally:
        local.close()
    for problem in result.problems:
        typer.echo(f"not taken: {problem}", err=True)
    typer.echo(json.dumps({"new": result.new, "relabelled": result.relabelled, "unchanged": result.unchanged,
                           "fetched": result.fetched, "problems": len(result.problems)}))


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(labels_app, name="labels")
    app.command("annotate")(annotate_command)
    app.command("retrain")(retrain_command)
    app.command("evaluate")(evaluate_command)
    app.command("deploy")(deploy_command)
    app.command("rollback")(rollback_command)
    app.command("report")(report_command)
    app.command("calibrate")(calibrate_command)
