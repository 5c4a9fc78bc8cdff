"""Sample counts come from the filter's manifest (no shard is streamed to count it), with counting as the
fallback; the cache's size estimate reads no shard either."""
from __future__ import annotations

import json
import re

import pytest

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.reader import open_features
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig, QualityThresholds
from fusedit.components.data.synth import synth
from fusedit.components.shared import shards as shards_mod
from fusedit.components.shared import storage
from fusedit.components.shared.shards import count_samples, input_shards, shard_counts
from fusedit.errors import UserError
from tests.cache_helpers import SHALLOW, tiny_recipe


@pytest.fixture(scope="module")
def filtered_src(tmp_path_factory):
    """Clean synthetic input: 14 samples in two shards."""
    root = tmp_path_factory.mktemp("counts")
    synth(str(root / "synth"), samples=14, seed=2, shard_size=7, bad_fraction=0.0, short_side=(32, 48))
    return root


@pytest.fixture
def filtered(filtered_src, tmp_path):
    """A real small filter output of its own (tests edit its manifest): the 14 samples resharded 5 + 5 + 4."""
    out = tmp_path / "filtered"
    filter_shards(FilterConfig(input=str(filtered_src / "synth"), output=str(out), min_side=16, workers=1,
                               samples_per_shard=5, report=False, dedupe_near=False,
                               quality=QualityThresholds(max_duplicate_rate=1.0)))
    return out


def _edit_manifest(out, edit) -> None:
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.fixture
def no_counting(monkeypatch):
    def refuse(uri):
        raise AssertionError(f"counted {uri} although the manifest has its count")

    monkeypatch.setattr(shards_mod, "count_samples", refuse)


@pytest.fixture
def counted(monkeypatch):
    """The shards `shard_counts` counted itself (the fallback), in order."""
    seen: list[str] = []

    def spy(uri):
        seen.append(uri)
        return count_samples(uri)

    monkeypatch.setattr(shards_mod, "count_samples", spy)
    return seen


def test_filter_manifest_records_each_output_shards_count(filtered):
    manifest = json.loads((filtered / "manifest.json").read_text())
    uris = input_shards(str(filtered))
    assert manifest["counts"] == {f"shards/{u.rsplit('/', 1)[1]}": count_samples(u) for u in uris}
    assert list(manifest["counts"].values()) == [5, 5, 4]
    assert set(manifest["counts"]) <= set(manifest["files"])


def test_counts_come_from_the_manifest(filtered, no_counting):
    uris = input_shards(str(filtered))
    assert shard_counts(uris) == [5, 5, 4]
    assert shard_counts([str(filtered / "shards" / "shard-000001.tar")]) == [5]  # shards/ given directly


def test_cache_and_reader_use_the_manifest_counts(filtered, tiny_dir, tmp_path, no_counting):
    """A tampered count is what both the cache's size projection and the online reader see."""
    _edit_manifest(filtered, lambda m: m["counts"].update({"shards/shard-000000.tar": 50}))
    recipe = tiny_recipe(SHALLOW, tiny_dir)
    feats = open_features(recipe, str(filtered), batch_size=2, seed=0, online=True)
    assert feats.bad.total == 59
    lines: list[str] = []
    with pytest.raises(UserError, match=r"/sample x 59 samples\) exceeds --max-bytes"):
        build_cache(str(filtered / "shards"), str(tmp_path / "cache"), recipe, max_bytes=1, echo=lines.append,
                    progress=False)
    assert "x 59 samples" in lines[0] and not (tmp_path / "cache").exists()


def test_without_a_manifest_or_its_count_shards_are_counted(filtered, filtered_src, counted):
    synth_uris = input_shards(str(filtered_src / "synth"))  # no manifest: every shard counted
    assert shard_counts(synth_uris) == [7, 7] and counted == synth_uris
    uris = input_shards(str(filtered))
    counted.clear()
    _edit_manifest(filtered, lambda m: m["counts"].pop("shards/shard-000002.tar"))  # not covered: counted
    assert shard_counts(uris) == [5, 5, 4] and counted == uris[2:]
    counted.clear()
    _edit_manifest(filtered, lambda m: m.pop("counts"))  # written before manifests had counts
    assert shard_counts(uris) == [5, 5, 4] and counted == uris
    counted.clear()
    (filtered / "manifest.json").unlink()
    assert shard_counts(uris) == [5, 5, 4] and counted == uris


def test_counts_from_a_manifest_on_s3(filtered, s3_server, monkeypatch, no_counting):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="counts")
    monkeypatch.setattr(storage, "_options", storage.options())
    monkeypatch.setattr(storage, "_clients", {})
    storage.configure(retries=1, backoff_s=0.05)
    _edit_manifest(filtered, lambda m: m["counts"].update({"shards/shard-000001.tar": 7}))
    for p in sorted(filtered.rglob("*")):
        if p.is_file():
            storage.upload_file(str(p), f"s3://counts/out/{p.relative_to(filtered).as_posix()}")
            storage.upload_file(str(p), f"s3://counts/{p.relative_to(filtered).as_posix()}")  # at the bucket root
    for root in ("s3://counts/out", "s3://counts"):
        assert shard_counts([f"{root}/shards/shard-00000{i}.tar" for i in range(3)]) == [5, 7, 4]


def test_size_estimate_reads_no_shard(filtered, tiny_dir, tmp_path, monkeypatch, no_counting):
    """The projection before any work comes from the recipe's shapes and the manifest's counts alone."""
    import fusedit.components.cache.build as build

    def refuse(*a, **k):
        raise AssertionError("a shard was read for the size estimate")

    monkeypatch.setattr(build, "read_samples", refuse)
    monkeypatch.setattr(shards_mod, "read_samples", refuse)
    with pytest.raises(UserError, match=r"x 14 samples\) exceeds --max-bytes .*; nothing written"):
        build_cache(str(filtered), str(tmp_path / "cache"), tiny_recipe(SHALLOW, tiny_dir), max_bytes=1,
                    progress=False, echo=lambda line: None)
    assert not (tmp_path / "cache").exists()


def test_size_estimate_bounds_the_built_cache(filtered, tiny_dir, tmp_path):
    """Text at the longest the encoder keeps: the estimate is at least what the cache really takes."""
    lines: list[str] = []
    r = build_cache(str(filtered), str(tmp_path / "cache"), tiny_recipe(SHALLOW, tiny_dir), progress=False,
                    echo=lines.append)
    assert r.n_samples == 14 and r.estimated_bytes_per_sample >= r.bytes_per_sample
    assert re.search(r"at most .*/sample .* x 14 samples = projected", lines[0])
