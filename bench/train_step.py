"""Training-step throughput of the DiT at a recipe's real shapes: random weights, cached text K/V.

One configuration from the command line; `bench/gpu.py` runs the whole table (every optimisation
setting) with the same functions. One step is what the trainer does with a cached text stream:
rectified-flow loss under bf16 autocast (fp32 parameters), backward, gradient clipping at 1.0, fused
AdamW; no LLM and no VAE run. MFU is the facts file's analytic FLOP count (section 7) over a bf16
matmul rate measured in the same run. Without a GPU it runs the tiny recipe at tiny shapes (fp32),
so `make bench` always exercises it; the printed fields are the same.
Usage: python bench/train_step.py [--recipe fusedit/baseline fusedit/large-scale] [--batch 16]
       [--resolution 512] [--steps 8] [--warmup 3] [--compile] [--kernel sdpa|flex] [--checkpointing]
       [--device cuda]
Output: one `key=value` line per measurement (`matmul ...`, `train ...`).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

from gpu import (
    GPU_RECIPES,
    Setting,
    compute_dtype,
    device_name,
    fit_batch,
    forward_flops,
    image_tokens,
    load,
    matmul_rate,
    peak_memory_gib,
    pick_device,
    report,
    time_train,
)


def shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both single-configuration benches share: which recipes, at which shapes, how."""
    ap.add_argument("--recipe", nargs="+", help="default: baseline and large-scale on GPU, tiny on CPU")
    ap.add_argument("--resolution", type=int, help="pixels (default: the recipe's, 512 for the real ones)")
    ap.add_argument("--text-len", type=int, help="text tokens (default: the recipe's max_prompt_length)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    ap.add_argument("--kernel", choices=["sdpa", "flex"], default="sdpa", help="attention kernel for padded text")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--set", action="append", default=[], help="recipe override, e.g. model.dit_num_layers=2")


def setting(args, **extra) -> Setting:
    return Setting(compile="blocks" if args.compile else "none", kernel=args.kernel, **extra)


def configurations(args):
    """Report the measured matmul rate, then yield (dev, rate, name, rec, arch, spec, text_len, n_img) per recipe."""
    dev = pick_device(args.device)
    rate, n = matmul_rate(dev)
    report("matmul", device=device_name(dev), dtype=str(compute_dtype(dev)).split(".")[-1], n=n, tflops=rate / 1e12)
    for name in args.recipe or (GPU_RECIPES if dev.type == "cuda" else ["tiny"]):
        rec, arch, spec = load(name, args.resolution, args.set)
        yield dev, rate, name, rec, arch, spec, args.text_len or rec.model.max_prompt_length, image_tokens(rec, arch)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--checkpointing", action="store_true", help="recompute each block in the backward")
    ap.add_argument("--batch", type=int, help="default 16 on GPU, 4 on CPU")
    ap.add_argument("--steps", type=int, help="timed steps (default 8 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    args = ap.parse_args(argv)
    for dev, rate, name, rec, arch, spec, text_len, n_img in configurations(args):
        gpu = dev.type == "cuda"
        flops = 3 * forward_flops(arch, n_img, text_len)
        label = {"recipe": name, "res": rec.model.resolution, "compile": args.compile, "kernel": args.kernel,
                 "checkpointing": args.checkpointing}
        run = partial(time_train, rec, arch, spec, dev, text_len=text_len, steps=args.steps or (8 if gpu else 3),
                      warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
                      s=setting(args, checkpointing=args.checkpointing))
        batch, r = fit_batch(run, dev, args.batch or (16 if gpu else 4), "train", label)
        if r is None:
            continue
        ips = batch / r["s_per_call"]
        report("train", **label, batch=batch, image_tokens=n_img, text_tokens=text_len, params_b=r["params_b"],
               s_per_step=r["s_per_call"], images_per_s=ips, tflop_per_image=flops / 1e12,
               mfu=ips * flops / rate, peak_mem_gib=peak_memory_gib(dev))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
