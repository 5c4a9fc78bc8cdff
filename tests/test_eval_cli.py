"""`fusedit eval`: bad input is one clear line and exit 2; compare tabulates runs; the KFP component."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.run import evaluate
from fusedit.errors import UserError
from tests import warm
from tests.eval_helpers import export_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny_dir):
    return export_tiny(tmp_path_factory.mktemp("pipe") / "pipeline", tiny_dir)


def _cli(*args):
    return subprocess.run([warm.FUSEDIT, "eval", *args],
                          capture_output=True, text=True, timeout=300)


def test_not_a_pipeline_is_one_line_exit_2(tmp_path):
    r = _cli("run", "--pipeline", str(tmp_path), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: --pipeline {tmp_path}: not an exported pipeline " \
        "(no model_index.json); pass e.g. data/train/joint/pipeline"


def test_bad_prompt_sources_are_clear_errors(tmp_path, pipe_dir):
    base = dict(pipeline=str(pipe_dir), output=str(tmp_path / "o"), steps=1, progress=False)
    with pytest.raises(UserError, match="evaluation_metadata.jsonl: no such file"):
        evaluate(EvalConfig(**base, suites=["geneval"], geneval_metadata=str(tmp_path / "evaluation_metadata.jsonl")))
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"prompt": "a cat", "tag": "single_object"}\n{"prompt": "a dog",\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        evaluate(EvalConfig(**base, suites=["geneval"], geneval_metadata=str(bad)))
    bad.write_text('{"tag": "single_object"}\n')
    with pytest.raises(UserError, match="line 1 must be a JSON object with prompt"):
        evaluate(EvalConfig(**base, suites=["geneval"], geneval_metadata=str(bad)))
    with pytest.raises(UserError, match="suite dpg needs --dpg-prompts"):
        evaluate(EvalConfig(**base, suites=["dpg"]))
    with pytest.raises(UserError, match="unknown suite 'mjhq'"):
        evaluate(EvalConfig(**base, suites=["mjhq"]))
    with pytest.raises(UserError, match="needs --fid-weights"):
        (tmp_path / "p.txt").write_text("a red circle\n")
        evaluate(EvalConfig(**base, suites=["fid"], fid_real=str(tmp_path), fid_prompts=str(tmp_path / "p.txt")))


def test_run_and_compare_through_the_cli(tmp_path, pipe_dir):
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({"eval": {"suites": ["synthetic"], "steps": 1, "images_per_prompt": 1,
                                            "synthetic_per_category": 1}}))
    for name, guidance in (("deep", "6.0"), ("shallow", "1.0")):
        r = _cli("run", "--config", str(cfg), "--pipeline", str(pipe_dir), "--output", str(tmp_path / name),
                 "--guidance", guidance, "--quiet")
        assert r.returncode == 0, r.stderr
        assert "synthetic: single_object=" in r.stdout
        assert json.loads((tmp_path / name / "metrics.json").read_text())["synthetic"]["images"] == 6
    r = _cli("compare", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "| metric | deep | shallow |"
    assert "| synthetic/overall |" in r.stdout
    assert "<table" in (tmp_path / "cmp" / "compare.html").read_text()
    r = _cli("compare", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no metrics.json" in r.stderr


def test_per_suite_images_and_feature_named_fid_through_the_cli(tmp_path, pipe_dir):
    import numpy as np
    from PIL import Image

    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "whoops3.txt").write_text("three green stars")
    (tmp_path / "fid.txt").write_text("a red circle\ntwo blue squares\n")
    (tmp_path / "real").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "real" / f"{i}.png")
    args = ["run", "--config", str(ROOT / "params.yaml"), "--pipeline", str(pipe_dir), "--output", str(tmp_path / "o"),
            "--suite", "dpg", "--dpg-prompts", str(tmp_path / "dpg"), "--suite", "fid", "--fid-real",
            str(tmp_path / "real"), "--fid-prompts", str(tmp_path / "fid.txt"), "--fid-features", "random",
            "--steps", "1", "--quiet"]
    r = _cli(*args, "--dpg-images-per-prompt", "2", "--fid-images-per-prompt", "2")
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":", 1)[0]: ln for ln in r.stdout.splitlines()}
    assert "images_per_prompt=2" in lines["dpg"] and "images_per_prompt=2" in lines["fid"]
    assert "fid_random32=" in lines["fid"] and "kid_random32=" in lines["fid"] and "fid_n=4" in lines["fid"]
    assert " fid=" not in lines["fid"] and not lines["fid"].startswith("fid: fid=")
    assert "fid_random32 over 4 images with 64 feature dimensions" in r.stderr
    samples = tmp_path / "o" / "samples"
    assert sorted(p.name for p in (samples / "fid").glob("*.png")) == ["00000_0.png", "00000_1.png",
                                                                        "00001_0.png", "00001_1.png"]
    assert Image.open(samples / "dpg" / "whoops3.png").size == (16, 8)  # tiles 0 and 1 of the 2x2 grid
    r = _cli(*args, "--dpg-images-per-prompt", "5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: invalid EvalConfig field 'dpg_images_per_prompt': "
                                                 "Input should be less than or equal to 4")


def test_kfp_component_requests_a_gpu_and_runs_locally(tmp_path, pipe_dir):
    from kfp import dsl, local

    from fusedit.components.evaluate.component import evaluate_op
    from fusedit.pipelines.evaluate import compile_pipeline
    from fusedit.pipelines.placement import GPU

    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path)))))  # then its Kubernetes placement
    resources = [e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values()
                 if "container" in e]
    assert any(r.get("accelerator", {}).get("resourceType") == GPU for r in resources)

    @dsl.pipeline
    def run():
        src = dsl.importer(artifact_uri=str(pipe_dir), artifact_class=dsl.Model)
        evaluate_op(pipeline=src.output, config_yaml="steps: 1\nimages_per_prompt: 1\nsynthetic_per_category: 1\n")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    run()
    root = tmp_path / "root"
    html = [p for p in root.rglob("report") if p.is_file()]
    md = [p for p in root.rglob("summary") if p.is_file()]
    assert html and "data:image/png;base64," in html[0].read_text()
    assert md and "synthetic/overall" in md[0].read_text()
