"""Training checkpoints that are either whole or ignored: files first, a commit marker last.

A step lives in `<dir>/step-<n>/`. Its `COMMITTED` marker (written after every other file, locally or
on S3) lists each file with its size and sha256; a loader trusts only marked steps whose files
verify, and falls back to the previous good step with a warning. Old steps are deleted only after a
newer one committed. Tensors are safetensors; optimizer and scheduler states are plain tensor dicts
loaded with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fusedit.components.shared import storage
from fusedit.errors import UserError

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
_STEP = re.compile(r"step-(\d+)$")


class UnsafeCheckpointError(UserError):
    """A committed file whose bytes verify but would need full unpickling (arbitrary code) to load."""


@dataclass
class Checkpoint:
    step: int
    uri: str
    tensors: dict[str, dict[str, torch.Tensor]]  # name -> state dict (model, ema, ...)
    objects: dict[str, object]  # name -> torch-saved state (optimizer, scheduler)
    meta: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, object],
         meta: dict, keep_last: int = 2) -> str:
    """Write step-<n> completely, then its marker; then prune older steps beyond keep_last."""
    dest = storage.join(root, f"step-{step:08d}")
    storage.remove(storage.join(dest, MARKER))  # a rewrite of the same step is uncommitted until done
    files: dict[str, bytes] = {}
    for name, sd in tensors.items():
        files[f"{name}.safetensors"] = st_save({k: v.detach().contiguous().cpu() for k, v in sd.items()})
    for name, obj in objects.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        files[f"{name}.pt"] = buf.getvalue()
    files["meta.json"] = json.dumps(meta, indent=2, sort_keys=True).encode()
    marker = {"step": step, "files": {n: {"bytes": len(b), "sha256": _sha256(b)} for n, b in files.items()}}
    try:
        with tempfile.TemporaryDirectory(dir=None if storage.is_s3(root) else _local_parent(root)) as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            storage.publish(tmp, dest, manifest_name=MARKER, manifest=marker)
    except OSError as exc:
        if not storage.no_space(exc):
            raise
        with contextlib.suppress(OSError):  # an uncommitted step is ignored anyway; free what we can
            storage.remove(dest)
        raise storage.StorageError(f"{dest}: no space left to save this checkpoint ({exc.strerror}); "
                                   f"the previous committed checkpoint is kept") from None
    prune(root, keep_last)
    return dest


def _local_parent(root: str) -> str:
    os.makedirs(root, exist_ok=True)
    return root


def steps(root: str) -> list[int]:
    """Steps that have a directory (committed or not), ascending."""
    found = set()
    for uri in storage.list_uris(root) if storage.exists(root) or storage.is_s3(root) else []:
        parent = uri[len(root.rstrip("/")) + 1:].split("/")[0].split(os.sep)[0]
        if m := _STEP.match(parent):
            found.add(int(m.group(1)))
    return sorted(found)


def _load_step(root: str, step: int) -> Checkpoint:
    dest = storage.join(root, f"step-{step:08d}")
    if not storage.exists(storage.join(dest, MARKER)):
        raise FileNotFoundError(dest)
    marker = json.loads(storage.read_bytes(storage.join(dest, MARKER)))
    tensors, objects, meta = {}, {}, {}
    for name, info in marker["files"].items():
        data = storage.read_bytes(storage.join(dest, name))
        if len(data) != info["bytes"] or _sha256(data) != info["sha256"]:
            raise ValueError(f"{dest}/{name}: size or checksum differs from its commit marker")
        if name.endswith(".safetensors"):
            tensors[name.removesuffix(".safetensors")] = st_load(data)
        elif name.endswith(".pt"):
            try:
                objects[name.removesuffix(".pt")] = torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as exc:  # verified bytes that are not plain state: made elsewhere
                raise UnsafeCheckpointError(
                    f"{dest}/{name}: refused: it holds objects other than tensors and plain containers, so "
                    f"unpickling it could run code ({str(exc).strip().splitlines()[0][:160]})") from None
        else:
            meta = json.loads(data)
    return Checkpoint(step, dest, tensors, objects, meta)


def load_latest(root: str) -> Checkpoint | None:
    """The newest committed step whose files verify; unmarked or corrupt steps are skipped with a warning."""
    for step in reversed(steps(root)):
        try:
            return _load_step(root, step)
        except FileNotFoundError:
            log.warning("checkpoint step %d under %s has no commit marker: skipped", step, root)
        except UnsafeCheckpointError:
            raise  # not a torn write (its checksums match): never fall back past a tampered checkpoint
        except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, the reason logged
            log.warning("checkpoint step %d under %s is unreadable (%s): skipped", step, root, e)
    return None


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest keep_last committed steps (and uncommitted steps older than them)."""
    committed = [s for s in steps(root) if storage.exists(storage.join(root, f"step-{s:08d}", MARKER))]
    if len(committed) <= keep_last:
        return
    cutoff = committed[-keep_last]
    for s in steps(root):
        if s < cutoff:
            dest = storage.join(root, f"step-{s:08d}")
            marker = storage.join(dest, MARKER)
            if storage.exists(marker):  # uncommit first: a prune killed midway leaves no step that looks whole
                storage.remove(marker)
            for uri in (storage.list_uris(dest) if storage.is_s3(dest) else [dest]):
                storage.remove(uri)
