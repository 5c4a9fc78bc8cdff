"""The local ablation driver end to end: `fusedit ablate run` on a 2-variant toy grid in a git copy of the repo
(real `dvc exp run --queue`, the real DAG at a few steps), then `dvc exp show`, the runs directory and the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.repo_helpers import repo_copy
from tests.warm import FUSEDIT, cli_env

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]


def _run(cmd, cwd, env, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


TOY2 = {
    "name": "mini", "base": "tiny", "reference": "deep", "seeds": [7],
    "data": {"synth": {"samples": 48, "shard_size": 24}},
    "stages": {"base": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "save_every": 3, "log_every": 1,
                        "sample_every": 3},
               "joint": {"steps": 2, "batch_size": 4, "save_every": 2, "log_every": 1}},
    "eval": {"steps": 2, "batch_size": 8, "synthetic_per_category": 1, "images_per_prompt": 1},  # params.yaml: 4
    "variants": [{"name": "deep"}, {"name": "no-temb", "overrides": {"model.timestep_conditioning": "none"}}],
}


@pytest.mark.slow
def test_toy_grid_of_two_variants_runs_end_to_end(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    (repo / "ablations" / "mini.yaml").write_text(yaml.safe_dump(TOY2, sort_keys=False))
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run([*GIT, "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "copy"], repo, env)

    out = _run([FUSEDIT, "ablate", "run", "ablations/mini.yaml"], repo, env)
    assert "queued 2 experiments: mini-deep, mini-no-temb" in out
    assert "deep: collected" in out and "no-temb: collected" in out

    shown = json.loads(_run(["dvc", "exp", "show", "--json", "--no-pager"], repo, env))
    exps = {e["name"]: e["revs"][0]["data"] for c in shown for e in (c.get("experiments") or [])}
    assert set(exps) == {"mini-deep", "mini-no-temb"}
    params = {n: d["params"]["params.yaml"]["data"] for n, d in exps.items()}
    assert json.loads(params["mini-no-temb"]["model"]["overrides"]) == {"timestep_conditioning": "none"}
    assert params["mini-no-temb"]["model"]["cache_overrides"] == "{}"  # the features are the same as deep's
    assert params["mini-deep"]["train"]["stages"][0]["steps"] == 3 and params["mini-deep"]["train"]["seed"] == 7
    assert all("data/eval/metrics.json" in d["metrics"] for d in exps.values())

    runs = repo / "data" / "ablations" / "mini"
    for name in ("deep", "no-temb"):
        rec = json.loads((runs / name / "run.json").read_text())
        assert rec["variant"] == name and rec["seed"] == 7 and rec["trainable_params"] > 0
        assert json.loads((runs / name / "train" / "base" / "metrics.json").read_text())["steps"] == 3
        assert (runs / name / "train" / "base" / "loss.tsv").read_text().startswith("step\tloss")
        assert len(list((runs / name / "eval" / "samples" / "synthetic").glob("*/*.png"))) == 6
    deep, no_temb = (json.loads((runs / n / "run.json").read_text())["trainable_params"] for n in ("deep", "no-temb"))
    assert no_temb < deep  # no timestep embedding, no AdaLN modulation
    doc = json.loads((runs / "report" / "ablation.json").read_text())
    assert doc["reference"] == "deep" and list(doc["variants"]) == ["deep", "no-temb"]
    assert "synthetic/overall" in doc["variants"]["no-temb"]["delta"]
    assert "train/base/final_loss" in doc["metrics"]
    # the filtered data and (same features) the cache are shared: the second experiment restored them from the
    # run cache, and trained with its own overrides
    lock = {n: yaml.safe_load(subprocess.run(["git", "show", f"{d['rev']}:dvc.lock"], cwd=repo, capture_output=True,
                                             text=True, check=True).stdout) for n, d in exps.items()}
    for stage in ("filter", "cache"):
        assert lock["mini-deep"]["stages"][stage]["outs"] == lock["mini-no-temb"]["stages"][stage]["outs"]
    assert "--set 'model={\"timestep_conditioning\": \"none\"}'" in lock["mini-no-temb"]["stages"]["train@0"]["cmd"]
    assert lock["mini-deep"]["stages"]["train@0"]["outs"] != lock["mini-no-temb"]["stages"]["train@0"]["outs"]
    # a commit made after the grid (as during a long one) does not hide its experiments from `collect`
    first = _run(["git", "rev-parse", "HEAD"], repo, env).strip()
    (repo / "NOTES.md").write_text("a later commit\n")
    _run([*GIT, "add", "NOTES.md"], repo, env)
    _run([*GIT, "commit", "-qm", "later"], repo, env)
    out = _run([FUSEDIT, "ablate", "collect", "ablations/mini.yaml"], repo, env)
    assert "deep: collected" in out and "no-temb: collected" in out
    assert json.loads((runs / "deep" / "run.json").read_text())["baseline"] == first
    # run again: the finished grid is not replaced by accident, and --resume keeps it (nothing re-trained)
    res = subprocess.run([FUSEDIT, "ablate", "run", "ablations/mini.yaml"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "mini-deep, mini-no-temb" in res.stderr and "--resume" in res.stderr
    out = _run([FUSEDIT, "ablate", "run", "ablations/mini.yaml", "--resume"], repo, env)
    assert "queued 0 experiments" in out and "deep: collected" in out and "no-temb: collected" in out


@pytest.mark.parametrize("state, force, resume, removed, queued", [
    ("failed", False, True, ["mini-no-temb"], ["mini-no-temb"]),  # finished kept, failed replaced
    ("queued", False, True, [], []),  # still in the queue: left to the queue
    ("failed", True, False, ["mini-deep", "mini-no-temb"], ["mini-deep", "mini-no-temb"]),
])
def test_resume_keeps_finished_runs_and_replaces_failed_ones(monkeypatch, state, force, resume, removed, queued):
    """The queueing decision alone (the end-to-end test above runs `--resume` on a finished grid): the
    experiments DVC reports and the `dvc` calls the driver makes are recorded, nothing runs."""
    from fusedit.components.ablate import driver
    from fusedit.components.ablate.spec import Spec

    calls = []
    monkeypatch.setattr(driver, "experiments", lambda repo, names=None: {
        "mini-deep": {"state": "success"}, "mini-no-temb": {"state": state}})
    monkeypatch.setattr(driver, "dvc", lambda repo, *args, **kw: calls.append(args))
    root = Path(__file__).resolve().parents[1]
    todo = driver.queue(Spec.model_validate(TOY2), root, force=force, resume=resume)
    assert [r.experiment for r in todo] == queued
    assert [c[2:] for c in calls if c[:2] == ("exp", "remove")] == ([tuple(removed)] if removed else [])
    assert [c[c.index("-n") + 1] for c in calls if c[:3] == ("exp", "run", "--queue")] == queued


def test_the_driver_finds_this_venvs_tools_and_keeps_an_activated_path(monkeypatch):
    """`dvc` and the stages' `fusedit` come from this interpreter's venv even when it is not activated; a PATH
    that has it already keeps its order (a `fusedit` placed before it, as the test suite's warm one, wins)."""
    from fusedit.components.ablate import driver

    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", "/usr/bin")
    assert driver._env()["PATH"].split(os.pathsep) == [bindir, "/usr/bin"]
    activated = os.pathsep.join(["/tmp/warm/bin", bindir, "/usr/bin"])
    monkeypatch.setenv("PATH", activated)
    assert driver._env()["PATH"] == activated
