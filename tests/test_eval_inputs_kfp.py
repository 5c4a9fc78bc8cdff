"""Evaluation suites and their inputs on the cluster: the compiled pipelines carry each suite's inputs as run
parameters, and compile and submit refuse a run that would train every stage and then stop at evaluation for
want of one (GenEval metadata, DPG prompts, FID reference images and Inception weights).

Real compilation through the CLI, the compiled IR read as YAML, and `submit` against the KFP stand-in of
tests/test_pipeline_workflow.py (which records what reaches the server).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests import warm
from tests.test_pipeline_workflow import _KFP, _tasks

ROOT = Path(__file__).resolve().parents[1]
# what ablations/paper.yaml's suites read (geneval, dpg, fid with clean-fid's Inception), nothing else
PAPER_REQUIRED = {"geneval_metadata", "dpg_prompts", "fid_real", "fid_weights"}
PAPER_VALUES = {"geneval_metadata": "s3://bench/geneval/evaluation_metadata.jsonl",
                "dpg_prompts": "s3://bench/dpg/dpg_bench.csv", "fid_real": "s3://bench/mjhq/shards/",
                "fid_weights": "s3://bench/weights/inception-2015-12-05.pt"}


def _fusedit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([warm.FUSEDIT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def _spec(path: Path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))


def _required(spec: dict) -> set[str]:
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {k for k, v in params.items() if "defaultValue" not in v and not v.get("isOptional")}


def _submit(package: Path, tmp_path: Path, *params: str) -> tuple[subprocess.CompletedProcess, list]:
    _KFP.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HOME": str(tmp_path), "KFP_TOKEN": "t"}
    try:
        r = _fusedit("pipeline", "submit", "--host", f"http://127.0.0.1:{server.server_port}", "--package",
                     str(package), *[a for p in params for a in ("--param", p)], env=env)
    finally:
        server.shutdown()
    return r, list(_KFP.seen)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _runs_created(seen: list) -> list:
    return [s for s in seen if s["path"] == "/apis/v2beta1/runs"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("paper") / "paper.yaml"
    r = _fusedit("ablate", "compile", "ablations/paper.yaml", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wf") / "wf.yaml"
    r = _fusedit("pipeline", "compile", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_paper_grid_compiles_with_its_eval_inputs_as_required_run_parameters(paper):
    path, stdout = paper
    spec = _spec(path)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["eval_suites"]["defaultValue"] == ["synthetic", "geneval", "dpg", "fid"]
    assert _required(spec) == PAPER_REQUIRED
    for name in PAPER_REQUIRED:
        assert params[name]["parameterType"] == "STRING"
        assert f"--param {name}=" in stdout, stdout
    # the evaluation task of every run reads them (through the ParallelFor's inputs)
    ev = _tasks(spec)["evaluate"]["inputs"]["parameters"]
    for name in PAPER_REQUIRED:
        assert ev[name]["componentInputParameter"].endswith(name), ev[name]
    assert "geneval_metadata" not in json.loads(params["eval_config"]["defaultValue"])


def test_submit_refuses_the_paper_grid_without_its_eval_inputs(paper, tmp_path):
    path, _ = paper
    r, seen = _submit(path, tmp_path, "output_root=s3://b/ablations/paper")
    line = _one_error_line(r)
    assert "suite geneval" in line and "geneval_metadata" in line and "--param geneval_metadata=" in line, line
    assert not _runs_created(seen), "nothing reaches the server"
    r, seen = _submit(path, tmp_path, *(f"{k}={v}" for k, v in PAPER_VALUES.items() if k != "fid_weights"))
    line = _one_error_line(r)
    assert "suite fid" in line and "--param fid_weights=" in line, line
    r, seen = _submit(path, tmp_path, *(f"{k}={v}" for k, v in {**PAPER_VALUES, "dpg_prompts": "data/dpg.csv"}.items()))
    line = _one_error_line(r)
    assert "dpg_prompts" in line and "data/dpg.csv" in line and "s3://" in line, line
    r, seen = _submit(path, tmp_path, *(f"{k}={v}" for k, v in PAPER_VALUES.items()))
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = [s["body"] for s in _runs_created(seen)]
    assert {k: run["runtime_config"]["parameters"][k] for k in PAPER_VALUES} == PAPER_VALUES


def test_submit_refuses_a_suite_switched_on_without_its_inputs(workflow, tmp_path):
    spec = _spec(workflow)
    assert not _required(spec), "params.yaml's suites need no input"
    for name in ("geneval_metadata", "dpg_prompts", "fid_real", "fid_weights", "fid_prompts", "clip_model"):
        assert spec["root"]["inputDefinitions"]["parameters"][name]["defaultValue"] == ""
    r, seen = _submit(workflow, tmp_path, 'eval_suites=["synthetic", "fid"]')
    line = _one_error_line(r)
    assert "suite fid" in line and "fid_real" in line and "--param fid_real=" in line, line
    assert not _runs_created(seen)
    r, seen = _submit(workflow, tmp_path, 'eval_suites=["synthetic", "fid"]', "fid_real=s3://b/real/",
                      "eval_config=fid_features: random")  # YAML text (JSON would parse to a mapping)
    assert r.returncode == 0, r.stderr[-2000:]  # random features need no Inception weights
    r, seen = _submit(workflow, tmp_path, 'eval_suites=["clipscore"]')
    assert "suite clipscore" in _one_error_line(r)
    r, seen = _submit(workflow, tmp_path, 'eval_suites=["synthetic", "nope"]')
    assert "nope" in _one_error_line(r)


def _params_with_eval(tmp_path: Path, **ev) -> Path:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["eval"].update(ev)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_compile_refuses_an_eval_input_the_pod_cannot_read(tmp_path):
    params = _params_with_eval(tmp_path, suites=["synthetic", "dpg"], dpg_prompts="data/dpg/dpg_bench.csv")
    r = _fusedit("pipeline", "compile", "--params", str(params), "--out", str(tmp_path / "a.yaml"))
    line = _one_error_line(r)
    assert "suite dpg" in line and "dpg_prompts" in line and "--param dpg_prompts=" in line, line
    assert not (tmp_path / "a.yaml").exists(), "no package is left behind"
    params = _params_with_eval(tmp_path, suites=["synthetic", "dpg"], dpg_prompts="s3://b/dpg/dpg_bench.csv")
    r = _fusedit("pipeline", "compile", "--params", str(params), "--out", str(tmp_path / "b.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    spec = _spec(tmp_path / "b.yaml")
    assert not _required(spec)
    assert spec["root"]["inputDefinitions"]["parameters"]["dpg_prompts"]["defaultValue"] == "s3://b/dpg/dpg_bench.csv"
    params = _params_with_eval(tmp_path, suites=["synthetic", "geneval"])
    r = _fusedit("pipeline", "compile", "--params", str(params), "--out", str(tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _required(_spec(tmp_path / "c.yaml")) == {"geneval_metadata"}
    assert "--param geneval_metadata=" in r.stdout


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_evaluation_pod_gets_its_inputs_as_local_files(tmp_path):
    """Run parameters win over the eval config; Inception weights given by URL are fetched into the pod."""
    from fusedit.components.evaluate.pod_inputs import pod_fields

    (tmp_path / "www").mkdir()
    weights = bytes(range(256)) * 64
    (tmp_path / "www" / "inception.pt").write_bytes(weights)
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/inception.pt"
        fields = pod_fields({"dpg_prompts": "/old.csv", "steps": 3},
                            {"dpg_prompts": "https://x/dpg_bench.csv", "fid_weights": url, "fid_real": "",
                             "clip_model": "openai/clip-vit-base-patch32"}, str(tmp_path / "pod"))
    finally:
        server.shutdown()
    assert fields["steps"] == 3 and fields["dpg_prompts"] == "https://x/dpg_bench.csv"
    assert "fid_real" not in fields, "an empty run parameter leaves the config as it is"
    assert fields["clip_model"] == "openai/clip-vit-base-patch32", "a model name is not a file to fetch"
    assert Path(fields["fid_weights"]).is_file() and Path(fields["fid_weights"]).read_bytes() == weights
    assert Path(fields["fid_weights"]).is_relative_to(tmp_path / "pod")
