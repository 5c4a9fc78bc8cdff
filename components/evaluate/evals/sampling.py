"""Batched, resumable, rank-split sampling with fixed per-prompt seeds (the reference protocol).

Every job (one prompt, n images) draws its own noise from `torch.Generator().manual_seed(seed)`, as
GenEval's `torch.manual_seed(42)` before each prompt does, so an image does not depend on batching,
on the rank that drew it or on resumption. The LLM runs once per distinct prompt in a batch (cached
text K/V) and once for the empty unconditional caption. Images are written atomically, so a job
whose outputs all exist is finished and skipped.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fusedit.model.config import FlowConfig
from fusedit.model.flow import RectifiedFlow


@dataclass
class Job:
    prompt: str
    seed: int
    n: int  # images
    outputs: list[Path]  # every file the writer produces; all present = done
    write: Callable[[list[Image.Image]], None]

    def done(self) -> bool:
        return all(p.is_file() for p in self.outputs)


def save_png(img: Image.Image, path: Path) -> None:
    """Write through a temporary name so a killed run never leaves a half-written image behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, "PNG")
    os.replace(tmp, path)


def dist_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@dataclass
class Sampler:
    pipe: object  # FuseDiTPipeline
    steps: int = 25
    guidance: float = 6.0
    batch_size: int = 16  # images per forward (x2 with guidance)
    resolution: int | None = None  # pixels; None = the pipeline's own size
    rank: int = 0
    world: int = 1
    progress: bool = True

    @property
    def size(self) -> int:
        return self.resolution or self.pipe.transformer.config.sample_size * self.pipe.vae_scale

    def _batches(self, jobs: list[Job]) -> list[list[Job]]:
        out, cur, n = [], [], 0
        for j in jobs:
            if cur and n + j.n > self.batch_size:
                out.append(cur)
                cur, n = [], 0
            cur.append(j)
            n += j.n
        return out + ([cur] if cur else [])

    @torch.no_grad()
    def images(self, jobs: list[Job]) -> list[list[Image.Image]]:
        """Generate the images of a batch of jobs (no file I/O)."""
        pipe = self.pipe
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        prompts = list(dict.fromkeys(j.prompt for j in jobs))
        idx = torch.tensor([prompts.index(j.prompt) for j in jobs for _ in range(j.n)], device=device)
        text = pipe.encode_prompt(prompts)
        cond = text.map(lambda x, _d: x.index_select(0, idx), lambda x: x.index_select(0, idx)).to(dtype)
        uncond = None
        if self.guidance != 1.0:
            zero = torch.zeros_like(idx)
            uncond = pipe.encode_prompt([""]).map(lambda x, _d: x.index_select(0, zero),
                                                  lambda x: x.index_select(0, zero)).to(dtype)
        lat = self.size // pipe.vae_scale
        c = pipe.transformer.arch.in_channels
        noise = torch.cat([torch.randn((j.n, c, lat, lat), generator=torch.Generator().manual_seed(j.seed))
                           for j in jobs]).to(device, dtype)
        flow = RectifiedFlow(FlowConfig(shift=pipe.scheduler.config.shift), scheduler=pipe.scheduler)
        x = pipe.decode(flow.sample(pipe.transformer, cond, uncond, noise, self.steps, self.guidance))
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        imgs = [Image.fromarray(a) for a in arr]
        out, k = [], 0
        for j in jobs:
            out.append(imgs[k:k + j.n])
            k += j.n
        return out

    def run(self, jobs: list[Job], desc: str = "sampling") -> dict[str, int]:
        """Generate this rank's share of the jobs that are not finished yet; returns counts."""
        from tqdm import tqdm

        mine = jobs[self.rank::self.world]
        todo = [j for j in mine if not j.done()]
        bar = tqdm(total=sum(j.n for j in todo), desc=desc, unit="img", disable=not self.progress or not todo)
        for batch in self._batches(todo):
            for job, imgs in zip(batch, self.images(batch), strict=True):
                job.write(imgs)
            bar.update(sum(j.n for j in batch))
        bar.close()
        return {"jobs": len(mine), "generated": sum(j.n for j in todo), "skipped": len(mine) - len(todo)}


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile equally sized images row-major."""
    w, h = images[0].size
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out
