"""Containers and cluster objects run with least privilege, checked on the rendered manifests.

Every pod the manifests can create (the training-job templates, filled) runs as the images' non-root user,
drops all capabilities, cannot escalate, has a read-only root filesystem whose writable places are exactly
the mounted emptyDirs, and mounts no API token. RBAC is one namespaced Role whose rules are the Kubernetes
API calls made from a step pod, nothing more: those of the step code (components/ and pipelines/, found in their
source) and those of KFP's own driver, launcher and Argo executor (the cited list k8s/base/kfp-launcher-calls.yaml,
for the KFP features the compiled pipelines use), with the objects named where they are known. These are the
checks `checkov` would make for these objects (it is not a dependency: installing it would change pinned versions
of the main environment).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_k8s import EXAMPLE, K8S, OVERLAYS, by_kind, kustomize, needs_kubectl, one, render

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
# kubernetes-client methods -> (apiGroup or "custom", resource or "custom", verb)
API_CALLS = {
    "create_namespaced_custom_object": "create", "get_namespaced_custom_object": "get",
    "list_namespaced_custom_object": "list", "delete_namespaced_custom_object": "delete",
    "patch_namespaced_custom_object": "patch", "replace_namespaced_custom_object": "update",
    "list_namespaced_pod": ("pods", "list"), "read_namespaced_pod": ("pods", "get"),
    "read_namespaced_pod_log": ("pods/log", "get"), "delete_namespaced_pod": ("pods", "delete"),
    "Watch": "watch",
}
STEP_CODE = ("components", "pipelines")  # what a step pod runs (the job launcher: components/train/jobs.py)
CRDS = {("jobset.x-k8s.io", "jobsets"), ("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")}


def image_user(dockerfile: Path) -> tuple[int, int, dict[str, str], str]:
    """(uid, gid, ENV of the final stage, WORKDIR) of an image, read from its Dockerfile."""
    final = dockerfile.read_text().split("\nFROM ")[-1]
    text = final.replace("\\\n", " ")
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)[-1:]
    uid, gid = (int(x) for x in user.split(":"))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.*)$", text, re.M))))
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    return uid, gid, env, workdir


def pods() -> dict[str, dict]:
    """Every pod spec the filled training-job templates create."""
    _, js = render("jobset-tpu.yaml", EXAMPLE)
    _, pj = render("pytorchjob-gpu.yaml", EXAMPLE)
    out = {f"jobset/{rj['name']}": rj["template"]["spec"]["template"]["spec"] for rj in js["spec"]["replicatedJobs"]}
    out |= {f"pytorchjob/{k}": v["template"]["spec"] for k, v in pj["spec"]["pytorchReplicaSpecs"].items()}
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(dockerfile):
    uid, gid, _, _ = image_user(dockerfile)
    assert uid >= 10000 and gid >= 10000, "a non-root UID outside the host's range"


@pytest.mark.parametrize("name", sorted(pods()))
def test_training_pods_least_privilege(name):
    spec = pods()[name]
    psc = spec["securityContext"]
    uids = {image_user(d)[0] for d in DOCKERFILES}
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] in uids and psc["runAsGroup"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), key
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is not True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("runAsUser", psc["runAsUser"]) != 0
        for e in c.get("env", []):  # storage credentials only ever come from the Secret
            assert not e["name"].startswith("AWS_") or "valueFrom" in e, e["name"]


@pytest.mark.parametrize("name", sorted(pods()))
def test_read_only_root_leaves_every_written_path_on_a_volume(name):
    """/tmp, HF_HOME and the image's WORKDIR (and the job's scratch and shm) are emptyDir mounts."""
    spec = pods()[name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: volumes[m["volumeName"] if "volumeName" in m else m["name"]] for m in c["volumeMounts"]}
    assert all("emptyDir" in v for v in mounts.values()), "writable places are per-pod emptyDirs"
    needed = {"/tmp", "/dev/shm", "/scratch"}
    for d in DOCKERFILES:
        _, _, env, workdir = image_user(d)
        needed |= {workdir, env["HF_HOME"]}
    for path in needed:
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is not writable"
    assert "$${TMPDIR:-/tmp}" in c["command"][2] or "${TMPDIR:-/tmp}" in c["command"][2]


def used_rules() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every Kubernetes API call in the code step pods run, components/ and
    pipelines/ (the job launcher is components/train/jobs.py; CRD calls: each CRD kind)."""
    out = set()
    for f in sorted(p for folder in STEP_CODE for p in (ROOT / folder).rglob("*.py")):
        for method in re.findall(r"\.(\w+)\(", f.read_text()):
            what = API_CALLS.get(method)
            if isinstance(what, tuple):
                out.add(("", *what))
            elif what:
                out |= {(g, r, what) for g, r in CRDS}
    return out


def compiled_features() -> set[str]:
    """The KFP features that change which calls KFP's own binaries make, as the shipped pipelines use them."""
    import subprocess
    import sys
    import tempfile

    features = set()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [["pipeline", "compile", "--out", f"{tmp}/gpu.yaml"],
                ["pipeline", "compile", "--variant", "tpu", "--nodes", "2", "--out", f"{tmp}/tpu.yaml"],
                ["ablate", "compile", "ablations/toy.yaml", "--out", f"{tmp}/toy.yaml"]]
        for args in runs:
            r = subprocess.run([sys.executable, "-m", "fusedit", *args], cwd=ROOT, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stderr
            spec = next(yaml.safe_load_all(Path(args[-1]).read_text()))
            for ex in spec["deploymentSpec"]["executors"].values():
                if "importer" in ex:
                    features.add("importer")
                image = ex.get("container", {}).get("image", "")
                if image.startswith("argostub/"):  # kfp.kubernetes.CreatePVC / DeletePVC tasks
                    features.add(image.removeprefix("argostub/"))
    return features


def required_rules(features: set[str]) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, object name or None) the step pods need: KFP's own calls (the cited list in
    k8s/base/kfp-launcher-calls.yaml, for the features the pipelines use) and the calls of the step code."""
    doc = yaml.safe_load((K8S / "base" / "kfp-launcher-calls.yaml").read_text())
    out = {(g, r, v, None) for g, r, v in used_rules()}
    for call in doc["calls"]:
        assert call["source"] and isinstance(call["fatal"], bool), call
        if call["when"] == "always" or call["when"] in features:
            out |= {(call["apiGroup"], call["resource"], v, call.get("name")) for v in call["verbs"]}
    return out


@pytest.fixture(scope="module")
def features() -> set[str]:
    return compiled_features()


def test_kfp_calls_are_cited_at_a_pinned_release():
    doc = yaml.safe_load((K8S / "base" / "kfp-launcher-calls.yaml").read_text())
    tag = doc["kfp_version"]
    assert re.fullmatch(r"2\.17\.\d+", tag), tag
    assert doc["source"].startswith(f"https://github.com/kubeflow/pipelines/tree/{tag}/")
    whos = {c["who"].split()[0] for c in doc["calls"]}
    assert {"driver", "launcher"} <= whos
    for call in doc["calls"]:
        if call["who"].split()[0] in {"driver", "launcher", "importer"}:
            assert call["source"].startswith("backend/src/v2/"), call["source"]
        if call["resource"] in {"secrets", "configmaps"}:
            assert call.get("name"), f"{call['who']}: a known object is named (resourceNames)"


@needs_kubectl
@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_rbac_is_namespaced_and_exactly_the_calls_made(target, features):
    docs = kustomize(K8S / target if target == "base" else K8S / "overlays" / target)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    granted = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not {"roles", "rolebindings"} & set(rule["resources"]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        if {"secrets", "configmaps"} & set(rule["resources"]):  # never a blanket read of the namespace's secrets
            assert rule.get("resourceNames") and rule["verbs"] == ["get"], rule
        names = rule.get("resourceNames") or [None]
        granted |= {(g, r, v, n) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                    for n in names}
    assert used_rules(), f"no Kubernetes API call found in {STEP_CODE}"
    assert "createpvc" not in features, "a CreatePVC task makes KFP's driver create PVCs: add its calls"
    needed = required_rules(features)
    assert granted == needed, f"granted, unused: {sorted(granted - needed, key=str)}; " \
                              f"used, not granted: {sorted(needed - granted, key=str)}"
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == "fusedit"
