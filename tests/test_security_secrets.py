"""Secrets come only from the environment (or a Kubernetes Secret mapped to it) and never leak into outputs.

One run of the real steps, as subprocesses, with distinctive fake credentials and a fake KFP token in the
environment: synth and filter against moto's S3 server, a tiny training stage writing checkpoints, logs,
metrics and its exported pipeline to S3, an evaluation of that pipeline, a pipeline compile and a submit
to the local KFP API stand-in. Then every byte produced (S3 objects, local files, compiled YAML, the bodies
the KFP server received, stdout and stderr of every step) is searched for the secret values.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import synth
from fusedit.pipelines.workflow import SECRET_KEYS
from tests.test_pipeline_workflow import _KFP
from tests.warm import FUSEDIT

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_ACCESS_KEY_ID": "FDTACCESSKEYQ7ZX9W2M",
    "AWS_SECRET_ACCESS_KEY": "fdt-secret-9f3Kq2LmXv7pR4tWz8sYb1NcDe6Hj0Ua",
    "KFP_TOKEN": "fdt-kfp-token-Rk4sPq8Lw2Vn6Xz1Jm5Tb9Yc3",
}


def _forms(value: str) -> list[bytes]:
    """The secret as raw bytes, base64, hex and JSON-escaped: a leak in any of these counts."""
    raw = value.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode(),
            json.dumps(value).encode()[1:-1], raw[: len(raw) * 2 // 3]]


def find_leaks(blobs: dict[str, bytes]) -> list[str]:
    return [f"{name} contains {key} ({form[:6]!r}...)" for name, data in blobs.items()
            for key, value in SECRETS.items() for form in _forms(value) if form in data]


@pytest.fixture
def secret_env(s3_server, monkeypatch):
    from fusedit.components.shared import storage

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_options", storage.S3Options())  # endpoint from the env (not an older test's)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], env: dict, logs: dict[str, bytes], name: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, env=env, cwd=cwd, timeout=600)
    logs[f"{name}.stdout"], logs[f"{name}.stderr"] = r.stdout, r.stderr
    assert r.returncode == 0, (name, r.stderr.decode(errors="replace")[-3000:])
    return r


def test_secrets_never_reach_outputs(secret_env, s3_server, tiny_dir, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="fusedit-wf")
    logs: dict[str, bytes] = {}
    params = tmp_path / "params.yaml"
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    doc["train"] = {"seed": 1, "stages": [{"name": "base", "steps": 2, "batch_size": 4, "save_every": 1,
                                           "log_every": 1, "sample_prompts": ["a red square"]}]}
    params.write_text(yaml.safe_dump(doc))
    sets = ["--set", f"model.llm={tiny_dir / 'gemma'}", "--set", "model.resolution=16",
            "--set", "model.max_prompt_length=16"]

    synth("s3://fusedit-wf/raw", samples=8, seed=0, shard_size=4, bad_fraction=0.25, short_side=(32, 48))
    (tmp_path / "filter.yaml").write_text("report: false\nworkers: 1\nmin_side: 16\ndedupe_near: false\n")
    _run([FUSEDIT, "data", "filter", "--input", "s3://fusedit-wf/raw/", "--output", "s3://fusedit-wf/filtered",
          "--config", str(tmp_path / "filter.yaml")], secret_env, logs, "filter", tmp_path)
    _run([FUSEDIT, "train", "--recipe", "tiny", "--stage", "base", "--data", "s3://fusedit-wf/filtered",
          "--output", "s3://fusedit-wf/train/base", "--params", str(params), *sets],
         secret_env, logs, "train", tmp_path)
    _run([FUSEDIT, "eval", "run", "--pipeline", "s3://fusedit-wf/train/base/pipeline",
          "--output", str(tmp_path / "eval"),
          "--suite", "synthetic", "--steps", "1", "--synthetic-per-category", "1", "--images-per-prompt", "1",
          "--batch-size", "4", "--limit", "2", "--device", "cpu", "--quiet"], secret_env, logs, "eval", tmp_path)
    _run([FUSEDIT, "pipeline", "compile", "--out", str(tmp_path / "wf.yaml"), "--params", str(params)],
         secret_env, logs, "compile", tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _KFP.seen.clear()
    try:
        _run([FUSEDIT, "pipeline", "submit", "--host", f"http://127.0.0.1:{server.server_port}",
              "--package", str(tmp_path / "wf.yaml"), "--param", "data_version=v1"],
             {**secret_env, "HOME": str(tmp_path)}, logs, "submit", tmp_path)
    finally:
        server.shutdown()

    # the token went where it belongs (the Authorization header), and only there
    assert _KFP.seen and all(s["auth"] == f"Bearer {SECRETS['KFP_TOKEN']}" for s in _KFP.seen)
    sent = {f"kfp-request-{i}": json.dumps(s["body"]).encode() for i, s in enumerate(_KFP.seen) if s["body"]}
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="fusedit-wf"):
        for o in page.get("Contents", []):
            objects[f"s3://fusedit-wf/{o['Key']}"] = s3.get_object(Bucket="fusedit-wf", Key=o["Key"])["Body"].read()
    local = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    kinds = {"checkpoints": "/checkpoints/", "exported pipeline": "/pipeline/", "metrics": "metrics.json",
             "eval report": "/report/", "training log": "loss.tsv", "rejects": "rejects.jsonl"}
    for what, needle in kinds.items():  # the search covers every kind of output named in the issue
        assert any(needle in k for k in [*objects, *local]), f"no {what} produced"
    assert any(k.endswith(".safetensors") for k in objects) and (tmp_path / "wf.yaml").is_file()
    assert len(logs) == 10

    assert find_leaks({"probe": b"x" + base64.b64encode(SECRETS["AWS_SECRET_ACCESS_KEY"].encode())})  # search works
    leaks = find_leaks({**objects, **local, **logs, **sent})
    assert not leaks, leaks


def test_compiled_pipeline_takes_storage_credentials_from_a_secret_by_name(tmp_path):
    """The pipeline YAML names the Secret and its keys; no value is (or can be) compiled in."""
    from fusedit.pipelines.workflow import Options, compile_workflow

    out = compile_workflow(str(tmp_path / "wf.yaml"), Options(secret="team-storage", params=str(ROOT / "params.yaml")))
    spec, platform = yaml.safe_load_all(Path(out).read_text())
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    uses = [e for e in execs.values() if "secretAsEnv" in e]
    assert uses, "no step reads the storage Secret"
    for e in uses:
        (sec,) = e["secretAsEnv"]
        assert sec["secretName"] == "team-storage" and sec.get("optional") is True
        assert {m["secretKey"]: m["envVar"] for m in sec["keyToEnv"]} == {k: k for k in SECRET_KEYS}
    text = Path(out).read_text()
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):  # only as a key name, never with a value
        assert f"{k}=" not in text and f"{k}: " not in text.replace(f"secretKey: {k}", "").replace(
            f"envVar: {k}", "")


@pytest.mark.parametrize("field", ["aws_access_key_id", "aws_secret_access_key", "access_key", "token"])
def test_configs_have_no_place_for_credentials(field):
    """Credentials cannot be put in a config file (which gets logged, hashed and versioned): it is refused."""
    with pytest.raises(ValidationError, match=field):
        FilterConfig.model_validate({"s3": {field: "x"}})
