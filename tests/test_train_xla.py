"""The torch-xla path: a tiny stage on a 4-device XLA-on-CPU SPMD mesh matches the eager run.

torch-xla needs its own torch (2.9), so it runs in the second venv that `make xla-venv` builds; both
runs are subprocesses of that venv, and the checkpoint they write is then read back here, in the main
venv. Without .venv-xla the test is skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.warm import REAL

ROOT = Path(__file__).resolve().parents[1]
XLA_BIN = ROOT / ".venv-xla" / "bin"
needs_xla_venv = pytest.mark.skipif(not (XLA_BIN / "python").exists(),
                                reason=".venv-xla/bin/python not found: build the torch-xla venv with `make xla-venv`")
STEPS = 6
# XLA on the CPU and eager PyTorch both compute in fp32, but XLA fuses and reorders the reductions (matmuls,
# softmax, the loss mean, the grad norm) and SPMD splits the matmuls over 4 devices, so a step differs in the
# last bits, and AdamW carries that on. Measured here over 6 steps: <= 2e-6 absolute (1.5e-6 relative) on the
# loss, which loss.tsv rounds to 1e-6. 1e-4 relative leaves ~60x headroom, yet fails on a real divergence:
# changing the learning rate by 1% alone moves the eager loss by 2.2e-4 relative at step 2, 1e-3 at step 6.
RTOL = 1e-4

# Runs `fusedit train` in-process (the same CLI entry point) with a spy on xla.shard, then writes the
# sharding the runtime holds for every DiT parameter after training.
SPY = textwrap.dedent("""
    import json, sys
    from fusedit.components.train import xla
    seen = {}
    _shard = xla.shard
    def shard(model):
        seen["model"], seen["specs"] = model, _shard(model)
        return seen["specs"]
    xla.shard = shard
    from fusedit.cli import main
    try:
        main(sys.argv[2:])
    except SystemExit as e:
        if e.code:
            raise
    import torch_xla.runtime as xr
    model = seen["model"]
    out = {"devices": xr.global_runtime_device_count(), "specs": {k: list(v) for k, v in seen["specs"].items()},
           "runtime": {n: xla.sharding(p) for n, p in model.named_parameters()},
           "device": str(next(model.parameters()).device)}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
""")




def _losses(out: Path) -> list[float]:
    return [float(ln.split("\t")[1]) for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


def test_fsdp_spec_splits_the_largest_divisible_dim():
    from fusedit.components.train.xla import fsdp_spec

    assert fsdp_spec((64, 30), 4) == ("fsdp", None)
    assert fsdp_spec((30, 64), 4) == (None, "fsdp")
    assert fsdp_spec((3, 8, 12), 4) == (None, None, "fsdp")
    assert fsdp_spec((5, 7), 4) is None and fsdp_spec((64,), 4) is None and fsdp_spec((64, 64), 1) is None


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_xla_device_without_torch_xla_is_a_clear_error():
    from fusedit.components.train import xla
    from fusedit.errors import UserError

    with pytest.raises(UserError, match="make xla-venv"):
        xla.device()


@needs_xla_venv
def test_xla_spmd_stage_matches_eager_and_shards_over_4_devices(tmp_path, tiny_dir, filtered):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": 7, "stages": [
        {"name": "base", "steps": STEPS, "batch_size": 4, "lr": 1e-3, "save_every": STEPS, "ema_every": 2,
         "log_every": 1, "precision": "fp32", "sample_prompts": ["a red square"]}]}}))
    # LLVM at -O0: XLA's CPU compile of each step's graph drops from ~40 s to ~10 s here; same fp32 math
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4", "XLA_FLAGS": flags,
           "TF_CPP_MIN_LOG_LEVEL": "2", "VIRTUAL_ENV": str(XLA_BIN.parent),
           "PATH": f"{XLA_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def args(out: Path, device: str) -> list[str]:
        return ["train", "--recipe", "tiny", "--stage", "base", "--data", str(filtered), "--output", str(out),
                "--params", str(params), "--set", f"model.llm={tiny_dir / 'gemma'}", "--set", "model.resolution=16",
                "--set", "model.max_prompt_length=16", "--device", device]

    xla_out, eager_out, report = tmp_path / "xla" / "base", tmp_path / "eager" / "base", tmp_path / "sharding.json"
    xla_run = subprocess.run([str(XLA_BIN / "python"), "-c", SPY, str(report), *args(xla_out, "xla")],
                             capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert xla_run.returncode == 0, xla_run.stderr[-4000:]
    eager = subprocess.run([str(XLA_BIN / "fusedit"), *args(eager_out, "cpu")], capture_output=True, text=True,
                           timeout=600, env=env, cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr[-4000:]

    # the parameters really are sharded over the 4 devices of the mesh
    info = json.loads(report.read_text())
    assert info["devices"] == 4 and info["device"].startswith("xla")
    assert len(info["specs"]) >= 10, info["specs"]
    for name, spec in info["specs"].items():
        runtime = info["runtime"][name]
        assert spec.count("fsdp") == 1 and runtime.startswith("{devices=["), (name, runtime)
        dims = [int(s) for s in runtime.split("[", 1)[1].split("]", 1)[0].split(",")]
        assert dims[spec.index("fsdp")] == 4 and dims.count(1) == len(dims) - 1, (name, runtime)
    frozen = {v for k, v in info["runtime"].items() if k.startswith("encoder.")}
    assert frozen and frozen <= {"", "{replicated}"}, frozen  # the frozen LLM stays replicated

    # same loss curve as the eager path, within the XLA-vs-eager fp32 tolerance
    lx, le = _losses(xla_out), _losses(eager_out)
    assert len(lx) == len(le) == STEPS
    print("xla  ", lx, "\neager", le)
    for step, (a, b) in enumerate(zip(lx, le, strict=True), 1):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: xla {a} vs eager {b}"

    # the XLA run's checkpoint and export load in the main venv (torch 2.13), next to the eager one
    import torch

    from fusedit.components.train import checkpoint

    cx = checkpoint.load_latest(str(xla_out / "checkpoints"))
    ce = checkpoint.load_latest(str(eager_out / "checkpoints"))
    assert cx is not None and cx.step == STEPS
    assert cx.tensors["model"].keys() == ce.tensors["model"].keys()
    for k, v in cx.tensors["model"].items():
        assert v.device.type == "cpu" and torch.allclose(v, ce.tensors["model"][k], rtol=1e-4, atol=1e-5), k
    state = cx.objects["optimizer"]["state"]
    assert state and all(t.device.type == "cpu" for s in state.values() for t in s.values() if torch.is_tensor(t))
    gen = subprocess.run([REAL, "generate", "--pipeline",
                          str(xla_out / "pipeline"), "--prompt", "a red square", "--steps", "2", "--out",
                          str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert gen.returncode == 0, gen.stderr[-2000:]
