"""The run's report (report/index.html + report.md) and the comparison of several runs; no plotting library."""
from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from fusedit.components.evaluate.evals.sampling import grid


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: float | None) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}")


def _bars(values: dict[str, float], width: int = 260) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td><div style='background:#4a7bd0;height:14px;"
                   f"width:{max(0.0, min(1.0, v)) * width:.0f}px'></div></td><td>{v:.3f}</td></tr>"
                   for k, v in values.items())
    return f"<table class='bars'>{rows}</table>"


def markdown_table(runs: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for m in runs.values() for k in m})
    head = "| metric | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    return head + "".join(f"| {k} | " + " | ".join(_fmt(m.get(k)) for m in runs.values()) + " |\n" for k in keys)


def write_eval_report(root: Path, metrics: dict[str, Any], results: dict[str, Any], settings: dict[str, Any]) -> Path:
    """report/index.html with the numbers, per-category bars and a sample grid per prompt category."""
    rep = root / "report"
    if rep.exists():
        shutil.rmtree(rep)
    rep.mkdir(parents=True)
    flat = flatten(metrics)
    parts = [f"<h1>FuseDiT evaluation</h1><p>{html.escape(str(settings))}</p>",
             "<h2>Metrics</h2><table border=1 cellpadding=3>"
             + "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in flat.items()) + "</table>"]
    md = ["# FuseDiT evaluation", "", markdown_table({"value": flat})]
    for name, res in results.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if res.bars:
            parts.append(_bars(res.bars))
        parts += [f"<p>{html.escape(n)}</p>" for n in res.notes]
        md += [f"- {name}: {n}" for n in res.notes]
        for title, paths in res.grids.items():
            imgs = [Image.open(p).convert("RGB") for p in paths if p.is_file()]
            if not imgs:
                continue
            fname = "".join(c if c.isalnum() else "_" for c in title) + ".png"
            g = grid([im.resize(imgs[0].size) for im in imgs], min(4, len(imgs)))
            if g.width < 512:  # tiny recipes: enlarge for the eye, without smoothing
                k = max(1, 512 // g.width)
                g = g.resize((g.width * k, g.height * k), Image.Resampling.NEAREST)
            g.save(rep / fname)
            parts.append(f"<h3>{html.escape(title)}</h3><img src='{fname}' style='max-width:100%'>")
    (rep / "index.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>FuseDiT evaluation"
                                    "</title></head><body>" + "\n".join(parts) + "</body></html>")
    (rep / "report.md").write_text("\n".join(md) + "\n")
    return rep / "index.html"


def compare_html(runs: dict[str, dict[str, float]]) -> str:
    """A table plus grouped bars of the metrics in [0, 1] (accuracies) across runs."""
    colors = ["#4a7bd0", "#d0694a", "#4ab07a", "#b04ab0", "#b0a04a", "#4ab0b0"]
    keys = sorted({k for m in runs.values() for k in m})
    unit = [k for k in keys if all(0 <= m.get(k, 0) <= 1 for m in runs.values())]
    legend = " ".join(f"<span style='color:{colors[i % 6]}'>&#9632; {html.escape(r)}</span>"
                      for i, r in enumerate(runs))
    bars = "".join(
        f"<tr><td>{html.escape(k)}</td><td>" + "".join(
            f"<div style='background:{colors[i % 6]};height:10px;width:{m.get(k, 0) * 300:.0f}px'></div>"
            for i, m in enumerate(runs.values())) + "</td></tr>" for k in unit)
    table = "<table border=1 cellpadding=3><tr><th>metric</th>" + "".join(
        f"<th>{html.escape(r)}</th>" for r in runs) + "</tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for m in runs.values()) + "</tr>"
        for k in keys) + "</table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>compare</title></head><body>"
            f"<h1>Runs compared</h1>{table}<h2>Accuracies</h2><p>{legend}</p><table>{bars}</table></body></html>")
