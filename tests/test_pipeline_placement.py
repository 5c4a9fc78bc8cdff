"""The standalone cache and evaluate pipelines place their GPU task exactly as the whole workflow places the same
step: pipelines/placement.py `place` with the `node_selector` / `tolerations` run parameters (the workflow's
defaults) and a RAM-backed /dev/shm. Read back from the compiled YAML, not from the pipeline functions."""
from __future__ import annotations

import pytest
import yaml

from fusedit.pipelines import cache, evaluate
from fusedit.pipelines.placement import GPU, GPU_NODE_SELECTOR, GPU_TOLERATIONS
from fusedit.pipelines.workflow import compile_workflow

PLACEMENT = ("nodeSelector", "tolerations", "emptyDirMounts")


def _compiled(path: str) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(open(path)))
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], k8s


def _gpu_executor(spec: dict, component: str) -> str:
    """The executor of the (one) task of `component` that requests a GPU."""
    (task,) = [t for t in spec["root"]["dag"]["tasks"].values() if t["componentRef"]["name"] == f"comp-{component}"]
    ex = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    assert spec["deploymentSpec"]["executors"][ex]["container"]["resources"]["accelerator"]["resourceType"] == GPU
    return ex


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    return _compiled(compile_workflow(str(tmp_path_factory.mktemp("wf") / "gpu.yaml")))


@pytest.mark.parametrize("module,component", [(cache, "cache-op"), (evaluate, "evaluate-op")])
def test_standalone_gpu_task_is_placed_like_the_workflows(tmp_path, workflow, module, component):
    spec, k8s = _compiled(module.compile_pipeline(str(tmp_path)))
    ex = _gpu_executor(spec, component)
    assert ex in k8s, f"{component}: no Kubernetes placement at all (no node selector, no tolerations)"
    placed = k8s[ex]
    assert placed.get("nodeSelector") == {"nodeSelectorJson": {"componentInputParameter": "node_selector"}}
    assert placed.get("tolerations") == [{"tolerationJson": {"componentInputParameter": "tolerations"}}]
    assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"} in placed.get("emptyDirMounts", [])
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["node_selector"]["defaultValue"] == GPU_NODE_SELECTOR
    assert params["tolerations"]["defaultValue"] == GPU_TOLERATIONS
    wf_spec, wf_k8s = workflow
    wf_params = wf_spec["root"]["inputDefinitions"]["parameters"]
    assert {k: params[k] for k in ("node_selector", "tolerations")} == \
        {k: wf_params[k] for k in ("node_selector", "tolerations")}
    wf_placed = wf_k8s[_gpu_executor(wf_spec, component)]
    assert {k: placed.get(k) for k in PLACEMENT} == {k: wf_placed.get(k) for k in PLACEMENT}
