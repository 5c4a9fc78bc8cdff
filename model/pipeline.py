"""A diffusers-style pipeline: transformer + frozen LLM + tokenizer + VAE + scheduler, safetensors only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from fusedit.errors import UserError
from fusedit.model.config import FlowConfig, Recipe, TextModulation, resolve
from fusedit.model.flow import RectifiedFlow, make_scheduler
from fusedit.model.text import (
    PooledTextEncoder,
    TextContext,
    TextEncoder,
    llm_config_for,
    load_llm,
    load_tokenizer,
)
from fusedit.model.transformer import FuseDiTTransformer


class FuseDiTPipeline(DiffusionPipeline):
    """Text-to-image with cached text K/V: the LLM runs once per prompt, not once per step."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "pooled_text_encoder", "pooled_tokenizer"]

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae=None, pooled_text_encoder=None,
                 pooled_tokenizer=None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae, pooled_text_encoder=pooled_text_encoder,
                              pooled_tokenizer=pooled_tokenizer)

    @classmethod
    def from_recipe(cls, recipe: Recipe, transformer: FuseDiTTransformer | None = None,
                    dtype=torch.float32, text: TextEncoder | None = None, vae=None) -> FuseDiTPipeline:
        """Assemble the frozen parts named by a recipe around a (new or trained) transformer.

        `text` / `vae`: parts already built for this recipe (a trainer's own LLM stream, trained or frozen, and
        its VAE), used as they are; whatever is not given is loaded from the recipe's paths."""
        m = recipe.model
        arch, spec = resolve(m, llm_config_for(m.llm))
        if transformer is None:
            transformer = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=m.latent_size)
        if vae is None and m.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(m.vae, **({"subfolder": m.vae_subfolder} if m.vae_subfolder else {}))
        text = text or TextEncoder.load(m, spec, dtype)
        return cls(transformer=transformer, text_encoder=text.llm, tokenizer=text.tokenizer,
                   scheduler=make_scheduler(recipe.flow), vae=vae,
                   pooled_text_encoder=text.pooled.model if text.pooled else None,
                   pooled_tokenizer=text.pooled.tokenizer if text.pooled else None)

    @property
    def text_stream(self) -> TextEncoder:
        enc = self.pooled_text_encoder
        pooled = PooledTextEncoder(enc, self.pooled_tokenizer) if enc is not None else None
        return TextEncoder(self.text_encoder, self.tokenizer, self.transformer.text_spec, pooled)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> TextContext:
        return self.text_stream.encode(prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] (identity in pixel space)."""
        if self.vae is None:
            return latents
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> normalised latents, a fresh posterior sample (as in training)."""
        if self.vae is None:
            return pixels
        cfg = self.vae.config
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator)
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @property
    def vae_scale(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 25, guidance_scale: float = 6.0,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.transformer.config.sample_size * self.vae_scale
        height, width = height or size, width or size
        device, dtype = self._execution_device, self.transformer.dtype
        cond = self.encode_prompt(prompts).to(dtype)
        uncond = self.encode_prompt([""] * len(prompts)).to(dtype) if guidance_scale != 1.0 else None
        shape = (len(prompts), self.transformer.arch.in_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device, dtype)
        flow = RectifiedFlow(FlowConfig(shift=self.scheduler.config.shift), scheduler=self.scheduler)
        latents = flow.sample(self.transformer, cond, uncond, noise, num_inference_steps, guidance_scale)
        images = self.decode(latents).float().clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out = [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def load_denoiser(path: str | Path, dtype=torch.float32) -> tuple[TextEncoder, FuseDiTTransformer]:
    """(text_encoder, transformer) of an exported pipeline or an imported reference checkpoint.

    `text_encoder(input_ids, attention_mask)` takes right-padded token ids and the transformers mask
    (1 on real tokens) and returns the TextContext; for text modulation pass `captions=` too (the pooled
    CLIP embedding is its `pooled`). `transformer(latents, timestep, text)` is the velocity prediction
    for timesteps in [0, 1000], as the reference takes them.
    """
    root = Path(path)
    for part in ("transformer", "text_encoder"):
        if not (root / part / "config.json").is_file():
            raise UserError(f"{root}: no {part}/ (expected an exported pipeline or an import directory)")
    transformer = FuseDiTTransformer.from_pretrained(str(root / "transformer"), use_safetensors=True,
                                                     torch_dtype=dtype).eval()
    spec = transformer.text_spec
    tokenizer = load_tokenizer(str(root / "tokenizer")) if (root / "tokenizer").is_dir() else None
    pooled = None
    if (root / "pooled_text_encoder").is_dir():
        pooled = PooledTextEncoder.load(TextModulation(encoder=str(root), subfolder="pooled_text_encoder",
                                                       tokenizer_subfolder="pooled_tokenizer"))
    llm = load_llm(str(root / "text_encoder"), spec.llm_num_layers, dtype)
    return TextEncoder(llm, tokenizer, spec, pooled), transformer
