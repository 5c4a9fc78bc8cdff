"""Timestep conditioning variants (adaln-zero | adaln-single | addition | none) as small modules.

Each variant is three pieces: a global embedder (timestep [+ pooled text] -> Cond), a per-layer
modulation (-> shift/scale/gate for attention and MLP) and the output norm before `proj_out`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fusedit.model.layers import RMSNorm, modulate


@dataclass
class Cond:
    """What the conditioning hands to the network: a bias on the input tokens, per-layer and final inputs."""

    tokens: torch.Tensor | float
    layers: torch.Tensor | None
    final: torch.Tensor | None


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cos first (flip_sin_to_cos), frequencies as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear, plus the optional pooled-text modulation."""

    def __init__(self, dim: int, pooled_dim: int | None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = (
            nn.Sequential(RMSNorm(pooled_dim), nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if pooled_dim else None
        )

    def forward(self, t: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(timestep_sinusoid(t).to(self.mlp[0].weight.dtype))
        return emb if self.text is None else emb + self.text(pooled.to(emb.dtype))


# ---- global embedders -------------------------------------------------------------------------

class AdaLNZeroEmbed(TimestepEmbedder):
    def forward(self, t, pooled):
        c = super().forward(t, pooled)
        return Cond(0.0, c, c)


class AdaLNSingleEmbed(TimestepEmbedder):
    def __init__(self, dim: int, pooled_dim: int | None):
        super().__init__(dim, pooled_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, t, pooled):
        c = super().forward(t, pooled)
        return Cond(0.0, self.t_block(c), c)


class AdditionEmbed(TimestepEmbedder):
    def forward(self, t, pooled):
        return Cond(super().forward(t, pooled)[:, None], None, None)


class NoEmbed(nn.Module):
    def __init__(self, dim: int, pooled_dim: int | None):
        super().__init__()

    def forward(self, t, pooled):
        return Cond(0.0, None, None)


# ---- per-layer modulation: Cond.layers -> (shift, scale, gate) x (attention, mlp) ----------------

class AdaLNZeroMod(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, c):
        return self.linear(nn.functional.silu(c))[:, None].chunk(6, dim=-1)


class AdaLNSingleMod(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, c):
        return (self.scale_shift_table[None] + c.view(c.shape[0], 6, -1)).chunk(6, dim=1)


class NoMod(nn.Module):
    """Plain pre-norm block: no shift, no scale, gates of one."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, c):
        return 0.0, 0.0, 1.0, 0.0, 0.0, 1.0


# ---- output norm before proj_out --------------------------------------------------------------

class AdaLNZeroOut(nn.Module):
    """DiT's output: (shift, scale) from Linear(SiLU(c)) over a plain RMSNorm.

    The reference's version has an affine norm and chunks (scale, shift); the norm's weight folds exactly
    into the scale rows of the linear (see `fusedit.model.reference`), so the plain norm loses nothing.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, affine=False)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.linear(nn.functional.silu(c))[:, None].chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class AdaLNSingleOut(nn.Module):
    """PixArt-alpha's output: an affine RMSNorm, then (shift, scale) = table (2, D) + the timestep embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, c):
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class PlainOut(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)

    def forward(self, x, c):
        return self.norm(x)


# timestep_conditioning -> (embedder, per-layer modulation, output norm)
CONDITIONING = {
    "adaln-zero": (AdaLNZeroEmbed, AdaLNZeroMod, AdaLNZeroOut),
    "adaln-single": (AdaLNSingleEmbed, AdaLNSingleMod, AdaLNSingleOut),
    "addition": (AdditionEmbed, NoMod, PlainOut),
    "none": (NoEmbed, NoMod, PlainOut),
}
