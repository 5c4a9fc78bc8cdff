"""The committed dvc.lock is the record of the code it is committed with.

`dvc status` compares every stage's recorded dependency hashes (code, params) with the working tree. In a
clean checkout the data outputs are absent (reported as deleted, which is expected); any *code or params*
dependency reported as modified means dvc.lock was committed stale, so a fresh `make demo` would rerun
those stages and rewrite it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stale_dependencies(status: dict) -> dict[str, list[str]]:
    """stage -> the non-data dependencies (and commands) `dvc status --json` reports as changed."""
    out: dict[str, list[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if entry == "changed command":
                out.setdefault(stage, []).append("command")
            elif isinstance(entry, dict):
                for path, state in entry.get("changed deps", {}).items():
                    if not path.startswith("data/"):
                        out.setdefault(stage, []).append(f"{path}: {state}")
    return out


def test_committed_lock_matches_the_code_and_params():
    dvc = Path(sys.executable).parent / "dvc"
    res = subprocess.run([str(dvc), "status", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stale = stale_dependencies(json.loads(res.stdout or "{}"))
    assert not stale, f"dvc.lock is stale (run `make demo` and commit dvc.lock): {stale}"


def test_stale_entries_are_recognised():
    status = {"synth": [{"changed outs": {"data/synth": "deleted"}}],
              "filter": [{"changed deps": {"data/synth": "deleted", "components/data/filter.py": "modified"}}],
              "evaluate": ["changed command", {"changed deps": {"params.yaml": {"eval": "modified"}}}]}
    assert stale_dependencies(status) == {"filter": ["components/data/filter.py: modified"],
                                          "evaluate": ["command", "params.yaml: {'eval': 'modified'}"]}
