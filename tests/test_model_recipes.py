"""Recipes load, validate with clear errors, and give the reference parameter counts at real shapes."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusedit.errors import UserError
from fusedit.model.config import load_recipe, recipe_names
from fusedit.model.summary import summarize

# trainable DiT parameters, billions (facts file, section 1.7)
REFERENCE_COUNTS = {
    "baselinedit/self-attention": 2.47, "baselinedit/cross-attention": 2.62, "fusedit/baseline": 2.45,
    "fusedit/cross-attention": 2.60, "fusedit/adaln-single": 2.01, "fusedit/addition": 1.99,
    "fusedit/no-temb": 1.98, "fusedit/clip-mod": 2.45, "fusedit/hidden-size-1280": 1.42,
    "fusedit/hidden-size-1536": 1.75, "fusedit/hidden-size-1792": 2.09, "fusedit/layers-14": 1.91,
    "fusedit/layers-10": 1.37, "fusedit/gemma-2": 2.87, "fusedit/large-scale": 2.03,
    # the positional-encoding and LLM-choice ablations keep the baseline's trainable shapes
    "fusedit/1d-rope": 2.45, "fusedit/2d-rope": 2.45, "fusedit/m-rope": 2.45, "fusedit/gemma-it": 2.45,
    "fusedit/gemma-it-instruction": 2.45, "fusedit/paligemma": 2.45,
}


def test_all_reference_recipes_ship():
    assert set(REFERENCE_COUNTS) | {"tiny", "tiny-shallow", "tiny-cross"} == set(recipe_names())


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(name):
    s = summarize(load_recipe(name))
    assert abs(s["trainable"] / 1e9 - REFERENCE_COUNTS[name]) / REFERENCE_COUNTS[name] < 0.01
    assert s["trainable"] == sum(v for k, v in s["by_module"].items() if k.startswith("dit."))


def test_frozen_llm_sizes():
    assert abs(summarize(load_recipe("fusedit/baseline"))["frozen"] / 1e9 - 2.51) < 0.01
    assert abs(summarize(load_recipe("fusedit/large-scale"))["frozen"] / 1e9 - 2.61) < 0.01
    layers10 = summarize(load_recipe("fusedit/layers-10"))
    assert layers10["shared_llm_layers"] == list(range(4, 14))  # LLM layers 14..17 are dropped


def test_variants_differ_only_where_they_say():
    base, large = load_recipe("fusedit/baseline").model, load_recipe("fusedit/large-scale").model
    diff = {k for k in type(base).model_fields if getattr(base, k) != getattr(large, k)}
    assert diff == {"llm", "timestep_conditioning", "pos_embed", "sandwich_norm"}


def test_dotted_overrides_and_yaml_values():
    r = load_recipe("fusedit/baseline", ["model.dit_num_layers=10", "model.instruction='Imagine: '"])
    assert r.model.dit_num_layers == 10 and r.model.instruction == "Imagine: "


@pytest.mark.parametrize("override, field", [
    (["model.pos_embed=5d-rope"], "model.pos_embed"),
    (["model.patch_size=0"], "model.patch_size"),
    (["model.unknown_field=1"], "model.unknown_field"),
    (["model.resolution=500"], "model"),
])
def test_bad_fields_name_the_field(override, field):
    with pytest.raises(ValidationError) as e:
        load_recipe("fusedit/baseline", override)
    assert field in ".".join(str(p) for p in e.value.errors()[0]["loc"]) or field == "model"


def test_invalid_combinations_fail_at_load_time():
    with pytest.raises(ValidationError, match="text_modulation"):
        load_recipe("fusedit/clip-mod", ["model.timestep_conditioning=none"])
    with pytest.raises(ValidationError, match="initial_layers"):
        load_recipe("baselinedit/self-attention", ["model.initial_layers=2"])
    with pytest.raises(UserError, match="dit_num_layers"):
        summarize(load_recipe("fusedit/layers-14", ["model.dit_num_layers=17"]))


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown recipe 'fusedit/nope'"):
        load_recipe("fusedit/nope")
    with pytest.raises(UserError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    cyc = tmp_path / "a.yaml"
    cyc.write_text(f"base: {cyc}\n")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(str(cyc))
