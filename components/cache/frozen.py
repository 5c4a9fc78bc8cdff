"""The frozen parts a recipe names (LLM text stream, VAE encoder) and the image preprocessing.

The cache builder and the online feature path both go through these functions, so a cached sample
and an online one are computed by the same code and can only differ by floating-point noise.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fusedit.errors import UserError
from fusedit.model.config import Recipe
from fusedit.model.text import TextEncoder


def preprocess(data: bytes, resolution: int) -> torch.Tensor:
    """Image bytes -> (3, R, R) uint8: resize the short side to R (bilinear), centre-crop R x R."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = round((nw - resolution) / 2), round((nh - resolution) / 2)
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the pixel-space sample and the VAE's input)."""
    return pixels.float() / 127.5 - 1.0


def load_text_encoder(recipe: Recipe, device: torch.device) -> TextEncoder:
    from fusedit.components.cache.format import text_spec

    return TextEncoder.load(recipe.model, text_spec(recipe)).to(device)


class ImageEncoder:
    """uint8 pixels -> (mean, logvar) of the VAE posterior, or normalised pixels in pixel space."""

    def __init__(self, recipe: Recipe, device: torch.device):
        m = recipe.model
        self.device, self.vae = device, None
        self.shift, self.scale = 0.0, 1.0
        if m.vae:
            from diffusers import AutoencoderKL

            sub = {"subfolder": m.vae_subfolder} if m.vae_subfolder else {}
            try:
                vae = AutoencoderKL.from_pretrained(m.vae, use_safetensors=True, **sub)  # never unpickle weights
                self.vae = vae.to(device).eval().requires_grad_(False)
            except OSError as exc:
                raise UserError(f"cannot load VAE {m.vae!r}: {exc}") from None
            self.shift = float(self.vae.config.shift_factor or 0.0)
            self.scale = float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = to_unit(pixels.to(self.device))
        if self.vae is None:
            return x, None
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar


def sample_x0(mean: torch.Tensor, logvar: torch.Tensor | None, shift: float, scale: float,
              generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The training sample: a fresh posterior draw (as the online VAE does), shifted and scaled."""
    if logvar is None:
        return mean
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device="cpu", dtype=mean.dtype).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * noise
    return (z - shift) * scale
