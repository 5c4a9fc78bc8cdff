"""Each suite end to end on a tiny exported pipeline; official layouts file by file; resumption."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.components.evaluate.config import EvalConfig, load_config
from fusedit.components.evaluate.evals import geneval
from fusedit.components.evaluate.evals.sampling import Job, Sampler
from fusedit.components.evaluate.run import evaluate
from fusedit.errors import UserError
from tests.eval_helpers import build_clip, export_tiny

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, progress=False, batch_size=8)
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny_dir):
    return export_tiny(tmp_path_factory.mktemp("pipe") / "pipeline", tiny_dir)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_geneval_layout_file_by_file(tmp_path, pipe_dir):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS))
    res = evaluate(EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["geneval"],
                              geneval_metadata=str(meta), **FAST))
    out = tmp_path / "run" / "samples" / "geneval"
    assert _files(out) == [f"{i:05d}/{f}" for i in range(3)
                           for f in ["metadata.jsonl", *(f"samples/{k:05d}.png" for k in range(4))]]
    for i, row in enumerate(GENEVAL_ROWS):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == row
        assert Image.open(out / f"{i:05d}" / "samples" / "00000.png").size == (8, 8)
    # GenEval sets the same seed before every prompt: image k of each prompt starts from the same noise
    assert res.metrics["geneval"] == {"prompts": 3.0, "images": 12.0, "images_per_prompt": 4.0}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == res.metrics
    assert (tmp_path / "run" / "report" / "index.html").is_file()


def test_geneval_results_are_summarised_like_summary_scores(tmp_path):
    r = tmp_path / "results.jsonl"
    rows = [("single_object", True), ("single_object", False), ("counting", True), ("counting", True)]
    r.write_text("".join(json.dumps({"tag": t, "correct": c, "filename": "x"}) + "\n" for t, c in rows))
    assert geneval.summarize(str(r)) == {"single_object": 0.5, "counting": 1.0, "overall": 0.75}


def test_dpg_grids_named_after_the_prompt(tmp_path, pipe_dir):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts10.txt").write_text("a red circle above a blue square\n")
    (prompts / "whoops3.txt").write_text("three green stars")
    evaluate(EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["dpg"],
                        dpg_prompts=str(prompts), **FAST))
    out = tmp_path / "run" / "samples" / "dpg"
    assert _files(out) == ["partiprompts10.png", "whoops3.png"]
    grid = np.asarray(Image.open(out / "whoops3.png"))
    assert grid.shape == (16, 16, 3)  # 2x2 tiles of 8 px
    tiles = [grid[y:y + 8, x:x + 8] for y in (0, 8) for x in (0, 8)]
    assert not all(np.array_equal(tiles[0], t) for t in tiles[1:])  # four different images


def test_fid_and_clipscore_suites(tmp_path, pipe_dir, tiny_dir):
    from fusedit.components.data import scenes
    from fusedit.components.evaluate.evals import synthetic

    real = tmp_path / "real" / "cat"
    real.mkdir(parents=True)
    specs = synthetic.prompts(2, seed=3, size=32)
    for i, s in enumerate(specs):
        scenes.draw_scene(s["scene"]).save(real / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(s["prompt"] for s in specs[:6]))
    clip = build_clip(tmp_path / "clip", tiny_dir)
    res = evaluate(EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["fid", "clipscore"],
                              fid_real=str(tmp_path / "real"), fid_prompts=str(tmp_path / "prompts.txt"),
                              fid_features="random", clip_model=str(clip), synthetic_per_category=1, **FAST))
    m = res.metrics
    assert m["fid"]["images"] == 6 and m["fid"]["real_images"] == 12 and m["fid"]["fid_random32"] > 0
    assert np.isfinite(m["fid"]["kid_random32"]) and m["fid"]["fid_n"] == 6
    assert not {"fid", "kid"} & set(m["fid"])  # random features: not an FID comparable to published ones
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| fid/fid_random32 |" in report and "| fid/fid |" not in report
    assert "- fid: fid_random32: FID over random32 features, not comparable to published FIDs" in report
    assert "fid_random32 over 6 images with 64 feature dimensions: the covariance is rank-deficient" in report
    assert m["clipscore"]["images"] == 6 and 0 <= m["clipscore"]["clip_score"] <= 100
    assert _files(tmp_path / "run" / "samples" / "fid") == [f"{i:05d}.png" for i in range(6)]


def test_params_yaml_draws_each_benchmark_with_its_own_images_per_prompt(tmp_path, pipe_dir):
    """params.yaml's eval section: GenEval 4 images per prompt, DPG-Bench 4 in a 2x2 grid, synthetic 4."""
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS[:2]))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "whoops3.txt").write_text("three green stars")
    cfg = load_config(str(ROOT / "params.yaml"), "eval", pipeline=str(pipe_dir), output=str(tmp_path / "run"),
                      suites=["synthetic", "geneval", "dpg"], geneval_metadata=str(meta), dpg_prompts=str(prompts),
                      synthetic_per_category=1, steps=1, batch_size=8, progress=False)
    res = evaluate(cfg)
    out = tmp_path / "run" / "samples"
    for i in range(2):
        assert sorted(p.name for p in (out / "geneval" / f"{i:05d}" / "samples").iterdir()) == [
            f"{k:05d}.png" for k in range(4)]
    assert Image.open(out / "dpg" / "whoops3.png").size == (16, 16)  # 2x2 tiles of 8 px
    assert len(list((out / "synthetic").rglob("*.png"))) == 6 * 4
    used = {"synthetic": 4.0, "geneval": 4.0, "dpg": 4.0}
    assert {s: res.metrics[s]["images_per_prompt"] for s in used} == used
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {s: saved[s]["images_per_prompt"] for s in used} == used
    assert res.metrics["geneval"]["images"] == 8 and res.metrics["dpg"]["images"] == 4


def test_synthetic_suite_resumes_and_refuses_other_settings(tmp_path, pipe_dir):
    cfg = EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), synthetic_per_category=1,
                     images_per_prompt=2, **FAST)
    first = evaluate(cfg)
    out = tmp_path / "run" / "samples" / "synthetic"
    assert first.sampling["synthetic"] == {"jobs": 6, "generated": 12, "skipped": 0, "stale": 0, "dropped": 0}
    scores = {"single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"}
    assert set(first.metrics["synthetic"]) == scores | {f"text_blind_{k}" for k in scores} | {"images",
                                                                                                "images_per_prompt"}
    assert len((out / "judgements.jsonl").read_text().splitlines()) == 12
    victim = out / "counting" / "000_1.png"
    before = victim.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p != victim}
    victim.unlink()
    again = evaluate(cfg)
    assert again.sampling["synthetic"] == {"jobs": 6, "generated": 2, "skipped": 5,  # only the unfinished prompt
                                           "stale": 0, "dropped": 0}
    assert victim.read_bytes() == before  # fixed per-prompt seeds: the redrawn images are the same
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if "counting" not in str(p))
    with pytest.raises(UserError, match="steps"):
        evaluate(cfg.model_copy(update={"steps": 3}))
    redo = evaluate(cfg.model_copy(update={"steps": 3, "overwrite": True}))
    assert redo.sampling["synthetic"]["generated"] == 12


def test_rank_slices_draw_the_same_images(tmp_path, pipe_dir):
    import torch

    from fusedit.components.evaluate.run import load_pipeline

    pipe = load_pipeline(pipe_dir, torch.device("cpu"), torch.float32)
    got: dict[int, dict[int, list]] = {}

    def jobs(key):
        def keep(imgs, i):
            got[key][i] = [np.asarray(x) for x in imgs]

        return [Job(p, 42 + i, 2, [tmp_path / "never"], lambda imgs, i=i: keep(imgs, i))
                for i, p in enumerate(["a red circle", "two blue squares", "a green star", "a red circle"])]

    got[1] = {}
    Sampler(pipe, steps=2, batch_size=8, progress=False).run(jobs(1))
    got[2] = {}
    for rank in (0, 1):
        s = Sampler(pipe, steps=2, batch_size=2, rank=rank, world=2, progress=False).run(jobs(2))
        assert s["jobs"] == 2
    assert sorted(got[2]) == [0, 1, 2, 3]
    for i in range(4):
        for a, b in zip(got[1][i], got[2][i], strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
