"""Prompt-following figures: the text-blind baseline of the synthetic judge and the prompt sensitivity."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from fusedit.components.data import scenes
from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.evals import following, synthetic
from fusedit.components.evaluate.evals.sampling import save_png
from fusedit.components.evaluate.run import evaluate
from tests.eval_helpers import export_tiny


def _ctx(root, per_category=5, size=64):
    cfg = SimpleNamespace(synthetic_per_category=per_category, synthetic_seed=0, images_per_prompt=1)
    return SimpleNamespace(cfg=cfg, sampler=SimpleNamespace(size=size), root=root, main=True,
                           samples=lambda suite: root / "samples" / suite)


def test_shuffled_prompts_are_other_prompts_of_the_same_category():
    specs = synthetic.prompts(4, seed=0, size=64)
    other = synthetic.shuffled(specs)
    assert len(other) == len(specs)
    for s, o in zip(specs, other, strict=True):
        assert o["category"] == s["category"] and o is not s  # another prompt (its text may repeat)
    assert sorted(o["prompt"] for o in other) == sorted(s["prompt"] for s in specs)  # a permutation


def test_true_drawings_score_far_above_their_text_blind_baseline(tmp_path):
    """Images that follow their prompts exactly: the judge says so, and the shuffled prompts do not."""
    ctx = _ctx(tmp_path)
    specs = synthetic.prompts(5, seed=0, size=64)
    for s, paths in zip(specs, synthetic._paths(ctx, specs), strict=True):
        save_png(scenes.draw_scene(s["scene"]), paths[0])
    m = synthetic.score(ctx).metrics
    assert m["overall"] >= 0.8
    assert m["text_blind_overall"] <= m["overall"] / 2
    assert m["text_blind_colors"] <= 0.4 and m["colors"] >= 0.8


def test_image_spread_is_the_mean_pairwise_pixel_difference():
    same = np.full((3, 4, 4, 3), 100.0, dtype=np.float32)
    assert following.image_spread(same) == 0.0
    two = np.stack([np.full((4, 4, 3), 100.0), np.full((4, 4, 3), 130.0)]).astype(np.float32)
    assert following.image_spread(two) == pytest.approx(30.0)


def test_every_evaluation_reports_prompt_following(tmp_path, tiny_dir):
    pipe = export_tiny(tmp_path / "pipeline", tiny_dir)
    res = evaluate(EvalConfig(pipeline=str(pipe), output=str(tmp_path / "run"), synthetic_per_category=2,
                              images_per_prompt=1, steps=2, progress=False))
    f = res.metrics["prompt_following"]
    assert f["prompts"] == 8 and f["image_spread"] >= 0
    for t in following.TIMESTEPS:
        assert math.isfinite(f[f"velocity_gap_t{t}"]) and f[f"velocity_gap_t{t}"] >= 0
    assert {"text_blind_overall", "overall"} <= set(res.metrics["synthetic"])
    assert "prompt_following/image_spread" in (tmp_path / "run" / "report" / "report.md").read_text()
