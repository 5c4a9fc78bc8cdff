"""Resumable build (SIGKILL mid-way) and a deterministic, rank-disjoint, resumable batch sequence."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from fusedit.components.cache import reader as features_mod
from fusedit.components.cache.build import build_cache
from fusedit.components.cache.format import read_manifest
from fusedit.components.cache.reader import open_features
from tests.cache_helpers import DEEP, SHALLOW, cli_sets, make_shards, recipe_overrides, same_batch, tiny_recipe, tree


def test_sigkill_mid_build_then_rerun_equals_uninterrupted(tmp_path, tiny_dir):
    shards = make_shards(tmp_path / "in", samples=20, shard_size=2)
    recipe = tiny_recipe(DEEP, tiny_dir, vae=True)
    build_cache(str(shards), str(tmp_path / "reference"), recipe, batch_size=1, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-u", "-m", "fusedit.components.cache.cli", "build", "--input", str(shards),
           "--output", str(out), "--recipe", DEEP, "--batch-size", "1",
           *cli_sets(recipe_overrides(DEEP, tiny_dir, vae=True))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if "cache: shard 2/" in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = list((out / "shards").glob("*.json"))
    assert read_manifest(str(out)) is None and 2 <= len(done) < 10  # killed mid-way, looks incomplete

    r = build_cache(str(shards), str(out), recipe, batch_size=1, progress=False)
    assert r.shards_reused == len(done) and r.n_samples == 20
    assert tree(out) == tree(tmp_path / "reference")  # byte for byte, nothing missing or duplicated


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("resume")
    make_shards(root / "in", samples=14, shard_size=5)  # shards of 5, 5, 4
    build_cache(str(root / "in"), str(root / "cache"), tiny_recipe(SHALLOW, tiny_dir), progress=False)
    return root


def _keys(feats, steps, start=0):
    return [b.keys for b in itertools.islice(feats.batches(start), steps)]


def test_batches_resume_exactly_without_decoding_skipped(cache, tiny_dir, monkeypatch):
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    feats = open_features(recipe, str(cache / "cache"), batch_size=3, seed=7)
    full = list(itertools.islice(feats.batches(0), 12))  # 36 samples: crosses two epoch boundaries
    loads = Counter()
    real = features_mod.read_samples
    monkeypatch.setattr(features_mod, "read_samples", lambda uri, *a: (loads.update([uri]), real(uri, *a))[1])
    again = open_features(recipe, str(cache / "cache"), batch_size=3, seed=7)
    resumed = list(itertools.islice(again.batches(9), 3))
    assert all(same_batch(a, b) for a, b in zip(full[9:], resumed, strict=True))
    assert sum(loads.values()) <= 4  # only the shards steps 9..11 touch, each read once per visit
    assert _keys(open_features(recipe, str(cache / "cache"), batch_size=3, seed=8), 12) != [b.keys for b in full]


def test_epochs_visit_every_sample_once_in_a_new_order(cache, tiny_dir):
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    keys = sum(_keys(open_features(recipe, str(cache / "cache"), batch_size=7, seed=1), 4), [])
    first, second = keys[:14], keys[14:]
    assert sorted(first) == sorted(second) == sorted(set(first)) and len(first) == 14
    assert first != second


def test_rank_slices_are_disjoint_and_tile_the_global_batch(cache, tiny_dir):
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    world = 2
    ranks = [_keys(open_features(recipe, str(cache / "cache"), batch_size=2, seed=3, rank=r, world=world), 7)
             for r in range(world)]
    single = _keys(open_features(recipe, str(cache / "cache"), batch_size=2 * world, seed=3), 7)
    for step in range(7):
        assert ranks[0][step] + ranks[1][step] == single[step]
        if step != 3:  # global batch 3 (positions 12..15) straddles the epoch boundary at 14
            assert not set(ranks[0][step]) & set(ranks[1][step])
    stream = sum(single, [])  # 28 positions = exactly two epochs
    assert len(set(stream[:14])) == len(set(stream[14:])) == 14


def test_online_path_follows_the_same_order(cache, tiny_dir):
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    online = open_features(recipe, str(cache / "in"), batch_size=4, seed=2, rank=1, world=2)
    cached = open_features(recipe, str(cache / "cache"), batch_size=4, seed=2, rank=1, world=2)
    for o, c in zip(online.batches(5), itertools.islice(cached.batches(5), 2), strict=False):
        assert o.keys == c.keys and o.captions == c.captions and o.mean.equal(c.mean)
