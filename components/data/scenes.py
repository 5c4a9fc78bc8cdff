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
NUMBERS = {1: "one", 2: "two", 3: "three"}
# objects per group, by the number of groups: up to three in a one-group scene, one each in a two-group
# scene (a pair of groups of two would shrink four objects to a radius of 4 px at 32 px)
MAX_COUNT = {1: 3, 2: 1}
ONE_GROUP = 0.5  # share of one-group scenes
COUNT_WEIGHTS = (2, 1, 1)  # relative odds of 1, 2 and 3 objects in a one-group scene
# Object radius (relative to the short side) by the number of objects in the scene: fewer, larger
# objects, so shapes are told apart at the embedded default's 32 px (a lone object is 7-9 px in radius,
# each of a pair about 6). The README's prompt-following section has what the tiny model reaches on it.
RADIUS = {1: (0.24, 0.28), 2: (0.18, 0.20), 3: (0.14, 0.16)}
GAP = 0.06  # least gap between two objects' boxes (of the short side): the judge's blobs never touch
TEXTURE, TEXTURE_AMPLITUDE = 8, 12


def sample_groups(rng: random.Random) -> tuple[list[dict[str, Any]], str | None]:
    """Draw one or two object groups (colour, shape, count) and, for two, a spatial relation."""
    n_groups = 1 if rng.random() < ONE_GROUP else 2
    colors = rng.sample(sorted(COLORS), n_groups)
    counts = range(1, MAX_COUNT[n_groups] + 1)
    groups = [{"color": c, "shape": rng.choice(sorted(SHAPES)),
               "count": rng.choices(counts, COUNT_WEIGHTS[:len(counts)])[0]} for c in colors]
    relation = rng.choice(sorted(RELATIONS)) if n_groups == 2 else None
    return groups, relation


def _regions(relation: str | None) -> list[tuple[float, float, float, float]]:
    """The region of each group: the whole canvas, or the two halves in the relation's order."""
    if relation is None:
        return [(0.0, 0.0, 1.0, 1.0)]
    axis, subject_first = RELATIONS[relation]
    first, second = ((0.0, 0.0, 0.48, 1.0), (0.52, 0.0, 1.0, 1.0)) if axis == "x" else \
        ((0.0, 0.0, 1.0, 0.48), (0.0, 0.52, 1.0, 1.0))
    return [first, second] if subject_first else [second, first]


# Where a group's objects sit in its region (relative to it), by count: a layout the caption decides, so
# a small model can learn it; JITTER (of the short side) moves each object about its anchor.
ANCHORS = {1: [(0.5, 0.5)], 2: [(0.27, 0.5), (0.73, 0.5)], 3: [(0.27, 0.3), (0.73, 0.3), (0.5, 0.73)]}
JITTER = 0.04


def _anchors(count: int, region: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """A group's anchors in canvas coordinates; a pair lies along the region's long side."""
    x0, y0, x1, y1 = region
    pts = ANCHORS[count]
    if count == 2 and (y1 - y0) > (x1 - x0):
        pts = [(y, x) for x, y in pts]
    return [(x0 + ax * (x1 - x0), y0 + ay * (y1 - y0)) for ax, ay in pts]


def _layout(rng: random.Random, groups: list[dict[str, Any]], relation: str | None, r: float,
            gap: float, attempts: int = 20) -> list[list[tuple[float, float]]] | None:
    """Centres (relative) of every group's objects: each anchor moved by up to JITTER, inside its region
    and each box at least `gap` from every other; None when the anchors themselves do not fit."""
    regions = _regions(relation)
    anchors = [_anchors(g["count"], reg) for g, reg in zip(groups, regions, strict=True)]
    for attempt in range(attempts + 1):
        j = JITTER if attempt < attempts else 0.0  # the last try: the anchors as they are
        out = [[(ax + rng.uniform(-j, j), ay + rng.uniform(-j, j)) for ax, ay in group] for group in anchors]
        flat = [(c, reg) for group, reg in zip(out, regions, strict=True) for c in group]
        inside = all(x0 + r <= c[0] <= x1 - r and y0 + r <= c[1] <= y1 - r for c, (x0, y0, x1, y1) in flat)
        apart = all(abs(a[0] - b[0]) >= 2 * r + gap or abs(a[1] - b[1]) >= 2 * r + gap
                    for i, (a, _) in enumerate(flat) for b, _ in flat[i + 1:])
        if inside and apart:
            return out
    return None


def sample_scene(rng: random.Random, width: int, height: int) -> dict[str, Any]:
    """A full scene: groups, relation, background and every object's position (JSON-serialisable).

    Invariants: the caption decides the layout (each object within JITTER of its group's anchor in the
    group's region: the whole square, or the half the relation names); every object lies inside the
    centred square of the canvas's short side, so the resize-and-centre-crop the feature cache applies
    keeps every object of the caption whole, at any aspect ratio;
    no two objects' bounding boxes come closer than GAP (of the short side), so every object is its own
    connected blob; a layout without room is redrawn (new radius and positions), never forced.
    """
    groups, relation = sample_groups(rng)
    shade = rng.randint(195, 225)
    tint = [rng.randint(-6, 6) for _ in range(3)]
    background = [min(255, max(0, shade + t)) for t in tint]
    short = min(width, height)
    n_objects = sum(g["count"] for g in groups)
    layout = None
    while layout is None:  # in the centred square's own relative coordinates
        radius = rng.uniform(*RADIUS[n_objects])
        layout = _layout(rng, groups, relation, radius, GAP)
    off_x, off_y = (width - short) / 2, (height - short) / 2
    objects = []
    for gi, (group, centres) in enumerate(zip(groups, layout, strict=True)):
        for sx, sy in centres:
            r_px = radius * short
            px, py = off_x + sx * short, off_y + sy * short
            objects.append({
                "group": gi, "color": group["color"], "rgb": list(COLORS[group["color"]]),
                "shape": group["shape"], "center": [round(px / width, 4), round(py / height, 4)],
                "radius": round(radius, 4),
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
