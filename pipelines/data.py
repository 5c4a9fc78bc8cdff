"""KFP v2 pipelines of the data step: synth -> filter, filter existing shards, compare two filter outputs.

Wiring only: the components are the data step's own (components/data/component.py).
"""
from kfp import compiler, dsl
from kfp.dsl import Dataset

from fusedit.components.data.component import compare_op, filter_op, synth_op


@dsl.pipeline(name="fusedit-data", description="Synthetic shards -> filter, dedupe, reshard, quality report")
def data_pipeline(samples: int = 2000, seed: int = 0, shard_size: int = 500, bad_fraction: float = 0.1,
                  filter_config: str = "", tokenizer: str = ""):
    made = synth_op(samples=samples, seed=seed, shard_size=shard_size, bad_fraction=bad_fraction)
    filter_op(shards=made.outputs["shards"], config_yaml=filter_config, tokenizer=tokenizer)


@dsl.pipeline(name="fusedit-filter", description="Filter existing shards (e.g. s3://bucket/prefix/); optionally "
                                                  "compare the result with a baseline filter output")
def filter_pipeline(source_uri: str, filter_config: str = "", tokenizer: str = "", baseline_uri: str = "",
                    compare_config: str = ""):
    """baseline_uri: a filter output to compare against (e.g. the data the last model was trained on)."""
    source = dsl.importer(artifact_uri=source_uri, artifact_class=Dataset, reimport=False)
    filtered = filter_op(shards=source.output, config_yaml=filter_config, tokenizer=tokenizer)
    with dsl.If(baseline_uri != "", name="baseline-given"):
        baseline = dsl.importer(artifact_uri=baseline_uri, artifact_class=Dataset, reimport=False)
        compare_op(old=baseline.output, new=filtered.outputs["filtered"], config_yaml=compare_config)


@dsl.pipeline(name="fusedit-data-compare", description="Compare two filter outputs; fail on the gate")
def compare_pipeline(old_uri: str, new_uri: str, compare_config: str = "", gate: bool = True):
    old = dsl.importer(artifact_uri=old_uri, artifact_class=Dataset, reimport=False)
    new = dsl.importer(artifact_uri=new_uri, artifact_class=Dataset, reimport=False)
    compare_op(old=old.output, new=new.output, config_yaml=compare_config, gate=gate)


def compile_pipelines(out_dir: str) -> dict[str, str]:
    """Compile the data pipelines to KFP IR YAML files in out_dir; returns name -> path."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, fn in (("data", data_pipeline), ("filter", filter_pipeline), ("compare", compare_pipeline)):
        paths[name] = os.path.join(out_dir, f"{name}_pipeline.yaml")
        compiler.Compiler().compile(fn, paths[name])
    return paths
