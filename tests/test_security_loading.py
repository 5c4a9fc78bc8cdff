"""Weights are loaded only through safetensors or `torch.load(weights_only=True)`: a checkpoint directory from
elsewhere that carries a pickle payload is refused with a clear error, and the payload never runs.

Each payload, when unpickled by a full `pickle.load`, would create a marker file; the tests assert the
refusal and that the marker is absent. The audit test keeps the code base free of unsafe loaders.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from fusedit.components.train import checkpoint
from fusedit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs code: it writes `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def payload_bytes(marker: Path) -> bytes:
    data = pickle.dumps({"state": {}, "param_groups": [], "x": Payload(marker)})
    with pytest.raises(pickle.UnpicklingError):  # weights-only loading refuses it ...
        torch.load(io.BytesIO(data), weights_only=True)
    assert not marker.exists()
    return data


def test_payload_is_real(tmp_path):
    """The crafted file really runs code under a plain unpickle (so its absence below means something)."""
    marker = tmp_path / "ran"
    pickle.loads(payload_bytes(marker))
    assert marker.read_text() == "payload ran"


def _committed_step(root: Path, step: int, files: dict[str, bytes]) -> Path:
    """A step directory exactly as checkpoint.save lays it out, checksums and all (a forged, valid marker)."""
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    marker = {"step": step, "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                      for n, b in files.items()}}
    (d / checkpoint.MARKER).write_text(json.dumps(marker))
    return d


def _good_files() -> dict[str, bytes]:
    from safetensors.torch import save

    w = {"w": torch.ones(2, 2)}
    return {"model.safetensors": save(w), "ema.safetensors": save(w), "meta.json": b"{}"}


def test_training_checkpoint_with_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    good = _good_files()
    root = tmp_path / "checkpoints"
    _committed_step(root, 10, {**good, "optimizer.pt": torch_save({"state": {}, "param_groups": []}),
                               "scheduler.pt": torch_save({"last_epoch": 3})})
    assert checkpoint.load_latest(str(root)).step == 10  # a clean step loads
    _committed_step(root, 20, {**good, "optimizer.pt": payload_bytes(marker), "scheduler.pt": torch_save({})})
    with pytest.raises(UserError, match=r"step-00000020/optimizer\.pt: refused") as info:
        checkpoint.load_latest(str(root))  # never silently falls back to step 10 past a forged step
    assert "\n" not in str(info.value)
    assert not marker.exists()


def torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    from fusedit.model.tiny import write_tiny

    out = tmp_path_factory.mktemp("tinyp")
    write_tiny(out, "tiny-gemma", seed=0)
    return out


def _swap_for_pickle(directory: Path, marker: Path, bin_name: str) -> None:
    """Replace the safetensors weights in `directory` by a same-named-stem .bin holding the payload."""
    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / bin_name).write_bytes(pickle.dumps({"weight": Payload(marker)}))


def test_exported_pipeline_with_pickled_weights_is_refused(tiny_pipeline, tmp_path):
    from fusedit.components.evaluate.run import load_pipeline
    from fusedit.model.pipeline import FuseDiTPipeline

    FuseDiTPipeline.from_pretrained(str(tiny_pipeline / "pipeline"), use_safetensors=True)  # intact: loads
    marker = tmp_path / "ran"
    forged = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline / "pipeline", forged)
    _swap_for_pickle(forged / "transformer", marker, "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load") as info:
        load_pipeline(forged, torch.device("cpu"), torch.float32)
    assert str(forged) in str(info.value)

    from tests.test_fuzz_cli import assert_contract, run_main

    code, out, err = run_main(["generate", "--pipeline", str(forged), "--prompt", "x", "--steps", "1",
                               "--out", str(tmp_path / "x.png")], tmp_path)
    assert_contract(code, out, err, "generate")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert not marker.exists()


def test_llm_directory_with_pickled_weights_is_refused(tiny_pipeline, tmp_path):
    from fusedit.model.text import load_llm

    load_llm(str(tiny_pipeline / "llm"), 2)  # intact: loads
    marker = tmp_path / "ran"
    forged = tmp_path / "llm"
    shutil.copytree(tiny_pipeline / "llm", forged)
    _swap_for_pickle(forged, marker, "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_llm(str(forged), 2)
    assert not marker.exists()


def test_vae_directory_with_pickled_weights_is_refused(tiny_pipeline, tmp_path):
    from fusedit.components.cache.frozen import ImageEncoder
    from fusedit.model.config import load_recipe

    marker = tmp_path / "ran"
    forged = tmp_path / "vae"
    shutil.copytree(tiny_pipeline / "vae", forged)
    _swap_for_pickle(forged, marker, "diffusion_pytorch_model.bin")
    recipe = load_recipe("tiny", {"model.llm": str(tiny_pipeline / "llm"), "model.vae": str(forged),
                                  "model.vae_subfolder": None})
    with pytest.raises(UserError, match="cannot load VAE"):
        ImageEncoder(recipe, torch.device("cpu"))
    assert not marker.exists()


UNSAFE = re.compile(r"pickle\.loads?\(|\bUnpickler\(|allow_pickle=True|yaml\.unsafe_load|dill\.|joblib\.load|"
                    r"use_safetensors=False|weights_only=False")
NEEDS = {re.compile(r"torch\.load\("): "weights_only=True", re.compile(r"\byaml\.load\("): "Loader="}


def test_no_unsafe_loader_in_the_code_base():
    """Audit: no pickle/torch.load without weights_only, no unsafe YAML, no opting out of safetensors."""
    hits = []
    for sub in ("cli", "model", "components", "pipelines", "bench", "scripts"):
        for f in (ROOT / sub).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if UNSAFE.search(line) or any(p.search(line) and need not in line for p, need in NEEDS.items()):
                    hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
