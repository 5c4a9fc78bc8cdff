"""Parameter counts at the real shapes, built on the meta device (no weights, no download)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from fusedit.model.config import Recipe, resolve
from fusedit.model.presets import CLIP_PRESETS
from fusedit.model.text import build_llm_meta, llm_config_for
from fusedit.model.transformer import FuseDiTTransformer


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dit_breakdown(dit: FuseDiTTransformer) -> dict[str, int]:
    """Parameters per part of the DiT: top-level modules, and block sub-modules summed over layers."""
    parts: dict[str, int] = defaultdict(int)
    for name, p in dit.named_parameters():
        top, *rest = name.split(".")
        key = f"blocks.{rest[1]}" if top == "blocks" else ("text_in" if top == "text_in" else top)
        parts[key] += p.numel()
    return dict(parts)


def _pooled_encoder_meta(recipe: Recipe) -> nn.Module | None:
    spec = recipe.model.text_modulation
    if spec is None:
        return None
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shapes = CLIP_PRESETS.get((spec.encoder, spec.subfolder))
    cfg = CLIPTextConfig(**shapes) if shapes else CLIPTextConfig.from_pretrained(
        spec.encoder, **({"subfolder": spec.subfolder} if spec.subfolder else {}))
    with torch.device("meta"):
        return CLIPTextModelWithProjection(cfg)


def summarize(recipe: Recipe) -> dict:
    """{"trainable": DiT parameters, "frozen": LLM (+ pooled text encoder), "by_module": {...}}."""
    llm_cfg = llm_config_for(recipe.model.llm)
    arch, spec = resolve(recipe.model, llm_cfg)
    with torch.device("meta"):
        dit = FuseDiTTransformer(arch.model_dump(), spec.model_dump())
    llm = build_llm_meta(recipe.model.llm, spec.llm_num_layers)
    pooled = _pooled_encoder_meta(recipe)
    by_module = {f"dit.{k}": v for k, v in _dit_breakdown(dit).items()}
    by_module["llm"] = _count(llm)
    if pooled is not None:
        by_module["pooled_text_encoder"] = _count(pooled)
    return {
        "recipe": recipe.name,
        "trainable": _count(dit),
        "frozen": by_module["llm"] + by_module.get("pooled_text_encoder", 0),
        "by_module": by_module,
        "dit_layers": arch.num_layers,
        "shared_llm_layers": spec.layers,
    }
