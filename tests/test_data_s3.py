"""S3 input and output through moto's real HTTP server on 127.0.0.1 (no in-process patching)."""
from __future__ import annotations

import json
import logging
import socket

import boto3
import pytest
import webdataset as wds
from moto.server import ThreadedMotoServer

from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import synth
from fusedit.components.shared import storage


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
                 "AWS_DEFAULT_REGION": "us-east-1", "FUSEDIT_S3_ENDPOINT": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # this fixture and the tests configure() the storage module: its options and clients restored afterwards
    monkeypatch.setattr(storage, "_options", storage.options())
    monkeypatch.setattr(storage, "_clients", {})
    storage.configure(endpoint_url=None, retries=2, backoff_s=0.01)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"bucket-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket


def test_filter_streams_from_s3_and_publishes_to_s3(s3, tmp_path, monkeypatch):
    client, bucket = s3
    summary = synth(str(tmp_path / "src"), samples=120, seed=9, shard_size=40, bad_fraction=0.15)
    for name in summary["shards"]:
        client.upload_file(str(tmp_path / "src" / name), bucket, f"raw/{name}")
    order = []
    real_upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda p, u: (order.append(u), real_upload(p, u))[1])
    cfg = FilterConfig(input=f"s3://{bucket}/raw/shard-{{000000..000002}}.tar", output=f"s3://{bucket}/clean",
                       workers=2, report=False, work_dir=str(tmp_path / "work"))
    result = filter_shards(cfg)
    assert result.n_in == 120 and result.reasons == summary["expected_rejects"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="clean/")["Contents"]}
    assert {"clean/manifest.json", "clean/metrics.json", "clean/rejects.jsonl", "clean/stats.parquet",
            "clean/shards/shard-000000.tar"} <= keys
    assert order[-1] == f"s3://{bucket}/clean/manifest.json"  # the manifest is published last
    manifest = json.loads(client.get_object(Bucket=bucket, Key="clean/manifest.json")["Body"].read())
    # timing.json (how the run went) is published beside the outputs but is no output the manifest lists
    assert {f"clean/{f}" for f in manifest["files"]} | {"clean/manifest.json", "clean/timing.json"} == keys
    local = tmp_path / "shard.tar"
    client.download_file(bucket, "clean/shards/shard-000000.tar", str(local))
    assert sum(1 for _ in wds.WebDataset(str(local), shardshuffle=False)) == result.n_kept
    # a prefix lists the same shards; a re-run finds the published manifest and reuses it
    assert storage.expand(f"s3://{bucket}/raw/") == [f"s3://{bucket}/raw/{n}" for n in summary["shards"]]
    assert storage.expand(f"s3://{bucket}/raw/*-000001.tar") == [f"s3://{bucket}/raw/shard-000001.tar"]
    again = filter_shards(cfg)
    assert again.reused and again.n_kept == result.n_kept


def test_missing_object_is_one_clear_error_naming_the_uri(s3, tmp_path):
    _, bucket = s3
    with pytest.raises(storage.StorageError, match=rf"s3://{bucket}/raw/absent\.tar: not found"):
        filter_shards(FilterConfig(input=f"s3://{bucket}/raw/absent.tar", output=str(tmp_path / "o")))
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(f"s3://{bucket}/nothing-here")
    assert not storage.exists(f"s3://{bucket}/nothing-here")


def test_unreachable_endpoint_is_retried_then_one_error(s3, tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("FUSEDIT_S3_ENDPOINT", dead)
    storage.configure(retries=3, backoff_s=0.01)
    uri = "s3://some-bucket/shards/shard-0001.tar"
    with caplog.at_level(logging.WARNING, logger="fusedit.components.shared.storage"):
        with pytest.raises(storage.StorageError) as err:
            storage.open_read(uri)
    msg = str(err.value)
    assert msg.startswith(uri) and "after 4 attempt(s)" in msg and "EndpointConnectionError" in msg
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 3
    assert "testing-secret-value" not in msg + caplog.text  # credentials are never logged


def test_storage_api_round_trip(s3):
    _, bucket = s3
    base = f"s3://{bucket}/api"
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"hello")
    with storage.atomic_write(storage.join(base, "b.json")) as f:
        f.write(b'{"ok": true}')
    assert storage.read_bytes(f"{base}/a/x.bin") == b"hello" and storage.read_json(f"{base}/b.json") == {"ok": True}
    assert storage.list_uris(f"{base}/") == [f"{base}/a/x.bin", f"{base}/b.json"]
    assert storage.stat(f"{base}/a/x.bin")["size"] == 5 and storage.exists(f"{base}/b.json")
    with storage.open_read(f"{base}/a/x.bin") as f:
        assert f.read(2) == b"he" and f.read() == b"llo"
    storage.remove(f"{base}/b.json")
    assert storage.list_uris(f"{base}/") == [f"{base}/a/x.bin"]
