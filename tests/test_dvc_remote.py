"""A DVC remote on S3 (dvc-s3, endpoint from the environment): the shard directory is pushed and pulled whole.

moto's S3 server on 127.0.0.1 is the remote. The repository is a fresh git + DVC repo running the project's
own `synth` stage command, so what is pushed is what `dvc repro` tracks: a directory of shards (one `.dir`
manifest plus one object per shard), never a single archive.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import yaml

from tests.warm import cli_env

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_push_to_and_pull_from_an_s3_remote(tmp_path, s3_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = cli_env(HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                  GIT_COMMITTER_EMAIL="t@t")
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["synth"]
    cmd = stage["cmd"].replace("${data.synth.samples}", "24").replace("${data.synth.seed}", "0")
    cmd = cmd.replace("${data.synth.shard_size}", "8").replace("${data.synth.bad_fraction}", "0.1")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"synth": {"cmd": cmd, "outs": stage["outs"]}}}))
    _run(["git", "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "repro", "-q"], repo, env)
    before = _digests(repo / "data" / "synth")
    assert len([k for k in before if k.endswith(".tar")]) == 3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="dvc-remote")
    _run([str(BIN / "dvc"), "remote", "add", "-d", "store", "s3://dvc-remote/fusedit"], repo, env)
    # the endpoint goes to the git-ignored local config, credentials stay in the environment
    _run([str(BIN / "dvc"), "remote", "modify", "--local", "store", "endpointurl", s3_server], repo, env)
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
    assert "testing" not in (repo / ".dvc" / "config").read_text() + (repo / ".dvc" / "config.local").read_text()
    _run([str(BIN / "dvc"), "push", "-q"], repo, env)

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
            .list_objects_v2(Bucket="dvc-remote", Prefix="fusedit/")["Contents"]]
    manifests = [k for k in keys if k.endswith(".dir")]
    assert len(manifests) == 1, keys  # the shard directory is one tracked output
    assert len(keys) == len(before) + 1, (keys, sorted(before))  # + one object per file in it
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["synth"]["outs"][0]
    assert lock["path"] == "data/synth" and lock["nfiles"] == len(before)
    listing = json.loads(boto3.client("s3", endpoint_url=s3_server)
                         .get_object(Bucket="dvc-remote", Key=manifests[0])["Body"].read())
    assert sorted(e["relpath"] for e in listing) == sorted(before)

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([str(BIN / "dvc"), "pull", "-q"], repo, env)
    assert _digests(repo / "data" / "synth") == before
    assert "up to date" in _run([str(BIN / "dvc"), "status"], repo, env).lower()
