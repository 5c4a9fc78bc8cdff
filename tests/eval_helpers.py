"""Tiny exported pipelines and a tiny random CLIP for the evaluation tests (everything offline)."""
from __future__ import annotations

from pathlib import Path

import torch

from fusedit.model.config import load_recipe
from fusedit.model.pipeline import FuseDiTPipeline
from tests.conftest import randomize, tiny_overrides


def export_tiny(root: Path, tiny_dir: Path, resolution: int = 8) -> Path:
    """A deep-fusion pipeline at `resolution` px (pixel space), random non-zero weights, saved to root."""
    o = tiny_overrides("fusedit/baseline", tiny_dir) | {"model.resolution": resolution,
                                                        "model.pos_embed_max_size": max(8, resolution // 2)}
    pipe = FuseDiTPipeline.from_recipe(load_recipe("fusedit/baseline", o))
    randomize(pipe.transformer, seed=1, std=0.05)
    pipe.save_pretrained(str(root))
    return root


def build_clip(out: Path, tiny_dir: Path) -> Path:
    """A random tiny CLIPModel (text + vision) built from configs, with the offline tiny tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "gemma"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(out))
    tok.model_max_length = 77
    tok.save_pretrained(str(out))
    return out
