"""Where image tokens are: 2D sin-cos APE, or RoPE variants (the reference's exact layouts).

Notation: hd = head_dim. Rotate-half RoPE (the Gemma/Llama layout) pairs dim i with dim i + hd/2 and
rotates the pair by an angle per frequency band i < hd/2. Every variant here is a choice of those
hd/2 angles per image token; `_rotate` applies them. Invariants (checked against the reference's
own outputs, `shared/reference/golden/`):
- `ape`: diffusers' PatchEmbed sincos table, centre-cropped from a max_size square, positions scaled
  by base_size / max_size, channels [column | row], each half [sin | cos].
- `1d-rope`: band i of image token k at position offset + k, frequency theta^(-2i/hd).
- `2d-rope`: a half-width table (frequencies theta^(-4j/hd), j < hd/4) for the row and for the column,
  laid out so the head dims read [row | col | row | col] in quarters: band j is the row's, band
  hd/4 + j the column's.
- `m-rope`: full-width frequencies; the first half of the bands (i < hd/4) driven by the row id, the
  second half by the column id.
Row and column ids are offset by `offset` (the real text length where text and image share one
RoPE'd sequence, else 0).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Rope = Callable[[torch.Tensor], torch.Tensor]  # rotates (B, heads, N, head_dim) queries or keys


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N, dim): [sin | cos] of pos * omega_k, omega_k = 10000^(-k / (dim/2)), k < dim/2 (float64 maths)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def grid(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch, row-major, as the tokens are laid out."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rows, cols


def ape(dim: int, h: int, w: int, max_size: int, base_size: int, device=None) -> torch.Tensor:
    """(h*w, dim) APE of an h x w patch grid: the centre crop of the max_size x max_size sincos table.

    Table cell (r, c) encodes positions scaled by base_size / max_size; patch (i, j) reads cell
    (i + (max_size - h)//2, j + (max_size - w)//2), so a non-square grid takes the centre of the table.
    """
    if h > max_size or w > max_size:
        raise ValueError(f"a {h}x{w} patch grid exceeds pos_embed_max_size {max_size}")
    rows, cols = grid(h, w, device)
    scale = base_size / max_size
    r, c = (rows + (max_size - h) // 2) * scale, (cols + (max_size - w) // 2) * scale
    return torch.cat([sincos_1d(dim // 2, c), sincos_1d(dim // 2, r)], dim=1).float()


def _inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2: the frequency bands of a dim-wide rotate-half RoPE."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Gemma/Llama layout) with per-sample angles (B, N, head_dim/2)."""
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _ids(offset: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, 1) float positions: per-sample offset + per-token id."""
    return (offset[:, None] + ids[None])[..., None].float()


def no_rope(*_args, **_kwargs) -> Rope:
    return lambda x: x


def rope_1d(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Image token k sits at position offset + k of one sequence."""
    angles = _ids(offset, rows * w + cols) * _inv_freq(head_dim, theta, rows.device)
    return lambda x: _rotate(x, angles)


def rope_2d(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Bands j < hd/4 turn with the row, bands hd/4 + j with the column, both at frequency theta^(-4j/hd)."""
    half = _inv_freq(head_dim // 2, theta, rows.device)
    angles = torch.cat([_ids(offset, rows) * half, _ids(offset, cols) * half], dim=-1)
    return lambda x: _rotate(x, angles)


def rope_m(rows, cols, offset, head_dim, theta, w) -> Rope:
    """Qwen2-VL style: the first half of the full-width bands turn with the row, the second with the column."""
    full = _inv_freq(head_dim, theta, rows.device)
    n = full.numel() // 2
    angles = torch.cat([_ids(offset, rows) * full[:n], _ids(offset, cols) * full[n:]], dim=-1)
    return lambda x: _rotate(x, angles)


# pos_embed name -> builder of the image-token rotation (APE variants rotate nothing)
IMAGE_ROPE = {"ape": no_rope, "1d-rope": rope_1d, "2d-rope": rope_2d, "m-rope": rope_m}
