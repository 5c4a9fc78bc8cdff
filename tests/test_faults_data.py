"""Bad samples met mid-run (a shard or cache entry changed after filtering/caching): the trainer
skips and counts each one, and stops with one clear error above `max_bad_sample_rate`."""
from __future__ import annotations

import itertools
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.format import FEATURES_EXT
from fusedit.components.cache.reader import open_features
from fusedit.errors import UserError
from tests.cache_helpers import SHALLOW, make_shards, tiny_recipe
from tests.fault_helpers import Run


def spoil(shard: Path, suffix: str, nth: list[int]) -> list[str]:
    """Overwrite the bytes of the nth members ending in `suffix` in place (the tar stays valid)."""
    with tarfile.open(shard) as t:
        members = [m for m in t.getmembers() if m.name.endswith(suffix)]
    with open(shard, "r+b") as f:
        for i in nth:
            f.seek(members[i].offset_data)
            f.write(b"\xff" * members[i].size)
    return [members[i].name.split(".")[0] for i in nth]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    if (dest / "manifest.json").exists() and "result" in json.loads((dest / "manifest.json").read_text()):
        (dest / "manifest.json").unlink()  # a filter manifest names the original shards by absolute path
    return dest


def _train(tmp: Path, tiny_dir: Path, data: Path, rate: float) -> Run:
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [
        {"name": "base", "steps": 12, "batch_size": 4, "save_every": 12, "log_every": 1, "max_bad_sample_rate": rate,
         "sample_prompts": ["a red square"]}]}}))
    return Run(["train", "--recipe", "tiny", "--stage", "base", "--data", str(data), "--output",
                str(tmp / "out" / "base"), "--params", str(params), "--set", f"model.llm={tiny_dir / 'gemma'}",
                "--set", "model.resolution=16", "--set", "model.max_prompt_length=16"], tmp / "train.log")


def test_trainer_skips_and_counts_a_spoiled_image(tmp_path, tiny_dir, filtered):
    data = _copy(filtered, tmp_path / "data")
    shard = sorted((data / "shards").glob("*.tar"))[0]
    [key] = spoil(shard, ".image.jpg", [5])  # 48 samples, 12 steps of 4: every sample is met once
    run = _train(tmp_path, tiny_dir, data, rate=0.05)
    run.complete()
    metrics = json.loads((tmp_path / "out" / "base" / "metrics.json").read_text())
    assert metrics["bad_samples"] == 1 and metrics["final_loss"] == metrics["final_loss"]  # finite, not NaN
    log = run.tail(100_000)
    assert f"{shard}: sample #5 skipped: " in log and "1 unreadable sample(s) skipped" in log
    assert len((tmp_path / "out" / "base" / "loss.tsv").read_text().splitlines()) == 13  # no step lost
    assert key.startswith("0")


def test_more_bad_samples_than_the_rate_stop_with_one_clear_error(tmp_path, tiny_dir, filtered):
    data = _copy(filtered, tmp_path / "data")
    shard = sorted((data / "shards").glob("*.tar"))[0]
    spoil(shard, ".image.jpg", [1, 2, 3, 4])
    run = _train(tmp_path, tiny_dir, data, rate=0.05)  # 48 x 0.05 = 2.4: the third one stops the stage
    assert run.finish() == 2
    last = run.tail().strip().splitlines()[-1]
    assert last.startswith("error: 3 of 48 samples are unreadable, more than max_bad_sample_rate 0.05; last: ")
    assert str(shard) in last and "Traceback" not in run.tail(100_000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("bad-cache")
    make_shards(root / "in", samples=12, shard_size=4)
    build_cache(str(root / "in"), str(root / "cache"), tiny_recipe(SHALLOW, tiny_dir), progress=False)
    return root / "cache"


def _epoch(feats, steps: int) -> list[str]:
    return [k for b in itertools.islice(feats.batches(0), steps) for k in b.keys]


def test_cached_features_skip_a_corrupt_entry_and_a_cut_shard(tmp_path, tiny_dir, cache):
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    good = _epoch(open_features(recipe, str(cache), batch_size=3, seed=1), 4)
    spoiled = _copy(cache, tmp_path / "c1")
    [key] = spoil(spoiled / "shards" / "shard-000001.tar", FEATURES_EXT, [2])
    feats = open_features(recipe, str(spoiled), batch_size=3, seed=1, max_bad_rate=0.1)
    assert _epoch(feats, 4) == [k for k in good if k != key] and feats.bad.count == 1

    cut = _copy(cache, tmp_path / "c2")  # the last shard loses its end: only its first sample reads back whole
    tar = cut / "shards" / "shard-000002.tar"
    with tarfile.open(tar) as t:
        third = t.getmembers()[4]  # two members a sample: the first member of the third sample
    with open(tar, "r+b") as f:
        f.truncate(third.offset)
    feats = open_features(recipe, str(cut), batch_size=3, seed=1, max_bad_rate=0.25)
    assert len(_epoch(feats, 4)) == 9 and feats.bad.count == 3
    with pytest.raises(UserError, match=r"^3 of 12 samples are unreadable, more than max_bad_sample_rate 0\.2; "
                                        r"last: \S*shard-000002\.tar sample #\d: shard ends without the end-of-ar"):
        _epoch(open_features(recipe, str(cut), batch_size=3, seed=1, max_bad_rate=0.2), 4)
