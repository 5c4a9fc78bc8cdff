"""Placement on a shared cluster: every KFP task and every training-job pod requests CPU and memory (per-step
defaults, compile-time `--resources` overrides), the multi-node jobs take the configured storage Secret, and
images may be pinned by digest (`--image name@sha256:...`), kept as given everywhere.

Compiled through the CLI and read back as YAML; the job templates are filled by the rule of k8s/jobs/README.md
(tests/test_k8s.render) and by components/train/jobs.py, and their pods validated as core Kubernetes kinds.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_k8s import EXAMPLE, K8S_VERSIONS, render, validate

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "registry.example.com:5000/team/fusedit@sha256:" + "0123456789abcdef" * 4
TPU_DIGEST = "ghcr.io/fusedit/fusedit-tpu:0.1.0@sha256:" + "f" * 64
CPU = re.compile(r"^(\d+m|\d+(\.\d+)?)$")
MEMORY = re.compile(r"^\d+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")


def _fusedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _compiled(path: Path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))


def _containers(spec: dict) -> dict[str, dict]:
    return {k: v["container"] for k, v in spec["deploymentSpec"]["executors"].items() if "container" in v}


def _task(spec: dict, component_prefix: str) -> dict:
    for comp in [spec["root"], *spec["components"].values()]:
        for key, t in comp.get("dag", {}).get("tasks", {}).items():
            if key.startswith(component_prefix):
                return t
    raise AssertionError(f"no task {component_prefix}")


def _constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


@pytest.mark.parametrize("args", [[], ["--variant", "tpu"], ["--nodes", "3"], ["--variant", "tpu", "--nodes", "2"],
                                  ["ablate"]], ids=["gpu", "tpu", "gpu-jobs", "tpu-jobs", "ablation"])
def test_every_task_requests_cpu_and_memory(tmp_path, args):
    out = tmp_path / "p.yaml"
    if args == ["ablate"]:
        r = _fusedit("ablate", "compile", "ablations/toy.yaml", "--out", str(out))
    else:
        r = _fusedit("pipeline", "compile", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    containers = _containers(_compiled(out))
    assert len(containers) >= 5
    for name, c in containers.items():
        res = c.get("resources", {})
        assert CPU.match(str(res.get("resourceCpuRequest", ""))), (name, res)
        assert MEMORY.match(str(res.get("resourceMemoryRequest", ""))), (name, res)
        assert float(res["cpuRequest"]) > 0 and float(res["memoryRequest"]) > 0, (name, res)


def test_overrides_secret_and_digests_reach_the_tasks_and_the_job_pods(tmp_path):
    out = tmp_path / "p.yaml"
    r = _fusedit("pipeline", "compile", "--nodes", "2", "--resources", "train=16,128Gi", "--resources",
                 "filter=,48Gi", "--image", DIGEST, "--tpu-image", TPU_DIGEST, "--secret", "team-creds",
                 "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    spec = _compiled(out)
    containers = _containers(spec)
    assert {c["image"] for c in containers.values()} == {DIGEST}, "the digest is kept, on every task"
    filt = containers["exec-filter-op"]["resources"]
    assert filt["resourceMemoryRequest"] == "48Gi" and CPU.match(filt["resourceCpuRequest"])
    launch = _task(spec, "train-job-op")
    assert _constant(launch, "image") == DIGEST and _constant(launch, "secret") == "team-creds"
    assert (_constant(launch, "cpu"), _constant(launch, "memory")) == ("16", "128Gi")
    # the launching task itself is small: the job's pods hold the requests
    small = containers["exec-train-job-op"]["resources"]
    assert small["resourceMemoryRequest"] != "128Gi"

    r = _fusedit("pipeline", "compile", "--variant", "tpu", "--tpu-image", TPU_DIGEST, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    images = {c["image"] for k, c in _containers(_compiled(out)).items() if k.startswith("exec-train-op")}
    assert images == {TPU_DIGEST}


@pytest.mark.parametrize("kind,template", [("pytorchjob", "pytorchjob-gpu.yaml"), ("jobset", "jobset-tpu.yaml")])
def test_job_pods_take_the_secret_the_requests_and_a_digest(kind, template):
    from fusedit.components.train import jobs

    values = EXAMPLE | {"IMAGE": DIGEST, "STORAGE_SECRET": "team-creds", "CPU_REQUEST": "16",
                        "MEMORY_REQUEST": "128Gi"}
    _, by_readme = render(template, values)
    by_code = jobs.render(kind, values)
    assert by_code == by_readme
    if kind == "jobset":
        pods = [rj["template"]["spec"]["template"] for rj in by_code["spec"]["replicatedJobs"]]
    else:
        pods = [rs["template"] for rs in by_code["spec"]["pytorchReplicaSpecs"].values()]
    for pod in pods:
        for version in K8S_VERSIONS:
            validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "probe"}, "template": pod},
                     version)
        (c,) = pod["spec"]["containers"]
        assert c["image"] == DIGEST
        assert c["resources"]["requests"]["cpu"] == "16" and c["resources"]["requests"]["memory"] == "128Gi"
        secret = [e["secretRef"] for e in c["envFrom"] if "secretRef" in e]
        assert secret == [{"name": "team-creds", "optional": True}]


@pytest.mark.parametrize("args,field", [
    (["--resources", "train=lots,1Gi"], "resources"),
    (["--resources", "train=8,64GB"], "resources"),
    (["--resources", "gpu=8,64Gi"], "resources"),
    (["--resources", "train"], "resources"),
    (["--image", "ghcr.io/fusedit/fusedit@sha256:xyz"], "image"),
    (["--image", "ghcr.io/fusedit/fusedit@sha256:" + "0" * 63], "image"),
    (["--image", "Ghcr.io/Fusedit:1 0"], "image"),
])
def test_bad_resources_and_image_references_are_one_line_errors(tmp_path, args, field):
    r = _fusedit("pipeline", "compile", *args, "--out", str(tmp_path / "p.yaml"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr
