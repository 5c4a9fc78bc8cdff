"""The DVC `compare` stage in a copy of the repo: with no baseline it writes a note and passes; with
`baseline_rev: HEAD` after the data got worse (bad_fraction 0.1 -> 0.2) it reports what changed against the
committed data (read through DVC at that revision) and stops `dvc repro` on the gate."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.repo_helpers import repo_copy
from tests.warm import cli_env

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]


def _run(cmd, cwd, env=None, ok=True):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _set(repo: Path, **compare) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["compare"].update(compare)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_compare_stage_notes_a_missing_baseline_and_gates_on_the_committed_data(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synth"].update(samples=200, shard_size=100, bad_fraction=0.1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = cli_env()
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo, env)

    out = _run(["dvc", "repro", "compare"], repo, env).stdout
    assert "Running stage 'filter'" in out and "Running stage 'compare'" in out
    note = json.loads((repo / "data" / "compare" / "compare.json").read_text())
    assert note["baseline"] is None and note["gate"]["passed"] is True
    assert "No baseline configured" in (repo / "data" / "compare" / "compare.md").read_text()
    _run([*GIT, "add", "-A"], repo)
    _run([*GIT, "commit", "-qm", "data v1"], repo)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synth"]["bad_fraction"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _set(repo, baseline_rev="HEAD")
    res = _run(["dvc", "repro", "compare"], repo, env, ok=False)
    assert res.returncode != 0, res.stdout
    assert "gate failed" in res.stderr and "reject rate" in res.stderr
    diff = json.loads((repo / "data" / "compare" / "compare.json").read_text())
    assert diff["old"] == "data/filtered@HEAD" and diff["new"] == "data/filtered"
    assert diff["gate"]["passed"] is False
    old_n, new_n = diff["counts"]["n_rejected"]["old"], diff["counts"]["n_rejected"]["new"]
    assert new_n > old_n  # twice the planted defects
