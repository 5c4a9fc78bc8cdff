"""Helpers shared by the cache tests: tiny recipes of each fusion kind and small synthetic shards."""
from __future__ import annotations

from pathlib import Path

import torch

from fusedit.components.cache.reader import Batch
from fusedit.components.data.synth import synth
from fusedit.model.config import load_recipe
from tests.conftest import tiny_overrides

DEEP, SHALLOW = "fusedit/baseline", "baselinedit/self-attention"


def recipe_overrides(name: str, root: Path, vae: bool) -> dict:
    """A tiny recipe; with vae=True a 32 px image through the tiny SD3-style VAE (16 x 4 x 4 latents)."""
    o = tiny_overrides(name, root)
    if vae:
        o.update({"model.vae": str(root / "vae"), "model.vae_subfolder": None, "model.vae_scale": 8,
                  "model.resolution": 32, "model.in_channels": 16})
    return o


def tiny_recipe(name: str, root: Path, vae: bool = False, **extra):
    return load_recipe(name, {**recipe_overrides(name, root, vae), **extra})


def cli_sets(overrides: dict) -> list[str]:
    """The same overrides as `--set k=v` arguments."""
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={'null' if v is None else v}"]
    return out


def make_shards(out: Path, samples: int = 16, shard_size: int = 6, seed: int = 0) -> Path:
    """Clean synthetic shards in the filter's output layout (image.jpg, synthetic_caption.txt, ...)."""
    synth(str(out), samples=samples, seed=seed, shard_size=shard_size, bad_fraction=0.0, short_side=(36, 60))
    return out


def same_batch(a: Batch, b: Batch) -> bool:
    if a.keys != b.keys or a.captions != b.captions or not torch.equal(a.mean, b.mean):
        return False
    if (a.logvar is None) != (b.logvar is None) or (a.logvar is not None and not torch.equal(a.logvar, b.logvar)):
        return False
    ta, tb = a.text.tensors() if a.text else {}, b.text.tensors() if b.text else {}
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
