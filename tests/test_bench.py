"""The GPU benchmarks stay runnable: on CPU they fall back to the tiny recipe and print parseable figures."""
from __future__ import annotations

import json
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


def test_gpu_bench_runs_every_row_on_cpu(tmp_path):
    """bench/gpu.py's whole plan at tiny shapes: every setting runs, every row is in the JSON and the table."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=900, env=env, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "rows.json").read_text())
    assert doc["tiny"] and doc["device"].startswith("cpu") and doc["matmul_tflops"] > 0
    rows = doc["rows"]
    assert len(rows) == len(doc["plan"]) >= 10
    for row in rows:
        assert row.get("status", "ok") == "ok", row
        assert row["images_per_s"] > 0 and row["peak_mem_gib"] > 0 and 0 < row["mfu"] < 1, row
        assert abs(row["s_per_image"] * row["images_per_s"] - 1) < 1e-9
    settings = [p["setting"] for p in doc["plan"]]
    assert {s["compile"] for s in settings} == {"none", "blocks", "blocks-cudagraphs", "model", "model-cudagraphs"}
    assert {s["kernel"] for s in settings} == {"sdpa", "flex"}
    assert {s["padded"] for s in settings} == {s["checkpointing"] for s in settings} == {True, False}
    assert {s["weights"] for s in settings} == {"fp32", "bf16"}
    assert {s["guidance"] for s in settings} == {"batched", "separate"}
    assert {s["matmul"] for s in settings} == {"bf16", "fp8"}
    table = out.stdout[out.stdout.index("| kind |"):].splitlines()
    assert len(table) == 2 + len(rows)
    for row in rows:
        assert any(f"| {row['kind']} | tiny | {row['setting']} | {row['batch']} |" in line for line in table), row


def test_train_loop_bench_rows_train_the_same_numbers():
    """bench/train_loop.py runs the real trainer per loop setting; a loop setting changes no number."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(BENCH / "train_loop.py"), "--samples", "24", "--batch-size", "4",
                          "--steps", "8", "--warmup", "3", "--ema-every", "2", "--rows", "eager"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln.strip("|").split("|") for ln in out.stdout.splitlines() if ln.startswith("| ") and "x |" in ln]
    assert [r[0].strip() for r in rows] == ["in-step inputs, eager, EMA on host", "in-step inputs, eager, EMA auto",
                                            "inputs ahead, eager, EMA on host"]
    assert all(float(r[1]) > 0 for r in rows)
    assert len({r[3].strip() for r in rows}) == 1, rows  # the same final loss, to the printed digit
