"""The reference implementation's own outputs: every variant imported from its checkpoint format matches.

Fixtures: tests/fixtures/reference (see its README). Each variant goes through the real importer
(`fusedit model import-reference`) and the real loader (`fusedit.model.load_denoiser`), then the
velocity for the reference's inputs must equal the reference's within 1e-5 (fp32, CPU).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusedit.errors import UserError
from fusedit.model import load_denoiser
from fusedit.model.reference import import_reference

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
VARIANTS = sorted(p.name.removesuffix(".io.safetensors") for p in FIXTURES.glob("*.io.safetensors"))
TOL = 1e-5


def _import(variant: str, out: Path, src: Path | None = None) -> Path:
    llm = FIXTURES / "reference-format" / f"{variant}-llm"
    return import_reference(src or FIXTURES / "reference-format" / variant, out, llm=llm if llm.is_dir() else None)


def _velocity(path: Path, io: dict) -> torch.Tensor:
    text_encoder, transformer = load_denoiser(path)
    with torch.no_grad():
        return transformer(io["latents"], io["timestep"], text_encoder(io["input_ids"], io["attention_mask"]))


def _io(variant: str) -> dict:
    return load_file(str(FIXTURES / f"{variant}.io.safetensors"))


def test_all_ten_reference_variants_are_here():
    assert len(VARIANTS) == 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_checkpoint_reproduces_the_reference_output(variant, tmp_path):
    io = _io(variant)
    assert not io["attention_mask"].all(), "the fixture must contain padding"
    out = _import(variant, tmp_path / "imported")
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "transformer"]
    v = _velocity(out, io)
    assert (v - io["output"]).abs().max() <= TOL
    if "text_hidden_states" in io:  # shallow: the LLM's states the reference fed its DiT
        text = load_denoiser(out)[0](io["input_ids"], io["attention_mask"])
        assert (text.states - io["text_hidden_states"]).abs().max() <= TOL


def _mutated_source(variant: str, root: Path, key_part: str) -> Path:
    """A copy of the reference checkpoint with one element of one tensor moved by 1e-3."""
    src = root / "src"
    shutil.copytree(FIXTURES / "reference-format" / variant, src)
    tensors = load_file(str(src / "model.safetensors"))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("part", ["dit", "llm"])
def test_one_weight_moved_by_1e_3_fails_the_comparison(variant, part, tmp_path):
    """A DiT weight (layer 1's values) and a text-side weight (the bundled LLM's layer-0 keys; for a
    shallow baseline, whose LLM is separate, its DiT's layer-0 keys)."""
    deep = variant.startswith("fusedit")
    key_part = {"dit": "layers.1.self_attn.v_proj.weight", "llm": "layers.0.self_attn.k_proj.weight"}[part]
    key_part = (f"{part}." if deep else "") + key_part
    io = _io(variant)
    out = _import(variant, tmp_path / "imported", _mutated_source(variant, tmp_path, key_part))
    assert (_velocity(out, io) - io["output"]).abs().max() > TOL


def _with_config(variant: str, root: Path, **changes) -> Path:
    src = root / "src"
    shutil.copytree(FIXTURES / "reference-format" / variant, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _with_tensors(variant: str, root: Path, edit) -> Path:
    src = root / "src"
    shutil.copytree(FIXTURES / "reference-format" / variant, src)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("make, needle", [
    (lambda r: _with_config("fusedit-baseline", r, guidance_embeds=True),
     "unknown reference config field 'guidance_embeds'"),
    (lambda r: _with_config("fusedit-baseline", r, shared_attention_layers=[1]), "shared_attention_layers"),
    (lambda r: _with_config("fusedit-baseline", r, dit_num_hidden_layers=3), "dit_num_hidden_layers 3"),
    (lambda r: _with_config("fusedit-baseline", r, model_type="SD3"), "model_type 'SD3'"),
    (lambda r: _with_config("fusedit-baseline", r, sample_size=16), "APE table"),
    (lambda r: _with_tensors("fusedit-baseline", r, lambda t: t.update(extra=torch.zeros(3))), "'extra'"),
    (lambda r: _with_tensors("fusedit-baseline", r, lambda t: t.pop("dit.proj_out.bias")), "'dit.proj_out.bias'"),
    (lambda r: _with_tensors("fusedit-no-temb", r, lambda t: t.pop("llm.norm.weight")), "'llm.norm.weight'"),
    (lambda r: _with_tensors("fusedit-baseline", r, lambda t: t.update(
        {"dit.proj_out.weight": torch.zeros(64, 65)})), "'proj_out.weight' has shape (64, 65)"),
])
def test_bad_checkpoints_are_one_error_naming_the_problem_and_write_nothing(make, needle, tmp_path):
    src = make(tmp_path)
    with pytest.raises(UserError) as err:
        import_reference(src, tmp_path / "out")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


def test_shallow_checkpoint_without_its_llm_is_refused(tmp_path):
    with pytest.raises(UserError, match="--llm"):
        import_reference(FIXTURES / "reference-format" / "baselinedit-self-attention", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _reference_pipeline(root: Path, variant: str) -> Path:
    """A whole pipeline directory as the reference's `save_pretrained` lays it out, around a fixture."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fusedit.model import tiny

    src = root / "ref-pipeline"
    shutil.copytree(FIXTURES / "reference-format" / variant, src / "transformer")
    tiny.build_tokenizer(src / "tokenizer", vocab_size=300)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(str(src / "scheduler"))
    tiny.build_vae(src / "vae")
    (src / "model_index.json").write_text(json.dumps({
        "_class_name": "FuseDiTPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "tokenizer": ["transformers", "GemmaTokenizer"],
        "transformer": ["diffusion.models", "FuseDiT"], "vae": ["diffusers", "AutoencoderKL"]}))
    return src


def test_whole_reference_pipeline_imports_and_generates_through_the_cli(tmp_path):
    import numpy as np
    from PIL import Image

    from tests.test_model_cli import run

    src = _reference_pipeline(tmp_path, "fusedit-large-scale")
    r = run("model", "import-reference", str(src), "--out", str(tmp_path / "dst"))
    assert r.returncode == 0, r.stderr
    dst = tmp_path / "dst"
    assert {"transformer", "text_encoder", "tokenizer", "scheduler", "vae", "model_index.json"} <= {
        p.name for p in dst.iterdir()}
    io = _io("fusedit-large-scale")
    assert (_velocity(dst, io) - io["output"]).abs().max() <= TOL
    r = run("generate", "--pipeline", str(dst), "--prompt", "a red square", "--steps", "2", "--seed", "1",
            "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (512, 512, 3)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    from tests.test_model_cli import run

    r = run("model", "import-reference", str(FIXTURES / "reference-format" / "baselinedit-cross-attention"),
            "--out", str(tmp_path / "dst"))
    assert r.returncode == 2 and "--llm" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "dst").exists()


def test_sharded_checkpoint_imports_like_the_single_file(tmp_path):
    """`model.safetensors.index.json` + shards, as save_pretrained writes a large checkpoint."""
    src = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "reference-format" / "fusedit-2d-rope", src)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    io = _io("fusedit-2d-rope")
    assert (_velocity(import_reference(src, tmp_path / "out"), io) - io["output"]).abs().max() <= TOL


def test_pickled_weights_are_refused(tmp_path):
    src = tmp_path / "pickled"
    shutil.copytree(FIXTURES / "reference-format" / "fusedit-baseline", src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        import_reference(src, tmp_path / "out")


def test_text_hidden_states_index_zero_is_kept():
    """Index 0 (the embeddings) is a value, not a missing field."""
    from fusedit.model.reference import model_config

    cfg = json.loads((FIXTURES / "reference-format" / "baselinedit-self-attention" / "config.json").read_text())
    assert model_config({**cfg, "text_hidden_states_index": 0}, "x")[0].text_layer_index == 0
    assert model_config(cfg, "x")[0].text_layer_index == -1
