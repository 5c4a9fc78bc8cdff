"""The embedded default's synthetic score against training steps: where the demo's step budget sits.

Trains the `base` stage of params.yaml on the demo's cache (data/cache: run `make demo` first) into one
output directory, extending it budget by budget. Training resumes exactly from its committed checkpoint
and the learning rate is constant after warm-up, so the run to N steps is the first N steps of one
straight run. After each budget the exported EMA pipeline is evaluated with params.yaml's `eval`
settings; the score, its text-blind baseline (same images, every other prompt of the category) and the per-category
scores are printed and written to bench/prompt_following_curve.tsv, and plotted (overall, text-blind,
colors, single_object against steps, the demo's budget marked) in bench/prompt_following_curve.svg (the
README shows both). `--replot` redraws the SVG from the TSV without training.
Usage: python bench/prompt_following_curve.py [--steps 500 1000 2000 3000 4000] [--out /tmp/curve] [--replot]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.evals.judge import CATEGORIES
from fusedit.components.evaluate.run import evaluate
from fusedit.components.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("steps", "overall", "text_blind_overall", *CATEGORIES, "train_s")
TSV, SVG = ROOT / "bench" / "prompt_following_curve.tsv", ROOT / "bench" / "prompt_following_curve.svg"
LINES = {"overall": "#1f77b4", "text_blind_overall": "#7f7f7f", "colors": "#2ca02c", "single_object": "#d62728"}


def stage_params(params: dict, steps: int, path: Path) -> None:
    """params.yaml's base stage with `steps` (and a checkpoint at the end of every budget)."""
    base = dict(next(s for s in params["train"]["stages"] if s["name"] == "base"))
    base.update(steps=steps, save_every=steps, sample_every=steps)
    base.pop("upstream", None)
    path.write_text(yaml.safe_dump({"train": {"seed": params["train"]["seed"], "stages": [base]}}))


def score(pipeline: Path, out: Path, ev: dict) -> dict[str, float]:
    cfg = EvalConfig(pipeline=str(pipeline), output=str(out), suites=["synthetic"], progress=False,
                     **{k: ev[k] for k in ("steps", "guidance", "seed", "batch_size", "images_per_prompt",
                                           "synthetic_per_category", "synthetic_seed") if k in ev})
    return evaluate(cfg).metrics["synthetic"]


def plot(table: str, budget: int, w: int = 560, h: int = 300, m: int = 44) -> str:
    """An SVG of the LINES columns of a curve table against steps (score axis 0..1), the budget as a dashed line."""
    head, *rows = [line.split("\t") for line in table.strip().splitlines()]
    data = {c: [(float(r[0]), float(r[head.index(c)])) for r in rows] for c in ("steps", *LINES)}
    x_max = max(max(x for x, _ in data["steps"]), budget)

    def xy(x: float, y: float) -> str:
        return f"{m + x / x_max * (w - 2 * m):.1f},{h - m - y * (h - 2 * m):.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{m}" y="16">synthetic score against base-stage steps (embedded default, one seed)</text>',
           f'<polyline points="{xy(0, 1)} {xy(0, 0)} {xy(x_max, 0)}" fill="none" stroke="black"/>']
    for y in (0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{m - 30}" y="{h - m - y * (h - 2 * m) + 4:.1f}">{y:.2f}</text>')
    for x, _ in data["steps"]:
        out.append(f'<text x="{xy(x, 0).split(",")[0]}" y="{h - m + 16}" text-anchor="middle">{x:g}</text>')
    bx = xy(budget, 0).split(",")[0]
    out.append(f'<line x1="{bx}" y1="{m}" x2="{bx}" y2="{h - m}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{bx}" y="{m - 4}" text-anchor="middle">make demo: {budget}</text>')
    for i, (col, colour) in enumerate(LINES.items()):
        pts = " ".join(xy(x, y) for x, y in data[col])
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{m + 8}" y="{m + 6 + 14 * i}" fill="{colour}">{col}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 3000, 4000])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--replot", action="store_true", help="redraw the SVG from the TSV only")
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budget = next(s for s in params["train"]["stages"] if s["name"] == "base")["steps"]
    if args.replot:
        SVG.write_text(plot(TSV.read_text(), budget))
        return 0
    if not (ROOT / "data" / "cache" / "manifest.json").is_file():
        print("data/cache is missing: run `make demo` first", file=sys.stderr)
        return 2
    recipe = params["model"]["recipe"]
    work = args.out or Path(tempfile.mkdtemp(prefix="fusedit-curve-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "train", ignore_errors=True)
    rows, spent = [], 0.0
    print("\t".join(COLUMNS))
    for steps in sorted(args.steps):
        stage_params(params, steps, work / "params.yaml")
        t0 = time.perf_counter()
        train(recipe, "base", str(ROOT / "data" / "cache"), str(work / "train"), str(work / "params.yaml"))
        spent += time.perf_counter() - t0
        m = score(work / "train" / "pipeline", work / f"eval-{steps}", params["eval"])
        rows.append([steps, *(round(m[c], 3) for c in COLUMNS[1:-1]), round(spent)])
        print("\t".join(map(str, rows[-1])), flush=True)
    table = "\t".join(COLUMNS) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows)
    TSV.write_text(table)
    SVG.write_text(plot(table, budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
