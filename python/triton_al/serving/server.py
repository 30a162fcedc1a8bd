"""Start and stop a real `tritonserver`.

Where the binary comes from, in order: a path given by the caller, `$TRITON_AL_TRITONSERVER`,
the `nvidia-pytriton` wheel in this environment (a CPU-capable build with the Python
backend), or `tritonserver` on PATH (NVIDIA's containers, `/opt/tritonserver/bin`).

The server is given a backend directory holding both faces of the active_learning step: the
native backend (`active_learning/libtriton_active_learning.so`, built from `rust/backend`)
and, for the Python step and the example's Python models, the Python backend.

The wheel's layout needs three things done for it (see DESIGN.md, "running Triton here"):
its Python backend folder has no stub, so the backend is assembled in a cache folder with
the stub for this Python; the stub runs the `python3` it finds on PATH, so this
environment's `bin/` goes first; and the interpreter's LIBDIR and the wheel's bundled
libraries go on LD_LIBRARY_PATH.

The server binds 127.0.0.1 on free (or given) ports, runs in its own process group, logs to
a file, and is waited for against a deadline, since some broken repositories make it hang
without ever becoming ready. `stop()` sends SIGTERM to its PID, then SIGKILL, then clears
its process group (the Python-backend stubs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from triton_al.private import umask_setting

ControlMode = Literal["none", "poll", "explicit"]
BINARY_ENV = "TRITON_AL_TRITONSERVER"
NATIVE_BACKEND_ENV = "TRITON_AL_NATIVE_BACKEND"
NATIVE_BACKEND_FILE = "libtriton_active_learning.so"
# Flags every start uses: CPU-only friendly and nothing bound beyond loopback.
CPU_FLAGS = ("--disable-auto-complete-config", "--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false")


class ServerError(RuntimeError):
    """tritonserver could not be found, started, or made ready; the message says why."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1. The sockets are held until all are chosen: one
    bound and closed at a time, the kernel may hand the same port out twice (seen: gRPC and
    HTTP given one port, and tritonserver refusing to start)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> Path:
    candidates = []
    if binary is not None:
        candidates.append(("--tritonserver", Path(binary)))
    elif os.environ.get(BINARY_ENV):
        candidates.append((BINARY_ENV, Path(os.environ[BINARY_ENV])))
    else:
        root = _pytriton_root()
        if root is not None:
            candidates.append(("nvidia-pytriton wheel", root / "bin" / "tritonserver"))
        on_path = shutil.which("tritonserver") or ("/opt/tritonserver/bin/tritonserver" if Path("/opt/tritonserver/bin/tritonserver").exists() else None)
        if on_path:
            candidates.append(("PATH", Path(on_path)))
    for source, path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
        if binary is not None or source == BINARY_ENV:
            raise ServerError(f"tritonserver from {source}: {path} is not an executable file")
    raise ServerError(
        "tritonserver not found: install the nvidia-pytriton wheel (pip install nvidia-pytriton==0.7.0), "
        f"put tritonserver on PATH, or set {BINARY_ENV} to its path"
    )


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "triton-al"


def python_backend_dir(server_root: Path) -> Path:
    """A backend directory whose `python/` holds the wheel's Python backend plus the stub
    for this interpreter (copied once per wheel and Python version into the cache)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    source = server_root / "backends" / "python"
    if not stub.exists():
        raise ServerError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version} ({stub})")
    key = hashlib.sha256(f"{server_root.resolve()}|{version}|{stub.stat().st_size}|{stub.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_dir() / "backends" / key
    if not (target / "python" / "triton_python_backend_stub").exists():
        tmp = target.with_name(f"{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)  # atomic: another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def native_backend_library() -> Path | None:
    """The native step's shared library: `$TRITON_AL_NATIVE_BACKEND`, or the one built into
    this package (`triton_al/native/`, by `scripts/bootstrap.sh` or the wheel build)."""
    if os.environ.get(NATIVE_BACKEND_ENV):
        path = Path(os.environ[NATIVE_BACKEND_ENV])
        if not path.is_file():
            raise ServerError(f"{NATIVE_BACKEND_ENV}={path}: no such file")
        return path
    packaged = Path(__file__).resolve().parents[1] / "native" / NATIVE_BACKEND_FILE
    return packaged if packaged.is_file() else None


def backend_dir(server_root: Path | None) -> Path | None:
    """A backend directory with `python/` (the wheel's, prepared; only with the wheel's
    server) and `active_learning/` (the native step, when built); None when neither applies
    (a server in NVIDIA's container keeps its own /opt/tritonserver/backends, where the
    README says to install the native step)."""
    native = native_backend_library()
    python = python_backend_dir(server_root) if server_root is not None else None
    if python is None:
        return None
    if native is None:
        return python
    digest = hashlib.sha256(native.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / "backends" / f"{python.name}-native-{digest}"
    if not (target / "active_learning" / NATIVE_BACKEND_FILE).exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "active_learning").mkdir(parents=True)
        (tmp / "python").symlink_to(python / "python")
        # A copy, not a link: a rebuild must not change the library under a running server.
        shutil.copy2(native, tmp / "active_learning" / NATIVE_BACKEND_FILE)
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# What tritonserver and its Python-backend stubs get of our environment: what running needs
# (paths, locale, temp dirs, threads, GPU selection, this project's step settings) and not
# the uploader's sink credentials or the admin token. Anything else goes through `env=`.
_PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
               "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
_PASSED_PREFIXES = ("LC_", "TRITON_AL_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "XDG_")
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def passed_environment(environ: dict[str, str]) -> dict[str, str]:
    """The part of `environ` a server may see (see `_PASSED_ENV`)."""

    def passed(name: str) -> bool:
        if any(word in name.upper() for word in _SECRET_WORDS):
            return False
        return name in _PASSED_ENV or name.startswith(_PASSED_PREFIXES)

    return {k: v for k, v in environ.items() if passed(k)}


def server_environment(server_root: Path | None, base: dict[str, str] | None = None) -> dict[str, str]:
    env = passed_environment(dict(os.environ if base is None else base))
    # The stub runs the first python3 on PATH: make it this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if server_root is not None:
        libs.append(str(server_root.parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


@dataclass(frozen=True)
class Ports:
    grpc: int
    http: int
    metrics: int


class TritonServer:
    """One tritonserver process. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        model_control_mode: ControlMode = "none",
        load_models: tuple[str, ...] | list[str] = (),
        repository_poll_secs: int = 2,
        log_path: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        console: bool = False,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 60.0,
        extra_args: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} is not a directory")
        if model_control_mode not in ("none", "poll", "explicit"):
            raise ServerError(f"model_control_mode: expected none, poll or explicit, got {model_control_mode!r}")
        self.binary = find_tritonserver(binary)
        chosen = iter(free_ports(3))
        self.ports = Ports(grpc_port or next(chosen), http_port or next(chosen), metrics_port or next(chosen))
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.repository_poll_secs = repository_poll_secs
        if log_path is None:  # a private folder: a fixed name in /tmp could be someone's symlink
            log_path = Path(tempfile.mkdtemp(prefix="triton-al-")) / "tritonserver.log"
        self.log_path = Path(log_path)
        self.log_verbose = log_verbose
        self.console = console
        self.extra_env = env or {}
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._console_thread: threading.Thread | None = None

    # Addresses -----------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        server_root = self.binary.parent.parent
        args = [str(self.binary), f"--model-repository={self.model_repository}"]
        if _pytriton_root() is not None and server_root.resolve() == _pytriton_root().resolve():
            args.append(f"--backend-directory={backend_dir(server_root)}")
        args += [
            "--grpc-address=127.0.0.1", f"--grpc-port={self.ports.grpc}",
            "--http-address=127.0.0.1", f"--http-port={self.ports.http}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.ports.metrics}",
            f"--model-control-mode={self.model_control_mode}", f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=5", *CPU_FLAGS,
        ]
        if self.model_control_mode == "poll":
            args.append(f"--repository-poll-secs={self.repository_poll_secs}")
        args += [f"--load-model={m}" for m in self.load_models]
        return args + self.extra_args

    # Lifecycle -----------------------------------------------------------------------

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("already started")
        server_root = self.binary.parent.parent
        env = server_environment(server_root if _pytriton_root() else None)
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Private (the log may name flagged items), and never through a symlink planted there.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._log_file = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # its own process group: stop() can clear the stubs too
            umask=umask_setting(),  # what it creates (an outbox) holds flagged images: owner only
        )
        if self.console:
            self._console_thread = threading.Thread(target=self._follow_log, daemon=True)
            self._console_thread.start()
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _follow_log(self) -> None:
        with open(self.log_path, "rb") as f:
            while self.process is not None and self.process.poll() is None:
                line = f.readline()
                if line:
                    sys.stderr.write("[tritonserver] " + line.decode(errors="replace"))
                else:
                    time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _http(self, path: str, method: str = "GET", timeout: float = 2.0) -> int:
        request = urllib.request.Request(self.http_url + path, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0

    def is_ready(self) -> bool:
        return self._http("/v2/health/ready") == 200

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(f"tritonserver exited with code {code} before becoming ready; log tail:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s (pid {self.pid}); log tail:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL; then clear the process group. Safe to call twice."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a killed server
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Models --------------------------------------------------------------------------

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def load_model(self, name: str, config: str | None = None, timeout_s: float = 120.0) -> None:
        """Load (or reload) a model in explicit mode; raises ServerError with Triton's reason."""
        from tritonclient.utils import InferenceServerException

        with self.client() as c:
            try:
                c.load_model(name, config=config, client_timeout=timeout_s)
            except InferenceServerException as e:
                raise ServerError(f"loading model {name!r} failed: {e.message()}") from None

    def unload_model(self, name: str) -> None:
        with self.client() as c:
            c.unload_model(name)

    def wait_model_ready(self, name: str, version: str = "", timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                try:
                    if c.is_model_ready(name, version):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.1)
        raise ServerError(f"model {name!r} version {version or 'latest'} not ready after {timeout_s} s; log tail:\n{self.log_tail()}")

    def model_states(self) -> list[dict]:
        """Triton's repository index: name, version, state and reason per model version."""
        with self.client() as c:
            index = c.get_model_repository_index(as_json=True)
        return index.get("models", [])

    def stub_pids(self) -> list[int]:
        """PIDs of the Python-backend stub processes (children of the server), from /proc."""
        if self.pid is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.pid:
                pids.append(int(entry.name))
        return pids
