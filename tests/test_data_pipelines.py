"""The two drivers of the data step: `dvc repro` in a copy of the repo, and KFP (compile + kfp.local)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.repo_helpers import repo_copy
from tests.warm import cli_env


def _run(cmd, cwd, env=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.mark.slow
def test_dvc_repro_runs_synth_then_filter(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert "model" in params and "filter" in params["data"]
    params["data"]["synth"].update(samples=200, shard_size=100)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = cli_env()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo, env)
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "copy"], repo)

    out = _run(["dvc", "repro", "filter"], repo, env)  # the data stages (later stages have their own tests)
    assert "Running stage 'synth'" in out and "Running stage 'filter'" in out
    synth_summary = json.loads((repo / "data" / "synth" / "synth.json").read_text())
    metrics = json.loads((repo / "data" / "filtered" / "metrics.json").read_text())
    assert metrics["n_in"] == 200 and metrics["n_kept"] == synth_summary["expected_kept"]
    assert metrics["quality"]["success"] is True
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"synth", "filter"}
    assert lock["stages"]["filter"]["params"]["params.yaml"]["data.filter"]["fail_on_quality"] is True
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env))
    assert json.dumps(shown).count(f'"n_kept": {metrics["n_kept"]}') == 1
    again = _run(["dvc", "repro", "filter"], repo, env)
    assert "didn't change" in again and "Running stage" not in again
    first = (repo / "dvc.lock").read_text()
    forced = _run(["dvc", "repro", "--force", "filter"], repo, env)  # both stages run again
    assert "Running stage 'synth'" in forced and "Running stage 'filter'" in forced
    # no wall-clock or host value in a tracked output: the rerun writes the same hashes (timings go to
    # data/filtered/timing.json, which no stage tracks)
    assert (repo / "dvc.lock").read_text() == first
    assert json.loads((repo / "data" / "filtered" / "timing.json").read_text())["images_per_s"] > 0


def test_pipelines_compile_with_typed_artifacts_on_the_project_image(tmp_path):
    from fusedit.components.shared.image import IMAGE
    from fusedit.pipelines.data import compile_pipelines

    paths = compile_pipelines(str(tmp_path))
    spec = yaml.safe_load(Path(paths["data"]).read_text())
    filt = spec["components"]["comp-filter-op"]
    assert filt["inputDefinitions"]["artifacts"]["shards"]["artifactType"]["schemaTitle"] == "system.Dataset"
    outs = {k: v["artifactType"]["schemaTitle"] for k, v in filt["outputDefinitions"]["artifacts"].items()}
    assert outs == {"filtered": "system.Dataset", "metrics": "system.Metrics", "report": "system.HTML"}
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    assert "filter_shards" in json.dumps(spec)  # the component body calls the shared function
    importer = yaml.safe_load(Path(paths["filter"]).read_text())
    assert any("importer" in e for e in importer["deploymentSpec"]["executors"].values())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_kfp_local_runs_the_data_pipeline(tmp_path, monkeypatch):
    from kfp import local

    from fusedit.pipelines.data import data_pipeline

    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    data_pipeline(samples=60, shard_size=30, bad_fraction=0.2, filter_config="workers: 1\n")
    (metrics_file,) = (tmp_path / "root").glob("*/filter-op/filtered/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    synth_summary = json.loads(next((tmp_path / "root").glob("*/synth-op/shards/synth.json")).read_text())
    assert metrics["n_in"] == 60 and metrics["n_kept"] == synth_summary["expected_kept"]
    (report,) = (tmp_path / "root").glob("*/filter-op/report")
    assert "Data filter report" in report.read_text() and "data:image/jpeg;base64," in report.read_text()
    executor = json.loads(next((tmp_path / "root").glob("*/filter-op/executor_output.json")).read_text())
    logged = executor["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["n_in"] == 60 and logged["n_kept"] == metrics["n_kept"]
