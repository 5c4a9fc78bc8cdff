"""A stage's exported pipeline reuses the modules its trainer holds (the trained LLM, its tokenizer, the online
path's VAE) instead of loading them again, and stays what it was: loadable with `FuseDiTPipeline.from_pretrained`
and sampling exactly what the recipe's parts with the stage's EMA and LLM weights sample."""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusedit.components.train import checkpoint, export
from fusedit.components.train.loop import train
from fusedit.model.pipeline import FuseDiTPipeline
from tests.cache_helpers import DEEP, make_shards, tiny_recipe

# what loads a part from disk (`FuseDiTPipeline.from_recipe`, the one constructor, calls these for a part not held)
LOADERS = ("fusedit.model.text.TextEncoder.load", "fusedit.model.text.load_llm", "fusedit.model.text.load_tokenizer",
           "diffusers.AutoencoderKL.from_pretrained")


def _params(tmp_path, **stage) -> str:
    p = tmp_path / "params.yaml"
    base = {"name": "joint", "steps": 2, "batch_size": 2, "save_every": 2, "ema_every": 1, "log_every": 1,
            "sample_every": 1, "sample_prompts": ["a red square"], "compile": "none", **stage}
    p.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [base]}}))
    return str(p)


@pytest.fixture
def no_second_load(monkeypatch):
    """Every loader of an LLM, tokenizer or VAE raises while the export assembles its pipeline;
    yields how many pipelines were assembled."""
    real, built = export.assemble, []

    def assemble(rec, held):
        with contextlib.ExitStack() as stack:
            for target in LOADERS:
                stack.enter_context(mock.patch(target, side_effect=AssertionError(f"export loaded {target}")))
            built.append(real(rec, held))
        return built[-1]

    monkeypatch.setattr(export, "assemble", assemble)
    return built


def test_joint_stage_export_reuses_the_trainers_llm_tokenizer_and_vae(tmp_path, tiny_dir, no_second_load):
    recipe = tiny_recipe(DEEP, tiny_dir, vae=True)
    shards = make_shards(tmp_path / "in", samples=4, shard_size=4)
    out = tmp_path / "joint"
    train(recipe, "joint", str(shards), str(out), _params(tmp_path, trains="dit+llm", llm_lr=1e-3))
    assert len(no_second_load) == 1  # the step-1 grid and the export share one pipeline

    last = checkpoint.load_latest(str(out / "checkpoints"))
    saved = load_file(str(out / "pipeline" / "text_encoder" / "model.safetensors"))
    assert saved.keys() == last.tensors["llm"].keys()
    assert all(torch.equal(saved[k], v) for k, v in last.tensors["llm"].items())  # the trained LLM, as trained

    ref = FuseDiTPipeline.from_recipe(recipe)  # the parts loaded from the recipe, the stage's weights put in
    ref.transformer.load_state_dict(last.tensors["ema"])
    ref.text_encoder.load_state_dict(last.tensors["llm"], strict=False)
    loaded = FuseDiTPipeline.from_pretrained(str(out / "pipeline"))

    def sample(pipe):
        return pipe(["a red square", "two blue circles"], num_inference_steps=2, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    assert torch.equal(sample(loaded), sample(ref))


def test_a_cached_text_stage_export_loads_the_recipes_parts_once(tmp_path, tiny_dir):
    """A cached-text stage holds no LLM and no VAE: its export loads them, once for every grid and the export."""
    from fusedit.components.cache.build import build_cache

    recipe = tiny_recipe(DEEP, tiny_dir, vae=True)
    build_cache(str(make_shards(tmp_path / "in", samples=4, shard_size=4)), str(tmp_path / "cache"), recipe,
                dtype="fp32", progress=False)
    calls, real = [], export.assemble
    with mock.patch.object(export, "assemble", side_effect=lambda rec, held: calls.append(dict(held)) or
                           real(rec, held)):
        train(recipe, "joint", str(tmp_path / "cache"), str(tmp_path / "base"), _params(tmp_path))
    assert calls == [{}]
    assert FuseDiTPipeline.from_pretrained(str(tmp_path / "base" / "pipeline")).vae is not None
