"""The ablation report: every variant's metrics, deltas against the reference with confidence intervals over
seeds, overlaid loss curves and a side-by-side sample grid, as one self-contained HTML page, Markdown (for the
KFP UI) and `ablation.json`. It reads run directories in the layout `components/ablate/driver.py` documents, whether
the local driver or the KFP pipeline wrote them. No plotting library: inline SVG and PIL.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from fusedit.components.ablate.claims import UNRESOLVED, Claim, delta, spread, verdict
from fusedit.components.evaluate.evals.report import flatten
from fusedit.errors import UserError

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22"]
SKIP = {"images", "images_per_prompt", "fid_n"}  # counts, not scores
GRID_PER_CATEGORY = 2
CELL = 96  # pixels per sample in the grid (tiny samples are enlarged without smoothing)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding run.json) given themselves or as children of a runs directory."""
    found: list[Path] = []
    for p in paths:
        if (p / "run.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(c for c in p.iterdir() if (c / "run.json").is_file())
        else:
            raise UserError(f"{p}: not a run directory or a directory of runs")
    if not found:
        raise UserError(f"no runs (directories with run.json) under {', '.join(map(str, paths))}")
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None


def run_metrics(run: Path) -> dict[str, float]:
    """One run's numbers: eval suites (`synthetic/colors`, `fid/fid_random32`, ...), final training loss."""
    out: dict[str, float] = {}
    if (run / "eval" / "metrics.json").is_file():
        out.update({k: float(v) for k, v in flatten(_read_json(run / "eval" / "metrics.json")).items()
                    if k.rsplit("/", 1)[-1] not in SKIP})
    for st in sorted((run / "train").glob("*/metrics.json")):
        m = _read_json(st)  # throughput is in the untracked timing.json: `make bench` measures speed
        if isinstance(m.get("final_loss"), int | float):
            out[f"train/{st.parent.name}/final_loss"] = float(m["final_loss"])
    rec = _read_json(run / "run.json")
    if rec.get("trainable_params") is not None:
        out["trainable_params"] = float(rec["trainable_params"])
    return out


def _order(key: str) -> tuple:
    """synthetic/overall first, each text-blind score beside its score, training figures last."""
    suite, _, name = key.rpartition("/")
    base = name.removeprefix("text_blind_")
    return (key not in ("synthetic/overall", "synthetic/text_blind_overall"), key.startswith(("train/", "trainable")),
            suite, base, name != base)


def claims(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every variant's paper claim with the measured delta on its metric and the verdict."""
    out = []
    for name, v in doc["variants"].items():
        if v.get("paper"):
            c = Claim.model_validate(v["paper"])
            d = v["delta"].get(c.metric)
            out.append({"variant": name, "claim": c.describe(), "metric": c.metric, "source": c.source,
                        "delta": d, "verdict": verdict(c, d) if d else f"{UNRESOLVED} (no {c.metric} measured)"})
    return out


def summarize_runs(dirs: list[Path]) -> dict[str, Any]:
    """The ablation.json document: per variant its runs, metric means with 95% intervals over seeds,
    deltas vs the reference and the verdict on each paper claim."""
    recs = [(d, _read_json(d / "run.json")) for d in dirs]
    order = recs[0][1].get("variants") or []
    by_var: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for d, rec in recs:
        by_var[rec["variant"]].append((d, rec))
    names = [v for v in order if v in by_var] + [v for v in by_var if v not in order]
    reference = recs[0][1].get("reference") or names[0]
    if reference not in by_var:
        reference = names[0]
    variants: dict[str, Any] = {}
    keys: list[str] = []
    values: dict[str, dict[str, dict[int, float]]] = {}
    for name in names:
        per_seed: dict[str, dict[int, float]] = defaultdict(dict)
        for d, rec in by_var[name]:
            for k, v in run_metrics(d).items():
                per_seed[k][int(rec.get("seed", 0))] = v
                if k not in keys:
                    keys.append(k)
        values[name] = per_seed
        first = by_var[name][0][1]
        variants[name] = {
            "recipe": first.get("recipe"), "overrides": first.get("overrides") or {},
            "description": first.get("description") or "",
            "seeds": sorted(int(r.get("seed", 0)) for _, r in by_var[name]),
            "runs": [str(d) for d, _ in by_var[name]], "paper": first.get("paper"),
            "metrics": {k: spread(s) for k, s in per_seed.items()}}
    for name in names:
        variants[name]["delta"] = {k: delta(values[reference][k], values[name][k]) for k in keys
                                   if k in values[reference] and k in values[name]} if name != reference else {}
    keys.sort(key=_order)
    doc = {"spec": recs[0][1].get("spec"), "reference": reference, "metrics": keys, "variants": variants}
    return {**doc, "claims": claims(doc)}


def _fmt(v: float | None, key: str = "") -> str:
    if v is None:
        return ""
    if key == "trainable_params" or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def _cell(m: dict | None, key: str) -> str:
    if not m:
        return ""
    return _fmt(m["mean"], key) + (f" [{_fmt(m['lo'], key)}, {_fmt(m['hi'], key)}]" if m.get("lo") is not None
                                   else "")


def _dcell(d: dict | None, key: str) -> str:
    if not d:
        return ""
    sign = "+" if d["delta"] >= 0 else ""
    ci = f" [{_fmt(d['lo'], key)}, {_fmt(d['hi'], key)}]" if d["lo"] is not None else ""
    return f"{sign}{_fmt(d['delta'], key)}{ci}"


def _describe(v: dict) -> str:
    over = ", ".join(f"{k}={val}" for k, val in v["overrides"].items())
    return v["recipe"] + (f" + {over}" if over else "")


def markdown(doc: dict) -> str:
    names, keys, ref = list(doc["variants"]), doc["metrics"], doc["reference"]
    head = "| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    lines = [f"# Ablation `{doc['spec']}`", "", f"Reference: **{ref}**; mean and 95% t-interval over seeds.", "",
             "| variant | recipe | seeds | what |", "|---|---|---|---|"]
    lines += [f"| {n} | {_describe(v)} | {', '.join(map(str, v['seeds']))} | {v.get('description', '')} |"
              for n, v in doc["variants"].items()]
    lines += ["", "## Metrics", "", head.rstrip("\n")]
    lines += [f"| {k} | " + " | ".join(_cell(doc["variants"][n]["metrics"].get(k), k) for n in names) + " |"
              for k in keys]
    others = [n for n in names if n != ref]
    if others:
        lines += ["", f"## Deltas against {ref} (95% CI over seeds where several ran)", "",
                  "| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        lines += [f"| {k} | " + " | ".join(_dcell(doc["variants"][n]["delta"].get(k), k) for n in others) + " |"
                  for k in keys]
    if doc.get("claims"):
        lines += ["", "## The paper's claims", "",
                  "| variant | claim | variant - reference (95% CI) | verdict | source |", "|---|---|---|---|---|"]
        lines += [f"| {c['variant']} | {c['claim']} | {_dcell(c['delta'], c['metric'])} | **{c['verdict']}** | "
                  f"{c['source']} |" for c in doc["claims"]]
    return "\n".join(lines) + "\n"


def _loss_curve(path: Path) -> dict[int, float]:
    out = {}
    lines = path.read_text().splitlines()
    if not lines:
        return out
    cols = lines[0].split("\t")
    if "step" not in cols or "loss" not in cols:
        return out
    i, j = cols.index("step"), cols.index("loss")
    for line in lines[1:]:
        parts = line.split("\t")
        try:
            out[int(parts[i])] = float(parts[j])
        except (ValueError, IndexError):
            continue
    return out


def _smooth(ys: list[float]) -> list[float]:
    w = max(1, len(ys) // 40)
    return [mean(ys[max(0, k - w + 1):k + 1]) for k in range(len(ys))]


def loss_svg(doc: dict, stage: str, width: int = 640, height: int = 280) -> str:
    """Each variant's loss (mean over its seeds, moving average) on one pair of axes."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for name, v in doc["variants"].items():
        per_step: dict[int, list[float]] = defaultdict(list)
        for run in v["runs"]:
            f = Path(run) / "train" / stage / "loss.tsv"
            if f.is_file():
                for s, y in _loss_curve(f).items():
                    per_step[s].append(y)
        if per_step:
            xs = sorted(per_step)
            curves[name] = (xs, _smooth([mean(per_step[s]) for s in xs]))
    if not curves:
        return ""
    x0, x1 = min(min(c[0]) for c in curves.values()), max(max(c[0]) for c in curves.values())
    ys = sorted(y for c in curves.values() for y in c[1])
    y0, y1 = ys[0], ys[min(len(ys) - 1, int(len(ys) * 0.98))]
    y1 = y1 if y1 > y0 else y0 + 1e-6
    pad = 40

    def px(x, y):
        fx = pad + (x - x0) / max(1, x1 - x0) * (width - 2 * pad)
        fy = height - pad - (min(y, y1) - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{fx:.1f},{fy:.1f}"

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' class='loss'>",
             f"<rect x='{pad}' y='{pad}' width='{width - 2 * pad}' height='{height - 2 * pad}' fill='none' "
             "stroke='#999'/>",
             f"<text x='{pad}' y='{height - 12}' font-size='11'>step {x0}</text>",
             f"<text x='{width - pad}' y='{height - 12}' font-size='11' text-anchor='end'>{x1}</text>",
             f"<text x='4' y='{pad + 4}' font-size='11'>{y1:.3g}</text>",
             f"<text x='4' y='{height - pad}' font-size='11'>{y0:.3g}</text>"]
    for i, (name, (xs, vals)) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(px(x, y) for x, y in zip(xs, vals, strict=True))
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{pts}'>"
                     f"<title>{html.escape(name)}</title></polyline>")
        parts.append(f"<text x='{width - pad - 4}' y='{pad + 14 + 13 * i}' font-size='11' text-anchor='end' "
                     f"fill='{color}'>{html.escape(name)}</text>")
    return "".join(parts) + "</svg>"


def _png_uri(path: Path, size: int = CELL) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        k = max(1, size // max(im.size))
        im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _judgements(run: Path) -> dict[str, bool]:
    f = run / "eval" / "samples" / "synthetic" / "judgements.jsonl"
    if not f.is_file():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.strip():
            j = json.loads(line)
            out[j["image"]] = bool(j.get("correct"))
    return out


def sample_grid(doc: dict) -> str:
    """Rows: the same held-out synthetic prompts (same sampling seed); columns: the variants (first seed)."""
    first = {n: Path(v["runs"][0]) for n, v in doc["variants"].items()}
    prompts_file = next((r / "eval/samples/synthetic/prompts.jsonl" for r in first.values()
                         if (r / "eval/samples/synthetic/prompts.jsonl").is_file()), None)
    if prompts_file is None:
        return ""
    rows, counters = [], defaultdict(int)
    for line in prompts_file.read_text().splitlines():
        p = json.loads(line)
        i = counters[p["category"]]
        counters[p["category"]] += 1
        if i < GRID_PER_CATEGORY:
            rows.append((p["category"], p["prompt"], f"samples/synthetic/{p['category']}/{i:03d}_0.png"))
    verdicts = {n: _judgements(r) for n, r in first.items()}
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in first) + "</tr>"
    body = []
    for cat, prompt, rel in rows:
        cells = []
        for n, r in first.items():
            img = r / "eval" / rel
            if img.is_file():
                ok = verdicts[n].get(rel)
                mark = "" if ok is None else ("&#10003;" if ok else "&#10007;")
                cells.append(f"<td><img src='{_png_uri(img)}' alt='{html.escape(n)}'><br>{mark}</td>")
            else:
                cells.append("<td>-</td>")
        body.append(f"<tr><td class='p'><b>{html.escape(cat)}</b><br>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
    return f"<table class='grid'>{head}{''.join(body)}</table>"


CSS = ("body{font-family:sans-serif;margin:24px} table{border-collapse:collapse;margin:8px 0}"
       "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}"
       "td.p,td:first-child,th:first-child{text-align:left} .grid td{text-align:center}"
       ".grid td.p{text-align:left} .grid th{text-align:center} .grid img{image-rendering:pixelated}"
       ".pos{color:#2a7a2a} .neg{color:#b22}")


def html_page(doc: dict) -> str:
    names, keys, ref = list(doc["variants"]), doc["metrics"], doc["reference"]
    esc = html.escape
    rows = "".join(f"<tr data-variant='{esc(n)}'><td>{esc(n)}{' (reference)' if n == ref else ''}</td>"
                   f"<td class='p'>{esc(_describe(v))}</td><td>{', '.join(map(str, v['seeds']))}</td>"
                   f"<td class='p'>{esc(v.get('description', ''))}</td></tr>"
                   for n, v in doc["variants"].items())
    parts = [f"<h1>Ablation: {esc(str(doc['spec']))}</h1>",
             f"<table><tr><th>variant</th><th>recipe</th><th>seeds</th><th>what</th></tr>{rows}</table>",
             "<h2>Metrics</h2><p>mean and 95% t-interval over seeds</p><table id='metrics'><tr><th>metric</th>"
             + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"
             + "".join(f"<tr><td>{esc(k)}</td>" + "".join(
                 f"<td>{_cell(doc['variants'][n]['metrics'].get(k), k)}</td>" for n in names) + "</tr>"
                 for k in keys) + "</table>"]
    others = [n for n in names if n != ref]
    if others:
        def cls(d):
            return "" if not d or d["lo"] is None or d["lo"] <= 0 <= d["hi"] else (
                " class='pos'" if d["delta"] > 0 else " class='neg'")

        parts.append(f"<h2>Deltas against {esc(ref)}</h2><p>variant - reference; 95% t-interval over seeds "
                     "where several ran (paired by seed); coloured where it excludes 0</p><table id='deltas'>"
                     "<tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in others) + "</tr>"
                     + "".join(f"<tr><td>{esc(k)}</td>" + "".join(
                         f"<td{cls(doc['variants'][n]['delta'].get(k))}>"
                         f"{_dcell(doc['variants'][n]['delta'].get(k), k)}</td>" for n in others) + "</tr>"
                         for k in keys) + "</table>")
    if doc.get("claims"):
        parts.append("<h2>The paper's claims</h2><p>reproduced / contradicted when the paired 95% interval of "
                     "variant - reference lies on one side (see components/ablate/claims.py); otherwise not "
                     "resolved at this scale</p><table id='claims'><tr><th>variant</th><th>claim</th>"
                     "<th>variant - reference</th><th>verdict</th><th>source</th></tr>" + "".join(
                         f"<tr><td>{esc(c['variant'])}</td><td class='p'>{esc(c['claim'])}</td>"
                         f"<td>{_dcell(c['delta'], c['metric'])}</td><td class='p'><b>{esc(c['verdict'])}</b></td>"
                         f"<td class='p'>{esc(c['source'])}</td></tr>" for c in doc["claims"]) + "</table>")
    stages = sorted({p.parent.name for v in doc["variants"].values() for r in v["runs"]
                     for p in (Path(r) / "train").glob("*/loss.tsv")})
    for st in stages:
        svg = loss_svg(doc, st)
        if svg:
            parts.append(f"<h2>Training loss: {esc(st)}</h2>{svg}")
    grid = sample_grid(doc)
    if grid:
        parts.append("<h2>Samples</h2><p>the same held-out prompts and sampling seeds for every variant "
                     "(&#10003;/&#10007;: the synthetic judge's verdict)</p>" + grid)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Ablation {esc(str(doc['spec']))}</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")


def write_ablation_report(paths: list[Path], out: Path) -> dict[str, Path]:
    """index.html (self-contained), report.md and ablation.json for the runs under `paths`."""
    doc = summarize_runs(find_runs(paths))
    out.mkdir(parents=True, exist_ok=True)
    files = {"html": out / "index.html", "markdown": out / "report.md", "json": out / "ablation.json"}
    files["html"].write_text(html_page(doc))
    files["markdown"].write_text(markdown(doc))
    files["json"].write_text(json.dumps(doc, indent=1))
    return files
