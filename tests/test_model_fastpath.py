"""The fast paths compute what the plain path computes, for every reference configuration at tiny size.

FlexAttention with a BlockMask vs SDPA with a dense key mask (forward: FlexAttention has no CPU backward),
activation checkpointing (outputs and gradients), batched vs separate guidance in the sampler, and
torch.compile of the DiT blocks (2-3 representative configurations: CPU compilation is slow) with no
graph break inside a block.
"""
from __future__ import annotations

import pytest
import torch

from fusedit.errors import UserError
from fusedit.model.flow import RectifiedFlow
from tests.conftest import randomize
from tests.test_model_fusion import CAPTIONS, REFERENCE, build

TOL = {"atol": 2e-5, "rtol": 2e-5}
# one per code path: Gemma-2 + 2D RoPE + sandwich; deep self-attention + AdaLN-Zero + APE; shallow cross.
# Inductor (what the GPU runs) on one, its CPU C++ build is the slow part; AOT autograd's graphs on the others.
COMPILED = [("fusedit/large-scale", "inductor"), ("fusedit/baseline", "aot_eager"),
            ("baselinedit/cross-attention", "aot_eager")]


def _inputs(enc, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = enc.encode(CAPTIONS[:n])
    assert not text.mask.all() and not text.all_valid, "padding must be present for the masks to matter"
    return text, torch.randn(n, 3, 8, 12, generator=g), torch.tensor([10.0, 500.0, 990.0][:n])


def _grads(dit, flow, text, x0, sigmas, noise):
    dit.zero_grad(set_to_none=True)
    loss = flow.loss(dit, x0, text, sigmas, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dit.named_parameters()}


@pytest.mark.parametrize("name", REFERENCE)
def test_fast_paths_match_the_plain_path(name, tiny_dir):
    recipe, dit, enc = build(name, tiny_dir)
    randomize(dit)
    text, x, t = _inputs(enc)

    # FlexAttention over a BlockMask == SDPA over the dense key mask (and the mask is built once per text)
    with torch.no_grad():
        plain = dit(x, t, text)
        dit.use_attention_kernel("flex")
        flex = dit(x, t, text)
        assert type(dit._mask_memo[3]).__name__ == "BlockMask"
        flex_again = dit(x, t, text)
    assert plain.std() > 1e-3
    torch.testing.assert_close(flex, plain, **TOL)
    torch.testing.assert_close(flex_again, flex, atol=0, rtol=0)

    # activation checkpointing: same loss, same gradients (the CPU backward falls back to SDPA)
    flow = RectifiedFlow(recipe.flow)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    batch = (text, x0, flow.sample_sigmas(3, g), torch.randn(x0.shape, generator=g))
    loss, grads = _grads(dit, flow, *batch)
    dit.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt = _grads(dit, flow, *batch)
    dit.disable_gradient_checkpointing()
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert sum(float(gr.abs().sum()) for gr in grads.values()) > 0
    for n, gr in grads.items():
        torch.testing.assert_close(grads_ckpt[n], gr, atol=1e-6, rtol=1e-5, msg=n)

    # batched guidance (one forward over [uncond ; cond]) == two forwards, with either kernel
    cond, uncond = enc.encode(CAPTIONS[:2]), enc.encode(["", ""])
    noise = torch.randn(2, 3, 8, 8, generator=g)
    separate = flow.sample(dit.use_attention_kernel("sdpa"), cond, uncond, noise, steps=2, guidance=6.0,
                           batched=False)
    for kernel in ("sdpa", "flex"):
        batched = flow.sample(dit.use_attention_kernel(kernel), cond, uncond, noise, steps=2, guidance=6.0)
        torch.testing.assert_close(batched, separate, atol=1e-4, rtol=1e-4)  # guidance 6 amplifies rounding


@pytest.mark.parametrize("name,backend", COMPILED)
def test_compiled_blocks_match_eager_without_graph_breaks(name, backend, tiny_dir):
    recipe, dit, enc = build(name, tiny_dir)
    randomize(dit)
    text, x, t = _inputs(enc)
    flow = RectifiedFlow(recipe.flow)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    batch = (text, x0, flow.sample_sigmas(3, g), torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        eager = dit(x, t, text)
    loss, grads = _grads(dit, flow, *batch)

    # the block is one graph, with either key mask: capture its inputs from a real forward, let dynamo explain it
    for kernel in ("sdpa", "flex"):
        seen = {}
        hook = dit.blocks[0].register_forward_pre_hook(lambda m, args, seen=seen: seen.setdefault("args", args))
        with torch.no_grad():
            dit.use_attention_kernel(kernel)(x, t, text)
        hook.remove()
        torch._dynamo.reset()
        with torch.no_grad():  # FlexAttention has no CPU backward
            explained = torch._dynamo.explain(dit.blocks[0])(*seen["args"])
        assert explained.graph_break_count == 0, (kernel, explained.break_reasons)
        assert explained.graph_count == 1
    dit.use_attention_kernel("sdpa")

    for block in dit.blocks:
        block.compile(backend=backend)
    with torch.no_grad():
        compiled = dit(x, t, text)
    loss_c, grads_c = _grads(dit, flow, *batch)
    torch.testing.assert_close(compiled, eager, **TOL)
    torch.testing.assert_close(loss_c, loss, **TOL)
    for n, gr in grads.items():
        torch.testing.assert_close(grads_c[n], gr, atol=1e-5, rtol=1e-4, msg=n)


def test_unknown_attention_kernel_is_refused(tiny_dir):
    _, dit, _ = build("fusedit/baseline", tiny_dir)
    with pytest.raises(UserError, match="attention kernel 'flash3' is not one of sdpa, flex"):
        dit.use_attention_kernel("flash3")
