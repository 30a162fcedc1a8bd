"""Starting and stopping tritonserver: readiness against a deadline with the log tail on
failure, stop by PID including the backend processes, and `triton-al serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from triton_helpers import ROOT, copy_repository, fashion_pngs, grpcclient, infer_al

from triton_al.serving.server import ServerError, TritonServer, find_tritonserver


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_model_that_fails_to_import_is_reported_with_the_log_tail(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('model.py exploded on import')\n")
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    server = TritonServer(repo, log_path=tmp_path / "triton.log", startup_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="model.py exploded on import"):
        server.start()
    assert time.monotonic() - t0 < 60
    assert not alive(server.pid)


def test_a_hanging_start_is_cut_off_at_the_deadline(tmp_path):
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)  # no model.py: some builds wait forever on this
    (repo / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    server = TritonServer(repo, log_path=tmp_path / "triton.log", startup_timeout_s=8)
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"not ready after 8 s") as e:  # the wheel's 2.51 hangs here
        server.start()
    assert 7.5 < time.monotonic() - started < 20
    assert "log tail" in str(e.value) and "pinned_memory_manager" in str(e.value)
    assert not alive(server.pid)


def test_a_server_that_exits_at_start_is_reported_at_once_with_its_log(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "triton.log", startup_timeout_s=60, extra_args=["--no-such-flag"])
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"exited with code 1 before becoming ready; log tail:") as e:
        server.start()
    assert time.monotonic() - started < 10  # not the 60 s deadline
    assert "--strict-model-config" in str(e.value)  # the usage text tritonserver printed


def test_stop_clears_the_backend_processes_even_after_a_sigkill(tmp_path):
    repo = copy_repository(tmp_path)
    server = TritonServer(repo, log_path=tmp_path / "t.log", env={"TRITON_AL_OUTBOX": str(tmp_path / "o.db")})
    with server:
        stubs = server.stub_pids()
        assert len(stubs) == 2  # preprocess and fashion_cnn (the example's step is native: no stub)
        os.kill(server.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not alive(server.pid)
    assert not [p for p in stubs if alive(p)], "stub processes outlived the server"


def test_a_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="is not an executable file"):
        find_tritonserver(tmp_path / "nope")
    with pytest.raises(ServerError, match="not a directory"):
        TritonServer(tmp_path / "no-repository")


def test_serve_command_runs_triton_and_the_uploader_and_stops_on_sigterm(tmp_path):
    repo = copy_repository(tmp_path)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "triton_al.cli", "serve", "--model-repository", str(repo),
                             "--data-dir", str(tmp_path / "data"), "--quiet"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        info = None
        while info is None:
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            for line in Path(log.name).read_text().splitlines():
                if line.startswith("serving: "):
                    info = json.loads(line.removeprefix("serving: "))
            time.sleep(0.1)
        with grpcclient.InferenceServerClient(info["grpc"]) as c:
            _, score, _ = infer_al(c, fashion_pngs(4)[0])
        assert score.shape == (4,)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not alive(info["tritonserver_pid"])
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_server_sees_no_secrets_of_ours_and_logs_privately(tmp_path, monkeypatch):
    """Sink credentials and the admin token stay with the uploader: tritonserver and its
    Python-backend stubs get only what running needs."""
    from triton_al.serving.server import passed_environment

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "ls-secret")
    monkeypatch.setenv("TRITON_AL_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("DATATURE_SECRET_KEY", "nexus-secret")
    monkeypatch.setenv("TRITON_AL_SIMD", "portable")
    env = passed_environment(dict(os.environ))
    assert "TRITON_AL_SIMD" in env and "PATH" in env
    assert not {k for k, v in env.items() if v.endswith("-secret")}
    repo = copy_repository(tmp_path)
    server = TritonServer(repo, env={"TRITON_AL_OUTBOX": str(tmp_path / "o.db")})
    with server:
        seen = (Path("/proc") / str(server.pid) / "environ").read_bytes().decode(errors="replace")
        for stub in server.stub_pids():
            seen += (Path("/proc") / str(stub) / "environ").read_bytes().decode(errors="replace")
        assert "-secret" not in seen and "TRITON_AL_OUTBOX=" in seen
        assert oct(server.log_path.stat().st_mode & 0o777) == "0o600"
        assert oct(server.log_path.parent.stat().st_mode & 0o777) == "0o700"  # a private folder, not /tmp itself
