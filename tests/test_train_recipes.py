"""Every shipped recipe, at tiny size, trains from the shards (text features online) and from the cache.

Both paths must give the same loss curve: the cache holds exactly the features the online path computes.
The text-modulation recipe (fusedit/clip-mod) used to crash online: the trainer built its text encoder
without the pooled CLIP encoder.
"""
from __future__ import annotations

import pytest
import yaml

from fusedit.components.cache.build import build_cache
from fusedit.components.train.loop import train
from fusedit.model.config import recipe_names
from tests.cache_helpers import make_shards, tiny_recipe

RECIPES = [n for n in recipe_names() if not n.startswith("tiny")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("recipes") / "shards", samples=8, shard_size=4)


def _losses(out) -> list[float]:
    return [float(ln.split("\t")[1]) for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_online_and_from_the_cache_alike(name, tiny_dir, shards, tmp_path):
    recipe = tiny_recipe(name, tiny_dir)
    params = tmp_path / "params.yaml"
    stage = {"name": "base", "steps": 2, "batch_size": 4, "save_every": 2, "ema_every": 1, "log_every": 1,
             "sample_prompts": ["a red square"]}
    params.write_text(yaml.safe_dump({"train": {"seed": 5, "stages": [stage]}}))
    train(recipe, "base", str(shards), str(tmp_path / "online"), str(params))
    build_cache(str(shards), str(tmp_path / "cache"), recipe, dtype="fp32", progress=False)
    train(recipe, "base", str(tmp_path / "cache"), str(tmp_path / "cached"), str(params))
    a, b = _losses(tmp_path / "online"), _losses(tmp_path / "cached")
    assert len(a) == 2 and all(x > 0 for x in a)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
