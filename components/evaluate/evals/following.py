"""Does the model follow its prompts at all? Two figures every evaluation run reports, whatever its suites.

- `image_spread`: the mean per-pixel absolute difference (0-255) between images of different prompts
  drawn from the same seed. A model that ignores its prompt draws one image for all of them: about 0.
- `velocity_gap_t<T>`: the mean over prompts of |v_cond - v_uncond| / |v_cond| at timestep T (sigma =
  T / 1000), on x_t = (1 - sigma) x0 + sigma * noise with x0 the model's own image for the prompt. How
  much the caption moves the prediction; guidance scales exactly this difference.
A suite with a judge reports its text-blind baseline beside its score (see `synthetic`).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from fusedit.components.evaluate.evals.sampling import Job, Sampler

TIMESTEPS = (100, 500, 900)
MAX_PROMPTS = 8


def _images(sampler: Sampler, prompts: list[str], seed: int) -> np.ndarray:
    jobs = [Job(p, seed, 1, [], lambda _imgs: None) for p in prompts]
    out = []
    for batch in sampler._batches(jobs):
        out += [np.asarray(imgs[0], dtype=np.float32) for imgs in sampler.images(batch)]
    return np.stack(out)


def image_spread(images: np.ndarray) -> float:
    """Mean |a - b| per pixel and channel over every pair of images (0-255 scale)."""
    pairs = list(itertools.combinations(range(len(images)), 2))
    return float(np.mean([np.abs(images[i] - images[j]).mean() for i, j in pairs])) if pairs else 0.0


@torch.no_grad()
def velocity_gaps(sampler: Sampler, prompts: list[str], images: np.ndarray, seed: int) -> dict[str, float]:
    pipe = sampler.pipe
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).div(127.5).sub(1).to(device)
    g = torch.Generator().manual_seed(seed)
    x0 = pipe.encode_images(pixels, g).to(dtype)
    noise = torch.randn(x0.shape, generator=g).to(device, dtype)
    cond = pipe.encode_prompt(prompts).to(dtype)
    uncond = pipe.encode_prompt([""] * len(prompts)).to(dtype)
    out = {}
    for t in TIMESTEPS:
        s = t / 1000
        x_t = (1 - s) * x0 + s * noise
        ts = torch.full((len(prompts),), float(t), device=device)
        vc, vu = pipe.transformer(x_t, ts, cond).float(), pipe.transformer(x_t, ts, uncond).float()
        gap = (vc - vu).flatten(1).norm(dim=1) / vc.flatten(1).norm(dim=1).clamp_min(1e-12)
        out[f"velocity_gap_t{t}"] = float(gap.mean())
    return out


def measure(sampler: Sampler, prompts: list[str], seed: int) -> dict[str, float]:
    """The prompt-following figures on up to MAX_PROMPTS distinct prompts (one image each, one seed)."""
    chosen = list(dict.fromkeys(prompts))[:MAX_PROMPTS]
    if len(chosen) < 2:
        return {}
    images = _images(sampler, chosen, seed)
    return {"prompts": float(len(chosen)), "image_spread": image_spread(images),
            **velocity_gaps(sampler, chosen, images, seed)}
