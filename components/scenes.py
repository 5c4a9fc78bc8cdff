"""The scene grammar of the embedded data set: a vocabulary, a sampler, captions and a renderer.

Kept apart from the shard writer so that evaluation can draw held-out prompts from the same grammar
and judge generated images by colour segmentation against the same palette.
"""
from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

# Saturated, well-separated colours; backgrounds are near-neutral so segmentation by colour works.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (30, 160, 60),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (240, 120, 190),
}
# shape -> area of the shape / area of its bounding box (a cue for judging shapes in segments)
SHAPES: dict[str, float] = {
    "circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "star": 0.36,
}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars"}
# relation -> (axis, subject goes first along that axis)
RELATIONS: dict[str, tuple[str, bool]] = {
    "to the left of": ("x", True),
    "to the right of": ("x", False),
    "above": ("y", True),
    "below": ("y", False),
}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 3
# Objects large against the canvas (the embedded default trains at 32 px: radius 4.5-6 px) and a soft
# background texture: at radius 0.07-0.11 and texture amplitude 40 the tiny model learnt the texture
# and drew no objects (synthetic overall 0.017); the README has what it reaches at these settings.
RADIUS = (0.14, 0.18)  # object radius, relative to the short side
TEXTURE, TEXTURE_AMPLITUDE = 8, 12


def sample_groups(rng: random.Random) -> tuple[list[dict[str, Any]], str | None]:
    """Draw one or two object groups (colour, shape, count) and, for two, a spatial relation."""
    n_groups = 1 if rng.random() < 0.3 else 2
    colors = rng.sample(sorted(COLORS), n_groups)
    groups = [{"color": c, "shape": rng.choice(sorted(SHAPES)), "count": rng.randint(1, MAX_COUNT)}
              for c in colors]
    relation = rng.choice(sorted(RELATIONS)) if n_groups == 2 else None
    return groups, relation


def _place(rng: random.Random, region: tuple[float, float, float, float], count: int, rx: float,
           ry: float, taken: list[tuple[float, float, float, float]]) -> list[tuple[float, float]]:
    """Centres (relative coordinates) inside a region, avoiding overlap with already placed objects."""
    x0, y0, x1, y1 = region
    out: list[tuple[float, float]] = []
    for _ in range(count):
        for _attempt in range(200):
            cx = rng.uniform(x0 + rx, x1 - rx)
            cy = rng.uniform(y0 + ry, y1 - ry)
            if all(abs(cx - tx) > rx + trx or abs(cy - ty) > ry + try_ for tx, ty, trx, try_ in taken):
                break
        taken.append((cx, cy, rx, ry))
        out.append((cx, cy))
    return out


def sample_scene(rng: random.Random, width: int, height: int) -> dict[str, Any]:
    """A full scene: groups, relation, background and every object's position (JSON-serialisable)."""
    groups, relation = sample_groups(rng)
    shade = rng.randint(195, 225)
    tint = [rng.randint(-6, 6) for _ in range(3)]
    background = [min(255, max(0, shade + t)) for t in tint]
    radius = rng.uniform(*RADIUS)
    if relation is None:
        regions = [(0.0, 0.0, 1.0, 1.0)]
    else:
        axis, subject_first = RELATIONS[relation]
        first, second = ((0.0, 0.0, 0.48, 1.0), (0.52, 0.0, 1.0, 1.0)) if axis == "x" else \
            ((0.0, 0.0, 1.0, 0.48), (0.0, 0.52, 1.0, 1.0))
        regions = [first, second] if subject_first else [second, first]
    taken: list[tuple[float, float, float, float]] = []
    objects = []
    short = min(width, height)
    rx, ry = radius * short / width, radius * short / height
    for gi, (group, region) in enumerate(zip(groups, regions, strict=True)):
        for cx, cy in _place(rng, region, group["count"], rx, ry, taken):
            r_px = radius * short
            px, py = cx * width, cy * height
            objects.append({
                "group": gi, "color": group["color"], "rgb": list(COLORS[group["color"]]),
                "shape": group["shape"], "center": [round(cx, 4), round(cy, 4)], "radius": round(radius, 4),
                "bbox": [round(px - r_px), round(py - r_px), round(px + r_px), round(py + r_px)],
                "angle": rng.choice([0, 12, 24]) if group["shape"] == "star" else 0,
            })
    # an 8x8 grid of soft grey variations, upsampled when drawn: neutral (so colour segmentation
    # ignores it) but different per scene, which keeps perceptual hashes of distinct scenes apart
    texture = [rng.randint(0, 255) for _ in range(TEXTURE * TEXTURE)]
    return {"width": width, "height": height, "background": background, "texture": texture,
            "groups": groups, "relation": relation, "objects": objects}


def _phrase(group: dict[str, Any]) -> str:
    n, color, shape = group["count"], group["color"], group["shape"]
    if n == 1:
        return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
    return f"{NUMBERS[n]} {color} {PLURALS[shape]}"


def caption(scene: dict[str, Any]) -> str:
    """The full (synthetic) caption: every group, its count and colour, and the relation."""
    groups = scene["groups"]
    if scene.get("relation") is None:
        text = " and ".join(_phrase(g) for g in groups)
    else:
        text = f"{_phrase(groups[0])} {scene['relation']} {_phrase(groups[1])}"
    return f"{text} on a light gray background"


def short_caption(scene: dict[str, Any]) -> str:
    """The 'original' alt-text style caption: a few words, no counts or relation."""
    words = [f"{g['color']} {PLURALS[g['shape']] if g['count'] > 1 else g['shape']}" for g in scene["groups"]]
    return " and ".join(words)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(-90 + 120 * i, r) for i in range(3)]
    elif shape == "diamond":
        pts = [(90 * i, r) for i in range(4)]
    else:  # star
        pts = [(-90 + 36 * i + angle, r if i % 2 == 0 else r * 0.45) for i in range(10)]
    return [(cx + rr * math.cos(math.radians(a)), cy + rr * math.sin(math.radians(a))) for a, rr in pts]


def draw_scene(scene: dict[str, Any], size: tuple[int, int] | None = None) -> Image.Image:
    """Render a scene as an RGB image at its own size or at `size` (width, height)."""
    width, height = size or (scene["width"], scene["height"])
    bg = tuple(scene["background"])
    grid = Image.new("L", (TEXTURE, TEXTURE))
    grid.putdata(scene.get("texture") or [128] * TEXTURE * TEXTURE)
    soft = grid.resize((width, height), Image.Resampling.BICUBIC)
    a = TEXTURE_AMPLITUDE
    img = Image.merge("RGB", [soft.point([max(0, min(255, c - a + v * 2 * a // 255)) for v in range(256)])
                              for c in bg])
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for obj in scene["objects"]:
        cx, cy = obj["center"][0] * width, obj["center"][1] * height
        r = obj["radius"] * short
        color = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif obj["shape"] == "square":
            h = r * 0.85
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r, obj.get("angle", 0)), fill=color)
    return img
