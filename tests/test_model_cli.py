"""The CLI contract: JSON summaries, tiny checkpoints, generation, and one-line user errors (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.warm import FUSEDIT


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([FUSEDIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_summary_json_contract():
    r = run("model", "summary", "--recipe", "fusedit/baseline", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert isinstance(s["trainable"], int) and isinstance(s["frozen"], int) and isinstance(s["by_module"], dict)
    assert abs(s["trainable"] / 2.45e9 - 1) < 0.01


@pytest.mark.parametrize("args, needle", [
    (["model", "summary", "--recipe", "fusedit/nope"], "unknown recipe 'fusedit/nope'"),
    (["model", "summary", "--recipe", "fusedit/baseline", "--set", "model.pos_embed=3d"], "model.pos_embed"),
    (["model", "summary", "--recipe", "fusedit/baseline", "--set", "model.llm=/nowhere/at/all"], "/nowhere/at/all"),
    (["generate", "--pipeline", "/nowhere", "--prompt", "x", "--out", "/tmp/x.png"], "/nowhere"),
    (["model", "summary"], "--recipe"),
])
def test_user_errors_are_one_line_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    usage = ("Usage", "Try", "╭", "│", "╰")  # click's usage banner around the one error line
    assert len([ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(usage)]) == 1


def test_init_tiny_then_generate(tmp_path):
    r = run("model", "init-tiny", "--out", str(tmp_path / "tiny"))
    assert r.returncode == 0, r.stderr
    for sub in ("llm/config.json", "llm/tokenizer.json", "vae/config.json", "pipeline/model_index.json"):
        assert (tmp_path / "tiny" / sub).is_file(), sub
    outs = []
    for name in ("a.png", "b.png"):
        r = run("generate", "--pipeline", str(tmp_path / "tiny" / "pipeline"), "--prompt", "two red circles",
                "--seed", "3", "--steps", "4", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert outs[0].shape == (32, 32, 3) and np.array_equal(outs[0], outs[1])
