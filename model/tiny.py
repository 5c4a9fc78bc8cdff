"""Tiny, fully local checkpoints (tokenizer, LLM, VAE, pipeline) for tests and the embedded default.

Built from configs and saved with `save_pretrained`, so everything downstream loads them through the
same `from_pretrained` code as the real checkpoints. The embedded default's LLM has its key and value
projections scaled up (`kv_gain`): a randomly initialised LM's text keys are about 6x smaller per head
than the DiT's normalised image keys (`tiny-gemma`: 0.6 against 3.7; `tiny-gemma-wide` at gain 6: 6.8-8.0
against 5.7), so image queries barely attend to the text and the DiT never learns its prompts; a trained
LM's keys are not that small. (Briefly training the tiny LM on caption text instead grew its keys to 2-4
but made the colour words' keys nearly equal, since a colour is unpredictable from its context: the DiT
then drew one colour for every colour word.)
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from fusedit.model.presets import DEMO_FAMILY, llm_config

_WORDS = {
    "colour": "red green blue yellow orange purple pink brown black white gray cyan".split(),
    "shape": "circle square triangle rectangle star ellipse cross diamond".split(),
    "count": "a an one two three four five six".split(),
    "relation": "left right above below of to the next on in and with".split(),
    "misc": "photo image picture drawing scene background small large big tiny plain there is are".split(),
}


def _corpus() -> list[str]:
    """Caption-like lines over the synthetic vocabulary, so the BPE merges learn its words."""
    c, s, n = _WORDS["colour"], _WORDS["shape"], _WORDS["count"]
    left, right = itertools.product(n, c, s), itertools.product(n[::-1], c[::-1], s)
    lines = [f"{k} {a} {b}s to the left of {k2} {a2} {b2}" for (k, a, b), (k2, a2, b2) in zip(left, right, strict=True)]
    lines += [" ".join(ws) for ws in _WORDS.values()]
    return lines * 4


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer offline (no unknown tokens) with Gemma's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, Gemma's order for pad/eos/bos
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right",
                                   model_max_length=512)
    fast.save_pretrained(str(out_dir))
    return fast


def build_llm(out_dir: str | Path, preset: str = "tiny-gemma", vocab_size: int = 512, seed: int = 0,
              kv_gain: float = 1.0):
    """A random tiny LLM of the preset's family, saved as safetensors; kv_gain scales every layer's
    key and value projections (6 gives text keys of about the DiT's normalised image-key norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llm_config(preset, vocab_size=vocab_size))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(kv_gain)
            layer.self_attn.v_proj.weight.mul_(kv_gain)
    model.save_pretrained(str(out_dir))
    return model


def build_paligemma(out_dir: str | Path, vocab_size: int = 512, seed: int = 0):
    """A random tiny PaliGemma (tiny SigLIP + tiny Gemma), to exercise loading its language model."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    text = llm_config("tiny-gemma", vocab_size=vocab_size)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64)
    cfg = PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          image_token_index=vocab_size - 1, projection_dim=64, hidden_size=64)
    model = PaliGemmaForConditionalGeneration(cfg)
    model.save_pretrained(str(out_dir))
    return model


def build_vae(out_dir: str | Path | None = None, seed: int = 0):
    """A tiny SD3-style AutoencoderKL: 16 latent channels, x8 downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609,
    )
    if out_dir is not None:
        vae.save_pretrained(str(out_dir))
    return vae


def build_clip(out_dir: str | Path, vocab_size: int = 512, dim: int = 32, seed: int = 0):
    """A random tiny CLIP text encoder with projection (pooled `text_embeds` of size dim) + tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=dim,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    out = Path(out_dir)
    CLIPTextModelWithProjection(cfg).save_pretrained(str(out / "text_encoder"))
    tok = build_tokenizer(out / "tokenizer", vocab_size)
    tok.model_max_length = 77
    tok.save_pretrained(str(out / "tokenizer"))


def write_tiny(out: Path, family: str = DEMO_FAMILY, seed: int = 0, kv_gain: float = 6.0) -> Path:
    """out/llm (tokenizer + LLM), out/vae and out/pipeline: the embedded default's local checkpoints."""
    from fusedit.model.config import load_recipe
    from fusedit.model.pipeline import FuseDiTPipeline

    out = Path(out)
    tok = build_tokenizer(out / "llm")
    build_llm(out / "llm", family, vocab_size=len(tok), seed=seed, kv_gain=kv_gain)
    build_vae(out / "vae", seed=seed)
    pipe = FuseDiTPipeline.from_recipe(load_recipe("tiny", {"model.llm": str(out / "llm")}))
    pipe.save_pretrained(str(out / "pipeline"))
    return out
