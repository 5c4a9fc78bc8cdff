"""The cache's on-disk format and its feature identity.

A cache is only valid for the exact frozen models and preprocessing that made it, so the manifest
records its feature identity (`feature_identity`): every input that decides the features, as comparable
fields (weights by content hash, not by path, so a moved checkpoint still matches). The trainer
refuses a cache whose identity differs, naming the field. Caches written before the rename keep
the same dict under the manifest key `fingerprint`; it is still read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fusedit.errors import UserError
from fusedit.model.config import Recipe, TextSpec, load_recipe, resolve
from fusedit.model.text import TextContext, llm_config_for

FORMAT = 1  # bump when the stored tensors or their meaning change
KIND = "fusedit-cache"
MANIFEST = "manifest.json"
UNCOND = "uncond.safetensors"
CROP = "short-side-bilinear,center-crop"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FEATURES_EXT, META_EXT = "features.safetensors", "meta.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt")
_hash_memo: dict[tuple, str] = {}


class FeatureIdentityMismatch(UserError):
    """The cache was built for other frozen models or preprocessing than the recipe asks for."""


def as_recipe(recipe: Recipe | str) -> Recipe:
    return load_recipe(recipe) if isinstance(recipe, str) else recipe


def local_dir(name: str, subfolder: str | None = None) -> Path | None:
    """The directory holding a checkpoint: a local path, or a hub id already in the local HF cache."""
    path = Path(name)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not downloaded: hashed by name only
            return None
    return path / subfolder if subfolder else path


def hash_files(root: Path | None, names: tuple[str, ...] | None = None, suffixes: tuple[str, ...] = ()) -> str:
    """sha256 over (relative name, content) of the selected files; memoised by (path, size, mtime)."""
    if root is None:
        return "unresolved"
    files = sorted(p for p in root.rglob("*") if p.is_file() and (
        (names is not None and p.name in names) or p.suffix in suffixes))
    if not files:
        raise UserError(f"{root}: no {'/'.join(names or suffixes)} files to hash")
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _hash_memo:
            with open(p, "rb") as f:
                _hash_memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"{p.relative_to(root)}\0{_hash_memo[key]}\n".encode())
    return h.hexdigest()[:32]


def text_spec(recipe: Recipe) -> TextSpec:
    return resolve(recipe.model, llm_config_for(recipe.model.llm))[1]


def feature_identity(recipe: Recipe) -> dict[str, Any]:
    """Every input that decides the cached features, as flat comparable fields."""
    m = recipe.model
    spec = text_spec(recipe)  # raises a clear UserError for a missing LLM path
    weights = (".safetensors", ".bin")
    ident: dict[str, Any] = {
        "format": FORMAT,
        "llm_weights": hash_files(local_dir(m.llm), ("config.json",), weights),
        "tokenizer": hash_files(local_dir(m.tokenizer or m.llm), _TOKENIZER_FILES),
        **{f"text.{k}": v for k, v in spec.model_dump().items()},
        "pooled": None, "vae": None,
        "resolution": m.resolution, "crop": CROP,
    }
    if m.text_modulation:
        t = m.text_modulation
        ident["pooled"] = hash_files(local_dir(t.encoder), ("config.json",) + _TOKENIZER_FILES, weights) + f":{t.dim}"
    if m.vae:
        ident["vae"] = hash_files(local_dir(m.vae, m.vae_subfolder), ("config.json",), weights)
    return ident


def sources(recipe: Recipe) -> dict[str, Any]:
    """Where the frozen parts came from (recorded for people; not compared)."""
    m = recipe.model
    return {"recipe": recipe.name, "llm": m.llm, "tokenizer": m.tokenizer or m.llm, "vae": m.vae,
            "vae_subfolder": m.vae_subfolder, "pooled": m.text_modulation.encoder if m.text_modulation else None}


def identity_digest(identity: dict[str, Any], dtype: str) -> str:
    """A short hash of a feature identity and the stored dtype (the manifest's `digest`)."""
    return hashlib.sha256(json.dumps([identity, dtype], sort_keys=True).encode()).hexdigest()[:16]


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The feature identity a cache manifest records (`feature_identity`; `fingerprint` in older caches)."""
    return manifest.get("feature_identity", manifest.get("fingerprint", {}))


def check_feature_identity(manifest: dict[str, Any], recipe: Recipe | str, dtype: str | None = None) -> None:
    """Refuse a cache built for something else, naming the first field that differs."""
    if manifest.get("kind") != KIND:
        raise UserError("not a fusedit feature cache (manifest has no 'kind: fusedit-cache')")
    have, want = manifest_identity(manifest), feature_identity(as_recipe(recipe))
    if dtype is not None:
        have, want = {**have, "dtype": manifest.get("dtype")}, {**want, "dtype": dtype}
    for name in sorted(set(have) | set(want), key=lambda k: (k != "format", k)):
        if have.get(name) != want.get(name):
            raise FeatureIdentityMismatch(
                f"cache does not match the recipe: field '{name}' differs (cache {have.get(name)!r}, "
                f"recipe {want.get(name)!r}); rebuild it with `fusedit cache build`")


# ------------------------------------------------------------------ per-sample tensors

def text_tensors(text: TextContext, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Sample i's text features without padding: kv (kv_heads, n, hd), states (n, H), pooled (P,)."""
    n = int(text.mask[i].sum())
    out = {}
    for j, (k, v) in enumerate(text.kv):
        out[f"k{j}"], out[f"v{j}"] = k[i, :, :n], v[i, :, :n]
    if text.states is not None:
        out["states"] = text.states[i, :n]
    if text.pooled is not None:
        out["pooled"] = text.pooled[i]
    return {k: t.detach().to("cpu", dtype).contiguous() for k, t in out.items()}


def text_from_tensors(items: list[dict[str, torch.Tensor]], dtype=torch.float32) -> TextContext:
    """Stack per-sample unpadded text features into one right-padded TextContext (zeros as padding), on the host."""
    first = items[0]
    n_kv = sum(1 for k in first if k.startswith("k"))
    lengths = [(t["k0"].shape[1] if n_kv else t["states"].shape[0]) for t in items]
    T = max(lengths)

    def stack(name: str, dim: int) -> torch.Tensor:
        padded = []
        for t, n in zip(items, lengths, strict=True):
            x = t[name]
            shape = list(x.shape)
            shape[dim] = T - n
            padded.append(torch.cat([x, x.new_zeros(shape)], dim) if T > n else x)
        return torch.stack(padded).to(dtype=dtype)

    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return TextContext(
        mask=mask,
        kv=tuple((stack(f"k{j}", 1), stack(f"v{j}", 1)) for j in range(n_kv)),
        states=stack("states", 0) if "states" in first else None,
        pooled=torch.stack([t["pooled"] for t in items]).to(dtype=dtype) if "pooled" in first else None,
    )


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The cache manifest under `uri`, or None when `uri` is not a (complete) cache."""
    from fusedit.components.shared import storage

    path = storage.join(uri, MANIFEST)
    if storage.is_s3(uri) or os.path.isdir(uri):
        if storage.exists(path):
            m = storage.read_json(path)
            return m if m.get("kind") == KIND else None
    return None
