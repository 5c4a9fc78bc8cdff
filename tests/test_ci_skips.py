"""Under CI=true a test that skips for a missing tool fails the run, naming the tool (tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_fails_naming_kubectl_when_it_is_missing(tmp_path):
    env = {**os.environ, "CI": "true", "PATH": str(tmp_path)}  # an empty PATH: no kubectl anywhere
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_k8s.py", "-k",
           "test_namespace_and_storage"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:]
    assert "CI=true: skip not allowed: tests/test_k8s.py::test_namespace_and_storage: kubectl" in res.stdout
    assert "skipped: 1 (0 allowed" in res.stdout
