"""The denoiser: patchify -> conditioning -> DiT blocks over [text K/V ; image] -> unpatchify."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from fusedit.errors import UserError
from fusedit.model.block import KEY_MASKS, DiTBlock, TextKV, _heads
from fusedit.model.conditioning import CONDITIONING
from fusedit.model.config import DiTArch, TextSpec
from fusedit.model.layers import RMSNorm, fp8_linears, norm_or_identity
from fusedit.model.positions import IMAGE_ROPE, ape, grid
from fusedit.model.text import TextContext


class DeepText(nn.Module):
    """Deep fusion: the LLM's own K/V of the paired layer, used as they are."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, feats: TextContext) -> tuple[torch.Tensor, torch.Tensor]:
        return feats.kv[self.index]


class ShallowText(nn.Module):
    """Shallow fusion: per-layer key/value projections of the (embedded) text states; no RoPE.

    Cross-attention normalises these keys with a k_norm of its own; joint self-attention with the
    attention's own k_norm, shared with the image keys (one parameter, as in the reference), inside the block.
    """

    def __init__(self, a: DiTArch):
        super().__init__()
        self.head_dim = a.head_dim
        self.to_k = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.to_v = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.k_norm = norm_or_identity(a.qk_norm and a.attention == "cross", a.head_dim)

    def forward(self, feats: TextContext) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = _heads(self.to_k(feats.states), self.head_dim), _heads(self.to_v(feats.states), self.head_dim)
        return self.k_norm(k), v


class ContextEmbedder(nn.Module):
    """Shallow fusion: RMSNorm -> Linear from the LLM width to the DiT width, once per forward."""

    def __init__(self, a: DiTArch):
        super().__init__()
        self.norm, self.proj = RMSNorm(a.text_dim), nn.Linear(a.text_dim, a.hidden_size)

    def forward(self, text: TextContext) -> TextContext:
        return replace(text, states=self.proj(self.norm(text.states)))


def _joint_route(k, v, mask, empty: TextKV) -> tuple[TextKV, TextKV]:
    return TextKV(k, v, mask), empty


def _cross_route(k, v, mask, empty: TextKV) -> tuple[TextKV, TextKV]:
    return empty, TextKV(k, v, mask)


def _joint_keys(text_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """Keys are [text ; image]: padded text keys are invalid, image keys always valid."""
    return torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], n_image)], 1)


def _text_keys(text_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    return text_mask


class Route(NamedTuple):
    keys: Callable[[torch.Tensor, int], torch.Tensor]  # (B, T) text mask, image tokens -> (B, S) key validity
    split: Callable  # (k, v, mask, empty) -> (text K/V for the self-attention, for the cross-attention)


# attention kind -> where the text K/V go and which keys their mask covers
ROUTES = {"self": Route(_joint_keys, _joint_route), "cross": Route(_text_keys, _cross_route)}


def image_offset(a: DiTArch, text: TextContext) -> torch.Tensor:
    """(B,) first RoPE position of the image: after the real text where text and image are one RoPE'd
    sequence (deep fusion, joint self-attention), else 0 (shallow text has no RoPE; cross-attention
    text is a separate sequence), as in the reference."""
    if a.fusion == "deep" and a.attention == "self":
        return text.lengths
    return torch.zeros_like(text.lengths)


class FuseDiTTransformer(ModelMixin, ConfigMixin):
    """DiT over image patches whose attention reads text K/V; deep or shallow fusion is where they come from.

    Runtime settings that change speed, not results: `use_attention_kernel("sdpa" | "flex")` and diffusers'
    `enable_gradient_checkpointing()` (each block recomputed in the backward); `use_fp8_matmuls()` changes
    the rounding (FP8 on Hopper, a no-op elsewhere) and is only for runs whose loss curve is checked.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, arch: dict, text: dict, sample_size: int = 64):
        super().__init__()  # sample_size: default latent height/width for generation
        a = self.arch = DiTArch.model_validate(arch)
        self.text_spec = TextSpec.model_validate(text)
        embed, _, out = CONDITIONING[a.timestep_conditioning]
        p, d = a.patch_size, a.hidden_size
        self.x_embed = nn.Linear(a.in_channels * p * p, d)
        self.t_embed = embed(d, a.pooled_dim)
        deep = a.fusion == "deep"
        self.context = nn.Identity() if deep else ContextEmbedder(a)
        self.text_in = nn.ModuleList(DeepText(i) if deep else ShallowText(a) for i in range(a.num_layers))
        self.route = ROUTES[a.attention]
        self.blocks = nn.ModuleList(
            DiTBlock(d, a.num_heads, a.num_kv_heads, a.head_dim, a.mlp_dim, conditioning=a.timestep_conditioning,
                     cross=a.attention == "cross", qk_norm=a.qk_norm, sandwich=a.sandwich_norm,
                     norm_text_keys=a.qk_norm and not deep and a.attention == "self")
            for _ in range(a.num_layers)
        )
        self.out_norm = out(d)
        self.proj_out = nn.Linear(d, a.in_channels * p * p)
        self._init_weights()
        self.gradient_checkpointing = False
        self.attention_kernel = "sdpa"
        self._mask_memo: tuple = ()

    def use_attention_kernel(self, name: str) -> FuseDiTTransformer:
        if name not in KEY_MASKS:
            raise UserError(f"attention kernel '{name}' is not one of {', '.join(KEY_MASKS)}")
        self.attention_kernel, self._mask_memo = name, ()
        return self

    def use_fp8_matmuls(self, enabled: bool | None = None) -> int:
        """Attention and MLP projections of every block in FP8 where the GPU has it (modulation stays); how many."""
        return sum(fp8_linears(part, enabled) for b in self.blocks for part in (b.attn, b.cross, b.mlp))

    def _key_mask(self, text: TextContext, n_image: int):
        """The key mask every layer shares; reused while the same text mask comes back (sampling steps).

        Inside a compiled denoiser it is built in the graph every call: a memo there would become an
        identity guard that recompiles for every new batch.
        """
        if text.all_valid:
            return None
        if torch.compiler.is_compiling():
            return KEY_MASKS[self.attention_kernel](self.route.keys(text.mask, n_image), n_image)
        grad = torch.is_grad_enabled()
        memo = self._mask_memo
        if memo and memo[0] is text.mask and memo[1:3] == (n_image, grad):
            return memo[3]
        mask = KEY_MASKS[self.attention_kernel](self.route.keys(text.mask, n_image), n_image)
        self._mask_memo = (text.mask, n_image, grad, mask)
        return mask

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if hasattr(self.t_embed, "mlp"):
            for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
        zero = [self.proj_out] + [getattr(b.modulation, "linear", None) for b in self.blocks]
        zero.append(getattr(self.out_norm, "linear", None))
        for lin in filter(None, zero):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p = self.arch.patch_size
        x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (hh // p) * (ww // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.arch.patch_size, self.arch.in_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: TextContext) -> torch.Tensor:
        """Velocity prediction for latents x (B, C, H, W) at `timestep` (B,) in [0, 1000]."""
        a = self.arch
        h, w = x.shape[-2] // a.patch_size, x.shape[-1] // a.patch_size
        tokens = self.x_embed(self.patchify(x).to(self.x_embed.weight.dtype))
        rows, cols = grid(h, w, x.device)
        if a.pos_embed == "ape":
            table = ape(a.hidden_size, h, w, a.pos_embed_max_size, a.pos_embed_base_size, x.device)
            tokens = tokens + table.to(tokens.dtype)
        rope = IMAGE_ROPE[a.pos_embed](rows, cols, image_offset(a, text), a.head_dim, a.rope_theta, w)
        cond = self.t_embed(timestep, text.pooled)
        tokens = tokens + cond.tokens

        feats = self.context(text)
        mask = self._key_mask(text, h * w)
        empty_k = tokens.new_zeros(x.shape[0], a.num_kv_heads, 0, a.head_dim)
        empty = TextKV(empty_k, empty_k, None)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for source, block in zip(self.text_in, self.blocks, strict=True):
            joint, cross = self.route.split(*source(feats), mask, empty)
            if checkpointed:
                tokens = self._gradient_checkpointing_func(block, tokens, cond.layers, joint, cross, rope)
            else:
                tokens = block(tokens, cond.layers, joint, cross, rope)
        return self.unpatchify(self.proj_out(self.out_norm(tokens, cond.final)), h, w)
