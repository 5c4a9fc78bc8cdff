"""Disk full during a checkpoint save: the stage stops with one clear line (exit 2), the previous
checkpoint stays loadable, and once there is space again the rerun resumes from it.

The small disk is a real tmpfs where this machine lets us mount one (root with CAP_SYS_ADMIN), and
otherwise a file-size limit (RLIMIT_FSIZE) on the training process, which fails writes the same way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fusedit.components.train import checkpoint
from tests.fault_helpers import Run


def _params(tmp: Path, steps: int) -> Path:
    p = tmp / f"params-{steps}.yaml"
    p.write_text(yaml.safe_dump({"train": {"seed": 2, "stages": [
        {"name": "base", "steps": steps, "batch_size": 4, "save_every": 3, "log_every": 1,
         "sample_prompts": ["a red square"]}]}}))
    return p


def _run(tmp: Path, tiny_dir: Path, data: Path, out: Path, steps: int, fsize: int | None = None) -> Run:
    return Run(["train", "--recipe", "tiny", "--stage", "base", "--data", str(data), "--output", str(out),
                "--params", str(_params(tmp, steps)), "--set", f"model.llm={tiny_dir / 'gemma'}",
                "--set", "model.resolution=16", "--set", "model.max_prompt_length=16"], tmp / f"train-{steps}.log",
               fsize=fsize)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _tmpfs(where: Path, size: int):
    """A tmpfs of `size` bytes at `where`, or None where mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("disk", ["tmpfs", "file-size limit"])
def test_disk_full_during_a_save_fails_cleanly_and_keeps_the_last_checkpoint(tmp_path, tiny_dir, filtered, disk):
    first = tmp_path / "first" / "base"
    _run(tmp_path, tiny_dir, filtered, first, steps=3).complete()
    step3 = checkpoint.load_latest(str(first / "checkpoints"))
    ckpt_bytes = _du(first / "checkpoints" / "step-00000003")
    biggest = max(p.stat().st_size for p in (first / "checkpoints" / "step-00000003").iterdir())

    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            page = 4096
            size = (_du(first) + ckpt_bytes // 2) // page * page  # room for the logs, not for another checkpoint
            mount = stack.enter_context(_tmpfs(tmp_path / "disk", size))
            if mount is None:
                pytest.skip("mounting a tmpfs is not allowed here; the file-size limit case covers disk full")
            out = mount / "base"
            shutil.copytree(first, out)
            run = _run(tmp_path, tiny_dir, filtered, out, steps=6)
        else:
            out = first
            run = _run(tmp_path, tiny_dir, filtered, out, steps=6, fsize=biggest // 2)
        code = run.finish()
        log = run.tail(100_000)
        assert code == 2, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"error: {out / 'checkpoints' / 'step-00000006'}: no space left to save this "
                               "checkpoint (") and last.endswith("the previous committed checkpoint is kept")
        assert "Traceback" not in log
        kept = checkpoint.load_latest(str(out / "checkpoints"))  # checksums verified against its marker
        assert kept.step == 3 and not (out / "checkpoints" / "step-00000006").exists()
        assert all(kept.tensors["model"][k].equal(v) for k, v in step3.tensors["model"].items())

        if disk == "tmpfs":  # space again: the rerun resumes from step 3 and finishes
            subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
        _run(tmp_path, tiny_dir, filtered, out, steps=6).complete()
        assert checkpoint.load_latest(str(out / "checkpoints")).step == 6
        assert len((out / "loss.tsv").read_text().splitlines()) == 7
