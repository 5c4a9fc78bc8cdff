"""Filter and cache build under all cores, many small shards vs a few huge ones: throughput and peak memory.

Each run is a fresh process; a sampler sums the resident memory of that process and all its children
(the filter's worker pool) every 20 ms, so the peak is what the machine had to hold. The same samples
go through both layouts, so the two rows of a step differ only in how the data is cut into shards.
Usage: python bench/load.py [--samples 256] [--small 8] [--huge 2] [--size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from fusedit.components.data.synth import synth

FILTER = """
import json, sys, time
import imagehash, pandas, pyarrow.parquet  # imports outside the timing
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
print("ready", flush=True)
t0 = time.perf_counter()
r = filter_shards(FilterConfig(input=sys.argv[1], output=sys.argv[2], workers=0, report=False, min_side=16))
print(json.dumps({"n": r.n_in, "seconds": time.perf_counter() - t0, "workers": r.run["workers"]}))
"""

CACHE = """
import json, os, sys, time
import torch
from fusedit.components.cache.build import build_cache
from fusedit.model.config import load_recipe
llm, vae = sys.argv[3], sys.argv[4]
recipe = load_recipe("tiny", {"model.llm": llm, "model.vae": vae, "model.vae_subfolder": None, "model.vae_scale": 8,
                              "model.in_channels": 16, "model.resolution": 32})
print("ready", flush=True)
t0 = time.perf_counter()
r = build_cache(sys.argv[1], sys.argv[2], recipe, batch_size=32, progress=False, echo=lambda s: None)
print(json.dumps({"n": r.n_samples, "seconds": time.perf_counter() - t0, "workers": torch.get_num_threads()}))
"""


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the step (or a worker being listed) just exited
        return 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


def measure(script: str, *args: str) -> dict:
    """Run one step in a fresh process; its result plus the peak RSS of its process tree once it is ready."""
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(child.pid)
    assert child.stdout.readline().strip() == "ready"
    peak = [tree_rss(ps)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = child.stdout.read()
    child.wait()
    done.set()
    t.join()
    if child.returncode:
        raise SystemExit(f"{script.split()[0]} run failed with exit code {child.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_mb"] = peak[0] / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--small", type=int, default=8, help="samples per shard in the many-small layout")
    ap.add_argument("--huge", type=int, default=2, help="number of shards in the few-huge layout")
    ap.add_argument("--size", type=int, default=256, help="short side of the synthetic images")
    args = ap.parse_args()
    layouts = {"many-small": args.small, "few-huge": -(-args.samples // args.huge)}
    print(f"cores {os.cpu_count()}, {args.samples} samples of {args.size}px per layout")
    with tempfile.TemporaryDirectory() as root:
        from fusedit.model import tiny

        llm, vae = os.path.join(root, "llm"), os.path.join(root, "vae")
        tok = tiny.build_tokenizer(llm)
        tiny.build_llm(llm, "tiny-gemma", vocab_size=len(tok))
        tiny.build_vae(vae)
        for name, per_shard in layouts.items():
            src = os.path.join(root, name)
            synth(src, samples=args.samples, seed=0, shard_size=per_shard, bad_fraction=0.0,
                  short_side=(args.size, args.size))
            n_shards = -(-args.samples // per_shard)
            for step, script, extra in (("filter", FILTER, ()), ("cache", CACHE, (llm, vae))):
                r = measure(script, src, os.path.join(root, f"{name}-{step}"), *extra)
                unit = "workers" if step == "filter" else "threads"
                print(f"load step={step} layout={name} shards={n_shards} per_shard={per_shard} samples={r['n']} "
                      f"{unit}={r['workers']} seconds={r['seconds']:.2f} samples_per_s={r['n'] / r['seconds']:.1f} "
                      f"peak_rss_mb={r['peak_mb']:.0f}", flush=True)


if __name__ == "__main__":
    main()
