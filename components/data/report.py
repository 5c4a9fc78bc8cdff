"""The one self-contained HTML page a person reads first after a filter run.

Numbers, reject reasons, histograms as inline SVG (`charts`), the data-quality checks, a link to the
full GX Data Docs, and a bounded, seeded sample of kept samples and of every reject reason (`examples`):
key, shard, the measured value that failed, a thumbnail or a tile saying why there is none, and for a
duplicate the kept sample it duplicates beside it. No external assets, so it opens from a KFP HTML
artifact or a laptop alike; its size is bounded by the example counts, not by the data set.
"""
from __future__ import annotations

import html
from typing import Any

from fusedit.components.data.charts import svg_category_bars, svg_histogram
from fusedit.components.data.filter_config import FilterConfig

BASE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176f2c;font-weight:600}.bad{color:#b3261e;font-weight:600}
"""  # the data pages' shared look (this report, `fusedit data compare`)
_CSS = BASE_CSS + """.charts{display:flex;flex-wrap:wrap;gap:16px}.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:136px;font-size:11px;overflow-wrap:anywhere}
figure img{max-width:128px;max-height:128px;display:block}
figure.pair{width:272px}.pics{display:flex;gap:8px;align-items:flex-start}.side{width:128px}
.ph{width:128px;height:96px;background:#f2f2f2;display:flex;align-items:center;justify-content:center;
color:#888;font-size:11px;text-align:center}.tile{background:#fbe9e7;color:#b3261e;font-weight:600}
.value{color:#b3261e}.muted{color:#777}section.reason h3{font-size:14px;margin:18px 0 6px}
#rejected{display:flex;flex-wrap:wrap;column-gap:32px;align-items:flex-start}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _shard_name(uri: str | None) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1] if uri else ""


def _pic(ex: dict[str, Any], tile: str | None = None) -> str:
    if ex.get("thumb"):
        return f'<img alt="{_esc(ex["key"])}" src="data:image/jpeg;base64,{ex["thumb"]}">'
    return f'<div class="ph tile">{_esc(tile or "no thumbnail")}</div>'


def _where(ex: dict[str, Any]) -> str:
    index = f" #{ex['index']}" if ex.get("index") is not None else ""
    return (f'<code class="key">{_esc(ex["key"])}</code><br>'
            f'<span class="shard muted" title="{_esc(ex["shard"])}">{_esc(_shard_name(ex["shard"]))}{index}</span>')


def _kept_grid(items: list[dict[str, Any]]) -> str:
    cells = [f'<figure class="kept" data-key="{_esc(ex["key"])}">{_pic(ex)}<figcaption>{_where(ex)}<br>'
             f'{_esc(ex["detail"])}</figcaption></figure>' for ex in items]
    return f'<div class="grid">{"".join(cells) or "<p>none</p>"}</div>'


def _example(ex: dict[str, Any]) -> str:
    size = f'<br><span class="muted">{_esc(ex["size"])}</span>' if ex.get("size") else ""
    caption = f'<figcaption>{_where(ex)}<br><span class="value">{_esc(ex["detail"])}</span>{size}</figcaption>'
    attrs = f'data-key="{_esc(ex["key"])}" data-shard="{_esc(_shard_name(ex["shard"]))}"'
    orig = ex.get("original")
    if orig is None:
        return f'<figure class="ex" {attrs}>{_pic(ex, ex.get("tile"))}{caption}</figure>'
    return (f'<figure class="ex pair" {attrs} data-original="{_esc(orig["key"])}"><div class="pics">'
            f'<div class="side dup">{_pic(ex, ex.get("tile"))}<span class="muted">rejected</span></div>'
            f'<div class="side orig">{_pic(orig)}<span class="muted">kept: <code>{_esc(orig["key"])}</code> '
            f'({_esc(_shard_name(orig["shard"]))} #{orig["index"]})</span></div></div>{caption}</figure>')


def _reject_sections(reasons: dict[str, int], examples: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    for reason, n in reasons.items():
        shown = examples.get(reason, [])
        figs = "".join(_example(ex) for ex in shown) or "<p>no example rows (see rejects.jsonl)</p>"
        out.append(f'<section class="reason" data-reason="{_esc(reason)}"><h3>{_esc(reason)} '
                   f'<span class="muted">({n} rejected, {len(shown)} shown)</span></h3>'
                   f'<div class="grid">{figs}</div></section>')
    return "".join(out) or "<p>No rejects.</p>"


def _charts(reasons: dict[str, int], stats: Any) -> list[str]:
    charts = [svg_category_bars(list(reasons), list(reasons.values()), "Reject reasons")
              if reasons else "<p>No rejects.</p>"]
    decoded = stats[stats["width"].notna()] if len(stats) else stats
    if len(decoded):
        charts += [svg_histogram(decoded["width"].tolist(), "Width (px)"),
                   svg_histogram(decoded["height"].tolist(), "Height (px)"),
                   svg_histogram(decoded["aspect"].tolist(), "Aspect ratio (w/h)")]
    if len(stats):
        charts.append(svg_histogram(stats["caption_chars"].dropna().tolist(), "Caption length (chars)"))
        if stats["caption_tokens"].notna().any():
            charts.append(svg_histogram(stats["caption_tokens"].dropna().tolist(), "Caption length (tokens)"))
    return charts


def _summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    return [
        ("Input samples", m["n_in"]), ("Kept", m["n_kept"]), ("Rejected", m["n_rejected"]),
        ("Reject rate", pct(m["reject_rate"])), ("Duplicate rate", pct(m["duplicate_rate"])),
        ("Decode-failure rate", pct(m["decode_failure_rate"])),
        ("Converted to RGB", m["n_converted"]), ("Input shards", m["n_shards_in"]),
        ("Output shards", m["n_shards_out"]), ("Bad shards", m["n_bad_shards"]),
        ("Token-length check", "on" if m["tokenizer_checked"] else "off (no tokenizer given)"),
    ]


def _checks(quality: Any) -> str:
    return "".join(
        f'<tr><td class="{"ok" if c["success"] else "bad"}">{"pass" if c["success"] else "FAIL"}</td>'
        f'<td>{_esc(c["name"])}</td><td>{_esc(c["expectation"])}</td><td>{_esc(c["observed"])}</td></tr>'
        for c in quality.checks)


def write_quality_report(path: str, metrics: dict[str, Any], stats: Any, examples: dict[str, Any],
                 quality: Any, cfg: FilterConfig) -> None:
    """Write report/index.html from the run's metrics, stats frame, examples (`examples.pick_examples`)
    and quality result."""
    m = metrics
    reasons = {k: v for k, v in m["reasons"].items() if v}
    status = '<span class="ok">PASSED</span>' if quality.success else '<span class="bad">FAILED</span>'
    docs = (f'<a href="{_esc(quality.docs_index)}">Great Expectations Data Docs</a> · '
            if quality.docs_index else "")
    bad = "".join(f"<li><code>{_esc(b['shard'])}</code>: {_esc(b['detail'])}</li>" for b in m["bad_shards"])
    rows = "".join(f'<tr><th>{_esc(k)}</th><td class="n" data-metric="{_esc(k)}">{_esc(v)}</td></tr>'
                   for k, v in _summary(m))
    reason_rows = "".join(f'<tr><th>{_esc(k)}</th><td class="n">{v}</td></tr>' for k, v in reasons.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fusedit data filter report</title><style>{_CSS}</style></head><body>
<h1>Data filter report</h1>
<p>Output: <code>{_esc(cfg.output)}</code> · Data quality: {status}
 ({quality.evaluated - len(quality.failed)}/{quality.evaluated} expectations met)</p>
<h2>Summary</h2><table id="summary">{rows}</table>
<h2>Reject reasons</h2><table id="reasons">{reason_rows or "<tr><td>none</td></tr>"}</table>
{f"<h2>Bad shards</h2><ul>{bad}</ul>" if bad else ""}
<h2>Distributions</h2><div class="charts">{"".join(_charts(reasons, stats))}</div>
<h2>Data-quality checks</h2><table id="checks"><tr><th></th><th>check</th><th>expectation</th>
<th>observed</th></tr>{_checks(quality)}</table>
<p>{docs}<a href="validation.json">validation result (JSON)</a> · <a href="../rejects.jsonl">rejects.jsonl</a>
 · <a href="../stats.parquet">stats.parquet</a></p>
<h2>Kept samples</h2><p class="muted">{len(examples["kept"])} of {m["n_kept"]}, drawn with seed
 {cfg.example_seed}</p>{_kept_grid(examples["kept"])}
<h2>Rejected samples</h2><p class="muted">Up to {cfg.examples_per_reason} per reason, drawn with seed
 {cfg.example_seed}, each with the measured value that failed; duplicates beside the kept sample.</p>
<div id="rejected">{_reject_sections(reasons, examples["rejected"])}</div>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
