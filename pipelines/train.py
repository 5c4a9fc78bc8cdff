"""KFP v2 training pipeline: one GPU task per stage of a params file, each stage initialised from its upstream's output.

Wiring only: the component is the train step's own (components/train/component.py: `train_op`, whose body
is the function behind `fusedit train` and the DVC stages). Training resumes from its last committed
checkpoint, so retries are safe: a preempted pod saves on SIGTERM and exits 75, and the retry continues where
it stopped. Caching is off for training tasks, because a cache hit would skip that resume (placement.py).
The stage list is read when the pipeline is compiled (`train_pipeline(params)`); the data, outputs,
GPU count, node selector and tolerations are run parameters.
"""
from pathlib import Path

import yaml
from kfp import compiler, dsl

from fusedit.components.train.component import train_op
from fusedit.components.train.config import load_train_params
from fusedit.pipelines.placement import GPU_OPERATOR_NODE_SELECTOR, GPU_TOLERATIONS, place


def train_pipeline(params: str = "params.yaml", retries: int = 3, backoff: str = "60s"):
    """The pipeline for the stages declared in `params` (each stage after the one it is initialised from)."""
    stages = load_train_params(params).stages
    text = yaml.safe_dump({"train": yaml.safe_load(Path(params).read_text())["train"]}, sort_keys=False)

    @dsl.pipeline(name="fusedit-train", description="Training stages of a params file, each on the GPU pool")
    def pipeline(data_uri: str, output_root: str = "", recipe: str = "tiny", overrides: list = [],  # noqa: B006
                 gpus: int = 1, node_selector: dict = GPU_OPERATOR_NODE_SELECTOR,  # noqa: B006
                 tolerations: list = GPU_TOLERATIONS, device: str = ""):  # noqa: B006
        tasks: dict[str, dsl.PipelineTask] = {}
        for st in stages:
            upstream = tasks.get(st.init_from or "")
            init = {"init": upstream.outputs["model"]} if upstream else {}
            task = train_op(recipe=recipe, stage=st.name, data=data_uri, params=text, output_root=output_root,
                            overrides=overrides, device=device, processes=gpus, **init)
            tasks[st.name] = place(task.set_display_name(f"train-{st.name}"), gpus, node_selector, tolerations,
                                   retries=retries, backoff=backoff)

    return pipeline


def compile_pipeline(out_dir: str, params: str = "params.yaml") -> str:
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train_pipeline.yaml")
    compiler.Compiler().compile(train_pipeline(params), path)
    return path
