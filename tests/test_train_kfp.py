"""The KFP training pipeline: GPU pool placement and retries in the IR, and a real two-stage run with kfp.local."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusedit.components.train.component import train_op
from fusedit.pipelines.placement import GPU
from fusedit.pipelines.train import compile_pipeline, train_pipeline


def _params(tmp_path: Path) -> Path:
    common = {"batch_size": 2, "save_every": 2, "ema_every": 1, "log_every": 1, "sample_prompts": ["a red square"]}
    stages = [{"name": "base", "steps": 3, **common},
              {"name": "joint", "steps": 2, "trains": "dit+llm", "llm_lr": 1e-3, "init_from": "base", **common}]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": {"unrelated": 1}, "train": {"seed": 3, "stages": stages}}))
    return p


def _by_stage(spec: dict) -> dict[str, dict]:
    return {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}


def test_compiled_pipeline_places_each_stage_on_the_gpu_pool(tmp_path):
    docs = list(yaml.safe_load_all(open(compile_pipeline(str(tmp_path), str(_params(tmp_path))))))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _by_stage(spec)
    assert set(tasks) == {"train-base", "train-joint"}
    joint = tasks["train-joint"]
    assert joint["dependentTasks"] == [tasks["train-base"]["componentRef"]["name"].replace("comp-", "")]
    assert joint["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["outputArtifactKey"] == "model"
    assert "init" not in tasks["train-base"]["inputs"].get("artifacts", {})
    assert "unrelated" not in tasks["train-base"]["inputs"]["parameters"]["params"]["runtimeValue"]["constant"]
    for task in tasks.values():
        assert task["inputs"]["parameters"]["processes"]["componentInputParameter"] == "gpus"
        assert task["retryPolicy"]["maxRetryCount"] == 3 and task["retryPolicy"]["backoffDuration"] == "60s"
        assert task["cachingOptions"].get("enableCache", False) is False  # KFP writes enableCache: true when on
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 2 and set(platform) == set(executors)
    for name, ex in executors.items():
        acc = ex["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == GPU and "pipelinechannel--gpus" in acc["resourceCount"]
        k8s = platform[name]
        assert k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
        assert k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "tolerations"
        assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"} in k8s["emptyDirMounts"]
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["tolerations"]["defaultValue"][0]["key"] == GPU and inputs["gpus"]["defaultValue"] == 1




def test_two_stages_run_with_kfp_local(tmp_path, tiny_dir, filtered):
    from kfp import local

    sets = [f"model.llm={tiny_dir / 'gemma'}", "model.resolution=16", "model.max_prompt_length=16",
            "flow.sample_steps=2"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    train_pipeline(str(_params(tmp_path)))(data_uri=str(filtered), recipe="tiny", overrides=sets, device="cpu")
    outputs = {p.parents[2].name: p.parents[1] for p in (tmp_path / "root").rglob("pipeline/model_index.json")}
    assert set(outputs) == {"train-op", "train-op-2"}, outputs
    base, joint = outputs["train-op"], outputs["train-op-2"]
    metrics = json.loads((joint / "metrics.json").read_text())
    timing = json.loads((joint / "timing.json").read_text())  # run facts are kept out of the tracked metrics
    assert metrics["stage"] == "joint" and timing["start_step"] == 0 and metrics["llm_trainable_params"] > 0
    assert (base / "checkpoints").is_dir() and (joint / "samples.png").is_file()


def test_preempted_stage_exits_75_so_kfp_retries(tmp_path, monkeypatch):
    from kfp.dsl import Metrics, Model

    from fusedit.components.train import loop as train_mod

    def preempted(*args, **kwargs):
        raise train_mod.Preempted("SIGTERM, checkpoint committed at step 2")

    monkeypatch.setattr(train_mod, "train", preempted)
    with pytest.raises(SystemExit) as exit_:
        train_op.python_func(model=Model(uri=str(tmp_path / "m")), metrics=Metrics(uri=str(tmp_path / "x")),
                             recipe="tiny", stage="base", data="unused", params=str(_params(tmp_path)))
    assert exit_.value.code == train_mod.PREEMPTED_EXIT == 75


@pytest.mark.slow
def test_several_gpus_run_the_stage_under_torchrun(tmp_path, tiny_dir, filtered):
    """processes > 1 (the task's GPU count) launches torchrun in the pod: here 2 gloo ranks on the CPU."""
    from kfp.dsl import Metrics, Model

    stage = {"name": "base", "steps": 2, "batch_size": 4, "save_every": 2, "sample_prompts": ["a red square"]}
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [stage]}}))
    sets = [f"model.llm={tiny_dir / 'gemma'}", "model.resolution=16", "model.max_prompt_length=16",
            "flow.sample_steps=2"]
    model, metrics = Model(uri=str(tmp_path / "model")), Metrics(uri=str(tmp_path / "metrics"))
    train_op.python_func(model=model, metrics=metrics, recipe="tiny", stage="base", data=str(filtered),
                         params=str(params), overrides=sets, device="cpu", processes=2)
    out = Path(model.metadata["output"])
    assert json.loads((out / "timing.json").read_text())["world"] == 2
    assert (out / "pipeline" / "model_index.json").is_file() and model.metadata["steps"] == 2
