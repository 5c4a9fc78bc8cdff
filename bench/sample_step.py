"""Sampling time per image: 25 guided Euler steps of the DiT at a recipe's real shapes, text K/V cached.

The text stream is computed once per caption, so a sampling step is one DiT forward over the batch
[uncond ; cond] (batch 2 per image) through the project's own sampler (`RectifiedFlow.sample`).
MFU counts 2 x steps DiT forwards per image (50 for 25 steps) over a bf16 matmul rate measured in
the same run. Without a GPU it runs the tiny recipe at tiny shapes; the printed fields are the same.
Usage: python bench/sample_step.py [--recipe fusedit/baseline fusedit/large-scale] [--prompts 1]
       [--resolution 512] [--steps 25] [--guidance 6] [--repeats 3] [--compile] [--device cuda]
Output: one `key=value` line per measurement (`matmul ...`, `sample ...`).
"""
from __future__ import annotations

import argparse

import torch
from train_step import (
    autocast,
    build_model,
    compute_dtype,
    configurations,
    fit_batch,
    forward_flops,
    peak_memory_gib,
    report,
    reset_memory,
    shape_arguments,
    text_context,
    timed,
)

from fusedit.model.flow import RectifiedFlow


def time_sample(rec, arch, spec, dev, prompts: int, text_len: int, steps: int, guidance: float, repeats: int,
                compile_: bool) -> float:
    """Mean seconds per sampling call (all steps, both guidance halves) after one untimed call."""
    reset_memory(dev)
    torch.manual_seed(0)
    model = build_model(rec, arch, spec, dev, compile_).eval().requires_grad_(False)
    flow = RectifiedFlow(rec.flow)
    lengths = torch.randint(1, text_len + 1, (2 * prompts,), generator=torch.Generator().manual_seed(0))
    lengths[:prompts], lengths[prompts] = 1, text_len  # uncond = the empty caption (BOS only)
    text = text_context(arch, spec, 2 * prompts, text_len, dev, compute_dtype(dev), lengths=lengths)
    uncond, cond = text.select(slice(0, prompts)), text.select(slice(prompts, None))
    size = rec.model.latent_size
    noise = torch.randn(prompts, arch.in_channels, size, size, device=dev)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(dev):
            return flow.sample(model, cond, uncond, noise, steps=steps, guidance=guidance)

    dt, x = timed(run, dev, 1, repeats)
    if not torch.isfinite(x).all():
        raise RuntimeError("sample is not finite")
    return dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--prompts", type=int, default=1, help="images per batch (the forward batch is twice that)")
    ap.add_argument("--steps", type=int, default=25, help="Euler steps")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, help="timed sampling calls (default 3 on GPU, 1 on CPU)")
    args = ap.parse_args(argv)
    for dev, rate, name, rec, arch, spec, text_len, n_img in configurations(args):
        gpu = dev.type == "cuda"
        forwards = 2 * args.steps if args.guidance != 1.0 else args.steps
        flops = forwards * forward_flops(arch, n_img, text_len)
        label = {"recipe": name, "res": rec.model.resolution, "compile": args.compile, "steps": args.steps}

        def run(prompts, rec=rec, arch=arch, spec=spec, text_len=text_len, dev=dev, gpu=gpu):
            return time_sample(rec, arch, spec, dev, prompts, text_len, args.steps, args.guidance,
                               args.repeats or (3 if gpu else 1), args.compile)

        prompts, dt = fit_batch(run, dev, args.prompts, "sample", label)
        if dt is None:
            continue
        per_image = dt / prompts
        report("sample", **label, prompts=prompts, forward_batch=2 * prompts if forwards > args.steps else prompts,
               image_tokens=n_img, text_tokens=text_len, s_per_image=per_image, images_per_s=1 / per_image,
               tflop_per_image=flops / 1e12, mfu=flops / per_image / rate, peak_mem_gib=peak_memory_gib(dev))


if __name__ == "__main__":
    main()
