"""KFP v2 pipeline of the cache step: filtered shards -> feature cache, on one GPU (`nvidia.com/gpu`, limit 1).

Wiring only: the component is the cache step's own (components/cache/component.py). The task is placed like the
workflow's cache task (pipelines/placement.py `place`): on the GPU pool its `node_selector` / `tolerations` run
parameters name (the same defaults as the workflow's), with a RAM-backed /dev/shm.
"""
from kfp import compiler, dsl
from kfp.dsl import Dataset

from fusedit.components.cache.component import cache_op
from fusedit.pipelines.placement import GPU_NODE_SELECTOR, GPU_TOLERATIONS, place


@dsl.pipeline(name="fusedit-cache", description="Filtered shards (e.g. s3://bucket/filtered/shards/) -> feature cache")
def cache_pipeline(filtered_uri: str, recipe: str = "tiny", dtype: str = "bf16", max_bytes: int = 0,
                   batch_size: int = 32, node_selector: dict = GPU_NODE_SELECTOR,  # noqa: B006
                   tolerations: list = GPU_TOLERATIONS):  # noqa: B006
    source = dsl.importer(artifact_uri=filtered_uri, artifact_class=Dataset, reimport=False)
    place(cache_op(filtered=source.output, recipe=recipe, dtype=dtype, max_bytes=max_bytes,
                   batch_size=batch_size), 1, node_selector, tolerations)


def compile_pipeline(out_dir: str) -> str:
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cache_pipeline.yaml")
    compiler.Compiler().compile(cache_pipeline, path)
    return path
