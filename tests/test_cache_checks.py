"""Feature-identity mismatches are refused by name; bad input fails clearly and leaves no complete-looking cache."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.cli import parse_bytes
from fusedit.components.cache.format import FeatureIdentityMismatch, check_feature_identity, read_manifest
from fusedit.components.cache.reader import open_features
from fusedit.components.shared.tario import TarSink
from fusedit.errors import UserError
from fusedit.model import tiny
from tests.cache_helpers import SHALLOW, cli_sets, make_shards, recipe_overrides, tiny_recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("cache")
    shards = make_shards(root / "in", samples=6, shard_size=3)
    build_cache(str(shards), str(root / "cache"), tiny_recipe(SHALLOW, tiny_dir), progress=False)
    return root


@pytest.mark.parametrize("field, change", [
    ("text.max_length", {"model.max_prompt_length": 16}),
    ("resolution", {"model.resolution": 16}),
    ("text.hidden_index", {"model.text_layer_index": -2}),
])
def test_changed_recipe_is_refused_naming_the_field(built, tiny_dir, field, change):
    recipe = tiny_recipe(SHALLOW, tiny_dir, **change)
    with pytest.raises(FeatureIdentityMismatch, match=f"field '{field}' differs"):
        open_features(recipe, str(built / "cache"), batch_size=2, seed=0)


def test_changed_llm_weights_are_refused_but_a_moved_copy_is_accepted(built, tiny_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dir / "gemma", moved)
    manifest = read_manifest(str(built / "cache"))
    check_feature_identity(manifest, tiny_recipe(SHALLOW, tiny_dir, **{"model.llm": str(moved)}))  # same bytes
    tiny.build_llm(moved, "tiny-gemma", vocab_size=512, seed=1)  # same shapes, other weights
    with pytest.raises(FeatureIdentityMismatch, match="field 'llm_weights' differs"):
        open_features(tiny_recipe(SHALLOW, tiny_dir, **{"model.llm": str(moved)}), str(built / "cache"),
                      batch_size=2, seed=0)
    with pytest.raises(FeatureIdentityMismatch, match="field 'dtype' differs"):
        check_feature_identity(manifest, tiny_recipe(SHALLOW, tiny_dir), dtype="fp32")


def test_rebuild_with_same_inputs_is_reused(built, tiny_dir):
    r = build_cache(str(built / "in"), str(built / "cache"), tiny_recipe(SHALLOW, tiny_dir), progress=False)
    assert r.reused and r.n_samples == 6


def test_empty_input(tmp_path, tiny_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no shards"):
        build_cache(str(tmp_path / "empty"), str(tmp_path / "out"), tiny_recipe(SHALLOW, tiny_dir))
    with open(tmp_path / "empty" / "shard-000000.tar", "wb") as f:
        TarSink(f).close()
    with pytest.raises(UserError, match="holds no samples"):
        build_cache(str(tmp_path / "empty"), str(tmp_path / "out"), tiny_recipe(SHALLOW, tiny_dir))
    assert not (tmp_path / "out").exists()


def test_sample_without_caption(tmp_path, tiny_dir):
    shards = make_shards(tmp_path / "in", samples=6, shard_size=3)
    bad = shards / "shard-000001.tar"
    from fusedit.components.shared.tario import iter_samples

    with open(bad, "rb") as f:
        samples = list(iter_samples(f))
    with open(bad, "wb") as f:
        sink = TarSink(f)
        for i, s in enumerate(samples):
            sink.write(s.key, {k: v for k, v in s.members.items() if i != 1 or k != "synthetic_caption.txt"})
        sink.close()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"shard-000001.tar: sample '{samples[1].key}' .* no caption"):
        build_cache(str(shards), str(out), tiny_recipe(SHALLOW, tiny_dir), progress=False, max_bytes=10**9)
    assert read_manifest(str(out)) is None and not list(out.rglob("*.part"))
    with pytest.raises(UserError, match="no feature cache here"):
        open_features(tiny_recipe(SHALLOW, tiny_dir), str(out), batch_size=2, seed=0, online=False)


def test_missing_llm_path(tmp_path, tiny_dir):
    recipe = tiny_recipe(SHALLOW, tiny_dir, **{"model.llm": str(tmp_path / "nope"), "model.tokenizer": None})
    with pytest.raises(UserError, match="LLM not found"):
        build_cache(str(make_shards(tmp_path / "in", 3, 3)), str(tmp_path / "out"), recipe)
    assert not (tmp_path / "out").exists()


def test_disk_budget_refusal_cli(tmp_path, tiny_dir):
    """Through the CLI: one line with the estimate, exit 2, nothing written."""
    shards = make_shards(tmp_path / "in", samples=3, shard_size=3)
    cmd = [sys.executable, "-m", "fusedit.components.cache.cli", "build", "--input", str(shards),
           "--output", str(tmp_path / "out"), "--recipe", SHALLOW, "--max-bytes", "10K",
           *cli_sets(recipe_overrides(SHALLOW, tiny_dir, vae=False))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "bytes/sample" not in r.stderr and "/sample x 3 samples" in r.stderr
    assert "exceeds --max-bytes 10.0 KB; nothing written" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_parse_bytes():
    assert parse_bytes("2T") == 2 * 10**12 and parse_bytes("1500") == 1500 and parse_bytes("1.5GB") == 15 * 10**8
    with pytest.raises(UserError):
        parse_bytes("lots")
