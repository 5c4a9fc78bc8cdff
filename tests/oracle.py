"""Test oracle: the paper's joint attention written out directly, as the reference describes it.

At every shared layer the text rows (the frozen LLM's layer, run here by hand) and the image rows
(the DiT's layer) form ONE sequence [text ; image] and ONE attention with an explicit S x S mask:
text rows are causal over non-pad text and never see images; image rows see every image token and
every non-pad text token. No K/V cache, no hooks, no SDPA: the production code must agree with it.
"""
from __future__ import annotations

import torch

from fusedit.model.layers import modulate
from fusedit.model.positions import IMAGE_ROPE, ape, grid


def _heads(x, hd):
    return x.unflatten(-1, (-1, hd)).transpose(1, 2)


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


def joint_forward(dit, llm, ids, mask, x, t, pooled=None):
    """The denoiser output computed by the joint-sequence definition (deep or shallow fusion)."""
    a = dit.arch
    b, T = ids.shape
    p = a.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    N = h * w
    hd = a.head_dim
    tokens = dit.x_embed(dit.patchify(x))
    rows, cols = grid(h, w)
    if a.pos_embed == "ape":
        tokens = tokens + ape(a.hidden_size, h, w, a.pos_embed_max_size)
    n_text = mask.sum(1)
    rope = IMAGE_ROPE[a.pos_embed](rows, cols, n_text, hd, a.rope_theta, w)
    cond = dit.t_embed(t, pooled)
    tokens = tokens + cond.tokens

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
        ctx = dit.context.proj(dit.context.norm(hs[spec.hidden_index]))  # static text, projected once
    else:
        txt = llm.embed_tokens(ids)
        cos, sin = llm.rotary_emb(txt, pos)
        for i in range(spec.layers[0]):  # text-only layers before the first shared one
            txt = _run_text_layer(llm.layers[i], txt, cos, sin, text_rows)

    for j, block in enumerate(dit.blocks):
        sa, ca, ga, sm, cm, gm = block.modulation(cond.layers)
        xin = modulate(block.norm1(tokens), sa, ca)
        qi = rope(block.attn.q_norm(_heads(block.attn.to_q(xin), hd)))
        ki = rope(block.attn.k_norm(_heads(block.attn.to_k(xin), hd)))
        vi = _heads(block.attn.to_v(xin), hd)
        if a.fusion == "shallow":
            src = dit.text_in[j]
            kt, vt = src.k_norm(_heads(src.to_k(ctx), hd)), _heads(src.to_v(ctx), hd)
            qt = None
        else:
            layer = llm.layers[spec.layers[j]]
            attn = layer.self_attn
            tin = layer.input_layernorm(txt)
            qt = _rope_text(_heads(attn.q_proj(tin), hd), cos, sin)
            kt_raw = _heads(attn.k_proj(tin), hd)
            kt, vt = _rope_text(kt_raw, cos, sin), _heads(attn.v_proj(tin), hd)
        if a.attention == "self":
            # ONE attention over [text ; image]; text rows use the LLM's own scale (and Gemma-2 soft-capping)
            if qt is None:  # shallow: only image rows exist as queries
                img_attn = _attend(qi, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), joint_allowed[:, T:], hd**-0.5)
            else:
                q = torch.cat([qt, qi], 2)
                scale = torch.cat([torch.full((T,), attn.scaling), torch.full((N,), hd**-0.5)])
                cap = getattr(attn, "attn_logit_softcapping", None)
                rows = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)])
                out = _attend(q, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), joint_allowed, scale,
                              (rows, cap) if cap else None)
                txt = _text_mlp(layer, txt, attn.o_proj(out[:, :T]))
                img_attn = out[:, T:]
        else:
            # self-attention over image tokens, then cross-attention to this layer's (pre-RoPE) text K/V
            img_attn = _attend(qi, ki, vi, ones_img, hd**-0.5)
            if qt is not None:
                t_out = _attend(qt, kt, vt, text_rows, attn.scaling, _cap(attn, T))
                txt = _text_mlp(layer, txt, attn.o_proj(t_out))
                kt = kt_raw
        tokens = tokens + ga * block.attn_out_norm(block.attn.to_out(img_attn))
        if a.attention == "cross":
            cq = block.cross.q_norm(_heads(block.cross.to_q(tokens), hd))
            tokens = tokens + block.cross.to_out(_attend(cq, kt, vt, img_rows_text, hd**-0.5))
        tokens = tokens + gm * block.mlp_out_norm(block.mlp(modulate(block.norm2(tokens), sm, cm)))
    return dit.unpatchify(dit.proj_out(dit.out_norm(tokens, cond.final)), h, w)


def _cap(attn, T):
    cap = getattr(attn, "attn_logit_softcapping", None)
    return (torch.ones(T, dtype=torch.bool), cap) if cap else None


def _run_text_layer(layer, txt, cos, sin, text_rows):
    attn = layer.self_attn
    hd = attn.head_dim
    tin = layer.input_layernorm(txt)
    q = _rope_text(_heads(attn.q_proj(tin), hd), cos, sin)
    k = _rope_text(_heads(attn.k_proj(tin), hd), cos, sin)
    v = _heads(attn.v_proj(tin), hd)
    out = _attend(q, k, v, text_rows, attn.scaling, _cap(attn, q.shape[2]))
    return _text_mlp(layer, txt, attn.o_proj(out))
