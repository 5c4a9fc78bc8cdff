"""The `synthetic` suite: held-out prompts of the scene grammar in GenEval's categories, scored by the judge.

A prompt's scene is drawn from the training grammar's own sampler, conditioned on the category by
rejection, with RNGs in a namespace the data step never uses (`eval-synthetic:...`), so prompts are
in-distribution captions while the scenes (layouts) are held out.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from fusedit.components import scenes
from fusedit.components.evals import judge as J

WANT = {  # category -> (groups, counts allowed, needs distinct shapes)
    "single_object": (1, (1,), False),
    "colors": (1, (1,), False),
    "counting": (1, (2, 3), False),
    "two_object": (2, (1,), True),
    "position": (2, (1,), True),
    "color_attr": (2, (1,), True),
}


def _fits(scene: dict[str, Any], category: str) -> bool:
    n, counts, distinct = WANT[category]
    groups = scene["groups"]
    return (len(groups) == n and all(g["count"] in counts for g in groups)
            and (not distinct or len({g["shape"] for g in groups}) == n))


def held_out(category: str, index: int, seed: int, size: int) -> dict[str, Any]:
    """One held-out prompt: its category, caption, groups, relation and the full scene."""
    rng = random.Random(f"eval-synthetic:{seed}:{category}:{index}")
    while True:
        scene = scenes.sample_scene(rng, size, size)
        if _fits(scene, category):
            return {"category": category, "prompt": scenes.caption(scene), "groups": scene["groups"],
                    "relation": scene["relation"], "scene": scene}


def prompts(per_category: int, seed: int, size: int, categories=J.CATEGORIES) -> list[dict[str, Any]]:
    return [held_out(c, i, seed, size) for c in categories for i in range(per_category)]


def score(verdicts: list[tuple[dict[str, Any], bool]]) -> dict[str, float]:
    """GenEval-style: per-category accuracy over images, overall = mean over categories."""
    by: dict[str, list[bool]] = {}
    for spec, ok in verdicts:
        by.setdefault(spec["category"], []).append(ok)
    out = {f"synthetic/{c}": sum(v) / len(v) for c, v in by.items()}
    if by:
        out["synthetic/overall"] = sum(out[f"synthetic/{c}"] for c in by) / len(by)
    return out


def write_prompts(path: Path, specs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps({k: v for k, v in s.items() if k != "scene"}) + "\n")
