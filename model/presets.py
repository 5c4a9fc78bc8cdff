"""Architecture shapes of the supported LLMs, so models build on the meta device with no download."""
from __future__ import annotations

from typing import Any

_GEMMA_2B = dict(
    model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
    num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
_GEMMA2_2B = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, head_dim=16, max_position_embeddings=512)

# name -> kwargs of the language model's transformers config (`model_type` picks the class)
LLM_PRESETS: dict[str, dict[str, Any]] = {
    "google/gemma-2b": _GEMMA_2B,
    "google/gemma-2b-it": _GEMMA_2B,
    # PaliGemma's language model is Gemma-2B with the image-token-extended vocabulary
    "google/paligemma-3b-pt-448": {**_GEMMA_2B, "vocab_size": 257216},
    "google/gemma-2-2b": _GEMMA2_2B,
    "google/gemma-2-2b-it": _GEMMA2_2B,
    # tiny shapes of each family, for tests and the embedded default
    "tiny-gemma": {**_GEMMA_2B, **_TINY, "num_key_value_heads": 1},
    "tiny-gemma-2": {**_GEMMA2_2B, **_TINY, "num_key_value_heads": 2, "query_pre_attn_scalar": 16},
    # the embedded default's stand-in (`fusedit model init-tiny`): twice tiny-gemma's width, so the deep-fusion
    # DiT that mirrors it is 128 wide (at 64 the toy model drew triangles, diamonds and stars as round blobs)
    "tiny-gemma-wide": {**_GEMMA_2B, **_TINY, "num_key_value_heads": 1, "hidden_size": 128, "head_dim": 32,
                        "intermediate_size": 256},
}
DEMO_FAMILY = "tiny-gemma-wide"  # the embedded default's stand-in LLM (`fusedit model init-tiny`)


def llm_config(name: str, **overrides: Any):
    """A transformers config for a preset name (no I/O)."""
    from transformers import AutoConfig

    kwargs = {**LLM_PRESETS[name], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

# pooled-text encoders for text modulation, by (encoder, subfolder): SD3-medium's CLIP-L text encoder
CLIP_PRESETS: dict[tuple[str, str | None], dict[str, Any]] = {
    ("stabilityai/stable-diffusion-3-medium-diffusers", "text_encoder"): dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    ),
}
