"""The one DiT block: image queries attend to [text K/V ; image K/V] in a single attention call.

Padded text is a key mask. Its form picks the kernel (`attend`): a boolean tensor goes to SDPA (which
then cannot use its flash kernel), a FlexAttention `BlockMask` built once per forward from the same
key validity goes to FlexAttention (fused, skips fully padded blocks), None (nothing padded) to SDPA
without a mask. `KEY_MASKS` names the two ways to build the mask from (B, S) key validity.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fusedit.model.conditioning import CONDITIONING
from fusedit.model.layers import GeGLU, modulate, norm_or_identity
from fusedit.model.positions import Rope


class TextKV(NamedTuple):
    """Text keys/values (B, kv_heads, T, head_dim) and the key mask for this use (None = all valid)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | BlockMask | None


def dense_key_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, S) key validity -> SDPA's broadcast boolean mask (B, 1, 1, S)."""
    return valid[:, None, None]


def block_key_mask(valid: torch.Tensor, q_len: int) -> BlockMask | torch.Tensor:
    """(B, S) key validity -> FlexAttention BlockMask over (q_len, S), shared by every head and layer.

    FlexAttention has no CPU backward: a CPU forward that records gradients gets the dense mask (SDPA).
    """
    if valid.device.type == "cpu" and torch.is_grad_enabled():
        return dense_key_mask(valid, q_len)

    def key_is_valid(b, h, q, kv):
        return valid[b, kv]

    return create_block_mask(key_is_valid, valid.shape[0], None, q_len, valid.shape[1], device=valid.device)


# attention kernel name -> how the key mask is built (the mask's type then selects the kernel in `attend`)
KEY_MASKS: dict[str, Callable[[torch.Tensor, int], torch.Tensor | BlockMask]] = {
    "sdpa": dense_key_mask,
    "flex": block_key_mask,
}
# compiled lazily on first call; inside a compiled block dynamo traces straight through it
_compiled_flex = torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask: BlockMask) -> torch.Tensor:
    """FlexAttention, compiled off the CPU (eager it materialises the scores); one dtype, autocast's if on."""
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    fn = flex_attention if dev == "cpu" else _compiled_flex
    return fn(q.to(dt), k.to(dt), v.to(dt), block_mask=mask, enable_gqa=True)


def attend(q, k, v, mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
    """Attention of q (B, H, Nq, hd) over k/v (B, kv_heads, S, hd); GQA by head groups."""
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Image tokens attend to [text ; image]; the LLM's head layout, optional per-head qk RMSNorm.

    norm_text_keys: the text keys go through this attention's k_norm too (shallow fusion, as in the
    reference); deep fusion's text keys are the LLM's own and stay as they are.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool,
                 norm_text_keys: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.norm_text_keys = norm_text_keys
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = norm_or_identity(qk_norm, head_dim)
        self.k_norm = norm_or_identity(qk_norm, head_dim)

    def forward(self, x: torch.Tensor, text: TextKV, rope: Rope) -> torch.Tensor:
        q = rope(self.q_norm(_heads(self.to_q(x), self.head_dim)))
        k = rope(self.k_norm(_heads(self.to_k(x), self.head_dim)))
        v = _heads(self.to_v(x), self.head_dim)
        tk = self.k_norm(text.k.to(k.dtype)) if self.norm_text_keys else text.k.to(k.dtype)
        k, v = torch.cat([tk, k], dim=2), torch.cat([text.v.to(v.dtype), v], dim=2)
        return self.to_out(_merge(attend(q, k, v, text.mask)))


class CrossAttention(nn.Module):
    """PixArt-style cross-attention to text K/V, added without a gate."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = norm_or_identity(qk_norm, head_dim)

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        q = self.q_norm(_heads(self.to_q(x), self.head_dim))
        k, v = text.k.to(q.dtype), text.v.to(q.dtype)
        return x + self.to_out(_merge(attend(q, k, v, text.mask)))


class NoCrossAttention(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, text: TextKV) -> torch.Tensor:
        return x


class DiTBlock(nn.Module):
    """Modulated attention + GeGLU MLP; sandwich norm wraps both outputs when enabled."""

    def __init__(self, dim, heads, kv_heads, head_dim, mlp_dim, *, conditioning, cross, qk_norm, sandwich,
                 norm_text_keys=False):
        super().__init__()
        self.modulation = CONDITIONING[conditioning][1](dim)
        self.norm1 = norm_or_identity(True, dim)
        self.attn = Attention(dim, heads, kv_heads, head_dim, qk_norm, norm_text_keys)
        self.attn_out_norm = norm_or_identity(sandwich, dim)
        self.cross = (CrossAttention if cross else NoCrossAttention)(dim, heads, kv_heads, head_dim, qk_norm)
        self.norm2 = norm_or_identity(True, dim)
        self.mlp = GeGLU(dim, mlp_dim)
        self.mlp_out_norm = norm_or_identity(sandwich, dim)

    def forward(self, x, c, joint: TextKV, cross: TextKV, rope: Rope) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)
        x = x + gate_a * self.attn_out_norm(self.attn(modulate(self.norm1(x), shift_a, scale_a), joint, rope))
        x = self.cross(x, cross)
        return x + gate_m * self.mlp_out_norm(self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
