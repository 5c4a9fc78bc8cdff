"""The text stream equals the pretrained LLM's own forward (Gemma, Gemma-2, PaliGemma's LM)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from fusedit.errors import UserError
from fusedit.model.config import TextSpec
from fusedit.model.text import TextContext, TextEncoder, load_llm, load_tokenizer

CAPTIONS = ["three green triangles above a yellow circle", "a red square", ""]


def _encoder(path, spec: TextSpec):
    return TextEncoder(load_llm(str(path), spec.llm_num_layers), load_tokenizer(str(path)), spec)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_hidden_states_equal_automodel(tiny_dir, family):
    path = tiny_dir / family
    enc = _encoder(path, TextSpec(kind="hidden", hidden_index=-1, llm_num_layers=4, max_length=32))
    ids, mask = enc.tokenize(CAPTIONS)
    ref = AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        got = enc(ids, mask)
        torch.testing.assert_close(got.states, expected[-1], atol=0, rtol=0)
        mid = _encoder(path, TextSpec(kind="hidden", hidden_index=2, llm_num_layers=4, max_length=32))(ids, mask)
        torch.testing.assert_close(mid.states, expected[2], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_per_layer_kv_equal_the_llms_own_kv_cache(tiny_dir, family):
    """Post-RoPE keys and values of the shared layers are exactly what the LLM caches for itself, when its
    shared layers attend as the reference's do (no Gemma-2 soft-capping there; layer 0, text-only, keeps it)."""
    path = tiny_dir / family
    enc = _encoder(path, TextSpec(kind="kv", layers=[1, 2, 3], llm_num_layers=4, max_length=32))
    ids, mask = enc.tokenize(CAPTIONS)
    ref = AutoModel.from_pretrained(str(path)).eval()
    for i in (1, 2, 3):
        if family == "gemma2":
            assert ref.layers[i].self_attn.attn_logit_softcapping == 50.0
            ref.layers[i].self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        cache = ref(input_ids=ids, attention_mask=mask.long(), use_cache=True).cache
        got = enc(ids, mask)
    assert len(got.kv) == 3
    for j, layer in enumerate([1, 2, 3]):
        torch.testing.assert_close(got.kv[j][0], cache.layers[layer].keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.kv[j][1], cache.layers[layer].values, atol=0, rtol=0)


def test_cross_attention_reads_pre_rope_keys(tiny_dir):
    path = tiny_dir / "gemma"
    spec = TextSpec(kind="kv", layers=[0], llm_num_layers=1, max_length=32, rope_keys=False)
    enc = _encoder(path, spec)
    ids, mask = enc.tokenize(CAPTIONS)
    layer = enc.llm.layers[0]
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.input_layernorm(enc.llm.embed_tokens(ids)))
        got = enc(ids, mask).kv[0][0]
    torch.testing.assert_close(got, k.unflatten(-1, (-1, 16)).transpose(1, 2))


def test_truncation_keeps_only_needed_layers(tiny_dir):
    llm = load_llm(str(tiny_dir / "gemma2"), 2)
    assert len(llm.layers) == 2 and llm.config.num_hidden_layers == 2 and len(llm.config.layer_types) == 2
    assert not any(p.requires_grad for p in llm.parameters())


def test_paligemma_language_model_is_loaded_and_matches(tiny_dir):
    from transformers import PaliGemmaForConditionalGeneration

    path = tiny_dir / "paligemma"
    llm = load_llm(str(path), 4)
    full = PaliGemmaForConditionalGeneration.from_pretrained(str(path)).model.language_model
    assert type(llm).__name__ == "GemmaModel"
    for (n, a), (_, b) in zip(llm.state_dict().items(), full.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_instruction_is_prefixed_and_extends_max_length(tiny_dir):
    path = tiny_dir / "gemma"
    plain = _encoder(path, TextSpec(kind="kv", layers=[0], llm_num_layers=1, max_length=8))
    instr = _encoder(path, TextSpec(kind="kv", layers=[0], llm_num_layers=1, max_length=8, instruction="Imagine: "))
    ids_p, _ = plain.tokenize(["a red square"])
    ids_i, _ = instr.tokenize(["a red square"])
    assert instr.max_length > plain.max_length
    assert ids_i.shape[1] > ids_p.shape[1]
    assert instr.tokenizer.decode(ids_i[0], skip_special_tokens=True) == "Imagine: a red square"


def test_context_cat_pads_and_trim_drops_unused_columns(tiny_dir):
    enc = _encoder(tiny_dir / "gemma", TextSpec(kind="kv", layers=[0, 1], llm_num_layers=2, max_length=32))
    a, b = enc.encode(["a"]), enc.encode(["two red circles to the left of a blue square"])
    both = TextContext.cat([a, b])
    assert both.mask.shape == (2, b.mask.shape[1]) and both.kv[1][0].shape[2] == b.mask.shape[1]
    assert torch.equal(both.select(slice(0, 1)).trim().kv[0][0], a.kv[0][0])


def test_missing_llm_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_llm(str(tmp_path / "nope" / "llm"), 2)


def test_where_swaps_in_the_unconditional_features(tiny_dir):
    enc = _encoder(tiny_dir / "gemma", TextSpec(kind="kv", layers=[0, 1], llm_num_layers=2, max_length=32))
    cond, uncond = enc.encode(CAPTIONS[:2]), enc.encode([""])
    mixed = cond.where(torch.tensor([False, True]), uncond)
    assert torch.equal(mixed.select(slice(0, 1)).trim().kv[1][0], cond.select(slice(0, 1)).trim().kv[1][0])
    assert torch.equal(mixed.select(slice(1, 2)).trim().kv[1][0], uncond.kv[1][0])
    assert mixed.lengths.tolist() == [int(cond.lengths[0]), 1]
