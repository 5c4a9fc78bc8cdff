"""Small building blocks shared by the DiT: norms, GeGLU MLP, modulation."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.RMSNorm):
    """Per-channel RMSNorm (eps 1e-6), as in Gemma's layers."""

    def __init__(self, dim: int, affine: bool = True):
        super().__init__(dim, eps=1e-6, elementwise_affine=affine)


class GeGLU(nn.Module):
    """Gemma's MLP: gelu(tanh)(gate) * up, then down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def modulate(x: torch.Tensor, shift, scale) -> torch.Tensor:
    return x * (1 + scale) + shift


def norm_or_identity(enabled: bool, dim: int) -> nn.Module:
    return RMSNorm(dim) if enabled else nn.Identity()
