"""k8s/: every overlay renders with kustomize and validates offline; RBAC stays namespaced and minimal;
the storage Secret is a template without credentials; the training-job templates (k8s/jobs/) fill into
valid JobSet / PyTorchJob objects whose pod parts validate against the Kubernetes schemas and whose
container command line really runs.

Core kinds are checked with `kubernetes-validate` (bundled schemas, strict: unknown fields fail). The
CRD kinds are checked for their required fields, names and labels, and the core objects embedded in
them (a JobSet's Job template, a PyTorchJob's pod templates) are validated as the core kinds they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["gke-gpu", "gke-tpu", "eks-gpu"]
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest and newest minor the manifests must stay valid for
NAMESPACE = "fusedit"
SERVICE_ACCOUNT = "fusedit"
CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap"}
STORAGE_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FUSEDIT_S3_ENDPOINT"}
JOB_VERBS = {"create", "get", "delete"}
ALLOWED_RULES = {  # (apiGroup, resource, object name or None) -> the verbs a step may use; nothing else
    ("", "configmaps", "kfp-launcher"): {"get"},  # KFP's driver (k8s/base/kfp-launcher-calls.yaml)
    ("", "secrets", "mlpipeline-minio-artifact"): {"get"},  # KFP's launcher: the artifact store
    ("argoproj.io", "workflowtaskresults", None): {"create", "patch"},  # Argo's executor
    ("jobset.x-k8s.io", "jobsets", None): JOB_VERBS,
    ("trainer.kubeflow.org", "trainjobs", None): JOB_VERBS,
    ("kubeflow.org", "pytorchjobs", None): JOB_VERBS,
    ("", "pods", None): {"list"},
    ("", "pods/log", None): {"get"},
}
NODE_LABELS = {
    "gke-gpu": {"cloud.google.com/gke-accelerator"},
    "gke-tpu": {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"},
    "eks-gpu": {"eks.amazonaws.com/nodegroup", "k8s.amazonaws.com/accelerator"},
}
IDENTITY = {"gke-gpu": "iam.gke.io/gcp-service-account", "gke-tpu": "iam.gke.io/gcp-service-account",
            "eks-gpu": "eks.amazonaws.com/role-arn"}
IDENTITY_VALUE = {
    "iam.gke.io/gcp-service-account": r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com",
    "eks.amazonaws.com/role-arn": r"arn:aws:iam::[A-Za-z0-9_]+:role/[\w+=,.@-]+",
}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
REAL_CREDENTIAL = re.compile(  # AWS access key ids, 40-character secret keys, GCS HMAC ids
    r"(AKIA|ASIA)[0-9A-Z]{16}|(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])|GOOG[0-9A-Z]{20,}")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")


def validate(doc: dict, version: str = K8S_VERSIONS[-1]) -> None:
    """kubernetes-validate in strict mode; the error is cut to its first line (the schemas are huge)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) if getattr(e, "path", None) else ""
        pytest.fail(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')} (k8s {version}) {where}: "
                    f"{str(e).splitlines()[0]}")


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS} | {"base": kustomize(K8S / "base")}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------- kustomize renders, core kinds validate


@needs_kubectl
@pytest.mark.parametrize("target", ["base", *OVERLAYS])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_renders_and_validates(rendered, target, version):
    docs = rendered[target]
    assert {d["kind"] for d in docs} == CORE_KINDS
    assert len(docs) == len(CORE_KINDS), "one object of each kind"
    for d in docs:
        validate(d, version)
        meta = d["metadata"]
        assert DNS1123_LABEL.match(meta["name"]), meta["name"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "fusedit"
        if d["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE and "namespace" not in meta
        else:
            assert meta["namespace"] == NAMESPACE, f"{d['kind']} {meta['name']} outside {NAMESPACE}"
        if target != "base":
            assert meta["labels"]["fusedit.dev/target"] == target


@needs_kubectl
def test_namespace_and_storage(rendered):
    for target in OVERLAYS:
        docs = rendered[target]
        ns = one(docs, "Namespace")["metadata"]["labels"]
        assert ns["pod-security.kubernetes.io/enforce"] in {"baseline", "restricted"}
        pvc = one(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == "fusedit-scratch"
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert re.fullmatch(r"\d+(Gi|Ti)", pvc["spec"]["resources"]["requests"]["storage"])
        cm = one(docs, "ConfigMap")
        assert cm["metadata"]["name"] == "fusedit-config"
        data = cm["data"]
        assert re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", data["FUSEDIT_S3_ENDPOINT"])
        assert data["FUSEDIT_SERVICE_ACCOUNT"] == SERVICE_ACCOUNT
        assert data["FUSEDIT_SCRATCH_PVC"] == pvc["metadata"]["name"]
        assert data["FUSEDIT_STORAGE_SECRET"] == "fusedit-storage"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(data), "keys belong in the Secret"
    assert "storageClassName" not in one(rendered["base"], "PersistentVolumeClaim")["spec"]
    for target in ("gke-gpu", "gke-tpu"):
        assert one(rendered[target], "PersistentVolumeClaim")["spec"]["storageClassName"] == "premium-rwo"


# ---------------------------------------------------------------- RBAC: namespaced and minimal


@needs_kubectl
def test_rbac_is_namespaced_and_minimal(rendered):
    for target, docs in rendered.items():
        assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding"), target
        role, binding = one(docs, "Role"), one(docs, "RoleBinding")
        granted: dict[tuple[str, str, str | None], set[str]] = {}
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, f"rule fields {set(rule)}"
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], "no wildcards"
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for n in rule.get("resourceNames") or [None]:
                        granted.setdefault((g, r, n), set()).update(rule["verbs"])
        assert granted == ALLOWED_RULES, f"{target}: the Role grants {granted}"
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
        sa = one(docs, "ServiceAccount")
        assert sa["metadata"]["name"] == SERVICE_ACCOUNT and sa["automountServiceAccountToken"] is True


def test_no_cluster_scoped_rbac_anywhere():
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") not in {"ClusterRole", "ClusterRoleBinding"}, path


# ---------------------------------------------------------------- overlays: identity and node pools


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_overlay_identity_and_node_pool(rendered, target):
    docs = rendered[target]
    notes = one(docs, "ServiceAccount")["metadata"].get("annotations", {})
    key = IDENTITY[target]
    cloud_keys = {k for k in notes if k in IDENTITY_VALUE}
    assert cloud_keys == {key}, f"{target}: identity annotations {cloud_keys}"
    assert re.fullmatch(IDENTITY_VALUE[key], notes[key]), notes[key]
    assert "REPLACE_WITH_" in notes[key], "the shipped value is a placeholder, marked as such"

    data = one(docs, "ConfigMap")["data"]
    selector, tolerations = json.loads(data["FUSEDIT_NODE_SELECTOR"]), json.loads(data["FUSEDIT_TOLERATIONS"])
    assert set(selector) == NODE_LABELS[target]
    accelerator = data["FUSEDIT_ACCELERATOR"]
    assert accelerator == ("google.com/tpu" if target.endswith("tpu") else "nvidia.com/gpu")
    assert [t["key"] for t in tolerations] == [accelerator]
    per_node = int(data["FUSEDIT_ACCELERATORS_PER_NODE"])
    assert per_node >= 1
    # the selector and tolerations must be usable as they are in a pod
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
              "spec": {"nodeSelector": selector, "tolerations": tolerations,
                       "containers": [{"name": "c", "image": "busybox:1.36",
                                       "resources": {"limits": {accelerator: per_node}}}]}})
    if target.endswith("tpu"):
        topology = selector["cloud.google.com/gke-tpu-topology"]
        assert re.fullmatch(r"\d+x\d+(x\d+)?", topology)
        chips = 1
        for n in topology.split("x"):
            chips *= int(n)
        assert int(data["FUSEDIT_TPU_HOSTS"]) * per_node == chips, "hosts x chips per host = chips of the topology"


# ---------------------------------------------------------------- the storage Secret is a template only


def test_secret_template_has_no_credentials():
    path = K8S / "base" / "secret-storage.template.yaml"
    secret = yaml.safe_load(path.read_text())
    validate(secret)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "fusedit-storage"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert "data" not in secret, "placeholders only, in stringData"
    assert set(secret["stringData"]) == STORAGE_KEYS
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE_ME"), f"{key} must be a marked placeholder"
    assert "TEMPLATE ONLY" in path.read_text()
    # not applied by kustomize, so re-applying an overlay never overwrites the real Secret
    for kfile in K8S.rglob("kustomization.yaml"):
        text = kfile.read_text()
        assert "secret-storage" not in yaml.safe_dump(yaml.safe_load(text)), kfile
        assert "secretGenerator" not in text, kfile


def test_no_credentials_in_manifests_or_images():
    files = [p for p in K8S.rglob("*") if p.is_file()] + [p for p in (ROOT / "docker").rglob("*") if p.is_file()]
    files.append(ROOT / ".dockerignore")
    for path in files:
        text = path.read_text()
        hit = REAL_CREDENTIAL.search(text)
        assert hit is None, f"{path.relative_to(ROOT)}: looks like a credential: {hit.group(0)[:8]}..."
        assert not re.search(r"(?im)^\s*(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)\s*[=:]\s*['\"]?(?!REPLACE_ME)\w",
                             text), f"{path.relative_to(ROOT)} sets a storage key"


# ---------------------------------------------------------------- training-job templates (CRD kinds)

PLACEHOLDER = re.compile(r"(?<!\$)\$\{([A-Z_]+)\}")
COMMON = {"JOB_NAME", "NAMESPACE", "RUN_ID", "STAGE", "IMAGE", "TRAIN_ARGS", "PARAMS_YAML", "MAX_RESTARTS",
          "STORAGE_SECRET", "CPU_REQUEST", "MEMORY_REQUEST"}
TEMPLATES = {
    "jobset-tpu.yaml": COMMON | {"TPU_ACCELERATOR", "TPU_TOPOLOGY", "TPU_HOSTS", "TPU_CHIPS_PER_HOST"},
    "pytorchjob-gpu.yaml": COMMON | {"WORKERS", "GPUS_PER_NODE", "NPROC_PER_NODE", "NODE_SELECTOR", "TOLERATIONS"},
}
PARAMS_TEXT = ("train:\n  stages:\n  - name: base\n    steps: 10\n"
               "    # a 'quote', a \"quote\", $HOME and ${X}: all literal\n")
EXAMPLE = {
    "JOB_NAME": "fusedit-base-3f9c2a", "NAMESPACE": NAMESPACE, "RUN_ID": "7c3e9a0b-1d2f-4e5a-9b8c-0d1e2f3a4b5c",
    "STAGE": "base", "IMAGE": "ghcr.io/fusedit/fusedit:0.1.0", "MAX_RESTARTS": 3, "PARAMS_YAML": PARAMS_TEXT,
    "STORAGE_SECRET": "team-storage", "CPU_REQUEST": "32", "MEMORY_REQUEST": "256Gi",
    "TRAIN_ARGS": ["--recipe", "fusedit/baseline", "--stage", "base", "--data", "s3://bucket/cache",
                   "--output", "s3://bucket/train/base", "--set", "model.dit_num_layers=2"],
    "TPU_ACCELERATOR": "tpu-v5p-slice", "TPU_TOPOLOGY": "2x2x2", "TPU_HOSTS": 2, "TPU_CHIPS_PER_HOST": 4,
    "WORKERS": 3, "GPUS_PER_NODE": 8, "NPROC_PER_NODE": "8",
    "NODE_SELECTOR": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    "TOLERATIONS": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def render(name: str, values: dict) -> tuple[str, dict]:
    """The filling rule of k8s/jobs/README.md: each placeholder becomes the JSON encoding of its value."""
    text = string.Template((K8S / "jobs" / name).read_text()).substitute({k: json.dumps(v) for k, v in values.items()})
    return text, yaml.safe_load(text)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_placeholders_are_documented(name):
    text = (K8S / "jobs" / name).read_text()
    assert set(PLACEHOLDER.findall(text)) == TEMPLATES[name]
    readme = (K8S / "jobs" / "README.md").read_text()
    for p in TEMPLATES[name]:
        assert f"`{p}`" in readme, f"{p} is not documented in k8s/jobs/README.md"
    # unfilled, a template is still YAML (a placeholder is a plain scalar)
    assert yaml.safe_load(text)["metadata"]["name"] == "${JOB_NAME}"


def pod_checks(pod: dict, image: str, accelerator: str, count: int) -> dict:
    """Checks shared by every training pod; returns its one container."""
    spec = pod["spec"]
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["terminationGracePeriodSeconds"] >= 120, "time to finish the step and save on SIGTERM"
    assert pod["metadata"]["labels"]["fusedit.dev/run-id"] == EXAMPLE["RUN_ID"]
    assert pod["metadata"]["labels"]["fusedit.dev/stage"] == EXAMPLE["STAGE"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    (c,) = spec["containers"]
    assert c["image"] == image
    assert c["resources"]["limits"][accelerator] == count and c["resources"]["requests"][accelerator] == count
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm", "/scratch"}
    refs = [next(iter(e.values()))["name"] for e in c["envFrom"]]
    assert refs == ["fusedit-config", EXAMPLE["STORAGE_SECRET"]], "ConfigMap first, the Secret's keys win"
    assert c["args"] == EXAMPLE["TRAIN_ARGS"]
    assert {e["name"]: e["value"] for e in c["env"]}["FUSEDIT_PARAMS"] == PARAMS_TEXT
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    for label in pod["metadata"]["labels"].values():
        assert len(label) <= 63 and LABEL_VALUE.match(label), label
    return c


def test_jobset_tpu_template():
    _, js = render("jobset-tpu.yaml", EXAMPLE)  # substitute() fails on any placeholder left unfilled
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
    meta = js["metadata"]
    assert DNS1035_LABEL.match(meta["name"]) and len(meta["name"]) <= 40
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"]["app.kubernetes.io/part-of"] == "fusedit"
    assert meta["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    spec = js["spec"]
    assert set(spec) <= {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
                         "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies"}
    assert spec["failurePolicy"]["maxRestarts"] == EXAMPLE["MAX_RESTARTS"]
    assert spec["network"]["enableDNSHostnames"] is True
    rjobs = spec["replicatedJobs"]
    assert rjobs and len({r["name"] for r in rjobs}) == len(rjobs)
    for rj in rjobs:
        assert set(rj) <= {"name", "groupName", "template", "replicas", "dependsOn"}
        assert DNS1035_LABEL.match(rj["name"]) and rj["replicas"] == 1
        # the Job template is a core batch/v1 JobTemplateSpec: validate it as a Job
        for version in K8S_VERSIONS:
            validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{meta['name']}-{rj['name']}-0"},
                      "spec": rj["template"]["spec"]}, version)
        job = rj["template"]["spec"]
        assert job["parallelism"] == job["completions"] == EXAMPLE["TPU_HOSTS"]
        assert job["completionMode"] == "Indexed"
        pod = job["template"]
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": EXAMPLE["TPU_ACCELERATOR"],
                                               "cloud.google.com/gke-tpu-topology": EXAMPLE["TPU_TOPOLOGY"]}
        assert [t["key"] for t in pod["spec"]["tolerations"]] == ["google.com/tpu"]
        c = pod_checks(pod, EXAMPLE["IMAGE"], "google.com/tpu", EXAMPLE["TPU_CHIPS_PER_HOST"])
        assert "--device xla" in c["command"][2]
        assert not pod["spec"].get("hostNetwork") and not c["securityContext"].get("privileged")


def test_pytorchjob_gpu_template():
    _, pj = render("pytorchjob-gpu.yaml", EXAMPLE)
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["kind"] == "PyTorchJob"
    meta = pj["metadata"]
    assert DNS1035_LABEL.match(meta["name"]) and len(meta["name"]) <= 40 and meta["namespace"] == NAMESPACE
    spec = pj["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "runPolicy", "elasticPolicy", "nprocPerNode"}
    assert spec["nprocPerNode"] == str(EXAMPLE["GPUS_PER_NODE"]), "a string in kubeflow.org/v1"
    assert spec["runPolicy"]["backoffLimit"] == EXAMPLE["MAX_RESTARTS"]
    assert spec["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == EXAMPLE["WORKERS"]
    for rtype, rs in replicas.items():
        assert set(rs) <= {"replicas", "restartPolicy", "template"}
        assert rs["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        for version in K8S_VERSIONS:
            validate({"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": f"{meta['name']}-{rtype.lower()}"}, "template": rs["template"]}, version)
        pod = rs["template"]
        assert pod["spec"]["nodeSelector"] == EXAMPLE["NODE_SELECTOR"]
        assert pod["spec"]["tolerations"] == EXAMPLE["TOLERATIONS"]
        c = pod_checks(pod, EXAMPLE["IMAGE"], "nvidia.com/gpu", EXAMPLE["GPUS_PER_NODE"])
        assert c["name"] == "pytorch", "the training operator finds its container by this name"
        assert "torchrun --no-python fusedit train" in c["command"][2]


def run_container_command(container: dict, extra_env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a filled container's command + args here, with this environment's fusedit (and torchrun)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": path,
           **{e["name"]: e["value"] for e in container["env"]}, **extra_env}
    return subprocess.run(container["command"] + container["args"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_job_command_runs(name, tmp_path):
    """The shell line of a filled template writes the params file and reaches `fusedit train` with the args.

    TRAIN_ARGS ends with --help here, so the real CLI parses every option and exits 0 without training;
    for the PyTorchJob, torchrun runs standalone with one process (the operator would set PET_* instead).
    """
    if shutil.which("fusedit", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the fusedit CLI is not installed in this environment")
    _, obj = render(name, EXAMPLE | {"TRAIN_ARGS": [*EXAMPLE["TRAIN_ARGS"], "--help"]})
    if obj["kind"] == "JobSet":
        container = obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
        extra = {"PJRT_DEVICE": "CPU"}
    else:
        container = obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        extra = {"PET_STANDALONE": "1", "PET_NPROC_PER_NODE": "1", "PET_NNODES": "1"}
    r = run_container_command(container, extra, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "--recipe" in r.stdout and "--params" in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "fusedit-params.yaml").read_text() == PARAMS_TEXT + "\n"
