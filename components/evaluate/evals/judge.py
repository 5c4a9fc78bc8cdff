"""An exact, weight-free judge for images of the synthetic scene grammar.

Each pixel is read as a blend of the image's (near-grey) background and one palette colour, as the
edges of a shape are once an image is resampled to the model's size; pixels at least half covered by a
colour belong to it. They are split into 4-connected components, and each component is matched
against the shapes of the grammar rendered by the same drawing code (analysis by synthesis). At small
sizes several shapes can rasterise to nearly the same pixels, so a component keeps every shape that fits
almost as well as the best one: the judge never rejects a correct drawing, and a blob that fits no shape
is not an object. Prompts are then checked as GenEval checks its categories, with shape as the object
class and colour as the attribute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fusedit.components.data import scenes

PALETTE_NAMES = sorted(scenes.COLORS)
PALETTE = np.array([scenes.COLORS[c] for c in PALETTE_NAMES], dtype=np.float32)
# ideal area / r^2 of each shape as drawn by scenes.draw_scene (square half-side is 0.85 r)
AREA_FACTOR = {"circle": math.pi, "square": 4 * 0.85 ** 2, "triangle": 3 * math.sqrt(3) / 4,
               "diamond": 2.0, "star": 10 * 0.5 * 0.45 * math.sin(math.radians(36))}
STAR_ANGLES = (0, 12, 24)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class JudgeConfig:
    max_color_dist: float = 50.0  # RGB distance to the best blend of the background and a palette colour
    min_chroma: float = 50.0  # max - min channel of the pixels the background colour is estimated from
    min_area_frac: float = 0.002  # of the image; at 32 px that is 2 pixels
    min_iou: float = 0.5  # a component that fits no shape this well is not an object
    min_ring_neutral: float = 0.65  # share of the pixels around a component that must be background
    shape_margin: float = 0.08  # shapes within this IoU of the best one are all accepted
    position_margin: float = 0.02  # of the image side, between the two centres along the axis


@dataclass
class Detection:
    color: str
    shapes: tuple[str, ...]  # accepted shapes, best first
    iou: float
    center: tuple[float, float]  # relative (x, y)
    area: int


@dataclass
class Verdict:
    correct: bool
    reason: str
    detections: list[Detection] = field(default_factory=list)


def background(rgb: np.ndarray, cfg: JudgeConfig) -> np.ndarray:
    """(3,) the image's background colour: the median of its near-grey pixels (mid-grey when it has none)."""
    px = rgb.reshape(-1, 3).astype(np.float32)
    grey = (px.max(-1) - px.min(-1)) < cfg.min_chroma
    return np.median(px[grey], axis=0) if grey.any() else np.full(3, 128.0, np.float32)


def segment(rgb: np.ndarray, cfg: JudgeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (H, W) palette index (-1 elsewhere) and the (H, W) background mask.

    Every pixel is read as a blend bg + a (c - bg) of the background and one palette colour c, a in [0, 1]:
    an image resampled to a smaller size (the training targets are) blends each shape's edge with the
    background. The best-fitting colour claims the pixel when a >= 0.5 (at least half covered, as a
    rasteriser decides) and the blend is within max_color_dist of it; a pixel whose best blend has
    a < 0.5 is background; a pixel no blend fits (noise, an off-palette colour) is neither.
    """
    px = rgb.astype(np.float32)
    bg = background(rgb, cfg)
    d = PALETTE - bg  # (K, 3)
    a = np.clip(np.einsum("hwc,kc->hwk", px - bg, d) / (d * d).sum(-1), 0.0, 1.0)
    dist = np.linalg.norm(px[:, :, None, :] - (bg + a[..., None] * d), axis=-1)  # (H, W, K)
    best = dist.argmin(-1)
    fits = np.take_along_axis(dist, best[..., None], -1)[..., 0] <= cfg.max_color_dist
    covered = np.take_along_axis(a, best[..., None], -1)[..., 0] >= 0.5
    return np.where(fits & covered, best, -1), fits & ~covered


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask by min-label propagation (0 = background)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        nxt = lab.copy()
        nxt[1:] = np.minimum(nxt[1:], lab[:-1])
        nxt[:-1] = np.minimum(nxt[:-1], lab[1:])
        nxt[:, 1:] = np.minimum(nxt[:, 1:], lab[:, :-1])
        nxt[:, :-1] = np.minimum(nxt[:, :-1], lab[:, 1:])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    ids, inv = np.unique(np.where(mask, lab, 0), return_inverse=True)
    out = inv.reshape(h, w)
    if ids[0] != 0:  # every pixel is foreground
        out = out + 1
    return out, int(out.max())


def _template(shape: str, cx: float, cy: float, r: float, angle: float, size: tuple[int, int]) -> np.ndarray:
    """The shape as draw_scene draws it, into a boolean patch of `size` (w, h)."""
    img = Image.new("1", size)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=1)
    else:
        draw.polygon(scenes._polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(img, dtype=bool)


def _ring(comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels 4-adjacent to a component but outside it."""
    grown = comp.copy()
    grown[1:] |= comp[:-1]
    grown[:-1] |= comp[1:]
    grown[:, 1:] |= comp[:, :-1]
    grown[:, :-1] |= comp[:, 1:]
    return np.nonzero(grown & ~comp)


OFFSETS = (-0.25, 0.15, 0.5, 0.85)  # PIL's polygon fill sits about half a pixel from the pixel centroid
SCALES = (0.7, 0.8, 0.9, 1.0, 1.1)  # small shapes rasterise larger than their ideal area


def _best_iou(comp: np.ndarray, shape: str, r0: float, cx: float, cy: float, offsets, scales) -> float:
    h, w = comp.shape
    best = 0.0
    for angle in (STAR_ANGLES if shape == "star" else (0,)):
        for scale in scales:
            for dx in offsets:
                for dy in offsets:
                    t = _template(shape, cx + dx, cy + dy, r0 * scale, angle, (w, h))
                    union = np.count_nonzero(t | comp)
                    best = max(best, np.count_nonzero(t & comp) / union if union else 0.0)
                    if best == 1.0:
                        return best
    return best


def fit_shapes(comp: np.ndarray) -> list[tuple[float, str]]:
    """Best IoU of each shape against a component mask (a patch around it), best first.

    A coarse pass over every shape, then the full search for the shapes that might still win.
    """
    ys, xs = np.nonzero(comp)
    cy, cx, area = ys.mean(), xs.mean(), len(xs)
    r0 = {s: math.sqrt(area / k) for s, k in AREA_FACTOR.items()}
    coarse = {s: _best_iou(comp, s, r0[s], cx, cy, (0.15, 0.5), (0.8, 0.95)) for s in AREA_FACTOR}
    top = max(coarse.values())
    fine = {s: max(v, _best_iou(comp, s, r0[s], cx, cy, OFFSETS, SCALES)) if v >= top - 0.25 else v
            for s, v in coarse.items()}
    return sorted(((v, s) for s, v in fine.items()), reverse=True)


def detect(image: Image.Image, cfg: JudgeConfig | None = None) -> list[Detection]:
    """Every object in an image: palette colour, accepted shapes, fit and relative centre."""
    cfg = cfg or JudgeConfig()
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    seg, neutral = segment(rgb, cfg)
    min_area = max(2, int(cfg.min_area_frac * h * w))
    found = []
    for ci, name in enumerate(PALETTE_NAMES):
        labels, n = label(seg == ci)
        for k in range(1, n + 1):
            comp = labels == k
            ys, xs = np.nonzero(comp)
            if len(xs) < min_area:
                continue
            if _ring(comp)[0].size and neutral[_ring(comp)].mean() < cfg.min_ring_neutral:
                continue  # not an object on a background (e.g. a speck in noise)
            pad = 3
            y0, y1, x0, x1 = max(0, ys.min() - pad), ys.max() + pad + 1, max(0, xs.min() - pad), xs.max() + pad + 1
            fits = fit_shapes(comp[y0:y1, x0:x1])
            if fits[0][0] < cfg.min_iou:
                continue
            shapes = tuple(s for iou, s in fits if iou >= max(cfg.min_iou, fits[0][0] - cfg.shape_margin))
            found.append(Detection(name, shapes, round(fits[0][0], 4), ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h),
                                   len(xs)))
    return found


def _of(dets: list[Detection], shape: str, color: str | None = None) -> list[Detection]:
    return [d for d in dets if shape in d.shapes and (color is None or d.color == color)]


def check(spec: dict[str, Any], dets: list[Detection], cfg: JudgeConfig | None = None) -> Verdict:
    """GenEval's rule for the prompt's category, with shape as the class and colour as the attribute."""
    cfg = cfg or JudgeConfig()
    cat, groups = spec["category"], spec["groups"]
    g0 = groups[0]
    if cat == "single_object":
        ok = bool(_of(dets, g0["shape"]))
        return Verdict(ok, "" if ok else f"no {g0['shape']}", dets)
    if cat == "counting":
        n = len(_of(dets, g0["shape"]))
        return Verdict(n == g0["count"], f"{n} {g0['shape']}(s), expected {g0['count']}", dets)
    if cat == "colors":
        found = _of(dets, g0["shape"])
        ok = bool(found) and all(d.color == g0["color"] for d in found)
        return Verdict(ok, "" if ok else f"{g0['shape']} colours {[d.color for d in found]}", dets)
    g1 = groups[1]
    if cat == "two_object":
        miss = [g["shape"] for g in groups if not _of(dets, g["shape"])]
        return Verdict(not miss, f"missing {miss}" if miss else "", dets)
    if cat == "color_attr":
        miss = [f"{g['color']} {g['shape']}" for g in groups if not _of(dets, g["shape"], g["color"])]
        return Verdict(not miss, f"missing {miss}" if miss else "", dets)
    if cat == "position":
        a, b = _of(dets, g0["shape"]), _of(dets, g1["shape"])
        if not a or not b:
            return Verdict(False, "missing an object", dets)
        axis, first = scenes.RELATIONS[spec["relation"]]
        i = 0 if axis == "x" else 1
        ok = any((db.center[i] - da.center[i] if first else da.center[i] - db.center[i]) > cfg.position_margin
                 for da in a for db in b)
        return Verdict(ok, "" if ok else f"not {spec['relation']}", dets)
    raise ValueError(f"unknown category {cat!r}")


def judge(image: Image.Image, spec: dict[str, Any], cfg: JudgeConfig | None = None) -> Verdict:
    return check(spec, detect(image, cfg), cfg)
