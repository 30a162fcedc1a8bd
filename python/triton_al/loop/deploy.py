"""Load a new model version into the running server, or roll back to the previous one.

Before any live server is asked to load it, the version is served alone in a scratch
tritonserver and sent one request (the smoke test `retrain` uses): a version that does
not load is set aside without touching the live servers. This matters beyond the error
message: some broken versions leave Triton's load hanging, and the model then stays
LOADING on that server, so that every later load of it hangs too until the server
restarts (seen with Triton 2.51's Python backend when a version folder lacks its
model.py: the stub fails to preinitialize and the load never returns).

Needs explicit model control (`triton-al serve` uses it): Triton loads the newest version
directory while the old one keeps serving, switches when the new one is ready, and
ensembles follow; requests in flight finish on the version that took them. A version that
fails to load leaves the old one serving: deploy says why and renames the directory to
`failed-<N>`, so that a restart does not trip on it. Rollback renames the newest version
to `rolled-back-<N>` and loads the model again. (The names must not start with a digit:
Triton reads `3.failed` as version 3.)

A fleet whose replicas read one repository (a shared volume) is rolled replica by replica
(`deploy_fleet`): the version is loaded on one replica, and only once it is ready there on
the next; every replica keeps serving throughout (each switches as one server does). If
it fails on any replica, the version is set aside and the replicas that had switched
are put back on the version they served, so the fleet never ends up split.
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


def _set_aside(model_dir: Path, version: int) -> Path:
    failed = model_dir / f"failed-{version}"
    if failed.exists():
        failed = model_dir / f"failed-{version}-{int(time.time())}"
    (model_dir / str(version)).rename(failed)
    return failed


def _newest_checked(model_dir: Path, timeout_s: float, smoke: bool) -> tuple[list[int], int]:
    """The version directories and the newest, smoke-tested in a scratch server first."""
    available = versions(model_dir)
    if not available:
        raise DeployError(f"{model_dir}: no version directories")
    newest = available[-1]
    if smoke:
        from triton_al.loop.smoke import SmokeTestError, smoke_test

        try:
            smoke_test(model_dir, model_dir / str(newest), newest, timeout_s=timeout_s)
        except SmokeTestError as e:
            failed = _set_aside(model_dir, newest)
            raise DeployError(f"{e}\nno live server was touched; moved it to {failed}") from None
    return available, newest


def deploy(url: str, repository: Path, model: str, timeout_s: float = 120.0, *, smoke: bool = True) -> int:
    """Serve the newest version directory of `model`; returns its number."""
    model_dir = Path(repository) / model
    _, newest = _newest_checked(model_dir, timeout_s, smoke)
    try:
        _load(url, model, newest, timeout_s)
    except DeployError as e:
        reason = _reason(url, model, newest)
        failed = _set_aside(model_dir, newest)
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


def deploy_fleet(urls: list[str], repository: Path, model: str, timeout_s: float = 120.0,
                 on_replica=None, *, smoke: bool = True) -> int:
    """Roll the newest version of `model` over every replica in `urls`, one at a time;
    returns its number. `on_replica(url, version)` is called after each replica switched."""
    if len(set(urls)) != len(urls):
        raise DeployError(f"a replica is named twice in {urls}")
    model_dir = Path(repository) / model
    before = {}
    for url in urls:
        try:
            before[url] = served_versions(url, model)
        except Exception as e:  # noqa: BLE001 - any client error: the replica cannot be reached
            raise DeployError(f"replica {url} does not answer ({e}); nothing was changed") from None
    available, newest = _newest_checked(model_dir, timeout_s, smoke)
    done: list[str] = []
    for url in urls:
        try:
            _load(url, model, newest, timeout_s)
        except DeployError as e:
            reason = _reason(url, model, newest)
            failed = _set_aside(model_dir, newest)
            restored = []
            for back in [*done, url]:
                try:  # the directory is gone: loading again serves the previous version
                    _load(back, model, max(before[back]) if before[back] else available[-2], timeout_s)
                    restored.append(back)
                except (DeployError, IndexError) as again:
                    raise DeployError(f"version {newest} of {model!r} did not load on {url}: {e} ({reason}); moved it to "
                                      f"{failed}; putting {back} back failed too: {again}") from None
            raise DeployError(
                f"version {newest} of {model!r} did not load on {url}: {e} ({reason}); moved it to {failed}; "
                f"replicas {restored} serve {sorted({v for b in restored for v in before[b]})} again") from None
        done.append(url)
        if on_replica is not None:
            on_replica(url, newest)
    return newest
