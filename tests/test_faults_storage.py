"""Storage faults through a fault proxy in front of moto's S3 server: retried to the same bytes, or
one clear error naming the object, with no manifest published for an incomplete output."""
from __future__ import annotations

import boto3
import pytest
import torch

from fusedit.cli import main as cli_main
from fusedit.components.cache.build import build_cache
from fusedit.components.cache.format import read_manifest
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig, S3Config
from fusedit.components.data.synth import synth
from fusedit.components.shared import storage
from fusedit.components.train import checkpoint
from tests.cache_helpers import SHALLOW, make_shards, tiny_recipe
from tests.faultproxy import FaultProxy, Rule

BUCKET = "faults"
RUN_FACTS = "timing.json"  # how the run went: the one output file allowed to differ between runs


def flaky(upstream: str, seed: int) -> FaultProxy:
    """About one request in four fails once: a 500, a dropped connection, a cut answer or a slow one."""
    return FaultProxy(upstream, [Rule("error", p=0.1), Rule("drop", p=0.05), Rule("cut", p=0.05),
                                  Rule("slow", p=0.05, delay_s=0.6)], seed=seed)


@pytest.fixture(scope="module")
def s3(s3_server):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture
def through(s3, monkeypatch):
    """Route this process (and forked filter workers) to an endpoint; options restored afterwards."""
    monkeypatch.setattr(storage, "_options", storage.S3Options())
    monkeypatch.setattr(storage, "_clients", {})

    def use(endpoint: str, **options) -> None:
        monkeypatch.setenv("FUSEDIT_S3_ENDPOINT", endpoint)
        storage.configure(**{"retries": 8, "backoff_s": 0.01, "read_timeout_s": 0.4, **options})

    return use


def objects(prefix: str) -> dict[str, bytes]:
    return {u[len(prefix):]: storage.read_bytes(u) for u in storage.list_uris(prefix)}


def same_output(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        if not name.endswith(RUN_FACTS):
            assert got[name] == want[name], name


def _raw(tmp_path) -> str:
    if not storage.list_uris(f"s3://{BUCKET}/raw/"):
        summary = synth(str(tmp_path / "raw"), samples=64, seed=4, shard_size=16, bad_fraction=0.1,
                        short_side=(32, 48))
        for name in summary["shards"]:
            storage.upload_file(str(tmp_path / "raw" / name), f"s3://{BUCKET}/raw/{name}")
    return f"s3://{BUCKET}/raw/"


def _filter_cfg(tmp_path, work: str, **kw) -> FilterConfig:
    return FilterConfig(input=f"s3://{BUCKET}/raw/", output=f"s3://{BUCKET}/clean", min_side=16, report=False,
                        workers=2, samples_per_shard=10, work_dir=str(tmp_path / work),
                        s3=S3Config(retries=8, backoff_s=0.01), **kw)


def test_filter_through_faults_publishes_the_same_bytes(tmp_path, s3, through):
    through(s3)
    _raw(tmp_path)
    filter_shards(_filter_cfg(tmp_path, "w0"))
    want = objects(f"s3://{BUCKET}/clean/")
    for uri in storage.list_uris(f"s3://{BUCKET}/clean/"):
        storage.remove(uri)
    with flaky(s3, seed=1) as proxy:
        through(proxy.url)
        filter_shards(_filter_cfg(tmp_path, "w1"))
        through(s3)
    same_output(objects(f"s3://{BUCKET}/clean/"), want)
    print(f"filter: {proxy.requests} requests, faults injected {dict(proxy.injected)}")
    assert sum(proxy.injected.values()) >= 5 and len(proxy.injected) >= 3


def test_permanent_failure_is_one_error_naming_the_object_and_no_manifest(tmp_path, s3, through, capsys):
    through(s3)
    _raw(tmp_path)
    filter_shards(_filter_cfg(tmp_path, "w2"))  # a complete output with a manifest...
    bad = f"s3://{BUCKET}/clean/shards/shard-000001.tar"
    cfg = tmp_path / "f.yaml"
    cfg.write_text("min_side: 20\nreport: false\nworkers: 1\nsamples_per_shard: 10\n"
                   f"work_dir: {tmp_path / 'w3'}\ns3: {{retries: 2, backoff_s: 0.01}}\n")
    with FaultProxy(s3, [Rule("error", method="PUT", path=r"/clean/shards/shard-000001\.tar$")]) as proxy:
        through(proxy.url, retries=2)
        with pytest.raises(SystemExit) as exit_:  # ...replaced by another config, whose upload keeps failing
            cli_main(["data", "filter", "--input", f"s3://{BUCKET}/raw/", "--output", f"s3://{BUCKET}/clean",
                      "--config", str(cfg)])
        through(s3)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and proxy.injected["error"] == 3
    assert err[-1].startswith(f"error: {bad}: upload failed after 3 attempt(s): ClientError: ")
    assert "Traceback" not in "\n".join(err)
    assert not storage.exists(f"s3://{BUCKET}/clean/manifest.json")  # the output does not look complete


def test_cache_build_through_faults_equals_a_clean_build_and_fails_whole(tmp_path, tiny_dir, s3, through):
    through(s3)
    shards = make_shards(tmp_path / "in", samples=9, shard_size=3)
    for p in sorted(shards.glob("*.tar")):
        storage.upload_file(str(p), f"s3://{BUCKET}/cache-in/{p.name}")
    recipe, out = tiny_recipe(SHALLOW, tiny_dir), f"s3://{BUCKET}/cache"
    build_cache(f"s3://{BUCKET}/cache-in/", out, recipe, progress=False)
    want = objects(out + "/")
    for uri in storage.list_uris(out + "/"):
        storage.remove(uri)
    with flaky(s3, seed=2) as proxy:
        through(proxy.url)
        build_cache(f"s3://{BUCKET}/cache-in/", out, recipe, progress=False)
        through(s3)
    assert objects(out + "/") == want
    print(f"cache build: {proxy.requests} requests, faults injected {dict(proxy.injected)}")
    assert sum(proxy.injected.values()) >= 3

    storage.remove(f"{out}/manifest.json")
    storage.remove(f"{out}/shards/shard-000002.json")
    with FaultProxy(s3, [Rule("error", method="PUT", path=r"/cache/shards/shard-000002\.tar$")]) as proxy:
        through(proxy.url, retries=1)
        with pytest.raises(storage.StorageError, match=rf"^{out}/shards/shard-000002\.tar: upload failed after 2"):
            build_cache(f"s3://{BUCKET}/cache-in/", out, recipe, progress=False)
        through(s3)
    assert read_manifest(out) is None and not storage.exists(f"{out}/shards/shard-000002.json")


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


def test_checkpoints_through_faults_and_a_save_that_never_lands(s3, through):
    root = f"s3://{BUCKET}/run/checkpoints"
    with flaky(s3, seed=3) as proxy:
        through(proxy.url)
        for step in (1, 2, 3):
            checkpoint.save(root, step, {"model": _state(step)}, {"optimizer": {"step": torch.tensor(step)}},
                            {"step": step}, keep_last=2)
        got = checkpoint.load_latest(root)
    assert got.step == 3 and all(got.tensors["model"][k].equal(v) for k, v in _state(3).items())
    print(f"checkpoints: {proxy.requests} requests, faults injected {dict(proxy.injected)}")
    assert sum(proxy.injected.values()) >= 3

    name = f"{root}/step-00000004/model.safetensors"
    with FaultProxy(s3, [Rule("error", method="PUT", path=r"step-00000004/model\.safetensors$")]) as proxy:
        through(proxy.url, retries=1)
        with pytest.raises(storage.StorageError, match=rf"^{name}: upload failed after 2 attempt"):
            checkpoint.save(root, 4, {"model": _state(4)}, {}, {"step": 4}, keep_last=2)
        through(s3)
    assert not storage.exists(f"{root}/step-00000004/{checkpoint.MARKER}")
    again = checkpoint.load_latest(root)  # the previous commit, checksums verified
    assert again.step == 3 and all(again.tensors["model"][k].equal(v) for k, v in _state(3).items())
