"""KFP v2 component definitions of the data step: thin shells over the step's own functions.

Each component body imports and calls the same function the CLI and DVC use, so a pipeline run and
`dvc repro` produce the same shards. Bodies are self-contained (KFP ships their source), run on the
project image (`components/shared/image.py`: `IMAGE`, which already has fusedit and kfp installed), and also
run unchanged under `kfp.local.SubprocessRunner(use_venv=False)`. The pipelines that wire them are
pipelines/data.py and pipelines/workflow.py.
"""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from fusedit.components.shared.image import IMAGE


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
def compare_op(new: Input[Dataset], report: Output[HTML], summary: Output[Markdown], differences: Output[Artifact],
               metrics: Output[Metrics], old: Input[Dataset] = None, old_uri: str = "", config_yaml: str = "",
               gate: bool = True):
    """Compare two filter outputs (`fusedit data compare`): HTML report, Markdown summary, the differences
    as JSON; fails the task when `gate` is set and the configured gate is crossed (after the outputs).

    OLD is the `old` artifact or else `old_uri` (a filter output's path or s3:// prefix); with neither
    (a workflow run without a baseline) the outputs say so and the task passes.
    """
    import json
    import shutil
    import tempfile

    import yaml

    from fusedit.components.data.compare import CompareConfig, compare, load_side
    from fusedit.components.data.compare_report import write_compare, write_no_baseline

    def where(a) -> str:
        return a.uri if a.uri.startswith("s3://") else a.path

    cfg = CompareConfig.model_validate(yaml.safe_load(config_yaml) if config_yaml else {})
    out = tempfile.mkdtemp(prefix="fusedit-compare-")
    if old is None and not old_uri:
        write_no_baseline(out, "old / old_uri")
        for name, art in (("index.html", report), ("compare.md", summary), ("compare.json", differences)):
            shutil.copyfile(f"{out}/{name}", art.path)
        metrics.log_metric("gate_violations", 0.0)
        return
    old_side, new_side = load_side(where(old) if old is not None else old_uri), load_side(where(new))
    diff = compare(old_side, new_side, cfg)
    files = write_compare(diff, old_side, new_side, out)
    for key, art in (("html", report), ("markdown", summary), ("json", differences)):
        shutil.copyfile(files[key], art.path)
    for name in ("reject_rate", "duplicate_rate", "decode_failure_rate"):
        metrics.log_metric(f"delta_{name}", float(diff["rates"][name]["delta"]))
    metrics.log_metric("shifted_columns", float(sum(s["shifted"] for s in diff["shifts"])))
    metrics.log_metric("gate_violations", float(len(diff["gate"]["violations"])))
    differences.metadata.update({"gate_passed": diff["gate"]["passed"], "old": diff["old"], "new": diff["new"]})
    if gate and not diff["gate"]["passed"]:
        raise SystemExit("data compare gate failed: " + json.dumps(diff["gate"]["violations"]))
