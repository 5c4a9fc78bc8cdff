"""The synthetic judge: exact on ground truth drawn by the generator and on the resampled training targets,
near chance on pure noise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fusedit.components.cache.frozen import preprocess
from fusedit.components.data import scenes
from fusedit.components.data.synth import synth
from fusedit.components.evaluate.evals import judge as J
from fusedit.components.evaluate.evals import synthetic as S


@pytest.mark.parametrize(("size", "seed"), [(32, 11), (64, 12), (32, 13)])
def test_ground_truth_is_judged_correct_in_every_category(size, seed):
    """About 1,000 true drawings of held-out prompts per case, several seeds: the judge is exact on them
    (touching same-coloured shapes, which the judge would count as one blob, never occur)."""
    specs = S.prompts(167, seed=seed, size=size)
    verdicts = [(s, J.judge(scenes.draw_scene(s["scene"]), s)) for s in specs]
    m = S.score_verdicts([(s, v.correct) for s, v in verdicts])
    assert set(m) == {*J.CATEGORIES, "overall"}
    wrong = [(s["prompt"], v.reason) for s, v in verdicts if not v.correct]
    assert all(m[c] >= 0.999 for c in J.CATEGORIES), (m, wrong[:5])


def test_training_targets_are_judged_correct(tmp_path):
    """The images a model is trained to draw: real synth shards (JPEG), resized and centre-cropped to 32 px by
    the feature cache's own preprocessing, so shape edges are blends of colour and background. The judge
    must accept them in every category the scene fits (it scored them 0.32 when it read only pure palette
    colours: no model trained on this data could have passed it)."""
    synth(str(tmp_path), samples=200, seed=3, shard_size=200, bad_fraction=0.0)
    verdicts = []
    for sample in wds.WebDataset([str(p) for p in sorted(tmp_path.glob("*.tar"))], shardshuffle=False):
        scene = json.loads(sample["json"])["scene"]
        image = Image.fromarray(preprocess(sample["image.jpg"], 32).permute(1, 2, 0).numpy())
        for category in J.CATEGORIES:
            if S._fits(scene, category):
                spec = {"category": category, "groups": scene["groups"], "relation": scene["relation"]}
                verdicts.append((spec, J.judge(image, spec).correct))
    m = S.score_verdicts(verdicts)
    assert len(verdicts) > 200 and set(m) == {*J.CATEGORIES, "overall"}
    assert all(m[c] >= 0.98 for c in J.CATEGORIES), m


def test_pure_noise_is_near_chance():
    rng = np.random.default_rng(0)
    specs = S.prompts(20, seed=7, size=32)
    uniform = [(s, J.judge(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), s).correct)
               for s in specs]
    gauss = [(s, J.judge(Image.fromarray(np.clip(rng.normal(128, 60, (32, 32, 3)), 0, 255).astype(np.uint8)),
                         s).correct) for s in specs]
    assert S.score_verdicts(uniform)["overall"] <= 0.15
    assert S.score_verdicts(gauss)["overall"] <= 0.15
    blank = Image.new("RGB", (32, 32), (210, 210, 210))
    assert not any(J.judge(blank, s).correct for s in specs)


def test_checks_follow_geneval_rules():
    spec = S.held_out("position", 0, 7, 64)
    img = scenes.draw_scene(spec["scene"])
    assert J.judge(img, spec).correct
    swapped = dict(spec, relation={"to the left of": "to the right of", "to the right of": "to the left of",
                                   "above": "below", "below": "above"}[spec["relation"]])
    assert not J.judge(img, swapped).correct  # the same image contradicts the opposite relation
    count = S.held_out("counting", 0, 7, 64)
    wrong = dict(count, groups=[dict(count["groups"][0], count=count["groups"][0]["count"] + 1)])
    assert J.judge(scenes.draw_scene(count["scene"]), count).correct
    assert not J.judge(scenes.draw_scene(count["scene"]), wrong).correct
    colors = S.held_out("colors", 0, 7, 64)
    other = next(c for c in scenes.COLORS if c != colors["groups"][0]["color"])
    recoloured = dict(colors, groups=[dict(colors["groups"][0], color=other)])
    assert not J.judge(scenes.draw_scene(colors["scene"]), recoloured).correct


def test_held_out_prompts_are_deterministic_and_in_the_grammar():
    a, b = S.prompts(3, seed=0, size=32), S.prompts(3, seed=0, size=32)
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]
    assert all(x["prompt"].endswith("on a light gray background") for x in a)
    assert [x["prompt"] for x in S.prompts(3, seed=1, size=32)] != [x["prompt"] for x in a]


def test_label_is_four_connected():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: two components
    m[3, 2:5] = True
    _, n = J.label(m)
    assert n == 3
