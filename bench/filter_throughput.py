"""Filter throughput vs a bare PIL decode loop over the same JPEGs, and peak memory 1 vs 10 shards.

Targets (issue 3): filter >= 0.5x bare decode per core at 512 px; peak memory for 10 shards within
1.2x of 1 shard. All figures come from this one run on this machine, so the ratios are comparable.
Usage: python bench/filter_throughput.py [--per-shard 200] [--size 512]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

from fusedit.components.data.synth import synth
from fusedit.components.shared.tario import iter_samples

CHILD = """
import json, resource, sys, time
import imagehash, pandas, pyarrow.parquet  # one-time imports, outside the timing like the bare loop's
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
cfg = FilterConfig(input=sys.argv[1], output=sys.argv[2], workers=int(sys.argv[3]), report=False,
                   full_color_decode=sys.argv[4] == "1")
t0 = time.perf_counter()
r = filter_shards(cfg)
seconds = time.perf_counter() - t0
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"n": r.n_in, "seconds": seconds, "peak_mb": max(self_kb, child_kb) / 1024}))
"""


def bare_decode(paths: list[str]) -> tuple[int, float]:
    """Only what any loader must do: read the tar, decode each JPEG fully with PIL."""
    n, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            for s in iter_samples(f):
                Image.open(io.BytesIO(s.members["image.jpg"])).load()
                n += 1
    return n, time.perf_counter() - t0


def run_filter(pattern: str, out: str, workers: int, full_color: bool = False) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, pattern, out, str(workers), str(int(full_color))], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        synth(src, samples=10 * args.per_shard, seed=0, shard_size=args.per_shard, bad_fraction=0.0,
              short_side=(args.size, args.size), aspects=(1.0,))
        shards = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".tar"))
        bare_decode(shards[:1])  # warm the page cache and PIL
        n_bare, t_before = bare_decode(shards)
        one = run_filter(shards[0], os.path.join(tmp, "out1"), 1)
        ten = run_filter(src, os.path.join(tmp, "out10"), 1)
        par = run_filter(src, os.path.join(tmp, "outp"), 0)
        rgb = run_filter(src, os.path.join(tmp, "outc"), 1, full_color=True)
        _, t_after = bare_decode(shards)  # before and after, so a busy machine skews both sides alike
    bare_ips = n_bare / ((t_before + t_after) / 2)
    filt_ips = ten["n"] / ten["seconds"]
    print(f"images: {n_bare} JPEGs of {args.size}x{args.size} in 10 shards; cores: {os.cpu_count()}")
    print(f"bare PIL decode (1 core):      {bare_ips:8.1f} images/s")
    print(f"filter, 1 worker (1 core):     {filt_ips:8.1f} images/s")
    print(f"ratio filter / bare decode:    {filt_ips / bare_ips:8.2f}   (target >= 0.5)")
    print(f"  same, full_color_decode:     {rgb['n'] / rgb['seconds']:8.1f} images/s"
          f"   (ratio {rgb['n'] / rgb['seconds'] / bare_ips:.2f})")
    print(f"filter, all cores:             {par['n'] / par['seconds']:8.1f} images/s")
    print(f"peak memory, 1 shard:          {one['peak_mb']:8.1f} MB")
    print(f"peak memory, 10 shards:        {ten['peak_mb']:8.1f} MB")
    print(f"ratio 10 / 1 shards:           {ten['peak_mb'] / one['peak_mb']:8.2f}   (target <= 1.2)")


if __name__ == "__main__":
    main()
