"""The whole-workflow pipeline: placement and cache keys in the compiled IR, a full kfp.local run, and `submit`.

`submit` talks to a small HTTP server on 127.0.0.1 implementing the few KFP v2 endpoints kfp.Client calls:
one of the suite's two stand-ins (the other, for the Kubernetes API, is tests/k8s_api.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fusedit.components.shared.image import IMAGE
from fusedit.pipelines.placement import GPU, TPU
from fusedit.pipelines.workflow import compile_workflow
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s["name"] for s in yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["stages"]]


def _cli(*args, env=None, cwd=ROOT):
    return subprocess.run([warm.FUSEDIT, "pipeline", *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=cwd)


def _compiled(path: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(open(path))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict[str, dict]:
    """Display name -> task, for the root DAG and the condition branches."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        for t in comp.get("dag", {}).get("tasks", {}).values():
            out[t["taskInfo"]["name"]] = t
    return out


def _executor(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    return _compiled(compile_workflow(str(tmp_path_factory.mktemp("wf") / "gpu.yaml")))


def test_gpu_variant_tasks_run_in_dvc_order(gpu):
    spec, _ = gpu
    tasks = _tasks(spec)
    assert {"synth", "shards", "filter", "compare", "tiny", "cache", "evaluate"} | {f"train-{s}" for s in STAGES} \
        <= set(tasks)
    by_key = {k: t["taskInfo"]["name"] for k, t in spec["root"]["dag"]["tasks"].items()}

    def deps(name):
        return {by_key.get(d, d) for d in tasks[name].get("dependentTasks", [])}

    assert deps("filter") == {"condition-branches-1"}  # synth, or the imported shards
    assert deps("compare") == {"filter"}
    assert deps("cache") == {"filter", "compare", "tiny"}  # the data compare's gate comes before the features
    assert "cache" in deps(f"train-{STAGES[0]}")
    for prev, st in zip(STAGES, STAGES[1:], strict=False):
        assert f"train-{prev}" in deps(f"train-{st}")
        assert tasks[f"train-{st}"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["outputArtifactKey"] == "model"
    assert deps("evaluate") == {f"train-{STAGES[-1]}"}


def test_gpu_variant_placement_secret_retries_timeouts(gpu):
    spec, k8s = gpu
    tasks = _tasks(spec)
    executors = spec["deploymentSpec"]["executors"]
    for name in ["cache", "evaluate", *(f"train-{s}" for s in STAGES)]:
        ex = _executor(spec, tasks[name])
        acc = executors[ex]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == GPU
        assert k8s[ex]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
        assert k8s[ex]["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "tolerations"
        assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"} in k8s[ex]["emptyDirMounts"]
    for name in ["filter", "cache", "evaluate", *(f"train-{s}" for s in STAGES)]:
        ex = _executor(spec, tasks[name])
        (secret,) = k8s[ex]["secretAsEnv"]
        assert secret["secretName"] == "fusedit-storage" and secret["optional"] is True
        assert {e["envVar"] for e in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert int(k8s[ex]["activeDeadlineSeconds"]) > 0
        assert executors[ex]["container"]["image"] == IMAGE
    for st in STAGES:
        t = tasks[f"train-{st}"]
        assert t["retryPolicy"]["maxRetryCount"] == 3 and t["retryPolicy"]["backoffDuration"] == "60s"
        assert t["retryPolicy"]["backoffFactor"] == 2.0
        assert not t["cachingOptions"].get("enableCache", False)
        acc = executors[_executor(spec, t)]["container"]["resources"]["accelerator"]
        assert "pipelinechannel--accelerators" in acc["resourceCount"]
    assert "accelerator" not in executors[_executor(spec, tasks["synth"])]["container"].get("resources", {})
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["node_selector"]["defaultValue"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert inputs["tolerations"]["defaultValue"][0]["key"] == GPU


def test_data_version_is_an_input_of_every_data_reading_task(gpu):
    spec, _ = gpu
    tasks = _tasks(spec)
    for name in ["filter", "cache", *(f"train-{s}" for s in STAGES)]:
        param = tasks[name]["inputs"]["parameters"]["data_version"]
        assert param["componentInputParameter"] == "data_version"
        assert tasks[name]["cachingOptions"].get("enableCache", False) == (not name.startswith("train-"))
    # the importer records it too, so the imported artifact differs when the data does
    assert "data_version" in json.dumps(tasks["shards"])


def test_tpu_variant_via_cli(tmp_path):
    out = tmp_path / "tpu.yaml"
    r = _cli("compile", "--variant", "tpu", "--image", "example.com/fusedit:test", "--tpu-image",
             "example.com/fusedit-tpu:test", "--secret", "my-creds", "--out", str(out))
    assert r.returncode == 0, r.stderr
    spec, k8s = _compiled(str(out))
    tasks = _tasks(spec)
    executors = spec["deploymentSpec"]["executors"]
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs["node_selector"]["defaultValue"]) == {"cloud.google.com/gke-tpu-accelerator",
                                                             "cloud.google.com/gke-tpu-topology"}
    assert inputs["device"]["defaultValue"] == "xla" and inputs["tolerations"]["defaultValue"][0]["key"] == TPU
    for st in STAGES:
        t = tasks[f"train-{st}"]
        ex = _executor(spec, t)
        assert executors[ex]["container"]["resources"]["accelerator"]["resourceType"] == TPU
        assert executors[ex]["container"]["image"] == "example.com/fusedit-tpu:test"
        assert t["inputs"]["parameters"]["device"]["componentInputParameter"] == "device"
        assert k8s[ex]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
        assert k8s[ex]["secretAsEnv"][0]["secretName"] == "my-creds"
        assert t["retryPolicy"]["maxRetryCount"] == 3
    for name in ("cache", "evaluate"):  # CPU nodes on a TPU cluster
        ex = _executor(spec, tasks[name])
        assert "accelerator" not in executors[ex]["container"].get("resources", {})
        assert executors[ex]["container"]["image"] == "example.com/fusedit:test"
    r = _cli("compile", "--variant", "arm", "--out", str(out))
    assert r.returncode == 2 and "--variant" in r.stderr


def _dvc_metrics_layout() -> set[str]:
    """Metrics and plots files dvc.yaml declares, relative to data/, with the foreach stages expanded."""
    paths = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        for key in ("metrics", "plots"):
            for entry in body.get(key, []):
                p = next(iter(entry)) if isinstance(entry, dict) else entry
                for st in STAGES if "${item.name}" in p else [None]:
                    paths.add(p.replace("${item.name}", st or "").removeprefix("data/"))
    return paths


@pytest.mark.slow
def test_run_local_whole_dag_has_the_dvc_metrics_layout(tmp_path):
    r = _cli("run-local", "--out", str(tmp_path / "run"), "--steps", "2", "--samples", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    layout = _dvc_metrics_layout()
    assert {"filtered/metrics.json", "eval/metrics.json"} <= layout
    for rel in layout:
        assert (tmp_path / "run" / rel).is_file(), rel
    for st in STAGES:
        m = json.loads((tmp_path / "run" / "train" / st / "metrics.json").read_text())
        assert m["stage"] == st and (tmp_path / "run" / "train" / st / "pipeline" / "model_index.json").is_file()
    assert "synthetic" in json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())


class _KFP(BaseHTTPRequestHandler):
    """The KFP v2beta1 endpoints kfp.Client.create_run_from_pipeline_package calls."""

    seen: list = []

    def log_message(self, *args):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body=None):
        self.seen.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                          "body": body})

    def do_GET(self):
        self._record()
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._record(body)
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-1", "display_name": body["display_name"], "state": "PENDING"})
        self.send_error(404)


def test_submit_sends_a_well_formed_run(tmp_path):
    _KFP.seen.clear()  # the class-level request log is shared with other tests using this stand-in
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HOME": str(tmp_path), "KFP_TOKEN": "tok-not-for-logs"}
    try:
        r = _cli("submit", "--host", f"http://127.0.0.1:{server.server_port}", "--experiment", "nightly",
                 "--run-name", "r1", "--param", "data_version=abc123", "--param", "accelerators=2",
                 "--param", 'node_selector={"eks.amazonaws.com/nodegroup": "gpu"}', env=env)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run-1" in r.stdout and "tok-not-for-logs" not in r.stdout + r.stderr
    seen = _KFP.seen
    assert all(s["auth"] == "Bearer tok-not-for-logs" for s in seen)
    lookup = next(s for s in seen if s["method"] == "GET" and s["path"].startswith("/apis/v2beta1/experiments"))
    assert "namespace=fusedit" in lookup["path"] and "nightly" in lookup["path"]
    created = next(s for s in seen if s["path"] == "/apis/v2beta1/experiments")
    assert created["body"]["display_name"] == "nightly" and created["body"]["namespace"] == "fusedit"
    run = next(s["body"] for s in seen if s["path"] == "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-1" and run["display_name"] == "r1" and run["service_account"] == "fusedit"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "fusedit-workflow-gpu"
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    params = run["runtime_config"]["parameters"]
    assert params["data_version"] == "abc123" and params["accelerators"] == 2
    assert params["node_selector"] == {"eks.amazonaws.com/nodegroup": "gpu"}
