"""An ablation spec as ONE KFP v2 pipeline: data and filtering once, a `dsl.ParallelFor` over the spec's runs
(variant x seed: tiny LLM if the recipe needs it, cache, every training stage, evaluation, the run's result
directory), then one comparison step over the `dsl.Collected` results that calls the same report function as
`fusedit ablate report` and publishes it as HTML and Markdown.

The components are the steps' own (components/{data,tiny,cache,train,evaluate,ablate}/component.py),
placed by the same helpers as `pipelines/workflow.py` (pipelines/placement.py). Compile-time: the spec (its
runs are the default of the `runs` parameter), the stage list, the parallelism. Run parameters: the data source,
`output_root` (where each run's stages and evaluation land: <output_root>/<run>/...), the accelerators per run,
node selector, tolerations and the inputs of the evaluation suites (required when a suite of the spec has none:
pipelines/eval_inputs.py).
"""
from pathlib import Path

import yaml
from kfp import dsl

from fusedit.components.ablate.component import ablation_report_op, run_paths_op, run_result_op
from fusedit.components.ablate.driver import run_record
from fusedit.components.ablate.spec import Spec, apply_params, runs
from fusedit.components.cache.component import cache_op
from fusedit.components.data.component import filter_op
from fusedit.components.evaluate.component import evaluate_op
from fusedit.components.tiny.component import tiny_op
from fusedit.components.train.config import TrainParams
from fusedit.pipelines.eval_inputs import with_inputs
from fusedit.pipelines.placement import GPU_NODE_SELECTOR, GPU_TOLERATIONS, place, shm
from fusedit.pipelines.workflow import (
    Options,
    _common,
    _shards,
    _text,
    _texts,
    check_options,
    compile_checked,
    train_stages,
)

TINY_LLM = "data/tiny/llm"  # the recipes whose LLM `tiny_op` writes


def items(spec: Spec, doc: dict) -> list[dict]:
    """The ParallelFor items: one per run, with its recipe, `--set` overrides and the train params text."""
    from fusedit.model.config import load_recipe

    out = []
    for r in runs(spec):
        llm = load_recipe(r.recipe, {"model": r.model_overrides} if r.model_overrides else None).model.llm
        params = apply_params(doc, spec, r)
        out.append({**run_record(spec, r), "sets": r.set_args,
                    "tiny": "tiny" if llm == TINY_LLM else r.recipe,  # tiny_op writes the tiny LLM for "tiny"
                    "train_params": _text({"train": params["train"]})})
    return out


def build_ablation(spec: Spec, opts: Options | None = None, parallelism: int = 4):
    """The pipeline function for `spec` (GPU pools; compile it, or call it under kfp.local)."""
    opts = opts or Options()
    check_options(opts)
    doc = opts.params_doc or yaml.safe_load(Path(opts.params).read_text())
    shared = apply_params(doc, spec, runs(spec)[0])  # data and eval settings are the same for every run
    d = _texts(shared)
    stages = TrainParams.model_validate(shared["train"]).stages
    eval_stage = opts.eval_stage or stages[-1].name
    default_runs = items(spec, doc)

    def ablation(source_uri: str = "", data_version: str = "", samples: int = d["samples"], seed: int = d["seed"],
                 shard_size: int = d["shard_size"], bad_fraction: float = d["bad_fraction"],
                 filter_config: str = d["filter_config"], eval_config: str = d["eval_config"],
                 eval_suites: list = d["eval_suites"], runs: list = default_runs, output_root: str = "",
                 cache_dtype: str = "bf16", accelerators: int = 1, node_selector: dict = GPU_NODE_SELECTOR,
                 tolerations: list = GPU_TOLERATIONS, device: str = "", eval_inputs: dict | None = None):
        shards = _shards(opts, source_uri, data_version, samples, seed, shard_size, bad_fraction)
        filtered = _common(filter_op(shards=shards, config_yaml=filter_config, data_version=data_version),
                           opts, opts.image, opts.step_timeout_s, "filter").set_display_name("filter")
        shm(filtered)
        with dsl.ParallelFor(runs, parallelism=parallelism, name="variants") as run:
            root = _common(run_paths_op(root=output_root, run=run.run), opts, opts.image, opts.step_timeout_s,
                           "paths", secret=False).set_display_name("run-root")
            tiny = _common(tiny_op(recipe=run.tiny, overrides=run.sets), opts, opts.image, opts.step_timeout_s,
                           "tiny", secret=False).set_display_name("tiny")
            sets = tiny.outputs["Output"]
            cache = _common(cache_op(filtered=filtered.outputs["filtered"], recipe=run.recipe, overrides=sets,
                                     dtype=cache_dtype, data_version=data_version), opts, opts.image,
                            opts.step_timeout_s, "cache").set_display_name("cache")
            place(cache, 1, node_selector, tolerations)
            train_root = _common(run_paths_op(root=root.output, run="train"), opts, opts.image, opts.step_timeout_s,
                                 "paths", secret=False).set_display_name("stages-root")
            eval_uri = _common(run_paths_op(root=root.output, run="eval"), opts, opts.image, opts.step_timeout_s,
                               "paths", secret=False).set_display_name("eval-root")
            trained = train_stages(opts, stages, recipe=run.recipe, cache=cache.outputs["cache"],
                                   params=run.train_params, output_root=train_root.output, overrides=sets,
                                   device=device, data_version=data_version, accelerators=accelerators,
                                   node_selector=node_selector, tolerations=tolerations)
            ev = _common(evaluate_op(pipeline=trained[eval_stage].outputs["model"], config_yaml=eval_config,
                                     suites=eval_suites, output_uri=eval_uri.output, **eval_inputs), opts,
                         opts.image, opts.step_timeout_s, "evaluate").set_display_name("evaluate")
            place(ev, 1, node_selector, tolerations)
            result = _common(run_result_op(run=run, stages=[s.name for s in stages],
                                           eval_metrics=ev.outputs["metrics"],
                                           final=trained[eval_stage].outputs["model"], run_root=root.output,
                                           overrides=sets), opts, opts.image, opts.step_timeout_s, "run-result")
            result.set_display_name("run-result")
        _common(ablation_report_op(results=dsl.Collected(result.outputs["result"])), opts, opts.image,
                opts.step_timeout_s, "compare", secret=False).set_display_name("compare")

    return dsl.pipeline(name=f"fusedit-ablation-{spec.name}",
                        description=f"ablation '{spec.name}': data once, then per run: cache -> training stages -> "
                                    "evaluate; then one comparison report")(
        with_inputs(ablation, d["eval_inputs"], d["eval_required"]))


def compile_ablation(spec: Spec, out: str, opts: Options | None = None, parallelism: int = 4) -> str:
    """Compile the ablation pipeline for `spec` to KFP IR YAML at `out` (refused if a suite lacks its input)."""
    return compile_checked(build_ablation(spec, opts, parallelism), out)

