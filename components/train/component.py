"""KFP v2 component definitions of the train step: one stage in this pod (`train_op`) or on a multi-node job.

The body of `train_op` is `fusedit.components.train.loop.train`, the function behind `fusedit train` and the
DVC stages (under torchrun when the task has several GPUs). `train_job_op` creates a PyTorchJob / JobSet whose
pods run `fusedit train` (components/train/jobs.py) and awaits it. What both do around the training (their
inputs, the job's arguments, their outputs) is components/train/task.py. The pipelines place them on the GPU /
TPU pool, with retries and without caching (pipelines/placement.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from fusedit.components.shared.image import IMAGE


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
    from fusedit.components.train.task import record, stage_inputs, train_args

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
    from fusedit.components.train.jobs import Launcher, job_name, label_value, placement, render
    from fusedit.components.train.task import record, stage_inputs, train_args

    data, target, text = stage_inputs(stage, params, data, cache, init, output_root, model)
    values = {"JOB_NAME": job_name(run_id, stage), "NAMESPACE": "", "RUN_ID": label_value(run_id),
              "STAGE": label_value(stage), "IMAGE": image, "PARAMS_YAML": text, "MAX_RESTARTS": max_restarts,
              "TRAIN_ARGS": train_args(recipe, stage, data, target, overrides, device),
              "STORAGE_SECRET": secret, "CPU_REQUEST": cpu, "MEMORY_REQUEST": memory,
              **placement(kind, nodes, accelerators, node_selector, tolerations)}
    Launcher().run(kind, render(kind, values), timeout_s)
    record(model, metrics, target, output_root, stage, recipe, data_version)
