"""The `geneval` suite: GenEval's official prompts, written in the layout its detector script reads.

`<index:05d>/metadata.jsonl` (the prompt's JSON line) and `<index:05d>/samples/<k:05d>.png`, as
GenEval's `generation/diffusers_generate.py` writes them, 4 images per prompt by default as its protocol
says (`geneval_images_per_prompt`); score with its `evaluation/evaluate_images.py`, which reads every
`<digits>.png` of a folder (resumption deletes the images of a prompt that changed, extras included).
If that script's `results.jsonl` is given back (`geneval_results`), it is summarised as its
`summary_scores.py` does: per-tag accuracy over images, overall = mean over tags. A results file naming an
image no longer among the samples, or a prompt other than its folder holds now, is refused.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePath

from fusedit.components.evaluate.evals.base import SuiteContext, SuiteResult
from fusedit.components.evaluate.evals.prompts import read_jsonl
from fusedit.components.evaluate.evals.sampling import Job, save_png
from fusedit.errors import UserError


def _rows(ctx: SuiteContext) -> list[dict]:
    if not ctx.cfg.geneval_metadata:
        raise UserError("suite geneval needs --geneval-metadata (GenEval's evaluation_metadata.jsonl, path or URL)")
    rows = read_jsonl(ctx.cfg.geneval_metadata, "--geneval-metadata", ("prompt",))
    return rows[: ctx.cfg.limit] if ctx.cfg.limit else rows


def prepare(ctx: SuiteContext) -> list[Job]:
    out, n = ctx.samples("geneval"), ctx.cfg.images_for("geneval")
    jobs = []
    for index, row in enumerate(_rows(ctx)):
        folder = out / f"{index:05d}"
        if ctx.main:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "metadata.jsonl", "w") as f:
                json.dump(row, f)
        paths = [folder / "samples" / f"{k:05d}.png" for k in range(n)]
        jobs.append(Job(row["prompt"], ctx.cfg.seed, n, paths,
                        lambda imgs, paths=paths: [save_png(i, p) for i, p in zip(imgs, paths, strict=True)]))
    return jobs


def summarize(results: str) -> dict[str, float]:
    """summary_scores.py over the official results.jsonl: per-tag and overall accuracy."""
    rows = read_jsonl(results, "--geneval-results", ("tag", "correct"))
    tags: dict[str, list[bool]] = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
    out = {tag: sum(v) / len(v) for tag, v in tags.items()}
    out["overall"] = sum(out.values()) / len(out)
    return out


def check_results(results: str, rows: list[dict], out: Path) -> None:
    """Refuse a results.jsonl scored on images that are no longer there or for a prompt a folder no longer holds."""
    for r in read_jsonl(results, "--geneval-results", ("tag", "correct")):
        parts = PurePath(str(r.get("filename", "")).replace("\\", "/")).parts
        if len(parts) < 3 or not parts[-3].isdigit() or int(parts[-3]) >= len(rows):
            continue  # not in the layout this suite writes, or beyond --limit
        folder, now = parts[-3], rows[int(parts[-3])]["prompt"]
        if r.get("prompt", now) != now:
            raise UserError(f"--geneval-results {results}: {folder}/samples/{parts[-1]} was scored for "
                            f"{r['prompt']!r}, but folder {folder} now holds {now!r}; score the images again")
        if not (out / folder / "samples" / parts[-1]).is_file():
            raise UserError(f"--geneval-results {results}: {folder}/samples/{parts[-1]} is no longer among "
                            "the samples (its prompt or image count changed); score the images again")


def score(ctx: SuiteContext) -> SuiteResult:
    rows = _rows(ctx)
    out = ctx.samples("geneval")
    m: dict[str, float] = {"prompts": len(rows), "images": len(rows) * ctx.cfg.images_for("geneval")}
    res = SuiteResult(m)
    by_tag: dict[str, list] = {}
    for index, row in enumerate(rows):
        by_tag.setdefault(row.get("tag", "untagged"), []).append(out / f"{index:05d}" / "samples" / "00000.png")
    res.grids = {f"geneval: {t}": paths[:8] for t, paths in by_tag.items()}
    if ctx.cfg.geneval_results:
        check_results(ctx.cfg.geneval_results, rows, out)
        scores = summarize(ctx.cfg.geneval_results)
        m.update(scores)
        res.bars = {k: v for k, v in scores.items() if k != "overall"}
    else:
        res.notes.append(f"GenEval images in {out}: score them with GenEval's evaluation/evaluate_images.py, "
                         "then pass its results.jsonl as --geneval-results to summarise here")
    return res
