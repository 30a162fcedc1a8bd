"""Load a new model version into the running server, or roll back to the previous one.

Needs explicit model control (`triton-al serve` uses it): Triton loads the newest version
directory while the old one keeps serving, switches when the new one is ready, and
ensembles follow; requests in flight finish on the version that took them. A version that
fails to load leaves the old one serving: deploy says why and renames the directory to
`failed-<N>`, so that a restart does not trip on it. Rollback renames the newest version
to `rolled-back-<N>` and loads the model again. (The names must not start with a digit:
Triton reads `3.failed` as version 3.)
"""

from __future__ import annotations

import time
from pathlib import Path

from triton_al.loop.retrain import versions


class DeployError(RuntimeError):
    pass


def _client(url: str):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def served_versions(url: str, model: str) -> list[int]:
    with _client(url) as c:
        index = c.get_model_repository_index(as_json=True).get("models", [])
    return sorted(int(m["version"]) for m in index if m.get("name") == model and m.get("state") == "READY" and m.get("version"))


def _reason(url: str, model: str, version: int) -> str:
    with _client(url) as c:
        for m in c.get_model_repository_index(as_json=True).get("models", []):
            if m.get("name") == model and m.get("version") == str(version):
                return m.get("reason") or m.get("state", "unknown")
    return "unknown"


def _load(url: str, model: str, expect: int, timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    with _client(url) as c:
        try:
            c.load_model(model, client_timeout=timeout_s)  # some broken versions make Triton hang
        except InferenceServerException as e:
            raise DeployError(e.message()) from None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if c.is_model_ready(model, str(expect)):
                    return
            except InferenceServerException:
                pass
            time.sleep(0.1)
    raise DeployError(f"version {expect} of {model!r} not ready after {timeout_s} s")


def deploy(url: str, repository: Path, model: str, timeout_s: float = 120.0) -> int:
    """Serve the newest version directory of `model`; returns its number."""
    model_dir = Path(repository) / model
    available = versions(model_dir)
    if not available:
        raise DeployError(f"{model_dir}: no version directories")
    newest = available[-1]
    try:
        _load(url, model, newest, timeout_s)
    except DeployError as e:
        reason = _reason(url, model, newest)
        failed = model_dir / f"failed-{newest}"
        if failed.exists():
            failed = model_dir / f"failed-{newest}-{int(time.time())}"
        (model_dir / str(newest)).rename(failed)
        still = served_versions(url, model)
        raise DeployError(
            f"version {newest} of {model!r} did not load: {e} ({reason}); still serving version(s) {still}; "
            f"moved it to {failed}"
        ) from None
    return newest


def rollback(url: str, repository: Path, model: str, timeout_s: float = 120.0) -> int:
    """Stop serving the newest version and serve the one before; returns the version now served."""
    model_dir = Path(repository) / model
    available = versions(model_dir)
    if len(available) < 2:
        raise DeployError(f"{model_dir}: nothing to roll back to (versions {available})")
    newest, previous = available[-1], available[-2]
    aside = model_dir / f"rolled-back-{newest}"
    if aside.exists():
        aside = model_dir / f"rolled-back-{newest}-{int(time.time())}"
    (model_dir / str(newest)).rename(aside)
    try:
        _load(url, model, previous, timeout_s)
    except DeployError:
        aside.rename(model_dir / str(newest))  # leave things as they were
        raise
    return previous
