"""Under CI=true a skipped test fails the run (tests/conftest.py): a missing extra must not
silently drop tests while CI stays green."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_fine():\n    pass\n"
        "def test_needs_an_extra():\n    pytest.importorskip('a_package_that_is_not_installed')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_a_skip_fails_the_run_under_ci(tmp_path):
    r = run(tmp_path, "true")
    assert r.returncode == 1, r.stdout
    assert "skips are failures under CI=true" in r.stdout and "test_needs_an_extra" in r.stdout


def test_outside_ci_a_skip_is_only_reported(tmp_path):
    assert run(tmp_path, None).returncode == 0
