"""Multi-node training steps: the KFP task creates a PyTorchJob / JobSet, follows its pods' logs and reports it.

The Kubernetes API is tests/k8s_api.py (a stand-in on 127.0.0.1 that runs each pod's real command as a local
process, as the operators would); everything else is real: the templates of k8s/jobs, the kubernetes client,
the KFP component under kfp.local, torchrun's multi-node rendezvous and `fusedit train`.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes.config  # noqa: F401 - imported before any test sets KUBECONFIG
import pytest
import yaml

from fusedit.components.train import jobs
from fusedit.errors import UserError
from tests import warm
from tests.k8s_api import K8sStandIn
from tests.test_train import _losses

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
POD_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
GPU_POOL = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
TPU_POOL = {jobs.TPU_ACCELERATOR_LABEL: "tpu-v5p-slice", jobs.TPU_TOPOLOGY_LABEL: "2x2x2"}


def _params_text() -> str:
    stage = {"name": "base", "steps": 4, "batch_size": 4, "save_every": 4, "ema_every": 2, "log_every": 1,
             "sample_prompts": ["a red square"]}
    return yaml.safe_dump({"train": {"seed": 3, "stages": [stage]}})


def _overrides(tiny_dir: Path) -> list[str]:
    return [f"model.llm={tiny_dir / 'gemma'}", "model.resolution=16", "model.max_prompt_length=16"]


def _values(kind: str, args: list[str], nodes: int, pool: dict, run_id: str = "run-1", stage: str = "base") -> dict:
    return {"JOB_NAME": jobs.job_name(run_id, stage), "NAMESPACE": "", "RUN_ID": run_id, "STAGE": stage,
            "IMAGE": "ghcr.io/fusedit/fusedit-gpu:test", "PARAMS_YAML": _params_text(), "MAX_RESTARTS": 0,
            "TRAIN_ARGS": args, "STORAGE_SECRET": "fusedit-storage", "CPU_REQUEST": "1", "MEMORY_REQUEST": "1Gi",
            **jobs.placement(kind, nodes, 1, pool, [])}


def _client(api: K8sStandIn):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = api.url
    cfg.api_key = {"authorization": "step-token"}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(cfg)


# ---------------------------------------------------------------- rendering


def test_job_names_are_stable_rfc1035_and_short():
    a = jobs.job_name("3f2c9a1e-0b6d-4c1e-9a8f-1234567890ab", "Base_Stage.With Spaces")
    assert a == jobs.job_name("3f2c9a1e-0b6d-4c1e-9a8f-1234567890ab", "Base_Stage.With Spaces")
    assert a != jobs.job_name("another-run", "Base_Stage.With Spaces")
    assert len(a) <= 40 and a[0].isalpha() and a[-1].isalnum()
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert jobs.label_value("{{$.pipeline_job_uuid}}" * 5).isprintable() and len(jobs.label_value("x" * 99)) == 63


def test_placement_fills_each_kind():
    pj = jobs.render("pytorchjob", _values("pytorchjob", ["--stage", "base"], 3, GPU_POOL))
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and pj["spec"]["nprocPerNode"] == "1"
    master = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["nodeSelector"] == GPU_POOL
    js = jobs.render("jobset", _values("jobset", ["--stage", "base"], 2, TPU_POOL))
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 2
    assert job["template"]["spec"]["nodeSelector"] == TPU_POOL
    with pytest.raises(UserError, match="gke-tpu-topology"):
        jobs.placement("jobset", 2, 4, {jobs.TPU_ACCELERATOR_LABEL: "tpu-v5p-slice"}, [])
    with pytest.raises(UserError, match="placeholder"):
        jobs.render("jobset", {"JOB_NAME": "x"})
    with pytest.raises(UserError, match="job kind"):
        jobs.render("mpijob", {})


# ---------------------------------------------------------------- a failed job, and a retried step


def test_failed_job_reports_its_pods_logs_and_is_cleaned_up():
    """A JobSet whose hosts fail (torch-xla is not in this venv): the step fails with the job's message."""
    with K8sStandIn(config_maps={"fusedit-config": POD_ENV}) as api:
        out = io.StringIO()
        launcher = jobs.Launcher(_client(api), namespace="fusedit", out=out, poll_s=0.2)
        obj = jobs.render("jobset", _values("jobset", ["--recipe", "tiny", "--stage", "base", "--data", "/nowhere",
                                                        "--output", "/nowhere/out"], 2, TPU_POOL))
        with pytest.raises(jobs.JobFailed, match=r"jobsets/fusedit-base-\w+ failed: pod .* exited with code"):
            launcher.run("jobset", obj, timeout_s=120)
        log = out.getvalue()
        for i in range(2):  # both hosts' logs, each line under its pod's name
            assert f"[{obj['metadata']['name']}-slice-0-{i}]" in log, log[-3000:]
        assert "torch_xla" in log or "xla" in log.lower(), log[-3000:]
        assert api.deleted == [obj["metadata"]["name"]] and not api.jobs
        assert all(auth == "Bearer step-token" for _, _, auth in api.requests)


def test_retried_step_follows_the_job_of_its_first_attempt(tmp_path):
    with K8sStandIn(config_maps={"fusedit-config": POD_ENV}) as api:
        obj = jobs.render("pytorchjob", _values("pytorchjob", ["--help"], 1, GPU_POOL))
        first = jobs.Launcher(_client(api), namespace="fusedit", out=io.StringIO(), poll_s=0.2)
        first._create(jobs.KINDS["pytorchjob"], json.loads(json.dumps(obj)))  # the attempt that was preempted
        out = io.StringIO()
        status = jobs.Launcher(_client(api), namespace="fusedit", out=out, poll_s=0.2).run("pytorchjob", obj, 120)
        assert any(c["type"] == "Succeeded" for c in status["conditions"])
        assert "exists (a previous attempt of this step): following it" in out.getvalue()
        posts = [p for m, p, _ in api.requests if m == "POST"]
        assert len(posts) == 2 and len(api.deleted) == 1, "one job, created once, followed by the retry"
        assert "--recipe" in out.getvalue(), "the pod's `fusedit train --help` output reached the step's log"


# ---------------------------------------------------------------- two nodes, through the KFP component


def test_launcher_reads_kubeconfig_as_it_is_when_created(tmp_path, monkeypatch):
    """kubernetes reads KUBECONFIG once, at import (done above, before the variable is set, as in a long-lived
    process such as a warm worker); the launcher loads the file the variable names when it is created."""
    from kubernetes import client

    before = client.Configuration.get_default_copy()
    try:
        with K8sStandIn() as api:
            monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            assert jobs.Launcher().core.api_client.configuration.host == api.url
    finally:
        client.Configuration.set_default(before)  # load_kube_config sets the process-wide default


@pytest.mark.slow
def test_pytorchjob_two_nodes_train_like_one_process(tmp_path, tiny_dir, filtered, monkeypatch, capfd):
    """train_job_op under kfp.local creates a 2-node PyTorchJob; torchrun's rendezvous joins the two pods."""
    from kfp import local

    from fusedit.components.train.component import train_job_op

    with K8sStandIn(config_maps={"fusedit-config": POD_ENV}) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
        task = train_job_op(recipe="tiny", stage="base", data=str(filtered), params=_params_text(),
                            output_root=str(tmp_path / "jobs"), image="ghcr.io/fusedit/fusedit-gpu:test",
                            run_id="run-7", kind="pytorchjob", nodes=2, accelerators=1, node_selector=GPU_POOL,
                            tolerations=[], overrides=_overrides(tiny_dir), timeout_s=900)
        log = capfd.readouterr().out
        name = jobs.job_name("run-7", "base")
        assert f"[{name}-master-0]" in log and f"[{name}-worker-0]" in log, log[-3000:]
        assert api.deleted == [name]
    assert task.outputs["metrics"].metadata["steps"] == 4
    assert task.outputs["model"].metadata["output"] == str(tmp_path / "jobs" / "base")

    one = tmp_path / "one"
    cmd = [warm.FUSEDIT, "train", "--recipe", "tiny", "--stage", "base", "--data", str(filtered),
           "--output", str(one), "--params", str(tmp_path / "p.yaml")]
    (tmp_path / "p.yaml").write_text(_params_text())
    r = subprocess.run(cmd + [a for o in _overrides(tiny_dir) for a in ("--set", o)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, **POD_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(one), _losses(tmp_path / "jobs" / "base")
    assert [x[0] for x in a] == [x[0] for x in b] == ["1", "2", "3", "4"]
    for x, y in zip(a, b, strict=True):
        assert abs(float(x[1]) - float(y[1])) < 1e-4 * max(1.0, abs(float(x[1]))), (x, y)


# ---------------------------------------------------------------- the compiled pipeline


def executor_name(task: dict) -> str:
    return task["componentRef"]["name"].replace("comp-", "exec-")


@pytest.mark.parametrize("variant,kind", [("gpu", "pytorchjob"), ("tpu", "jobset")])
def test_multi_node_workflow_compiles_to_job_launching_tasks(tmp_path, variant, kind):
    from fusedit.pipelines.workflow import Options, compile_workflow

    opts = Options(variant=variant, nodes=4, params=str(ROOT / "params.yaml"))  # not the working directory's
    path = compile_workflow(str(tmp_path / "p.yaml"), opts)
    spec, platform = yaml.safe_load_all(Path(path).read_text())
    dag = spec["root"]["dag"]["tasks"]
    train = {k: v for k, v in dag.items() if k.startswith("train-job-op")}
    assert len(train) == 2 and not any(k.startswith("train-op") for k in dag), sorted(dag)
    for task in train.values():
        params = task["inputs"]["parameters"]
        assert params["kind"]["runtimeValue"]["constant"] == kind
        assert params["nodes"]["runtimeValue"]["constant"] == 4
        assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert params["accelerators"]["componentInputParameter"] == "accelerators"
        assert params["node_selector"]["componentInputParameter"] == "node_selector"
        assert task["cachingOptions"] == {} or not task["cachingOptions"].get("enableCache")
        executor = spec["deploymentSpec"]["executors"][executor_name(task)]
        resources = executor["container"]["resources"]
        assert "accelerator" not in resources, "the launching task holds no accelerator"
        assert resources["resourceMemoryRequest"] and resources["resourceCpuRequest"], "but requests CPU and memory"
        assert params["secret"]["runtimeValue"]["constant"] == "fusedit-storage", "the job's pods get the Secret"
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor_name(task)]
        assert "nodeSelector" not in k8s and "tolerations" not in k8s, "it runs on any CPU node"
        assert k8s["secretAsEnv"][0]["secretName"] == "fusedit-storage", "it reads metrics.json from storage"
    joint = train["train-job-op-2"]
    assert joint["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "train-job-op"
