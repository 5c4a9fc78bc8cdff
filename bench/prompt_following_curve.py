"""The embedded default's synthetic score against training steps: where the demo's step budget sits.

Trains the `base` stage of params.yaml on the demo's cache (data/cache: run `make demo` first) into one
output directory, extending it budget by budget. Training resumes exactly from its committed checkpoint
and the learning rate is constant after warm-up, so the run to N steps is the first N steps of one
straight run. After each budget the exported EMA pipeline is evaluated with params.yaml's `eval`
settings; the score, its text-blind baseline (same images, shuffled prompts) and the per-category
scores are printed and written to bench/prompt_following_curve.tsv (the README quotes it).
Usage: python bench/prompt_following_curve.py [--steps 500 1000 2000 3000 4000] [--out /tmp/curve]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 3000, 4000])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not (ROOT / "data" / "cache" / "manifest.json").is_file():
        print("data/cache is missing: run `make demo` first", file=sys.stderr)
        return 2
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = params["model"]["recipe"]
    work = args.out or Path(tempfile.mkdtemp(prefix="fusedit-curve-"))
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
    (ROOT / "bench" / "prompt_following_curve.tsv").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
