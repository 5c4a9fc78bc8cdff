"""The KFP cache step asks for a GPU and its body builds the same cache as the CLI (run with kfp.local)."""
from __future__ import annotations

import json

import yaml

from fusedit.components.cache.component import cache_op
from fusedit.components.cache.format import read_manifest
from fusedit.pipelines.cache import compile_pipeline
from fusedit.pipelines.placement import GPU
from tests.cache_helpers import SHALLOW, make_shards, recipe_overrides


def test_compiled_pipeline_requests_a_gpu(tmp_path):
    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path)))))  # then its Kubernetes placement
    resources = [e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values()
                 if "container" in e]
    assert any(r.get("accelerator", {}).get("resourceType") == GPU and r["accelerator"]["resourceCount"] == "1"
               for r in resources)


def test_component_body_builds_the_cache_locally(tmp_path, tiny_dir):
    from kfp import dsl, local

    shards = make_shards(tmp_path / "in", samples=4, shard_size=2)
    sets = [f"{k}={json.dumps(v)}" for k, v in recipe_overrides(SHALLOW, tiny_dir, vae=False).items()]

    @dsl.pipeline
    def run():
        src = dsl.importer(artifact_uri=str(shards), artifact_class=dsl.Dataset)
        cache_op(filtered=src.output, recipe=SHALLOW, overrides=sets, dtype="fp32")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    run()
    manifests = [p.parent for p in (tmp_path / "root").rglob("manifest.json")]
    assert len(manifests) == 1 and read_manifest(str(manifests[0]))["n_samples"] == 4
