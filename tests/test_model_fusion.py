"""Every reference configuration, in tiny size: cached text K/V == the joint-attention oracle; training works."""
from __future__ import annotations

import pytest
import torch

from fusedit.model.config import FlowConfig, load_recipe, recipe_names, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import PooledTextEncoder, TextEncoder, llm_config_for, load_llm, load_tokenizer
from fusedit.model.transformer import FuseDiTTransformer
from tests.conftest import randomize, tiny_overrides
from tests.oracle import joint_forward

REFERENCE = [n for n in recipe_names() if not n.startswith("tiny")]
# positional encodings the paper never paired with these attentions: image positions start at 0 there
UNPAIRED = [("baselinedit/self-attention", "2d-rope"), ("baselinedit/cross-attention", "1d-rope"),
            ("fusedit/cross-attention", "m-rope")]
CAPTIONS = ["two red circles to the left of a blue square", "a star", ""]


def build(name, tiny_dir, **extra):
    recipe = load_recipe(name, {**tiny_overrides(name, tiny_dir), **extra})
    m = recipe.model
    arch, spec = resolve(m, llm_config_for(m.llm))
    torch.manual_seed(0)
    dit = FuseDiTTransformer(arch.model_dump(), spec.model_dump())
    pooled = PooledTextEncoder.load(m.text_modulation) if m.text_modulation else None
    enc = TextEncoder(load_llm(m.llm, spec.llm_num_layers), load_tokenizer(m.tokenizer or m.llm), spec, pooled)
    return recipe, dit, enc


def test_every_reference_configuration_is_covered():
    assert len(REFERENCE) == 21  # 19 fusedit/* + 2 baselinedit/*


@pytest.mark.parametrize("name,pos", [(n, None) for n in REFERENCE] + UNPAIRED)
def test_cached_equals_joint_attention_oracle(name, pos, tiny_dir):
    _, dit, enc = build(name, tiny_dir, **({"model.pos_embed": pos} if pos else {}))
    randomize(dit)
    ids, mask = enc.tokenize(CAPTIONS)
    assert not mask.all(), "the batch must contain padding for this test to mean something"
    pooled = enc.pooled(CAPTIONS) if enc.pooled is not None else None
    x = torch.randn(len(CAPTIONS), 3, 8, 12)  # non-square: 4 x 6 patches
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        cached = dit(x, t, enc(ids, mask, CAPTIONS))
        oracle = joint_forward(dit, enc.llm, ids, mask, x, t, pooled)
    assert cached.std() > 1e-3
    torch.testing.assert_close(cached, oracle, atol=1e-5 * max(1.0, float(oracle.abs().max())), rtol=1e-5)


@pytest.mark.parametrize("name", REFERENCE)
def test_training_step_updates_only_the_dit(name, tiny_dir):
    recipe, dit, enc = build(name, tiny_dir)
    flow = RectifiedFlow(recipe.flow)
    g = torch.Generator().manual_seed(0)
    text = enc.encode(CAPTIONS)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    loss = flow.loss(dit, x0, text, flow.sample_sigmas(3, g), torch.randn(x0.shape, generator=g))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in dit.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_text_stream_is_independent_of_the_image(tiny_dir):
    _, dit, enc = build("fusedit/2d-rope", tiny_dir)
    randomize(dit)
    text = enc.encode(CAPTIONS)
    before = {k: v.clone() for k, v in text.tensors().items()}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        dit(x, torch.full((3,), 100.0), text)
        dit(torch.randn_like(x), torch.full((3,), 900.0), text)
    again = enc.encode(CAPTIONS).tensors()
    for k, v in before.items():
        assert torch.equal(v, again[k]), k


@pytest.mark.parametrize("name", ["fusedit/large-scale", "baselinedit/cross-attention", "fusedit/cross-attention"])
def test_padding_tokens_change_nothing(name, tiny_dir):
    _, dit, enc = build(name, tiny_dir)
    randomize(dit)
    ids, mask = enc.tokenize(CAPTIONS)
    other = ids.masked_fill(~mask, 7)  # different ids at the pad positions only
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 300.0)
    with torch.no_grad():
        a = dit(x, t, enc(ids, mask, CAPTIONS))
        b = dit(x, t, enc(other, mask, CAPTIONS))
        # and: extra padding columns change nothing either
        c = dit(x, t, enc(ids, mask, CAPTIONS).pad_to(ids.shape[1] + 5))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)  # same math, different reduction length


def test_flow_objective_matches_definition():
    flow = RectifiedFlow(FlowConfig())
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sig = torch.tensor([0.25, 0.75])
    seen = {}

    def model(x_t, t, text):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss = flow.loss(model, x0, None, sig, noise)
    expected_xt = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["x_t"], expected_xt)
    torch.testing.assert_close(seen["t"], sig * 1000)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())
    s = flow.sample_sigmas(20000, torch.Generator().manual_seed(0))
    shifted_median = 3 * 0.5 / (1 + 2 * 0.5)  # logit-normal median 0.5 through the shift-3 map
    assert abs(float(s.median()) - shifted_median) < 0.02 and 0 < float(s.min()) and float(s.max()) <= 1


@pytest.mark.parametrize("name", ["fusedit/baseline", "fusedit/1d-rope", "fusedit/large-scale", "fusedit/m-rope",
                                  "baselinedit/cross-attention", "fusedit/adaln-single", "fusedit/addition"])
def test_forward_keeps_every_tensor_on_the_input_device(name, tiny_dir):
    """Weights and inputs on the meta device, built and run OUTSIDE a `torch.device` context: a tensor the model
    makes on the CPU by default (a GPU-only bug: `torch.zeros(n)` without `device=`) meets meta tensors and
    fails. Under `with torch.device("meta")` such a call would silently be made on meta and pass."""
    from fusedit.model.text import TextContext

    _, dit, enc = build(name, tiny_dir)
    ctx = enc.encode(CAPTIONS)
    device = torch.device("meta")  # not the CPU, on every machine
    dit = dit.to(device)
    assert all(t.device == device for t in [*dit.parameters(), *dit.buffers()])
    text = TextContext(mask=ctx.mask.to(device), kv=tuple((k.to(device), v.to(device)) for k, v in ctx.kv),
                       states=None if ctx.states is None else ctx.states.to(device),
                       pooled=None if ctx.pooled is None else ctx.pooled.to(device))
    assert torch.get_default_device().type == "cpu"  # nothing moves device-less factory calls off the CPU
    out = dit(torch.randn(3, 3, 8, 8, device=device), torch.full((3,), 10.0, device=device), text)
    assert out.device == device and out.shape == (3, 3, 8, 8)
