"""The `dpg` suite: DPG-Bench prompts, four images per prompt tiled 2x2 in `<prompt name>.png`.

That is the file ELLA's `compute_dpg_bench.py` reads: it cuts tile k of `--pic-num` at column k % 2,
row k // 2 of `--resolution` pixels. `dpg_images_per_prompt` (1 to 4, default 4 as the benchmark
defines) sets how many tiles are drawn; pass the same number as `--pic-num`.
"""
from __future__ import annotations

from fusedit.components.evaluate.evals.base import SuiteContext, SuiteResult
from fusedit.components.evaluate.evals.prompts import read_named_prompts
from fusedit.components.evaluate.evals.sampling import Job, grid, save_png
from fusedit.errors import UserError


def _prompts(ctx: SuiteContext) -> list[tuple[str, str]]:
    if not ctx.cfg.dpg_prompts:
        raise UserError("suite dpg needs --dpg-prompts (DPG-Bench's prompts/ folder or dpg_bench.csv)")
    pairs = read_named_prompts(ctx.cfg.dpg_prompts, "--dpg-prompts")
    return pairs[: ctx.cfg.limit] if ctx.cfg.limit else pairs


def prepare(ctx: SuiteContext) -> list[Job]:
    out, n = ctx.samples("dpg"), ctx.cfg.images_for("dpg")
    jobs = []
    for name, prompt in _prompts(ctx):
        path = out / f"{name}.png"
        jobs.append(Job(prompt, ctx.cfg.seed, n, [path],
                        lambda imgs, path=path: save_png(grid(imgs, min(2, len(imgs))), path)))
    return jobs


def score(ctx: SuiteContext) -> SuiteResult:
    pairs = _prompts(ctx)
    out, n = ctx.samples("dpg"), ctx.cfg.images_for("dpg")
    return SuiteResult({"prompts": len(pairs), "images": len(pairs) * n},
                       grids={"dpg": [out / f"{name}.png" for name, _ in pairs[:4]]},
                       notes=[f"DPG-Bench grids in {out}: score them with ELLA's dpg_bench/compute_dpg_bench.py "
                              f"--image-root-path {out} --resolution {ctx.sampler.size} --pic-num {n}"])
