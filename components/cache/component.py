"""KFP v2 component definition of the cache step: a task whose body calls `build_cache`.

The body is the same function `fusedit cache build` and the DVC stage run, so a cluster run and
`dvc repro` write the same cache. The pipelines place it on a GPU (pipelines/placement.py); without one
the body still runs on CPU (e.g. under `kfp.local.SubprocessRunner`).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from fusedit.components.shared.image import IMAGE


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
