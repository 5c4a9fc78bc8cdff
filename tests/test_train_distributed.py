"""torchrun with 2 CPU processes (gloo) trains like 1 process with the same global batch (DDP, FSDP2, HSDP)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_train import _losses

BIN = Path(sys.executable).parent


def _params(tmp_path: Path, strategy: str, **extra) -> Path:
    stage = {"name": "base", "steps": 4, "batch_size": 4, "save_every": 4, "ema_every": 2, "log_every": 1,
             "strategy": strategy, "sample_prompts": ["a red square"], **extra}
    p = tmp_path / f"params-{strategy}.yaml"
    p.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [stage]}}))
    return p


def _train(prefix: list[str], tiny_dir, data, params, out):
    cmd = [*prefix, "train", "--recipe", "tiny", "--stage", "base", "--data", str(data), "--output", str(out),
           "--params", str(params), "--set", f"model.llm={tiny_dir / 'gemma'}", "--set", "model.resolution=16",
           "--set", "model.max_prompt_length=16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("ddp", {}), ("fsdp", {}),
    ("hsdp", {}),  # one shard group of torchrun's LOCAL_WORLD_SIZE (a node)
    ("hsdp", {"shard_group": 1}),  # two replicas of one shard each: the across-node path of HSDP
])
def test_two_processes_match_one(tmp_path, tiny_dir, filtered, strategy, extra):
    params = _params(tmp_path, strategy, **extra)
    _train([str(BIN / "fusedit")], tiny_dir, filtered, params, tmp_path / "one")
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "fusedit")]
    _train(torchrun, tiny_dir, filtered, params, tmp_path / "two")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] == ["1", "2", "3", "4"]
    for a, b in zip(one, two, strict=True):
        assert abs(float(a[1]) - float(b[1])) < 1e-4 * max(1.0, abs(float(a[1]))), (a, b)
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000004" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
    assert (tmp_path / "two" / "pipeline" / "model_index.json").is_file()
