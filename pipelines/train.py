"""KFP v2 training: one GPU task per stage of a params file, each stage initialised from its upstream's output.

The body is `fusedit.components.train.loop.train`, the function behind `fusedit train` and the DVC stages.
Training resumes from its last committed checkpoint, so retries are safe: a preempted pod saves on
SIGTERM and exits 75, and the retry continues where it stopped. Caching is off for training tasks,
because a cache hit would skip that resume.
The stage list is read when the pipeline is compiled (`train_pipeline(params)`); the data, outputs,
GPU count, node selector and tolerations are run parameters.
"""

from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from fusedit.components.train.config import load_train_params
from fusedit.pipelines.image import IMAGE

GPU = "nvidia.com/gpu"
NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # label of the NVIDIA GPU operator
TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_op(model: Output[Model], metrics: Output[Metrics], recipe: str, stage: str, data: str, params: str,
             output_root: str = "", init: Input[Model] = None, overrides: list = [],  # noqa: B006
             device: str = "", data_version: str = "", cache: Input[Dataset] = None, processes: int = 1):
    """Train (or resume) `stage` in this pod; its output is <output_root>/<stage>, or the Model artifact's own.

    data: the feature cache's location, or "" to read the `cache` artifact. params: the params YAML text or a
    path to it. init: the upstream stage's Model; its location becomes this stage's init_from. data_version is
    recorded in the Model's metadata (and is part of the task's inputs). A SIGTERM-save ends the task with exit
    status 75 so that KFP retries it. processes > 1 (the task's GPU count on the GPU pool) runs the same
    `fusedit train` under torchrun inside the pod, one rank per GPU (DDP, or FSDP2 per the stage's strategy).
    """
    import os
    import subprocess
    import sys
    import tempfile

    from fusedit.components.train.loop import PREEMPTED_EXIT, Preempted, train
    from fusedit.pipelines.train_task import record, stage_inputs, train_args

    data, target, text = stage_inputs(stage, params, data, cache, init, output_root, model)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        if processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "fusedit", "train", "--params", f.name, *train_args(recipe, stage, data, target,
                                                                             overrides, device)]
            if rc := subprocess.call(cmd):
                sys.exit(rc)
        else:
            train(recipe, stage, data, target, f.name, list(overrides), device or None)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    finally:
        os.unlink(f.name)
    record(model, metrics, target, output_root, stage, recipe, data_version)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_job_op(model: Output[Model], metrics: Output[Metrics], recipe: str, stage: str, data: str, params: str,
                 output_root: str, image: str, run_id: str, kind: str, nodes: int, accelerators: int,
                 node_selector: dict, tolerations: list, init: Input[Model] = None,
                 overrides: list = [], device: str = "", data_version: str = "",  # noqa: B006
                 cache: Input[Dataset] = None, max_restarts: int = 3, timeout_s: int = 48 * 3600,
                 secret: str = "fusedit-storage", cpu: str = "8", memory: str = "64Gi"):
    """Train `stage` on several pods: create a PyTorchJob (multi-node GPU) or JobSet (multi-host TPU) and await it.

    The job's pods run `fusedit train` (torchrun on every node, or torch-xla on every host of the slice); this
    task only creates the job (named after the run and stage, so a retry follows the same job), streams its pods'
    logs, and fails with the job's own message if the job fails. output_root must be storage that every pod
    reaches (s3://... or a shared volume). accelerators: GPUs per node / TPU chips per host. secret: the storage
    Secret the pods read (optional); cpu / memory: each pod's requests.
    """
    from fusedit.pipelines.jobs import Launcher, job_name, label_value, placement, render
    from fusedit.pipelines.train_task import record, stage_inputs, train_args

    data, target, text = stage_inputs(stage, params, data, cache, init, output_root, model)
    values = {"JOB_NAME": job_name(run_id, stage), "NAMESPACE": "", "RUN_ID": label_value(run_id),
              "STAGE": label_value(stage), "IMAGE": image, "PARAMS_YAML": text, "MAX_RESTARTS": max_restarts,
              "TRAIN_ARGS": train_args(recipe, stage, data, target, overrides, device),
              "STORAGE_SECRET": secret, "CPU_REQUEST": cpu, "MEMORY_REQUEST": memory,
              **placement(kind, nodes, accelerators, node_selector, tolerations)}
    Launcher().run(kind, render(kind, values), timeout_s)
    record(model, metrics, target, output_root, stage, recipe, data_version)


def on_gpu_pool(task: dsl.PipelineTask, gpus, node_selector, tolerations, retries: int,
                backoff: str) -> dsl.PipelineTask:
    """GPU request, node placement, retries with backoff, no caching, and a RAM-backed /dev/shm."""
    task.set_accelerator_type(GPU).set_accelerator_limit(gpus)
    task.set_retry(retries, backoff_duration=backoff, backoff_factor=2.0)
    task.set_caching_options(False)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task


def train_pipeline(params: str = "params.yaml", retries: int = 3, backoff: str = "60s"):
    """The pipeline for the stages declared in `params` (each stage after the one it is initialised from)."""
    stages = load_train_params(params).stages
    text = yaml.safe_dump({"train": yaml.safe_load(Path(params).read_text())["train"]}, sort_keys=False)

    @dsl.pipeline(name="fusedit-train", description="Training stages of a params file, each on the GPU pool")
    def pipeline(data_uri: str, output_root: str = "", recipe: str = "tiny", overrides: list = [],  # noqa: B006
                 gpus: int = 1, node_selector: dict = NODE_SELECTOR, tolerations: list = TOLERATIONS,  # noqa: B006
                 device: str = ""):
        tasks: dict[str, dsl.PipelineTask] = {}
        for st in stages:
            upstream = tasks.get(st.init_from or "")
            init = {"init": upstream.outputs["model"]} if upstream else {}
            task = train_op(recipe=recipe, stage=st.name, data=data_uri, params=text, output_root=output_root,
                            overrides=overrides, device=device, processes=gpus, **init)
            tasks[st.name] = on_gpu_pool(task.set_display_name(f"train-{st.name}"), gpus, node_selector,
                                         tolerations, retries, backoff)

    return pipeline


def compile_pipeline(out_dir: str, params: str = "params.yaml") -> str:
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train_pipeline.yaml")
    compiler.Compiler().compile(train_pipeline(params), path)
    return path
