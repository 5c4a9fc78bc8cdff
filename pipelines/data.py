"""KFP v2 components and pipelines for the data step: thin shells over `fusedit.components`.

Each component body imports and calls the same function the CLI and DVC use, so a pipeline run and
`dvc repro` produce the same shards. Bodies are self-contained (KFP ships their source), run on the
project image (`image.IMAGE`, which already has fusedit and kfp installed), and also run unchanged
under `kfp.local.SubprocessRunner(use_venv=False)`.
"""
from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from fusedit.pipelines.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def synth_op(shards: Output[Dataset], samples: int = 2000, seed: int = 0, shard_size: int = 500,
             bad_fraction: float = 0.1):
    """Write the embedded default data set into the `shards` artifact directory."""
    from fusedit.components.data.synth import synth

    summary = synth(shards.path, samples=samples, seed=seed, shard_size=shard_size, bad_fraction=bad_fraction)
    shards.metadata.update({"samples": samples, "seed": seed, "shards": len(summary["shards"]),
                            "expected_kept": summary["expected_kept"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def filter_op(shards: Input[Dataset], filtered: Output[Dataset], metrics: Output[Metrics], report: Output[HTML],
              config_yaml: str = "", tokenizer: str = "", data_version: str = ""):
    """Filter `shards` (a local artifact or an s3:// import) into `filtered`; log metrics; HTML report.

    data_version (DVC rev or shard-manifest hash) is unused by the body: it is part of KFP's cache key, so
    changed data behind the same URI is filtered again instead of answered from the cache.
    """
    import os
    import shutil

    import yaml

    from fusedit.components.data.filter import filter_shards
    from fusedit.components.data.filter_config import FilterConfig

    source = shards.uri if shards.uri.startswith("s3://") else shards.path
    fields = yaml.safe_load(config_yaml) if config_yaml else {}
    fields.update(input=source, output=filtered.path)
    if tokenizer:
        fields["tokenizer"] = tokenizer
    cfg = FilterConfig.model_validate(fields)
    gate, cfg.fail_on_quality = cfg.fail_on_quality, False  # publish metrics and report, then gate
    result = filter_shards(cfg)
    m = result.metrics
    for name in ("n_in", "n_kept", "n_rejected", "reject_rate", "duplicate_rate", "decode_failure_rate",
                 "n_bad_shards"):
        metrics.log_metric(name, float(m[name]))
    metrics.log_metric("images_per_s", float(result.run["images_per_s"]))
    for reason, n in m["reasons"].items():
        metrics.log_metric(f"rejected_{reason}", float(n))
    filtered.metadata.update({"n_kept": result.n_kept, "shards": len(result.shards)})
    page = os.path.join(filtered.path, "report", "index.html")
    if os.path.exists(page):
        shutil.copyfile(page, report.path)
    else:
        with open(report.path, "w") as f:
            f.write("<html><body><p>report disabled (report: false)</p></body></html>")
    if gate and result.quality_success is False:
        raise SystemExit("data quality gate failed: " + "; ".join(result.failed_expectations))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compare_op(old: Input[Dataset], new: Input[Dataset], report: Output[HTML], summary: Output[Markdown],
               differences: Output[Artifact], metrics: Output[Metrics], config_yaml: str = "", gate: bool = True):
    """Compare two filter outputs (`fusedit data compare`): HTML report, Markdown summary, the differences
    as JSON; fails the task when `gate` is set and the configured gate is crossed (after the outputs)."""
    import json
    import shutil
    import tempfile

    import yaml

    from fusedit.components.data.compare import CompareConfig, compare, load_side
    from fusedit.components.data.compare_report import write_compare

    def where(a) -> str:
        return a.uri if a.uri.startswith("s3://") else a.path

    cfg = CompareConfig.model_validate(yaml.safe_load(config_yaml) if config_yaml else {})
    old_side, new_side = load_side(where(old)), load_side(where(new))
    diff = compare(old_side, new_side, cfg)
    files = write_compare(diff, old_side, new_side, tempfile.mkdtemp(prefix="fusedit-compare-"))
    for key, art in (("html", report), ("markdown", summary), ("json", differences)):
        shutil.copyfile(files[key], art.path)
    for name in ("reject_rate", "duplicate_rate", "decode_failure_rate"):
        metrics.log_metric(f"delta_{name}", float(diff["rates"][name]["delta"]))
    metrics.log_metric("shifted_columns", float(sum(s["shifted"] for s in diff["shifts"])))
    metrics.log_metric("gate_violations", float(len(diff["gate"]["violations"])))
    differences.metadata.update({"gate_passed": diff["gate"]["passed"], "old": diff["old"], "new": diff["new"]})
    if gate and not diff["gate"]["passed"]:
        raise SystemExit("data compare gate failed: " + json.dumps(diff["gate"]["violations"]))


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
