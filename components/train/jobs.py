"""Multi-node training on an existing engine: create a PyTorchJob or JobSet from k8s/jobs/, follow it, report it.

A training step that needs more than one pod does not start processes itself. It fills one of the templates
shipped as `fusedit.jobs` (k8s/jobs/: the filling rule is in its README), creates the object through the
Kubernetes API with the step's service account, streams every pod's log to its own stdout (prefixed with the
pod name), waits for the job's terminal condition and deletes it. The object's name is a function of the run
and the stage, so a retried step finds the job its previous attempt created and follows it instead of
starting a second one. It runs in the pod of `train_job_op` (components/train/component.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources

import yaml

from fusedit.errors import UserError

RUN_LABEL = "fusedit.dev/run-id"
STAGE_LABEL = "fusedit.dev/stage"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class JobKind:
    """How one engine's custom resource is addressed and when it is finished."""

    template: str
    group: str
    version: str
    plural: str
    succeeded: str  # condition type meaning success
    failed: str = "Failed"


KINDS = {
    "pytorchjob": JobKind("pytorchjob-gpu.yaml", "kubeflow.org", "v1", "pytorchjobs", "Succeeded"),
    "jobset": JobKind("jobset-tpu.yaml", "jobset.x-k8s.io", "v1alpha2", "jobsets", "Completed"),
}


class JobFailed(RuntimeError):
    """The training job ended in its failed condition (or did not end in time)."""


def template_text(kind: str) -> str:
    if kind not in KINDS:
        raise UserError(f"job kind must be one of {sorted(KINDS)} (got '{kind}')")
    return (resources.files("fusedit.jobs") / KINDS[kind].template).read_text()


def render(kind: str, values: dict) -> dict:
    """The template of `kind` with every placeholder replaced by the JSON encoding of its value."""
    try:
        text = string.Template(template_text(kind)).substitute({k: json.dumps(v) for k, v in values.items()})
    except KeyError as e:
        raise UserError(f"job template '{KINDS[kind].template}': no value for placeholder {e}") from None
    return yaml.safe_load(text)


TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"


def placement(kind: str, nodes: int, accelerators: int, node_selector: dict, tolerations: list) -> dict:
    """The node placeholders of `kind` from the pipeline's own parameters (nodes, accelerators per node, pool)."""
    if nodes < 1 or accelerators < 1:
        raise UserError(f"nodes and accelerators must be >= 1 (got {nodes}, {accelerators})")
    if kind == "pytorchjob":
        return {"WORKERS": nodes - 1, "GPUS_PER_NODE": accelerators, "NPROC_PER_NODE": str(accelerators),
                "NODE_SELECTOR": node_selector, "TOLERATIONS": tolerations}
    missing = [k for k in (TPU_ACCELERATOR_LABEL, TPU_TOPOLOGY_LABEL) if k not in node_selector]
    if missing:
        raise UserError(f"node_selector: a TPU slice needs {', '.join(missing)}")
    return {"TPU_HOSTS": nodes, "TPU_CHIPS_PER_HOST": accelerators,
            "TPU_ACCELERATOR": node_selector[TPU_ACCELERATOR_LABEL], "TPU_TOPOLOGY": node_selector[TPU_TOPOLOGY_LABEL]}


def job_name(run_id: str, stage: str) -> str:
    """A stable RFC 1035 name (<= 40 characters): the same run and stage always give the same job."""
    digest = hashlib.sha256(f"{run_id}/{stage}".encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() else "-" for c in stage.lower()).strip("-")[:20] or "stage"
    return f"fusedit-{slug}-{digest}"


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 characters of [A-Za-z0-9._-], alphanumeric at both ends."""
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:63]
    return clean.strip("._-") or "none"


def own_namespace(default: str = "fusedit") -> str:
    """The namespace of the pod this runs in (its service-account mount), else `default`."""
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def condition(obj: dict, kind: JobKind) -> tuple[str, str] | None:
    """('succeeded'|'failed', message) once the job reached a terminal condition, else None."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") == kind.succeeded:
            return "succeeded", c.get("message", "")
        if c.get("type") == kind.failed:
            return "failed", c.get("message") or c.get("reason", "")
    return None


class Launcher:
    """Create, follow and clean up one training job through the Kubernetes API."""

    def __init__(self, api_client=None, namespace: str | None = None, out=None, poll_s: float = 5.0):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:  # KUBECONFIG as it is now (kubernetes reads it once, at import)
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace or own_namespace()
        self.out = out or sys.stdout
        self.poll_s = poll_s
        self._following: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def run(self, kind: str, obj: dict, timeout_s: float, keep: bool = False) -> dict:
        """Create `obj` (or adopt the job of that name), stream its pods' logs until it ends; return its status."""
        k = KINDS[kind]
        name = obj["metadata"]["name"]
        obj["metadata"]["namespace"] = self.namespace
        self._create(k, obj)
        try:
            status = self._await(k, name, timeout_s)
        finally:
            self._drain()
            if not keep:
                self._delete(k, name)
        return status

    def _create(self, k: JobKind, obj: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        name = obj["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(k.group, k.version, self.namespace, k.plural, obj)
            self._say(f"created {k.plural}/{name} in namespace {self.namespace}")
        except ApiException as e:
            if e.status != 409:
                raise JobFailed(f"creating {k.plural}/{name}: HTTP {e.status} {e.reason}: {e.body}") from None
            self._say(f"{k.plural}/{name} exists (a previous attempt of this step): following it")

    def _await(self, k: JobKind, name: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self.custom.get_namespaced_custom_object(k.group, k.version, self.namespace, k.plural, name)
            labels = obj["metadata"].get("labels", {})
            self._follow_pods(",".join(f"{key}={labels.get(key, '')}" for key in (RUN_LABEL, STAGE_LABEL)))
            done = condition(obj, k)
            if done is not None:
                state, message = done
                self._drain()
                self._say(f"{k.plural}/{name}: {state}" + (f" ({message})" if message else ""))
                if state == "failed":
                    raise JobFailed(f"{k.plural}/{name} failed: {message or 'no message'}")
                return obj.get("status", {})
            if time.monotonic() > deadline:
                raise JobFailed(f"{k.plural}/{name} did not finish within {timeout_s:.0f} s")
            time.sleep(self.poll_s)

    def _follow_pods(self, selector: str) -> None:
        """Start one log-streaming thread per pod that has started (and is not followed yet)."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        for pod in pods:
            name = pod.metadata.name
            if name in self._following or pod.status.phase == "Pending":
                continue
            t = threading.Thread(target=self._stream, args=(name,), daemon=True)
            self._following[name] = t
            t.start()

    def _stream(self, pod: str) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False)
            pending = b""
            for chunk in resp.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._say(line.decode(errors="replace"), prefix=pod)
            if pending:
                self._say(pending.decode(errors="replace"), prefix=pod)
        except Exception as e:  # a log that cannot be read must not fail the job it reports on
            self._say(f"(log stream ended: {type(e).__name__}: {e})", prefix=pod)

    def _drain(self, timeout_s: float = 30.0) -> None:
        for t in self._following.values():
            t.join(timeout_s)

    def _delete(self, k: JobKind, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(k.group, k.version, self.namespace, k.plural, name,
                                                        propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                self._say(f"could not delete {k.plural}/{name}: HTTP {e.status}")

    def _say(self, text: str, prefix: str = "fusedit") -> None:
        with self._lock:
            print(f"[{prefix}] {text}", file=self.out, flush=True)
