"""Prompt-following figures: the text-blind baseline of the synthetic judge and the prompt sensitivity."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from fusedit.components.data import scenes
from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.evals import following, judge, synthetic
from fusedit.components.evaluate.evals.sampling import save_png
from fusedit.components.evaluate.run import evaluate
from tests.eval_helpers import export_tiny


def _ctx(root, per_category=5, size=64):
    cfg = SimpleNamespace(synthetic_per_category=per_category, synthetic_seed=0, images_per_prompt=1)
    return SimpleNamespace(cfg=cfg, sampler=SimpleNamespace(size=size), root=root, main=True,
                           samples=lambda suite: root / "samples" / suite)


def test_other_prompts_are_every_other_text_of_the_same_category():
    specs = synthetic.prompts(20, seed=0, size=64)
    rest = synthetic.others(specs)
    assert len(rest) == len(specs)
    for s, os in zip(specs, rest, strict=True):
        same = [o for o in specs if o["category"] == s["category"] and o["prompt"] != s["prompt"]]
        assert os == same and s not in os
    single = [s["prompt"] for s in specs if s["category"] == "single_object"]
    assert len(set(single)) < len(single)  # texts do repeat: the case that must be left out


def _draw_all(ctx, specs, scenes_for):
    for s, paths in zip(scenes_for, synthetic._paths(ctx, specs), strict=True):
        save_png(scenes.draw_scene(s["scene"]), paths[0])


def test_text_blind_baseline_is_the_mean_over_every_other_text(tmp_path):
    """Worked out here from the judge's verdicts, image by image: the share of the other texts of its
    category that the image passes, averaged per category, then over categories."""
    ctx = _ctx(tmp_path)
    specs = synthetic.prompts(5, seed=0, size=64)
    _draw_all(ctx, specs, specs)
    m = synthetic.score(ctx).metrics
    by: dict[str, list[float]] = {}
    for s in specs:
        img = scenes.draw_scene(s["scene"])
        others = [o for o in specs if o["category"] == s["category"] and o["prompt"] != s["prompt"]]
        by.setdefault(s["category"], []).append(sum(judge.judge(img, o).correct for o in others) / len(others))
    expect = {c: sum(v) / len(v) for c, v in by.items()}
    for c, v in expect.items():
        assert m[f"text_blind_{c}"] == pytest.approx(v)
    assert m["text_blind_overall"] == pytest.approx(sum(expect.values()) / len(expect))
    assert m["overall"] >= 0.8 and m["text_blind_overall"] <= m["overall"] / 2
    assert m["text_blind_colors"] <= 0.4 and m["colors"] >= 0.8


def test_a_text_blind_model_scores_its_own_baseline(tmp_path):
    """Images that ignore their prompts (each prompt gets the true drawing of a prompt drawn at random from
    its category): the score and the baseline estimate the same chance level, so they agree."""
    ctx = _ctx(tmp_path, per_category=20, size=32)
    specs = synthetic.prompts(20, seed=0, size=32)
    rng = random.Random(5)
    drawn = [rng.choice([o for o in specs if o["category"] == s["category"]]) for s in specs]
    _draw_all(ctx, specs, drawn)
    m = synthetic.score(ctx).metrics
    assert abs(m["overall"] - m["text_blind_overall"]) <= 0.06, m
    assert 0.1 <= m["text_blind_overall"] <= 0.5, m


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
