"""Small inline SVG charts for the self-contained HTML reports (no scripts, no external assets).

Histograms stay readable on skewed data: bins span a robust range (Tukey fences, 3 IQR beyond the
quartiles, in log space for positive data), values outside it go to an underflow / overflow bar of
their own, and a range that still spans two decades or more gets log-spaced bins. Category charts are
horizontal bars, one row per label, so long labels never collide; histogram axis labels are placed
greedily so that none overlap.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

CHAR_W = 0.62  # estimated advance of one character, in em (generous for system-ui digits and letters)
OVERFLOW = "#8a8a8a"


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def text_width(text: str, size: float) -> float:
    return len(text) * size * CHAR_W


@dataclass
class Bins:
    edges: list[float]  # the regular bins' edges, inside [lo, hi]
    log: bool

    @property
    def lo(self) -> float:
        return self.edges[0]

    @property
    def hi(self) -> float:
        return self.edges[-1]


def clean(values: Any) -> Any:
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)] if arr.size else arr


def fences(arr: Any, k: float = 3.0) -> tuple[float, float]:
    """[lo, hi]: the range of the values within Tukey's fences (k IQR beyond the quartiles).

    Non-negative data with a positive median is fenced in log space (by factors of (q3/q1)^k), so
    a few 1-pixel images or 0-character captions fall below the range instead of stretching it.
    """
    import numpy as np

    positive = arr[arr > 0]
    if arr.min() >= 0 and np.median(arr) > 0:
        q1, q3 = np.log(np.percentile(positive, [25, 75]))
        lo, hi = float(np.exp(q1 - k * (q3 - q1))), float(np.exp(q3 + k * (q3 - q1)))
    else:
        q1, q3 = np.percentile(arr, [25, 75])
        lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    inside = arr[(arr >= lo) & (arr <= hi)]
    lo, hi = (float(inside.min()), float(inside.max())) if inside.size else (lo, hi)  # bins span the inliers
    if hi <= lo:  # (nearly) one value: the 1st-99th percentile, else the full range
        lo, hi = (float(x) for x in np.percentile(arr, [1, 99]))
        if hi <= lo:
            lo, hi = float(arr.min()), float(arr.max()) if arr.max() > arr.min() else float(arr.min()) + 1
    return lo, hi


def robust_bins(arr: Any, n: int = 20) -> Bins:
    """n bins over the fenced range of `arr`: linear, or log-spaced when it still spans >= 2 decades."""
    import numpy as np

    lo, hi = fences(arr)
    log = lo > 0 and hi / lo >= 100
    edges = np.geomspace(lo, hi, n + 1) if log else np.linspace(lo, hi, n + 1)
    return Bins([float(e) for e in edges], log)


def bin_counts(arr: Any, bins: Bins) -> tuple[int, list[int], int]:
    """(below lo, per-bin counts, above hi)."""
    import numpy as np

    inside = arr[(arr >= bins.lo) & (arr <= bins.hi)]
    counts, _ = np.histogram(inside, bins=bins.edges)
    return int((arr < bins.lo).sum()), [int(c) for c in counts], int((arr > bins.hi).sum())


def _labels(slots: list[tuple[float, str, bool]], y: float, width: float, size: float = 10) -> list[str]:
    """Axis labels centred at x (kept inside 0..width); forced ones first, then the others wherever they
    fit without overlapping one already placed."""
    taken: list[tuple[float, float]] = []
    out = []
    for force in (True, False):
        for x, text, forced in slots:
            if forced != force or not text:
                continue
            half = text_width(text, size) / 2 + 2
            x = min(max(x, half), width - half)
            if any(x - half < b and a < x + half for a, b in taken):
                continue
            taken.append((x - half, x + half))
            out.append(f'<text class="xl" x="{x:.1f}" y="{y:.1f}" font-size="{size}" '
                       f'text-anchor="middle">{_esc(text)}</text>')
    return out


def _frame(title: str, width: int, height: int) -> list[str]:
    shown = title
    while len(shown) > 8 and text_width(shown, 13) > width - 16:
        shown = shown[:-2] + "\u2026"
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
            f'<text class="title" x="8" y="16" font-size="13" font-weight="600">{_esc(shown)}</text>']


def svg_category_bars(labels: list[str], values: list[float], title: str, width: int = 520,
                      color: str = "#c2554a") -> str:
    """Horizontal bars, one row per category: label on the left, count after the bar."""
    row, top, size = 20, 28, 11
    label_w = max([text_width(lab, size) for lab in labels] + [40]) + 12
    value_w = max([text_width(f"{v:g}", size) for v in values] + [10]) + 8
    width = max(width, int(label_w + value_w + 120))
    plot_w = width - label_w - value_w - 8
    vmax = max(values) if values and max(values) > 0 else 1
    parts = _frame(title, width, top + row * max(1, len(labels)) + 8)
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        y, w = top + i * row, plot_w * v / vmax
        parts += [f'<text class="yl" x="{label_w - 6:.1f}" y="{y + 14}" font-size="{size}" '
                  f'text-anchor="end">{_esc(lab)}</text>',
                  f'<rect x="{label_w:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" height="{row - 6}" '
                  f'fill="{color}"><title>{_esc(lab)}: {v:g}</title></rect>',
                  f'<text class="vl" x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="{size}">{v:g}</text>']
    parts.append("</svg>")
    return "".join(parts)


def _bars(values: list[float], colors: list[str], tips: list[str], title: str,
          ticks: list[tuple[float, str, bool]], width: int = 520, height: int = 230, counts: bool = True) -> str:
    """Vertical bars; ticks are (x in bar widths from the left, text, forced); counts above bars that fit."""
    n = max(1, len(values))
    top, bottom, left = 34, 30, 8
    plot_h, bar_w = height - top - bottom, (width - 2 * left) / n
    vmax = max(values) if values and max(values) > 0 else 1
    parts = _frame(title, width, height)
    for i, (v, color) in enumerate(zip(values, colors, strict=True)):
        h, x = plot_h * v / vmax, left + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{_esc(tips[i])}</title></rect>')
        if counts and v and text_width(f"{v:g}", 10) <= bar_w - 2:
            parts.append(f'<text class="vl" x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 3:.1f}" '
                         f'font-size="10" text-anchor="middle">{v:g}</text>')
    parts += _labels([(left + pos * bar_w, text, forced) for pos, text, forced in ticks], top + plot_h + 14,
                     width)
    parts.append("</svg>")
    return "".join(parts)


def _ticks(bins: Bins, under: bool, over: bool, per_bucket: int = 1) -> list[tuple[float, str, bool]]:
    """Bin edges at the bars' borders; '<lo' and '>hi' under the underflow / overflow bars (forced,
    else the outer edges are)."""
    off = int(under)
    n = len(bins.edges) - 1
    ticks = [(per_bucket * (off + i), _num(e), (i == 0 and not under) or (i == n and not over))
             for i, e in enumerate(bins.edges)]
    if under:
        ticks.append((per_bucket * 0.5, f"<{_num(bins.lo)}", True))
    if over:
        ticks.append((per_bucket * (off + n + 0.5), f">{_num(bins.hi)}", True))
    return ticks


def svg_histogram(values: Any, title: str, bins: int = 20, color: str = "#4a78c2") -> str:
    """Histogram over a robust range, with grey underflow / overflow bars for what lies outside it."""
    arr = clean(values)
    if arr.size == 0:
        return svg_category_bars([], [], f"{title} (no data)")
    b = robust_bins(arr, bins)
    under, counts, over = bin_counts(arr, b)
    vals = ([under] if under else []) + counts + ([over] if over else [])
    colors = ([OVERFLOW] if under else []) + [color] * len(counts) + ([OVERFLOW] if over else [])
    names = ([f"< {_num(b.lo)}"] if under else []) + \
        [f"[{_num(b.edges[i])}, {_num(b.edges[i + 1])})" for i in range(len(counts))] + \
        ([f"> {_num(b.hi)}"] if over else [])
    notes = [f"n={arr.size}"] + (["log bins"] if b.log else []) + \
        ([f"{under + over} outside [{_num(b.lo)}, {_num(b.hi)}]"] if under + over else [])
    return _bars(vals, colors, [f"{nm}: {v}" for nm, v in zip(names, vals, strict=True)],
                 f"{title} ({', '.join(notes)})", _ticks(b, bool(under), bool(over)))


def svg_paired_histogram(old: Any, new: Any, title: str, bins: int = 16,
                         colors: tuple[str, str] = ("#9aa5b1", "#4a78c2")) -> str:
    """Two versions on shared robust bins, as shares of each version's count (old left, new right)."""
    import numpy as np

    a, b = clean(old), clean(new)
    if a.size == 0 or b.size == 0:
        return svg_category_bars([], [], f"{title} (no data on one side)")
    edges = robust_bins(np.concatenate([a, b]), bins)
    (ua, ca, oa), (ub, cb, ob) = bin_counts(a, edges), bin_counts(b, edges)
    under, over = ua + ub > 0, oa + ob > 0
    fa = ([ua] if under else []) + ca + ([oa] if over else [])
    fb = ([ub] if under else []) + cb + ([ob] if over else [])
    vals, cols, tips = [], [], []
    for i in range(len(fa)):
        for side, counts, n in (("old", fa, a.size), ("new", fb, b.size)):
            vals.append(round(counts[i] / n, 4))
            cols.append(colors[side == "new"])
            tips.append(f"{side}: {counts[i]} of {n}")
    legend = f"{title} (share of samples; grey old, blue new{'; log bins' if edges.log else ''})"
    return _bars(vals, cols, tips, legend, _ticks(edges, under, over, 2), width=560, counts=False)
