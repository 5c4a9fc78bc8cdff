"""S3 round trip through moto's server on 127.0.0.1: shards in, cache out, batches back, resume."""
from __future__ import annotations

import itertools

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.format import read_manifest
from fusedit.components.cache.reader import CachedFeatures, open_features
from fusedit.components.shared import storage
from tests.cache_helpers import SHALLOW, make_shards, same_batch, tiny_recipe


def test_s3_round_trip_equals_local(s3_server, tmp_path, tiny_dir, monkeypatch):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="cache-rt")
    # configure() replaces the module's options and clears its clients: both restored after this test
    monkeypatch.setattr(storage, "_options", storage.options())
    monkeypatch.setattr(storage, "_clients", {})
    storage.configure(retries=1, backoff_s=0.05)
    local_in = make_shards(tmp_path / "in", samples=7, shard_size=3)
    for p in sorted(local_in.glob("*.tar")):
        storage.upload_file(str(p), f"s3://cache-rt/in/{p.name}")
    recipe = tiny_recipe(SHALLOW, tiny_dir)

    remote = build_cache("s3://cache-rt/in/", "s3://cache-rt/cache", recipe, progress=False)
    local = build_cache(str(local_in), str(tmp_path / "cache"), recipe, progress=False)
    assert remote.n_samples == local.n_samples == 7 and remote.n_shards == local.n_shards == 3
    names = sorted(u.rsplit("/cache/", 1)[1] for u in storage.list_uris("s3://cache-rt/cache/"))
    assert names == sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*")
                           if p.is_file())

    feats = open_features(recipe, "s3://cache-rt/cache", batch_size=3, seed=4)
    assert isinstance(feats, CachedFeatures)
    ref = open_features(recipe, str(tmp_path / "cache"), batch_size=3, seed=4)
    for a, b in zip(itertools.islice(feats.batches(2), 3), ref.batches(2), strict=False):
        assert same_batch(a, b)

    # a lost shard marker: the rerun rebuilds just that shard and republishes the manifest last
    storage.remove("s3://cache-rt/cache/shards/shard-000001.json")
    storage.remove("s3://cache-rt/cache/manifest.json")
    assert read_manifest("s3://cache-rt/cache") is None
    again = build_cache("s3://cache-rt/in/", "s3://cache-rt/cache", recipe, progress=False)
    assert again.shards_reused == 2 and read_manifest("s3://cache-rt/cache")["n_samples"] == 7
