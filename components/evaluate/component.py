"""KFP v2 component definition of the evaluation step: a task whose body calls `evaluate`.

The body is the function `fusedit eval run` and the DVC stage call; it logs every number as a KFP
Metric and publishes the report as HTML and Markdown artifacts. The pipelines place it on a GPU
(pipelines/placement.py); without one the body still runs on CPU (e.g. under `kfp.local.SubprocessRunner`).
"""
from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from fusedit.components.shared.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(pipeline: Input[Model], metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown],
                config_yaml: str = "", suites: list = ["synthetic"], output_uri: str = "",  # noqa: B006
                geneval_metadata: str = "", dpg_prompts: str = "", fid_real: str = "", fid_weights: str = "",
                fid_prompts: str = "", clip_model: str = ""):
    """Evaluate an exported pipeline (local artifact, s3:// import or train_op Model); log metrics, HTML, Markdown.

    A train_op Model names its exported pipeline in metadata["pipeline"] (the artifact is the stage directory).
    The suites' inputs (pipelines/eval_inputs.py), when not empty, win over the same fields of config_yaml.
    """
    import base64
    import os
    import re
    import tempfile

    import yaml

    from fusedit.components.evaluate.config import EvalConfig
    from fusedit.components.evaluate.pod_inputs import pod_fields
    from fusedit.components.evaluate.run import evaluate
    from fusedit.components.shared import storage

    source = pipeline.metadata.get("pipeline") or (pipeline.uri if pipeline.uri.startswith("s3://") else pipeline.path)
    run_dir = tempfile.mkdtemp(prefix="fusedit-eval-")
    inputs = {"geneval_metadata": geneval_metadata, "dpg_prompts": dpg_prompts, "fid_real": fid_real,
              "fid_weights": fid_weights, "fid_prompts": fid_prompts, "clip_model": clip_model}
    fields = pod_fields(yaml.safe_load(config_yaml) if config_yaml else {}, inputs, tempfile.mkdtemp())
    fields.update(pipeline=source, output=run_dir, suites=list(suites), progress=False)
    res = evaluate(EvalConfig.model_validate(fields))
    for suite, values in res.metrics.items():
        for name, value in values.items():
            metrics.log_metric(f"{suite}/{name}", float(value))
    page = open(res.report).read()

    def inline(m):  # one self-contained HTML file: embed the sample grids
        with open(os.path.join(os.path.dirname(res.report), m.group(1)), "rb") as f:
            return "src='data:image/png;base64," + base64.b64encode(f.read()).decode() + "'"

    with open(report.path, "w") as f:
        f.write(re.sub(r"src='([^']+\.png)'", inline, page))
    with open(summary.path, "w") as f:
        f.write(open(os.path.join(os.path.dirname(res.report), "report.md")).read())
    if output_uri:  # keep the whole run (samples in the official layouts) for the official scorers
        storage.publish(run_dir, output_uri, manifest_name="metrics.json", manifest=res.metrics)
