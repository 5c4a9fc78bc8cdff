"""KFP v2 component and pipeline for the cache step: a GPU task whose body calls `build_cache`.

The body is the same function `fusedit cache build` and the DVC stage run, so a cluster run and
`dvc repro` write the same cache. The GPU request is set on the task (`nvidia.com/gpu`, limit 1);
without one the body still runs on CPU (e.g. under `kfp.local.SubprocessRunner`).
"""
from kfp import compiler, dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from fusedit.pipelines.image import IMAGE

GPU = "nvidia.com/gpu"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def cache_op(filtered: Input[Dataset], cache: Output[Dataset], metrics: Output[Metrics], recipe: str = "tiny",
             overrides: list = [], dtype: str = "bf16", max_bytes: int = 0, batch_size: int = 32,  # noqa: B006
             data_version: str = ""):
    """Cache text features and VAE posteriors of `filtered` (a local artifact or an s3:// import).

    data_version only enters KFP's cache key (see `filter_op`).
    """
    from fusedit.components.cache.build import build_cache

    source = filtered.uri if filtered.uri.startswith("s3://") else filtered.path
    target = cache.uri if cache.uri.startswith("s3://") else cache.path
    r = build_cache(source, target, recipe, list(overrides), dtype=dtype, max_bytes=max_bytes or None,
                    batch_size=batch_size)
    for name in ("n_samples", "n_shards", "bytes", "bytes_per_sample", "samples_per_s"):
        metrics.log_metric(name, float(getattr(r, name)))
    cache.metadata.update({"recipe": recipe, "dtype": dtype, "n_samples": r.n_samples})


def gpu_task(task: dsl.PipelineTask, count: int = 1) -> dsl.PipelineTask:
    return task.set_accelerator_type(GPU).set_accelerator_limit(count)


@dsl.pipeline(name="fusedit-cache", description="Filtered shards (e.g. s3://bucket/filtered/shards/) -> feature cache")
def cache_pipeline(filtered_uri: str, recipe: str = "tiny", dtype: str = "bf16", max_bytes: int = 0,
                   batch_size: int = 32):
    source = dsl.importer(artifact_uri=filtered_uri, artifact_class=Dataset, reimport=False)
    gpu_task(cache_op(filtered=source.output, recipe=recipe, dtype=dtype, max_bytes=max_bytes,
                      batch_size=batch_size))


def compile_pipeline(out_dir: str) -> str:
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cache_pipeline.yaml")
    compiler.Compiler().compile(cache_pipeline, path)
    return path
