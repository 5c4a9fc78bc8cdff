"""Sampling time per image: 25 guided Euler steps of the DiT at a recipe's real shapes, text K/V cached.

The text stream is computed once per caption, so a sampling step is one DiT forward over the batch
[uncond ; cond] (batch 2 per image) through the project's own sampler (`RectifiedFlow.sample`).
MFU counts 2 x steps DiT forwards per image (50 for 25 steps) over a bf16 matmul rate measured in
the same run. Without a GPU it runs the tiny recipe at tiny shapes; the printed fields are the same.
One configuration from the command line; `bench/gpu.py` runs the whole table with the same functions.
Usage: python bench/sample_step.py [--recipe fusedit/baseline fusedit/large-scale] [--prompts 1]
       [--resolution 512] [--steps 25] [--guidance 6] [--repeats 3] [--compile] [--kernel sdpa|flex]
       [--separate-guidance] [--device cuda]
Output: one `key=value` line per measurement (`matmul ...`, `sample ...`).
"""
from __future__ import annotations

import argparse

from gpu import fit_batch, forward_flops, peak_memory_gib, report, time_sample
from train_step import configurations, setting, shape_arguments


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--prompts", type=int, default=1, help="images per batch (the forward batch is twice that)")
    ap.add_argument("--steps", type=int, default=25, help="Euler steps")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--separate-guidance", action="store_true", help="two forwards per step instead of one")
    ap.add_argument("--repeats", type=int, help="timed sampling calls (default 3 on GPU, 1 on CPU)")
    args = ap.parse_args(argv)
    for dev, rate, name, rec, arch, spec, text_len, n_img in configurations(args):
        gpu = dev.type == "cuda"
        forwards = 2 * args.steps if args.guidance != 1.0 else args.steps
        flops = forwards * forward_flops(arch, n_img, text_len)
        label = {"recipe": name, "res": rec.model.resolution, "compile": args.compile, "kernel": args.kernel,
                 "steps": args.steps}
        s = setting(args, guidance="separate" if args.separate_guidance else "batched")

        def run(prompts, rec=rec, arch=arch, spec=spec, text_len=text_len, dev=dev, gpu=gpu, s=s):
            return time_sample(rec, arch, spec, dev, prompts, text_len, args.steps, args.guidance,
                               args.repeats or (3 if gpu else 1), s)

        prompts, r = fit_batch(run, dev, args.prompts, "sample", label)
        if r is None:
            continue
        per_image = r["s_per_call"] / prompts
        report("sample", **label, prompts=prompts, forward_batch=2 * prompts if forwards > args.steps else prompts,
               image_tokens=n_img, text_tokens=text_len, s_per_image=per_image, images_per_s=1 / per_image,
               tflop_per_image=flops / 1e12, mfu=flops / per_image / rate, peak_mem_gib=peak_memory_gib(dev))


if __name__ == "__main__":
    main()
