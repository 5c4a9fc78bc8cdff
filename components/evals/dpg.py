"""The `dpg` suite: DPG-Bench prompts, four images per prompt tiled 2x2 in `<prompt name>.png`.

That is the file ELLA's `compute_dpg_bench.py` reads (it cuts the grid back into tiles of
`--resolution`); score the folder with it unchanged.
"""
from __future__ import annotations

from fusedit.components.evals.base import SuiteContext, SuiteResult
from fusedit.components.evals.prompts import read_named_prompts
from fusedit.components.evals.sampling import Job, grid, save_png
from fusedit.errors import UserError

TILES = 4


def _prompts(ctx: SuiteContext) -> list[tuple[str, str]]:
    if not ctx.cfg.dpg_prompts:
        raise UserError("suite dpg needs --dpg-prompts (DPG-Bench's prompts/ folder or dpg_bench.csv)")
    pairs = read_named_prompts(ctx.cfg.dpg_prompts, "--dpg-prompts")
    return pairs[: ctx.cfg.limit] if ctx.cfg.limit else pairs


def prepare(ctx: SuiteContext) -> list[Job]:
    out = ctx.samples("dpg")
    jobs = []
    for name, prompt in _prompts(ctx):
        path = out / f"{name}.png"
        jobs.append(Job(prompt, ctx.cfg.seed, TILES, [path], lambda imgs, path=path: save_png(grid(imgs, 2), path)))
    return jobs


def score(ctx: SuiteContext) -> SuiteResult:
    pairs = _prompts(ctx)
    out = ctx.samples("dpg")
    return SuiteResult({"prompts": len(pairs), "images": len(pairs) * TILES},
                       grids={"dpg": [out / f"{n}.png" for n, _ in pairs[:4]]},
                       notes=[f"DPG-Bench grids in {out}: score them with ELLA's dpg_bench/compute_dpg_bench.py "
                              f"--image-root-path {out} --resolution {ctx.sampler.size} --pic-num {TILES}"])
