"""The one self-contained HTML page a person reads first after a filter run.

Numbers, reject reasons, histograms as inline SVG, a thumbnail grid of kept and rejected samples
(base64 JPEGs), the data-quality checks, and a link to the full GX Data Docs. No external assets,
so it opens from a KFP HTML artifact or a laptop alike.
"""
from __future__ import annotations

import html
from typing import Any

from fusedit.components.filter_config import FilterConfig

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176f2c;font-weight:600}.bad{color:#b3261e;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:16px}.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:136px;font-size:11px}figure img{max-width:128px;max-height:128px;display:block}
.ph{width:128px;height:96px;background:#f2f2f2;display:flex;align-items:center;justify-content:center;
color:#888;font-size:11px;text-align:center}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def svg_bars(labels: list[str], values: list[float], title: str, width: int = 520, height: int = 220,
             color: str = "#4a78c2") -> str:
    """A small inline SVG bar chart (labels under bars, counts above)."""
    n = max(1, len(values))
    top, bottom, left = 24, 46, 8
    plot_h, bar_w = height - top - bottom, (width - 2 * left) / n
    vmax = max(values) if values and max(values) > 0 else 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
             f'<text x="{left}" y="15" font-size="13" font-weight="600">{_esc(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = plot_h * v / vmax
        x = left + i * bar_w
        y = top + plot_h - h
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{_esc(lab)}: {v:g}</title></rect>')
        if n <= 24 and v:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" font-size="10" '
                         f'text-anchor="middle">{v:g}</text>')
        if n <= 12 or i % max(1, n // 8) == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" font-size="10" '
                         f'text-anchor="middle" transform="rotate(20 {x + bar_w / 2:.1f} '
                         f'{top + plot_h + 14})">{_esc(lab)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(values: Any, title: str, bins: int = 20) -> str:
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)] if arr.size else arr
    if arr.size == 0:
        return svg_bars([], [], f"{title} (no data)")
    counts, edges = np.histogram(arr, bins=bins)
    labels = [f"{edges[i]:.3g}" for i in range(len(counts))]
    return svg_bars(labels, [int(c) for c in counts], f"{title} (n={arr.size})")


def _thumb_grid(items: list[tuple[str, str | None, str]]) -> str:
    cells = []
    for key, b64, label in items:
        pic = (f'<img alt="{_esc(key)}" src="data:image/jpeg;base64,{b64}">' if b64
               else f'<div class="ph">{_esc(label)}<br>(no image)</div>')
        cells.append(f"<figure>{pic}<figcaption>{_esc(key)}<br>{_esc(label)}</figcaption></figure>")
    return f'<div class="grid">{"".join(cells) or "<p>none</p>"}</div>'


def write_report(path: str, metrics: dict[str, Any], stats: Any, thumbs: dict[tuple[str, int], str],
                 quality: Any, cfg: FilterConfig) -> None:
    """Write report/index.html from the run's metrics, stats frame, thumbnails and quality result."""
    m = metrics

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    summary = [
        ("Input samples", m["n_in"]), ("Kept", m["n_kept"]), ("Rejected", m["n_rejected"]),
        ("Reject rate", pct(m["reject_rate"])), ("Duplicate rate", pct(m["duplicate_rate"])),
        ("Decode-failure rate", pct(m["decode_failure_rate"])),
        ("Converted to RGB", m["n_converted"]), ("Input shards", m["n_shards_in"]),
        ("Output shards", m["n_shards_out"]), ("Bad shards", m["n_bad_shards"]),
        ("Token-length check", "on" if m["tokenizer_checked"] else "off (no tokenizer given)"),
    ]
    reasons = {k: v for k, v in m["reasons"].items() if v}
    status = ('<span class="ok">PASSED</span>' if quality.success
              else '<span class="bad">FAILED</span>')
    checks = "".join(
        f'<tr><td class="{"ok" if c["success"] else "bad"}">{"pass" if c["success"] else "FAIL"}</td>'
        f'<td>{_esc(c["name"])}</td><td>{_esc(c["expectation"])}</td><td>{_esc(c["observed"])}</td></tr>'
        for c in quality.checks)
    docs = (f'<a href="{_esc(quality.docs_index)}">Great Expectations Data Docs</a> · '
            if quality.docs_index else "")
    decoded = stats[stats["width"].notna()] if len(stats) else stats
    charts = [svg_bars(list(reasons), list(reasons.values()), "Reject reasons", color="#c2554a")
              if reasons else "<p>No rejects.</p>"]
    if len(decoded):
        charts += [svg_histogram(decoded["width"].tolist(), "Width (px)"),
                   svg_histogram(decoded["height"].tolist(), "Height (px)"),
                   svg_histogram(decoded["aspect"].tolist(), "Aspect ratio (w/h)")]
    if len(stats):
        charts.append(svg_histogram(stats["caption_chars"].dropna().tolist(), "Caption length (chars)"))
        if stats["caption_tokens"].notna().any():
            charts.append(svg_histogram(stats["caption_tokens"].dropna().tolist(), "Caption length (tokens)"))
    kept_items, rej_items = [], []
    for r in stats.itertuples(index=False) if len(stats) else []:
        b64 = thumbs.get((r.shard, int(r.index)))
        if r.decision == "kept" and b64 and len(kept_items) < cfg.thumbnails:
            kept_items.append((r.key, b64, f"{r.width}x{r.height}"))
        elif r.decision == "rejected" and len(rej_items) < cfg.thumbnails and (
                b64 or sum(1 for it in rej_items if it[2] == r.reason) < 2):
            rej_items.append((r.key, b64, r.reason))
    bad = "".join(f"<li><code>{_esc(b['shard'])}</code>: {_esc(b['detail'])}</li>" for b in m["bad_shards"])
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fusedit data filter report</title><style>{_CSS}</style></head><body>
<h1>Data filter report</h1>
<p>Output: <code>{_esc(cfg.output)}</code> · Data quality: {status}
 ({quality.evaluated - len(quality.failed)}/{quality.evaluated} expectations met)</p>
<h2>Summary</h2><table id="summary">{"".join(
        f'<tr><th>{_esc(k)}</th><td class="n" data-metric="{_esc(k)}">{_esc(v)}</td></tr>' for k, v in summary)}
</table>
<h2>Reject reasons</h2><table id="reasons">{"".join(
        f'<tr><th>{_esc(k)}</th><td class="n">{v}</td></tr>' for k, v in reasons.items()) or "<tr><td>none</td></tr>"}
</table>
{f"<h2>Bad shards</h2><ul>{bad}</ul>" if bad else ""}
<h2>Distributions</h2><div class="charts">{"".join(charts)}</div>
<h2>Data-quality checks</h2><table id="checks"><tr><th></th><th>check</th><th>expectation</th>
<th>observed</th></tr>{checks}</table>
<p>{docs}<a href="validation.json">validation result (JSON)</a> · <a href="../rejects.jsonl">rejects.jsonl</a>
 · <a href="../stats.parquet">stats.parquet</a></p>
<h2>Kept samples</h2>{_thumb_grid(kept_items)}
<h2>Rejected samples</h2>{_thumb_grid(rej_items)}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
