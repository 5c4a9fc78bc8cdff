"""Known values of each positional encoding and conditioning variant, from the facts file's formulas.

Hand-computed numbers (shared/reference/fusedit-facts.md 1.2-1.3) and, for the APE, diffusers' own
sincos table (the function the reference's PatchEmbed calls): none of it comes from fusedit.model.
"""
from __future__ import annotations

import math

import pytest
import torch

from fusedit.model.conditioning import AdaLNSingleOut, AdaLNZeroMod, AdaLNZeroOut, timestep_sinusoid
from fusedit.model.config import DiTArch
from fusedit.model.positions import IMAGE_ROPE, ape, grid
from fusedit.model.text import TextContext
from fusedit.model.transformer import image_offset


def test_ape_known_values_non_square_crop():
    # D = 8 -> omega = [1, 10000^-1/2]; max 4, base 2 -> positions x 1/2; a 2 x 4 grid reads table rows 1..2.
    table = ape(8, 2, 4, max_size=4, base_size=2)
    col, row = 1 * 0.5, (1 + 1) * 0.5  # patch (1, 1) -> table cell (2, 1)
    want = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
            math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    torch.testing.assert_close(table[1 * 4 + 1], torch.tensor(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim, h, w, max_size, base", [(64, 8, 8, 64, 4), (64, 32, 32, 64, 16), (32, 3, 7, 16, 16),
                                                      (2048, 64, 64, 64, 16)])
def test_ape_is_the_centre_crop_of_diffusers_table(dim, h, w, max_size, base):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    full = get_2d_sincos_pos_embed(dim, max_size, base_size=base, output_type="pt").reshape(max_size, max_size, dim)
    top, left = (max_size - h) // 2, (max_size - w) // 2
    want = full[top:top + h, left:left + w].reshape(h * w, dim).float()
    torch.testing.assert_close(ape(dim, h, w, max_size, base), want, atol=1e-6, rtol=0)


def test_ape_refuses_a_grid_larger_than_its_table():
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 8"):
        ape(16, 9, 4, max_size=8, base_size=4)


def _rotated_unit(kind: str, dim: int, row: int, col: int, offset: int, h=3, w=4, hd=8, theta=100.0):
    """The image token at (row, col) of an h x w grid: where the unit vector e_dim goes."""
    rows, cols = grid(h, w)
    rope = IMAGE_ROPE[kind](rows, cols, torch.tensor([offset]), hd, theta, w)
    x = torch.zeros(1, 1, h * w, hd)
    x[..., dim] = 1.0
    return rope(x)[0, 0, row * w + col]


def _pair(dim: int, angle: float, hd: int = 8) -> torch.Tensor:
    """e_dim rotated by `angle` in the rotate-half pair (dim, dim + hd/2)."""
    out = torch.zeros(hd)
    out[dim], out[dim + hd // 2] = math.cos(angle), math.sin(angle)
    return out


# theta 100, hd 8: full-width bands f_i = 100^(-i/4); half-width bands g_j = 100^(-j/2), j < 2.
# Token (row 1, col 2) of a 3 x 4 grid, after 3 text tokens: 1D position 3 + 6 = 9; row id 4, column id 5.
@pytest.mark.parametrize("kind, dim, angle", [
    ("1d-rope", 0, 9.0), ("1d-rope", 1, 9 * 100 ** -0.25), ("1d-rope", 3, 9 * 100 ** -0.75),
    ("2d-rope", 0, 4.0), ("2d-rope", 1, 4 * 0.1),  # quarter 1: the row
    ("2d-rope", 2, 5.0), ("2d-rope", 3, 5 * 0.1),  # quarter 2: the column
    ("m-rope", 0, 4.0), ("m-rope", 1, 4 * 100 ** -0.25),  # first half of the bands: the row
    ("m-rope", 2, 5 * 100 ** -0.5), ("m-rope", 3, 5 * 100 ** -0.75),  # second half: the column
])
def test_rope_known_values(kind, dim, angle):
    torch.testing.assert_close(_rotated_unit(kind, dim, 1, 2, 3), _pair(dim, angle), atol=1e-6, rtol=0)
    partner = _rotated_unit(kind, dim + 4, 1, 2, 3)  # e_{dim + hd/2} turns the same way, a quarter ahead
    torch.testing.assert_close(partner[[dim, dim + 4]], torch.tensor([-math.sin(angle), math.cos(angle)]),
                               atol=1e-6, rtol=0)


def _arch(fusion, attention):
    return DiTArch(fusion=fusion, attention=attention, timestep_conditioning="none", pos_embed="2d-rope",
                   hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8, in_channels=3,
                   patch_size=1, pos_embed_max_size=8, text_dim=8, pooled_dim=None, qk_norm=True,
                   sandwich_norm=False, rope_theta=100.0)


@pytest.mark.parametrize("fusion, attention, want", [("deep", "self", [3, 5]), ("deep", "cross", [0, 0]),
                                                     ("shallow", "self", [0, 0]), ("shallow", "cross", [0, 0])])
def test_image_positions_follow_the_text_only_in_one_joint_sequence(fusion, attention, want):
    text = TextContext(mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert image_offset(_arch(fusion, attention), text).tolist() == want


def test_timestep_sinusoid_is_cos_then_sin():
    f = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    t = torch.tensor([0.0, 250.0])
    want = torch.cat([(t[:, None] * f).cos(), (t[:, None] * f).sin()], -1)
    torch.testing.assert_close(timestep_sinusoid(t), want)
    assert timestep_sinusoid(t)[0, :128].eq(1).all() and timestep_sinusoid(t)[0, 128:].eq(0).all()


def _rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def test_adaln_single_output_is_an_affine_norm_then_table_plus_timestep():
    d = 4
    out = AdaLNSingleOut(d)
    with torch.no_grad():
        out.norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        out.scale_shift_table.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]]))
    x, c = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]]), torch.tensor([[0.01, 0.02, 0.03, 0.04]])
    shift, scale = torch.tensor([0.1, 0.2, 0.3, 0.4]) + c, torch.tensor([1.0, 2.0, 3.0, 4.0]) + c
    want = _rms(x) * torch.tensor([0.5, 1.0, 2.0, -1.0]) * (1 + scale) + shift
    torch.testing.assert_close(out(x, c), want)


def test_adaln_zero_chunks_shift_scale_gate_for_attention_then_mlp():
    d = 3
    mod = AdaLNZeroMod(d)
    with torch.no_grad():
        mod.linear.weight.zero_()
        mod.linear.bias.copy_(torch.arange(6 * d, dtype=torch.float32))
    chunks = mod(torch.zeros(1, d))
    assert [c.flatten().tolist() for c in chunks] == [list(range(i * d, (i + 1) * d)) for i in range(6)]


def test_adaln_zero_output_takes_shift_first_over_a_plain_norm():
    d = 2
    out = AdaLNZeroOut(d)
    with torch.no_grad():
        out.linear.weight.zero_()
        out.linear.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 3.0]))  # shift = (0.5, -0.5), scale = (1, 3)
    x = torch.tensor([[[2.0, -1.0]]])
    want = _rms(x) * torch.tensor([2.0, 4.0]) + torch.tensor([0.5, -0.5])
    torch.testing.assert_close(out(x, torch.zeros(1, d)), want)
