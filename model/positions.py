"""Where image tokens are: 2D sin-cos APE, or RoPE variants whose image positions follow the real text."""
from __future__ import annotations

from collections.abc import Callable

import torch

Rope = Callable[[torch.Tensor], torch.Tensor]  # rotates (B, heads, N, head_dim) queries or keys


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, dim) fixed 2D sin-cos embedding: half the channels encode the row, half the column."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=pos.device) / (d / 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(rows, dim // 2), one_axis(cols, dim // 2)], dim=1).float()


def grid(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch, row-major, as the tokens are laid out."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rows, cols


def ape(dim: int, h: int, w: int, max_size: int, device=None) -> torch.Tensor:
    """APE for an h x w patch grid, centre-cropped from a max_size x max_size table."""
    rows, cols = grid(h, w, device)
    return sincos_2d(dim, rows + (max_size - h) // 2, cols + (max_size - w) // 2).to(device)


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Gemma/Llama layout) with per-sample angles (B, N, dim/2)."""
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def no_rope(*_args, **_kwargs) -> Rope:
    return lambda x: x


def rope_1d(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Image token k sits at position n_text + k of one joint sequence."""
    pos = offset[:, None] + (rows * w + cols)[None]
    angles = pos[..., None].float() * _inv_freq(head_dim, theta, pos.device)
    return lambda x: _rotate(x, angles)


def rope_2d(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Axial: first half of head_dim rotated by the row, second half by the column, both after the text."""
    inv = _inv_freq(head_dim // 2, theta, rows.device)
    a_row = (offset[:, None] + rows[None])[..., None].float() * inv
    a_col = (offset[:, None] + cols[None])[..., None].float() * inv

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr, xc = x.chunk(2, dim=-1)
        return torch.cat([_rotate(xr, a_row), _rotate(xc, a_col)], dim=-1)

    return apply


def rope_m(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Qwen2-VL style: frequency bands in 4 chunks driven by h, w, h, w ids (text: h = w, i.e. 1D)."""
    inv = _inv_freq(head_dim, theta, rows.device)
    n = inv.numel()
    chunk = torch.arange(n, device=rows.device) * 4 // n  # 0,1,2,3 over the bands
    h = (offset[:, None] + rows[None])[..., None].float()
    wpos = (offset[:, None] + cols[None])[..., None].float()
    angles = torch.where(chunk % 2 == 0, h * inv, wpos * inv)
    return lambda x: _rotate(x, angles)


# pos_embed name -> builder of the image-token rotation (APE variants rotate nothing)
IMAGE_ROPE = {"ape": no_rope, "1d-rope": rope_1d, "2d-rope": rope_2d, "m-rope": rope_m}
