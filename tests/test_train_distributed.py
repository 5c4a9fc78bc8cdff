"""torchrun with 2 CPU processes (gloo) trains like 1 process with the same global batch (DDP, FSDP2, HSDP).

Equal curves alone would not prove distribution (two ranks that each trained the whole batch would match
too): each rank's own record (`ranks/rank-<r>.json`, components/train/distributed.py) must show world 2,
the strategy, disjoint halves of the one-process run's step-1 batch, and parameters sharded on dim 0
where the strategy shards them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import warm
from tests.test_train import _losses

BIN = Path(sys.executable).parent


def _params(tmp_path: Path, strategy: str, name: str | None = None, **extra) -> Path:
    stage = {"name": "base", "steps": 4, "batch_size": 4, "save_every": 4, "ema_every": 2, "log_every": 1,
             "strategy": strategy, "sample_prompts": ["a red square"], **extra}
    p = tmp_path / (name or f"params-{strategy}.yaml")
    p.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [stage]}}))
    return p


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# torchrun's ranks are the warm `fusedit` (each rank a fork of the warm server, with torchrun's environment),
# except the run that is SIGKILLed: there the ranks are real processes, so the kill lands on them at once.
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", warm.FUSEDIT]
TORCHRUN_REAL = [*TORCHRUN[:-1], warm.REAL]


def _cmd(prefix: list[str], tiny_dir, data, params, out) -> list[str]:
    return [*prefix, "train", "--recipe", "tiny", "--stage", "base", "--data", str(data), "--output", str(out),
            "--params", str(params), "--set", f"model.llm={tiny_dir / 'gemma'}", "--set", "model.resolution=16",
            "--set", "model.max_prompt_length=16"]


def _train(prefix: list[str], tiny_dir, data, params, out, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(prefix, tiny_dir, data, params, out), capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert (r.returncode == 0) == ok, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir, filtered) -> Path:
    """The one-process run every strategy is compared with (a world of 1 runs "single" whatever the stage's
    strategy says: `Dist` in components/train/distributed.py); one warm `fusedit`, no torchrun."""
    root = tmp_path_factory.mktemp("one")
    _train([warm.FUSEDIT], tiny_dir, filtered, _params(root, "ddp"), root / "one")
    return root / "one"


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra, killed", [
    ("ddp", {}, False), ("fsdp", {}, True),
    ("hsdp", {}, True),  # one shard group of torchrun's LOCAL_WORLD_SIZE (a node)
    ("hsdp", {"shard_group": 1}, False),  # two replicas of one shard each: the across-node path of HSDP
])
def test_two_processes_match_one(tmp_path, tiny_dir, filtered, one_process, strategy, extra, killed):
    params = _params(tmp_path, strategy, **extra)
    _train(TORCHRUN, tiny_dir, filtered, params, tmp_path / "two")
    one, two = _losses(one_process), _losses(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] == ["1", "2", "3", "4"]
    for a, b in zip(one, two, strict=True):
        assert abs(float(a[1]) - float(b[1])) < 1e-4 * max(1.0, abs(float(a[1]))), (a, b)
    w1 = load_file(str(one_process / "checkpoints" / "step-00000004" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
    assert (tmp_path / "two" / "pipeline" / "model_index.json").is_file()
    _check_distribution(one_process, tmp_path / "two", strategy, extra.get("shard_group"))
    if killed:
        _sigkill_then_resume(tmp_path, tiny_dir, filtered, strategy, extra, tmp_path / "two")


def _sigkill_then_resume(tmp_path, tiny_dir, filtered, strategy, extra, uninterrupted: Path) -> None:
    """torchrun and both ranks SIGKILLed after the step-2 checkpoint; the rerun resumes to the same run."""
    params = _params(tmp_path, strategy, name="params-save2.yaml", save_every=2, **extra)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(TORCHRUN_REAL, tiny_dir, filtered, params, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    marker, deadline = out / "checkpoints" / "step-00000002" / "COMMITTED", time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    launcher = psutil.Process(proc.pid)
    procs = [*launcher.children(recursive=True), launcher]  # torchrun starts each worker in its own session
    for p in procs:  # workers first: no handler runs, nothing is flushed
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    proc.wait()
    assert marker.exists() and not (out / "checkpoints" / "step-00000004" / "COMMITTED").exists()
    _train(TORCHRUN, tiny_dir, filtered, params, out)
    assert _losses(out) == _losses(uninterrupted)
    a = load_file(str(out / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(uninterrupted / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = _ranks(out)  # the rerun's own first step: step 3, still disjoint halves
    assert [r["step"] for r in resumed] == [3, 3]
    assert not set(resumed[0]["sample_keys"]) & set(resumed[1]["sample_keys"])
    assert json.loads((out / "timing.json").read_text())["start_step"] == 2


@pytest.mark.slow
def test_unsharded_checkpoint_is_refused_under_fsdp(tmp_path, tiny_dir, filtered):
    """A one-process checkpoint's optimizer state (keyed by index) cannot seed FSDP (keyed by name)."""
    params = _params(tmp_path, "fsdp", steps=2)
    _train([warm.FUSEDIT], tiny_dir, filtered, params, tmp_path / "one")
    _params(tmp_path, "fsdp", steps=4)  # the same file, now 4 steps: the rerun resumes the stage
    r = _train(TORCHRUN, tiny_dir, filtered, params, tmp_path / "one", ok=False)
    assert ("error: the checkpoint's optimizer state was saved by one process or ddp and cannot resume under "
            "strategy 'fsdp': resume with a strategy of its kind, or start the stage afresh") in r.stderr
    assert "internal error" not in r.stderr


def _ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]


def _check_distribution(one: Path, two: Path, strategy: str, shard_group: int | None) -> None:
    """What each rank recorded at its first step: its world, strategy, slice of the batch and shards."""
    [single] = _ranks(one)
    assert (single["world"], single["strategy"], single["step"], len(single["sample_keys"])) == (1, "single", 1, 4)
    ranks = _ranks(two)
    assert [(r["rank"], r["world"], r["strategy"], r["step"]) for r in ranks] == [(0, 2, strategy, 1),
                                                                                   (1, 2, strategy, 1)]
    assert {k: json.loads((two / "timing.json").read_text())[k] for k in ("world", "strategy")} == \
        {"world": 2, "strategy": strategy}
    a, b = (r["sample_keys"] for r in ranks)
    assert len(a) == len(b) == 2 and not set(a) & set(b), (a, b)  # each rank trained on its own half
    assert a + b == single["sample_keys"]  # ...of the one-process step-1 batch, in order
    sharded = strategy == "fsdp" or (strategy == "hsdp" and shard_group != 1)
    mesh = {"ddp": None, "fsdp": {"shape": [2], "dims": []},
            "hsdp": {"shape": [2 // (shard_group or 2), shard_group or 2], "dims": ["replicate", "shard"]}}[strategy]
    assert all(r["mesh"] == mesh for r in ranks), [r["mesh"] for r in ranks]
    names = list(single["params"])
    assert len(names) == 2 and all(list(r["params"]) == names for r in ranks)
    for name in names:
        full = single["params"][name]["full"]
        local = [r["params"][name]["local"] for r in ranks]
        assert all(r["params"][name]["full"] == full for r in ranks)
        if sharded:  # FSDP2 shards dim 0 in chunks: ceil(n/2) rows on rank 0, the rest on rank 1
            assert local == [[-(-full[0] // 2), *full[1:]], [full[0] // 2, *full[1:]]], (name, full, local)
        else:  # DDP, and HSDP with one rank per shard group: every replica holds the whole parameter
            assert local == [full, full], (name, full, local)
