"""SIGKILL each step at seeded random points, rerun it, and get exactly the uninterrupted result.

Steps: filter (`fusedit data filter`), cache build (`fusedit cache build`), both training stages
(`fusedit train`), export (the end of a stage) and evaluation sampling (`fusedit eval run`). After
every kill the output is checked for a half-written file that looks complete; after the final rerun
the outputs are compared with an uninterrupted run (bytes where the step is deterministic, the loss
curve and weights for training).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from fusedit.components.shared.tario import iter_samples
from fusedit.components.train import checkpoint
from tests.cache_helpers import DEEP, cli_sets, recipe_overrides, tree
from tests.fault_helpers import Run, kill_and_resume

SEEDS = [1, 9, 6]  # first draws 0.13, 0.46, 0.79: early, middle and late kills
RUN_FACTS = "timing.json"  # how the run went (seconds, images/s, workers, resumed step): the one file that differs


def _strict_count(path: Path) -> int:
    """Samples in a tar, read with the strict reader (a cut-off tar raises)."""
    with open(path, "rb") as f:
        return sum(1 for _ in iter_samples(f))


def _untimed(files: dict[str, bytes]) -> dict[str, bytes]:
    """Every output file but the run's timing record, byte for byte."""
    return {k: v for k, v in files.items() if Path(k).name != RUN_FACTS}


# ------------------------------------------------------------------ filter

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    from fusedit.components.data.synth import synth

    root = tmp_path_factory.mktemp("kill-synth")
    synth(str(root), samples=96, seed=3, shard_size=12, bad_fraction=0.1, short_side=(32, 48))
    return root


def _filter_run(out: Path, synth_dir: Path, tmp: Path) -> Run:
    cfg = tmp / "filter.yaml"
    cfg.write_text(yaml.safe_dump({"report": False, "min_side": 16, "samples_per_shard": 10, "workers": 2}))
    return Run(["data", "filter", "--input", str(synth_dir), "--output", str(out), "--config", str(cfg)],
               tmp / f"{out.name}.log")


def _check_filter(out: Path) -> None:
    """A done-marker means its work files are whole; a manifest means every listed file is whole."""
    for done in (out / ".work").glob("*/done.json"):
        rec = json.loads(done.read_text())
        rows = (done.parent / "rows.jsonl").read_text().splitlines()
        assert len(rows) == rec["n"]
        kept = sum(json.loads(r)["decision"] == "kept" for r in rows)
        assert _strict_count(done.parent / "kept.tar") == kept
    for shard in (out / "shards").glob("*.tar"):
        _strict_count(shard)  # a published name is never a cut-off tar
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        assert all((out / f).is_file() for f in m["files"])
        assert sum(_strict_count(out / "shards" / Path(s).name) for s in m["result"]["shards"]) == \
            m["result"]["n_kept"]


def test_filter_killed_anywhere_resumes_to_the_same_bytes(tmp_path, synth_dir):
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = _filter_run(out, synth_dir, tmp_path)
    duration = run.complete()
    out.rename(ref)  # the same output path again: paths are part of the manifest
    report = kill_and_resume(run, duration, SEEDS, lambda: _check_filter(out), "filter",
                             reset=lambda: shutil.rmtree(out))
    assert report.landed >= 1
    got, want = tree(out), tree(ref)
    assert sorted(got) == sorted(want) and any(Path(k).name == RUN_FACTS for k in got)
    assert _untimed(got) == _untimed(want)  # metrics, manifest and report included: no wall-clock in them


# ------------------------------------------------------------------ cache build

def _check_cache(out: Path) -> None:
    """A shard's done-marker means its tar is whole; a manifest means every shard is."""
    for done in (out / "shards").glob("*.json"):
        rec = json.loads(done.read_text())
        tar = out / rec["name"]
        assert tar.stat().st_size == rec["bytes"] and _strict_count(tar) == rec["n"]
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        assert sum(_strict_count(out / s["name"]) for s in m["shards"]) == m["n_samples"]


def test_cache_build_killed_anywhere_resumes_to_the_same_bytes(tmp_path, tiny_dir):
    from tests.cache_helpers import make_shards

    shards = make_shards(tmp_path / "in", samples=24, shard_size=3)
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = Run(["cache", "build", "--input", str(shards), "--output", str(out), "--recipe", DEEP, "--batch-size", "2",
               *cli_sets(recipe_overrides(DEEP, tiny_dir, vae=True))], tmp_path / "cache.log")
    duration = run.complete()
    out.rename(ref)
    report = kill_and_resume(run, duration, SEEDS, lambda: _check_cache(out), "cache build",
                             reset=lambda: shutil.rmtree(out))
    assert report.landed >= 1
    assert tree(out) == tree(ref)  # byte for byte: no shard lost, none written twice


# ------------------------------------------------------------------ training stages and export

def _train_params(tmp: Path) -> Path:
    stages = [
        {"name": "base", "steps": 8, "batch_size": 4, "save_every": 2, "ema_every": 2, "log_every": 1,
         "keep_last": 2, "sample_prompts": ["a red square"]},
        {"name": "joint", "steps": 4, "batch_size": 4, "trains": "dit+llm", "llm_lr": 1e-3, "init_from": "base",
         "save_every": 2, "ema_every": 2, "sample_prompts": ["a red square"]},
    ]
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"seed": 5, "stages": stages}}))
    return p


def _train_run(tmp: Path, tiny_dir: Path, data: Path, out: Path, stage: str) -> Run:
    return Run(["train", "--recipe", "tiny", "--stage", stage, "--data", str(data), "--output", str(out / stage),
                "--params", str(_train_params(tmp)), "--set", f"model.llm={tiny_dir / 'gemma'}",
                "--set", "model.resolution=16", "--set", "model.max_prompt_length=16"], tmp / f"{stage}.log")


def _check_stage(out: Path) -> None:
    """Every committed checkpoint verifies; an exported pipeline is there whole or not at all."""
    root = out / "checkpoints"
    for step in checkpoint.steps(str(root)) if root.exists() else []:
        if (root / f"step-{step:08d}" / checkpoint.MARKER).exists():
            checkpoint._load_step(str(root), step)  # raises on a size/checksum mismatch
    if (out / "loss.tsv").exists():
        rows = (out / "loss.tsv").read_text().splitlines()
        assert rows[0].startswith("step\t") and all(len(r.split("\t")) == 3 for r in rows[1:])
    if (out / "pipeline").exists():
        from fusedit.model.pipeline import FuseDiTPipeline

        FuseDiTPipeline.from_pretrained(str(out / "pipeline"))


def _losses(out: Path) -> list[list[str]]:
    return [ln.split("\t")[:3] for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


def _same_stage(got: Path, want: Path) -> None:
    assert _losses(got) == _losses(want) and len(_losses(got)) > 0
    a, b = checkpoint.load_latest(str(got / "checkpoints")), checkpoint.load_latest(str(want / "checkpoints"))
    assert a.step == b.step and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert all(a.tensors[name][k].equal(b.tensors[name][k]) for k in b.tensors[name]), name
    assert (got / "metrics.json").read_bytes() == (want / "metrics.json").read_bytes()
    assert tree(got / "pipeline") == tree(want / "pipeline")


def test_training_stages_and_export_killed_anywhere_resume_to_the_same_curve(tmp_path, tiny_dir, filtered):
    out, ref = tmp_path / "out", tmp_path / "ref"
    runs = {stage: _train_run(tmp_path, tiny_dir, filtered, out, stage) for stage in ("base", "joint")}
    durations = {stage: run.complete() for stage, run in runs.items()}
    # a rerun of a finished stage only exports again: time that phase (from the resume line on)
    uninterrupted = (out / "base" / "metrics.json").read_text()
    resumed, writing = "resuming stage 'base' from step 8", "Writing model shards"
    export_s = runs["base"].seconds_after(lambda: runs["base"].said(resumed))
    again = json.loads((out / "base" / "metrics.json").read_text())
    assert again == json.loads(uninterrupted)  # an export-only rerun changes nothing
    assert math.isfinite(json.loads(uninterrupted)["final_loss"])
    out.rename(ref)

    base = kill_and_resume(runs["base"], durations["base"], SEEDS, lambda: _check_stage(out / "base"), "train base",
                           reset=lambda: shutil.rmtree(out / "base"))
    export = kill_and_resume(runs["base"], export_s, SEEDS, lambda: _check_stage(out / "base"), "export",
                             lo=0.0, hi=1.0, after=lambda: runs["base"].said(resumed))
    writes = kill_and_resume(runs["base"], 0.05, SEEDS, lambda: _check_stage(out / "base"), "export (writing)",
                             lo=0.0, hi=1.0, after=lambda: runs["base"].said(writing))
    joint = kill_and_resume(runs["joint"], durations["joint"], SEEDS, lambda: _check_stage(out / "joint"),
                            "train joint", reset=lambda: shutil.rmtree(out / "joint"))
    assert base.landed >= 1 and joint.landed >= 1 and export.landed + writes.landed >= 2
    for stage in ("base", "joint"):
        _same_stage(out / stage, ref / stage)
    assert not list((out / "base").glob("pipeline.*"))  # no temp export left behind


# ------------------------------------------------------------------ evaluation sampling

def _check_eval(out: Path) -> None:
    from PIL import Image

    for png in (out / "samples").rglob("*.png"):
        with Image.open(png) as im:
            im.load()  # a visible name is a whole image
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text())


def test_eval_sampling_killed_anywhere_resumes_to_the_same_images(tmp_path, tiny_dir):
    from tests.eval_helpers import export_tiny

    pipe = export_tiny(tmp_path / "pipeline", tiny_dir)
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = Run(["eval", "run", "--pipeline", str(pipe), "--output", str(out), "--suite", "synthetic", "--steps", "3",
               "--images-per-prompt", "2", "--synthetic-per-category", "3", "--batch-size", "2", "--quiet"],
              tmp_path / "eval.log")
    duration = run.complete()
    out.rename(ref)
    report = kill_and_resume(run, duration, SEEDS, lambda: _check_eval(out), "eval sampling",
                             reset=lambda: shutil.rmtree(out))
    assert report.landed >= 1
    got, want = tree(out / "samples"), tree(ref / "samples")
    assert got == want and len(got) > 10
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
