"""The GPU benchmarks stay runnable: on CPU they fall back to the tiny recipe and print parseable figures."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
NUMERIC = {
    "train": ["batch", "s_per_step", "images_per_s", "tflop_per_image", "mfu", "peak_mem_gib"],
    "sample": ["prompts", "s_per_image", "images_per_s", "tflop_per_image", "mfu", "peak_mem_gib"],
}


def _lines(script: str, *args: str) -> dict[str, dict[str, str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", *args], capture_output=True,
                         text=True, timeout=600, env=env, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        rows[kind] = dict(kv.split("=", 1) for kv in rest.split())
    return rows


@pytest.mark.parametrize("script,kind,args", [
    ("train_step.py", "train", ["--steps", "1", "--warmup", "1", "--batch", "2"]),
    ("sample_step.py", "sample", ["--steps", "3"]),
])
def test_bench_prints_its_figures_on_cpu(script, kind, args):
    rows = _lines(script, *args)
    assert float(rows["matmul"]["tflops"]) > 0 and rows["matmul"]["dtype"] == "float32"
    row = rows[kind]
    assert row["recipe"] == "tiny" and "status" not in row
    values = {k: float(row[k]) for k in NUMERIC[kind]}
    assert all(v > 0 for v in values.values()), values
    assert 0 < values["mfu"] < 1
