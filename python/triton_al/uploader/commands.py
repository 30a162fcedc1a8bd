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


def sink_identity(uri: str) -> str:
    """The sink an outbox records it delivers to: the URI (never with credentials: those are
    refused in URIs), a local store by its absolute, resolved path."""
    from triton_al.sinks import sink_scheme

    scheme = sink_scheme(uri)
    if scheme == "local":
        path = uri.split(":", 1)[1] if uri.lower().startswith("local:") else uri
        if path.startswith("//"):
            path = path[2:]
        return f"local:{Path(path).expanduser().resolve()}"
    return uri.strip().rstrip("/")


def check_label_pull_options(sink_uri: str, pull_every: float | None, labels_store: Path | None, labels: Path | None,
                             *, once: bool = False) -> str | None:
    """Why these label-pull options cannot work (naming the flags), or None (`serve` asks too)."""
    from triton_al.uploader.labels import check_options

    return check_options(sink_uri, pull_every, labels_store, labels, once=once)


def lock_path(outbox: Path) -> Path:
    """The `.uploader.lock` of an outbox, beside the real file: a symlink, a relative path
    or `..` in the path name the same lock."""
    real = Path(os.path.realpath(outbox))
    return real.with_name(real.name + ".uploader.lock")


def _single_instance(outbox: Path) -> int:
    """Hold a lock so that two uploaders never drain one outbox (the lock dies with us)."""
    try:
        fd = os.open(lock_path(outbox), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise typer.BadParameter(f"cannot create the lock {lock_path(outbox)} ({e.strerror})", param_hint="--outbox") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise typer.BadParameter(f"another uploader is already draining {outbox} (lock {lock_path(outbox)})", param_hint="--outbox") from None
    return fd


def _maintain(worker) -> None:
    """Apply the bounds once (a `--once` run does not live long enough for the timer)."""
    from triton_al.outbox import OutboxError

    if worker.outbox is None or worker.outbox_error:
        return
    try:
        worker.maintain(force=True)
    except OutboxError as e:
        log.warning("could not apply the outbox bounds: %s", e)


def _parsed(parse, value: str, flag: str):
    try:
        return parse(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def uploader_command(
    outbox: Annotated[Path, typer.Option(help="The outbox file (SQLite) the Triton step appends to.")],
    sink: Annotated[Optional[str], typer.Option(help="Where to upload: local:DIR, s3://bucket/prefix, labelstudio+http://host:port, nexus://project.")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Shorthand for --sink local:DIR (the embedded project store).")] = None,
    forget_deliveries: Annotated[bool, typer.Option(help="When this outbox delivered to another sink: clear its delivery records (the dedup memory) so that this sink gets every image flagged from now on. Without it the uploader refuses to switch sinks.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Items per upload batch.")] = 64,
    batch_max_bytes: Annotated[str, typer.Option(help="Asset bytes per upload batch (e.g. 32MiB); a batch holds at least one item.")] = "32MiB",
    rate_limit: Annotated[Optional[list[str]], typer.Option("--rate-limit", help="GROUP=N/minute (or /hour, /day; comma-separated; '*' for every group). Repeatable.")] = None,
    rate_overflow: Annotated[str, typer.Option(help="Items over a limit or budget: 'keep' them queued or 'drop' them.")] = "keep",
    max_attempts: Annotated[int, typer.Option(min=1, help="Per-item failures before an item is dead-lettered.")] = 20,
    backoff_base: Annotated[float, typer.Option(min=0.001, help="First retry delay (seconds); doubles per failure, with jitter.")] = 0.5,
    backoff_cap: Annotated[float, typer.Option(min=0.001, help="Longest retry delay (seconds).")] = 60.0,
    dead_letter_max_age: Annotated[str, typer.Option(help="Dead letters older than this are deleted (e.g. 14d, 12h).")] = "14d",
    dead_letter_max_count: Annotated[int, typer.Option(min=0, help="Dead letters kept at most (the newest).")] = 10_000,
    dead_letter_max_bytes: Annotated[str, typer.Option(help="Asset bytes dead letters may hold at most (the newest kept); they do not count against the outbox's max_bytes.")] = "256MiB",
    delivered_max_age: Annotated[str, typer.Option(help="How long a delivery is remembered for dedup (never less than the longest rate window).")] = "30d",
    delivered_max_rows: Annotated[int, typer.Option(min=0, help="Delivery records kept at most for dedup (never fewer than the longest rate window needs).")] = 500_000,
    metrics_address: Annotated[str, typer.Option(help="Address for /metrics.")] = "127.0.0.1",
    metrics_port: Annotated[Optional[int], typer.Option(help="Port for /metrics (0: any free port; omit: no metrics server).")] = None,
    admin_address: Annotated[str, typer.Option(help="Address of the gRPC admin API (beyond loopback needs TRITON_AL_ADMIN_TOKEN).")] = "127.0.0.1",
    admin_port: Annotated[Optional[int], typer.Option(help="Port of the gRPC admin API (0: any free port; omit: no admin API).")] = None,
    admin_tls_cert: Annotated[Optional[Path], typer.Option(help="Serve the admin API over TLS with this certificate (PEM; with --admin-tls-key).")] = None,
    admin_tls_key: Annotated[Optional[Path], typer.Option(help="The private key (PEM) of --admin-tls-cert.")] = None,
    admin_require_token: Annotated[bool, typer.Option(help="Require TRITON_AL_ADMIN_TOKEN on every admin call, loopback included (refuse to start without one).")] = False,
    admin_max_flush_seconds: Annotated[float, typer.Option(min=0.001, help="Longest Flush the admin API accepts (seconds); longer ones are refused.")] = 300.0,
    ports_file: Annotated[Optional[Path], typer.Option(help="Write the bound ports as JSON here once listening.")] = None,
    once: Annotated[bool, typer.Option(help="Upload what is queued now, then exit (a cron-style run); exits 1 if --deadline passes first.")] = False,
    deadline: Annotated[float, typer.Option(min=0.001, help="With --once: seconds to wait for a backing-off item or sink before giving up.")] = 60.0,
    log_format: Annotated[str, typer.Option(help="'json' (structured) or 'text'.")] = "json",
    pull_labels_every: Annotated[Optional[float], typer.Option(help="Also bring the annotations made in the sink back every SECONDS (what `triton-al labels pull` does), for the groups this uploader delivers, into --labels-store; a failed pull is logged and counted and never stops uploading.")] = None,
    labels_store: Annotated[Optional[Path], typer.Option(help="With --pull-labels-every: the local project store labels (and the labelled items) are brought into. Needed with a remote sink; with a local sink, another store to copy its labels into.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="With --pull-labels-every: class names, one per line (Triton's label_filename): labels given by name are mapped, a label outside them is reported.")] = None,
    budget_ledger: Annotated[Optional[str], typer.Option(help="redis://HOST:PORT/DB (or rediss://) shared by a fleet of uploaders: --rate-limit budgets hold across the fleet, and replicas claim each item so that one uploads it. While it cannot be reached, the items that need it stay queued (none dropped). Credentials from the environment: $TRITON_AL_LEDGER_PASSWORD, $TRITON_AL_LEDGER_USERNAME (ACL user); with rediss://, $TRITON_AL_LEDGER_CA (private CA) and $TRITON_AL_LEDGER_CERT/$TRITON_AL_LEDGER_KEY (client certificate).")] = None,
    fleet_claims: Annotated[bool, typer.Option(help="With --budget-ledger: claim each item in the ledger before uploading it (one replica uploads an image the fleet flagged several times). Without: only rate-limited groups use the ledger.")] = True,
    fleet_claim_ttl: Annotated[str, typer.Option(help="With --budget-ledger: how long a claim lasts (a replica that dies holding one delays those items this long).")] = "5m",
    fleet_dedup_ttl: Annotated[str, typer.Option(help="With --budget-ledger: how long the ledger remembers that an item was delivered, so that other replicas do not upload it again.")] = "1h",
    near_duplicate_distance: Annotated[Optional[str], typer.Option(help="An image within this many bits (Hamming distance of 256-bit perceptual hashes: the image as it is, and aligned on its centre; the closer counts) of one queued or delivered for the same group is counted as a near-duplicate and not uploaded; 0 or 'off' uploads every image. Default: 20, on (measured: benchmarks/RESULTS.md, Near-duplicates).")] = None,
    near_duplicate_embedding_distance: Annotated[Optional[str], typer.Option(help="When the model stores its embedding with each flagged item (attach --embedding-output): an item whose embedding is within this cosine distance (1 - cos, in (0, 1]) of one queued or delivered for the same group, computed by the same model name and version, is counted as a near-duplicate and not uploaded (OR the hash check: either suffices); 0 or 'off' disables this check. Default: off (measured: the example model's embedding added 0.5 points of recall to the hash's for 4x its false suppression; benchmarks/RESULTS.md).")] = None,
    near_duplicate_max_entries: Annotated[int, typer.Option(min=1, help="Images (hashes and embeddings) the near-duplicate index keeps per group (the oldest evicted); memory: 64 bytes per hash and 4 x D bytes per embedding of D values.")] = 100_000,
    near_duplicate_max_age: Annotated[str, typer.Option(help="How long the near-duplicate index remembers an image (e.g. 30d).")] = "30d",
    near_duplicate_share: Annotated[bool, typer.Option("--near-duplicate-share/--no-near-duplicate-share", help="With --budget-ledger: share the near-duplicate index's entries with the fleet through the ledger (a Redis stream per group), so that a near-copy of an image another replica queued or delivered for the group is not uploaded again. While the ledger does not answer, this replica's index screens alone (nothing is held or dropped for it) and catches up when it answers.")] = True,
    selection: Annotated[str, typer.Option(help="When a group's --rate-limit allows fewer items than it has queued, which go: fifo (the oldest first), uncertainty (the lowest scores first) or diverse (a spread of uncertain images: uncertainty-weighted k-means over small image thumbnails, as many clusters as the budget, each cluster's most central image). Without a binding limit every item goes, oldest first.")] = "fifo",
    selection_pool: Annotated[int, typer.Option(min=1, help="With --selection uncertainty|diverse: the candidates per group (its most uncertain due items) chosen among; bounds the cost of each batch.")] = 2000,
) -> None:
    """Drain the outbox into a sink: retries with backoff, dead letters, rate limits, /metrics, admin API; optionally pull labels back."""
    from triton_al.private import keep_files_private

    keep_files_private()  # the store and logs it writes hold flagged images
    from triton_al.outbox import Outbox, OutboxError, SinkChanged
    from triton_al.sinks import SinkError, open_sink
    from triton_al.uploader.admin import serve_admin
    from triton_al.uploader.limits import parse_duration, parse_limits, parse_size
    from triton_al.uploader.metrics import UploaderMetrics, serve_metrics
    from triton_al.uploader.worker import Backoff, Bounds, Uploader

    setup_logging(log_format)
    if (sink is None) == (store is None):
        raise typer.BadParameter("give exactly one of --sink URI or --store DIR", param_hint="--sink/--store")
    if rate_overflow not in ("keep", "drop"):
        raise typer.BadParameter(f"expected 'keep' or 'drop', got {rate_overflow!r}", param_hint="--rate-overflow")
    try:
        limits = parse_limits(rate_limit or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--rate-limit") from None
    if budget_ledger is not None:
        from triton_al.uploader.ledger import parse_ledger_uri

        try:
            parse_ledger_uri(budget_ledger)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--budget-ledger") from None
    from triton_al.uploader.near_duplicates import parse_distance, parse_embedding_distance

    near_distance = _parsed(parse_distance, near_duplicate_distance, "--near-duplicate-distance")
    near_embedding_distance = _parsed(parse_embedding_distance, near_duplicate_embedding_distance,
                                      "--near-duplicate-embedding-distance")
    from triton_al.uploader.selection import Selector, parse_selection

    selector = Selector(_parsed(parse_selection, selection, "--selection"), pool=selection_pool)
    if selector.active and budget_ledger is not None:
        log.warning("--selection %s applies to this uploader's own --rate-limit budgets: with --budget-ledger "
                    "(fleet budgets) items go first in first out", selector.strategy)
    near_max_age_s = _parsed(parse_duration, near_duplicate_max_age, "--near-duplicate-max-age")
    if near_max_age_s <= 0:
        raise typer.BadParameter("must be positive", param_hint="--near-duplicate-max-age")
    claim_ttl_s = _parsed(parse_duration, fleet_claim_ttl, "--fleet-claim-ttl")
    dedup_ttl_s = _parsed(parse_duration, fleet_dedup_ttl, "--fleet-dedup-ttl")
    if claim_ttl_s <= 0 or dedup_ttl_s <= 0:
        raise typer.BadParameter("must be positive", param_hint="--fleet-claim-ttl/--fleet-dedup-ttl")
    bounds = Bounds(
        dead_letter_max_age_s=_parsed(parse_duration, dead_letter_max_age, "--dead-letter-max-age"),
        dead_letter_max_count=dead_letter_max_count,
        dead_letter_max_bytes=_parsed(parse_size, dead_letter_max_bytes, "--dead-letter-max-bytes"),
        delivered_max_age_s=_parsed(parse_duration, delivered_max_age, "--delivered-max-age"),
        delivered_max_rows=delivered_max_rows,
    )
    if (admin_tls_cert is None) != (admin_tls_key is None):
        typer.echo("triton-al uploader: admin API: TLS needs both --admin-tls-cert and --admin-tls-key", err=True)
        raise typer.Exit(2)
    max_batch_bytes = _parsed(parse_size, batch_max_bytes, "--batch-max-bytes")
    if max_batch_bytes <= 0:
        raise typer.BadParameter("must be positive", param_hint="--batch-max-bytes")
    uri = sink if sink is not None else f"local:{store}"
    try:
        target_id = sink_identity(uri)
        problem = check_label_pull_options(uri, pull_labels_every, labels_store, labels, once=once)
    except ValueError as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    if problem:
        typer.echo(f"triton-al uploader: {problem}", err=True)
        raise typer.Exit(2)
    class_names = None
    if labels is not None:
        from triton_al.loop.dataset import DatasetError, read_class_names

        try:
            class_names = read_class_names(labels)
        except (DatasetError, OSError) as e:
            typer.echo(f"triton-al uploader: --labels {labels}: {e}", err=True)
            raise typer.Exit(2) from None
    lock_fd = _single_instance(outbox)
    try:
        target = open_sink(uri)
    except (SinkError, ValueError, OSError) as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    if pull_labels_every is not None:
        from triton_al.loop.labels import gives_annotations
        from triton_al.sinks.local import LocalStore

        problem = None if gives_annotations(target) else f"--pull-labels-every: {target.describe()} does not give annotations back"
        if problem is None:
            try:
                LocalStore(labels_store).close()  # created now (parents too), or a clear error now
            except (SinkError, OSError) as e:
                problem = f"--labels-store {labels_store}: {e}"
        if problem:
            target.close()
            typer.echo(f"triton-al uploader: {problem}", err=True)
            raise typer.Exit(2)

    def open_outbox() -> Outbox:
        box = Outbox(outbox)
        try:
            box.claim_sink(target_id, forget_deliveries=forget_deliveries)
            box.prepare_for_uploader()
        except BaseException:
            box.close()
            raise
        return box

    first_error: OutboxError | None = None
    try:
        box: Outbox | None = open_outbox()
    except SinkChanged as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    except OutboxError as e:  # reported, then opened again with backoff: the sidecar stays up
        box, first_error = None, e
    worker: Uploader | None = None
    metrics = UploaderMetrics(lambda: worker.outbox if worker is not None and not worker.outbox_error else None)
    fleet = None
    if budget_ledger is not None:  # the budgets are the fleet's, counted in the ledger (not in this outbox)
        from triton_al.uploader.ledger import FleetGate, Ledger, owner_id

        try:
            ledger = Ledger.open(budget_ledger, target_id, owner_id(outbox), claim_ttl_s=claim_ttl_s, done_ttl_s=dedup_ttl_s)
        except ValueError as e:
            target.close()
            typer.echo(f"triton-al uploader: {e}", err=True)
            raise typer.Exit(2) from None
        fleet = FleetGate(ledger, limits, rate_overflow=rate_overflow, claims=fleet_claims, registry=metrics.registry)
        log.info("fleet: %s; budgets %s", fleet.describe(), {g: [str(r) for r in rules] for g, rules in limits.items()} or "none")
        limits = {}
    near = None
    if near_distance or near_embedding_distance:
        import sqlite3

        from triton_al.uploader.near_duplicates import NearDuplicateIndex, index_path

        share = None
        if fleet is not None and near_duplicate_share:
            from triton_al.uploader.near_duplicates_share import ShareCollector, SharedEntries

            share = SharedEntries.for_ledger(fleet.ledger, max_len=near_duplicate_max_entries, ttl_s=near_max_age_s,
                                             defer_exact=fleet_claims)
            metrics.registry.register(ShareCollector(share))
        try:
            near = NearDuplicateIndex(index_path(outbox), max_distance=near_distance, max_entries=near_duplicate_max_entries,
                                      max_age_s=near_max_age_s, sink=target_id, max_embedding_distance=near_embedding_distance,
                                      share=share)
        except (ValueError, OSError, sqlite3.Error) as e:
            target.close()
            typer.echo(f"triton-al uploader: near-duplicate index {index_path(outbox)}: {e}", err=True)
            raise typer.Exit(2) from None
        checks = [f"a hash within {near_distance} bits" if near_distance else "",
                  f"an embedding (same model and version) within cosine distance {near_embedding_distance:g}" if near_embedding_distance else ""]
        log.info("near-duplicates: items with %s of one queued or delivered for the group are not uploaded (index %s%s)",
                 " or ".join(c for c in checks if c), near.path, f"; {share.describe()}" if share is not None else "")
    elif fleet is not None and near_duplicate_share:
        log.info("near-duplicates: both checks off, nothing to share with the fleet")
    worker = Uploader(box, target, batch_size=batch_size, batch_max_bytes=max_batch_bytes, limits=limits, rate_overflow=rate_overflow,
                      max_attempts=max_attempts, backoff=Backoff(base_s=backoff_base, cap_s=backoff_cap), metrics=metrics,
                      bounds=bounds, open_outbox=open_outbox, fleet=fleet, near_duplicates=near, selection=selector)
    if first_error is not None:
        worker._outbox_failed(first_error)
    puller = None
    if pull_labels_every is not None:
        from triton_al.uploader.labels import LabelPuller

        delivering: set[str] = set()

        def pull_groups() -> list[str]:
            """The groups this uploader delivers (remembered while the outbox is unusable)."""
            box = worker.outbox
            if box is not None and not worker.outbox_error:
                try:
                    delivering.update(s.upload_group for s in box.status())
                except OutboxError as e:
                    log.warning("label pull: could not read the groups from the outbox (%s); using the ones known", e)
            return sorted(delivering)

        metrics.enable_label_pulls()
        puller = LabelPuller(lambda: open_sink(uri), labels_store, pull_labels_every, pull_groups, class_names=class_names,
                             metrics=metrics)
    ports: dict[str, int] = {}
    servers = []
    try:
        if metrics_port is not None:
            server, ports["metrics"] = serve_metrics(metrics.registry, metrics_address, metrics_port)
            servers.append(server.shutdown)
        if admin_port is not None:
            grpc_server, ports["admin"] = serve_admin(worker, admin_address, admin_port, tls_cert=admin_tls_cert, tls_key=admin_tls_key,
                                                      require_token=admin_require_token, max_flush_s=admin_max_flush_seconds,
                                                      label_puller=puller)
            servers.append(lambda: grpc_server.stop(grace=1).wait())
    except (ValueError, OSError) as e:
        for stop in servers:
            stop()
        typer.echo(f"triton-al uploader: {e}", err=True)
        raise typer.Exit(2) from None
    if ports_file is not None:
        tmp = ports_file.with_name(ports_file.name + ".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.replace(ports_file)
    log.info("uploader ready: outbox=%s sink=%s ports=%s", outbox, target.describe(), json.dumps(ports))

    def on_signal(signum, _frame):
        # No logging or locks in here (the interrupted thread may hold them): a flag only.
        worker.stop_from_signal()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    if puller is not None:
        puller.start()
        log.info("pulling labels from %s into %s every %g s", target.describe(), labels_store, pull_labels_every)
    try:
        if once:
            _maintain(worker)
            result = worker.flush(timeout_s=deadline)
            _maintain(worker)
            if result.timed_out and not worker.stopping:
                queued = "an unknown number of" if result.still_queued < 0 else str(result.still_queued)
                message = (f"triton-al uploader --once: the deadline ({deadline:g} s, --deadline) passed with {queued} items "
                           f"still queued; delivered {result.uploaded}. Last error: {result.last_error or 'none'}")
                log.error("%s", message)
                typer.echo(message, err=True)
                code = 1
        else:
            worker.run()
        if worker.stopping:
            log.info("stopped by a signal after finishing the batch in flight")
    except SinkChanged as e:
        typer.echo(f"triton-al uploader: {e}", err=True)
        code = 2
    finally:
        if puller is not None:
            puller.stop()
        for stop in servers:
            stop()
        target.close()
        if fleet is not None:
            fleet.ledger.close()
        if near is not None:
            near.close()
        if worker.outbox is not None:
            worker.outbox.close()
        os.close(lock_fd)
    if code:
        raise typer.Exit(code)


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


@outbox_app.command("near-duplicates")
def outbox_near_duplicates(
    outbox: Annotated[Path, typer.Option(help="The outbox file (its index is beside it).")],
    group: Annotated[Optional[str], typer.Option(help="Only this upload group.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Entries listed at most.")] = 100,
) -> None:
    """List the images uploaded whose near-duplicates were not (JSON lines, most seen first)."""
    from triton_al.uploader.near_duplicates import index_path, seen_entries

    try:
        rows = seen_entries(index_path(outbox), group=group, limit=limit)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    for row in rows:
        typer.echo(json.dumps(row))


@outbox_app.command("retry")
def outbox_retry(
    outbox: Annotated[Path, typer.Option(help="The outbox file.")],
    group: Annotated[Optional[str], typer.Option(help="Only this upload group.")] = None,
) -> None:
    """Queue dead letters again."""
    n = _open(outbox).retry_dead_letters(group=group)
    typer.echo(f"requeued {n} dead letters")


@outbox_app.command("purge-dead-letters")
def outbox_purge_dead_letters(
    outbox: Annotated[Path, typer.Option(help="The outbox file.")],
    older_than: Annotated[Optional[str], typer.Option(help="Delete dead letters that failed longer ago than this (e.g. 7d, 12h).")] = None,
    keep: Annotated[Optional[int], typer.Option(min=0, help="Keep only the newest N dead letters.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option(help="Keep only the newest dead letters within this many asset bytes (e.g. 100MiB).")] = None,
    group: Annotated[Optional[str], typer.Option(help="Only this upload group.")] = None,
) -> None:
    """Delete dead letters (and their assets) by age, count or bytes."""
    from triton_al.uploader.limits import parse_duration, parse_size

    if older_than is None and keep is None and max_bytes is None:
        raise typer.BadParameter("give --older-than, --keep or --max-bytes (or several)", param_hint="--older-than/--keep/--max-bytes")
    age = None if older_than is None else _parsed(parse_duration, older_than, "--older-than")
    size = None if max_bytes is None else _parsed(parse_size, max_bytes, "--max-bytes")
    box = _open(outbox)
    n = box.purge_dead_letters(older_than_s=age, keep=keep, max_bytes=size, group=group)
    typer.echo(f"purged {n} dead letters; {len(box.dead_letters(group=group, limit=10**9))} left")


admin_app = typer.Typer(help="Talk to a running uploader's gRPC admin API (token from TRITON_AL_ADMIN_TOKEN).", no_args_is_help=True)
Target = Annotated[str, typer.Option("--address", help="host:port of the admin API.")]


TlsCa = Annotated[Optional[Path], typer.Option("--tls-ca", envvar="TRITON_AL_ADMIN_TLS_CA", help="Talk TLS, trusting this CA certificate (PEM).")]


def _client(address: str, tls_ca: Path | None = None):
    from triton_al.uploader.admin import AdminClient

    try:
        return AdminClient(address, tls_ca=tls_ca)
    except ValueError as e:
        typer.echo(f"triton-al admin: {e}", err=True)
        raise typer.Exit(2) from None


def _rpc(call):
    import grpc

    try:
        return call()
    except grpc.RpcError as e:
        typer.echo(f"triton-al admin: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(1) from None


def _print(message) -> None:
    import inspect

    from google.protobuf.json_format import MessageToJson

    # protobuf 5 renamed the option that prints zero values (tritonclient pins protobuf < 5).
    params = inspect.signature(MessageToJson).parameters
    option = "always_print_fields_with_no_presence" if "always_print_fields_with_no_presence" in params else "including_default_value_fields"
    typer.echo(MessageToJson(message, **{option: True}))


@admin_app.command("status")
def admin_status(address: Target, tls_ca: TlsCa = None) -> None:
    with _client(address, tls_ca) as c:
        _print(_rpc(c.status))


@admin_app.command("pause")
def admin_pause(address: Target, group: Annotated[Optional[list[str]], typer.Option("--group")] = None, tls_ca: TlsCa = None) -> None:
    with _client(address, tls_ca) as c:
        _print(_rpc(lambda: c.pause(group or [])))


@admin_app.command("resume")
def admin_resume(address: Target, group: Annotated[Optional[list[str]], typer.Option("--group")] = None, tls_ca: TlsCa = None) -> None:
    with _client(address, tls_ca) as c:
        _print(_rpc(lambda: c.resume(group or [])))


@admin_app.command("retry")
def admin_retry(address: Target, group: Annotated[str, typer.Option("--group")] = "", tls_ca: TlsCa = None) -> None:
    with _client(address, tls_ca) as c:
        _print(_rpc(lambda: c.retry_dead_letters(group)))


@admin_app.command("flush")
def admin_flush(address: Target, timeout: Annotated[float, typer.Option(help="Seconds to wait (the uploader caps it).")] = 30.0,
                tls_ca: TlsCa = None) -> None:
    with _client(address, tls_ca) as c:
        _print(_rpc(lambda: c.flush(timeout)))


def register(app: typer.Typer) -> None:
    app.command("uploader")(uploader_command)
    app.add_typer(outbox_app, name="outbox")
    app.add_typer(admin_app, name="admin")
