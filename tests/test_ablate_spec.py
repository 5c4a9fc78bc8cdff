"""Ablation specs: the shipped grids validate, and every mistake is one clear error before anything runs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fusedit.components.ablate.driver import run_record
from fusedit.components.ablate.spec import apply_params, cache_overrides, load_spec, runs
from fusedit.errors import UserError
from fusedit.model.config import load_recipe, recipe_names
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
base: tiny
variants:
  - name: deep
"""


def test_paper_grid_is_the_21_reference_configurations():
    spec = load_spec(ROOT / "ablations" / "paper.yaml", PARAMS)
    refs = {n for n in recipe_names() if n.startswith(("fusedit/", "baselinedit/"))}
    assert len(refs) == 21
    assert {v.recipe or spec.base for v in spec.variants} == refs
    assert spec.reference_variant.name == "baseline" and spec.base == "fusedit/baseline"


def test_toy_grid_runs_are_the_papers_comparisons_on_the_tiny_recipe():
    spec = load_spec(ROOT / "ablations" / "toy.yaml", PARAMS)
    assert len(spec.seeds) >= 3  # the toy comparison reports intervals over seeds
    models = {r.variant: load_recipe(r.recipe, {"model": r.model_overrides}).model for r in runs(spec)}
    assert models["deep"].fusion == "deep" and models["deep"].pos_embed == "ape"
    assert (models["shallow-self"].fusion, models["shallow-self"].attention) == ("shallow", "self")
    assert (models["shallow-cross"].fusion, models["shallow-cross"].attention) == ("shallow", "cross")
    assert models["no-temb"].timestep_conditioning == "none" and models["2d-rope"].pos_embed == "2d-rope"
    # everything but the ablated field is the base recipe's
    for name, field in [("no-temb", "timestep_conditioning"), ("2d-rope", "pos_embed")]:
        a, b = models["deep"].model_dump(), models[name].model_dump()
        assert {k for k in a if a[k] != b[k]} == {field}
    doc = apply_params(yaml.safe_load(PARAMS.read_text()), spec, next(r for r in runs(spec) if r.variant == "no-temb"))
    assert json.loads(doc["model"]["overrides"]) == {"timestep_conditioning": "none"}
    assert json.loads(doc["model"]["cache_overrides"]) == {}  # the text features stay the base recipe's
    assert doc["train"]["stages"][0]["steps"] == spec.stages["base"]["steps"]
    # the paper's findings, each against deep: both shallow baselines align worse, no timestep input costs
    # nothing, 1D+2D RoPE beats the APE
    assert {v.name: v.paper.expect for v in spec.variants if v.paper} == {
        "shallow-self": "lower", "shallow-cross": "lower", "no-temb": "not_worse", "2d-rope": "higher"}
    assert all(v.paper.metric == "synthetic/overall" for v in spec.variants if v.paper)
    rec = run_record(spec, next(r for r in runs(spec) if r.variant == "no-temb"))  # what run.json carries
    assert rec["paper"] == {"expect": "not_worse", "metric": "synthetic/overall", "margin": 0.05,
                            "source": spec.variants[3].paper.source}


def test_only_overrides_that_change_the_text_features_or_frozen_inputs_reach_the_cache():
    assert cache_overrides("tiny", {"pos_embed": "ape", "timestep_conditioning": "none", "qk_norm": False}) == {}
    assert cache_overrides("tiny", {"pos_embed": "ape", "attention": "cross"}) == {"attention": "cross"}
    assert cache_overrides("tiny", {"max_prompt_length": 16, "resolution": 64}) == {"max_prompt_length": 16,
                                                                                    "resolution": 64}


def test_several_seeds_make_one_run_per_variant_and_seed(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE + "  - {name: rope, overrides: {model.pos_embed: 2d-rope}}\nseeds: [1, 2]\n"))
    assert [(r.name, r.seed) for r in runs(spec)] == [("deep-s1", 1), ("deep-s2", 2), ("rope-s1", 1), ("rope-s2", 2)]
    assert runs(spec)[2].set_args == ['model.pos_embed="2d-rope"']


@pytest.mark.parametrize("variants, message", [
    ("  - {name: x, recipe: fusedit/nope}",
     "variant 'x': recipe: unknown recipe 'fusedit/nope'"),
    ("  - {name: x, overrides: {model.no_such_field: 1}}",
     "variant 'x': override 'model.no_such_field': Extra inputs are not permitted"),
    ("  - {name: x, overrides: {model.pos_embed: sideways}}",
     "variant 'x': override 'model.pos_embed': Input should be"),
    ("  - name: x\n    overrides:\n      model.pos_embed: ape\n      model.pos_embed: 1d-rope",
     "variant 'x': override 'model.pos_embed' is set twice ('ape' and '1d-rope'"),
    ("  - name: x\n    overrides: {model.pos_embed: ape, model: {pos_embed: m-rope}}",
     "variant 'x': override 'model.pos_embed' is set twice ('ape' and 'm-rope')"),
    ("  - name: x\n    overrides: [model.pos_embed=ape, model.pos_embed=1d-rope]",
     "variant 'x': override 'model.pos_embed' is set twice ('ape' and '1d-rope')"),
    ("  - {name: x, recipe: tiny-shallow, overrides: {model.fusion: deep}}",
     "variant 'x': override 'model.fusion=deep' contradicts its recipe 'tiny-shallow' (model.fusion: shallow)"),
    ("  - {name: deep, overrides: {model.pos_embed: ape}}",
     "variant 'deep' is named twice"),
    ("  - {name: x, overrides: {flow.shift: 1.0}}",
     "variant 'x': override 'flow.shift': only model.* fields vary"),
    ("  - {name: x, overrides: {model.pos_embed: ape}}",
     "variant 'x': the same model as variant 'deep'"),
    ("  - {name: Bad Name}",
     "variant 'Bad Name' field 'name': String should match pattern"),
    ("  - {name: x, overrides: {model.pos_embed: 2d-rope}, paper: {expect: better}}",
     "variant 'x' field 'paper.expect': Input should be 'higher', 'lower' or 'not_worse'"),
    ("  - {name: x, overrides: {model.pos_embed: 2d-rope}, paper: {expect: not_worse, margin: -0.1}}",
     "variant 'x' field 'paper.margin': Input should be greater than or equal to 0"),
    ("  - {name: x, overrides: {model.pos_embed: 2d-rope}, paper: {expect: higher}}\nreference: x",
     "variant 'x' field 'paper': the reference variant has no claim of its own"),
])
def test_spec_mistakes_are_one_clear_error(tmp_path, variants, message):
    with pytest.raises(UserError) as err:
        load_spec(_spec(tmp_path, BASE + variants + "\n"), PARAMS)
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path / "spec.yaml"))


@pytest.mark.parametrize("extra, message", [
    ("stages: {nope: {steps: 1}}", "stages.nope: no such training stage"),
    ("stages: {base: {steps: 0}}", "stages.base.steps: Input should be greater than 0"),
    ("eval: {suites: [synthetic], stepz: 3}", "eval.stepz: Extra inputs are not permitted"),
    ("data: {synth: {sampels: 3}}", "data.synth.sampels: no such field"),
    ("reference: nobody", "reference 'nobody' is not a variant"),
    ("base: fusedit/nope", "base: unknown recipe 'fusedit/nope'"),
    ("base: tiny-shallow", "'base' is set twice ('tiny' and 'tiny-shallow', line 6)"),
])
def test_shared_settings_are_checked_against_the_params_file(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        text = BASE.replace("base: tiny", extra) if extra == "base: fusedit/nope" else BASE + extra + "\n"
        load_spec(_spec(tmp_path, text), PARAMS)


def test_cli_rejects_a_conflicting_spec_before_running_anything(tmp_path):
    """`fusedit ablate run` exits 2 with the one line, and no experiment is queued (no git repo is even needed)."""
    spec = _spec(tmp_path, BASE + "  - {name: x, recipe: tiny-shallow, overrides: {model.fusion: deep}}\n")
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    r = subprocess.run([warm.FUSEDIT, "ablate", "run", str(spec)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "variant 'x': override 'model.fusion=deep' contradicts" in r.stderr
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "data").exists()
    r = subprocess.run([warm.FUSEDIT, "ablate", "check", str(ROOT / "ablations" / "toy.yaml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("toy-") == 5 * 3  # variants x seeds
