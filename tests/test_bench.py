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


def test_curve_plot_draws_each_score_at_its_steps():
    """bench/prompt_following_curve.py's SVG: one line per plotted score, each point at its (steps, score)."""
    import importlib.util
    import xml.etree.ElementTree as ET

    spec = importlib.util.spec_from_file_location("curve", BENCH / "prompt_following_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    table = ("steps\toverall\ttext_blind_overall\tcolors\tsingle_object\n"
             "1000\t0.2\t0.1\t0.4\t0.3\n2000\t0.5\t0.2\t0.8\t0.9\n")
    w, h, m = 400, 200, 40
    root = ET.fromstring(curve.plot(table, budget=4000, w=w, h=h, m=m))
    lines = [e for e in root.iter("{http://www.w3.org/2000/svg}polyline") if e.get("stroke-width") == "2"]
    assert len(lines) == 4
    want = {"overall": [0.2, 0.5], "text_blind_overall": [0.1, 0.2], "colors": [0.4, 0.8], "single_object": [0.3, 0.9]}
    for line, (col, scores) in zip(lines, want.items(), strict=True):
        pts = [float(v) for p in line.get("points").split() for v in p.split(",")]
        expect = [v for s, y in zip((1000, 2000), scores, strict=True)
                  for v in (m + s / 4000 * (w - 2 * m), h - m - y * (h - 2 * m))]
        assert pts == pytest.approx(expect, abs=0.06), col
    budget = [e for e in root.iter("{http://www.w3.org/2000/svg}line") if e.get("stroke-dasharray")]
    assert [float(budget[0].get("x1"))] == pytest.approx([w - m])  # the budget is the axis' end here
