"""Where a KFP task runs: its accelerators, its node pool, its /dev/shm, and (training) its retries.

The one constructor every pipeline places its tasks with (`place`), and the pools' defaults. Every pipeline (the
workflow, the ablation and the standalone cache, train and evaluate ones) pins its cache, training and
evaluation tasks to the pool its `node_selector` / `tolerations` run parameters name. A training task is retried
with backoff and never cached: a retry resumes from the last checkpoint, which a cache hit would skip.
(The pods of a multi-node training job are placed by the job's template: components/train/jobs.py.)
"""
from kfp import dsl, kubernetes

from fusedit.components.train.jobs import TPU_ACCELERATOR_LABEL, TPU_TOPOLOGY_LABEL

GPU = "nvidia.com/gpu"
TPU = "google.com/tpu"
# Any node of the NVIDIA GPU operator (its label): the default pool of the standalone training pipeline.
GPU_OPERATOR_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
# Defaults match k8s/overlays/gke-gpu; EKS: --param node_selector='{"eks.amazonaws.com/nodegroup": "..."}'.
GPU_NODE_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
GPU_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
# A single-host slice: one pod drives all its chips (Options.nodes > 1: a JobSet over the hosts of a slice).
TPU_NODE_SELECTOR = {TPU_ACCELERATOR_LABEL: "tpu-v5-lite-podslice", TPU_TOPOLOGY_LABEL: "2x2"}
TPU_TOLERATIONS = [{"key": TPU, "operator": "Exists", "effect": "NoSchedule"}]


def shm(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A RAM-backed /dev/shm (the container default is 64 MiB; data loader workers share batches through it)."""
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task


def place(task: dsl.PipelineTask, count=1, node_selector=None, tolerations=None, *, resource: str = GPU,
          retries: int | None = None, backoff: str = "60s") -> dsl.PipelineTask:
    """Request `count` x `resource` (a number or a run parameter). With a pool (`node_selector` and `tolerations`,
    both given) the task goes to its nodes and gets a RAM-backed /dev/shm; with `retries` (training) it is retried
    with exponential backoff from `backoff` and its caching is off."""
    task.set_accelerator_type(resource).set_accelerator_limit(count)
    if retries is not None:
        task.set_retry(retries, backoff_duration=backoff, backoff_factor=2.0)
        task.set_caching_options(False)
    if node_selector is not None:
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
        shm(task)
    return task
