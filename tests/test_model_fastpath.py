"""The fast paths compute what the plain path computes, for every reference configuration at tiny size.

FlexAttention with a BlockMask vs SDPA with a dense key mask (forward: FlexAttention has no CPU backward),
activation checkpointing (outputs and gradients), batched vs separate guidance in the sampler, and
torch.compile of the DiT blocks (2-3 representative configurations: CPU compilation is slow) with no
graph break inside a block, and FP8 matmuls (exact fallback on CPU; the scaling and operand layouts
checked against an emulation of torch._scaled_mm's contract).
"""
from __future__ import annotations

import pytest
import torch

from fusedit.errors import UserError
from fusedit.model import layers
from fusedit.model.flow import RectifiedFlow
from fusedit.model.layers import E4M3, E5M2, fp8_linears
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
        with torch.no_grad():  # and the whole denoiser, key mask included, is one graph too
            whole = torch._dynamo.explain(dit)(x, t, text)
        assert whole.graph_break_count == 0 and whole.graph_count == 1, (kernel, whole.break_reasons)
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


def _emulated_scaled_mm(a, a_inv, b, b_inv, out_dtype):
    """torch._scaled_mm's contract, checked, then computed in fp32 from the FP8 values."""
    assert a.dtype in (E4M3, E5M2) and b.dtype in (E4M3, E5M2) and not a.dtype == b.dtype == E5M2
    assert a.stride(1) == 1 and b.stride(0) == 1, "a row-major, b column-major"
    assert a.shape[1] == b.shape[0] and all(n % 16 == 0 for n in (*a.shape, b.shape[1]))
    assert a_inv.dtype == b_inv.dtype == torch.float32 and a_inv.numel() == b_inv.numel() == 1
    return ((a.float() @ b.float()) * a_inv * b_inv).to(out_dtype)


def test_fp8_matmuls_fall_back_on_cpu_and_track_fp32_when_emulated(tiny_dir, monkeypatch):
    recipe, dit, enc = build("fusedit/baseline", tiny_dir)
    randomize(dit)
    flow = RectifiedFlow(recipe.flow)
    g = torch.Generator().manual_seed(3)
    text = enc.encode(CAPTIONS)
    x0 = torch.randn(3, 3, 8, 8, generator=g)  # 16 patches x 3 images: FP8-shaped (multiples of 16)
    batch = (text, x0, torch.full((3,), 0.5), torch.randn(x0.shape, generator=g))
    loss, grads = _grads(dit, flow, *batch)
    assert dit.use_fp8_matmuls() == len(dit.blocks) * 7  # q, k, v, out, gate, up, down; not the modulation
    loss_cpu, grads_cpu = _grads(dit, flow, *batch)  # no FP8 hardware: exactly nn.Linear
    torch.testing.assert_close(loss_cpu, loss, atol=0, rtol=0)

    calls = []
    monkeypatch.setattr(layers, "scaled_mm", lambda *a: calls.append(a[0].dtype) or _emulated_scaled_mm(*a))
    dit.use_fp8_matmuls(enabled=True)
    loss8, grads8 = _grads(dit, flow, *batch)
    assert calls.count(E4M3) == len(dit.blocks) * 7 and calls.count(E5M2) == 2 * len(dit.blocks) * 7
    assert abs(float(loss8 - loss)) < 0.05 * float(loss)
    for n in (n for n in grads if n.startswith("blocks.") and grads[n].abs().sum() > 0):
        # e5m2 gradients keep 2 mantissa bits, compounded over 4 blocks: same direction and size, not the digits
        cos = torch.nn.functional.cosine_similarity(grads8[n].flatten(), grads[n].flatten(), dim=0)
        ratio = grads8[n].norm() / grads[n].norm()
        assert cos > 0.9 and 0.8 < ratio < 1.25, (n, float(cos), float(ratio))


def test_one_fp8_linear_matches_fp32_closely(monkeypatch):
    monkeypatch.setattr(layers, "scaled_mm", _emulated_scaled_mm)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128)
    x, g = torch.randn(3, 16, 64, requires_grad=True), torch.randn(3, 16, 128)
    outs = []
    for fp8 in (False, True):
        fp8_linears(lin, enabled=fp8)
        x.grad = lin.weight.grad = lin.bias.grad = None
        y = lin(x)
        y.backward(g)
        outs.append((y.detach(), x.grad, lin.weight.grad, lin.bias.grad))
    for ref, got in zip(*outs, strict=True):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
        assert cos > 0.995 and abs(float(got.norm() / ref.norm()) - 1) < 0.01


def test_stage_activation_checkpointing_reaches_the_trainer(tmp_path, tiny_dir, filtered, monkeypatch):
    """params.yaml's `activation_checkpointing: true` makes the trainer recompute every DiT block."""
    import torch.utils.checkpoint
    import yaml

    from fusedit.components.train.loop import train

    stage = {"name": "ckpt", "steps": 2, "batch_size": 2, "save_every": 2, "log_every": 1,
             "sample_prompts": ["a red square"], "activation_checkpointing": True}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": 7, "stages": [stage]}}))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    deterministic = torch.are_deterministic_algorithms_enabled()  # the CPU trainer turns it on for good
    try:
        result = train("tiny", "ckpt", str(filtered), str(tmp_path / "out"), str(params), device="cpu",
                       overrides=[f"model.llm={tiny_dir / 'gemma'}", "model.resolution=16",
                                  "model.max_prompt_length=16"])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert result.steps == 2 and result.final_loss == result.final_loss  # finished, finite
    blocks = {id(fn.__self__): fn.__self__ for fn in calls}
    assert blocks and all(type(b).__name__ == "DiTBlock" for b in blocks.values())
    assert len(calls) == 2 * len(blocks)  # every block in both steps' forwards, none while sampling
