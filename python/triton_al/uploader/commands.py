"""CLI: `triton-al uploader` (the sidecar), `triton-al outbox …` (inspect and repair the
outbox file directly) and `triton-al admin …` (talk to a running uploader)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

log = logging.getLogger("triton_al.uploader")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body)


def setup_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = __import__("time").gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _single_instance(outbox: Path) -> int:
    """Hold a lock so that two uploaders never drain one outbox (the lock dies with us)."""
    fd = os.open(f"{outbox}.uploader.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise typer.BadParameter(f"another uploader is already draining {outbox}", param_hint="--outbox") from None
    return fd


def uploader_command(
    outbox: Annotated[Path, typer.Option(help="The outbox file (SQLite) the Triton step appends to.")],
    sink: Annotated[Optional[str], typer.Option(help="Where to upload: local:DIR, s3://bucket/prefix, labelstudio+http://host:port, nexus://project.")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Shorthand for --sink local:DIR (the embedded project store).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Items per upload batch.")] = 64,
    rate_limit: Annotated[Optional[list[str]], typer.Option("--rate-limit", help="GROUP=N/minute (or /hour, /day; comma-separated; '*' for every group). Repeatable.")] = None,
    rate_overflow: Annotated[str, typer.Option(help="Items over a limit or budget: 'keep' them queued or 'drop' them.")] = "keep",
    max_attempts: Annotated[int, typer.Option(min=1, help="Per-item failures before an item is dead-lettered.")] = 20,
    backoff_base: Annotated[float, typer.Option(min=0.001, help="First retry delay (seconds); doubles per failure, with jitter.")] = 0.5,
    backoff_cap: Annotated[float, typer.Option(min=0.001, help="Longest retry delay (seconds).")] = 60.0,
    metrics_address: Annotated[str, typer.Option(help="Address for /metrics.")] = "127.0.0.1",
    metrics_port: Annotated[Optional[int], typer.Option(help="Port for /metrics (0: any free port; omit: no metrics server).")] = None,
    admin_address: Annotated[str, typer.Option(help="Address of the gRPC admin API (beyond loopback needs TRITON_AL_ADMIN_TOKEN).")] = "127.0.0.1",
    admin_port: Annotated[Optional[int], typer.Option(help="Port of the gRPC admin API (0: any free port; omit: no admin API).")] = None,
    ports_file: Annotated[Optional[Path], typer.Option(help="Write the bound ports as JSON here once listening.")] = None,
    once: Annotated[bool, typer.Option(help="Upload what is due now, then exit (a cron-style run).")] = False,
    log_format: Annotated[str, typer.Option(help="'json' (structured) or 'text'.")] = "json",
) -> None:
    """Drain the outbox into a sink: retries with backoff, dead letters, rate limits, /metrics, admin API."""
    from triton_al.outbox import Outbox, OutboxError
    from triton_al.sinks import SinkError, open_sink
    from triton_al.uploader.admin import serve_admin
    from triton_al.uploader.limits import parse_limits
    from triton_al.uploader.metrics import UploaderMetrics, serve_metrics
    from triton_al.uploader.worker import Backoff, Uploader

    setup_logging(log_format)
    if (sink is None) == (store is None):
        raise typer.BadParameter("give exactly one of --sink URI or --store DIR", param_hint="--sink/--store")
    if rate_overflow not in ("keep", "drop"):
        raise typer.BadParameter(f"expected 'keep' or 'drop', got {rate_overflow!r}", param_hint="--rate-overflow")
    try:
        limits = parse_limits(rate_limit or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--rate-limit") from None
    lock_fd = _single_instance(outbox)
    try:
        box = Outbox(outbox)
        target = open_sink(sink if sink is not None else f"local:{store}")
    except (OutboxError, SinkError, ValueError, OSError) as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    metrics = UploaderMetrics(box)
    worker = Uploader(box, target, batch_size=batch_size, limits=limits, rate_overflow=rate_overflow,
                      max_attempts=max_attempts, backoff=Backoff(base_s=backoff_base, cap_s=backoff_cap), metrics=metrics)
    ports: dict[str, int] = {}
    servers = []
    try:
        if metrics_port is not None:
            server, ports["metrics"] = serve_metrics(metrics.registry, metrics_address, metrics_port)
            servers.append(server.shutdown)
        if admin_port is not None:
            grpc_server, ports["admin"] = serve_admin(worker, admin_address, admin_port)
            servers.append(lambda: grpc_server.stop(grace=1).wait())
    except (ValueError, OSError) as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    if ports_file is not None:
        tmp = ports_file.with_name(ports_file.name + ".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.replace(ports_file)
    log.info("uploader ready: outbox=%s sink=%s ports=%s", box.path, target.describe(), json.dumps(ports))

    def on_signal(signum, _frame):
        # No logging or locks in here (the interrupted thread may hold them): a flag only.
        worker.stop_from_signal()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if once:
            worker.flush(timeout_s=float("inf"))
        else:
            worker.run()
        if worker.stopping:
            log.info("stopped by a signal after finishing the batch in flight")
    finally:
        for stop in servers:
            stop()
        target.close()
        box.close()
        os.close(lock_fd)


outbox_app = typer.Typer(help="Inspect and repair an outbox file (works without a running uploader).", no_args_is_help=True)


def _open(path: Path):
    from triton_al.outbox import Outbox, OutboxError

    if not path.exists():
        typer.echo(f"outbox {path} does not exist", err=True)
        raise typer.Exit(2)
    try:
        return Outbox(path)
    except OutboxError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@outbox_app.command("status")
def outbox_status(outbox: Annotated[Path, typer.Option(help="The outbox file.")]) -> None:
    """Queued, dead-lettered and delivered items per upload group, and the totals."""
    box = _open(outbox)
    body = {"groups": [s.__dict__ for s in box.status()], "counters": box.counters(), "integrity": box.integrity_check()}
    typer.echo(json.dumps(body, indent=1))


@outbox_app.command("dead-letters")
def outbox_dead_letters(
    outbox: Annotated[Path, typer.Option(help="The outbox file.")],
    group: Annotated[Optional[str], typer.Option(help="Only this upload group.")] = None,
) -> None:
    """List dead letters with the sink's reason."""
    for row in _open(outbox).dead_letters(group=group):
        typer.echo(json.dumps(row))


@outbox_app.command("retry")
def outbox_retry(
    outbox: Annotated[Path, typer.Option(help="The outbox file.")],
    group: Annotated[Optional[str], typer.Option(help="Only this upload group.")] = None,
) -> None:
    """Queue dead letters again."""
    n = _open(outbox).retry_dead_letters(group=group)
    typer.echo(f"requeued {n} dead letters")


admin_app = typer.Typer(help="Talk to a running uploader's gRPC admin API (token from TRITON_AL_ADMIN_TOKEN).", no_args_is_help=True)
Target = Annotated[str, typer.Option("--address", help="host:port of the admin API.")]


def _client(address: str):
    from triton_al.uploader.admin import AdminClient

    return AdminClient(address)


def _print(message) -> None:
    import inspect

    from google.protobuf.json_format import MessageToJson

    # protobuf 5 renamed the option that prints zero values (tritonclient pins protobuf < 5).
    params = inspect.signature(MessageToJson).parameters
    option = "always_print_fields_with_no_presence" if "always_print_fields_with_no_presence" in params else "including_default_value_fields"
    typer.echo(MessageToJson(message, **{option: True}))


@admin_app.command("status")
def admin_status(address: Target) -> None:
    with _client(address) as c:
        _print(c.status())


@admin_app.command("pause")
def admin_pause(address: Target, group: Annotated[Optional[list[str]], typer.Option("--group")] = None) -> None:
    with _client(address) as c:
        _print(c.pause(group or []))


@admin_app.command("resume")
def admin_resume(address: Target, group: Annotated[Optional[list[str]], typer.Option("--group")] = None) -> None:
    with _client(address) as c:
        _print(c.resume(group or []))


@admin_app.command("retry")
def admin_retry(address: Target, group: Annotated[str, typer.Option("--group")] = "") -> None:
    with _client(address) as c:
        _print(c.retry_dead_letters(group))


@admin_app.command("flush")
def admin_flush(address: Target, timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 30.0) -> None:
    with _client(address) as c:
        _print(c.flush(timeout))


def register(app: typer.Typer) -> None:
    app.command("uploader")(uploader_command)
    app.add_typer(outbox_app, name="outbox")
    app.add_typer(admin_app, name="admin")
