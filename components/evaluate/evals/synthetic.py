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

from fusedit.components.data import scenes
from fusedit.components.evaluate.evals import judge as J

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


def others(specs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """For each prompt, every prompt of its category with another text.

    Judging an image against each of them and averaging gives the judge's chance level for this model, the
    text-blind baseline: how often an image passes for a prompt it was not drawn for, averaged over all of
    them rather than one shuffle (a fixed shuffle of 20 prompts moved it by up to 0.2 in a category on the
    same images). A prompt repeating the image's own text is left out: judged against it, the image scores
    its own prompt, not chance (single_object has 40 texts, so 20 prompts often repeat one).
    """
    by: dict[str, list[dict[str, Any]]] = {}
    for s in specs:
        by.setdefault(s["category"], []).append(s)
    return [[o for o in by[s["category"]] if o["prompt"] != s["prompt"]] for s in specs]


def score_verdicts(verdicts: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """GenEval-style: per-category mean over images (a verdict is 0/1, or a share), overall = mean over
    categories."""
    by: dict[str, list[float]] = {}
    for spec, ok in verdicts:
        by.setdefault(spec["category"], []).append(float(ok))
    out = {c: sum(v) / len(v) for c, v in by.items()}
    if by:
        out["overall"] = sum(out.values()) / len(by)
    return out


def write_prompts(path: Path, specs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in specs:
            f.write(json.dumps({k: v for k, v in s.items() if k != "scene"}) + "\n")


def _specs(ctx) -> list[dict[str, Any]]:
    specs = prompts(ctx.cfg.synthetic_per_category, ctx.cfg.synthetic_seed, ctx.sampler.size)
    return specs


def _paths(ctx, specs) -> list[list[Path]]:
    out, n = ctx.samples("synthetic"), ctx.cfg.images_per_prompt
    counters: dict[str, int] = {}
    paths = []
    for s in specs:
        i = counters[s["category"]] = counters.get(s["category"], -1) + 1
        paths.append([out / s["category"] / f"{i:03d}_{k}.png" for k in range(n)])
    return paths


def prepare(ctx):
    from fusedit.components.evaluate.evals.sampling import Job, save_png

    specs = _specs(ctx)
    if ctx.main:
        write_prompts(ctx.samples("synthetic") / "prompts.jsonl", specs)
    return [Job(s["prompt"], ctx.cfg.seed, len(ps), ps,
                lambda imgs, ps=ps: [save_png(i, p) for i, p in zip(imgs, ps, strict=True)])
            for s, ps in zip(specs, _paths(ctx, specs), strict=True)]


def score(ctx):
    from PIL import Image

    from fusedit.components.evaluate.evals.base import SuiteResult

    specs = _specs(ctx)
    verdicts, blind, rows = [], [], []
    for s, rest, ps in zip(specs, others(specs), _paths(ctx, specs), strict=True):
        for p in ps:
            with Image.open(p) as im:
                dets = J.detect(im)
            v = J.check(s, dets)
            blind.append((s, sum(J.check(o, dets).correct for o in rest) / len(rest) if rest else 0.0))
            verdicts.append((s, v.correct))
            rows.append({"image": str(p.relative_to(ctx.root)), "category": s["category"], "prompt": s["prompt"],
                         "correct": v.correct, "reason": v.reason,
                         "detections": [{"color": d.color, "shapes": list(d.shapes), "iou": d.iou,
                                         "center": [round(c, 3) for c in d.center]} for d in v.detections]})
    with open(ctx.samples("synthetic") / "judgements.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    m = score_verdicts(verdicts)
    m.update({f"text_blind_{k}": v for k, v in score_verdicts(blind).items()})
    grids: dict[str, list[Path]] = {}
    for s, ps in zip(specs, _paths(ctx, specs), strict=True):
        grids.setdefault(f"synthetic: {s['category']}", []).extend(ps[:2])
    return SuiteResult(dict(m, images=len(verdicts)), bars={k: v for k, v in m.items()
                                                            if k != "overall" and not k.startswith("text_blind")},
                       grids={k: v[:8] for k, v in grids.items()},
                       notes=["judge: palette segmentation + connected components + shape templates "
                              "(components/evaluate/evals/judge.py); overall = mean over categories",
                              f"text-blind baseline: the same images judged against every other prompt of their "
                              f"category: overall {m.get('text_blind_overall', float('nan')):.3f} "
                              f"(the judge's chance level for this model) against {m.get('overall', 0):.3f}"])
