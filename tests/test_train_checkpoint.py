"""Checkpoints are whole or ignored: commit marker last, verified on load, pruned only after a good save."""
from __future__ import annotations

import logging

import boto3
import pytest
import torch

from fusedit.components.shared import storage
from fusedit.components.train import checkpoint


def _save(root, step, keep=2):
    opt = {"state": {0: {"exp_avg": torch.full((3,), float(step))}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return checkpoint.save(root, step, {"model": {"w": torch.arange(3.0) + step}, "ema": {"w": torch.zeros(3)}},
                           {"optimizer": opt}, {"step": step}, keep_last=keep)


def test_round_trip_and_prune(tmp_path):
    root = str(tmp_path / "ckpt")
    for s in (10, 20, 30):
        _save(root, s)
    assert checkpoint.steps(root) == [20, 30]  # keep_last=2, the oldest went after 30 committed
    ck = checkpoint.load_latest(root)
    assert ck.step == 30 and torch.equal(ck.tensors["model"]["w"], torch.arange(3.0) + 30)
    assert torch.equal(ck.objects["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 30.0))
    assert ck.meta == {"step": 30}


def test_unmarked_and_corrupt_steps_are_skipped_with_a_warning(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    _save(root, 1, keep=5)
    _save(root, 2, keep=5)
    _save(root, 3, keep=5)
    (tmp_path / "ckpt" / "step-00000003" / checkpoint.MARKER).unlink()  # a crash before the marker
    with open(tmp_path / "ckpt" / "step-00000002" / "model.safetensors", "r+b") as f:  # bit rot
        f.seek(20)
        f.write(b"\xff\xff")
    with caplog.at_level(logging.WARNING):
        ck = checkpoint.load_latest(root)
    assert ck.step == 1
    assert "step 3" in caplog.text and "no commit marker" in caplog.text
    assert "step 2" in caplog.text and "checksum" in caplog.text


def test_nothing_to_resume_from(tmp_path):
    assert checkpoint.load_latest(str(tmp_path / "empty")) is None


def test_s3_checkpoints(s3_server, monkeypatch):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ckpt")
    monkeypatch.setattr(storage, "_options", storage.options())  # restored after the test
    monkeypatch.setattr(storage, "_clients", {})
    storage.configure(endpoint_url=s3_server)
    root = "s3://ckpt/run/checkpoints"
    for s in (5, 6, 7):
        _save(root, s)
    assert checkpoint.steps(root) == [6, 7]
    assert checkpoint.load_latest(root).step == 7
    storage.remove(f"{root}/step-00000007/{checkpoint.MARKER}")
    assert checkpoint.load_latest(root).step == 6


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpt")
    _save(root, 1)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "publish", disk_full)
    with pytest.raises(storage.StorageError, match="no space left to save this checkpoint"):
        _save(root, 2)
    assert checkpoint.load_latest(root).step == 1
