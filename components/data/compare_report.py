"""The outputs of `fusedit data compare`: compare.json, compare.md (fits a pull-request comment) and a
self-contained index.html with the same tables, the differences highlighted, and paired histograms
of every compared column (old and new on shared bins)."""
from __future__ import annotations

import html
import json
import os
from typing import Any

from fusedit.components.data.charts import svg_paired_histogram
from fusedit.components.data.compare import Side, kept_values
from fusedit.components.data.report import BASE_CSS

_CSS = BASE_CSS + """tr.worse td.d{color:#b3261e}tr.better td.d{color:#176f2c}tr.violation{background:#fdecea}
tr.violation td.d{font-weight:700}.charts{display:flex;flex-wrap:wrap;gap:16px}
"""
LABELS = {"n_in": "input samples", "n_kept": "kept", "n_rejected": "rejected", "n_bad_shards": "bad shards",
          "n_shards_in": "input shards", "reject_rate": "reject rate", "duplicate_rate": "duplicate rate",
          "decode_failure_rate": "decode-failure rate"}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts" if x else "0"


def _status(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "absent"}[ok]


def _rows(diff: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compared number as (label, old, new, change, kind): kind is worse / better / same / violation."""
    gate = diff["gate"]["config"]
    limits = {"reject_rate": gate["max_reject_rate_increase"], "duplicate_rate": gate["max_duplicate_rate_increase"],
              "decode_failure_rate": gate["max_decode_failure_rate_increase"]}
    rows = []
    for k, c in diff["counts"].items():
        kind = "same" if not c["delta"] else ("worse" if (c["delta"] < 0) == (k == "n_kept") else "better")
        if k in ("n_in", "n_shards_in"):
            kind = "same"
        rows.append({"label": LABELS[k], "old": str(c["old"]), "new": str(c["new"]), "change": f"{c['delta']:+d}",
                     "kind": kind})
    for k, r in diff["rates"].items():
        rows.append({"label": LABELS[k], "old": _pct(r["old"]), "new": _pct(r["new"]), "change": _pts(r["delta"]),
                     "kind": _kind(r["delta"], limits[k])})
    for reason, r in diff["reasons"].items():
        rows.append({"label": f"reason: {reason}", "old": f"{r['old']} ({_pct(r['old_rate'])})",
                     "new": f"{r['new']} ({_pct(r['new_rate'])})", "change": _pts(r["delta"]),
                     "kind": _kind(r["delta"], gate["max_reason_rate_increase"])})
    return rows


def _kind(delta: float, limit: float) -> str:
    if delta > limit + 1e-12:
        return "violation"
    return "worse" if delta > 0 else "better" if delta < 0 else "same"


def markdown(diff: dict[str, Any]) -> str:
    g = diff["gate"]
    head = "PASSED" if g["passed"] else f"FAILED ({len(g['violations'])} gate violation(s))"
    lines = [f"### Data compare: **{head}**", "", f"`{diff['old']}` -> `{diff['new']}`", ""]
    if g["violations"]:
        lines += ["Gate violations:", *[f"- {v}" for v in g["violations"]], ""]
    lines += ["| | old | new | change |", "|---|---:|---:|---:|"]
    for r in _rows(diff):
        change = f"**{r['change']}**" if r["kind"] in ("violation", "worse") else r["change"]
        lines.append(f"| {r['label']} | {r['old']} | {r['new']} | {change} |")
    lines += ["", f"Distribution shifts of kept samples ({diff['shift_test']['statistic']}, "
                  f"threshold {diff['shift_test']['threshold']}):", "",
              "| column | median old | median new | D | threshold | |", "|---|---:|---:|---:|---:|---|"]
    for s in diff["shifts"]:
        flag = "**shifted**" if s["shifted"] else ""
        lines.append(f"| {s['column']} | {s['median_old']:g} | {s['median_new']:g} | {s['ks']:.3f} | "
                     f"{s['threshold']:.3f} | {flag} |")
    lines += ["", "Expectations that changed status:" if diff["expectations"] else
              ("Expectations: no change." if diff["expectations_compared"] else
               "Expectations: not compared (a side has no report/validation.json).")]
    for c in diff["expectations"]:
        name = c["new_name"] if c["old_name"] in (None, c["new_name"]) else f"{c['old_name']} -> {c['new_name']}"
        lines.append(f"- {name}: {_status(c['old'])} -> **{_status(c['new'])}**")
    return "\n".join(lines) + "\n"


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _html_tables(diff: dict[str, Any]) -> str:
    rows = "".join(f'<tr class="{r["kind"]}" data-row="{_esc(r["label"])}"><th>{_esc(r["label"])}</th>'
                   f'<td class="n">{_esc(r["old"])}</td><td class="n">{_esc(r["new"])}</td>'
                   f'<td class="n d">{_esc(r["change"])}</td></tr>' for r in _rows(diff))
    shifts = "".join(f'<tr class="{"violation" if s["shifted"] else "same"}" data-column="{_esc(s["column"])}">'
                     f'<th>{_esc(s["column"])}</th><td class="n">{s["n_old"]}</td><td class="n">{s["n_new"]}</td>'
                     f'<td class="n">{s["median_old"]:g}</td><td class="n">{s["median_new"]:g}</td>'
                     f'<td class="n d">{s["ks"]:.3f}</td><td class="n">{s["threshold"]:.3f}</td>'
                     f'<td>{"shifted" if s["shifted"] else ""}</td></tr>' for s in diff["shifts"])
    checks = "".join(f'<tr class="{"violation" if c["old"] is True and c["new"] is False else "same"}">'
                     f'<td>{_esc(c["old_name"] or "")}</td><td>{_status(c["old"])}</td>'
                     f'<td>{_esc(c["new_name"] or "")}</td><td>{_status(c["new"])}</td></tr>'
                     for c in diff["expectations"])
    return (f'<h2>Counts and rates</h2><table id="changes"><tr><th></th><th>old</th><th>new</th><th>change</th>'
            f'</tr>{rows}</table>'
            f'<h2>Distribution shifts (kept samples)</h2><p>{_esc(diff["shift_test"]["statistic"])}; threshold '
            f'{_esc(diff["shift_test"]["threshold"])}</p><table id="shifts"><tr><th>column</th><th>n old</th>'
            f'<th>n new</th><th>median old</th><th>median new</th><th>D</th><th>threshold</th><th></th></tr>'
            f'{shifts}</table>'
            f'<h2>Expectations that changed status</h2><table id="expectations"><tr><th>old</th><th></th>'
            f'<th>new</th><th></th></tr>{checks or "<tr><td>none</td></tr>"}</table>')


def html_page(diff: dict[str, Any], old: Side, new: Side) -> str:
    g = diff["gate"]
    verdict = ('<span class="ok">PASSED</span>' if g["passed"]
               else f'<span class="bad">FAILED</span> ({len(g["violations"])} gate violation(s))')
    violations = "".join(f"<li>{_esc(v)}</li>" for v in g["violations"])
    charts = "".join(svg_paired_histogram(kept_values(old, s["column"]), kept_values(new, s["column"]), s["column"])
                     for s in diff["shifts"])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>fusedit data compare</title><style>{_CSS}</style></head><body>
<h1>Data compare</h1>
<p>Old: <code>{_esc(diff["old"])}</code> · New: <code>{_esc(diff["new"])}</code> · Gate: {verdict}</p>
{f'<ul id="violations">{violations}</ul>' if violations else ""}
{_html_tables(diff)}
<h2>Distributions of kept samples</h2><div class="charts">{charts}</div>
</body></html>
"""


def write_compare(diff: dict[str, Any], old: Side, new: Side, out_dir: str) -> dict[str, str]:
    """Write compare.json, compare.md and index.html into out_dir; returns kind -> path."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "compare.json"), "markdown": os.path.join(out_dir, "compare.md"),
             "html": os.path.join(out_dir, "index.html")}
    texts = {"json": json.dumps(diff, indent=2, sort_keys=True) + "\n", "markdown": markdown(diff),
             "html": html_page(diff, old, new)}
    for kind, path in files.items():
        with open(path, "w", encoding="utf-8") as f:
            f.write(texts[kind])
    return files


def write_no_baseline(out_dir: str, where: str) -> str:
    """The DVC stage's output when no baseline is configured: the same three files, saying so (gate passed)."""
    note = (f"No baseline configured ({where}: `baseline` or `baseline_rev`): nothing to compare. Set one to "
            "the filter output the last model was trained on to see what changed and gate on it.")
    os.makedirs(out_dir, exist_ok=True)
    texts = {"compare.json": json.dumps({"baseline": None, "note": note,
                                         "gate": {"passed": True, "violations": []}}, indent=2) + "\n",
             "compare.md": f"## Data compare\n\n{note}\n",
             "index.html": ("<!doctype html><meta charset='utf-8'><title>Data compare</title>"
                            f"<p>{html.escape(note)}</p>\n")}
    for name, text in texts.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(out_dir, "compare.md")
