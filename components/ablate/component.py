"""KFP v2 component definitions of the ablate step: a run's paths, a run's results, the comparison report.

`run_paths_op` names where a run's training stages and evaluation land, `run_result_op` gathers one run's
results in the layout `fusedit ablate report` reads, and `ablation_report_op` calls the same report function as
`fusedit ablate report` over every run (pipelines/ablation.py wires them around the other steps' components).
"""
from typing import List  # noqa: UP035 - KFP reads the annotation

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output

from fusedit.components.shared.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def run_paths_op(root: str, run: str) -> str:
    """<root>/<run> (or "" when no root is given): where a run's training stages and evaluation land."""
    from fusedit.components.shared import storage

    return storage.join(root, run) if root else ""


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def run_result_op(result: Output[Artifact], run: dict, stages: list, eval_metrics: Input[Metrics],
                  final: Input[Model], run_root: str = "", overrides: list = []):  # noqa: B006
    """One run's results in the layout `fusedit ablate report` reads (run.json, train/<stage>/, eval/).

    With a run root, every stage's metrics.json and loss.tsv and the evaluation's samples are read from it;
    without one, only the evaluated stage (the `final` Model's own location) and the logged eval metrics.
    """
    import json
    import os

    from fusedit.components.ablate.driver import trainable_params
    from fusedit.components.shared import storage

    out = result.path
    os.makedirs(out, exist_ok=True)
    where = {st: storage.join(run_root, "train", st) for st in stages} if run_root else {
        final.metadata.get("stage", stages[-1]): final.metadata.get("output") or final.path}
    first_count = None
    for st, src in where.items():
        for name in ("metrics.json", "loss.tsv"):
            uri = storage.join(src, name)
            if storage.exists(uri):
                os.makedirs(os.path.join(out, "train", st), exist_ok=True)
                with open(os.path.join(out, "train", st, name), "wb") as f:
                    f.write(storage.read_bytes(uri))
                if name == "metrics.json" and first_count is None:
                    first_count = json.loads(storage.read_bytes(uri)).get("trainable_params")
    eval_root = storage.join(run_root, "eval") if run_root else ""
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    if eval_root and storage.exists(storage.join(eval_root, "metrics.json")):
        prefix = eval_root.rstrip("/") + "/"
        for uri in storage.list_uris(eval_root):
            rel = uri[len(prefix):] if uri.startswith(prefix) else os.path.relpath(uri, eval_root)
            if rel == "metrics.json" or rel.startswith("samples/"):
                os.makedirs(os.path.dirname(os.path.join(out, "eval", rel)), exist_ok=True)
                with open(os.path.join(out, "eval", rel), "wb") as f:
                    f.write(storage.read_bytes(uri))
    else:  # the logged metrics, nested back into suite -> name
        nested: dict = {}
        for key, value in eval_metrics.metadata.items():
            suite, _, name = key.partition("/")
            if name:
                nested.setdefault(suite, {})[name] = value
        with open(os.path.join(out, "eval", "metrics.json"), "w") as f:
            json.dump(nested, f)
    llm = [o.split("=", 1)[1] for o in overrides if o.startswith("model.llm=")]
    try:
        count = trainable_params(run["recipe"], {**run["overrides"], **({"llm": llm[-1]} if llm else {})})
    except Exception:  # noqa: BLE001 - the LLM's config may live where this pod cannot read it
        count = None
    keys = ("spec", "run", "variant", "seed", "recipe", "overrides", "description", "reference", "variants",
            "paper")
    record = {k: run.get(k) for k in keys}
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({**record, "trainable_params": count or first_count, "run_root": run_root}, f, indent=1)
    result.metadata.update({"run": run["run"], "variant": run["variant"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ablation_report_op(results: Input[List[Artifact]], report: Output[HTML], summary: Output[Markdown],  # noqa: UP006
               ablation: Output[Artifact]):
    """The ablation report over every run (the function behind `fusedit ablate report`)."""
    import shutil
    import tempfile
    from pathlib import Path

    from fusedit.components.ablate.report import write_ablation_report

    files = write_ablation_report([Path(r.path) for r in results], Path(tempfile.mkdtemp(prefix="fusedit-ablation-")))
    shutil.copyfile(files["html"], report.path)
    shutil.copyfile(files["markdown"], summary.path)
    shutil.copyfile(files["json"], ablation.path)
