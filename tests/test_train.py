"""Training stages: exact resume after SIGKILL, SIGTERM save-and-exit, stage config errors, joint fine-tuning."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from fusedit.components.train.config import load_train_params
from fusedit.errors import UserError
from tests.warm import FUSEDIT, REAL


def _params(tmp_path: Path, base_steps=12, **base) -> Path:
    stages = [
        {"name": "base", "steps": base_steps, "batch_size": 4, "save_every": 3, "ema_every": 2, "log_every": 1,
         "sample_prompts": ["a red square"], **base},
        {"name": "joint", "steps": 3, "batch_size": 4, "trains": "dit+llm", "llm_lr": 1e-3, "init_from": "base",
         "save_every": 3, "sample_prompts": ["a red square"]},
    ]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"seed": 7, "stages": stages}}))
    return p


def _cmd(tiny_dir, filtered, params, out, stage="base", exe=FUSEDIT):
    return [exe, "train", "--recipe", "tiny", "--stage", stage, "--data", str(filtered), "--output", str(out),
            "--params", str(params), "--set", f"model.llm={tiny_dir / 'gemma'}", "--set", "model.resolution=16",
            "--set", "model.max_prompt_length=16"]


def _losses(out: Path) -> list[list[str]]:
    """step, loss and lr of every row (images/s is a timing)."""
    return [ln.split("\t")[:3] for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          **kw)


def _cosine_lr(n: int, lr: float, warmup: int, steps: int, floor: float) -> float:
    """The LR after n steps: linear warm-up over `warmup` steps, then a half cosine from lr to floor x lr."""
    if n < warmup:
        return lr * (n + 1) / warmup
    done = min(1.0, (n - warmup) / (steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, tiny_dir, filtered):
    """Under a cosine LR schedule, so the resumed run must also restore where the schedule was."""
    params = _params(tmp_path, lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    full = _run(_cmd(tiny_dir, filtered, params, tmp_path / "full" / "base"))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed" / "base"
    proc = subprocess.Popen(_cmd(tiny_dir, filtered, params, out, exe=REAL), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # a real process
    marker = out / "checkpoints" / "step-00000003" / "COMMITTED"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _run(_cmd(tiny_dir, filtered, params, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 0 < info["start_step"] < 12, "the kill must land mid-stage for this test to mean something"
    assert len(_losses(out)) == 12 and _losses(out) == _losses(tmp_path / "full" / "base")
    for step, _, lr in _losses(out):  # loss.tsv logs, after step n, the LR of step n + 1
        assert float(lr) == pytest.approx(_cosine_lr(int(step), 1e-3, 2, 12, 0.1), rel=5e-3), step
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "samples.png").is_file()
    gen = _run([FUSEDIT, "generate", "--pipeline", str(out / "pipeline"), "--prompt", "a red square", "--steps", "2",
                "--out", str(tmp_path / "g.png")])
    assert gen.returncode == 0, gen.stderr[-2000:]


@pytest.mark.parametrize("exe", [REAL, FUSEDIT], ids=["console-script", "warm"])
def test_sigterm_saves_and_exits_75(tmp_path, tiny_dir, filtered, exe):
    """Also through the warm client (tests/warm.py): it forwards the signal, and relays the exit status."""
    params = _params(tmp_path, base_steps=400, save_every=2, keep_last=1)
    out = tmp_path / "term" / "base"
    proc = subprocess.Popen(_cmd(tiny_dir, filtered, params, out, exe=exe), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000002" / "COMMITTED").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "SIGTERM, checkpoint committed at step" in err
    step = int(err.split("committed at step ")[1].split()[0])
    assert 2 <= step < 400 and (out / "checkpoints" / f"step-{step:08d}" / "COMMITTED").is_file()


def test_joint_stage_moves_only_reachable_llm_weights(tmp_path, tiny_dir, filtered):
    from safetensors.torch import load_file

    params = _params(tmp_path, base_steps=3)
    root = tmp_path / "stages"
    assert _run(_cmd(tiny_dir, filtered, params, root / "base")).returncode == 0
    joint = _run(_cmd(tiny_dir, filtered, params, root / "joint", stage="joint"))
    assert joint.returncode == 0, joint.stderr[-3000:]
    before = load_file(str(tiny_dir / "gemma" / "model.safetensors"))
    base_llm = load_file(str(root / "base" / "pipeline" / "text_encoder" / "model.safetensors"))
    after = load_file(str(root / "joint" / "pipeline" / "text_encoder" / "model.safetensors"))
    for k, v in base_llm.items():  # the DiT-only stage left the frozen LLM bit-identical
        assert torch.equal(v, before[f"model.{k}"]), k
    changed = {k for k, v in after.items() if not torch.equal(v, base_llm[k])}
    assert "layers.0.self_attn.k_proj.weight" in changed and "embed_tokens.weight" in changed
    last = "layers.3."  # the last shared layer: only its k/v (and input norm) feed the DiT
    assert not {k for k in changed if k.startswith(last) and ("o_proj" in k or "mlp" in k or "q_proj" in k)}
    assert "norm.weight" not in changed


def test_bad_stage_configs_are_clear_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"train": {"stages": [{"name": "a", "steps": -1}]}}))
    with pytest.raises(Exception, match="steps"):
        load_train_params(p)
    p.write_text(yaml.safe_dump({"train": {"stages": [{"name": "a", "steps": 1, "init_from": "zzz"}]}}))
    with pytest.raises(Exception, match="init_from"):
        load_train_params(p)
    p.write_text(yaml.safe_dump({"train": {"stages": [{"name": "a", "steps": 1}]}}))
    with pytest.raises(UserError, match="unknown stage 'b'"):
        load_train_params(p).stage("b")
    r = _run([FUSEDIT, "train", "--recipe", "tiny", "--stage", "b", "--data", "x", "--output", str(tmp_path / "o"),
              "--params", str(p)])
    assert r.returncode == 2 and "unknown stage 'b'" in r.stderr and "Traceback" not in r.stderr


def test_cache_with_another_fingerprint_is_refused(tmp_path, tiny_dir, filtered):
    from fusedit.components.cache.build import build_cache

    over = [f"model.llm={tiny_dir / 'gemma'}", "model.resolution=16", "model.max_prompt_length=16"]
    build_cache(str(filtered / "shards"), str(tmp_path / "cache"), "tiny", over, progress=False)
    params = _params(tmp_path, base_steps=2, save_every=2)
    ok = _run(_cmd(tiny_dir, tmp_path / "cache", params, tmp_path / "ok" / "base"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    cmd = _cmd(tiny_dir, tmp_path / "cache", params, tmp_path / "bad" / "base")
    cmd[cmd.index("model.max_prompt_length=16")] = "model.max_prompt_length=17"
    bad = _run(cmd)
    assert bad.returncode == 2 and "max_length" in bad.stderr and "Traceback" not in bad.stderr


def test_s3_stage_output(tmp_path, tiny_dir, filtered, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="runs")
    params = _params(tmp_path, base_steps=2, save_every=1, keep_last=1)
    r = _run(_cmd(tiny_dir, filtered, params, "s3://runs/exp1/base"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="runs", Prefix="exp1/base/")["Contents"]}
    assert "exp1/base/checkpoints/step-00000002/COMMITTED" in keys
    assert not any(k.startswith("exp1/base/checkpoints/step-00000001/") for k in keys)  # pruned
    assert {"exp1/base/loss.tsv", "exp1/base/metrics.json", "exp1/base/pipeline/model_index.json"} <= keys
