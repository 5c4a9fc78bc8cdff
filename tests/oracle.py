"""Test oracle: the paper's model written out from the facts file, sharing no code with `fusedit.model`.

Only weights are read from the model under test (its parameters, by module name) and its resolved
config; every formula is written here from shared/reference/fusedit-facts.md sections 1.1-1.5:
patchify and unpatchify, the APE table, the 1D / 2D / M-RoPE angle layouts, the timestep embedding,
each conditioning variant and output norm, and the joint attention over [text ; image] with an explicit
S x S mask (text rows causal over non-pad text and blind to the image; image rows see every image
token and every non-pad text token). The frozen LLM's layers are run by hand from its transformers
weights: the shared ones as the reference runs them (scale head_dim^-0.5, no soft-capping), text-only
ones before them as the LLM itself does. No K/V cache, no hooks, no SDPA.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _lin(x, mod):
    return F.linear(x, mod.weight, mod.bias)


def _rms(x, mod=None, eps=1e-6):
    """x / rms(x), times the weight of `mod` when one is given: every affine norm must have one."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if mod is None:
        return y
    if getattr(mod, "weight", None) is None:
        raise AssertionError(f"an affine norm has no weight: {mod}")
    return y * mod.weight


def _heads(x, hd):
    return x.unflatten(-1, (-1, hd)).transpose(1, 2)


def _geglu(mlp, x):
    return F.linear(F.gelu(F.linear(x, mlp.gate_proj.weight), approximate="tanh") * F.linear(x, mlp.up_proj.weight),
                    mlp.down_proj.weight)


# ---- patches and positions ---------------------------------------------------------------------

def patches(x, p):
    """(B, C, H, W) -> (B, h*w, p*p*C): token i*w + j holds pixels (i*p + u, j*p + v) at (u*p + v)*C + c."""
    b, c, hh, ww = x.shape
    out = x.new_empty(b, (hh // p) * (ww // p), p * p * c)
    for u in range(p):
        for v in range(p):
            out[..., (u * p + v) * c:(u * p + v + 1) * c] = x[:, :, u::p, v::p].permute(0, 2, 3, 1).flatten(1, 2)
    return out


def image(y, h, w, p, c):
    """The inverse of `patches`."""
    out = y.new_empty(y.shape[0], c, h * p, w * p)
    for u in range(p):
        for v in range(p):
            out[:, :, u::p, v::p] = y[..., (u * p + v) * c:(u * p + v + 1) * c].unflatten(1, (h, w)).permute(0, 3, 1, 2)
    return out


def ape_table(dim, h, w, max_size, base_size):
    """Centre crop of the max_size^2 sincos table; positions x base/max; [sin col | cos col | sin row | cos row]."""
    q = dim // 4
    omega = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    rows = torch.arange(h).repeat_interleave(w) + (max_size - h) // 2
    cols = torch.arange(w).repeat(h) + (max_size - w) // 2
    pr, pc = rows.double()[:, None] * base_size / max_size, cols.double()[:, None] * base_size / max_size
    return torch.cat([(pc * omega).sin(), (pc * omega).cos(), (pr * omega).sin(), (pr * omega).cos()], 1).float()


def image_angles(kind, h, w, offset, hd, theta):
    """(B, N, hd/2) angle of each rotate-half pair (i, i + hd/2) of each image token, per RoPE variant."""
    i = torch.arange(hd // 2)
    row = (offset[:, None] + torch.arange(h).repeat_interleave(w)[None]).float()[..., None]
    col = (offset[:, None] + torch.arange(w).repeat(h)[None]).float()[..., None]
    if kind == "1d-rope":  # token k at offset + k, frequencies theta^(-2i/hd)
        k = (offset[:, None] + torch.arange(h * w)[None]).float()[..., None]
        return k * theta ** (-2 * i.float() / hd)
    if kind == "2d-rope":  # pairs j < hd/4 by the row, hd/4 + j by the column, frequency theta^(-4j/hd)
        f = theta ** (-4 * (i % (hd // 4)).float() / hd)
        return torch.where(i < hd // 4, row * f, col * f)
    if kind == "m-rope":  # full-width frequencies, first half of the bands by the row, second by the column
        f = theta ** (-2 * i.float() / hd)
        return torch.where(i < hd // 4, row * f, col * f)
    raise ValueError(kind)


def turn(x, angles):
    """Rotate pair (i, i + hd/2) of x (B, H, N, hd) by angles (B, N, hd/2)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


# ---- conditioning ------------------------------------------------------------------------------

def timestep_embedding(dit, t, pooled):
    """sinusoid(256) [cos | sin] -> Linear -> SiLU -> Linear (+ the pooled-text MLP)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    mlp = dit.t_embed.mlp
    e = _lin(F.silu(_lin(torch.cat([args.cos(), args.sin()], -1), mlp[0])), mlp[2])
    if pooled is not None:
        tm = dit.t_embed.text
        e = e + _lin(F.silu(_lin(_rms(pooled, tm[0]), tm[1])), tm[3])
    return e


def block_modulation(dit, block, temb, tb, b, d):
    """(shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), each broadcastable over tokens."""
    kind = dit.arch.timestep_conditioning
    if kind == "adaln-zero":
        return [m[:, None] for m in _lin(F.silu(temb), block.modulation.linear).chunk(6, -1)]
    if kind == "adaln-single":
        return [m[:, None] for m in (block.modulation.scale_shift_table[None] + tb.view(b, 6, d)).unbind(1)]
    zero, one = torch.zeros(b, 1, d), torch.ones(b, 1, d)
    return [zero, zero, one, zero, zero, one]


def output_norm(dit, x, temb):
    kind = dit.arch.timestep_conditioning
    if kind == "adaln-zero":  # plain norm, (shift, scale) = Linear(SiLU(temb))
        shift, scale = _lin(F.silu(temb), dit.out_norm.linear).chunk(2, -1)
        return _rms(x) * (1 + scale[:, None]) + shift[:, None]
    if kind == "adaln-single":  # affine norm, (shift, scale) = table + temb
        shift, scale = (dit.out_norm.scale_shift_table[None] + temb[:, None]).unbind(1)
        return _rms(x, dit.out_norm.norm) * (1 + scale[:, None]) + shift[:, None]
    return _rms(x, dit.out_norm.norm)


# ---- attention and the LLM ---------------------------------------------------------------------

def _rope_text(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _attend(q, k, v, allowed, scale, softcap_rows=None):
    """Explicit softmax attention with an (B, Sq, Sk) boolean mask; optional soft-capping on some rows."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * (scale[:, None] if torch.is_tensor(scale) else scale)
    if softcap_rows is not None:
        rows, cap = softcap_rows
        capped = torch.tanh(scores / cap) * cap
        scores = torch.where(rows[None, None, :, None], capped, scores)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def _text_mlp(layer, h, attn_out):
    """The rest of a Gemma / Gemma-2 decoder layer after its attention."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        h = h + layer.post_attention_layernorm(attn_out)
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    h = h + attn_out
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _run_text_layer(llm, layer, txt, cos, sin, text_rows):
    """A text-only layer before the first shared one: the LLM's own attention (its scale and soft-capping)."""
    cfg, attn = llm.config, layer.self_attn
    hd = cfg.head_dim
    scale = getattr(cfg, "query_pre_attn_scalar", hd) ** -0.5
    cap = getattr(cfg, "attn_logit_softcapping", None)
    tin = layer.input_layernorm(txt)
    q = _rope_text(_heads(attn.q_proj(tin), hd), cos, sin)
    k = _rope_text(_heads(attn.k_proj(tin), hd), cos, sin)
    v = _heads(attn.v_proj(tin), hd)
    out = _attend(q, k, v, text_rows, scale, (torch.ones(q.shape[2], dtype=torch.bool), cap) if cap else None)
    return _text_mlp(layer, txt, attn.o_proj(out))


def joint_forward(dit, llm, ids, mask, x, t, pooled=None):
    """The denoiser output computed from the paper's definition (deep or shallow fusion)."""
    a = dit.arch
    b, T = ids.shape
    p, hd, d = a.patch_size, a.head_dim, a.hidden_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    N = h * w
    tokens = _lin(patches(x, p), dit.x_embed)
    if a.pos_embed == "ape":
        tokens = tokens + ape_table(d, h, w, a.pos_embed_max_size, a.pos_embed_base_size)
    n_text = mask.sum(1)
    joint_text = a.fusion == "deep" and a.attention == "self"  # one RoPE'd sequence: image after the text
    offset = n_text if joint_text else torch.zeros_like(n_text)
    angles = None if a.pos_embed == "ape" else image_angles(a.pos_embed, h, w, offset, hd, a.rope_theta)

    def rope(z):
        return z if angles is None else turn(z, angles)

    def qk_norm(z, mod):  # per-head affine RMSNorm on the DiT's queries and keys, when the config has it
        return _rms(z, mod) if a.qk_norm else z

    temb = timestep_embedding(dit, t, pooled) if a.timestep_conditioning != "none" else None
    tb = _lin(F.silu(temb), dit.t_embed.t_block[1]) if a.timestep_conditioning == "adaln-single" else None
    if a.timestep_conditioning == "addition":
        tokens = tokens + temb[:, None]

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    text_rows = causal[None] & mask[:, None, :]  # (B, T, T): causal over non-pad text
    img_rows_text = mask[:, None, :].expand(b, N, T)  # image rows see non-pad text
    ones_img = torch.ones(b, N, N, dtype=torch.bool)
    joint_allowed = torch.cat([
        torch.cat([text_rows, torch.zeros(b, T, N, dtype=torch.bool)], 2),
        torch.cat([img_rows_text, ones_img], 2),
    ], 1)

    spec = dit.text_spec
    pos = torch.arange(T)[None]
    if a.fusion == "shallow":
        hs = llm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        ctx = _lin(_rms(hs[spec.hidden_index], dit.context.norm), dit.context.proj)  # projected once
    else:
        txt = llm.embed_tokens(ids)
        cos, sin = llm.rotary_emb(txt, pos)
        for i in range(spec.layers[0]):
            txt = _run_text_layer(llm, llm.layers[i], txt, cos, sin, text_rows)

    for j, block in enumerate(dit.blocks):
        sa, ca, ga, sm, cm, gm = block_modulation(dit, block, temb, tb, b, d)
        att = block.attn
        xin = _rms(tokens, block.norm1) * (1 + ca) + sa
        qi = rope(qk_norm(_heads(_lin(xin, att.to_q), hd), att.q_norm))
        ki = rope(qk_norm(_heads(_lin(xin, att.to_k), hd), att.k_norm))
        vi = _heads(_lin(xin, att.to_v), hd)
        if a.fusion == "shallow":
            src = dit.text_in[j]
            # text keys share the attention's k_norm in self-attention; cross-attention has its own
            kt = qk_norm(_heads(_lin(ctx, src.to_k), hd), att.k_norm if a.attention == "self" else src.k_norm)
            vt = _heads(_lin(ctx, src.to_v), hd)
            qt = None
        else:
            layer = llm.layers[spec.layers[j]]
            lat = layer.self_attn
            tin = layer.input_layernorm(txt)
            qt = _rope_text(_heads(lat.q_proj(tin), hd), cos, sin)
            kt_raw = _heads(lat.k_proj(tin), hd)
            kt, vt = _rope_text(kt_raw, cos, sin), _heads(lat.v_proj(tin), hd)
        if a.attention == "self":
            if qt is None:  # shallow: only image rows are queries
                img_attn = _attend(qi, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), joint_allowed[:, T:], hd**-0.5)
            else:  # ONE attention over [text ; image], plain scaled dot product for every row
                out = _attend(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2),
                              joint_allowed, hd**-0.5)
                txt = _text_mlp(layer, txt, lat.o_proj(out[:, :T]))
                img_attn = out[:, T:]
        else:  # self-attention over image tokens, then cross-attention to the text K/V
            img_attn = _attend(qi, ki, vi, ones_img, hd**-0.5)
            if qt is not None:  # deep: the LLM's own causal attention; its (pre-RoPE) K/V feed the DiT
                txt = _text_mlp(layer, txt, lat.o_proj(_attend(qt, kt, vt, text_rows, hd**-0.5)))
                kt = kt_raw
        attn_out = _lin(img_attn, att.to_out)
        tokens = tokens + ga * (_rms(attn_out, block.attn_out_norm) if a.sandwich_norm else attn_out)
        if a.attention == "cross":
            cq = qk_norm(_heads(_lin(tokens, block.cross.to_q), hd), block.cross.q_norm)
            tokens = tokens + _lin(_attend(cq, kt, vt, img_rows_text, hd**-0.5), block.cross.to_out)
        mlp_out = _geglu(block.mlp, _rms(tokens, block.norm2) * (1 + cm) + sm)
        tokens = tokens + gm * (_rms(mlp_out, block.mlp_out_norm) if a.sandwich_norm else mlp_out)
    y = _lin(output_norm(dit, tokens, temb), dit.proj_out)
    return image(y, h, w, p, a.in_channels)
