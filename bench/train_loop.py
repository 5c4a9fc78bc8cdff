"""The real trainer (`fusedit train`'s loop) per loop setting, from one feature cache, in one run.

Where `train_step.py` times a bare step, this times everything a stage does per step: reading and
decoding the cache, the step's random draws, the copy to the device, the step, the EMA update and the
loss logging. Rows: eager vs compiled blocks, EMA on the host vs beside the weights (auto), inputs
made in the step vs ahead on a thread. Images/s is the steady rate after the first `--warmup` steps.
Usage: python bench/train_loop.py [--samples 256] [--batch-size 16] [--steps 60] [--llm tiny-gemma]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import yaml
from cache_throughput import make_llm

from fusedit.components.cache.build import build_cache
from fusedit.components.data.synth import synth
from fusedit.components.shared.device import pick_device
from fusedit.components.train.loop import train
from fusedit.model.config import load_recipe

ROWS = {  # label -> Stage fields
    "in-step inputs, eager, EMA on host": {"prefetch": 0, "compile": "none", "ema_device": "host"},
    "in-step inputs, eager, EMA auto": {"prefetch": 0, "compile": "none", "ema_device": "auto"},
    "in-step inputs, compiled blocks, EMA auto": {"prefetch": 0, "compile": "blocks", "ema_device": "auto"},
    "inputs ahead, eager, EMA on host": {"prefetch": 2, "compile": "none", "ema_device": "host"},
}


def steady_rate(timing_tsv: str, warmup: int) -> float:
    """Images/s between the warm-up's last step and the last step, from timing.tsv's running rate (the
    stage writes it beside loss.tsv, untracked: loss.tsv itself holds no wall-clock value)."""
    rows = [ln.split("\t") for ln in open(timing_tsv).read().splitlines()[1:]]
    (s0, ips0), (s1, ips1) = [(int(r[0]), float(r[1])) for r in (rows[warmup - 1], rows[-1])]
    # running rate = seen / elapsed with seen = step * batch: elapsed_s = step * batch / rate
    return (s1 - s0) / (s1 / ips1 - s0 / ips0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ema-every", type=int, default=10)
    ap.add_argument("--llm", default="tiny-gemma")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--rows", nargs="*", help="substrings of the row labels to run")
    args = ap.parse_args()
    device = pick_device(None)
    results = []
    with tempfile.TemporaryDirectory() as root:
        recipe = load_recipe("tiny", {"model.llm": make_llm(root, args.llm), "model.resolution": args.resolution})
        shards = os.path.join(root, "shards")
        synth(shards, samples=args.samples, seed=0, shard_size=max(1, args.samples // 4), bad_fraction=0.0)
        cache = os.path.join(root, "cache")
        build_cache(shards, cache, recipe, dtype="bf16", progress=False, echo=lambda s: None)
        for label, fields in ROWS.items():
            if args.rows and not any(r in label for r in args.rows):
                continue
            stage = {"name": "loop", "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4,
                     "ema_every": args.ema_every, "save_every": args.steps, "log_every": args.steps,
                     "sample_prompts": ["a red square"], **fields}
            params = os.path.join(root, "params.yaml")
            with open(params, "w") as f:
                yaml.safe_dump({"train": {"seed": 0, "stages": [stage]}}, f)
            out = os.path.join(root, "out", label.replace(" ", "-").replace(",", ""))
            r = train(recipe, "loop", cache, out, params)
            results.append((label, steady_rate(os.path.join(out, "timing.tsv"), args.warmup), r.final_loss))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device {name}, recipe tiny, LLM {args.llm}, {args.resolution}px, batch {args.batch_size}, "
          f"{args.steps} steps ({args.warmup} warm-up), EMA every {args.ema_every}")
    print("| loop setting | images/s | vs first row | final loss |\n|---|---|---|---|")
    for label, ips, loss in results:
        print(f"| {label} | {ips:.1f} | {ips / results[0][1]:.2f}x | {loss:.6f} |")


if __name__ == "__main__":
    main()
